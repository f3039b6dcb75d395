"""Data exactly once on any host count: a Grain `MapDataset` read through Grain's `ElasticIterator`
(`jaxlaunch.elastic_iterator`), whose state is the global position in the example stream, the same
on every host. It travels in `extra`, so a restart, an elastic shrink or grow, a lost node or a
`--resume --hosts N` continues with the very examples an uninterrupted run would have seen. Each
step reports `data_hash`, a fingerprint of its global batch, to compare runs in metrics.jsonl.

    jaxlaunch --entry examples/elastic_grain.py:main --hosts 2 --min-hosts 1 --steps 200

With `--elastic false` the same examples go through a per-host pipeline with a `filter` (each host
its own shard, its own iterator position), which ElasticIterator cannot take: such a position cannot
be split or merged over another host count, so a `--resume` on one is refused (exit 2) unless
`--allow-change data_order`, and an elastic resize records a `data_order_changed` event.
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
SETTINGS = {"batch_size": 32, "examples": 1000, "learning_rate": 1e-2, "elastic": True}


def check(config, mesh):
    if config["batch_size"] % mesh.get("data", 1):
        raise ValueError(f"batch_size {config['batch_size']} must be a multiple of the data axis {mesh.get('data')}")


def example(index):
    x = np.random.default_rng(index).normal(size=FEATURES).astype(np.float32)
    return x, np.sin(x.sum(keepdims=True))


def pipeline(config, seed):
    """Every host's iterator: its rows of each global batch (see jaxlaunch.elastic_iterator)."""
    examples = grain.MapDataset.range(config["examples"]).shuffle(seed=seed).repeat(None)
    if config["elastic"]:
        return jaxlaunch.elastic_iterator(examples.map(example), config["batch_size"])
    hosts, host = jax.process_count(), jax.process_index()
    shard = examples[host::hosts].filter(lambda i: i % 7 != 0).map(example)
    return iter(shard.to_iter_dataset().batch(config["batch_size"] // hosts, drop_remainder=True))


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
    rows = NamedSharding(ctx.mesh, PartitionSpec("data"))

    def init():
        model = MLP(nnx.Rngs(ctx.seed))
        return model, nnx.Optimizer(model, optax.adam(config["learning_rate"]), wrt=nnx.Param)

    (model, optimizer), start, extra = ctx.restore_or_init(init, extra={"data": pipeline(config, ctx.seed)})
    for step in range(start + 1, ctx.steps + 1):
        x, y = (jax.make_array_from_process_local_data(rows, a) for a in next(extra["data"]))
        loss = train_step(model, optimizer, x, y)
        ctx.report(step, loss=loss, data_hash=jaxlaunch.batch_fingerprint((x, y)))
        ctx.maybe_save(step, (model, optimizer), extra=extra)
        if ctx.should_stop(step):
            break
