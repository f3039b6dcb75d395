"""A fake cluster and worker group for stepping the driver without Ray, and a fake clock (the unit
tests' and the pod-scale benchmark's).

The type check (tests/test_types.py) holds the fakes to the Protocols they stand in for:
`make_driver` hands a `FakeCluster` to the driver as its `Cluster` and makes each `FakeGroup` as
a `WorkerGroup`, so a fake whose methods drift from the Protocol's fails that test."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from jaxlaunch.launcher.control.driver import Driver, Listener
from jaxlaunch.launcher.control.fault_plan import FaultPlan, Fired
from jaxlaunch.launcher.control.limits import UNANSWERED_CONFIRM_S
from jaxlaunch.launcher.control.policy import (
    FaultConfig,
    Policies,
    RestartPolicy,
    ScalingPolicy,
    Watchdog,
    WatchdogConfig,
)

from jaxlaunch.contract.events import HostEvent, Restored
from jaxlaunch.contract.protocol import (
    Cluster,
    Ending,
    ErrorKind,
    ExitHow,
    GroupInfo,
    GroupPoll,
    HostError,
    HostExit,
    HostResult,
    HostSnapshot,
    HostStatus,
    Injection,
    NodeLiveness,
    Phase,
    PlacementError,
    ReplicaChecksums,
    StopAnswer,
    WorkerGroup,
)

POLL_INTERVAL_S = WatchdogConfig().poll_interval_s
"""A fake poll takes the driver's default poll interval of the fake clock."""

Record = dict[str, Any]
Behaviour = Callable[["FakeGroup", int], list[Record] | None]
"""(group, poll index) -> the metric records the hosts report at that poll; it moves the hosts."""
Log = list[tuple[Any, ...]]
"""What the driver asked of the groups, in order: ("start", attempt, hosts), ("kill", rank), ..."""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeCluster:
    """`capacity` hosts in all; a running group holds its own until it is shut down."""

    embedded = True

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self.is_alive = True
        self.restarts = 0
        self.groups: list[FakeGroup] = []
        """Every group started on it, in order."""
        self.avoided: list[str] = []

    def placeable_hosts(self, avoiding: Sequence[str] = (), held: Sequence[str] = ()) -> int:
        return max(0, self.capacity - self.held) + len(held)

    def avoid(self, node: str) -> None:
        """Each fake node holds one host: an avoided one is a host's room fewer."""
        self.avoided.append(node)
        self.capacity -= 1

    def describe(self) -> str:
        return f"fake cluster with room for {self.placeable_hosts()}"

    def alive(self) -> bool:
        return self.is_alive

    def restart(self) -> None:
        self.restarts += 1
        self.is_alive = True


class FakeGroup:
    """Plays one attempt: `behaviour(group, poll_index)` makes the hosts report at each poll."""

    def __init__(self, clock: Clock, behaviour: Behaviour, log: Log, cluster: FakeCluster) -> None:
        self.clock, self.behaviour, self.log, self.cluster = clock, behaviour, log, cluster
        cluster.groups.append(self)
        self.num_hosts = 0
        self.attempt = 0
        self.hosts: list[HostStatus] = []
        self.polls = 0
        self.poll_seconds = 0.0
        """CPU time spent inside poll(): the fake's own cost, for a benchmark to take out of the driver's."""
        self.stop_at: int | None = None
        """The stop step every host accepted and the driver confirmed."""
        self.held_at: int | None = None
        """The proposed stop step the hosts that accepted it wait at."""
        self.ahead: dict[int, int] = {}
        """rank -> how many steps a host's loop is past the step it last reported."""
        self.killed: int | None = None
        self.results: dict[int, HostResult] = {}
        self.exits: dict[int, HostExit] = {}
        self.events: list[tuple[int, HostEvent]] = []
        """(rank, event) to report at the next poll."""
        self.silent: set[int] = set()
        """Hosts that stopped answering polls (a stopped process); the others answer every poll."""
        self.lost: list[int] = []
        """Hosts whose node is gone, reported or not."""
        self.unsure: set[int] = set()
        """Hosts whose node does not answer (powered off, cut off), not yet declared dead."""
        self.unsure_since: dict[int, float] = {}
        self.checksums: dict[int, list[ReplicaChecksums]] = {}
        """rank -> replica checksums to report at the next poll."""
        self.busy: dict[int, list[tuple[int, float]]] = {}
        """rank -> (step, busy seconds) to report at the next poll."""

    def start(self, num_hosts: int, attempt: int, injections: tuple[Injection, ...] = ()) -> GroupInfo:
        if getattr(self.behaviour, "placement_fails", False):
            raise PlacementError("placement timed out")
        if getattr(self.behaviour, "node_dies_at_start", False):
            self.cluster.is_alive = False
            raise RuntimeError("The actor died because its node has died.")
        self.num_hosts, self.attempt = num_hosts, attempt
        self.cluster.held += num_hosts
        self.hosts = [HostStatus(r, last_heard=self.clock(), last_progress=self.clock()) for r in range(num_hosts)]
        self.log.append(("start", attempt, num_hosts))
        # Node ids and pids as long as Ray's, so that the records' sizes are real ones.
        return GroupInfo("10.0.0.1:1234", [f"{rank:056x}" for rank in range(num_hosts)],
                         [100_000 + rank for rank in range(num_hosts)])

    def poll(self) -> GroupPoll:
        started = time.process_time()
        self.clock.sleep(POLL_INTERVAL_S)
        self.polls += 1
        records = self.behaviour(self, self.polls) or []
        for h in self.hosts:
            if h.rank not in self.exits and h.rank not in self.silent:
                h.last_heard = self.clock()
        events, self.events = self.events, []
        checksums, self.checksums = self.checksums, {}
        busy, self.busy = self.busy, {}
        poll = GroupPoll(self.hosts, records, events, dict(self.results), list(self.exits.values()), busy,
                         checksums=checksums)
        self.poll_seconds += time.process_time() - started
        return poll

    # -- what hosts do ---------------------------------------------------------------------------
    def train(self, step: int, loss: float = 1.0) -> list[Record]:
        now = self.clock()
        for h in self.hosts:
            h.heard(step, Phase.TRAINING, now)
            h.last_heard = h.last_progress = now  # as before: every call is progress, the same step too
        return [{"step": step, "time": now, "loss": loss, "step_time_s": POLL_INTERVAL_S, "attempt": self.attempt,
                 "num_hosts": self.num_hosts}]

    def restored(self, step: int) -> None:
        self.events.append((0, Restored(time=self.clock(), step=step, seconds=0.1)))

    def finish(self, step: int, ending: Ending = Ending.COMPLETED) -> None:
        snapshot = HostSnapshot(Phase.DONE, step)
        self.results = {r: HostResult(ending, step, r, self.num_hosts, 2 * self.num_hosts,
                                      {"data": self.num_hosts}, snapshot) for r in range(self.num_hosts)}

    def die(self, rank: int, how: ExitHow = ExitHow.PROCESS_DIED, node: NodeLiveness = NodeLiveness.ALIVE,
            step: int | None = None) -> None:
        self.exits[rank] = HostExit(rank, how, self.clock(), step, "worker died", node=node)

    def raise_(self, rank: int, kind: ErrorKind = ErrorKind.USER, message: str = "ValueError: bad batch",
               step: int | None = None) -> None:
        error = HostError(rank, step, kind, message.split(":")[0], message.split(": ", 1)[1], f"tb\n{message}")
        self.exits[rank] = HostExit(rank, ExitHow.RAISED, self.clock(), step, error=error)

    # -- what the driver does --------------------------------------------------------------------
    def propose_stop(self, step: int) -> dict[int, StopAnswer]:
        self.log.append(("propose_stop", step))
        answers = {}
        for h in self.hosts:
            if h.rank not in self.results and h.rank not in self.exits and h.rank not in self.silent:
                at = (h.step or 0) + self.ahead.get(h.rank, 0)
                answers[h.rank] = StopAnswer(at < step, at)
        if any(a.accepted for a in answers.values()):
            self.held_at = step
        return answers

    def confirm_stop(self, step: int, ranks: list[int]) -> list[int]:
        self.log.append(("confirm_stop", step))
        self.stop_at = step
        return list(ranks)

    def kill(self, rank: int) -> None:
        self.killed = rank
        self.log.append(("kill", rank))

    def dump_stacks(self, rank: int) -> str | None:
        self.log.append(("dump_stacks", rank))
        return f'Thread 1 (idle): "MainThread"\n    train (user.py:{rank})'

    def hosts_nodes(self, lost_after_s: float) -> dict[int, NodeLiveness]:
        """As the Ray group's (`RayWorkerGroup.hosts_nodes`), with `lost` and `unsure` for Ray's answers."""
        now, nodes = self.clock(), {}
        for h in (h for h in self.hosts if h.rank not in self.results):
            if h.rank in self.lost:
                nodes[h.rank] = NodeLiveness.DEAD
            elif h.rank in self.unsure:
                since = self.unsure_since.setdefault(h.rank, now)
                gone = now - since >= UNANSWERED_CONFIRM_S and now - h.last_heard >= lost_after_s
                nodes[h.rank] = NodeLiveness.DEAD if gone else NodeLiveness.UNKNOWN
            else:
                nodes[h.rank] = NodeLiveness.ALIVE
        return nodes

    def shutdown(self) -> None:
        self.cluster.held -= self.num_hosts
        self.num_hosts = 0
        self.log.append(("shutdown", self.attempt))


def trains_to(total: int, start: int = 0) -> Behaviour:
    def behaviour(group: FakeGroup, i: int) -> list[Record]:
        step = start + i
        if step > total:
            group.finish(total)
            return []
        return group.train(step)
    return behaviour


def obeys(group: FakeGroup, i: int) -> list[Record]:
    """Trains a step a poll; waits at a proposed stop step; saves and stops at the confirmed one."""
    step = (group.hosts[0].step or 0) + 1
    if group.stop_at is not None and step > group.stop_at:
        group.finish(group.stop_at, Ending.STOPPED)
        return []
    if group.held_at is not None and step > group.held_at:
        return []
    return group.train(step)


def dies_at(step: int, rank: int = 1, **how: Any) -> Behaviour:
    def behaviour(group: FakeGroup, i: int) -> list[Record]:
        if i < step:
            return group.train(i)
        if rank not in group.exits:
            group.die(rank, step=i, **how)
        return []
    return behaviour


def make_driver(behaviours: Iterable[Behaviour], *, hosts: int = 2, placeable: int | None = None,
                min_hosts: int | None = None, max_hosts: int | None = None, listeners: Sequence[Listener] = (),
                fault: FaultConfig | None = None, watchdog: WatchdogConfig | None = None,
                committed: Callable[[], int | None] | None = None, injections: Sequence[Injection] = (),
                fired: Fired | None = None, clock: Clock | None = None) -> tuple[Driver, Log, Clock, FakeCluster]:
    clock = clock or Clock()
    log: Log = []
    queue = list(behaviours)
    fake_cluster = FakeCluster(placeable if placeable is not None else hosts)
    cluster: Cluster = fake_cluster

    def make_group() -> WorkerGroup:
        return FakeGroup(clock, queue.pop(0), log, fake_cluster)

    fault = fault or FaultConfig(max_restarts=2, backoff_s=1)
    policies = Policies(RestartPolicy(fault),
                        ScalingPolicy(min_hosts or hosts, max_hosts or hosts, lambda n: n % 2 == 0 or n == 1),
                        Watchdog(watchdog or WatchdogConfig()))
    driver = Driver(
        cluster=cluster, make_group=make_group, policies=policies, committed_step=committed or (lambda: None),
        faults=FaultPlan(injections, fired or (lambda attempt: [])), listeners=listeners,
        clock=clock, sleep=clock.sleep,
    )
    return driver, log, clock, fake_cluster
