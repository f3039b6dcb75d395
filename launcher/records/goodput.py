"""Goodput and its badput split, as a partition of a run's wall-clock time.

Each launch of a run covers the time from its `launch` event to its last record. The records mark
labelled intervals on that timeline (a step's computation, a blocking checkpoint save, a restore,
an attempt's start-up, the wait for capacity, the time from a failure to the next attempt), and
every instant gets the label of the highest-priority interval that covers it, or `other` if none
does. Overlapping time (a warm standby group starting while the group trains, a save inside a
step's time) is so counted once, and the parts add up to the wall time by construction.

`split_wall_time(events, metrics)` takes the records of a finished run or of one still running (`until`: the
time up to which to count, e.g. now), so a live exporter can show the same numbers as the report."""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from jaxlaunch.contract import events
from jaxlaunch.contract.events import Event, PlannedEnd

PRODUCTIVE = "productive"
CATEGORIES = ("checkpoint", PRODUCTIVE, "recompute", "restore", "capacity_wait", "downtime", "startup", "other")
"""Every label of the partition, highest priority first: where intervals overlap, the first wins (a
blocking save is checkpoint time even inside a step's report-to-report time; a step is a step while
the next group starts on a warm standby; the wait for capacity is that, not downtime; a failure
before the first step ends the start-up)."""
BADPUT_LABELS = {
    "startup": "start-up (processes, JAX init, compile)",
    "restore": "restoring checkpoints",
    "recompute": "recomputing lost steps",
    "checkpoint": "checkpoint blocking",
    "capacity_wait": "waiting for capacity",
    "downtime": "detection, teardown, restart",
    "other": "other (driver, Ray, polling)",
}


@dataclasses.dataclass(frozen=True)
class Split:
    """Where a run's wall time went. `productive_s + sum(badput_s.values()) == wall_s`."""

    wall_s: float
    productive_s: float
    badput_s: dict[str, float]
    """Seconds by category of BADPUT_LABELS."""

    @property
    def goodput(self) -> float | None:
        return self.productive_s / self.wall_s if self.wall_s > 0 else None

    def shares(self) -> dict[str, float]:
        """productive and every badput category as fractions of the wall time (they add up to 1)."""
        seconds = {PRODUCTIVE: self.productive_s, **self.badput_s}
        return {k: v / self.wall_s if self.wall_s > 0 else 0.0 for k, v in seconds.items()}


@dataclasses.dataclass(frozen=True)
class Interval:
    start: float
    end: float
    category: str


def split_wall_time(evts: Sequence[Event], metrics: Sequence[dict[str, Any]], until: float | None = None) -> Split:
    """The partition of the wall time of the records so far. `until`: where an unfinished launch's
    time ends (default: its last record)."""
    spans = launch_spans(evts, metrics, until)
    seconds = partition(intervals(evts, metrics), spans)
    wall = sum(end - start for start, end in spans)
    return Split(wall, seconds.pop(PRODUCTIVE), seconds)


def launch_spans(evts: Sequence[Event], metrics: Sequence[dict[str, Any]],
                 until: float | None = None) -> list[tuple[float, float]]:
    """(start, end) of each launch: from its `launch` event to its last record (the time between
    launches is nobody's)."""
    starts = sorted(e.time for e in evts if isinstance(e, events.Launch))
    times = sorted([e.time for e in evts] + [r["time"] for r in metrics if isinstance(r.get("time"), int | float)])
    spans = []
    for i, start in enumerate(starts):
        following = starts[i + 1] if i + 1 < len(starts) else None
        inside = [t for t in times if t >= start and (following is None or t < following)]
        end = max(inside, default=start)
        if following is None and until is not None:
            end = max(end, until)
        spans.append((start, end))
    return spans


def partition(marks: Iterable[Interval], spans: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Seconds of each category within `spans`: each instant counts once, for the highest-priority
    interval that covers it (`other` where none does)."""
    rank = {c: i for i, c in enumerate(CATEGORIES)}
    boundaries: list[tuple[float, int, int]] = []  # (time, +1 opens / -1 closes, category's rank)
    for m in marks:
        if m.end > m.start:
            boundaries += [(m.start, 1, rank[m.category]), (m.end, -1, rank[m.category])]
    for start, end in spans:
        boundaries += [(start, 0, 0), (end, 0, 0)]
    boundaries.sort()
    totals = dict.fromkeys(CATEGORIES, 0.0)
    open_count = [0] * len(CATEGORIES)
    active: list[int] = []  # a heap of open ranks, cleaned lazily
    span_bounds = sorted(spans)
    previous = None
    for time, change, category in boundaries:
        if previous is not None and time > previous:
            covered = _overlap(previous, time, span_bounds)
            if covered > 0:
                while active and open_count[active[0]] == 0:
                    heapq.heappop(active)
                totals[CATEGORIES[active[0]] if active else "other"] += covered
        if change == 1:
            open_count[category] += 1
            heapq.heappush(active, category)
        elif change == -1:
            open_count[category] -= 1
        previous = time
    return totals


def _overlap(start: float, end: float, spans: Sequence[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in spans if a < end and b > start)


# ---- the intervals the records mark ----------------------------------------------------------------

@dataclasses.dataclass
class _Steps:
    """Each attempt's computed steps: when its first began and its last ended."""

    first_start: dict[int, float] = dataclasses.field(default_factory=dict)
    last_end: dict[int, float] = dataclasses.field(default_factory=dict)


def thrown_away(evts: Sequence[Event], metrics: Sequence[dict[str, Any]]) -> list[bool]:
    """For each record: whether its computation was thrown away, because a later attempt went on from
    an earlier step (restored one, or began from scratch), whether or not the step was trained again
    (a job stopped after a rollback never trains the lost steps: they are no part of its result)."""
    began: dict[int, int] = {}
    """Each attempt's starting point: the step it restored (its first record's step, less one)."""
    for r in metrics:
        attempt = r.get("attempt") or 0
        began[attempt] = min(began.get(attempt, r["step"] - 1), r["step"] - 1)
    for e in evts:
        if isinstance(e, events.Restored) and e.attempt is not None:
            began[e.attempt] = min(began.get(e.attempt, e.step), e.step)
    rolled_back_to, lowest = {}, math.inf
    for attempt in sorted(began, reverse=True):
        rolled_back_to[attempt], lowest = lowest, min(lowest, began[attempt])
    return [r["step"] > rolled_back_to.get(r.get("attempt") or 0, math.inf) for r in metrics]


def intervals(evts: Sequence[Event], metrics: Sequence[dict[str, Any]]) -> list[Interval]:
    marks, steps = _step_intervals(metrics, evts)
    ended = {e.attempt: e for e in evts if isinstance(e, events.AttemptEnded)}
    failures = {e.attempt: e for e in evts if isinstance(e, events.Failure)}
    launches = sorted(e.time for e in evts if isinstance(e, events.Launch))
    for e in evts:
        if isinstance(e, events.Restored) and e.seconds:
            marks.append(Interval(e.time - e.seconds, e.time, "restore"))
        elif isinstance(e, events.FinalSave | events.MemoryPersisted) and e.seconds:  # a give-up's persist too
            marks.append(Interval(e.time - e.seconds, e.time, "checkpoint"))
        elif isinstance(e, events.AttemptStarted):
            # An attempt never ended (the driver was killed) lasts at most until the next launch.
            after = bisect.bisect_right(launches, e.time)
            launch_after = launches[after] if after < len(launches) else math.inf
            marks += _attempt_intervals(e, ended.get(e.attempt), failures.get(e.attempt), steps, launch_after)
    marks += _between_attempts(evts, ended)
    return marks


def _attempt_intervals(started: events.AttemptStarted, ended: events.AttemptEnded | None,
                       failure: events.Failure | None, steps: _Steps, until: float = math.inf) -> list[Interval]:
    """From scheduling the group to its first step: start-up (placement, processes, JAX, restore,
    compile). In an attempt that did not finish, from its last step (or the failure, where known) to
    its end: detection and teardown (a hang's watchdog wait is detection); a failure known to come
    after the last reported step threw away the steps between them (records written before failures
    carried their time have no such part)."""
    marks = []
    scheduled = _scheduled_at(started, ended)
    first = steps.first_start.get(started.attempt)
    if ended is None:  # running (or its launch was killed): starting up until its first step
        return [Interval(scheduled, first if first is not None else until, "startup")]
    end = ended.time
    startup_end = first if first is not None else end
    marks.append(Interval(scheduled, startup_end, "startup"))
    if ended.cause == PlannedEnd.FINISHED:
        return marks
    quiet_from = steps.last_end.get(started.attempt, startup_end)
    failed_at = failure.failed_at if failure is not None else None
    if failed_at is not None and failed_at > quiet_from:
        marks.append(Interval(quiet_from, failed_at, "recompute"))
    if failed_at is not None:
        quiet_from = min(quiet_from, failed_at)
    marks.append(Interval(quiet_from, end, "downtime"))
    return marks


def _step_intervals(metrics: Sequence[dict[str, Any]], evts: Sequence[Event]) -> tuple[list[Interval], _Steps]:
    """Each step's computation, from its record's time back by its step time (a first step, which
    also compiled, by its attempt's typical step time), productive if it is the step's last
    computation and no rollback threw it away, recompute if one did; and each blocking save, right
    after the step it saved (the next step's report-to-report time holds it)."""
    typical = typical_step_times(metrics)
    timed = [r for r in metrics if isinstance(r.get("step"), int) and isinstance(r.get("time"), int | float)]
    lost = thrown_away(evts, timed)
    last_of_step = {r["step"]: i for i, r in enumerate(timed) if not lost[i]}
    marks, steps = [], _Steps()
    for i, r in enumerate(timed):
        start, attempt = r["time"] - step_time(r, typical), r.get("attempt", 0)
        marks.append(Interval(start, r["time"], PRODUCTIVE if last_of_step.get(r["step"]) == i else "recompute"))
        steps.first_start[attempt] = min(steps.first_start.get(attempt, start), start)
        steps.last_end[attempt] = max(steps.last_end.get(attempt, r["time"]), r["time"])
        blocked = r.get("checkpoint_blocking_s")
        if isinstance(blocked, int | float) and blocked > 0:
            marks.append(Interval(r["time"], r["time"] + blocked, "checkpoint"))
    return marks, steps


def typical_step_times(metrics: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Median measured step time of each attempt, for the first step whose time includes compiling."""
    by_attempt: dict[int, list[float]] = {}
    for r in metrics:
        if isinstance(r.get("step_time_s"), float | int):
            by_attempt.setdefault(r.get("attempt", 0), []).append(r["step_time_s"])
    return {a: statistics.median(times) for a, times in by_attempt.items()}


def step_time(record: dict[str, Any], typical: dict[int, float]) -> float:
    value = record.get("step_time_s")
    return value if isinstance(value, float | int) else typical.get(record.get("attempt", 0), 0.0)


def _scheduled_at(started: events.AttemptStarted, ended: events.AttemptEnded | None) -> float:
    """When the driver began to start the attempt's group: its `duration_s` counts from there."""
    if ended is not None and ended.duration_s is not None:
        return min(started.time, ended.time - ended.duration_s)
    return started.time


def _between_attempts(evts: Sequence[Event], ended: dict[int, events.AttemptEnded]) -> list[Interval]:
    """Before a launch's first attempt: start-up. After an attempt that did not finish, until the next
    one is scheduled: downtime (backoff, scheduling), or waiting for capacity from the moment the
    driver said so. With no next attempt, a restart under way (its wait for capacity, a give-up for
    lack of it, a launch still waiting) and a launch's start-up last until the driver gives up or the
    launch ends; the driver's own ending after an attempt it does not restart is `other`."""
    marks: list[Interval] = []
    launch_at = end_at = waiting_at = None
    restarting = False

    def close(at: float, downtime: bool) -> None:
        pending = ((launch_at, "startup"), (end_at if downtime else None, "downtime"), (waiting_at, "capacity_wait"))
        for since, category in pending:
            if since is not None:
                marks.append(Interval(since, at, category))

    for e in evts:
        if isinstance(e, events.Launch):
            close(e.time, restarting)
            launch_at, end_at, waiting_at, restarting = e.time, None, None, False
        elif isinstance(e, events.AttemptEnded) and e.cause != PlannedEnd.FINISHED:
            # A resize or a replacement restarts at once (no `restarting` event says so); a failure if decided so.
            end_at, waiting_at, restarting = e.time, None, e.cause in (PlannedEnd.RESIZE, PlannedEnd.REPLACE)
        elif isinstance(e, events.Restarting):
            restarting = True
        elif isinstance(e, events.WaitingForCapacity):
            waiting_at = e.time
        elif isinstance(e, events.PersistingMemory | events.JobFailed | events.JobStopped | events.JobEnded):
            close(e.time, restarting)  # the driver gave up waiting, or ended
            launch_at = end_at = waiting_at = None
        elif isinstance(e, events.AttemptStarted):
            close(_scheduled_at(e, ended.get(e.attempt)), downtime=True)
            launch_at = end_at = waiting_at = None
            restarting = False
    close(math.inf, restarting)  # each interval counts only within its launch's span
    return marks
