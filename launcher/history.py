"""A run's history, derived from its records alone: the attempt table, the final trajectory, goodput
with its badput split, and the summary. events.jsonl is the one source of what happened (and
metrics.jsonl of what each step computed); summary.json, the terminal tables and report.png are all
views of this, across every launch of the run."""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from typing import Any

from jaxlaunch.launcher.runs import RunDir

BADPUT_LABELS = {
    "startup": "start-up (processes, JAX init, compile)",
    "restore": "restoring checkpoints",
    "recompute": "recomputing lost steps",
    "checkpoint": "checkpoint blocking",
    "capacity_wait": "waiting for capacity",
    "downtime": "detection, teardown, backoff",
    "other": "other (driver, Ray, polling)",
}
_ENDED_FIELDS = ("cause", "first_step", "last_step", "detection_latency_s", "recovery_time_s",
                 "time_to_first_step_s", "duration_s", "process_count", "num_devices", "returned")


@dataclasses.dataclass
class History:
    events: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    trajectory: dict[int, dict[str, Any]]
    """step -> the record of its last computation (a recomputed step keeps its last run)."""
    recomputed: list[dict[str, Any]]
    """Records of computations that a failure threw away."""
    wall_s: float
    productive_s: float
    badput_s: dict[str, float]

    @property
    def goodput(self) -> float | None:
        return self.productive_s / self.wall_s if self.wall_s > 0 else None

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "failure"]

    def summary(self, run: RunDir) -> dict[str, Any]:
        ended = [e for e in self.events if e["event"] == "job_ended"]
        last = ended[-1] if ended else {}
        ordered = [self.trajectory[s] for s in sorted(self.trajectory)]
        finished = [a for a in self.attempts if a.get("process_count") is not None]
        result = finished[-1] if finished else {}
        first_loss = next((r.get("loss") for r in ordered), None)
        return {
            "status": last.get("status", "running"),
            "stop_reason": last.get("reason"),
            "final_step": ordered[-1]["step"] if ordered else None,
            "first_loss": first_loss,
            "final_loss": ordered[-1].get("loss") if ordered else None,
            "final_metrics": {k: v for k, v in ordered[-1].items() if k not in ("time", "attempt")} if ordered
            else None,
            "num_hosts": self.attempts[-1].get("num_hosts") if self.attempts else None,
            "process_count": result.get("process_count"),
            "num_devices": result.get("num_devices"),
            "mesh": result.get("mesh") or (self.attempts[-1].get("mesh") if self.attempts else None),
            "returned": result.get("returned"),
            "attempts": len(self.attempts),
            "attempt_table": self.attempts,
            "restarts_by_cause": dict(Counter(e["cause"] for e in self.failures)),
            "cold_start_s": self.attempts[0].get("time_to_first_step_s") if self.attempts else None,
            "goodput": self.goodput,
            "badput_s": self.badput_s,
            "wall_time_s": self.wall_s,
            "entry": next((e.get("entry") for e in reversed(self.events) if e["event"] == "launch"), None),
            "run_dir": str(run.path),
        }


def load(run: RunDir) -> History:
    events = run.events()
    metrics = [r for r in run.metric_records() if isinstance(r.get("step"), int)]
    attempts = _attempts(events)
    last: dict[int, dict[str, Any]] = {}
    recomputed = []
    for record in metrics:
        if record["step"] in last:
            recomputed.append(last[record["step"]])
        last[record["step"]] = record
    typical = _typical_step_times(metrics)
    step_time = {id(r): _step_time(r, typical) for r in metrics}
    productive = sum(step_time[id(r)] for r in last.values())
    badput = dict.fromkeys(BADPUT_LABELS, 0.0)
    badput["recompute"] = sum(step_time[id(r)] for r in recomputed)
    badput["checkpoint"] = sum(r.get("checkpoint_blocking_s") or 0.0 for r in metrics)
    for a in attempts:
        restore = a.get("restore_s") or 0.0
        badput["restore"] += restore
        first = a.get("time_to_first_step_s")
        if first is not None:
            # The first step of an attempt also compiles; its compute counts as productive.
            badput["startup"] += max(0.0, first - restore - typical.get(a["attempt"], 0.0))
        else:
            badput["startup"] += a.get("duration_s") or 0.0
    badput["capacity_wait"], badput["downtime"] = _gaps(events)
    wall = _wall_time(events)
    badput["other"] = max(0.0, wall - productive - sum(badput.values()))
    return History(events, attempts, {s: last[s] for s in sorted(last)}, recomputed, wall, productive, badput)


def _typical_step_times(metrics: list[dict[str, Any]]) -> dict[int, float]:
    """Median measured step time of each attempt, for the first step whose time includes compiling."""
    by_attempt: dict[int, list[float]] = {}
    for r in metrics:
        if isinstance(r.get("step_time_s"), float | int):
            by_attempt.setdefault(r.get("attempt", 0), []).append(r["step_time_s"])
    return {a: statistics.median(times) for a, times in by_attempt.items()}


def _step_time(record: dict[str, Any], typical: dict[int, float]) -> float:
    value = record.get("step_time_s")
    return value if isinstance(value, float | int) else typical.get(record.get("attempt", 0), 0.0)


def _attempts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_number: dict[int, dict[str, Any]] = {}
    for e in events:
        if "attempt" not in e:
            continue
        a = by_number.setdefault(e["attempt"], {"attempt": e["attempt"], "restored_step": None, "cause": None,
                                                "failed_host": None, "detection_latency_s": None})
        if e["event"] == "attempt_started":
            a.update(num_hosts=e["num_hosts"], mesh=e["mesh"], started=e["time"])
        elif e["event"] == "restored":
            a.update(restored_step=e["step"], restore_s=e["seconds"])
        elif e["event"] == "failure":
            a.update(failed_step=e.get("step"), message=e.get("message"))
        elif e["event"] == "attempt_ended":
            a.update({k: e.get(k) for k in _ENDED_FIELDS}, failed_host=e.get("host"), ended=e["time"])
            if e.get("mesh"):
                a["mesh"] = e["mesh"]
    return [by_number[n] for n in sorted(by_number)]


def _wall_time(events: list[dict[str, Any]]) -> float:
    """Sum over launches of launch -> last record (the time between launches is nobody's badput)."""
    total, start, last = 0.0, None, None
    for e in events:
        if e["event"] == "launch":
            if start is not None:
                total += last - start
            start = e["time"]
        last = e["time"]
    if start is not None:
        total += last - start
    return total


def _gaps(events: list[dict[str, Any]]) -> tuple[float, float]:
    """(waiting for capacity, other downtime) between a failed attempt's end and the next start."""
    capacity = downtime = 0.0
    ended_at = waiting_at = None
    for e in events:
        if e["event"] == "attempt_ended" and e.get("cause") not in ("finished", "stopped"):
            ended_at, waiting_at = e["time"], None
        elif e["event"] == "waiting_for_capacity" and ended_at is not None:
            waiting_at = e["time"]
        elif e["event"] == "attempt_started" and ended_at is not None:
            if waiting_at is not None:
                capacity += e["time"] - waiting_at
                downtime += waiting_at - ended_at
            else:
                downtime += e["time"] - ended_at
            ended_at = waiting_at = None
        elif e["event"] == "launch":
            ended_at = waiting_at = None
    return capacity, downtime
