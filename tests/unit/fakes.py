"""A fake cluster and worker group for stepping the driver without Ray, and a fake clock (the unit
tests' and the pod-scale benchmark's)."""

from __future__ import annotations

import time

from jaxlaunch.launcher.driver import Driver
from jaxlaunch.launcher.fault_plan import FaultPlan
from jaxlaunch.launcher.policy import FaultConfig, Policies, RestartPolicy, ScalingPolicy, Watchdog, WatchdogConfig

from jaxlaunch.contract.events import Restored
from jaxlaunch.contract.protocol import (
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
    NodeLiveness,
    Phase,
    PlacementError,
    StopAnswer,
)

POLL_INTERVAL_S = WatchdogConfig().poll_interval_s
"""A fake poll takes the driver's default poll interval of the fake clock."""

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


class FakeCluster:
    """`capacity` hosts in all; a running group holds its own until it is shut down."""

    embedded = True

    def __init__(self, capacity):
        self.capacity = capacity
        self.held = 0
        self.is_alive = True
        self.restarts = 0
        self.groups: list[FakeGroup] = []
        """Every group started on it, in order."""

    def placeable_hosts(self):
        return max(0, self.capacity - self.held)

    def describe(self):
        return f"fake cluster with room for {self.placeable_hosts()}"

    def alive(self):
        return self.is_alive

    def restart(self):
        self.restarts += 1
        self.is_alive = True


class FakeGroup:
    """Plays one attempt: `behaviour(group, poll_index)` makes the hosts report at each poll."""

    def __init__(self, clock, behaviour, log, cluster):
        self.clock, self.behaviour, self.log, self.cluster = clock, behaviour, log, cluster
        cluster.groups.append(self)
        self.num_hosts = 0
        self.polls = 0
        self.poll_seconds = 0.0
        """CPU time spent inside poll(): the fake's own cost, for a benchmark to take out of the driver's."""
        self.stop_at = None
        """The stop step every host accepted and the driver confirmed."""
        self.held_at = None
        """The proposed stop step the hosts that accepted it wait at."""
        self.ahead = {}
        """rank -> how many steps a host's loop is past the step it last reported."""
        self.killed = None
        self.results = {}
        self.exits = {}
        self.events = []
        """(rank, event) to report at the next poll."""
        self.silent = set()
        """Hosts that stopped answering polls (a stopped process); the others answer every poll."""
        self.lost = []
        """Hosts whose node is gone, reported or not."""

    def start(self, num_hosts, attempt, injections=()):
        if getattr(self.behaviour, "placement_fails", False):
            raise PlacementError("placement timed out")
        self.num_hosts, self.attempt = num_hosts, attempt
        self.cluster.held += num_hosts
        self.hosts = [HostStatus(r, last_heard=self.clock(), last_progress=self.clock()) for r in range(num_hosts)]
        self.log.append(("start", attempt, num_hosts))
        # Node ids and pids as long as Ray's, so that the records' sizes are real ones.
        return GroupInfo("10.0.0.1:1234", [f"{rank:056x}" for rank in range(num_hosts)],
                         [100_000 + rank for rank in range(num_hosts)])

    def poll(self):
        started = time.process_time()
        self.clock.sleep(POLL_INTERVAL_S)
        self.polls += 1
        records = self.behaviour(self, self.polls) or []
        for h in self.hosts:
            if h.rank not in self.exits and h.rank not in self.silent:
                h.last_heard = self.clock()
        events, self.events = self.events, []
        poll = GroupPoll(self.hosts, records, events, dict(self.results), list(self.exits.values()))
        self.poll_seconds += time.process_time() - started
        return poll

    # -- what hosts do ---------------------------------------------------------------------------
    def train(self, step, loss=1.0):
        now = self.clock()
        for h in self.hosts:
            h.phase, h.step, h.last_heard, h.last_progress = Phase.TRAINING, step, now, now
        return [{"step": step, "time": now, "loss": loss, "step_time_s": POLL_INTERVAL_S, "attempt": self.attempt,
                 "num_hosts": self.num_hosts}]

    def restored(self, step):
        self.events.append((0, Restored(time=self.clock(), step=step, seconds=0.1)))

    def finish(self, step, ending=Ending.COMPLETED):
        snapshot = HostSnapshot(Phase.DONE, step)
        self.results = {r: HostResult(ending, step, r, self.num_hosts, 2 * self.num_hosts,
                                      {"data": self.num_hosts}, snapshot) for r in range(self.num_hosts)}

    def die(self, rank, how=ExitHow.PROCESS_DIED, node=NodeLiveness.ALIVE, step=None):
        self.exits[rank] = HostExit(rank, how, self.clock(), step, "worker died", node=node)

    def raise_(self, rank, kind=ErrorKind.USER, message="ValueError: bad batch", step=None):
        error = HostError(rank, step, kind, message.split(":")[0], message.split(": ", 1)[1], f"tb\n{message}")
        self.exits[rank] = HostExit(rank, ExitHow.RAISED, self.clock(), step, error=error)

    # -- what the driver does --------------------------------------------------------------------
    def propose_stop(self, step):
        self.log.append(("propose_stop", step))
        answers = {}
        for h in self.hosts:
            if h.rank not in self.results and h.rank not in self.exits and h.rank not in self.silent:
                at = (h.step or 0) + self.ahead.get(h.rank, 0)
                answers[h.rank] = StopAnswer(at < step, at)
        if any(a.accepted for a in answers.values()):
            self.held_at = step
        return answers

    def confirm_stop(self, step, ranks):
        self.log.append(("confirm_stop", step))
        self.stop_at = step
        return list(ranks)

    def kill(self, rank):
        self.killed = rank
        self.log.append(("kill", rank))

    def dump_stacks(self, rank):
        self.log.append(("dump_stacks", rank))
        return f'Thread 1 (idle): "MainThread"\n    train (user.py:{rank})'

    def lost_hosts(self):
        return list(self.lost)

    def shutdown(self):
        self.cluster.held -= self.num_hosts
        self.num_hosts = 0
        self.log.append(("shutdown", self.attempt))


def trains_to(total, start=0):
    def behaviour(group, i):
        step = start + i
        if step > total:
            group.finish(total)
            return []
        return group.train(step)
    return behaviour


def obeys(group, i):
    """Trains a step a poll; waits at a proposed stop step; saves and stops at the confirmed one."""
    step = (group.hosts[0].step or 0) + 1
    if group.stop_at is not None and step > group.stop_at:
        group.finish(group.stop_at, Ending.STOPPED)
        return []
    if group.held_at is not None and step > group.held_at:
        return []
    return group.train(step)


def dies_at(step, rank=1, **how):
    def behaviour(group, i):
        if i < step:
            return group.train(i)
        if rank not in group.exits:
            group.die(rank, step=i, **how)
        return []
    return behaviour


def make_driver(behaviours, *, hosts=2, placeable=None, min_hosts=None, max_hosts=None, listeners=(),
                fault=None, watchdog=None, committed=None, injections=(), fired=None, clock=None):
    clock = clock or Clock()
    log = []
    queue = list(behaviours)
    cluster = FakeCluster(placeable if placeable is not None else hosts)

    def make_group():
        return FakeGroup(clock, queue.pop(0), log, cluster)

    fault = fault or FaultConfig(max_restarts=2, backoff_s=1)
    policies = Policies(RestartPolicy(fault),
                        ScalingPolicy(min_hosts or hosts, max_hosts or hosts, lambda n: n % 2 == 0 or n == 1),
                        Watchdog(watchdog or WatchdogConfig()))
    driver = Driver(
        cluster=cluster, make_group=make_group, policies=policies, committed_step=committed or (lambda: None),
        faults=FaultPlan(injections, fired or (lambda attempt: [])), listeners=listeners,
        clock=clock, sleep=clock.sleep,
    )
    return driver, log, clock, cluster
