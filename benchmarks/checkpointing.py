"""Checkpoint measurements, run inside every process of a `benchmarks.procs` group: the launcher's
own Trainer and Checkpointer, without Ray, so the numbers isolate Orbax and the train step."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import time
from typing import Any

import jax
import numpy as np

from launcher.config import CheckpointConfig, JobConfig, TrainConfig
from workers import data as data_lib
from workers import mesh as mesh_lib
from workers.checkpoint import Checkpointer
from workers.train import Trainer, checkpoint_meta


def _job(preset: str, global_batch: int, seq_len: int) -> JobConfig:
    train = TrainConfig(model=preset, global_batch_size=global_batch, seq_len=seq_len, steps=10_000)
    return JobConfig(num_hosts=jax.process_count(), train=train)


def state_bytes(state: Any) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)))


class _Loop:
    """A compiled train step on fixed data, timed step by step."""

    def __init__(self, job: JobConfig):
        self.job = job
        self.mesh = mesh_lib.build_mesh(job.mesh)
        self.trainer = Trainer(job, self.mesh)
        self.state = self.trainer.init_state()
        corpus = data_lib.Corpus.load()
        self.corpus = corpus
        self.inputs, self.targets = data_lib.global_batch(
            corpus, seed=(0,), step=0, global_batch_size=job.train.global_batch_size,
            seq_len=job.train.seq_len, sharding=self.trainer.batch_sharding,
        )
        self.trainer.compile(self.state, self.inputs, self.targets)
        self.step = 0

    def run_step(self) -> float:
        start = time.perf_counter()
        self.state, loss = self.trainer.step(self.state, self.inputs, self.targets)
        float(loss)
        self.step += 1
        return time.perf_counter() - start


def stall(preset: str, global_batch: int, seq_len: int, normal_steps: int, saves: int, directory: str) -> dict:
    """Async save blocking time vs a synchronous save; step time during a background write vs a
    normal step; bandwidth of a synchronous save and of a restore."""
    job = _job(preset, global_batch, seq_len)
    loop = _Loop(job)
    for _ in range(2):
        loop.run_step()  # warm-up
    normal = [loop.run_step() for _ in range(normal_steps)]
    base = pathlib.Path(directory)
    if jax.process_index() == 0:
        shutil.rmtree(base, ignore_errors=True)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("clean")
    meta = checkpoint_meta(job, 0, None, loop.corpus)
    async_ckpt = Checkpointer(base / "async", dataclasses.replace(CheckpointConfig(), max_to_keep=2))
    async_ckpt.save(loop.step, loop.state, meta)  # the first save in a process pays one-off set-up
    async_ckpt.wait()
    blocking, during = [], []
    for _ in range(saves):
        loop.run_step()
        blocking.append(async_ckpt.save(loop.step, loop.state, meta))
        while async_ckpt.manager.is_saving_in_progress():
            during.append(loop.run_step())
        async_ckpt.wait()
    async_ckpt.close()
    sync_ckpt = Checkpointer(base / "sync", CheckpointConfig(max_to_keep=2, async_save=False))
    sync = []
    for _ in range(saves):
        loop.run_step()
        start = time.perf_counter()
        sync_ckpt.save(loop.step, loop.state, meta)
        sync_ckpt.wait()
        sync.append(time.perf_counter() - start)
    restore = []
    for _ in range(saves):
        restored = sync_ckpt.restore_latest(loop.trainer.restore_targets())
        jax.block_until_ready(restored.state)
        restore.append(restored.seconds)
    sync_ckpt.close()
    return {
        "state_bytes": state_bytes(loop.state), "normal_step_s": normal, "async_blocking_s": blocking,
        "step_during_save_s": during, "sync_save_s": sync, "restore_s": restore,
    }


def save_once(preset: str, directory: str) -> dict:
    """Saves a freshly initialised train state (for the resharding measurement)."""
    job = _job(preset, 8 * jax.process_count(), 64)
    mesh = mesh_lib.build_mesh(job.mesh)
    trainer = Trainer(job, mesh)
    state = trainer.init_state()
    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
    ckpt.save(1, state, checkpoint_meta(job, 1, None, data_lib.Corpus.load()))
    ckpt.wait()
    ckpt.close()
    return {"state_bytes": state_bytes(state), "mesh": dict(mesh.shape)}


def restore_times(preset: str, directory: str, repeats: int) -> dict:
    """Restores the checkpoint in `directory` into this group's layout, `repeats` times."""
    job = _job(preset, 8 * jax.process_count(), 64)
    mesh = mesh_lib.build_mesh(job.mesh)
    trainer = Trainer(job, mesh)
    ckpt = Checkpointer(directory, CheckpointConfig())
    times = []
    for _ in range(repeats):
        restored = ckpt.restore_latest(trainer.restore_targets())
        jax.block_until_ready(restored.state)
        times.append(restored.seconds)
    ckpt.close()
    kernel = restored.state["model"]["blocks"][0]["mlp"]["up"]["kernel"].get_value()
    return {"restore_s": times, "mesh": dict(mesh.shape), "shard_shape": list(kernel.addressable_shards[0].data.shape)}
