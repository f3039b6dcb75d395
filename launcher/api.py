"""`jaxlaunch.launch`: a job from Python, to its end, without exiting the process."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Unpack

from jaxlaunch.launcher.configuration import job as job_lib
from jaxlaunch.launcher.configuration.keywords import LaunchKeywords
from jaxlaunch.launcher.configuration.schema import JobConfig
from jaxlaunch.launcher.views.display import Display

if TYPE_CHECKING:
    from jaxlaunch.launcher.runner import LaunchResult

from jaxlaunch.contract import entry as entry_lib


def launch(entry: str | Callable[[Any], Any] | None = None, job: JobConfig | None = None, *,
           quiet: bool = False, **options: Unpack[LaunchKeywords]) -> LaunchResult:
    """Runs a job to its end and returns its outcome; never exits the process.

    `entry` is your function, or its name as --entry takes it (default: `job`'s entry, or the
    built-in model). A function the hosts can import by name travels by name; one defined in
    `__main__`, a notebook or an interactive session (or nested in another function) travels by
    value, pickled with what it uses, so nothing of your script runs again on the hosts. `options` are the
    command line's flags as keywords, typed by the config fields that declare them (`jaxlaunch --help`
    lists them): hosts, steps, save_every, seed, run_dir, resume (True or "auto"), config (the
    entry's settings, a dict, as --set), config_file, address, min_hosts, max_hosts, max_restarts,
    hang_timeout, inject (["kill@step=12,host=1"]), chaos, mesh, allow_change, ...; and the entry's
    declared settings (model="small" for the built-in model: accepted, though a type checker
    knows only `config={"model": "small"}`; the others are typed by `LaunchKeywords`). `job` is the typed alternative: a
    JobConfig whose fields that differ from the defaults are applied as flags would be (over the
    run's saved config on resume); keywords override it.

    Raises ConfigError for bad input (nothing is written); a job that fails returns a result with
    status "failed" and the attempt table."""
    entry_lib.refuse_nested_launch()  # before Ray is imported: a host or an --entry import gets its reason at once
    # Imported in a notebook, Ray suggests ipywidgets for widgets of its own, which a launch never shows.
    logging.getLogger("ray.widgets.util").setLevel(logging.WARNING)
    from jaxlaunch.launcher import runner

    given: dict[str, Any] = dict(options)
    found = None
    if entry is not None and not isinstance(entry, str):
        found = entry_lib.from_callable(entry)
        entry = str(found.ref)
    if entry is not None:
        given["entry"] = entry
    prepared = job_lib.prepare(given, typed=job, found=found)
    return runner.run_job(prepared, Display(quiet=quiet))
