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

    result = jaxlaunch.launch(main, hosts=2, steps=100, run_dir="runs/mine")   # the flags, as keywords
    result = jaxlaunch.launch(main, jaxlaunch.JobConfig(num_hosts=2))          # or a typed config

From the shell: `jaxlaunch --entry path/to/file.py:main --hosts 2` (or `python launch.py ...`).

The package: `jaxlaunch.contract` is where the driver (`jaxlaunch.launcher`) and the host processes
(`jaxlaunch.workers`) meet; neither imports the other. Every public name is imported on first use,
so a host process that imports `jaxlaunch` loads none of the driver, and the driver none of JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from jaxlaunch.contract.entry import entrypoint
from jaxlaunch.contract.protocol import CheckpointConfig, ConfigError, DistributedConfig, Injection
from jaxlaunch.contract.storage import RunStorageError

if TYPE_CHECKING:
    from jaxlaunch.launcher.api import launch
    from jaxlaunch.launcher.configuration.schema import ClusterConfig, JobConfig, LaunchOptions, TrainConfig
    from jaxlaunch.launcher.control.policy import FaultConfig, WatchdogConfig
    from jaxlaunch.launcher.runner import LaunchResult
    from jaxlaunch.workers.context import HostContext
    from jaxlaunch.workers.inputs.batch import global_batch
    from jaxlaunch.workers.inputs.data import batch_fingerprint, elastic_iterator

__all__ = [
    "launch", "LaunchResult", "HostContext", "entrypoint", "global_batch", "ConfigError", "JobConfig",
    "ClusterConfig", "TrainConfig", "CheckpointConfig", "DistributedConfig", "FaultConfig", "WatchdogConfig",
    "Injection", "LaunchOptions", "RunStorageError", "elastic_iterator", "batch_fingerprint",
]

_LAZY = {
    "launch": "jaxlaunch.launcher.api", "LaunchResult": "jaxlaunch.launcher.runner",
    "LaunchOptions": "jaxlaunch.launcher.configuration.schema",
    "JobConfig": "jaxlaunch.launcher.configuration.schema", "ClusterConfig": "jaxlaunch.launcher.configuration.schema",
    "TrainConfig": "jaxlaunch.launcher.configuration.schema",
    "FaultConfig": "jaxlaunch.launcher.control.policy", "WatchdogConfig": "jaxlaunch.launcher.control.policy",
    "HostContext": "jaxlaunch.workers.context", "global_batch": "jaxlaunch.workers.inputs.batch",
    "elastic_iterator": "jaxlaunch.workers.inputs.data", "batch_fingerprint": "jaxlaunch.workers.inputs.data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxlaunch' has no attribute {name!r}")
