"""`python -m benchmarks.replica_checks [PRESET]`: what checking replicas costs, against a training step.

In one process on the CPU, the built-in transformer and its AdamW state (every array treated as
replicated: the worst case, a purely data-parallel job): the median time of a training step, and of
one check (dispatching the on-device hash of every shard and reading the checksums back). The cost
per step at a cadence is one check per `verify_every` steps plus one per save.

`python -m benchmarks.replica_checks --defaults [PRESET]`: the same cost in a real launch on 2 hosts
with the defaults (the memory tier on, the cadence chosen from the measured cost), read from the
step records: each save's `replica_check_s` and its whole blocking time (check and save) over the
steps since the cadence settled (its last `cadence_chosen` event), against the median step time."""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jaxlaunch.launcher.control.policy import FaultConfig
from jaxlaunch.workers.supervision.replica_sums import PendingChecksums

from models.training import make_model_and_optimizer, train_step

CONFIG = {"learning_rate": 1e-3, "warmup_steps": 10, "grad_clip_norm": 1.0, "weight_decay": 0.1}
REPEATS = 20


def _median_s(run: Any, repeats: int = REPEATS) -> float:
    run()  # compiled, warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(preset: str = "small", batch: int = 8, seq: int = 128, save_every: int = 100) -> dict[str, Any]:
    model, optimizer = make_model_and_optimizer({**CONFIG, "model": preset}, 0, 1000)
    tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, 256, (batch, seq + 1)), jax.numpy.int32)

    def step() -> None:
        jax.block_until_ready(train_step(model, optimizer, tokens[:, :-1], tokens[:, 1:]))

    def check() -> None:
        PendingChecksums(0, nnx.split((model, optimizer))[1], every_shard=True).result()

    step_s, check_s = _median_s(step), _median_s(check)
    every = FaultConfig().verify_every
    per_step_s = check_s * (1 / every + 1 / save_every)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.split((model, optimizer))[1]))
    return {"preset": preset, "state_mb": state_bytes / 1e6, "step_s": step_s, "check_s": check_s,
            "verify_every": every, "save_every": save_every, "check_per_step_s": per_step_s,
            "share_of_step": per_step_s / step_s, "one_check_share_of_step": check_s / step_s}


def at_defaults(work: pathlib.Path, preset: str = "small", steps: int = 130) -> dict[str, Any]:
    from benchmarks import launches

    run_dir = work / f"replica-checks-{preset}"
    launches.launch(run_dir, "--model", preset, "--global-batch-size", "4", "--seq-len", "64", "--hosts", "2",
                    "--steps", str(steps))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    chosen = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()
              if '"cadence_chosen"' in line]
    settled = chosen[-1]
    step_s = statistics.median(r["step_time_s"] for r in records if r.get("step_time_s"))
    saves = [r for r in records if r.get("checkpoint_tier") == "memory" and r["step"] > settled["step"]]
    span = saves[-1]["step"] - settled["step"] if saves else 0
    return {"preset": preset, "hosts": 2, "steps": steps, "step_s": step_s,
            "cadence": {"from_step": settled["step"], "memory_every": settled["memory_every"],
                        "durable_every": settled["durable_every"]},
            "saves": len(saves), "check_s": [r["replica_check_s"] for r in saves],
            "save_with_check_s": [r["checkpoint_blocking_s"] for r in saves],
            "check_share_of_step": sum(r["replica_check_s"] for r in saves) / (span * step_s) if span else None,
            "save_with_check_share_of_step":
                sum(r["checkpoint_blocking_s"] for r in saves) / (span * step_s) if span else None}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--defaults"]:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(at_defaults(pathlib.Path(tmp), *sys.argv[2:3]), indent=1))
    else:
        print(json.dumps(measure(*sys.argv[1:2]), indent=1))
