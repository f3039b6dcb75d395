"""jaxlaunch: fault-tolerant multi-host JAX training on Ray, for your own training function.

    import jaxlaunch

    def main(ctx: jaxlaunch.HostContext):
        (model, optimizer), start = ctx.restore_or_init(make_model_and_optimizer)
        for step in range(start + 1, ctx.steps + 1):
            loss = train_step(model, optimizer, *batch(step, ctx.mesh))
            ctx.report(step, loss=loss)
            ctx.maybe_save(step, (model, optimizer))
            if ctx.should_stop(step):
                break

    result = jaxlaunch.launch(main, hosts=2, steps=100, run_dir="runs/mine")

From the shell: `jaxlaunch --entry path/to/file.py:main --hosts 2` (or `python launch.py ...`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from launcher.config import ClusterConfig, JobConfig, TrainConfig
from launcher.entry import entrypoint
from launcher.job import LaunchOptions
from launcher.policy import FaultConfig, WatchdogConfig
from launcher.protocol import CheckpointConfig, ConfigError, DistributedConfig, Injection
from launcher.runner import LaunchResult
from launcher.storage import RunStorageError

if TYPE_CHECKING:
    from workers.batch import global_batch
    from workers.context import HostContext

__all__ = [
    "launch", "LaunchResult", "HostContext", "entrypoint", "global_batch", "ConfigError", "JobConfig",
    "ClusterConfig", "TrainConfig", "CheckpointConfig", "DistributedConfig", "FaultConfig", "WatchdogConfig",
    "Injection", "LaunchOptions", "RunStorageError",
]


def launch(entry: str | Callable[[Any], Any] = "models.lm:main", *, quiet: bool = False,
           **options: Any) -> LaunchResult:
    """Runs a job to its end and returns its outcome; never exits the process.

    `entry` is your function (defined at module level in a file or an importable module), or its
    name as --entry takes it. `options` are the command line's flags as keywords: hosts, steps,
    save_every, seed, run_dir, resume (True or "auto"), config (the entry's settings, a dict),
    config_file, address, min_hosts, max_hosts, max_restarts, max_preemptions, hang_timeout,
    inject (a list of "kill@step=12,host=1"), chaos, mesh, allow_change, ...

    Raises ConfigError for bad input (nothing is written); a job that fails returns a result with
    status "failed" and the attempt table."""
    from launcher import entry as entry_lib
    from launcher import job, runner
    from launcher.display import Display

    if "config" in options:
        options["settings"] = dict(options.pop("config") or {})
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(LaunchOptions)} - {"entry"})
    if unknown:
        raise ConfigError(f"jaxlaunch.launch got unknown option {unknown[0]!r}")
    text = entry if isinstance(entry, str) else entry_lib.from_callable(entry)
    prepared = job.prepare(LaunchOptions(entry=text, **options))
    return runner.run_job(prepared, Display(quiet=quiet))


def __getattr__(name: str) -> Any:
    # The host-side names import JAX: only when asked for, so `import jaxlaunch` stays light.
    if name == "HostContext":
        from workers.context import HostContext

        return HostContext
    if name == "global_batch":
        from workers.batch import global_batch

        return global_batch
    raise AttributeError(f"module 'jaxlaunch' has no attribute {name!r}")
