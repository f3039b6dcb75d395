"""The memory tier's and the checkpoint cadence's events (`jaxlaunch.contract.events` holds the rest and
reads these too): the keepers, the give-up persist, the tier's refusals and fallbacks."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxlaunch.contract.event_base import Event, EventKind, HostEvent

__all__ = ["PersistingMemory", "MemoryPersisted", "KeeperRestarted",
           "MemoryTierOff", "CadenceChosen", "MemorySaveRefused", "MemoryFallback", "MemoryCopyPassedOver"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PersistingMemory(Event):
    """The job gave up or stops unsaved, and before it ends the driver writes memory's newest step durably:
    a short run of the hosts that runs the launcher's own program, not the entry."""

    KIND: ClassVar = EventKind.PERSISTING_MEMORY
    attempt: int
    """The newest attempt (its hosts' logs are `persist-N-rank-R.log`)."""
    step: int
    durable_step: int | None = None
    num_hosts: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPersisted(Event):
    """Before a job that gave up or stopped unsaved ended: the memory tier's newest committed step that read
    back, newer than the newest durable one, written to the run directory (or why it could not be)."""

    KIND: ClassVar = EventKind.MEMORY_PERSISTED
    step: int
    """The memory step."""
    durable_step: int | None = None
    """The newest durable step before it; None when there was none."""
    num_hosts: int | None = None
    """Hosts of the short run that restored the step and wrote it."""
    seconds: float | None = None
    persisted: bool = False
    reason: str | None = None
    """Why it was not persisted; None when it was."""
    bytes: int | None = None
    """The durable step's size in the run directory, once written."""
    newest_step: int | None = None
    """Memory's newest committed step when the driver planned the persist, when the hosts wrote the older
    `step` instead (why: `passed_over`)."""
    passed_over: list[str] = dataclasses.field(default_factory=list)
    """Why each memory step the hosts tried before `step` did not serve (empty: they tried none)."""

    @property
    def message(self) -> str:
        if self.persisted:
            before = f"the newest durable step was {self.durable_step}" if self.durable_step is not None else \
                "there was no durable step"
            newer = "" if self.newest_step is None else f"; memory step {self.newest_step} did not read back" \
                if self.passed_over else f"; memory step {self.newest_step} was not whole on the persist's hosts"
            return (f"memory step {self.step} written to durable storage in {self.seconds:.1f} s before the "
                    f"launcher ended ({before}{newer})")
        return f"memory step {self.step} could not be written to durable storage: {self.reason}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeeperRestarted(Event):
    """A memory-tier keeper's process died while its node stayed up, and Ray started a new one there:
    it takes over the part files the earlier one held whole (they outlive it), and the tier goes on."""

    KIND: ClassVar = EventKind.KEEPER_RESTARTED
    node: str | None = None
    pid: int | None = None
    """The new keeper's process."""
    old_pid: int | None = None
    step: int | None = None
    """The newest step the hosts had reported when the driver noticed."""

    @property
    def message(self) -> str:
        return (f"the memory tier's keeper on node {(self.node or '?')[:12]} died (process {self.old_pid}); a new one "
                f"(process {self.pid}) took over the part files it left whole")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryTierOff(HostEvent):
    """The memory tier was asked for but cannot serve this attempt (a keeper cannot hold a host's part,
    or one on a node that is up did not drop the steps after the restored one): every save is durable."""

    KIND: ClassVar = EventKind.MEMORY_TIER_OFF
    PER_HOST: ClassVar = True
    reason: str | None = None
    save_every: int | None = None
    """The durable tier's interval from now on (steps)."""
    kept_after: int | None = None
    """The step restored, when the cause is a keeper (its node up) that did not drop the steps after
    it: the driver has the keepers drop them before it starts another attempt or reads memory to
    persist it."""

    @property
    def message(self) -> str:
        every = f"every {self.save_every} steps" if self.save_every is not None else "at the chosen cadence"
        return f"checkpoints are durable only, {every}: {self.reason}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CadenceChosen(HostEvent):
    """Rank 0 chose how often each tier saves, from its measurements (`jaxlaunch.contract.schedule`),
    and every host follows it from `step` on: at the start of an attempt, and again when the step
    time or a save's cost moved."""

    KIND: ClassVar = EventKind.CADENCE_CHOSEN
    step: int | None = None
    step_time_s: float | None = None
    """Median of the newest steps' own time."""
    memory_blocking_s: float | None = None
    """Median blocking time of a memory save (None: not measured, or no memory tier)."""
    memory_slowdown_s: float | None = None
    """How much longer the step after a memory save took than a normal step (median; 0: not measured
    yet; None: no memory tier). A memory save's cost is its blocking time and this."""
    durable_blocking_s: float | None = None
    """Median blocking time of an Orbax save (None: not measured yet)."""
    memory_every: int | None = None
    """None: no memory tier."""
    durable_every: int | None = None
    max_age_s: float | None = None
    reason: str | None = None

    @property
    def message(self) -> str:
        memory = f"memory every {self.memory_every}, " if self.memory_every is not None else ""
        return f"checkpoint cadence from step {self.step}: {memory}durable every {self.durable_every} ({self.reason})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemorySaveRefused(HostEvent):
    """A keeper refused a memory save (its budget is spent): written once per attempt and host; the
    durable tier still saves every --persist-every steps."""

    KIND: ClassVar = EventKind.MEMORY_SAVE_REFUSED
    PER_HOST: ClassVar = True
    step: int | None = None
    reason: str | None = None

    @property
    def message(self) -> str:
        return f"a keeper refused the memory save of step {self.step}: {self.reason}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryFallback(HostEvent):
    """Memory's newest step could not serve the restore (not whole, or it did not read back): an older
    memory step, the durable tier or a fresh state served instead, as `reason` ends by saying."""

    KIND: ClassVar = EventKind.MEMORY_FALLBACK
    step: int | None = None
    """The memory step that could not serve; None when no step newer than the durable one was whole."""
    durable_step: int | None = None
    """The newest durable step at the time; None when there was none."""
    reason: str | None = None

    @property
    def message(self) -> str:
        if self.step is not None:
            return f"memory tier: {self.reason}"
        if self.durable_step is None:
            return f"not restoring from memory: {self.reason}"
        return f"restoring from the durable tier, not memory: {self.reason}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryCopyPassedOver(HostEvent):
    """A held copy of a memory part was passed over by a restore, and another copy of the part served:
    its file no longer matched the digest its keeper took when it held it (a flipped bit, a torn
    page), could not be read, or was no longer held. `reason` says which."""

    KIND: ClassVar = EventKind.MEMORY_COPY_PASSED_OVER
    PER_HOST: ClassVar = True
    step: int | None = None
    reason: str | None = None

    @property
    def message(self) -> str:
        return f"a memory copy was not read: {self.reason}; another copy of the part served"
