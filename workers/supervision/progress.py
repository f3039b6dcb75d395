"""What a host tells the driver: its phase and step, with the records and events since the last poll.

Written by the training thread, drained by the actor's monitor thread, so every access holds a lock."""

from __future__ import annotations

import threading
import time
from typing import Any

from jaxlaunch.contract.events import HostEvent
from jaxlaunch.contract.protocol import HostSnapshot, Phase, ReplicaChecksums


class HostProgress:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase = Phase.STARTING
        self._step: int | None = None
        self._records: list[dict[str, Any]] = []
        self._events: list[HostEvent] = []
        self._busy: list[tuple[int, float]] = []
        self._checksums: list[ReplicaChecksums] = []
        self._committed: list[tuple[str, int]] = []
        self.timeline: dict[str, float] = {}
        """Wall time at which each phase was first entered: where start-up time goes."""
        self._moved = time.monotonic()

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def step(self) -> int | None:
        return self._step

    def enter(self, phase: Phase) -> None:
        with self._lock:
            self._phase, self._moved = phase, time.monotonic()
            self.timeline.setdefault(phase.value, time.time())

    def step_done(self, step: int) -> None:
        with self._lock:
            self._step, self._moved = step, time.monotonic()

    def still_for(self) -> float:
        """Seconds since the step or the phase last changed: what the driver's watchdog counts."""
        return time.monotonic() - self._moved

    def record(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._records.append(record)

    def busy(self, step: int, seconds: float) -> None:
        """The host's busy time in `step` (`jaxlaunch.workers.supervision.step_clock`), for the straggler watch."""
        with self._lock:
            self._busy.append((step, seconds))

    def checksums(self, checksums: ReplicaChecksums) -> None:
        """The host's replica checksums at a checked step (`jaxlaunch.workers.supervision.replica_sums`)."""
        with self._lock:
            self._checksums.append(checksums)

    def committed(self, saves: list[tuple[str, int]]) -> None:
        """(tier, step) of this host's saves that committed (`jaxlaunch.workers.checkpoints.cadence.CommitWatch`)."""
        if saves:
            with self._lock:
                self._committed += saves

    def event(self, event: HostEvent) -> None:
        """Something for events.jsonl (a restore, a checkpoint set aside, a warning)."""
        with self._lock:
            self._events.append(event)

    def drain(self) -> HostSnapshot:
        with self._lock:
            snapshot = HostSnapshot(self._phase, self._step, tuple(self._records), tuple(self._events),
                                    tuple(self._busy), tuple(self._checksums), tuple(self._committed))
            self._records, self._events, self._busy, self._checksums, self._committed = [], [], [], [], []
            return snapshot
