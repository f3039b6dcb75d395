"""Failure injection inside a host process, for users' drills and for tests.

Each kind imitates a real failure as closely as one process can: `crash` aborts (like a segfault or
an out-of-memory kill with a core), `kill` is SIGKILL, `hang` is SIGSTOP (the process stops
answering, as a host stuck in a driver or a collective), `exception` raises in the training code,
`preempt` is the SIGTERM of a preemption notice."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import time

from launcher.config import Injection

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """The exception raised by an `exception` injection."""


def record(
    run_dir: pathlib.Path, injection: Injection, rank: int, attempt: int, step: int, saving: bool
) -> None:
    """Appends the moment of the failure to hosts/injections.jsonl, so the driver can measure how
    long it took to detect it (a killed process cannot tell the driver itself)."""
    line = {"kind": injection.kind, "rank": rank, "attempt": attempt, "step": step,
            "saving_in_progress": saving, "time": time.time()}
    path = run_dir / "hosts" / "injections.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def fire(injection: Injection, step: int) -> None:
    log.warning("injecting %s at step %d", injection.kind, step)
    for handler in logging.getLogger().handlers:
        handler.flush()
    if injection.kind == "crash":
        os.abort()
    elif injection.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif injection.kind == "hang":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif injection.kind == "exception":
        raise InjectedFailure(f"injected exception at step {step}")
    elif injection.kind == "preempt":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        raise ValueError(f"unknown injection kind {injection.kind!r}")
