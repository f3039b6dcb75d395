"""The built-in model's training pieces (JAX): its learning-rate schedule, its model and optimizer,
and its jitted step. `jaxlaunch.models.lm` runs them through the host context; the benchmarks' plain loops
and peers run the very same pieces without the launcher."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx
from jaxlaunch.models.config import preset
from jaxlaunch.models.transformer import Transformer, build


def schedule(config: dict[str, Any], schedule_steps: int) -> optax.Schedule:
    """Linear warm-up to the peak learning rate, then cosine decay to a tenth of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config["learning_rate"], warmup_steps=config["warmup_steps"],
        decay_steps=max(schedule_steps, config["warmup_steps"] + 1), end_value=config["learning_rate"] * 0.1)


def make_model_and_optimizer(config: dict[str, Any], seed: int,
                             schedule_steps: int) -> tuple[Transformer, nnx.Optimizer]:
    """The transformer of the config's preset and AdamW with gradient clipping."""
    model = build(preset(config["model"]), seed)
    tx = optax.chain(optax.clip_by_global_norm(config["grad_clip_norm"]),
                     optax.adamw(schedule(config, schedule_steps), weight_decay=config["weight_decay"]))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def loss_fn(model: Transformer, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(inputs), targets).mean()


@nnx.jit(donate_argnums=(0, 1))
def train_step(model: Transformer, optimizer: nnx.Optimizer, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """One optimizer step on a global batch; returns the loss (a device scalar, not waited for)."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
    optimizer.update(model, grads)
    return loss
