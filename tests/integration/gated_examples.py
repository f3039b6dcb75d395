"""examples/grain_iter.py's job (per-host Grain iterators) and examples/classifier.py's (a sharded
state), each with the gates of `tests/integration/gated.py` (a setting of its own: `--set gates=N`)."""

import jaxlaunch
from examples import classifier as classifier_example
from examples import grain_iter
from tests.integration.gated import gated


def _with_gates(example):
    return jaxlaunch.entrypoint(defaults={**example.SETTINGS, "gates": ""}, check=example.check)(gated(example.main))


grain = _with_gates(grain_iter)
classifier = _with_gates(classifier_example)
