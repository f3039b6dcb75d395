"""Failure injection at a reported step, for users' drills and for tests: a hook the host context
calls once a step is reported (and its save, if due, started), outside any training code.

Each kind imitates a real failure as closely as one process can: `crash` aborts (like a segfault or
an out-of-memory kill), `kill` is SIGKILL, `hang` is SIGSTOP (the process stops answering, as a host
stuck in a driver or a collective), `exception` raises, `preempt` is the SIGTERM of a preemption
notice."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

from jaxlaunch.contract.layout import RunLayout
from jaxlaunch.contract.protocol import Injection, InjectionKind

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """The exception raised by an `exception` injection."""


class FaultHook:
    def __init__(self, injections: tuple[Injection, ...], rank: int, attempt: int, run: RunLayout,
                 saving: Callable[[], bool]):
        self.pending = [i for i in injections if i.host == rank]
        self.rank, self.attempt, self.run, self.saving = rank, attempt, run, saving

    def at_step(self, step: int) -> None:
        for injection in self.pending:
            if injection.step == step:
                self.pending.remove(injection)
                self._record(injection, step)
                fire(injection, step)

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
