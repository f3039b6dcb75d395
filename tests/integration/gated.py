"""examples/minimal.py's job, losses bit for bit, with gates: after saving step N of `gates`, rank 0
writes `at-N` in the run directory and waits until the test writes `go-N` (once: a later attempt
passes a gate already opened). A test acts on a quiet job at a known step, without sleeping. Every
call of `main` adds a line to `entry-calls` in the run directory (attempt, rank, process id): a
test counts where user code ran."""

import os
import pathlib
import time

import optax
from flax import nnx

from examples.minimal import MLP, rows, train_step

GATE_POLL_S = 0.05


def main(ctx):
    def init():
        model = MLP(nnx.Rngs(ctx.seed))
        return model, nnx.Optimizer(model, optax.adam(ctx.config.get("learning_rate", 1e-2)), wrt=nnx.Param)

    gates = {int(s) for s in str(ctx.config.get("gates", "")).split("-") if s}
    run_dir = pathlib.Path(ctx.run_dir)
    with open(run_dir / "entry-calls", "a") as calls:
        calls.write(f"{ctx.attempt} {ctx.process_index} {os.getpid()}\n")
    (model, optimizer), start = ctx.restore_or_init(init)
    for step in range(start + 1, ctx.steps + 1):
        x, y = ctx.global_batch(rows, step, batch_size=64)
        loss = train_step(model, optimizer, x, y)
        ctx.report(step, loss=loss)
        ctx.maybe_save(step, (model, optimizer))
        if ctx.should_stop(step):
            break
        if step in gates and ctx.process_index == 0 and not (run_dir / f"go-{step}").exists():
            float(loss)  # the step is computed (its save's copy waited for it too)
            (run_dir / f"at-{step}").write_text("")
            while not (run_dir / f"go-{step}").exists():
                time.sleep(GATE_POLL_S)
