"""Listeners of the driver that write what happens: events.jsonl (the one source of a run's history),
metrics.jsonl with TensorBoard beside it, and chaos, which kills hosts at random times.

Each event is written once, here, from a state change or a poll; the attempt table, the trajectory,
goodput, summary.json and report.png are all derived from these records (`jaxlaunch.launcher.records.history`)."""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import pathlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from jaxlaunch.launcher.control.driver import Driver, Listener
from jaxlaunch.launcher.control.states import (
    Attempt,
    AttemptEndNotice,
    AttemptStartNotice,
    AwaitingCapacity,
    Draining,
    DrainReason,
    Failed,
    Persisting,
    Relaunching,
    Running,
    State,
    Stopped,
)
from jaxlaunch.launcher.records.runs import RunDir

from jaxlaunch.contract import events
from jaxlaunch.contract.protocol import GroupPoll

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

log = logging.getLogger(__name__)


def summary_writer(directory: str, **options: Any) -> SummaryWriter | None:
    """TensorBoard's writer in `directory`, or None, said, when it cannot be made: its queue needs a
    semaphore in /dev/shm, which a full /dev/shm refuses. TensorBoard's files are a view of the
    records (metrics.jsonl and events.jsonl are written as always): the run goes on without them."""
    from tensorboardX import SummaryWriter

    try:
        return SummaryWriter(directory, **options)
    except OSError as err:
        log.warning("no TensorBoard file in %s for this launch (%s); metrics.jsonl and events.jsonl are "
                    "written as always", directory, err)
        return None

TENSORBOARD_SKIP = ("step", "time", "attempt", "num_hosts")


class TensorBoard:
    """Scalars of every record. A restart recomputes steps after its checkpoint: the writer then
    reopens with `purge_step`, so TensorBoard replaces those points instead of folding back."""

    def __init__(self, directory: pathlib.Path | str, last_step: int = -1):
        self.directory = directory
        self.writer: SummaryWriter | None = None
        self.last_step = last_step
        """The newest step already written, by this launch or an earlier one of the run."""
        self.files = 0
        self.off = False
        """No writer could be made (`summary_writer`): none is tried again this launch."""

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            step = record["step"]
            if self.off:
                return
            if self.writer is None or step <= self.last_step:
                if self.writer is not None:
                    self.writer.close()
                self.files += 1
                # A file name of its own: two writers within one second would share one.
                self.writer = summary_writer(str(self.directory), flush_secs=10,
                                             filename_suffix=f".{os.getpid()}.{self.files}",
                                             purge_step=step if self.last_step >= step else None)
                if self.writer is None:
                    self.off = True
                    return
            for key, value in record.items():
                if key not in TENSORBOARD_SKIP and isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(f"train/{key}", value, step)
            self.last_step = step

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Sink(Protocol):
    """Told what the recorder writes, as it writes it (the trackers)."""

    def on_event(self, event: events.Event) -> None: ...

    def on_records(self, records: list[dict[str, Any]]) -> None: ...


class StepRanges:
    """A set of step numbers held as sorted, disjoint ranges [first, last]: a run records its steps
    mostly in order, so a few ranges hold them however long it runs (a set held an int per step)."""

    def __init__(self, steps: Iterable[int] = ()) -> None:
        self.firsts: list[int] = []
        self.lasts: list[int] = []
        self.update(steps)

    def __contains__(self, step: object) -> bool:
        i = bisect.bisect_right(self.firsts, step) - 1 if isinstance(step, int) else -1
        return i >= 0 and step <= self.lasts[i]  # type: ignore[operator]

    def update(self, steps: Iterable[int]) -> None:
        for step in steps:
            i = bisect.bisect_right(self.firsts, step) - 1
            if i >= 0 and step <= self.lasts[i] + 1:
                self.lasts[i] = max(self.lasts[i], step)  # in range i, or just past it
            elif i + 1 < len(self.firsts) and step == self.firsts[i + 1] - 1:
                i += 1
                self.firsts[i] = step  # just before the next range
            else:
                i += 1
                self.firsts.insert(i, step)
                self.lasts.insert(i, step)
            if i + 1 < len(self.firsts) and self.lasts[i] + 1 >= self.firsts[i + 1]:  # it now touches the next
                self.lasts[i] = max(self.lasts[i], self.lasts.pop(i + 1))
                del self.firsts[i + 1]

    def newest(self) -> int:
        return self.lasts[-1] if self.lasts else -1


class Recorder(Listener):
    def __init__(self, run: RunDir, mesh_for: Callable[[int], dict[str, int]],
                 wall_clock: Callable[[], float] = time.time, sinks: Sequence[Sink] = ()):
        self.run, self.mesh_for, self.wall_clock = run, mesh_for, wall_clock
        self.sinks = list(sinks)
        """Told every event and metric record written (`on_event`, `on_records`): the trackers."""
        self.recorded: dict[int, StepRanges] = {}
        """The steps metrics.jsonl holds, by the attempt that trained them (each trains a step once)."""
        self._note([r for r in run.metric_records() if isinstance(r.get("step"), int)])
        self.tensorboard = TensorBoard(run.tensorboard_dir, max((r.newest() for r in self.recorded.values()),
                                                                default=-1))
        self.risk_written = False
        """This launch wrote its data_order_at_risk warning."""

    def close(self) -> None:
        self.tensorboard.close()

    def abandon(self) -> None:
        """Another launch holds the run now: this one's TensorBoard file is closed now, with the scalars
        it buffered (its thread would flush them on its own timer, and outlive a launch from Python),
        and no other is opened. The driver's loop writes no record after a loss (`LockWatch`)."""
        self.tensorboard.close()
        self.tensorboard.off = True

    def event(self, event: events.Event) -> None:
        """Writes a driver's event, at the recorder's clock."""
        self._write_event(dataclasses.replace(event, time=self.wall_clock()))

    def _write_event(self, event: events.Event) -> None:
        self.run.event(event)
        for sink in self.sinks:
            sink.on_event(event)

    # -- polls -----------------------------------------------------------------------------------
    def on_poll(self, driver: Driver, attempt: Attempt, poll: GroupPoll) -> None:
        for rank, event in poll.events:
            if isinstance(event, events.DataOrderAtRisk):
                if self.risk_written:
                    continue  # the same warning from each attempt's hosts: once per launch
                self.risk_written = True
            self._write_event(dataclasses.replace(event, attempt=attempt.number, rank=rank))
            if isinstance(event, events.Restored) and event.records:
                # Records of committed steps that never reached the driver (the host died first):
                # the checkpoint carried them, so the run's trajectory has no hole. A step recorded
                # by another attempt is not this one: that attempt's branch was rolled back.
                self.metrics([r for r in event.records
                              if r["step"] not in self.recorded.get(r.get("attempt") or 0, StepRanges())])
        for notice in poll.notices:
            self.event(notice)
        self.metrics(poll.records)

    def metrics(self, records: list[dict[str, Any]]) -> None:
        if records:
            self.run.metrics(records)
            self.tensorboard.write(records)
            self._note(records)
            for sink in self.sinks:
                sink.on_records(records)

    def _note(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.recorded.setdefault(r.get("attempt") or 0, StepRanges()).update([r["step"]])

    # -- transitions -----------------------------------------------------------------------------
    def on_attempt_started(self, driver: Driver, started: AttemptStartNotice) -> None:
        a, group = started.attempt, started.attempt.group
        self.event(events.AttemptStarted(
            attempt=a.number, num_hosts=a.num_hosts, mesh=self.mesh_for(a.num_hosts),
            latest_committed_step=a.latest_committed, injections=[str(i) for i in started.injections],
            coordinator=group.coordinator if group else None, nodes=group.nodes if group else [],
            pids=group.pids if group else [], on_standby=group.on_standby if group else False))

    def on_transition(self, driver: Driver, old: State, new: State) -> None:
        if isinstance(new, AwaitingCapacity) and not isinstance(old, AwaitingCapacity):
            self.event(events.WaitingForCapacity(placeable_hosts=new.placeable,
                                                 min_hosts=driver.policies.scaling.min_hosts))
        elif isinstance(new, Draining) and not isinstance(old, Draining):
            if new.reason == DrainReason.RESIZE:
                self.event(events.Grow(attempt=new.attempt.number, from_hosts=new.attempt.num_hosts,
                                       to_hosts=new.target_hosts))
            elif new.reason == DrainReason.STOP:  # a replacement is recorded with the node it avoids
                self.event(events.StopRequested(attempt=new.attempt.number, signal=driver.stop_name))
        if isinstance(new, Relaunching):
            self.event(events.Restarting(reason=new.decision.reason, backoff_s=new.decision.backoff_s))
        elif isinstance(new, Persisting) and not isinstance(old, Persisting):
            self.event(events.PersistingMemory(attempt=new.attempt, step=new.step, durable_step=new.durable_step,
                                               num_hosts=new.num_hosts))
        elif isinstance(new, Failed):
            if new.persisted is not None:
                self.event(new.persisted)
            self.event(events.JobFailed(reason=new.reason))
        elif isinstance(new, Stopped):
            if new.persisted is not None:
                self.event(new.persisted)
            self.event(events.JobStopped(reason=new.reason, signal=driver.stop_name))

    def on_attempt_ended(self, driver: Driver, ended: AttemptEndNotice) -> None:
        a, failure = ended.attempt, ended.failure
        latency = failed_at = None
        if failure is not None:
            if failure.failed_at is not None:
                latency = max(0.0, failure.detected_at - failure.failed_at)
                failed_at = failure.failed_at + self.wall_clock() - driver.clock()
            self.event(events.Failure(attempt=a.number, cause=failure.kind, host=failure.rank, step=failure.step,
                                      message=failure.message, traceback=failure.traceback,
                                      detection_latency_s=latency, failed_at=failed_at))
            if failure.rank is not None and failure.traceback and failure.kind == events.FailureKind.HUNG:
                with self.run.host_log(a.number, failure.rank).open("a") as log:
                    log.write(f"\n--- the driver found this host hung; its stacks ---\n{failure.traceback}\n")
        result = next(iter(a.results.values()), None)  # the group's shape: every host's says the same
        first = a.results.get(0)  # what the function returned: rank 0's, whichever host ended first
        self.event(events.AttemptEnded(
            attempt=a.number, num_hosts=a.num_hosts, cause=ended.cause,
            host=failure.rank if failure is not None else None, first_step=a.first_step, last_step=a.last_step,
            restored_step=a.restored_step, detection_latency_s=latency, recovery_time_s=a.recovery_time_s,
            time_to_first_step_s=a.time_to_first_step_s, duration_s=driver.clock() - a.started_at,
            **({"process_count": result.process_count, "num_devices": result.num_devices, "mesh": result.mesh,
                "returned": first.returned if first is not None else None} if result is not None else {}),
        ))


class Chaos(Listener):
    """Kills a random training host at random times, `mean_s` apart on average (exponential gaps),
    and tells the driver's fault plan when, so that detection latency is measured from the kill."""

    def __init__(self, mean_s: float, seed: int, record: Callable[..., None]):
        self.mean_s, self.record = mean_s, record
        self.random = random.Random(seed)
        self.next_at: float | None = None
        self.attempt: int | None = None

    def on_attempt_started(self, driver: Driver, started: AttemptStartNotice) -> None:
        self.attempt = started.attempt.number
        self.next_at = driver.clock() + self.random.expovariate(1.0 / self.mean_s)

    def on_poll(self, driver: Driver, attempt: Attempt, poll: GroupPoll) -> None:
        now = driver.clock()
        if (self.next_at is None or now < self.next_at or attempt.number != self.attempt
                or not isinstance(driver.state, Running) or not attempt.stepped(poll.hosts)):
            return
        rank = self.random.randrange(len(poll.hosts))
        self.next_at = None
        driver.faults.killed(attempt.number, now)
        self.record(events.ChaosKill(attempt=attempt.number, host=rank, step=attempt.last_step))
        driver.running_group.kill(rank)
