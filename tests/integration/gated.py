"""Example jobs, losses bit for bit, with gates: after saving step N of `gates`, rank 0 writes `at-N`
in the run directory and waits until the test writes `go-N` (once: a later attempt passes a gate
already opened). A test acts on a quiet job at a known step, without sleeping. Every call of an
entry adds a line to `entry-calls` in the run directory (attempt, rank, process id): a test counts
where user code ran.

`main`: examples/minimal.py's job (`gated_examples.py`: others')."""

import os
import pathlib
import time

from examples import minimal

GATE_POLL_S = 0.05


class Gated:
    """The job's host context, with a gate after each step of `gates` (once it saved, unless the job stops there)."""

    def __init__(self, ctx):
        self._ctx = ctx
        self._gates = {int(s) for s in str(ctx.config.get("gates", "")).split("-") if s}
        self._loss = None

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def report(self, step, **metrics):
        self._loss = metrics.get("loss")
        return self._ctx.report(step, **metrics)

    def should_stop(self, step):
        """After the step's save, as the job asks whether to stop: a gate where it goes on."""
        stop = self._ctx.should_stop(step)
        run_dir = pathlib.Path(self._ctx.run_dir)
        if not stop and step in self._gates and self._ctx.process_index == 0 and not (run_dir / f"go-{step}").exists():
            float(self._loss)  # the step is computed (its save's copy waited for it too)
            (run_dir / f"at-{step}").write_text("")
            while not (run_dir / f"go-{step}").exists():
                time.sleep(GATE_POLL_S)
        return stop


def gated(entry):
    def gated_entry(ctx):
        with open(pathlib.Path(ctx.run_dir) / "entry-calls", "a") as calls:
            calls.write(f"{ctx.attempt} {ctx.process_index} {os.getpid()}\n")
        return entry(Gated(ctx))

    return gated_entry


main = gated(minimal.main)
