"""Which host makes the others wait: each host's busy time per step (its own work between reading a
step's result and dispatching the next, `jaxlaunch.workers.supervision.step_clock`) against its peers'.

In SPMD every host waits for the slowest at each collective, so the slow host's *blocked* time is
short and everyone else's is long; its *busy* time is what stands out. `find_stragglers` is the pure
rule; `StragglerWatch` is the driver's listener that feeds it the polls and records what it finds."""

from __future__ import annotations

import dataclasses
import random
import statistics
from collections.abc import Callable, Mapping

from jaxlaunch.launcher.control.driver import Driver, Listener
from jaxlaunch.launcher.control.states import (
    Attempt,
    AttemptEndNotice,
    AttemptStartNotice,
    Replacement,
    ReplacementNotice,
)

from jaxlaunch.contract import events
from jaxlaunch.contract.protocol import GroupPoll

KEPT_STEPS_FACTOR = 4
"""The watch keeps each host's busy times of this many times `straggler_steps` newest steps."""
MIN_SHARE = 2 / 3
"""A straggler stood out in at least this share of the steps looked at."""
WARMUP_STEPS = 5
"""The first steps each host times in an attempt are passed over (caches and allocators warm up)."""
BUSY_SAMPLE = 4096
"""Each host's busy times an attempt's median (`host_busy`) is taken from: all of them up to this
many steps, then a uniform sample of this many (a driver's memory stays bounded in a long run)."""
MIN_COST_SHARE = 0.1
"""A straggler also costs the job: what it makes every host wait, its busy time over its peers'
(the median over the steps), is at least this share of the step time. A host whose own work is
slower but a small part of the step (input while the device computes) costs the job little, and
rank 0, which also serves JAX's coordination service and hands the records over, is such a host:
3.8 ms of busy time a step against its peers' 1.2-1.5 ms in a 4-host run of examples/minimal.py on
2 cores, 2.5x its peers' but 0.05 of its 50 ms steps. The `slow` injection's factor 3 costs about
0.2 of the step there (0.4 on 2 hosts)."""


@dataclasses.dataclass(frozen=True)
class SlowHost:
    rank: int
    factor: float
    """The median over the steps of the host's busy time over its peers' median."""
    steps: list[int]
    busy_s: float
    peers_busy_s: float


def find_stragglers(busy: Mapping[int, Mapping[int, float]], factor: float, num_steps: int,
                    step_s: Mapping[int, float], min_share: float = MIN_SHARE,
                    min_cost: float = MIN_COST_SHARE) -> list[SlowHost]:
    """Every host whose busy time was at least `factor` times its peers' median in most (`min_share`)
    of the newest `num_steps` steps that every host timed, and whose excess over its peers was at
    least `min_cost` of the step time (the median over those steps), the one that stands out most
    first (each is told: naming only the worst hid a second slow host for the whole attempt).
    `busy`: rank -> step -> busy seconds; `step_s`: step -> its time. Most, not all: a shared
    machine's noise hits single steps of any host, and one ordinary step does not make a slow host
    fast; a burst of a few slow steps (a host starved for a moment) is not a straggler either. A step
    in which no host worked (every host read its result back at once, before a save) says nothing
    and is passed over, as is a step whose time is not known."""
    if len(busy) < 2 or num_steps < 1:
        return []
    common = sorted(set.intersection(*(set(steps) for steps in busy.values())) & set(step_s))
    window = [s for s in common if statistics.median(b[s] for b in busy.values()) > 0 and step_s[s] > 0][-num_steps:]
    if len(window) < num_steps:
        return []
    found: list[SlowHost] = []
    for rank in sorted(busy):
        peers = {s: statistics.median(busy[r][s] for r in busy if r != rank) for s in window}
        slow = [s for s in window if busy[rank][s] >= factor * peers[s]]
        if len(slow) < min_share * num_steps:
            continue
        if statistics.median((busy[rank][s] - peers[s]) / step_s[s] for s in window) < min_cost:
            continue
        ratio = statistics.median(busy[rank][s] / peers[s] if peers[s] > 0 else factor for s in window)
        found.append(SlowHost(rank, ratio, window, statistics.median(busy[rank][s] for s in window),
                              statistics.median(peers.values())))
    return sorted(found, key=lambda host: -host.factor)


def straggler_message(event: events.Straggler) -> str:
    """The line the user reads on the terminal."""
    return (f"host {event.host} (node {event.node}) is slow: its busy time per step is {event.factor:.1f}x its "
            f"peers' ({event.busy_s * 1e3:.1f} ms vs {event.peers_busy_s * 1e3:.1f} ms) in steps "
            f"{event.first_step}-{event.last_step}; every host waits for it")


REASONS = {"straggler": "it is a straggler", "replica_mismatch": "its replica disagreed with the majority's"}


def replacement_message(notice: ReplacementNotice) -> str:
    """The line the user reads on the terminal (and the `host_replacement` event's message)."""
    host, why = notice.replacement.host, REASONS.get(notice.replacement.reason, notice.replacement.reason)
    if notice.avoided:
        return (f"replacing host {host}: its node {notice.node} is avoided for the rest of the launch ({why}); the "
                f"job restarts on {notice.attempt.num_hosts} hosts elsewhere")
    return (f"host {host} is not replaced ({why}): without its node {notice.node} the cluster has room for "
            f"{notice.placeable_elsewhere} of the {notice.attempt.num_hosts} hosts; the job goes on on the same nodes")


class StragglerWatch(Listener):
    """The driver's listener that finds a straggler in each attempt's polls: it records a `straggler`
    event (once per host and attempt) and tells the user, and offers the host to the driver to leave
    (`replacement`, asked under `fault.straggler_action: replace`) and records what the driver made of
    it or of a replica's dissenter (`host_replacement`); at the attempt's end, each host's median busy
    time (`host_busy`, for the report's picture)."""

    def __init__(self, factor: float, num_steps: int, record: Callable[[events.Event], None],
                 tell: Callable[[str], None]):
        self.factor, self.num_steps, self.record, self.tell = factor, num_steps, record, tell
        self.busy: dict[int, dict[int, float]] = {}
        self.step_s: dict[int, float] = {}
        """Each step's time, from rank 0's records (every host steps together)."""
        self.all_busy: dict[int, list[float]] = {}
        """Per host, its busy times of this attempt: all, or a uniform sample of `BUSY_SAMPLE` (`timed`)."""
        self.timed: dict[int, int] = {}
        """Per host, how many steps it timed in this attempt."""
        self.sampling = random.Random(0)
        self.named: set[int] = set()
        self.found: list[events.Straggler] = []
        self.to_leave: Replacement | None = None

    def on_attempt_started(self, driver: Driver, started: AttemptStartNotice) -> None:
        self.busy, self.step_s, self.all_busy, self.timed, self.named, self.to_leave = {}, {}, {}, {}, set(), None

    def replacement(self, attempt: Attempt) -> Replacement | None:
        wanted, self.to_leave = self.to_leave, None
        return wanted

    def on_replacement(self, driver: Driver, notice: ReplacementNotice) -> None:
        """A host the job leaves (a straggler, or a replica's dissenter): recorded and told alike."""
        message = replacement_message(notice)
        self.record(events.HostReplacement(
            attempt=notice.attempt.number, host=notice.replacement.host, node=notice.node,
            reason=notice.replacement.reason, avoided=notice.avoided, placeable_elsewhere=notice.placeable_elsewhere,
            message=message))
        self.tell(message)

    def on_poll(self, driver: Driver, attempt: Attempt, poll: GroupPoll) -> None:
        for record in poll.records:
            if isinstance(record.get("step_time_s"), int | float):
                self.step_s[record["step"]] = record["step_time_s"]
        self._keep_newest(self.step_s)
        if not any(poll.busy.values()):
            return
        for rank, timed in poll.busy.items():
            steps = self.busy.setdefault(rank, {})
            for step, seconds in timed:
                self._sample(rank, seconds)
                if self.timed[rank] > WARMUP_STEPS:
                    steps[step] = seconds
            self._keep_newest(steps)
        if len(self.busy) < attempt.num_hosts:
            return
        nodes = attempt.group.nodes if attempt.group is not None else []
        for found in find_stragglers(self.busy, self.factor, self.num_steps, self.step_s):
            if found.rank in self.named:
                continue
            self.named.add(found.rank)
            event = events.Straggler(attempt=attempt.number, host=found.rank,
                                     node=nodes[found.rank] if found.rank < len(nodes) else None,
                                     factor=found.factor, first_step=found.steps[0], last_step=found.steps[-1],
                                     steps=len(found.steps), busy_s=found.busy_s, peers_busy_s=found.peers_busy_s)
            self.found.append(event)
            if self.to_leave is None:  # one host left at a time, the slowest first
                self.to_leave = Replacement(found.rank, events.EventKind.STRAGGLER.value)
            self.record(event)
            self.tell(straggler_message(event))

    def _sample(self, rank: int, seconds: float) -> None:
        """Reservoir sampling (Vitter's algorithm R): every timed step equally likely to be in the sample."""
        n = self.timed[rank] = self.timed.get(rank, 0) + 1
        sample = self.all_busy.setdefault(rank, [])
        if len(sample) < BUSY_SAMPLE:
            sample.append(seconds)
        elif (slot := self.sampling.randrange(n)) < BUSY_SAMPLE:
            sample[slot] = seconds

    def _keep_newest(self, by_step: dict[int, float]) -> None:
        """Drops all but the newest KEPT_STEPS_FACTOR * straggler_steps steps."""
        for old in sorted(by_step)[:-KEPT_STEPS_FACTOR * self.num_steps]:
            del by_step[old]

    def on_attempt_ended(self, driver: Driver, ended: AttemptEndNotice) -> None:
        if not self.all_busy:
            return
        ranks = range(ended.attempt.num_hosts)
        self.record(events.HostBusy(
            attempt=ended.attempt.number,
            busy_s=[statistics.median(self.all_busy[r]) if self.all_busy.get(r) else None for r in ranks],
            steps=max(self.timed.values())))
