"""The training program of one host process: build or restore the sharded train state, train,
checkpoint. Every host process runs it; they meet in collectives and in Orbax's saves."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from launcher.config import Injection, JobConfig, TrainConfig, resolve_mesh
from models.config import ModelConfig
from models.transformer import build
from workers import data as data_lib
from workers import faults
from workers import mesh as mesh_lib
from workers.checkpoint import Checkpointer
from workers.progress import HostProgress

log = logging.getLogger(__name__)


class DataKey(nnx.Variable):
    """The data-order RNG key (raw uint32 key data), saved with the state so a resumed run keeps
    its data order whatever seed the new launch was given."""


class TrainState(nnx.Module):
    """Everything a checkpoint holds: parameters, optimizer state with its step, RNG state."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig):
        with nnx.use_eager_sharding(False):
            self.model = build(model_cfg, train_cfg.seed)
            self.optimizer = nnx.Optimizer(self.model, make_optimizer(train_cfg), wrt=nnx.Param)
        self.data_key = DataKey(jax.random.key_data(jax.random.key(train_cfg.seed)))


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * 0.1,
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip_norm),
        optax.adamw(learning_rate_schedule(cfg), weight_decay=cfg.weight_decay),
    )


def loss_fn(model: nnx.Module, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    logits = model(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@dataclasses.dataclass
class Trainer:
    """The sharded train state of one job on one mesh, and its compiled step."""

    job: JobConfig
    mesh: jax.sharding.Mesh

    def __post_init__(self) -> None:
        model_cfg, train_cfg = self.job.train.model_config(), self.job.train
        abstract = nnx.eval_shape(lambda: TrainState(model_cfg, train_cfg))
        self.graphdef, self.abstract_state = nnx.split(abstract)
        self.shardings = mesh_lib.state_shardings(self.abstract_state, self.mesh)
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        graphdef = self.graphdef

        def init() -> nnx.State:
            return nnx.state(TrainState(model_cfg, train_cfg))

        def train_step(state: nnx.State, inputs: jax.Array, targets: jax.Array):
            train_state = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(loss_fn)(train_state.model, inputs, targets)
            train_state.optimizer.update(train_state.model, grads)
            return nnx.state(train_state), loss

        # Abstract first, then materialised straight into the shardings: each process computes only
        # its own shards, and no host ever holds a full copy of a sharded array.
        self._init = jax.jit(init, out_shardings=self.shardings)
        self._step = jax.jit(
            train_step,
            in_shardings=(self.shardings, self.batch_sharding, self.batch_sharding),
            out_shardings=(self.shardings, replicated),
            donate_argnums=(0,),
        )
        self._compiled = None

    def init_state(self) -> nnx.State:
        return self._init()

    def restore_targets(self) -> nnx.State:
        return mesh_lib.sharded_targets(self.abstract_state, self.shardings)

    def compile(self, state: nnx.State, inputs: jax.Array, targets: jax.Array) -> float:
        start = time.perf_counter()
        self._compiled = self._step.lower(state, inputs, targets).compile()
        return time.perf_counter() - start

    def step(self, state: nnx.State, inputs: jax.Array, targets: jax.Array):
        return self._compiled(state, inputs, targets)


def _scalar(variable: nnx.Variable) -> np.ndarray:
    """The host value of a replicated array of the state."""
    return np.asarray(jax.device_get(variable.get_value()))


def checkpoint_meta(job: JobConfig, step: int, loss: float | None, corpus: data_lib.Corpus) -> dict[str, Any]:
    return {
        "step": step,
        "loss": loss,
        "model_preset": job.train.model,
        "model": dataclasses.asdict(job.train.model_config()),
        "topology": {
            "num_hosts": jax.process_count(),
            "num_devices": jax.device_count(),
            "mesh": resolve_mesh(job.mesh, jax.device_count()),
        },
        "data": {
            "fingerprint": corpus.fingerprint,
            "seq_len": job.train.seq_len,
            "global_batch_size": job.train.global_batch_size,
        },
        "saved_at": time.time(),
    }


def train(
    job: JobConfig,
    run_dir: pathlib.Path,
    progress: HostProgress,
    injections: tuple[Injection, ...] = (),
    attempt: int = 1,
) -> dict[str, Any]:
    """Trains from the latest committed checkpoint (or from scratch) to `job.train.steps`, or until
    a preemption notice reaches any host: then every host saves at one and the same step and
    returns. Assumes jax.distributed is initialised. Returns what the driver records for this host."""
    cfg = job.train
    mesh = mesh_lib.build_mesh(job.mesh)
    log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    corpus = data_lib.Corpus.load(cfg.data)
    trainer = Trainer(job, mesh)
    checkpointer = Checkpointer(run_dir / "checkpoints", job.checkpoint)
    # The learning rate of every step, computed once rather than dispatched on the hot path.
    learning_rates = np.asarray(learning_rate_schedule(cfg)(np.arange(cfg.steps)))
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    try:
        progress.phase("restoring")
        restored = checkpointer.restore_latest(trainer.restore_targets())
        if restored is None:
            state, restored_step = trainer.init_state(), None
            log.info("no checkpoint: initialised a fresh train state")
        else:
            state, restored_step = restored.state, restored.step
            for skipped in restored.skipped:
                progress.event("checkpoint_fallback", **skipped)
            embedding = state["model"]["token_embedding"]["embedding"].get_value()
            progress.event(
                "restored", step=restored.step, seconds=restored.seconds,
                saved_topology=restored.meta.get("topology"), mesh=dict(mesh.shape),
                # Evidence that the arrays landed in the new layout, not the one they were saved in.
                embedding_sharding=str(embedding.sharding.spec),
                embedding_shard_shape=list(embedding.addressable_shards[0].data.shape),
            )
            log.info("restored step %d in %.2f s", restored.step, restored.seconds)
        step = int(_scalar(state["optimizer"]["step"]))
        data_seed = [int(x) for x in _scalar(state["data_key"])]

        def batch(at_step: int):
            return data_lib.global_batch(
                corpus, seed=data_seed, step=at_step, global_batch_size=cfg.global_batch_size,
                seq_len=cfg.seq_len, sharding=trainer.batch_sharding,
            )

        progress.phase("compiling")
        inputs, targets = batch(step)
        compile_s = trainer.compile(state, inputs, targets)
        log.info("compiled the train step in %.2f s", compile_s)
        progress.phase("training")
        progress.step_done(step, None)
        first_step = step
        loss = None
        preempted = False
        rank = jax.process_index()
        while step < cfg.steps:
            start = time.perf_counter()
            state, loss_array = trainer.step(state, inputs, targets)
            loss = float(loss_array)
            step_time = time.perf_counter() - start
            step += 1
            # JAX's preemption sync point: after a SIGTERM on any host, every host agrees on one step.
            preempted = checkpointer.reached_preemption(step)
            blocked = None
            if preempted or step % job.checkpoint.save_every == 0 or step == cfg.steps:
                progress.phase("saving")
                blocked = checkpointer.save(step, state, checkpoint_meta(job, step, loss, corpus))
                progress.phase("training")
            record = {
                "step": step, "loss": loss, "step_time_s": step_time, "time": time.time(),
                "tokens_per_s": tokens_per_step / step_time, "learning_rate": float(learning_rates[step - 1]),
            }
            if blocked is not None:
                record["checkpoint_blocking_s"] = blocked
            progress.step_done(step, record if rank == 0 else None)
            if step == first_step + 1:
                progress.event("startup_timeline", per_host=True, **progress.timeline, first_step_done=time.time())
            if preempted:
                log.warning("preemption notice: saved step %d on every host; stopping", step)
                break
            for injection in injections:
                if injection.step == step and injection.host == rank:
                    saving = checkpointer.manager.is_saving_in_progress()
                    faults.record(run_dir, injection, rank, attempt, step, saving)
                    faults.fire(injection, step)
            if step < cfg.steps:
                inputs, targets = batch(step)
        progress.phase("saving")
        checkpointer.wait()
    finally:
        checkpointer.close()
    progress.phase("done")
    return {
        "stopped": "preempted" if preempted else "completed",
        "final_step": step,
        "final_loss": loss,
        "restored_step": restored_step,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "num_devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "mesh": dict(mesh.shape),
        "compile_s": compile_s,
    }
