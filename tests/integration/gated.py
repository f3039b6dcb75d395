"""Example jobs, losses bit for bit, with gates: after saving step N of `gates`, rank 0 writes `at-N`
in the run directory and waits until the test writes `go-N` (once: a later attempt passes a gate
already opened). A test acts on a quiet job at a known step, without sleeping. Every call of an
entry adds a line to `entry-calls` in the run directory (attempt, rank, process id): a test counts
where user code ran.

`main`: examples/minimal.py's job; `grain`: examples/grain_iter.py's (per-host Grain iterators)."""

import os
import pathlib
import time

import jaxlaunch
from examples import grain_iter, minimal

GATE_POLL_S = 0.05


class Gated:
    """The job's host context, with a gate after the save of each step of `gates`."""

    def __init__(self, ctx):
        self._ctx = ctx
        self._gates = {int(s) for s in str(ctx.config.get("gates", "")).split("-") if s}
        self._loss = None

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def report(self, step, **metrics):
        self._loss = metrics.get("loss")
        return self._ctx.report(step, **metrics)

    def maybe_save(self, step, *args, **kwargs):
        saved = self._ctx.maybe_save(step, *args, **kwargs)
        run_dir = pathlib.Path(self._ctx.run_dir)
        if step in self._gates and self._ctx.process_index == 0 and not (run_dir / f"go-{step}").exists():
            float(self._loss)  # the step is computed (its save's copy waited for it too)
            (run_dir / f"at-{step}").write_text("")
            while not (run_dir / f"go-{step}").exists():
                time.sleep(GATE_POLL_S)
        return saved


def gated(entry):
    def gated_entry(ctx):
        with open(pathlib.Path(ctx.run_dir) / "entry-calls", "a") as calls:
            calls.write(f"{ctx.attempt} {ctx.process_index} {os.getpid()}\n")
        return entry(Gated(ctx))

    return gated_entry


main = gated(minimal.main)
grain = jaxlaunch.entrypoint(defaults={**grain_iter.SETTINGS, "gates": ""}, check=grain_iter.check)(
    gated(grain_iter.main))
