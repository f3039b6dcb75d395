"""A run's history, derived from its records alone: the attempt table, the final trajectory, goodput
with its badput split, and the summary. events.jsonl is the one source of what happened (and
metrics.jsonl of what each step computed); summary.json, the terminal tables and report.png are all
views of this, across every launch of the run (goodput's split: `jaxlaunch.launcher.records.goodput`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from jaxlaunch.launcher.records import goodput
from jaxlaunch.launcher.records.goodput import BADPUT_LABELS, Split
from jaxlaunch.launcher.records.runs import RunDir

from jaxlaunch.contract import events
from jaxlaunch.contract.events import Cause, Event, Failure, FailureKind, JobStatus

__all__ = ["BADPUT_LABELS", "AttemptRecord", "History", "load_history"]


@dataclasses.dataclass(frozen=True)
class AttemptRecord:
    """One row of the attempt table: a group of hosts from its start to its end."""

    attempt: int
    num_hosts: int | None = None
    mesh: dict[str, int] | None = None
    started: float | None = None
    """Wall time of the group's start."""
    ended: float | None = None
    cause: Cause | None = None
    """How it ended: a FailureKind, or finished, resize, stopped; None while it runs."""
    failed_host: int | None = None
    failed_step: int | None = None
    message: str | None = None
    first_step: int | None = None
    last_step: int | None = None
    restored_step: int | None = None
    restore_s: float | None = None
    detection_latency_s: float | None = None
    recovery_time_s: float | None = None
    time_to_first_step_s: float | None = None
    duration_s: float | None = None
    process_count: int | None = None
    num_devices: int | None = None
    returned: Any = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class History:
    events: list[Event]
    attempts: list[AttemptRecord]
    trajectory: dict[int, dict[str, Any]]
    """step -> the record of its last computation (a recomputed step keeps its last run)."""
    recomputed: list[dict[str, Any]]
    """Records of computations that a failure threw away."""
    split: Split
    """Where the wall time went: a partition, so the parts add up to it."""

    @property
    def wall_s(self) -> float:
        return self.split.wall_s

    @property
    def productive_s(self) -> float:
        return self.split.productive_s

    @property
    def badput_s(self) -> dict[str, float]:
        return self.split.badput_s

    @property
    def goodput(self) -> float | None:
        return self.split.goodput

    @property
    def failures(self) -> list[Failure]:
        return [e for e in self.events if isinstance(e, Failure)]

    def summary(self, run: RunDir) -> dict[str, Any]:
        ended = [e for e in self.events if isinstance(e, events.JobEnded)]
        last = ended[-1] if ended else None
        ordered = [self.trajectory[s] for s in sorted(self.trajectory)]
        finished = [a for a in self.attempts if a.process_count is not None]
        result = finished[-1] if finished else None
        first_loss = next((r.get("loss") for r in ordered), None)
        launches = [e for e in self.events if isinstance(e, events.Launch)]
        return {
            "status": last.status if last is not None else JobStatus.RUNNING,
            "stop_reason": last.reason if last is not None else None,
            "final_step": ordered[-1]["step"] if ordered else None,
            "first_loss": first_loss,
            "final_loss": ordered[-1].get("loss") if ordered else None,
            "final_metrics": {k: v for k, v in ordered[-1].items() if k not in ("time", "attempt")} if ordered
            else None,
            "num_hosts": self.attempts[-1].num_hosts if self.attempts else None,
            "process_count": result.process_count if result else None,
            "num_devices": result.num_devices if result else None,
            "mesh": (result.mesh if result else None) or (self.attempts[-1].mesh if self.attempts else None),
            "returned": result.returned if result else None,
            "attempts": len(self.attempts),
            "attempt_table": [a.to_dict() for a in self.attempts],
            "restarts_by_cause": dict(restarts_by_cause(self.events)),
            "cold_start_s": self.attempts[0].time_to_first_step_s if self.attempts else None,
            "goodput": self.goodput,
            "badput_s": self.badput_s,
            "wall_time_s": self.wall_s,
            "data_order_changed": [{"step": e.step, "keys": list(e.keys), "old_hosts": e.old_hosts,
                                    "new_hosts": e.new_hosts, "attempt": e.attempt}
                                   for e in self.events if isinstance(e, events.DataOrderChanged)],
            "entry": launches[-1].entry if launches else None,
            "run_dir": str(run.path),
        }


def load_history(run: RunDir, until: float | None = None) -> History:
    """The history of a run directory, of every launch, from this version's records or an older one's.
    `until`: for a launch still running, the time up to which its wall time counts (e.g. now)."""
    evts = run.events()
    metrics = [r for r in run.metric_records() if isinstance(r.get("step"), int)]
    last: dict[int, dict[str, Any]] = {}
    recomputed = []
    for record, lost in zip(metrics, goodput.thrown_away(evts, metrics), strict=True):
        if lost:  # a later attempt went on from an earlier step: no part of the run's result
            recomputed.append(record)
            continue
        if record["step"] in last:
            recomputed.append(last[record["step"]])
        last[record["step"]] = record
    return History(evts, attempts(evts, reached_steps(metrics, run.injections())), {s: last[s] for s in sorted(last)},
                   recomputed, goodput.split_wall_time(evts, metrics, until))


DIED_UNSEEN = (FailureKind.CRASHED, FailureKind.NODE_LOST, FailureKind.PREEMPTED)
"""Failures whose step is the driver's last poll of the host (it said nothing as it ended); others
name their own step (the exception's, the hang's last progress, the replicas' check)."""


def reached_steps(metrics: Sequence[Mapping[str, Any]], injections: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Per attempt, the newest step a record shows it reached: its metric records (also those a later
    attempt's restore brought back, from a checkpoint the driver never heard of before the host
    died) and the failures it injected. The driver's own view ends at its last poll, which steps of
    milliseconds outrun."""
    reached: dict[int, int] = {}
    for record in (*metrics, *injections):
        attempt, step = record.get("attempt"), record.get("step")
        if isinstance(attempt, int) and isinstance(step, int):
            reached[attempt] = max(step, reached.get(attempt, step))
    return reached


def attempts(evts: list[Event], reached: Mapping[int, int] | None = None) -> list[AttemptRecord]:
    """The attempt table of a run's events; `reached`: per attempt, a step its records show it
    reached (`reached_steps`), which a step the driver last saw, or a failure's, is never behind."""
    rows: dict[int, dict[str, Any]] = {}
    for e in evts:
        number = getattr(e, "attempt", None)
        if number is None:
            continue
        row = rows.setdefault(number, {"attempt": number})
        if isinstance(e, events.AttemptStarted):
            row.update(num_hosts=e.num_hosts, mesh=e.mesh, started=e.time)
        elif isinstance(e, events.Restored):
            row.update(restored_step=e.step, restore_s=e.seconds)
        elif isinstance(e, Failure):
            row.update(failed_step=e.step, message=e.message)
        elif isinstance(e, events.AttemptEnded):
            row.update(cause=e.cause, failed_host=e.host, ended=e.time, first_step=e.first_step,
                       last_step=e.last_step, detection_latency_s=e.detection_latency_s,
                       recovery_time_s=e.recovery_time_s, time_to_first_step_s=e.time_to_first_step_s,
                       duration_s=e.duration_s, process_count=e.process_count, num_devices=e.num_devices,
                       returned=e.returned)
            if e.mesh:
                row["mesh"] = e.mesh
    for number, step in (reached or {}).items():
        if "ended" not in rows.get(number, {}):
            continue  # an attempt still running: its records are what the live view shows
        row = rows[number]
        row["last_step"] = max(step, row.get("last_step") or step)
        if row.get("failed_step") is not None and row.get("cause") in DIED_UNSEEN:
            row["failed_step"] = max(step, row["failed_step"])
        if row.get("first_step") is None and step > (row.get("restored_step") or 0):
            row["first_step"] = (row.get("restored_step") or 0) + 1
    return [AttemptRecord(**rows[n]) for n in sorted(rows)]


def is_failure(cause: Cause | None) -> bool:
    return isinstance(cause, FailureKind)


def restarts_by_cause(history: Sequence[Event]) -> Counter[str]:
    """Restarts of the group by what caused them: the failure before each restart, "resize", or
    "replace" (a straggler's node left)."""
    restarts: Counter[str] = Counter()
    cause = None
    for e in history:
        if isinstance(e, events.Failure):
            cause = e.cause
        elif isinstance(e, events.Restarting) and cause is not None:
            restarts[str(cause)] += 1
            cause = None
        elif isinstance(e, events.Grow):
            restarts["resize"] += 1
        elif isinstance(e, events.HostReplacement) and e.avoided and e.reason == events.EventKind.STRAGGLER:
            restarts["replace"] += 1
    return restarts
