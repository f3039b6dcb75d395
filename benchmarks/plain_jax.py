"""A plain single-process JAX training script, no Ray and no launcher: the same model, optimizer,
mesh, data and batch as a 1-host launcher run. The baseline of the launcher-overhead measurement.

    python benchmarks/plain_jax.py --model tiny --steps 60 --devices 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    from launcher.config import JobConfig, TrainConfig
    from workers import data as data_lib
    from workers import mesh as mesh_lib
    from workers.train import Trainer

    train = TrainConfig(model=args.model, steps=args.steps, global_batch_size=args.global_batch_size,
                        seq_len=args.seq_len)
    job = JobConfig(num_hosts=1, train=train)
    trainer = Trainer(job, mesh_lib.build_mesh(job.mesh))
    corpus = data_lib.Corpus.load()
    state = trainer.init_state()

    def batch(step):
        return data_lib.global_batch(corpus, seed=(0,), step=step, global_batch_size=train.global_batch_size,
                                     seq_len=train.seq_len, sharding=trainer.batch_sharding)

    trainer.compile(state, *batch(0))
    times = []
    for step in range(args.steps):
        state, loss = trainer.step(state, *batch(step))
        float(loss)
        times.append(time.time())
    print(json.dumps({"step_end_times": times}))


if __name__ == "__main__":
    main()
