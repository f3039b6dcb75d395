"""The control loop: schedule a topology, start a group, watch it, decide, tear down, restart.

An explicit state machine (`step()` runs one state and picks the next), driven against any object
with the worker-group interface of `launcher.worker_group.RayWorkerGroup`, so tests can step it
against a fake group without Ray. Decisions come from the pure policies of `launcher.policy`."""

from __future__ import annotations

import enum
import logging
import random
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from launcher.config import Injection, JobConfig, resolve_mesh
from launcher.display import Display
from launcher.policy import (
    Action,
    Failure,
    FailureKind,
    RestartPolicy,
    ScalingPolicy,
    Watchdog,
    is_secondary,
    primary_failure,
)
from launcher.runs import RunDir

log = logging.getLogger(__name__)
COMMITTED_CHECK_INTERVAL_S = 2.0
CAPACITY_POLL_S = 1.0
LOG_TAIL_LINES = 12
SECONDARY_GRACE_S = 8.0
"""While every failure seen is a collective error caused by some other host, how long the driver
keeps listening for the root cause (a dead host is often reported after the errors it causes)."""
UNRESPONSIVE_AFTER_S = 3.0
"""A host that has not answered a poll for this long, while another host failed, is the one that
hung (a stopped process stalls the others, which the coordination service then fails)."""


class PlacementError(RuntimeError):
    """The cluster cannot place the hosts asked for."""


TRAINING_PHASES = ("training", "saving")


class State(enum.StrEnum):
    SCHEDULING = "scheduling"
    RUNNING = "running"
    RESTARTING = "restarting"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"


TERMINAL = (State.FINISHED, State.FAILED, State.STOPPED)


class WorkerGroup(Protocol):
    def start(self, num_hosts: int, attempt: int, injections: tuple = ()) -> dict[str, Any]: ...
    def poll(self) -> Any: ...
    def preempt(self) -> None: ...
    def kill(self, rank: int) -> None: ...
    def shutdown(self) -> None: ...


class Cluster(Protocol):
    embedded: bool

    def placeable_hosts(self, resources: dict[str, float], strategy: str) -> int: ...
    def describe(self) -> str: ...


class Driver:
    def __init__(
        self,
        job: JobConfig,
        run: RunDir,
        cluster: Cluster,
        make_group: Callable[[], WorkerGroup],
        *,
        restart_policy: RestartPolicy,
        scaling_policy: ScalingPolicy,
        injections: tuple[Injection, ...] = (),
        chaos_mean_s: float | None = None,
        display: Display | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.job, self.run_dir, self.cluster, self.make_group = job, run, cluster, make_group
        self.restart_policy, self.scaling_policy = restart_policy, scaling_policy
        self.display = display or Display()
        self.clock, self.wall_clock, self.sleep = clock, wall_clock, sleep
        self.watchdog = Watchdog(job.distributed.startup_timeout_s, job.distributed.hang_timeout_s)
        self.state = State.SCHEDULING
        self.group: WorkerGroup | None = None
        self.attempts: list[dict[str, Any]] = []
        self.failures: list[Failure] = []
        self.results: dict[int, dict[str, Any]] = {}
        self.stop_reason: str | None = None
        self.started_at = clock()
        self.last_record: dict[str, Any] | None = None
        self.committed_step: int | None = None
        self._last_committed_check = -1e9
        self.injections_left = {inj: inj.times for inj in injections}
        self.chaos_mean_s = chaos_mean_s
        self._chaos = random.Random(job.train.seed)
        self._next_chaos: float | None = None
        self._chaos_at: float | None = None
        self.stop_signal: int | None = None
        self._planned: str | None = None
        """"resize" or "stop" once the group was asked to save and stop."""
        self._waiting_since: float | None = None
        self._seen_failures: list[Failure] = []
        self._step_times: dict[int, float] = {}
        """Step -> time of its last computation in this launch (a recomputed step counts once)."""
        # Attempts are numbered across launches of one run, so host logs and records never collide.
        self.attempt_offset = sum(e["event"] == "attempt_started" for e in run.read_jsonl(run.events_path))
        self._last_grow_check = clock()
        self.capacity_wait_s = 0.0

    # -- the state machine ----------------------------------------------------------------------
    def run(self) -> int:
        """Runs to the end; returns the process exit code (0 finished, 1 failed, 130/143 stopped)."""
        try:
            while self.state not in TERMINAL:
                self.step()
        finally:
            self._teardown()
            self.display.stop()
        if self.state == State.STOPPED:
            return 128 + (self.stop_signal or signal.SIGINT)
        return 0 if self.state == State.FINISHED else 1

    def step(self) -> State:
        handler = {
            State.SCHEDULING: self._schedule,
            State.RUNNING: self._watch,
            State.RESTARTING: self._restart,
        }[self.state]
        self.state = handler()
        return self.state

    def request_stop(self, signum: int) -> None:
        """SIGINT or SIGTERM to the driver: every host saves at one step, then the job stops."""
        self.stop_signal = signum
        self.run_dir.event("stop_requested", signal=signal.Signals(signum).name)
        self.display.message(f"{signal.Signals(signum).name}: saving a checkpoint on every host, then stopping "
                             f"(again to stop at once)")

    # -- states ----------------------------------------------------------------------------------
    def _schedule(self) -> State:
        if self.stop_signal is not None:
            self.stop_reason = "stopped by signal before the group started"
            return State.STOPPED
        cfg = self.job.cluster
        placeable = self.cluster.placeable_hosts(cfg.resources_per_host, cfg.placement_strategy)
        num_hosts = self.scaling_policy.choose(placeable)
        now = self.clock()
        if num_hosts is None:
            if self._waiting_since is None:
                self._waiting_since = now
                self.run_dir.event("waiting_for_capacity", placeable_hosts=placeable,
                                   min_hosts=self.scaling_policy.min_hosts, cluster=self.cluster.describe())
                self.display.message(f"waiting for capacity: room for {placeable} hosts, "
                                     f"at least {self.scaling_policy.min_hosts} needed")
            if now - self._waiting_since > self.job.fault.capacity_timeout_s:
                self.stop_reason = (f"the cluster had room for {placeable} hosts for "
                                    f"{self.job.fault.capacity_timeout_s:g} s; at least "
                                    f"{self.scaling_policy.min_hosts} are needed")
                self.run_dir.event("stopped", reason=self.stop_reason)
                return State.FAILED
            self.sleep(CAPACITY_POLL_S)
            return State.SCHEDULING
        if self._waiting_since is not None:
            self.capacity_wait_s += now - self._waiting_since
            self._waiting_since = None
        attempt = self.attempt_offset + len(self.attempts) + 1
        mesh = resolve_mesh(self.job.mesh, num_hosts * cfg.devices_per_host)
        committed = self.run_dir.committed_steps()
        start_step = committed[0] if committed else 0
        injections = tuple(
            inj for inj, left in self.injections_left.items()
            if left > 0 and inj.step > start_step and inj.host < num_hosts
        )
        record = {
            "attempt": attempt, "num_hosts": num_hosts, "mesh": mesh, "cause": None,
            "failed_host": None, "started_at": self.wall_clock(), "_start": now,
            "first_step": None, "last_step": None, "restored_step": None,
            "detection_latency_s": None, "recovery_time_s": None, "time_to_first_step_s": None,
            "_injections": injections,
        }
        self.attempts.append(record)
        self.run_dir.event("attempt_started", attempt=attempt, num_hosts=num_hosts, mesh=mesh,
                           latest_committed_step=committed[0] if committed else None,
                           injections=[f"{i.kind}@step={i.step},host={i.host}" for i in injections])
        self.group = self.make_group()
        try:
            info = self.group.start(num_hosts, attempt, injections)
        except PlacementError as err:
            # Capacity changed between the check and the placement (a node just died or is busy).
            self.attempts.pop()
            self._teardown()
            self.run_dir.event("placement_failed", attempt=attempt, error=str(err))
            if self._waiting_since is None:
                self._waiting_since = now
            return State.SCHEDULING
        except Exception as err:  # noqa: BLE001 - a host died while the group was starting
            return self._failed(Failure(FailureKind.CRASHED, None, f"group start failed: {err}",
                                        start_step, self.clock(), None))
        self.run_dir.event("group_started", attempt=attempt, **info)
        self.display.start(start_step, self.job.train.steps)
        self._chaos_at = None
        if self.chaos_mean_s:
            self._next_chaos = now + self._chaos.expovariate(1.0 / self.chaos_mean_s)
        return State.RUNNING

    def _watch(self) -> State:
        assert self.group is not None
        poll = self.group.poll()
        attempt = self.attempts[-1]
        now = self.clock()
        self._record(poll, attempt, refresh_committed=poll.finished)
        if poll.failures or self._seen_failures or poll.unresolved:
            # Hear out the whole group for a moment: the host that died is often reported after the
            # collective errors it causes on the others.
            self._seen_failures += poll.failures
            if poll.unresolved:
                return State.RUNNING  # a host is unreachable; the group says when it knows why
            first = min(f.detected_at for f in self._seen_failures)
            ended = {f.rank for f in self._seen_failures} | set(poll.results)
            # Only collective errors so far: the host that died, or its lost node, is still to be
            # reported. A root cause (a death, a user's exception) is acted on at once.
            waiting = all(map(is_secondary, self._seen_failures)) and now - first < SECONDARY_GRACE_S
            if waiting and len(ended) < len(poll.hosts):
                return State.RUNNING
            failure = self._blame(self._seen_failures, poll, now)
            self._seen_failures = []
            return self._failed(failure)
        if poll.finished:
            self.results = dict(poll.results)
            if not any(r.get("stopped") == "preempted" for r in poll.results.values()):
                attempt["cause"] = "finished"
                self._end_attempt(attempt)
                return State.FINISHED
            return self._preempted(attempt, poll, now)
        if self.stop_signal is not None and self._planned != "stop":
            return self._forward_stop(poll)
        hung = self.watchdog.hung(poll.hosts, now)
        if hung is not None:
            rank, since = hung
            host = poll.hosts[rank]
            what = "stopped answering" if now - host.last_heard > UNRESPONSIVE_AFTER_S else "made no progress"
            return self._failed(Failure(
                FailureKind.HUNG, rank, f"{what} for {now - since:.1f} s (phase {host.phase})",
                self._group_step(poll), now, since,
            ))
        if self._planned is None and self._stepped(poll, attempt):
            self._maybe_chaos(poll, now)
            self._maybe_grow(attempt, now)
        return State.RUNNING

    def _restart(self) -> State:
        decision = self.restart_policy.decide(self.failures)
        if decision.action == Action.STOP:
            self.stop_reason = decision.reason
            self.run_dir.event("stopped", reason=decision.reason)
            return State.FAILED
        self.run_dir.event("restarting", reason=decision.reason, backoff_s=decision.backoff_s)
        self.display.message(f"restarting in {decision.backoff_s:.1f} s: {decision.reason}")
        self.sleep(decision.backoff_s)
        return State.SCHEDULING

    # -- decisions inside RUNNING ---------------------------------------------------------------
    def _preempted(self, attempt: dict[str, Any], poll: Any, now: float) -> State:
        """Every host saved at one step and stopped: a planned resize, a stop the user asked for,
        or a preemption notice that reached a host from outside."""
        step = max(r["final_step"] for r in poll.results.values())
        if self._planned == "resize":
            self._planned = None
            attempt["cause"] = "resize"
            self._end_attempt(attempt)
            return State.SCHEDULING
        if self.stop_signal is not None:
            attempt["cause"] = "stopped"
            self.stop_reason = f"stopped by {signal.Signals(self.stop_signal).name} after saving step {step}"
            self._end_attempt(attempt)
            return State.STOPPED
        return self._failed(Failure(FailureKind.PREEMPTED, None, f"preemption notice; saved step {step}",
                                    step, now, self._injected_at(attempt)))

    def _forward_stop(self, poll: Any) -> State:
        attempt = self.attempts[-1]
        if self._stepped(poll, attempt):
            self._planned = "stop"
            self.group.preempt()
            return State.RUNNING
        if all(h.phase in TRAINING_PHASES for h in poll.hosts):
            return State.RUNNING  # the first step is under way: stop after it
        # Not training yet: there is nothing new to save.
        self._planned = "stop"
        attempt["cause"] = "stopped"
        self.stop_reason = f"stopped by {signal.Signals(self.stop_signal).name} before training began"
        self._end_attempt(attempt)
        return State.STOPPED

    @staticmethod
    def _stepped(poll: Any, attempt: dict[str, Any]) -> bool:
        """Every host is training and has completed a step of this attempt. JAX's preemption sync
        point needs each host to have reported a step before a notice arrives."""
        first = attempt["first_step"]
        return first is not None and all(
            h.phase in TRAINING_PHASES and h.step is not None and h.step >= first for h in poll.hosts
        )

    def _maybe_chaos(self, poll: Any, now: float) -> None:
        if self._next_chaos is None or now < self._next_chaos:
            return
        rank = self._chaos.randrange(len(poll.hosts))
        self._next_chaos = None
        self.run_dir.event("chaos_kill", attempt=self.attempts[-1]["attempt"], host=rank,
                           step=self._group_step(poll))
        self._chaos_at = now
        self.group.kill(rank)

    def _maybe_grow(self, attempt: dict[str, Any], now: float) -> None:
        if attempt["num_hosts"] >= self.scaling_policy.max_hosts:
            return
        if now - self._last_grow_check < self.job.fault.grow_check_interval_s:
            return
        self._last_grow_check = now
        cfg = self.job.cluster
        placeable = self.cluster.placeable_hosts(cfg.resources_per_host, cfg.placement_strategy)
        target = self.scaling_policy.choose(placeable)
        if target is not None and target > attempt["num_hosts"]:
            self._planned = "resize"
            self.run_dir.event("grow", attempt=attempt["attempt"], from_hosts=attempt["num_hosts"],
                               to_hosts=target, placeable_hosts=placeable)
            self.display.message(f"capacity for {target} hosts: saving, then restarting on {target}")
            self.group.preempt()

    def _blame(self, failures: list[Failure], poll: Any, now: float) -> Failure:
        """The failure to record: the root cause among those seen, unless a host had stopped
        answering before them (the others then died of its silence)."""
        first = primary_failure(failures)
        silent = [h for h in poll.hosts if now - h.last_heard > UNRESPONSIVE_AFTER_S
                  and h.rank not in {f.rank for f in failures}]
        attempt = self.attempts[-1]
        if silent:
            host = min(silent, key=lambda h: h.last_heard)
            return Failure(FailureKind.HUNG, host.rank, f"stopped answering {now - host.last_heard:.1f} s "
                           f"before host {first.rank} failed ({first.message})",
                           self._group_step(poll), now, self._injected_at(attempt) or host.last_heard)
        failed_at = self._injected_at(attempt) or self._chaos_at or first.failed_at
        # An exception knows the step it was raised at; for a death the group's last step is best.
        step = first.step if first.kind == FailureKind.EXCEPTION else self._group_step(poll)
        return Failure(first.kind, first.rank, first.message, step, first.detected_at, failed_at, first.traceback)

    # -- helpers ---------------------------------------------------------------------------------
    def _group_step(self, poll: Any) -> int | None:
        steps = [h.step for h in poll.hosts if h.step is not None]
        return max(steps) if steps else None

    def _to_clock(self, wall_time: float) -> float:
        """A wall-clock time (from a host) on the driver's monotonic clock."""
        return self.clock() - (self.wall_clock() - wall_time)

    def _injected_at(self, attempt: dict[str, Any]) -> float | None:
        """When an injected failure of this attempt happened (hosts/injections.jsonl), on our clock."""
        for line in self.run_dir.read_jsonl(self.run_dir.hosts / "injections.jsonl"):
            if line.get("attempt") == attempt["attempt"]:
                return self._to_clock(line["time"])
        return None

    def _record(self, poll: Any, attempt: dict[str, Any], refresh_committed: bool = False) -> None:
        for event in poll.events:
            kind = event.pop("event")
            self.run_dir.event(kind, attempt=attempt["attempt"], **event)
            if kind == "restored":
                attempt["restored_step"] = event["step"]
            elif kind == "checkpoint_fallback":
                self.display.message(f"[yellow]checkpoint step {event['step']} is unreadable; "
                                     f"fell back to an older one[/yellow]")
        if poll.records:
            records = [{**r, "attempt": attempt["attempt"], "num_hosts": attempt["num_hosts"]} for r in poll.records]
            self.run_dir.metrics(records)
            if attempt["first_step"] is None:
                attempt["first_step"] = records[0]["step"]
                attempt["time_to_first_step_s"] = self.clock() - attempt["_start"]
                if self.failures and attempt["recovery_time_s"] is None:
                    attempt["recovery_time_s"] = self.clock() - self.failures[-1].detected_at
            attempt["last_step"] = records[-1]["step"]
            self.last_record = records[-1]
            self._step_times.update((r["step"], r["step_time_s"]) for r in records)
        now = self.clock()
        if refresh_committed or now - self._last_committed_check > COMMITTED_CHECK_INTERVAL_S:
            self._last_committed_check = now
            steps = self.run_dir.committed_steps()
            self.committed_step = steps[0] if steps else None
        last = self.last_record
        self.display.update(
            last["step"] if last else (self.committed_step or 0),
            last["loss"] if last else None, last["tokens_per_s"] if last else None,
            attempt["num_hosts"], self.committed_step,
        )

    def _failed(self, failure: Failure) -> State:
        attempt = self.attempts[-1]
        attempt["cause"] = failure.kind.value
        attempt["failed_host"] = failure.rank
        attempt["failed_step"] = failure.step
        if failure.failed_at is not None:
            attempt["detection_latency_s"] = max(0.0, failure.detected_at - failure.failed_at)
        self.failures.append(failure)
        self.run_dir.event(
            "failure", attempt=attempt["attempt"], cause=failure.kind.value, host=failure.rank,
            step=failure.step, message=failure.message, traceback=failure.traceback,
            detection_latency_s=attempt["detection_latency_s"],
        )
        where = f"host {failure.rank}" if failure.rank is not None else "the group"
        self.display.message(f"[red]{failure.kind.value}[/red] on {where} after step {failure.step}: "
                             f"{failure.message}")
        if failure.traceback:
            self.display.message(failure.traceback)
        if failure.rank is not None:
            self._show_log_tail(attempt["attempt"], failure.rank)
        self._end_attempt(attempt)
        return State.RESTARTING

    def _show_log_tail(self, attempt: int, rank: int) -> None:
        path = self.run_dir.host_log(attempt, rank)
        try:
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return
        self.display.log_tail(path, lines)

    def _end_attempt(self, attempt: dict[str, Any]) -> None:
        self._teardown()
        for inj in attempt["_injections"]:
            reached = max(attempt["last_step"] or 0, attempt.get("failed_step") or 0)
            if reached >= inj.step - 1:
                self.injections_left[inj] -= 1
        attempt["ended_at"] = self.wall_clock()
        attempt["duration_s"] = self.clock() - attempt["_start"]
        self.run_dir.event(
            "attempt_ended", attempt=attempt["attempt"], num_hosts=attempt["num_hosts"], mesh=attempt["mesh"],
            cause=attempt["cause"], host=attempt["failed_host"], first_step=attempt["first_step"],
            last_step=attempt["last_step"], restored_step=attempt["restored_step"],
            detection_latency_s=attempt["detection_latency_s"], recovery_time_s=attempt["recovery_time_s"],
            time_to_first_step_s=attempt["time_to_first_step_s"], duration_s=attempt["duration_s"],
        )

    def _teardown(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            group.shutdown()

    # -- the summary -----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        metrics = self.run_dir.read_jsonl(self.run_dir.metrics_path)
        final_trajectory: dict[int, dict[str, Any]] = {}
        for record in metrics:
            final_trajectory[record["step"]] = record  # a recomputed step keeps its last run
        ordered = [final_trajectory[s] for s in sorted(final_trajectory)]
        wall = self.clock() - self.started_at
        productive = sum(self._step_times.values())
        last_attempt = self.attempts[-1] if self.attempts else {}
        result = next(iter(self.results.values()), {})
        restarts: dict[str, int] = {}
        for f in self.failures:
            restarts[f.kind.value] = restarts.get(f.kind.value, 0) + 1
        return {
            "status": self.state.value,
            "stop_reason": self.stop_reason,
            "final_step": ordered[-1]["step"] if ordered else None,
            "first_loss": ordered[0]["loss"] if ordered else None,
            "final_loss": ordered[-1]["loss"] if ordered else None,
            "num_hosts": last_attempt.get("num_hosts"),
            "process_count": result.get("process_count"),
            "num_devices": result.get("num_devices"),
            "mesh": result.get("mesh", last_attempt.get("mesh")),
            "attempts": len(self.attempts),
            "attempt_table": [{k: v for k, v in a.items() if not k.startswith("_")} for a in self.attempts],
            "restarts_by_cause": restarts,
            "cold_start_s": self.attempts[0]["time_to_first_step_s"] if self.attempts else None,
            "capacity_wait_s": self.capacity_wait_s,
            "goodput": productive / wall if wall > 0 else None,
            "wall_time_s": wall,
            "model": self.job.train.model,
            "run_dir": str(self.run_dir.path),
        }
