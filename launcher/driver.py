"""The control loop: schedule a topology, start a group, watch it, decide, tear down, restart.

An explicit state machine (`step()` runs one state and picks the next), driven against any object
with the worker-group interface of `launcher.worker_group.RayWorkerGroup`, so tests can step it
against a fake group without Ray."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from launcher.config import JobConfig, resolve_mesh
from launcher.display import Display
from launcher.policy import Action, Failure, FailureKind, RestartPolicy, ScalingPolicy, Watchdog
from launcher.runs import RunDir

log = logging.getLogger(__name__)
COMMITTED_CHECK_INTERVAL_S = 2.0


class State(str, enum.Enum):
    SCHEDULING = "scheduling"
    RUNNING = "running"
    RESTARTING = "restarting"
    FINISHED = "finished"
    FAILED = "failed"


TERMINAL = (State.FINISHED, State.FAILED)


class WorkerGroup(Protocol):
    def start(self, num_hosts: int, attempt: int) -> dict[str, Any]: ...
    def poll(self) -> Any: ...
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
        self.next_num_hosts: int | None = None
        self.last_record: dict[str, Any] | None = None
        self.committed_step: int | None = None
        self._last_committed_check = -1e9

    # -- the state machine ----------------------------------------------------------------------
    def run(self) -> int:
        """Runs to the end; returns the process exit code (0 finished, 1 failed)."""
        try:
            while self.state not in TERMINAL:
                self.step()
        finally:
            self._teardown()
            self.display.stop()
        return 0 if self.state == State.FINISHED else 1

    def step(self) -> State:
        handler = {
            State.SCHEDULING: self._schedule,
            State.RUNNING: self._watch,
            State.RESTARTING: self._restart,
        }[self.state]
        self.state = handler()
        return self.state

    # -- states ----------------------------------------------------------------------------------
    def _schedule(self) -> State:
        cfg = self.job.cluster
        placeable = self.cluster.placeable_hosts(cfg.resources_per_host, cfg.placement_strategy)
        num_hosts = self.scaling_policy.choose(placeable)
        if num_hosts is None:
            num_hosts = self.scaling_policy.max_hosts  # let the placement wait, bounded, say why
        attempt = len(self.attempts) + 1
        mesh = resolve_mesh(self.job.mesh, num_hosts * cfg.devices_per_host)
        record = {
            "attempt": attempt, "num_hosts": num_hosts, "mesh": mesh, "cause": None,
            "failed_host": None, "started_at": self.wall_clock(), "_start": self.clock(),
            "first_step": None, "last_step": None, "restored_step": None,
            "detection_latency_s": None, "recovery_time_s": None,
        }
        self.attempts.append(record)
        self.run_dir.event("attempt_started", attempt=attempt, num_hosts=num_hosts, mesh=mesh)
        self.group = self.make_group()
        info = self.group.start(num_hosts, attempt)
        self.run_dir.event("group_started", attempt=attempt, **info)
        self.display.start(self.committed_step or 0, self.job.train.steps)
        return State.RUNNING

    def _watch(self) -> State:
        assert self.group is not None
        poll = self.group.poll()
        attempt = self.attempts[-1]
        now = self.clock()
        self._record(poll, attempt)
        if poll.failures:
            return self._failed(min(poll.failures, key=lambda f: f.detected_at))
        if poll.finished:
            self.results = dict(poll.results)
            attempt["cause"] = "finished"
            self._end_attempt(attempt)
            return State.FINISHED
        hung = self.watchdog.hung(poll.hosts, now)
        if hung is not None:
            rank, since = hung
            host = poll.hosts[rank]
            return self._failed(Failure(
                FailureKind.HUNG, rank,
                f"no progress for {now - since:.1f} s in phase {host.phase}", host.step, now, since,
            ))
        return State.RUNNING

    def _restart(self) -> State:
        decision = self.restart_policy.decide(self.failures)
        if decision.action == Action.STOP:
            self.stop_reason = decision.reason
            self.run_dir.event("stopped", reason=decision.reason)
            return State.FAILED
        self.run_dir.event("restarting", reason=decision.reason, backoff_s=decision.backoff_s)
        self.display.message(f"restarting after {decision.backoff_s:.1f} s: {decision.reason}")
        self.sleep(decision.backoff_s)
        return State.SCHEDULING

    # -- helpers ---------------------------------------------------------------------------------
    def _record(self, poll: Any, attempt: dict[str, Any]) -> None:
        for event in poll.events:
            self.run_dir.event(event.pop("event"), attempt=attempt["attempt"], **event)
            if "step" in event and attempt["restored_step"] is None and event.get("seconds") is not None:
                attempt["restored_step"] = event["step"]
        if poll.records:
            records = [{**r, "attempt": attempt["attempt"], "num_hosts": attempt["num_hosts"]} for r in poll.records]
            self.run_dir.metrics(records)
            if attempt["first_step"] is None:
                attempt["first_step"] = records[0]["step"]
                if self.failures and attempt["recovery_time_s"] is None:
                    attempt["recovery_time_s"] = self.clock() - self.failures[-1].detected_at
            attempt["last_step"] = records[-1]["step"]
            self.last_record = records[-1]
        now = self.clock()
        if now - self._last_committed_check > COMMITTED_CHECK_INTERVAL_S:
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
        if failure.failed_at is not None:
            attempt["detection_latency_s"] = max(0.0, failure.detected_at - failure.failed_at)
        self.failures.append(failure)
        self.run_dir.event(
            "failure", attempt=attempt["attempt"], cause=failure.kind.value, host=failure.rank,
            step=failure.step, message=failure.message, traceback=failure.traceback,
            detection_latency_s=attempt["detection_latency_s"],
        )
        where = f"host {failure.rank}" if failure.rank is not None else "the job"
        self.display.message(f"[red]{failure.kind.value}[/red] on {where} at step {failure.step}: {failure.message}")
        if failure.traceback:
            self.display.message(failure.traceback)
        self._end_attempt(attempt)
        return State.RESTARTING

    def _end_attempt(self, attempt: dict[str, Any]) -> None:
        self._teardown()
        attempt["ended_at"] = self.wall_clock()
        self.run_dir.event(
            "attempt_ended", attempt=attempt["attempt"], cause=attempt["cause"], host=attempt["failed_host"],
            first_step=attempt["first_step"], last_step=attempt["last_step"],
            restored_step=attempt["restored_step"], detection_latency_s=attempt["detection_latency_s"],
            recovery_time_s=attempt["recovery_time_s"], duration_s=self.clock() - attempt["_start"],
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
        wall = self.clock() - self.started_at
        productive = sum(r["step_time_s"] for r in final_trajectory.values())
        last_attempt = self.attempts[-1] if self.attempts else {}
        result = next(iter(self.results.values()), {})
        restarts: dict[str, int] = {}
        for f in self.failures:
            restarts[f.kind.value] = restarts.get(f.kind.value, 0) + 1
        ordered = [final_trajectory[s] for s in sorted(final_trajectory)]
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
            "goodput": productive / wall if wall > 0 else None,
            "wall_time_s": wall,
            "model": self.job.train.model,
            "run_dir": str(self.run_dir.path),
        }
