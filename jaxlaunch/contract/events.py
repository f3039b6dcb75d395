"""The records of a run's history: every kind of event in events.jsonl as a typed value, which the
writers construct (the driver's recorder and runner, and the hosts, whose events cross the contract)
and the readers parse (the history, the display, the driver). Plain Python: no Ray, JAX or numpy.

A line of events.jsonl is `event.to_dict()`: `{"event": KIND, "time": WALL_TIME, **fields}`, the format
of every earlier version too, so `parse_event` reads old runs: a field an old line lacks is None (or its
default), a field a newer version added is kept in `extra`, and a line of a kind this version does not
know parses to None."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from jaxlaunch.contract.event_base import (
    KINDS,
    Cause,
    Event,
    EventKind,
    FailureKind,
    HostEvent,
    JobStatus,
    PlannedEnd,
    _parsed,
    parse_cause,
)
from jaxlaunch.contract.tier_events import (
    CadenceChosen,
    KeeperRestarted,
    MemoryCopyPassedOver,
    MemoryFallback,
    MemoryPersisted,
    MemorySaveRefused,
    MemoryTierOff,
    PersistingMemory,
)

# The names that readers import from here too: the base's, and the memory tier's events (the event
# classes below are this module's own).
__all__ = ["Cause", "Event", "EventKind", "FailureKind", "HostEvent", "JobStatus", "PlannedEnd", "parse_cause",
           "parse_event", "CadenceChosen", "KeeperRestarted", "MemoryCopyPassedOver", "MemoryFallback",
           "MemoryPersisted", "MemorySaveRefused", "MemoryTierOff", "PersistingMemory"]
log = logging.getLogger(__name__)


def parse_event(line: Mapping[str, Any]) -> Event | None:
    """The typed event of a line of events.jsonl; None (with a warning) for a kind this version does
    not know or a line that lacks what its kind needs."""
    try:
        kind = EventKind(line.get("event", ""))
    except ValueError:
        log.debug("skipped an event of a kind this version does not know: %s", line.get("event"))
        return None
    try:
        return KINDS[kind].from_dict(line)
    except (TypeError, ValueError) as err:
        log.warning("skipped a %s event that does not parse (%s): %s", kind, err, line)
        return None


# ---- the driver ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class Launch(Event):
    """A launch (the first, or a --resume) began: its records follow until the next launch."""

    KIND: ClassVar = EventKind.LAUNCH
    num_hosts: int | None = None
    resume: bool | None = None
    entry: str | None = None
    steps: int | None = None
    fingerprint: Any = None
    """What the entry says its input is (a data set's version), to refuse a silent change on --resume."""
    cluster: str | None = None
    pid: int | None = None
    """The driver's process."""
    ray_supervisor: int | None = None
    """The session of the embedded Ray instance's processes (None on an existing cluster)."""
    requested_hosts: int | None = None
    entry_code: str | None = None
    """A hash of the entry's file (`entry.code_digest`), to refuse a silent edit on --resume."""
    entry_imports: dict[str, str] | None = None
    """The hashes of the project's files the entry imports (`entry.imports_digest`); None in a run
    launched before they were kept."""
    changes: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    """What this --resume changed about the run, accepted by --allow-change: name -> [before, after]."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttemptStarted(Event):
    """A group of hosts started (placed, processes running, the user's function called)."""

    KIND: ClassVar = EventKind.ATTEMPT_STARTED
    attempt: int
    num_hosts: int | None = None
    mesh: dict[str, int] | None = None
    latest_committed_step: int | None = None
    injections: list[str] = dataclasses.field(default_factory=list)
    coordinator: str | None = None
    nodes: list[str] = dataclasses.field(default_factory=list)
    pids: list[int] = dataclasses.field(default_factory=list)
    on_standby: bool = False
    """The warm standby's spares took the group over (see `GroupInfo.on_standby`)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WaitingForCapacity(Event):
    KIND: ClassVar = EventKind.WAITING_FOR_CAPACITY
    placeable_hosts: int | None = None
    min_hosts: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grow(Event):
    """Capacity came back: every host saves and stops, to restart on more hosts."""

    KIND: ClassVar = EventKind.GROW
    attempt: int
    from_hosts: int | None = None
    to_hosts: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class StopRequested(Event):
    KIND: ClassVar = EventKind.STOP_REQUESTED
    attempt: int
    signal: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Failure(Event):
    """The failure an attempt ended with, blamed on one host (or the group)."""

    KIND: ClassVar = EventKind.FAILURE
    attempt: int
    cause: FailureKind = _parsed(FailureKind)
    host: int | None = None
    step: int | None = None
    message: str | None = None
    traceback: str | None = None
    detection_latency_s: float | None = None
    """From the failure (where known) to its detection."""
    failed_at: float | None = None
    """Wall time of the failure, where known (a kill, the hung host's last progress)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttemptEnded(Event):
    KIND: ClassVar = EventKind.ATTEMPT_ENDED
    attempt: int
    num_hosts: int | None = None
    cause: Cause | None = _parsed(parse_cause)
    host: int | None = None
    """The host blamed for a failure."""
    first_step: int | None = None
    last_step: int | None = None
    restored_step: int | None = None
    detection_latency_s: float | None = None
    recovery_time_s: float | None = None
    """From the previous failure's detection to this attempt's first step."""
    time_to_first_step_s: float | None = None
    """From scheduling the attempt to its first step."""
    duration_s: float | None = None
    """From scheduling the attempt to its end."""
    process_count: int | None = None
    num_devices: int | None = None
    mesh: dict[str, int] | None = None
    returned: Any = None
    """What the user's function returned on rank 0 (plain data only)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Restarting(Event):
    KIND: ClassVar = EventKind.RESTARTING
    reason: str | None = None
    backoff_s: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChaosKill(Event):
    KIND: ClassVar = EventKind.CHAOS_KILL
    attempt: int
    host: int
    step: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobFailed(Event):
    KIND: ClassVar = EventKind.JOB_FAILED
    reason: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobStopped(Event):
    KIND: ClassVar = EventKind.JOB_STOPPED
    reason: str | None = None
    signal: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobEnded(Event):
    """The launch's last record, whatever happened."""

    KIND: ClassVar = EventKind.JOB_ENDED
    status: JobStatus = _parsed(JobStatus, JobStatus.RUNNING)
    reason: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class InjectionNotFired(Event):
    """An `--inject` fault that had not gone off (as often as asked) when the launch ended, and why."""

    KIND: ClassVar = EventKind.INJECTION_NOT_FIRED
    injection: str = ""
    reason: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Straggler(Event):
    """A host whose busy time per step (its own work between steps) stayed well above its peers' over
    `steps` steps (first_step-last_step): `factor` is the median ratio, `busy_s` and `peers_busy_s` the
    medians. In SPMD every host waits for it at each collective."""

    KIND: ClassVar = EventKind.STRAGGLER
    attempt: int
    host: int
    node: str | None = None
    factor: float = 0.0
    first_step: int | None = None
    last_step: int | None = None
    steps: int | None = None
    busy_s: float = 0.0
    peers_busy_s: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostReplacement(Event):
    """Under `fault.straggler_action: replace`, a host the job should leave (`reason`: a straggler,
    or the host whose replica disagreed with the majority's) and what became of its node: `avoided`
    for the rest of the launch (the next attempt is placed elsewhere), or kept, since the cluster has
    room for only `placeable_elsewhere` hosts without it."""

    KIND: ClassVar = EventKind.HOST_REPLACEMENT
    attempt: int
    host: int
    node: str | None = None
    reason: str = ""
    avoided: bool = False
    placeable_elsewhere: int | None = None
    message: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReplicaMismatch(Event):
    """Copies of one replicated array's shard (`array` at global `index`) differ at `step`: silent
    corruption. `hosts`/`nodes`/`checksums`: each copy's host, node and checksum (a host holds a copy
    per device that has one); `culprit`: the host of the copy that disagrees with the majority (3 or
    more copies), or the one host whose own copies differ, else None. `restore_from`: the newest step
    the next attempt restores at most: the newest step whose replicas agreed, or (`checked` False:
    none was checked before the mismatch in this launch) the step before it."""

    KIND: ClassVar = EventKind.REPLICA_MISMATCH
    attempt: int
    step: int
    array: str = ""
    index: str = ""
    hosts: list[int] = dataclasses.field(default_factory=list)
    nodes: list[str | None] = dataclasses.field(default_factory=list)
    checksums: list[int] = dataclasses.field(default_factory=list)
    culprit: int | None = None
    restore_from: int | None = None
    checked: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostBusy(Event):
    """At an attempt's end: each host's median busy time per step (by rank; None: none timed)."""

    KIND: ClassVar = EventKind.HOST_BUSY
    attempt: int
    busy_s: list[float | None] = dataclasses.field(default_factory=list)
    steps: int | None = None


# ---- the hosts (the recorder adds the attempt and the host's rank) ------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class LowDiskSpace(HostEvent):
    """Written by the driver before a resumed run, or by rank 0 once it knows the state's size."""

    KIND: ClassVar = EventKind.LOW_DISK_SPACE
    free_bytes: int | None = None
    needed_bytes: int | None = None
    checkpoints: int | None = None
    message: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Restored(HostEvent):
    KIND: ClassVar = EventKind.RESTORED
    step: int
    seconds: float | None = None
    saved_topology: dict[str, Any] | None = None
    mesh: dict[str, int] | None = None
    array: str | None = None
    """The largest array: evidence that the arrays landed in today's layout."""
    sharding: str | None = None
    shard_shape: list[int] | None = None
    tier: str | None = None
    """Which checkpoint tier served the step: "memory" (the keepers) or "durable" (Orbax); None in runs
    from before the memory tier, which restored durable steps only."""
    durable_bytes_read: int | None = None
    """Bytes of the durable step read (0 when memory served)."""
    memory_bytes_read: int | None = None
    """Bytes of held parts this host read, mapped on its node or fetched from other nodes' keepers
    (0 when the durable tier served)."""
    memory_part_bytes: int | None = None
    """Bytes of this host's part in today's layout: what a restore from memory must read at least."""
    replicas: list[int] | None = None
    """Ranks whose part came from its replica on another node (their own node's keeper was gone)."""
    records: tuple[dict[str, Any], ...] = dataclasses.field(default=(), metadata={"written": False})
    """The metric records the checkpoint carried: the driver writes those it never heard (the host
    that reported them died first) to metrics.jsonl, not here."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointFallback(HostEvent):
    """A committed step did not read back: it was set aside and an older one restored."""

    KIND: ClassVar = EventKind.CHECKPOINT_FALLBACK
    step: int
    error: str | None = None
    moved_to: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class StartupTimeline(HostEvent):
    """Where a host's start-up went: the wall time at which it entered each phase."""

    KIND: ClassVar = EventKind.STARTUP_TIMELINE
    PER_HOST: ClassVar = True
    process_created: float | None = None
    actor_init: float | None = None
    starting: float | None = None
    initializing: float | None = None
    restoring: float | None = None
    compiling: float | None = None
    training: float | None = None
    saving: float | None = None
    done: float | None = None
    first_step_done: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinalSave(HostEvent):
    """After the user's function returned: the wait for the pending saves. After it raised
    (`after_error`): the wait for a save in flight, which the host's limit may cut short (`ended`)."""

    KIND: ClassVar = EventKind.FINAL_SAVE
    seconds: float
    after_error: bool = False
    ended: bool = True
    """False: the save outlasted the host's limit after the error, and was left."""

    @property
    def per_host(self) -> bool:
        return self.after_error  # the host that raised is often not rank 0

    @property
    def message(self) -> str:
        if self.ended:
            return f"the pending saves ended in {self.seconds:.1f} s"
        return (f"a save in flight when the entry raised had not ended after {self.seconds:.1f} s and was left "
                f"(the restart reads the newest committed step)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompilationCacheDisabled(HostEvent):
    KIND: ClassVar = EventKind.COMPILATION_CACHE_DISABLED
    reason: str | None = None

    @property
    def message(self) -> str:
        return f"the compilation cache is off: {self.reason}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataOrderChanged(HostEvent):
    """A restore on another host count set per-host iterator states on pipelines over other shards:
    examples repeat or are skipped from here (`jaxlaunch.contract.data_order`)."""

    KIND: ClassVar = EventKind.DATA_ORDER_CHANGED
    keys: list[str] = dataclasses.field(default_factory=list)
    """The names in `extra` whose state was saved per host."""
    old_hosts: int | None = None
    new_hosts: int | None = None
    step: int | None = None  # the step restored

    @property
    def message(self) -> str:
        names = ", ".join(self.keys)
        return (f"the data order changed at step {self.step}: extra {names} was saved by {self.old_hosts} host(s) "
                f"and restored on {self.new_hosts}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataOrderAtRisk(HostEvent):
    """An elastic job saved per-host iterator states (written once, at its first save)."""

    KIND: ClassVar = EventKind.DATA_ORDER_AT_RISK
    keys: list[str] = dataclasses.field(default_factory=list)
    message: str | None = None
