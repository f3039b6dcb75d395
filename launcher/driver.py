"""The control loop: schedule a topology, start a group, watch it, decide, tear down, restart.

An explicit state machine over the states of `jaxlaunch.launcher.states`: `step()` runs the current state
once and moves to the next. It carries out the decisions of the pure policies of `jaxlaunch.launcher.policy`
against any worker group and cluster of `jaxlaunch.contract.protocol`'s interfaces, so tests step it against
fakes without Ray. Recording, the display and chaos are listeners: they see every transition and
every poll from outside."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from jaxlaunch.launcher import policy
from jaxlaunch.launcher.policy import Action, Failure, FailureKind, FaultConfig, RestartPolicy, ScalingPolicy, Watchdog
from jaxlaunch.launcher.states import (
    TERMINAL,
    Attempt,
    Draining,
    DrainReason,
    Failed,
    Finished,
    ResolvingFailure,
    Restarting,
    Running,
    Scheduling,
    State,
    Stopped,
    WaitingForCapacity,
)

from jaxlaunch.contract import events
from jaxlaunch.contract.events import Cause, PlannedEnd
from jaxlaunch.contract.protocol import Cluster, Ending, GroupPoll, Injection, PlacementError, WorkerGroup

log = logging.getLogger(__name__)
CAPACITY_POLL_S = 1.0
RESIZE_SETTLE_S = 10.0
"""After a resize, how long to wait for the old group's resources to show as free again."""
SECONDARY_GRACE_S = 8.0
"""While every failure seen is a collective error caused by some other host, how long the driver
keeps listening for the root cause."""
HEAR_OUT_S = 0.3
"""After a root cause, how long the driver waits for the rest of the group to end before deciding
(about one poll: a lost node is found by asking for the nodes' liveness, not by waiting; 1 s
before that probe existed)."""
UNRESPONSIVE_AFTER_S = 2.0
"""A host that has not answered a poll for this long, while another host failed, is the one that
hung (a stopped process stalls the others, which the coordination service then fails)."""
NODE_WAIT_S = 30.0
"""How long a dead or unreachable host's node may stay of unknown health before it counts as lost
(Ray's default health checks declare a silent node dead after about 15 s)."""


class Listener(Protocol):
    def on_transition(self, driver: Driver, old: State, new: State) -> None: ...
    def on_poll(self, driver: Driver, attempt: Attempt, poll: GroupPoll) -> None: ...


class Driver:
    def __init__(
        self,
        *,
        cluster: Cluster,
        make_group: Callable[[], WorkerGroup],
        restart_policy: RestartPolicy,
        scaling_policy: ScalingPolicy,
        watchdog: Watchdog,
        fault: FaultConfig,
        committed_step: Callable[[], int | None],
        fired: Callable[[int], list[tuple[Injection, float]]] = lambda attempt: [],
        injections: Sequence[Injection] = (),
        attempt_offset: int = 0,
        listeners: Sequence[Listener] = (),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.cluster, self.make_group = cluster, make_group
        self.restart_policy, self.scaling_policy, self.watchdog, self.fault = (
            restart_policy, scaling_policy, watchdog, fault)
        self.committed_step, self.fired = committed_step, fired
        """`fired(attempt)`: the injections that went off in an attempt, each with its time (our clock)."""
        self.listeners = list(listeners)
        self.clock, self.sleep = clock, sleep
        self.state: State = Scheduling()
        self.group: WorkerGroup | None = None
        self.attempts: list[Attempt] = []
        self.failures: list[Failure] = []
        self.stop_signal: int | None = None
        self.attempt_offset = attempt_offset
        """Attempts are numbered across launches of one run, so host logs and records never collide."""
        self.injections_left = {inj: inj.times for inj in injections}
        self._last_grow_check = clock()

    # -- running ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Runs to the end; returns the process exit code (0 finished, 1 failed, 130/143 stopped)."""
        try:
            while not isinstance(self.state, TERMINAL):
                self.step()
        finally:
            self._teardown()
        if isinstance(self.state, Stopped):
            return 128 + self.state.signal
        return 0 if isinstance(self.state, Finished) else 1

    def step(self) -> State:
        handler = {
            Scheduling: self._schedule, WaitingForCapacity: self._wait, Running: self._watch,
            Draining: self._watch, ResolvingFailure: self._resolve, Restarting: self._restart,
        }[type(self.state)]
        new = handler(self.state)
        if new is not self.state:
            old, self.state = self.state, new
            for listener in self.listeners:
                listener.on_transition(self, old, new)
        return self.state

    def request_stop(self, signum: int) -> None:
        """SIGINT or SIGTERM to the driver: every host saves at one step, then the job stops."""
        self.stop_signal = signum

    @property
    def stop_name(self) -> str:
        return signal.Signals(self.stop_signal or signal.SIGINT).name

    # -- states ----------------------------------------------------------------------------------
    def _schedule(self, state: Scheduling) -> State:
        if self.stop_signal is not None:
            return Stopped(self.stop_signal, f"stopped by {self.stop_name} before the group started")
        if self.cluster.embedded and not self.cluster.alive():
            self.cluster.restart()
        now = self.clock()
        if state.waiting_since is not None and now - state.waiting_since > self.fault.capacity_timeout_s:
            return self._no_capacity(self.cluster.placeable_hosts())
        placeable = self.cluster.placeable_hosts()
        num_hosts = self.scaling_policy.choose(placeable, state.at_most)
        if state.prefer is not None and (num_hosts or 0) < state.prefer:
            until = state.prefer_until or now + RESIZE_SETTLE_S
            if now < until:
                self.sleep(CAPACITY_POLL_S)
                return Scheduling(state.at_most, state.waiting_since, state.prefer, until)
        if num_hosts is None:
            return WaitingForCapacity(state.waiting_since or now, placeable, state.at_most)
        committed = self.committed_step()
        attempt = Attempt(
            number=self.attempt_offset + len(self.attempts) + 1, num_hosts=num_hosts,
            mesh={}, started_at=now, latest_committed=committed,
            injections=tuple(i for i, left in self.injections_left.items()
                             if left > 0 and i.step > (committed or 0) and i.host < num_hosts),
        )
        self.attempts.append(attempt)
        self.group = self.make_group()
        try:
            attempt.group = self.group.start(num_hosts, attempt.number, attempt.injections)
        except PlacementError as err:
            # Capacity changed between the check and the placement, or the cluster is busy: try
            # fewer hosts, and count the time toward the capacity timeout.
            log.info("placement of %d hosts failed: %s", num_hosts, err)
            self.attempts.pop()
            self._teardown()
            shrink = num_hosts - 1 if num_hosts > self.scaling_policy.min_hosts else num_hosts
            return Scheduling(at_most=shrink, waiting_since=state.waiting_since or now)
        except Exception as err:  # noqa: BLE001 - a host died while the group was starting
            return self._decide(attempt, Failure(FailureKind.CRASHED, None, f"the group did not start: {err}",
                                                 committed, self.clock(), None))
        return Running(attempt)

    def _wait(self, state: WaitingForCapacity) -> State:
        if self.stop_signal is not None:
            return Stopped(self.stop_signal, f"stopped by {self.stop_name} while waiting for capacity")
        if self.clock() - state.since > self.fault.capacity_timeout_s:
            return self._no_capacity(state.placeable)
        self.sleep(CAPACITY_POLL_S)
        placeable = self.cluster.placeable_hosts()
        if self.scaling_policy.choose(placeable, state.at_most) is not None:
            return Scheduling(at_most=state.at_most, waiting_since=state.since)
        return state

    def _watch(self, state: Running | Draining) -> State:
        attempt = state.attempt
        if not self.cluster.alive():
            return self._decide(attempt, Failure(FailureKind.NODE_LOST, None, "the embedded Ray node died",
                                                 attempt.last_step, self.clock()))
        poll = self._poll(attempt)
        now = self.clock()
        if poll.exits:
            self._classify(attempt, poll, now)
            return ResolvingFailure(attempt, now)
        if poll.finished:
            return self._finished(state, poll, now)
        if self.stop_signal is not None and isinstance(state, Running):
            return self._forward_stop(state, poll)
        hung = self.watchdog.hung(poll.hosts, now, UNRESPONSIVE_AFTER_S)
        if hung is not None:
            host, limit = hung
            what = "stopped answering" if now - host.last_heard > UNRESPONSIVE_AFTER_S else "made no progress"
            stacks = self.group.dump_stacks(host.rank)
            return self._decide(attempt, Failure(
                FailureKind.HUNG, host.rank, f"{what} for {now - host.last_progress:.1f} s in phase "
                f"{host.phase.value} (limit {limit:g} s)", attempt.last_step, now, host.last_progress,
                traceback=f"Python stacks of host {host.rank}:\n{stacks}" if stacks else None))
        if isinstance(state, Running) and attempt.stepped(poll.hosts):
            target = self._grow_target(attempt, now)
            if target is not None:
                self.group.preempt()
                return Draining(attempt, DrainReason.RESIZE, target)
        return state

    def _resolve(self, state: ResolvingFailure) -> State:
        attempt = state.attempt
        poll = self._poll(attempt)
        now = self.clock()
        undecided = self._classify(attempt, poll, now)
        if undecided or not attempt.failures:
            return state  # a host is gone and its node's health is not known yet
        failures = list(attempt.failures.values())
        ended = set(attempt.failures) | set(poll.results)
        if policy.keep_listening(failures, len(ended), len(poll.hosts), now, SECONDARY_GRACE_S, HEAR_OUT_S):
            return state
        # A lost node's host may not be reported yet when the collective errors and aborts it caused
        # are: ask whether any host's node is gone before blaming anyone.
        for rank in self.group.lost_hosts():
            if rank not in attempt.failures:
                attempt.failures[rank] = Failure(FailureKind.NODE_LOST, rank, "the host's node is gone (its raylet "
                                                 "does not answer)", poll.hosts[rank].step, now)
        failures = list(attempt.failures.values())
        failure = policy.blame(failures, poll.hosts, now, UNRESPONSIVE_AFTER_S)
        if failure.failed_at is None or failure.kind == FailureKind.CRASHED:
            failed_at = attempt.killed_at or self._injected_at(attempt)
            failure = failure.with_blame(failed_at=failed_at or failure.failed_at)
        return self._decide(attempt, failure)

    def _restart(self, state: Restarting) -> State:
        if self.stop_signal is not None:
            return Stopped(self.stop_signal, f"stopped by {self.stop_name} after a failure")
        if state.failure.kind == FailureKind.NODE_LOST and self.cluster.embedded:
            self.cluster.restart()  # the embedded instance is one node: losing it loses Ray
        self.sleep(state.decision.backoff_s)
        return Scheduling()

    # -- inside RUNNING --------------------------------------------------------------------------
    def _poll(self, attempt: Attempt) -> GroupPoll:
        poll = self.group.poll()
        now = self.clock()
        for _, event in poll.events:
            if isinstance(event, events.Restored):
                attempt.restored_step = event.step
        # The hosts' own reports are the freshest word on progress (metric records come a step late).
        reported = [h.step for h in poll.hosts if h.step is not None and h.phase.started_training]
        if reported:
            if attempt.first_step is None:
                restored = attempt.restored_step if attempt.restored_step is not None else attempt.latest_committed
                attempt.first_step = (restored or 0) + 1
                attempt.time_to_first_step_s = now - attempt.started_at
                if self.failures:
                    attempt.recovery_time_s = now - self.failures[-1].detected_at
            attempt.last_step = max(attempt.last_step or 0, *reported)
        if poll.records:
            attempt.last_step = max(attempt.last_step or 0, poll.records[-1]["step"])
        for listener in self.listeners:
            listener.on_poll(self, attempt, poll)
        return poll

    def _classify(self, attempt: Attempt, poll: GroupPoll, now: float) -> int:
        """Adds the failures of hosts that ended badly; returns how many cannot be classified yet."""
        undecided = 0
        for exit in poll.exits:
            if exit.rank in attempt.failures:
                continue
            failure = policy.classify(exit, now, NODE_WAIT_S)
            if failure is None:
                undecided += 1
            else:
                attempt.failures[exit.rank] = failure
        return undecided

    def _finished(self, state: Running | Draining, poll: GroupPoll, now: float) -> State:
        """Every host returned: the job is done, or every host saved at one step and stopped (a
        resize, a stop the user asked for, or a preemption notice that reached a host from outside)."""
        attempt = state.attempt
        attempt.results = dict(poll.results)
        if not any(r.ending == Ending.STOPPED for r in poll.results.values()):
            self._end(attempt, PlannedEnd.FINISHED)
            return Finished()
        step = max(r.final_step or 0 for r in poll.results.values())
        if isinstance(state, Draining) and state.reason == DrainReason.RESIZE:
            self._end(attempt, PlannedEnd.RESIZE)
            return Scheduling(prefer=state.target_hosts)
        if self.stop_signal is not None:
            self._end(attempt, PlannedEnd.STOPPED)
            return Stopped(self.stop_signal, f"stopped by {self.stop_name} after saving step {step}")
        return self._decide(attempt, Failure(FailureKind.PREEMPTED, None, f"preemption notice; saved step {step}",
                                             step, now, self._injected_at(attempt)))

    def _forward_stop(self, state: Running, poll: GroupPoll) -> State:
        attempt = state.attempt
        if attempt.stepped(poll.hosts):
            self.group.preempt()
            return Draining(attempt, DrainReason.STOP)
        if all(h.phase.started_training for h in poll.hosts):
            return state  # the first step is under way: stop after it
        self._end(attempt, "stopped")  # not training yet: there is nothing new to save
        return Stopped(self.stop_signal, f"stopped by {self.stop_name} before training began")

    def _grow_target(self, attempt: Attempt, now: float) -> int | None:
        if attempt.num_hosts >= self.scaling_policy.max_hosts:
            return None
        if now - self._last_grow_check < self.fault.grow_check_interval_s:
            return None
        self._last_grow_check = now
        # The hosts this job holds come back when it restarts.
        target = self.scaling_policy.choose(self.cluster.placeable_hosts() + attempt.num_hosts)
        return target if target is not None and target > attempt.num_hosts else None

    # -- ending attempts ---------------------------------------------------------------------------
    def _decide(self, attempt: Attempt, failure: Failure) -> State:
        self._end(attempt, failure.kind)
        committed = self.committed_step()
        if committed is not None and (attempt.latest_committed is None or committed > attempt.latest_committed):
            failure = failure.with_blame(progressed=True)
        self.failures.append(failure)
        decision = self.restart_policy.decide(self.failures)
        if decision.action == Action.STOP:
            return Failed(decision.reason, failure)
        return Restarting(failure, decision)

    def _no_capacity(self, placeable: int) -> Failed:
        return Failed(f"the cluster had room for {placeable} hosts for {self.fault.capacity_timeout_s:g} s; at "
                      f"least {self.scaling_policy.min_hosts} are needed")

    def _injected_at(self, attempt: Attempt) -> float | None:
        fired = self.fired(attempt.number) if attempt.injections else []
        return min(at for _, at in fired) if fired else None

    def _end(self, attempt: Attempt, cause: Cause) -> None:
        attempt.cause = cause
        self._teardown()
        for injection, _ in (self.fired(attempt.number) if attempt.injections else []):
            if injection in self.injections_left:
                self.injections_left[injection] -= 1

    def _teardown(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            try:
                group.shutdown()
            except Exception as err:  # noqa: BLE001 - teardown must not hide what ended the attempt
                log.warning("tearing down the group failed: %s", err)
