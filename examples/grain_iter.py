"""A job whose data position is state: a Grain `IterDataset` pipeline (shuffled, each host reading
its own shard, batched) whose iterator is saved with every checkpoint and set back on restore, so a
run killed at any step sees exactly the batches an uninterrupted run sees. A best-loss tracker rides
along as a plain JSON value.

    jaxlaunch --entry examples/grain_iter.py:main --hosts 2 --steps 200 --memory-tier --save-every 1

The iterator goes to `restore_or_init(..., extra=...)`, which sets it to its saved position; the
same dict goes to every `maybe_save`.
"""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxlaunch

FEATURES = 16
SETTINGS = {"batch_size": 32, "examples": 1000, "learning_rate": 1e-2}


def check(config, mesh):
    if config["batch_size"] % mesh.get("data", 1):
        raise ValueError(f"batch_size {config['batch_size']} must be a multiple of the data axis {mesh.get('data')}")


def pipeline(config, seed, host, hosts):
    """This host's examples, reshuffled every epoch, in batches of its share of the global batch."""
    def example(index):
        x = np.random.default_rng(index).normal(size=FEATURES).astype(np.float32)
        return x, np.sin(x.sum(keepdims=True))

    shard = grain.MapDataset.range(config["examples"])[host::hosts]
    return (shard.shuffle(seed=seed).repeat(None).map(example).to_iter_dataset()
            .batch(config["batch_size"] // hosts, drop_remainder=True))


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(FEATURES, 64, rngs=rngs)
        self.out = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


@jaxlaunch.entrypoint(defaults=SETTINGS, check=check)
def main(ctx):
    config = ctx.config
    batches = iter(pipeline(config, ctx.seed, ctx.process_index, ctx.process_count))
    rows = NamedSharding(ctx.mesh, PartitionSpec("data"))

    def init():
        model = MLP(nnx.Rngs(ctx.seed))
        return model, nnx.Optimizer(model, optax.adam(config["learning_rate"]), wrt=nnx.Param)

    (model, optimizer), start, extra = ctx.restore_or_init(
        init, extra={"data": batches, "best": {"loss": None, "step": None}})
    for step in range(start + 1, ctx.steps + 1):
        x, y = (jax.make_array_from_process_local_data(rows, a) for a in next(batches))
        loss = train_step(model, optimizer, x, y)
        ctx.report(step, loss=loss)
        value = float(loss)
        if extra["best"]["loss"] is None or value < extra["best"]["loss"]:
            extra["best"] = {"loss": value, "step": step}
        ctx.maybe_save(step, (model, optimizer), extra=extra)
        if ctx.should_stop(step):
            break
    return extra["best"]
