"""`jaxlaunch.launch`'s keywords, typed for a type checker (`launch(**options: Unpack[LaunchKeywords])`).

The flag table (`options.table`) is built at run time from the config's dataclasses, which a type
checker cannot see, so the keywords are declared here once more, as what a caller may pass (a flag's
text or the value itself); `tests/unit/test_options.py` fails when a flag has no keyword here, a
keyword no flag, or a type that does not take the field's values. The entry's own settings go in
`config={...}` (the keywords of an entry's declared settings are accepted too, untyped)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypedDict

from jaxlaunch.contract.protocol import Injection


class LaunchKeywords(TypedDict, total=False):
    """One per flag of `jaxlaunch --help`, named as the flag without its dashes (--entry is `launch`'s
    first parameter)."""

    config: dict[str, Any] | str | Sequence[str]
    hosts: int
    mesh: dict[str, int] | str
    run_dir: str | None
    address: str | None
    devices_per_host: int
    placement_timeout: float
    warm_standby: bool
    steps: int
    schedule_steps: int | None
    seed: int
    save_every: int | Literal["auto"]
    memory_tier: bool
    persist_every: int | Literal["auto"]
    startup_timeout: float
    hang_timeout: float
    save_timeout: float
    max_restarts: int
    max_preemptions: int
    min_hosts: int | None
    max_hosts: int | None
    capacity_timeout: float
    verify_every: int
    straggler_action: Literal["warn", "replace"]
    trackers: str | Sequence[str]
    metrics_port: int | None
    config_file: str | None
    name: str | None
    resume: bool | Literal["auto"]
    allow_change: str | Sequence[str]
    inject: str | Injection | Sequence[str | Injection]
    chaos: float | None
