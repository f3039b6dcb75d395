"""The smallest jaxlaunch job: a Flax NNX regression model on its own synthetic data.

    jaxlaunch --entry examples/minimal.py:main --hosts 2 --steps 100
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

FEATURES = 16


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(FEATURES, 64, rngs=rngs)
        self.out = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def rows(step, indices):
    """Rows `indices` of the batch of `step`: a pure function of (step, row), so the global batch
    is the same on any number of hosts."""
    x = np.random.default_rng(step).normal(size=(64, FEATURES)).astype(np.float32)[indices]
    return x, np.sin(x.sum(axis=1, keepdims=True))


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


def main(ctx):
    def init():
        model = MLP(nnx.Rngs(ctx.seed))
        return model, nnx.Optimizer(model, optax.adam(ctx.config.get("learning_rate", 1e-2)), wrt=nnx.Param)

    (model, optimizer), start = ctx.restore_or_init(init)
    for step in range(start + 1, ctx.steps + 1):
        x, y = ctx.global_batch(rows, step, batch_size=64)
        loss = train_step(model, optimizer, x, y)
        ctx.report(step, loss=loss)
        ctx.maybe_save(step, (model, optimizer))
        if ctx.should_stop(step):
            break
