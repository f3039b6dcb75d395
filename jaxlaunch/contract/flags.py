"""A config field that is also a command-line flag and a keyword of `jaxlaunch.launch`, declared once.

    save_every: int = flag(50)
    \"\"\"Save every this many steps.\"\"\"

is the YAML key `checkpoint.save_every`, the flag `--save-every` and `launch(save_every=...)`; its help
is the field's docstring and its default the field's default. The launcher builds its command line
from these declarations (`jaxlaunch.launcher.configuration.options`); here is only the marker, so that the sections
the hosts own can declare their flags without importing the launcher.

Adding a setting is adding such a field to the section that owns it, and nothing else: its values
are checked against its annotation by `jaxlaunch.contract.values.coerce` (a flag's text is tried as
itself, then as a YAML scalar, so `int | Literal["auto"]` takes `5` and `auto`), and a number must
be finite and above 0 (`schema.NON_NEGATIVE` names those that may be 0). A rule that relates it to
other fields is one `if` in `jaxlaunch.launcher.configuration.schema.CheckedJob.rules`. A field
without `flag(...)` is a config-file key only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

FLAG_KEY = "jaxlaunch.flag"


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """How a field shows on the command line (every part optional)."""

    name: str | None = None
    """The keyword of `jaxlaunch.launch`; the flag is it with dashes. Default: the field's name
    without a unit suffix (`hang_timeout_s` -> `hang_timeout`, `--hang-timeout`)."""
    cli: str | None = None
    """The flag's name when it differs from the keyword's (`--config` for `config_file`)."""
    metavar: str | None = None
    parse: Callable[[Any], Any] | None = None
    """Text (or, for a repeatable flag, the list of texts) to the field's value; default: by type."""
    repeat: bool = False
    """The flag may be given more than once; `parse` gets every value."""
    short: str | None = None
    """A one-letter alias, e.g. "-v"."""


def flag(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, name: str | None = None,
         cli: str | None = None, metavar: str | None = None, parse: Callable[[Any], Any] | None = None,
         repeat: bool = False, short: str | None = None) -> Any:
    """A dataclass field that is also a flag (see the module's docstring)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={FLAG_KEY: FlagSpec(name, cli, metavar, parse, repeat, short)})
