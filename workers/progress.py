"""What a host process tells the driver: its phase, its last completed step, and metric records.

Written by the training thread, drained by the driver's polls (a separate Ray concurrency group),
so a host stuck in a collective still answers with a step that stopped moving."""

from __future__ import annotations

import threading
import time
from typing import Any

PHASES = ("starting", "initializing", "restoring", "compiling", "training", "saving", "done")


class HostProgress:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase = "starting"
        self._step: int | None = None
        self._records: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._updated = time.time()
        self.timeline: dict[str, float] = {}
        """Wall time at which each phase was first entered: where start-up time goes."""

    def phase(self, phase: str) -> None:
        assert phase in PHASES, phase
        with self._lock:
            self._phase, self._updated = phase, time.time()
            self.timeline.setdefault(phase, self._updated)

    def step_done(self, step: int, record: dict[str, Any] | None) -> None:
        with self._lock:
            self._step, self._updated = step, time.time()
            if record is not None:
                self._records.append(record)

    def event(self, kind: str, **fields: Any) -> None:
        """Something the driver should write to events.jsonl (a checkpoint fallback, a restore)."""
        with self._lock:
            self._events.append({"event": kind, "time": time.time(), **fields})

    def drain(self) -> dict[str, Any]:
        with self._lock:
            snapshot = {
                "phase": self._phase, "step": self._step, "updated": self._updated,
                "records": self._records, "events": self._events,
            }
            self._records, self._events = [], []
            return snapshot
