"""Replicas that must agree: the hosts' checksums of the shards they hold in common, compared.

Each host reports, at every save step and every `fault.verify_every` steps, a checksum of each of its
copies of a shard of the state that another device also holds (`jaxlaunch.workers.supervision.replica_sums`).
Copies of one (array, global index) must be bit for bit the same; when they are not, one copy was
silently corrupted.
`find_mismatch` is the pure rule; `ReplicaWatch` is the driver's listener that feeds it the polls,
keeps the steps whose replicas agreed, and records what it finds. The driver then restarts from the
newest verified step (`restore_limit`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from jaxlaunch.launcher.control.driver import Driver, Listener
from jaxlaunch.launcher.control.policy import Diagnosis
from jaxlaunch.launcher.control.states import Attempt, AttemptEndNotice, AttemptStartNotice

from jaxlaunch.contract import events
from jaxlaunch.contract.events import FailureKind
from jaxlaunch.contract.protocol import GroupPoll, ReplicaChecksums


@dataclasses.dataclass(frozen=True)
class Mismatch:
    step: int
    array: str
    index: str
    hosts: list[int]
    """The host of every copy, by rank (a host holds one copy per device that has one)."""
    checksums: list[int]
    """Each copy's checksum, in the same order."""
    culprit: int | None
    """The one host whose copies differ from the majority's (3 or more copies, one clear majority),
    or else the one host whose own copies differ; None otherwise (2 copies on 2 hosts, no majority,
    several hosts outvoted): which copy is wrong cannot be told."""


def find_mismatch(step: int, sums: Mapping[int, ReplicaChecksums]) -> Mismatch | None:
    """The first (array, index) whose copies differ among the hosts' checksums at `step`
    (rank -> that host's checksums), or None when every copy agrees."""
    copies: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for rank in sorted(sums):
        for array, index, value in sums[rank].sums:
            copies.setdefault((array, index), []).append((rank, value))
    for (array, index), held in copies.items():
        values = [value for _, value in held]
        if len(set(values)) < 2:
            continue
        ranks = [rank for rank, _ in held]
        by_rank: dict[int, set[int]] = {}
        for rank, value in held:
            by_rank.setdefault(rank, set()).add(value)
        counts = Counter(values).most_common()
        culprit = None
        if len(held) >= 3 and counts[0][1] > len(held) / 2:
            odd = [rank for rank, seen in by_rank.items() if seen != {counts[0][0]}]
            culprit = odd[0] if len(odd) == 1 else None  # one host's copies (one or all of them) outvoted
        if culprit is None:  # a host whose own copies differ holds a wrong one, whatever the others hold
            split = [rank for rank, seen in by_rank.items() if len(seen) > 1]
            culprit = split[0] if len(split) == 1 else None
        return Mismatch(step, array, index, ranks, values, culprit)
    return None


def replica_message(event: events.ReplicaMismatch, ended: bool = False) -> str:
    """The line the user reads on the terminal (`ended`: found once its attempt had ended, which may
    not be restarted: the next restore, a restart's or a --resume's, is bounded)."""
    copies = f"{len(event.hosts)} copies on {len(set(event.hosts))} host(s)"
    who = (f"host {event.culprit} (node {event.nodes[event.hosts.index(event.culprit)]}) holds the copy that "
           f"disagrees ({copies})" if event.culprit is not None
           else f"hosts {', '.join(map(str, sorted(set(event.hosts))))} disagree and no one host's copies can be "
                f"told wrong ({copies})")
    restores = "the next restore (a restart's, or a --resume's) takes" if ended else "restoring"
    if not event.restore_from:
        restore = ("the next attempt (a restart, or a --resume) starts afresh" if ended else
                   "restarting from a fresh start") + ": no earlier step " + (
            "was verified" if event.checked else "was checked in this launch")
    elif event.checked:
        restore = (f"{restores} the newest saved step at or before step {event.restore_from}, the newest step "
                   f"whose replicas agreed")
    else:
        restore = (f"{restores} the newest saved step before step {event.step} (no earlier step was checked in "
                   f"this launch)")
    return (f"replica mismatch at step {event.step}: the copies of {event.array}{event.index} differ; {who}. "
            f"Silent data corruption: {restore}")


def unresolved_limit(past: Sequence[events.Event]) -> int | None:
    """The newest step a resume may restore after the run's last replica mismatch, if no later attempt
    restored under it and trained (the launch ended on the mismatch, or stopped before); else None."""
    mismatches = [e for e in past if isinstance(e, events.ReplicaMismatch)]
    if not mismatches:
        return None
    last = mismatches[-1]
    if any(isinstance(e, events.Restored | events.AttemptEnded) and (e.attempt or 0) > last.attempt
           and (isinstance(e, events.Restored) or e.first_step is not None) for e in past):
        return None  # a later attempt restored under the limit (or trained from a fresh start)
    return last.restore_from if last.restore_from is not None else last.step - 1


class ReplicaWatch(Listener):
    """The driver's listener that compares each checked step's checksums once every host sent them.
    `mismatch` is the first disagreement of the attempt (the driver ends the attempt on it);
    `restore_limit` the newest step whose replicas agreed before it, which the next attempt restores
    at most (newer committed steps are set aside); it holds until an attempt has restored and
    trained, and is None otherwise (every committed step may be restored)."""

    def __init__(self, record: Callable[[events.Event], None], tell: Callable[[str], None],
                 past: Sequence[events.Event] = ()):
        self.record, self.tell = record, tell
        self.pending: dict[int, dict[int, ReplicaChecksums]] = {}
        """step -> rank -> checksums, until every host's arrived."""
        self.verified: set[int] = set()
        """The steps whose replicas agreed, over the whole job."""
        self.mismatch: Mismatch | None = None
        self.restore_limit: int | None = unresolved_limit(past)
        """From the run's earlier launches (`past`, its events) too: a mismatch its launch ended on,
        before any attempt restored under its limit, still bars the unverified steps on --resume."""

    def on_attempt_started(self, driver: Driver, started: AttemptStartNotice) -> None:
        self.pending, self.mismatch = {}, None

    def on_attempt_ended(self, driver: Driver, ended: AttemptEndNotice) -> None:
        """A step whose checksums did not all arrive before the attempt ended (a host died first) is
        still compared among those that did: copies that disagree bar it from the next restore (it
        was restored unchecked, and a durable copy written from the corrupt host would have spread)."""
        if self.mismatch is None:
            for step in sorted(self.pending):
                found = find_mismatch(step, self.pending[step])
                if found is not None:
                    self._found(ended.attempt, found, ended=True)
                    break
        self.pending = {}

    def on_poll(self, driver: Driver, attempt: Attempt, poll: GroupPoll) -> None:
        if self.mismatch is None and any(h.phase.started_training for h in poll.hosts):
            self.restore_limit = None  # this attempt restored under the limit: its own saves are new
        for rank, checked in poll.checksums.items():
            for sums in checked:
                self.pending.setdefault(sums.step, {})[rank] = sums
        for step in sorted(self.pending):
            if self.mismatch is not None or len(self.pending[step]) < attempt.num_hosts:
                continue
            found = find_mismatch(step, self.pending.pop(step))
            if found is None:
                self.verified.add(step)
                continue
            self._found(attempt, found)

    def failure(self, attempt: Attempt, now: float) -> Diagnosis | None:
        found = self.mismatch
        if found is None:
            return None
        where = f"{found.array}{found.index}"
        blame = f"host {found.culprit}'s copy" if found.culprit is not None else "the copies"
        return Diagnosis(FailureKind.REPLICA_MISMATCH, found.culprit,
                         f"{blame} of {where} disagreed at step {found.step} (silent data corruption); restoring "
                         f"step {self.restore_limit or 'none'} or older", found.step, now)

    def _found(self, attempt: Attempt, found: Mismatch, ended: bool = False) -> None:
        self.mismatch = found
        # No step verified before it in this job (a resumed run): any step before the mismatch may be
        # restored, and no step at or after it.
        agreed = [s for s in self.verified if s < found.step]
        self.restore_limit = max(agreed, default=found.step - 1)
        nodes = attempt.group.nodes if attempt.group is not None else []
        event = events.ReplicaMismatch(
            attempt=attempt.number, step=found.step, array=found.array, index=found.index, hosts=found.hosts,
            nodes=[nodes[r] if r < len(nodes) else None for r in found.hosts], checksums=found.checksums,
            culprit=found.culprit, restore_from=self.restore_limit, checked=bool(agreed))
        self.record(event)
        self.tell(replica_message(event, ended))
