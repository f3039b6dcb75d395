"""A realistic jaxlaunch job: a Flax NNX classifier with its own sharding rules (its hidden layer
split over the mesh's `model` axis, tensor parallelism), dropout (whose RNG state is checkpointed
with the weights), and a Grain `MapDataset` input pipeline indexed by the global step.

    jaxlaunch --entry examples/classifier.py:main --hosts 4 --steps 200 --set hidden=256

Row `r` of step `s` is example `s * batch_size + r` of a dataset reshuffled every epoch, so the
global batch is the same on any number of hosts and a resumed run sees exactly the data it would
have seen without the interruption.
"""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxlaunch

FEATURES, CLASSES = 32, 10
SETTINGS = {"batch_size": 64, "hidden": 128, "learning_rate": 3e-3, "dropout": 0.1, "examples": 4096}
# Logical axes of the parameters -> mesh axes: the hidden units are split over `model`.
RULES = {"features": None, "hidden": "model", "classes": None}


def check(config, mesh):
    if config["batch_size"] % mesh.get("data", 1):
        raise ValueError(f"batch_size {config['batch_size']} must be a multiple of the data axis {mesh.get('data')}")


def dataset(config, seed):
    """Synthetic examples around fixed class centres, in a Grain pipeline: shuffled anew each epoch."""
    centres = np.random.default_rng(1234).normal(size=(CLASSES, FEATURES)).astype(np.float32)

    def example(index):
        rng = np.random.default_rng(index)
        label = int(rng.integers(CLASSES))
        return centres[label] + rng.normal(scale=1.5, size=FEATURES).astype(np.float32), np.int32(label)

    return grain.MapDataset.range(config["examples"]).shuffle(seed=seed).repeat(None).map(example)


class Classifier(nnx.Module):
    def __init__(self, hidden: int, dropout: float, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.hidden = nnx.Linear(FEATURES, hidden, kernel_init=nnx.with_partitioning(init, ("features", "hidden")),
                                 bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("hidden",)),
                                 rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(hidden, CLASSES, kernel_init=nnx.with_partitioning(init, ("hidden", "classes")),
                              rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(jax.nn.gelu(self.hidden(x))))


@nnx.jit
def train_step(model, optimizer, x, labels):
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == labels)


@jaxlaunch.entrypoint(defaults=SETTINGS, check=check)
def main(ctx):
    config = ctx.config
    data = dataset(config, ctx.seed)
    batch_size = config["batch_size"]

    def rows(step, indices):
        examples = [data[step * batch_size + int(i)] for i in indices]
        return np.stack([x for x, _ in examples]), np.array([y for _, y in examples])

    def init():
        model = Classifier(config["hidden"], config["dropout"], nnx.Rngs(params=ctx.seed, dropout=ctx.seed + 1))
        schedule = optax.cosine_decay_schedule(config["learning_rate"], ctx.schedule_steps)
        return model, nnx.Optimizer(model, optax.adamw(schedule), wrt=nnx.Param)

    (model, optimizer), start = ctx.restore_or_init(init, rules=RULES)
    for step in range(start + 1, ctx.steps + 1):
        x, labels = ctx.global_batch(rows, step - 1, batch_size)
        loss, accuracy = train_step(model, optimizer, x, labels)
        ctx.report(step, loss=loss, accuracy=accuracy)
        ctx.maybe_save(step, (model, optimizer))
        if ctx.should_stop(step):
            break
