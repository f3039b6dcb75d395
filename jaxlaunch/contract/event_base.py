"""What every event of events.jsonl shares: its kinds, the enums its fields take, and the `Event`
base class, which registers each kind as it is defined (`jaxlaunch.contract.events` defines them and
parses a line into its kind). Plain Python: no Ray, JAX or numpy."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self


class EventKind(enum.StrEnum):
    # the driver
    LAUNCH = "launch"
    ATTEMPT_STARTED = "attempt_started"
    WAITING_FOR_CAPACITY = "waiting_for_capacity"
    GROW = "grow"
    STOP_REQUESTED = "stop_requested"
    FAILURE = "failure"
    ATTEMPT_ENDED = "attempt_ended"
    RESTARTING = "restarting"
    CHAOS_KILL = "chaos_kill"
    JOB_FAILED = "job_failed"
    PERSISTING_MEMORY = "persisting_memory"
    MEMORY_PERSISTED = "memory_persisted"
    KEEPER_RESTARTED = "keeper_restarted"
    JOB_STOPPED = "job_stopped"
    JOB_ENDED = "job_ended"
    STRAGGLER = "straggler"
    HOST_BUSY = "host_busy"
    REPLICA_MISMATCH = "replica_mismatch"
    HOST_REPLACEMENT = "host_replacement"
    INJECTION_NOT_FIRED = "injection_not_fired"
    # the driver or a host
    LOW_DISK_SPACE = "low_disk_space"
    # the hosts
    RESTORED = "restored"
    CHECKPOINT_FALLBACK = "checkpoint_fallback"
    STARTUP_TIMELINE = "startup_timeline"
    FINAL_SAVE = "final_save"
    COMPILATION_CACHE_DISABLED = "compilation_cache_disabled"
    MEMORY_TIER_OFF = "memory_tier_off"
    MEMORY_SAVE_REFUSED = "memory_save_refused"
    CADENCE_CHOSEN = "cadence_chosen"
    MEMORY_FALLBACK = "memory_fallback"
    MEMORY_COPY_PASSED_OVER = "memory_copy_passed_over"
    DATA_ORDER_CHANGED = "data_order_changed"
    DATA_ORDER_AT_RISK = "data_order_at_risk"


class FailureKind(enum.StrEnum):
    """Why an attempt failed."""

    CRASHED = "crashed"              # the host process died (crash, SIGKILL, out of memory)
    NODE_LOST = "node_lost"          # the Ray node under a host went away
    HUNG = "hung"                    # no progress within the watchdog's limit
    EXCEPTION = "exception"          # a Python exception in the training code
    TRANSIENT = "transient"          # an error that retries did not clear (memory, storage timeouts)
    PREEMPTED = "preempted"          # the host or its node was asked to stop
    STORAGE = "storage"              # the run directory cannot be written (full, read-only, gone)
    NO_CHECKPOINT = "no_checkpoint"  # the run has committed steps and none can be read
    REPLICA_MISMATCH = "replica_mismatch"  # copies of a replicated array disagree (silent corruption)

    @property
    def is_preemption(self) -> bool:
        """Preemptions and lost nodes spend their own, larger budget: the job did nothing wrong."""
        return self in (FailureKind.PREEMPTED, FailureKind.NODE_LOST)

    @property
    def is_fatal(self) -> bool:
        """Restarting cannot help: stop at once, spend no budget, keep everything."""
        return self in (FailureKind.STORAGE, FailureKind.NO_CHECKPOINT)


class PlannedEnd(enum.StrEnum):
    """How an attempt ended when nothing failed."""

    FINISHED = "finished"  # the job's last step
    RESIZE = "resize"      # every host saved and stopped, to restart on more hosts
    STOPPED = "stopped"    # every host saved and stopped, as the user asked
    REPLACE = "replace"    # every host saved and stopped, to restart without a straggler's node


Cause = FailureKind | PlannedEnd
"""How an attempt ended (`attempt_ended`'s cause)."""


def parse_cause(value: str | None) -> Cause | None:
    if value is None or isinstance(value, FailureKind | PlannedEnd):
        return value
    return PlannedEnd(value) if value in PlannedEnd._value2member_map_ else FailureKind(value)


class JobStatus(enum.StrEnum):
    """How a launch ended."""

    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"          # SIGINT or SIGTERM, after every host saved
    INTERRUPTED = "interrupted"  # the driver itself ended abruptly (a second Ctrl-C, an error of its own)
    RUNNING = "running"          # no end recorded yet: the launch runs, or died without a word


def _parsed(parse: Callable[[Any], Any], default: Any = None) -> Any:
    """A field whose JSON value (a string) `parse` turns back into its type (an enum)."""
    return dataclasses.field(default=default, metadata={"parse": parse})


KINDS: dict[EventKind, type[Event]] = {}
"""Every kind's class, registered as it is defined."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event:
    """One line of events.jsonl."""

    KIND: ClassVar[EventKind]
    PER_HOST: ClassVar[bool] = False
    """A host's event written for every host (with its rank); otherwise only rank 0's copy is written,
    since every host reports the same group-wide fact."""

    time: float = dataclasses.field(default_factory=time.time)
    """Wall-clock time (seconds since the epoch) of the writer's machine."""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    """Fields of the line that this version does not know (written by a newer one), kept as read."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "KIND" in cls.__dict__:
            KINDS[cls.KIND] = cls

    @property
    def kind(self) -> EventKind:
        return self.KIND

    @property
    def per_host(self) -> bool:
        return self.PER_HOST

    def to_dict(self) -> dict[str, Any]:
        line: dict[str, Any] = {"event": self.KIND.value, "time": self.time}
        for field in dataclasses.fields(self):
            if field.name not in ("time", "extra") and field.metadata.get("written", True):
                line[field.name] = getattr(self, field.name)
        return {**self.extra, **line}

    @classmethod
    def from_dict(cls, line: Mapping[str, Any]) -> Self:
        """The event of a line of its own kind (`parse_event` picks the kind)."""
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        values = {}
        for name, value in line.items():
            if name in known and known[name].metadata.get("written", True):
                parse = known[name].metadata.get("parse")
                values[name] = parse(value) if parse is not None else value
        extra = {k: v for k, v in line.items() if k not in known and k != "event"}
        return cls(**values, extra=extra)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostEvent(Event):
    attempt: int | None = None
    rank: int | None = None


def first_line(err: BaseException) -> str:
    """An error in one short line: Ray's own texts run to a screenful."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"
