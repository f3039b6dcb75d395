"""`jaxlaunch.launch`: a job from Python, to its end, without exiting the process."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxlaunch.launcher import job, runner
from jaxlaunch.launcher.display import Display
from jaxlaunch.launcher.job import LaunchOptions
from jaxlaunch.launcher.runner import LaunchResult

from jaxlaunch.contract import entry as entry_lib
from jaxlaunch.contract.entry import BUILTIN_ENTRY
from jaxlaunch.contract.protocol import ConfigError


def launch(entry: str | Callable[[Any], Any] = BUILTIN_ENTRY, *, quiet: bool = False,
           **options: Any) -> LaunchResult:
    """Runs a job to its end and returns its outcome; never exits the process.

    `entry` is your function (defined at module level in a file or an importable module), or its
    name as --entry takes it. `options` are the command line's flags as keywords: hosts, steps,
    save_every, seed, run_dir, resume (True or "auto"), config (the entry's settings, a dict),
    config_file, address, min_hosts, max_hosts, max_restarts, max_preemptions, hang_timeout,
    inject (a list of "kill@step=12,host=1"), chaos, mesh, allow_change, ...

    Raises ConfigError for bad input (nothing is written); a job that fails returns a result with
    status "failed" and the attempt table."""
    if "config" in options:
        options["settings"] = dict(options.pop("config") or {})
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(LaunchOptions)} - {"entry"})
    if unknown:
        raise ConfigError(f"jaxlaunch.launch got unknown option {unknown[0]!r}")
    text = entry if isinstance(entry, str) else entry_lib.from_callable(entry)
    prepared = job.prepare(LaunchOptions(entry=text, **options))
    return runner.run_job(prepared, Display(quiet=quiet))
