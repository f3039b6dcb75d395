"""Failure injection at a reported step, for users' drills and for tests: a hook the host context
calls once a step is reported (and its save, if due, started), outside any training code.

Each kind imitates a real failure as closely as one process can: `crash` aborts (like a segfault or
an out-of-memory kill), `kill` is SIGKILL, `hang` is SIGSTOP (the process stops answering, as a host
stuck in a driver or a collective), `exception` raises, `preempt` is the SIGTERM of a preemption
notice. `slow` is a host whose own work per step (input, Python) takes `factor` times as long from
the step on, as with slow input or a noisy neighbour: it makes every other host wait. `bitflip` flips
one bit of the host's copy of a replicated parameter after the step's update (silent data corruption):
the host context carries it out in `maybe_save`, which holds the state (`bitflip_due`).
`kill_in_handoff` is SIGKILL from the memory tier's hand-off thread once the host asked its keeper
to hold that step's part, before the answer (`in_handoff`): the keeper may or may not have the part,
and its replica may be streaming."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import statistics
import time
from collections.abc import Callable

from jaxlaunch.contract.layout import RunLayout
from jaxlaunch.contract.protocol import Injection, InjectionKind

log = logging.getLogger(__name__)
SLOW_BASELINE_STEPS = 20
"""A `slow` host's usual busy time is the median of its newest this many steps before the injection."""
SLOW_MIN_BASELINE_S = 0.005
"""...and at least this: a host whose own work per step is shorter than a shared machine's noise
(a millisecond on a small example) could not be told from it."""


class InjectedFailure(RuntimeError):
    """The exception raised by an `exception` injection."""


class FaultHook:
    def __init__(self, injections: tuple[Injection, ...], rank: int, attempt: int, run: RunLayout,
                 saving: Callable[[], bool]):
        self.pending = [i for i in injections if i.host == rank]
        self.rank, self.attempt, self.run, self.saving = rank, attempt, run, saving
        self.busy_s: list[float] = []
        """The host's newest busy times per step, before any `slow` injection went off."""
        self.slow_factor: float | None = None

    def observe_busy(self, seconds: float) -> None:
        """A step's busy time on this host (`jaxlaunch.workers.supervision.step_clock`)."""
        if self.slow_factor is None:
            self.busy_s = [*self.busy_s[-SLOW_BASELINE_STEPS + 1:], seconds]

    def at_step(self, step: int) -> None:
        for injection in list(self.pending):
            if injection.step == step and injection.kind not in (InjectionKind.BITFLIP, InjectionKind.KILL_IN_HANDOFF):
                self.pending.remove(injection)
                self._record(injection, step)
                if injection.kind == InjectionKind.SLOW:
                    log.warning("injecting slow (factor %g) at step %d", injection.factor, step)
                    self.slow_factor = injection.factor
                else:
                    fire(injection, step)
        if self.slow_factor is not None:
            # The host's own work, stretched: this runs between a step's readback and the next dispatch.
            usual = max(statistics.median(self.busy_s) if self.busy_s else 0.0, SLOW_MIN_BASELINE_S)
            time.sleep((self.slow_factor - 1.0) * usual)

    def bitflip_due(self, step: int) -> bool:
        """Whether a `bitflip` injection goes off at `step` on this host (it is then spent and recorded)."""
        for injection in self.pending:
            if injection.step == step and injection.kind == InjectionKind.BITFLIP:
                self.pending.remove(injection)
                self._record(injection, step)
                log.warning("injecting bitflip at step %d", step)
                return True
        return False

    def in_handoff(self, step: int) -> Callable[[], None] | None:
        """The fault a `kill_in_handoff` injection at `step` sets off inside the hand-off, or None."""
        for injection in self.pending:
            if injection.step == step and injection.kind == InjectionKind.KILL_IN_HANDOFF:
                self.pending.remove(injection)
                return functools.partial(self._kill, injection, step)
        return None

    def _kill(self, injection: Injection, step: int) -> None:
        self._record(injection, step)
        fire(dataclasses.replace(injection, kind=InjectionKind.KILL), step)

    def _record(self, injection: Injection, step: int) -> None:
        """The moment of the failure, in the run directory's hosts/injections/, so that the driver can
        measure how long detection took (a killed process cannot tell the driver itself)."""
        self.run.record_injection({"kind": injection.kind, "rank": self.rank, "attempt": self.attempt, "step": step,
                                   "saving_in_progress": self.saving(), "time": time.time()})


def fire(injection: Injection, step: int) -> None:
    log.warning("injecting %s at step %d", injection.kind, step)
    for handler in logging.getLogger().handlers:
        handler.flush()
    if injection.kind == InjectionKind.CRASH:
        os.abort()
    elif injection.kind == InjectionKind.KILL:
        os.kill(os.getpid(), signal.SIGKILL)
    elif injection.kind == InjectionKind.HANG:
        os.kill(os.getpid(), signal.SIGSTOP)
    elif injection.kind == InjectionKind.EXCEPTION:
        raise InjectedFailure(f"injected exception at step {step}")
    elif injection.kind == InjectionKind.PREEMPT:
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        raise ValueError(f"unknown injection kind {injection.kind!r}")
