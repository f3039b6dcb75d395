"""examples/grain_iter.py's job (per-host Grain iterators) with the gates of `tests/integration/gated.py`."""

import jaxlaunch
from examples import grain_iter
from tests.integration.gated import gated

main = jaxlaunch.entrypoint(defaults={**grain_iter.SETTINGS, "gates": ""}, check=grain_iter.check)(
    gated(grain_iter.main))
