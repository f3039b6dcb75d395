"""A plain single-process JAX training loop, no Ray and no launcher: the built-in model's model,
optimizer, mesh, data and batch, dispatched step after step without waiting for the device (the
loss is read once, at the end). The floor of the launcher-overhead measurement.

    python benchmarks/plain_jax.py --model small --steps 30 --devices 2
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

WARMUP_STEPS = 5


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from jaxlaunch.contract.protocol import host_env

    os.environ["XLA_FLAGS"] = host_env("cpu", args.devices)["XLA_FLAGS"]  # jaxlaunch's hosts' XLA options
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    from flax import nnx
    from jaxlaunch.models import training
    from jaxlaunch.models.corpus import Corpus
    from jaxlaunch.models.lm import DEFAULTS, SHARDING_RULES
    from jaxlaunch.workers.inputs.batch import global_batch
    from jaxlaunch.workers.sharding import build_mesh
    from jaxlaunch.workers.state import StateLayout

    mesh = build_mesh({"data": -1, "model": 2} if args.devices > 1 else {"data": -1})
    config = {**DEFAULTS, "model": args.model}
    layout = StateLayout.of(lambda: training.make_model_and_optimizer(config, 0, args.steps), mesh, SHARDING_RULES)
    model, optimizer = layout.merge(layout.materialize(lambda: training.make_model_and_optimizer(config, 0,
                                                                                                args.steps)))
    step_fn = nnx.cached_partial(training.train_step, model, optimizer)
    corpus = Corpus.load()

    def rows(step, indices):
        return corpus.rows(0, step, indices, args.global_batch_size, args.seq_len)

    losses = []
    for step in range(WARMUP_STEPS):  # compilation, and the first steps' slower pace
        losses.append(step_fn(*global_batch(rows, step, args.global_batch_size, mesh)))
    jax.block_until_ready(losses)
    started = time.perf_counter()
    for step in range(WARMUP_STEPS, args.steps):
        losses.append(step_fn(*global_batch(rows, step, args.global_batch_size, mesh)))
    jax.block_until_ready(losses)
    seconds = time.perf_counter() - started
    print(json.dumps({"steps_per_s": (args.steps - WARMUP_STEPS) / seconds, "final_loss": float(losses[-1])}))


if __name__ == "__main__":
    main()
