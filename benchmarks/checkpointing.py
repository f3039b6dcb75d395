"""Checkpoint measurements, run inside every process of a `benchmarks.procs` group: the launcher's own
state layout and Checkpointer on the built-in model's state, without Ray, so that the numbers
isolate Orbax and the train step."""

from __future__ import annotations

import os
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.experimental import multihost_utils
from jaxlaunch.models import training
from jaxlaunch.models.corpus import Corpus
from jaxlaunch.models.lm import DEFAULTS, SHARDING_RULES
from jaxlaunch.workers.checkpoints.durable import Checkpointer
from jaxlaunch.workers.inputs.batch import global_batch
from jaxlaunch.workers.sharding import build_mesh
from jaxlaunch.workers.state import StateLayout, largest_array

from jaxlaunch.contract.protocol import CheckpointConfig


def _config(preset: str) -> dict[str, Any]:
    return {**DEFAULTS, "model": preset}


class _Loop:
    """The built-in model's state on a data x model mesh and its compiled step on one fixed batch,
    timed step by step (each step waited for)."""

    def __init__(self, preset: str, global_batch_size: int, seq_len: int):
        self.mesh = build_mesh({"data": -1, "model": 2})
        config = _config(preset)

        def init():
            return training.make_model_and_optimizer(config, 0, 10_000)

        self.layout = StateLayout.of(init, self.mesh, SHARDING_RULES)
        self.model, self.optimizer = self.layout.merge(self.layout.materialize(init))
        corpus = Corpus.load()
        self.batch = global_batch(lambda step, rows: corpus.rows(0, step, rows, global_batch_size, seq_len), 0,
                                  global_batch_size, self.mesh)
        self.step_fn = nnx.cached_partial(training.train_step, self.model, self.optimizer)
        self.step = 0

    @property
    def state(self) -> Any:
        return self.layout.split((self.model, self.optimizer))

    def run_step(self) -> float:
        start = time.perf_counter()
        jax.block_until_ready(self.step_fn(*self.batch))
        self.step += 1
        return time.perf_counter() - start


def _evict(directory: pathlib.Path | str) -> None:
    """Drops the files under `directory` from the page cache (POSIX_FADV_DONTNEED; they are written
    and synced), so that a restore reads the disk, as the `dd` it is set beside does, not memory."""
    for path in pathlib.Path(directory).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    multihost_utils.sync_global_devices(f"evicted {directory}")


def _clean(directory: pathlib.Path) -> None:
    if jax.process_index() == 0:
        shutil.rmtree(directory, ignore_errors=True)
    multihost_utils.sync_global_devices(f"clean {directory}")


def stall(preset: str, global_batch: int, seq_len: int, normal_steps: int, saves: int, directory: str) -> dict:
    """Async save blocking time vs a synchronous save; step time during a background write vs a
    normal step; bandwidth of a synchronous save and of a restore."""
    loop = _Loop(preset, global_batch, seq_len)
    for _ in range(2):
        loop.run_step()  # compilation and warm-up
    normal = [loop.run_step() for _ in range(normal_steps)]
    base = pathlib.Path(directory)
    _clean(base)
    async_ckpt = Checkpointer(base / "async", CheckpointConfig(max_to_keep=2))
    async_ckpt.save(loop.step, loop.state, {})  # the first save in a process pays one-off set-up
    async_ckpt.wait()
    blocking, during = [], []
    for _ in range(saves):
        loop.run_step()
        blocking.append(async_ckpt.save(loop.step, loop.state, {}))
        while async_ckpt.is_saving():
            during.append(loop.run_step())
        async_ckpt.wait()
    async_ckpt.close()
    sync_ckpt = Checkpointer(base / "sync", CheckpointConfig(max_to_keep=2, async_save=False))
    sync = []
    for _ in range(saves):
        loop.run_step()
        start = time.perf_counter()
        sync_ckpt.save(loop.step, loop.state, {})
        sync_ckpt.wait()
        sync.append(time.perf_counter() - start)
    restore = []
    for _ in range(saves):
        _evict(base / "sync")
        restored = sync_ckpt.restore_latest(loop.layout.targets())
        jax.block_until_ready(restored.state)
        restore.append(restored.seconds)
    sync_ckpt.close()
    return {"state_bytes": loop.layout.num_bytes(), "normal_step_s": normal, "async_blocking_s": blocking,
            "step_during_save_s": during, "sync_save_s": sync, "restore_s": restore}


def _layout(preset: str) -> tuple[StateLayout, Callable[[], Any]]:
    """The built-in model's state layout on this group's data x model mesh, and its init."""
    config = _config(preset)

    def init():
        return training.make_model_and_optimizer(config, 0, 10_000)

    return StateLayout.of(init, build_mesh({"data": -1, "model": 2}), SHARDING_RULES), init


def save_once(preset: str, directory: str) -> dict:
    """Saves a fresh state from this group's layout (the checkpoint the resharding restores read)."""
    layout, init = _layout(preset)
    state = layout.materialize(init)
    _clean(pathlib.Path(directory))
    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
    ckpt.save(1, state, {})
    ckpt.wait()
    ckpt.close()
    return {"state_bytes": layout.num_bytes(), "mesh": dict(layout.mesh.shape)}


def restore_times(preset: str, directory: str, repeats: int) -> dict:
    """Restores the checkpoint in `directory`, whatever group wrote it, into this group's layout
    `repeats` times, as `ctx.restore_or_init` does (the structure checked against the layout first);
    the seconds are those of the `restored` event."""
    layout, _ = _layout(preset)
    ckpt = Checkpointer(directory, CheckpointConfig())
    times = []
    for _ in range(repeats):
        _evict(directory)
        restored = ckpt.restore_latest(layout.targets(), check_structure=layout.mismatch)
        jax.block_until_ready(restored.state)
        times.append(restored.seconds)
    ckpt.close()
    path, array = largest_array(restored.state)
    return {"restore_s": times, "mesh": dict(layout.mesh.shape), "array": path,
            "sharding": str(array.sharding.spec), "shard_shape": list(array.addressable_shards[0].data.shape)}
