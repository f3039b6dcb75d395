"""The driver's states, each carrying its own data, and the attempt record they share.

A transition is `Driver.step()`: a function of the current state (and what the hosts report) to the
next state. Listeners (the recorder, the display, chaos) see every transition from outside."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

from jaxlaunch.launcher.control.policy import Decision, Diagnosis

from jaxlaunch.contract.events import Cause, MemoryPersisted, PlannedEnd
from jaxlaunch.contract.protocol import GroupInfo, HostStatus, Injection


@dataclasses.dataclass
class Attempt:
    """One group of hosts, from its start to its end (operational data of the driver; the records
    of `events.jsonl` are made from it)."""

    number: int
    num_hosts: int
    mesh: dict[str, int]
    started_at: float
    """Driver clock."""
    latest_committed: int | None
    group: GroupInfo | None = None
    first_step: int | None = None
    last_step: int | None = None
    restored_step: int | None = None
    time_to_first_step_s: float | None = None
    recovery_time_s: float | None = None
    failures: dict[int | None, Diagnosis] = dataclasses.field(default_factory=dict)
    """Failures seen while finding the root cause, by host."""
    cause: Cause | None = None
    results: dict[int, Any] = dataclasses.field(default_factory=dict)
    memory_committed: int | None = None
    """The newest memory-tier step every host reported committed in this attempt."""

    def progressed(self, durable: int | None) -> bool:
        """Whether the attempt committed a newer step than it started from, in either tier (`durable`:
        the run's newest durable step now): its failure is then no part of a crash loop. With the
        memory tier, durable saves may be minutes apart while memory commits go on every few steps."""
        durable_new = durable is not None and (self.latest_committed is None or durable > self.latest_committed)
        start = self.restored_step if self.restored_step is not None else (self.latest_committed or 0)
        return durable_new or (self.memory_committed is not None and self.memory_committed > start)

    def stepped(self, hosts: Sequence[HostStatus]) -> bool:
        """Every host is training and has reported a step of this attempt (so a stop saves a step
        this attempt trained)."""
        first = self.first_step
        return first is not None and all(
            h.phase.started_training and h.step is not None and h.step >= first for h in hosts)


class DrainReason(enum.StrEnum):
    RESIZE = "resize"  # capacity came back: save, then restart on more hosts
    STOP = "stop"      # the user asked to stop (SIGINT, SIGTERM): save, then exit
    REPLACE = "replace"  # a straggler's node is avoided from now on: save, then restart elsewhere

    @property
    def end(self) -> PlannedEnd:
        """How the attempt it drains ends."""
        return PlannedEnd.STOPPED if self == DrainReason.STOP else PlannedEnd(self.value)


@dataclasses.dataclass(frozen=True)
class Scheduling:
    """Choosing a host count and starting a group."""

    at_most: int | None = None
    """A cap below a host count whose placement just timed out."""
    waiting_since: float | None = None
    """Set while capacity is short, carried over from AwaitingCapacity."""
    prefer: int | None = None
    """After a resize: the host count it drained for, worth waiting a moment for (Ray frees the
    old group's resources shortly after its teardown)."""
    prefer_until: float | None = None


@dataclasses.dataclass(frozen=True)
class AwaitingCapacity:
    since: float
    placeable: int
    at_most: int | None = None


@dataclasses.dataclass(frozen=True)
class Running:
    attempt: Attempt


@dataclasses.dataclass(frozen=True)
class Draining:
    """Every host is asked to save at one common step and stop: the driver proposes a step until
    every host accepted one, confirms it, and waits for every host to return from it."""

    attempt: Attempt
    reason: DrainReason
    since: float
    """When the stop was first asked for (driver clock)."""
    target_hosts: int | None = None
    proposed: int | None = None
    """The latest step proposed."""
    confirmed: bool = False
    """Every host accepted `proposed`, and it was made final."""
    unconfirmed: tuple[int, ...] = ()
    """Hosts the confirmation has not reached yet (it is sent again)."""
    refusals: int = 0
    """Proposals some host had passed or did not answer (each widens the margin of the next)."""
    passed: int | None = None
    """The furthest step a host answered with, or the latest proposal if further."""


@dataclasses.dataclass(frozen=True)
class ResolvingFailure:
    """A host failed; listening a moment longer for the root cause (a dead host is often reported
    after the collective errors it causes on the others)."""

    attempt: Attempt
    since: float


@dataclasses.dataclass(frozen=True)
class Relaunching:
    failure: Diagnosis
    decision: Decision


@dataclasses.dataclass(frozen=True)
class Finished:
    pass


@dataclasses.dataclass(frozen=True)
class Failed:
    reason: str
    failure: Diagnosis | None = None
    persisted: MemoryPersisted | None = None
    """What became of the memory tier's newest step before the job failed (None: nothing newer)."""


@dataclasses.dataclass(frozen=True)
class Persisting:
    """The job has given up or is stopping without a save at one step (`outcome`, its reason kept):
    first, the memory tier's newest committed step, newer than the newest durable one, is written
    durably by a short run of the hosts that runs the launcher's own program, none of the user's
    (`jaxlaunch.workers.checkpoints.persist`). The keepers end with the launcher, and what they held
    beyond the last durable step would end with them."""

    outcome: Failed | Stopped
    attempt: int
    """The failed attempt's number (the hosts' logs are `persist-N-rank-R.log`)."""
    step: int
    durable_step: int | None
    """The newest durable step before it."""
    num_hosts: int
    since: float
    started: bool = False
    stop_asked: bool = False
    """A stop was asked before it began (the give-up came while the hosts drained for it): the stop
    does not end it, a second signal does (at once, as always)."""
    written: int | None = None
    """The step the hosts wrote (their results' `final_step`): `step`, or an older memory step when
    `step` did not read back."""
    passed_over: tuple[str, ...] = ()
    """Why each newer memory step the hosts passed over did not serve (rank 0's `memory_fallback`)."""


@dataclasses.dataclass(frozen=True)
class Stopped:
    signal: int
    reason: str
    persisted: MemoryPersisted | None = None
    """What became of the memory tier's newest step, when the stop saved none at one step."""


State = (Scheduling | AwaitingCapacity | Running | Draining | ResolvingFailure | Relaunching | Persisting | Finished
         | Failed | Stopped)
TERMINAL = (Finished, Failed, Stopped)


# ---- what listeners are told -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttemptStartNotice:
    attempt: Attempt
    injections: tuple[Injection, ...]
    """The faults its hosts carry (`--inject`)."""


@dataclasses.dataclass(frozen=True)
class AttemptEndNotice:
    attempt: Attempt
    cause: Cause
    """A planned end (finished, resize, stopped), or the failure's kind."""
    failure: Diagnosis | None = None
    """The failure it ended with, blamed on its root cause."""


@dataclasses.dataclass(frozen=True)
class Replacement:
    """A host the job should leave (`fault.straggler_action: replace`), as a listener found it."""

    host: int
    reason: str
    """What it did: "straggler", or "replica_mismatch" (its copy disagreed with the majority's)."""


@dataclasses.dataclass(frozen=True)
class ReplacementNotice:
    """What the driver made of a `Replacement`: the host's node is avoided from now on, or kept (no
    room elsewhere)."""

    attempt: Attempt
    replacement: Replacement
    node: str | None
    avoided: bool
    placeable_elsewhere: int
