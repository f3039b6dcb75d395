"""The control loop: schedule a topology, start a group, watch it, decide, tear down, restart.

An explicit state machine over the states of `jaxlaunch.launcher.control.states`: `step()` runs the current state
once and moves to the next. It carries out the decisions of the pure policies of `jaxlaunch.launcher.control.policy`
against any worker group and cluster of `jaxlaunch.contract.protocol`'s interfaces, so tests step it against
fakes without Ray. Recording, the display and chaos are listeners: they see every transition and
every poll from outside."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Sequence

from jaxlaunch.launcher.control import limits, persisting, policy
from jaxlaunch.launcher.control.fault_plan import FaultPlan
from jaxlaunch.launcher.control.persisting import MemoryPersist
from jaxlaunch.launcher.control.policy import Action, Diagnosis, FailureKind, Policies
from jaxlaunch.launcher.control.states import (
    TERMINAL,
    Attempt,
    AttemptEndNotice,
    AttemptStartNotice,
    AwaitingCapacity,
    Draining,
    DrainReason,
    Failed,
    Finished,
    Persisting,
    Relaunching,
    Replacement,
    ReplacementNotice,
    ResolvingFailure,
    Running,
    Scheduling,
    State,
    Stopped,
)

from jaxlaunch.contract import events
from jaxlaunch.contract.events import Cause, PlannedEnd
from jaxlaunch.contract.protocol import Cluster, Ending, GroupPoll, Injection, NodeLiveness, PlacementError, WorkerGroup

log = logging.getLogger(__name__)


class Listener:
    """What the driver tells the recorder, the display and chaos; each overrides what it needs."""

    def before_step(self, driver: Driver) -> None: ...
    def on_transition(self, driver: Driver, old: State, new: State) -> None: ...
    def on_poll(self, driver: Driver, attempt: Attempt, poll: GroupPoll) -> None: ...
    def on_attempt_started(self, driver: Driver, started: AttemptStartNotice) -> None: ...
    def on_attempt_ended(self, driver: Driver, ended: AttemptEndNotice) -> None: ...

    def failure(self, attempt: Attempt, now: float) -> Diagnosis | None:
        """A failure of the running attempt no host knows (replicas disagree): it ends as on a host's."""
        return None

    def replacement(self, attempt: Attempt) -> Replacement | None:
        """A host the job should leave (a straggler), each found once; asked under `straggler_action: replace`."""
        return None

    def on_replacement(self, driver: Driver, notice: ReplacementNotice) -> None: ...


class Driver:
    def __init__(
        self, *,
        cluster: Cluster,
        make_group: Callable[[], WorkerGroup],
        policies: Policies,
        committed_step: Callable[[], int | None],
        faults: FaultPlan | None = None,
        attempt_offset: int = 0,
        listeners: Sequence[Listener] = (),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        persist: MemoryPersist | None = None,
    ):
        self.cluster, self.make_group, self.policies, self.persist = cluster, make_group, policies, persist
        """`persist`, with the memory tier: how a job that gives up first writes what only memory holds (Persisting)."""
        self.committed_step, self.faults, self.listeners = committed_step, faults or FaultPlan(), list(listeners)
        self.clock, self.sleep = clock, sleep
        self.state: State = Scheduling()
        self.group: WorkerGroup | None = None
        self.attempts: list[Attempt] = []
        self.failures: list[Diagnosis] = []
        self.stop_signal: int | None = None
        self.attempt_offset = attempt_offset  # numbered across a run's launches: logs and records never collide
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
        for listener in self.listeners:
            listener.before_step(self)
        match state := self.state:
            case Scheduling():
                new = self._schedule(state)
            case AwaitingCapacity():
                new = self._wait(state)
            case Running() | Draining():
                new = self._watch(state)
            case ResolvingFailure():
                new = self._resolve(state)
            case Relaunching():
                new = self._restart(state)
            case Persisting():
                new = self._persist(state)
            case Finished() | Failed() | Stopped():
                raise ValueError(f"the driver has ended ({state}): there is no step to take")
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

    @property
    def running_group(self) -> WorkerGroup:
        """The running attempt's group: watching, draining and resolving happen only while it runs."""
        assert self.group is not None, "no group is running"
        return self.group

    # -- states ----------------------------------------------------------------------------------
    def _schedule(self, state: Scheduling) -> State:
        if self.stop_signal is not None:
            return self._stop_unsaved("before the group started")
        if self.cluster.embedded and not self.cluster.alive():
            self.cluster.restart()
        now = self.clock()
        if state.waiting_since is not None and now - state.waiting_since > self.policies.fault.capacity_timeout_s:
            return self._no_capacity(self.cluster.placeable_hosts())
        placeable = self.cluster.placeable_hosts()
        num_hosts = self.policies.scaling.choose(placeable, state.at_most)
        if state.prefer is not None and (num_hosts or 0) < state.prefer:
            until = state.prefer_until or now + limits.RESIZE_SETTLE_S
            if now < until:
                self.sleep(limits.CAPACITY_POLL_S)
                return Scheduling(state.at_most, state.waiting_since, state.prefer, until)
        if num_hosts is None:
            return AwaitingCapacity(state.waiting_since or now, placeable, state.at_most)
        committed = self.committed_step()
        attempt = Attempt(number=self.attempt_offset + len(self.attempts) + 1, num_hosts=num_hosts, mesh={},
                          started_at=now, latest_committed=committed)
        injections = self.faults.for_attempt(attempt.number, num_hosts, committed)
        self.attempts.append(attempt)
        self.group = self.make_group()
        try:
            attempt.group = self.group.start(num_hosts, attempt.number, injections)
        except PlacementError as err:
            # Capacity changed between the check and the placement, or the cluster is busy: try
            # fewer hosts, and count the time toward the capacity timeout.
            log.info("placement of %d hosts failed: %s", num_hosts, err)
            self.attempts.pop()
            self._teardown()
            shrink = num_hosts - 1 if num_hosts > self.policies.scaling.min_hosts else num_hosts
            return Scheduling(at_most=shrink, waiting_since=state.waiting_since or now)
        except Exception as err:  # noqa: BLE001 - a host died while the group was starting
            self._started(attempt, injections)
            lost = self.cluster.embedded and not self.cluster.alive()  # the node died under it: a lost node
            return self._decide(attempt, policy.embedded_node_died(None, self.clock()) if lost else Diagnosis(
                FailureKind.CRASHED, None, f"the group did not start: {err}", committed, self.clock(), None))
        self._started(attempt, injections)
        return Running(attempt)

    def _wait(self, state: AwaitingCapacity) -> State:
        if self.stop_signal is not None:
            return self._stop_unsaved("while waiting for capacity")
        if self.cluster.embedded and not self.cluster.alive():
            return Scheduling(at_most=state.at_most, waiting_since=state.since)  # which starts a new one
        if self.clock() - state.since > self.policies.fault.capacity_timeout_s:
            return self._no_capacity(state.placeable)
        self.sleep(limits.CAPACITY_POLL_S)
        placeable = self.cluster.placeable_hosts()
        if self.policies.scaling.choose(placeable, state.at_most) is not None:
            return Scheduling(at_most=state.at_most, waiting_since=state.since)
        return state

    def _watch(self, state: Running | Draining) -> State:
        attempt = state.attempt
        if not self.cluster.alive():
            return self._decide(attempt, policy.embedded_node_died(attempt.last_step, self.clock()))
        poll = self._poll(attempt)
        now = self.clock()
        if poll.exits:
            self._classify(attempt, poll, now)
            return ResolvingFailure(attempt, now)
        found = next((f for f in (x.failure(attempt, now) for x in self.listeners) if f is not None), None)
        if found is not None:
            return self._decide(attempt, found)
        if poll.finished:
            return self._finished(state, poll, now)
        if self.stop_signal is not None and isinstance(state, Running):
            return self._forward_stop(state, poll, now)
        hung = self.policies.watchdog.hung(poll.hosts, now, limits.UNRESPONSIVE_AFTER_S, poll.results)
        if hung is not None:
            host, limit = hung
            what = "stopped answering" if now - host.last_heard > limits.UNRESPONSIVE_AFTER_S else "made no progress"
            return self._decide(attempt, Diagnosis(
                FailureKind.HUNG, host.rank, f"{what} for {now - host.last_progress:.1f} s in phase "
                f"{host.phase.value} (limit {limit:g} s)", attempt.last_step, now, host.last_progress))
        if isinstance(state, Draining):
            return self._drain(state, poll, now)
        if attempt.stepped(poll.hosts):
            if self._leave_straggler(attempt):
                return self._drain(Draining(attempt, DrainReason.REPLACE, now, attempt.num_hosts), poll, now)
            target = self._grow_target(attempt, now)
            if target is not None:
                return self._drain(Draining(attempt, DrainReason.RESIZE, now, target), poll, now)
        return state

    def _resolve(self, state: ResolvingFailure) -> State:
        attempt = state.attempt
        if not self.cluster.alive():
            # Its hosts died with it: nothing more is learnt from a dead node.
            return self._decide(attempt, policy.embedded_node_died(attempt.last_step, self.clock()))
        poll = self._poll(attempt)
        now = self.clock()
        undecided = self._classify(attempt, poll, now)
        if undecided or not attempt.failures:
            return state  # a host is gone and its node's health is not known yet
        failures = list(attempt.failures.values())
        ended = set(attempt.failures) | set(poll.results)
        if policy.keep_listening(failures, len(ended), len(poll.hosts), now, limits.SECONDARY_GRACE_S,
                                 limits.HEAR_OUT_S):
            return state
        # A lost node's host may not be reported yet when the collective errors and aborts it caused
        # are: ask whether any host's node is gone, or does not answer, before blaming anyone.
        nodes = self.running_group.hosts_nodes(limits.NODE_WAIT_S)
        for rank in (r for r, node in nodes.items() if node == NodeLiveness.DEAD and r not in attempt.failures):
            attempt.failures[rank] = Diagnosis(FailureKind.NODE_LOST, rank, "the host's node is gone (its raylet "
                                             "is silent)", poll.hosts[rank].step, now, poll.hosts[rank].last_heard)
        failure = policy.blame(list(attempt.failures.values()), poll.hosts, now, limits.UNRESPONSIVE_AFTER_S,
                               poll.results, {r for r, node in nodes.items() if node == NodeLiveness.UNKNOWN})
        if failure is None:
            return state  # a silent host's node does not answer either: lost (Ray, or NODE_WAIT_S, says) or not
        if failure.failed_at is None or failure.kind == FailureKind.CRASHED:
            fired_at = self.faults.fired_at(attempt.number)
            failure = dataclasses.replace(failure, failed_at=fired_at or failure.failed_at)
        return self._decide(attempt, failure)

    def _restart(self, state: Relaunching) -> State:
        if self.stop_signal is not None:
            return self._stop_unsaved("after a failure")
        if state.failure.kind == FailureKind.NODE_LOST and self.cluster.embedded:
            self.cluster.restart()  # the embedded instance is one node: losing it loses Ray
        deadline = self.clock() + state.decision.backoff_s  # up to 30 s: a stop asked during it ends it
        while self.stop_signal is None and (left := deadline - self.clock()) > 0:
            self.sleep(min(left, limits.STOP_POLL_S))
        return Scheduling() if self.stop_signal is None else self._stop_unsaved("during a restart's back-off")

    # -- inside RUNNING --------------------------------------------------------------------------
    def _poll(self, attempt: Attempt) -> GroupPoll:
        poll = self.running_group.poll()
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
                before = self.attempts[-2].cause if len(self.attempts) > 1 else None
                if self.failures and isinstance(before, FailureKind):  # a resize or replacement is no recovery
                    attempt.recovery_time_s = now - self.failures[-1].detected_at
            attempt.last_step = max(attempt.last_step or 0, *reported)
        if poll.records:
            attempt.last_step = max(attempt.last_step or 0, poll.records[-1]["step"])
        attempt.memory_committed = poll.committed("memory") or attempt.memory_committed
        for listener in self.listeners:
            listener.on_poll(self, attempt, poll)
        return poll

    def _classify(self, attempt: Attempt, poll: GroupPoll, now: float) -> int:
        """Adds the failures of hosts that ended badly; returns how many cannot be classified yet."""
        undecided = 0
        for exit in poll.exits:
            if exit.rank in attempt.failures:
                continue
            failure = policy.classify(exit, now, limits.NODE_WAIT_S)
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
        if isinstance(state, Draining) and state.reason != DrainReason.STOP:
            self._end(attempt, state.reason.end)
            return Scheduling(prefer=state.target_hosts)
        if self.stop_signal is not None:
            self._end(attempt, PlannedEnd.STOPPED)
            return Stopped(self.stop_signal, f"stopped by {self.stop_name} after saving step {step}")
        return self._decide(attempt, Diagnosis(FailureKind.PREEMPTED, None, f"preemption notice; saved step {step}",
                                             step, now, self.faults.fired_at(attempt.number)))

    def _forward_stop(self, state: Running, poll: GroupPoll, now: float) -> State:
        attempt = state.attempt
        if attempt.stepped(poll.hosts):
            return self._drain(Draining(attempt, DrainReason.STOP, now), poll, now)
        if all(h.phase.started_training for h in poll.hosts):
            return state  # the first step is under way: stop after it
        self._end(attempt, PlannedEnd.STOPPED)  # not training yet: there is nothing new to save
        return self._stop_unsaved("before training began")

    def _drain(self, state: Draining, poll: GroupPoll, now: float) -> State:
        """One round of agreeing on the stop step: propose steps until every running host accepted one,
        make it final (a confirmation lost is sent again); one not agreed or obeyed in time is forced."""
        group = self.running_group
        if state.confirmed:
            stop_at = state.proposed
            assert stop_at is not None, "a confirmed stop has a step"
            if state.unconfirmed:
                missing = set(state.unconfirmed) - set(group.confirm_stop(stop_at, list(state.unconfirmed)))
                state = dataclasses.replace(state, unconfirmed=tuple(sorted(missing)))
            past = [h.rank for h in poll.hosts if h.step is not None and h.step > stop_at]
            if past:
                return self._stop_unheeded(state, f"host {past[0]} went past step {stop_at} without "
                                                  "stopping (its loop does not call ctx.should_stop)")
            return state
        if now - state.since > limits.STOP_AGREE_S:
            return self._stop_unheeded(state, f"the hosts did not agree on a step to stop at in "
                                              f"{limits.STOP_AGREE_S:g} s")
        running = [h.rank for h in poll.hosts if h.rank not in poll.results]
        for _ in range(limits.PROPOSALS_PER_ROUND):  # each from the answers before it, not the poll's older steps
            margin = limits.STOP_MARGIN_STEPS * 2 ** min(state.refusals, limits.MAX_MARGIN_DOUBLINGS)
            proposed = policy.stop_step([h.step for h in poll.hosts], state.passed, margin)
            answers = group.propose_stop(proposed)
            if all(rank in answers and answers[rank].accepted for rank in running):
                missing = set(running) - set(group.confirm_stop(proposed, running))
                log.info("every host stops at step %d", proposed)
                return dataclasses.replace(state, proposed=proposed, confirmed=True, unconfirmed=tuple(sorted(missing)))
            # A host had passed it: those that accepted wait there; the next is past the furthest host.
            passed = max([proposed, *(a.step for a in answers.values() if a.step is not None)])
            state = dataclasses.replace(state, proposed=proposed, passed=passed, refusals=state.refusals + 1)
            if not all(rank in answers for rank in running):
                break  # a host that did not answer in time may answer at the next poll
        return state

    def _stop_unheeded(self, state: Draining, why: str) -> State:
        """The hosts cannot stop at one saved step: the attempt ends here; its work since the latest
        committed step is trained again (a resize, a replacement) or not kept (a stop)."""
        log.warning("%s: ending the attempt without a save at one step", why)
        committed = self.committed_step()
        self._end(state.attempt, state.reason.end)
        if state.reason != DrainReason.STOP:
            return Scheduling(prefer=state.target_hosts)
        assert self.stop_signal is not None, "a stop drain is a stop the user asked for"
        return self._stop_unsaved(f"with no save at one step ({why}); the latest committed step is {committed}")

    def _grow_target(self, attempt: Attempt, now: float) -> int | None:
        if attempt.num_hosts >= self.policies.scaling.max_hosts:
            return None
        if now - self._last_grow_check < self.policies.fault.grow_check_interval_s:
            return None
        self._last_grow_check = now
        held = attempt.group.nodes if attempt.group else ()  # the hosts this job holds come back when it restarts
        target = self.policies.scaling.choose(self.cluster.placeable_hosts(held=held))
        return target if target is not None and target > attempt.num_hosts else None

    def _leave_straggler(self, attempt: Attempt) -> bool:
        """Under `replace`, whether a listener found a host to leave and its node is now avoided."""
        if self.policies.fault.straggler_action != "replace":
            return False
        wanted = next((r for r in (x.replacement(attempt) for x in self.listeners) if r is not None), None)
        return wanted is not None and self._avoid(attempt, wanted)

    def _avoid(self, attempt: Attempt, wanted: Replacement) -> bool:
        """Avoids the host's node for the rest of the launch when the job can restart as large
        without it; the listeners hear either way. Asked while the attempt still holds its nodes."""
        nodes = attempt.group.nodes if attempt.group is not None else []
        node = nodes[wanted.host] if wanted.host < len(nodes) else None
        room = self.cluster.placeable_hosts(avoiding=(node,), held=[n for n in nodes if n != node]) if node else 0
        avoided = node is not None and self.policies.scaling.can_leave_node(attempt.num_hosts, room)
        if avoided and node is not None:
            self.cluster.avoid(node)
        notice = ReplacementNotice(attempt, wanted, node, avoided, room)
        for listener in self.listeners:
            listener.on_replacement(self, notice)
        return avoided

    # -- ending attempts ---------------------------------------------------------------------------
    def _decide(self, attempt: Attempt, failure: Diagnosis) -> State:
        if failure.kind == FailureKind.HUNG and failure.rank is not None and failure.traceback is None:
            failure = self._with_stacks(failure, failure.rank)
        if (failure.kind == FailureKind.REPLICA_MISMATCH and failure.rank is not None
                and self.policies.fault.straggler_action == "replace"):
            self._avoid(attempt, Replacement(failure.rank, FailureKind.REPLICA_MISMATCH.value))
        self._teardown()
        committed = self.committed_step()
        failure = dataclasses.replace(failure, progressed=attempt.progressed(committed))
        self._end(attempt, failure.kind, failure)
        self.failures.append(failure)
        decision = self.policies.restart.decide(self.failures)
        if decision.action == Action.STOP:
            return self._persist_first(Failed(decision.reason, failure), committed)
        return Relaunching(failure, decision) if self.stop_signal is None else self._stop_unsaved("after a failure")

    def _stop_unsaved(self, why: str) -> State:
        """A stop at which the hosts saved no step together."""
        assert self.stop_signal is not None, "a stop the user asked for"
        return self._persist_first(Stopped(self.stop_signal, f"stopped by {self.stop_name} {why}"),
                                   self.committed_step())

    def _persist_first(self, outcome: Failed | Stopped, committed: int | None) -> State:
        """The job's end, after memory's newest step, if newer than durable `committed`, was written durably."""
        if self.persist is None or (self.cluster.embedded and not self.cluster.alive()):
            return outcome  # (a lost embedded instance took its keepers, and their steps, along)
        attempt = self.attempts[-1].number if self.attempts else self.attempt_offset
        return persisting.plan(self.persist, outcome, attempt, committed, self.cluster.placeable_hosts,
                               self.clock(), stop_asked=isinstance(outcome, Failed) and self.stop_signal is not None)

    def _persist(self, state: Persisting) -> State:
        """One step of writing the memory step durably: start the hosts, then poll them until they end, fail
        or run out of time (a stop asked during a give-up's ends it at once); the job then ends for its own reason."""
        assert self.persist is not None, "only a driver with the memory tier persists"
        if self.stop_signal is not None and isinstance(state.outcome, Failed) and not state.stop_asked:
            return self._persisted(state, f"interrupted by {self.stop_name}")  # (a stop's persist: a 2nd signal)
        if not state.started:
            self.group = self.persist.make_group()
            try:
                self.group.start(state.num_hosts, state.attempt)
            except Exception as err:  # noqa: BLE001 - the failure that ended the job stays its reason
                return self._persisted(state, f"its hosts did not start: {type(err).__name__}: {err}"[:500])
            return dataclasses.replace(state, started=True)
        state = persisting.heard(poll := self.running_group.poll(), state)
        over, reason = persisting.judge(poll, state, self.clock(), self.persist.timeout_s)
        return self._persisted(state, reason) if over else state

    def _persisted(self, state: Persisting, reason: str | None) -> Failed | Stopped:
        assert self.persist is not None, "only a driver with the memory tier persists"
        self._teardown()
        return persisting.ended(state.outcome, persisting.result(state, reason, self.committed_step(),
                                                                 self.persist.step_bytes, self.clock()))

    def _with_stacks(self, failure: Diagnosis, rank: int) -> Diagnosis:
        """A hung or silent host's Python stacks, read before the group is torn down (its peers may fail first)."""
        stacks = self.group.dump_stacks(rank) if self.group is not None else None
        if not stacks:
            return failure
        return dataclasses.replace(failure, traceback=f"Python stacks of host {rank}:\n{stacks}")

    def _no_capacity(self, placeable: int) -> State:
        return self._persist_first(Failed(f"the cluster had room for {placeable} hosts for "
                                          f"{self.policies.fault.capacity_timeout_s:g} s; at least "
                                          f"{self.policies.scaling.min_hosts} are needed"), self.committed_step())

    def _end(self, attempt: Attempt, cause: Cause, failure: Diagnosis | None = None) -> None:
        attempt.cause = cause
        self._teardown()
        self.faults.spend(attempt.number)
        ended = AttemptEndNotice(attempt, cause, failure)
        for listener in self.listeners:
            listener.on_attempt_ended(self, ended)

    def _started(self, attempt: Attempt, injections: tuple[Injection, ...]) -> None:
        started = AttemptStartNotice(attempt, injections)
        for listener in self.listeners:
            listener.on_attempt_started(self, started)

    def _teardown(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            try:
                group.shutdown()
            except Exception as err:  # noqa: BLE001 - teardown must not hide what ended the attempt
                log.warning("tearing down the group failed: %s", err)
