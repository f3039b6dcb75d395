"""The contract between the driver and its host processes, free of Ray and JAX.

Everything that crosses the driver-host boundary is defined here once: the settings a host receives
for one attempt (`HostSpec`), the phases it goes through (`Phase`), what a poll returns
(`HostSnapshot`), how a host ends (`HostResult`, `HostError`) and what the driver's adapter observes
when a host ends badly (`HostExit`). The Ray adapter (`jaxlaunch.launcher.cluster.worker_group`) only translates Ray's
objects into these; the driver and the policies read nothing else, so they run without Ray.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from jaxlaunch.contract.events import Event, HostEvent
from jaxlaunch.contract.flags import flag


class ConfigError(ValueError):
    """A user error in the configuration, the command line or the entry: exit code 2."""


class Phase(enum.StrEnum):
    """Where a host process is. Each phase has its own watchdog limit (`jaxlaunch.launcher.control.policy.Watchdog`)."""

    STARTING = "starting"          # the actor process exists
    INITIALIZING = "initializing"  # jax.distributed.initialize
    RESTORING = "restoring"        # ctx.restore_or_init: building or restoring the state
    COMPILING = "compiling"        # after restore_or_init, before the first reported step
    TRAINING = "training"          # reporting steps
    SAVING = "saving"              # a blocking part of a checkpoint save, or the final wait for one
    DONE = "done"

    @property
    def started_training(self) -> bool:
        return self in (Phase.TRAINING, Phase.SAVING, Phase.DONE)


# ---- settings a host receives ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The hosts' checkpoints: host memory, with Orbax behind it."""

    save_every: int | Literal["auto"] = flag("auto", metavar="N|auto")
    """Save every this many steps (to memory with the memory tier), the last step and an agreed stop;
    auto: as often as keeps a save's measured blocking at or below 1 % of step time."""
    memory_tier: bool = flag(True)
    """Hold every save in the hosts' RAM (a keeper per node, a replica on another node) and write
    Orbax only every persist_every steps. Off (--no-memory-tier): every save goes to Orbax."""
    persist_every: int | Literal["auto"] = flag("auto", metavar="N|auto")
    """With the memory tier: a durable (Orbax) save every this many steps, and at the last step and
    at an agreed stop; auto: as often as keeps Orbax's measured blocking at or below 1 % of step
    time, and at most persist_max_age_s apart. Without it every save is durable: at a numeric
    save_every, else at this."""
    persist_max_age_s: float = 600.0
    """With an auto durable cadence: the most seconds of training between two durable saves (what a
    SIGKILL of the driver, which ends the memory tier's keepers, can cost)."""
    memory_keep: int = 2
    """With the memory tier: the newest steps each keeper holds."""
    memory_budget_mb: float | None = None
    """With the memory tier: the most each node's keeper holds, in MB; None: a quarter of the RAM
    available when it starts. Never more than the RAM available beyond a tenth of the node's."""
    max_to_keep: int = 3
    """Committed checkpoints kept; older ones are deleted."""
    async_save: bool = True
    """Write checkpoints in the background while training continues."""
    compress: bool = False
    """zstd-compress the arrays' chunks. Off by default: on model weights it saved about 8 % of
    the bytes and cost about 20 % of save and restore bandwidth (see the README's Performance)."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Timeouts of `jax.distributed` in every host process. JAX's defaults (300 s start-up, 100 s
    heartbeat) would leave the survivors of a failure waiting for minutes."""

    init_timeout_s: int = 120
    """jax.distributed.initialize: how long every process waits for the others."""
    heartbeat_timeout_s: int = 10
    """Coordination-service heartbeat: a silent process is declared dead after this."""
    shutdown_timeout_s: int = 10
    """jax.distributed.shutdown: the barrier's limit."""


class InjectionKind(enum.StrEnum):
    """A failure to inject (`jaxlaunch.workers.supervision.faults` imitates each)."""

    CRASH = "crash"          # the process aborts, as on a segfault
    KILL = "kill"            # SIGKILL, as the out-of-memory killer sends it
    HANG = "hang"            # the process stops making progress
    EXCEPTION = "exception"  # the user's code raises
    PREEMPT = "preempt"      # a preemption notice (SIGTERM)
    SLOW = "slow"            # from the step on, the host's own work per step takes `factor` times as long
    BITFLIP = "bitflip"      # one bit of the host's copy of a replicated parameter flips (silent corruption)
    KILL_IN_HANDOFF = "kill_in_handoff"  # SIGKILL inside the memory tier's hand-off of that step's part


@dataclasses.dataclass(frozen=True)
class Injection:
    """A failure to inject at a reported step: `--inject KIND@step=N,host=I[,times=K]`, a slow
    host: `--inject slow@step=N,host=I,factor=F`, or a corrupted replica: `--inject bitflip@step=N,host=I`."""

    kind: InjectionKind
    step: int
    host: int = 0
    times: int = 1
    """On how many attempts it fires (an `exception` with a large count fails every attempt)."""
    factor: float = 1.0
    """For `slow`: how many times its usual busy time per step the host takes from the step on."""

    @classmethod
    def parse(cls, text: str) -> Injection:
        form = ("KIND@step=N,host=I[,times=K] with KIND one of " + ", ".join(InjectionKind)
                + " (slow also takes factor=F)")
        kind, _, rest = text.partition("@")
        if kind not in InjectionKind._value2member_map_ or not rest:
            raise ConfigError(f"--inject {text!r}: expected {form}")
        try:
            fields: dict[str, Any] = {k.strip(): float(v) if k.strip() == "factor" else int(v)
                                      for k, v in (item.split("=") for item in rest.split(","))}
            injection = cls(kind=InjectionKind(kind), **fields)
        except (ValueError, TypeError):
            raise ConfigError(f"--inject {text!r}: expected {form}") from None
        if injection.step < 1 or injection.host < 0 or injection.times < 1:
            raise ConfigError(f"--inject {text!r}: step and times must be at least 1, host at least 0")
        slow = injection.kind == InjectionKind.SLOW
        if slow != ("factor" in fields) or (slow and not 1.0 < injection.factor < math.inf):
            raise ConfigError(f"--inject {text!r}: factor=F (a finite number above 1) goes with slow, and only with it")
        return injection

    def __str__(self) -> str:
        factor = f",factor={self.factor:g}" if self.kind == InjectionKind.SLOW else ""
        times = f",times={self.times}" if self.times != 1 else ""
        return f"{self.kind}@step={self.step},host={self.host}{times}{factor}"


@dataclasses.dataclass(frozen=True)
class EntryRef:
    """The user's function, as a host process finds it."""

    module: str
    """Import name ("examples.minimal"), or the file's stem for a file entry."""
    function: str
    path: str | None = None
    """For a file entry: the file on a machine that shares the driver's filesystem."""
    package: str | None = None
    """For code shipped to a cluster: the shipped package whose folder holds the module."""
    payload: bytes | None = dataclasses.field(default=None, repr=False)
    """For a function no host can import by name (defined in `__main__`, a notebook, or nested):
    the function itself, pickled with cloudpickle (`jaxlaunch.contract.by_value`)."""
    fingerprint: str | None = None
    """For a function shipped by value: a hash of its code and of what it closes over."""

    def __str__(self) -> str:
        if self.payload is not None:
            return f"{self.function} (by value, code {self.fingerprint})"
        return f"{self.path or self.module}:{self.function}"


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """Everything one host process needs for one attempt, and nothing of the driver's own."""

    entry: EntryRef
    config: dict[str, Any]
    """The user's settings (`ctx.config`)."""
    run_dir: str
    attempt: int
    rank: int
    num_hosts: int
    coordinator_address: str
    """host:port of the jax.distributed coordinator (rank 0's node, a port fresh for this attempt)."""
    mesh: dict[str, int]
    """Mesh axes and sizes; one size may be -1 (inferred from the device count)."""
    steps: int
    schedule_steps: int
    seed: int
    platform: str
    checkpoint: CheckpointConfig
    distributed: DistributedConfig
    compilation_cache: bool = True
    compilation_cache_dir: str | None = None
    """None: the host's default for the job's user (`jaxlaunch.workers.runtime.default_cache_dir`)."""
    expect_checkpoint: bool = False
    """The run has committed steps: finding none readable is an error, never a fresh start."""
    injections: tuple[Injection, ...] = ()
    keepers: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The memory tier's keepers: node id -> the keeper's Ray actor handle. Empty: no memory tier."""
    lost_keepers: tuple[str, ...] = ()
    """Nodes whose keeper was lost with its node since the previous attempt started."""
    elastic: bool = False
    """The job may change its host count (--min-hosts below --max-hosts)."""
    persist_only: bool = False
    """A run after a failure the driver gives up on: the launcher's own program
    (`jaxlaunch.workers.checkpoints.persist`) writes the memory tier's newest step to the run directory
    with Orbax and ends; the entry is not imported and no user code runs."""
    verify_every: int = 0
    """Besides every save step, check the replicas every this many steps (0: at save steps only)."""
    newest_restorable: int | None = None
    """After a replica mismatch: the newest step whose replicas agreed. Committed steps newer than it
    are set aside, never restored (None: every committed step may be restored)."""
    entry_code: str | None = None
    """The hash of the entry's file when the run was launched (`entry.code_digest`): a host that
    imports a file edited since refuses to run it (`entry.load_entry`)."""
    entry_imports: dict[str, str] = dataclasses.field(default_factory=dict)
    """The hashes of the project's files the entry imports (`entry.imports_digest`), checked as the
    entry's own file is."""
    pending_save_wait_s: float = 30.0
    """After the entry raised: how long a save in flight may take to commit before the host reports the
    error (half the driver's hang limit, or of its save limit if shorter: the other hosts, stalled
    meanwhile, are judged by it), less the time since the host's last step."""


# ---- what comes back --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HostSnapshot:
    """A host's state at a poll, with the records and events gathered since the previous poll."""

    phase: Phase
    step: int | None
    records: tuple[dict[str, Any], ...] = ()
    """Per-step metric records (rank 0 only)."""
    events: tuple[HostEvent, ...] = ()
    """What the host wants in events.jsonl (a restore, a checkpoint fallback, its start-up timeline)."""
    busy: tuple[tuple[int, float], ...] = ()
    """(step, busy seconds) of each step the host read back since the previous poll, every host: the
    host-side work between two steps (`jaxlaunch.workers.supervision.step_clock`), for the straggler watch."""
    checksums: tuple[ReplicaChecksums, ...] = ()
    """The checksums of the host's replicated shards at each checked step since the previous poll."""
    committed: tuple[tuple[str, int], ...] = ()
    """(tier, step) of the host's saves that committed since the previous poll: "memory" once its part
    and the replica are held, "durable" (rank 0 alone) once Orbax finished the step."""


@dataclasses.dataclass(frozen=True)
class ReplicaChecksums:
    """One host's checksums at one step of its copies of shards that another device also holds:
    (array path, global index, 32-bit checksum of the copy's bytes), one per local copy (a host holds
    a replicated shard once per device). Copies of one (path, index) must agree."""

    step: int
    sums: tuple[tuple[str, str, int], ...]


class Ending(enum.StrEnum):
    COMPLETED = "completed"  # the user's function returned without an agreed stop
    STOPPED = "stopped"      # it returned after every host saved at a step agreed after a stop request


@dataclasses.dataclass(frozen=True)
class HostResult:
    """A host's function returned."""

    ending: Ending
    final_step: int | None
    process_index: int
    process_count: int
    num_devices: int
    mesh: dict[str, int]
    final_snapshot: HostSnapshot
    """What no poll has drained yet, so that no record is lost."""
    returned: Any = None
    """What the user's function returned (JSON-able values only; None otherwise)."""


class ErrorKind(enum.StrEnum):
    """How a host's Python code failed, as the host itself knows it."""

    USER = "user"              # an exception in the user's code (or the launcher's code on the host)
    COLLECTIVE = "collective"  # a JAX runtime error that a lost peer causes (gloo, coordination service)
    STORAGE = "storage"        # the run directory's filesystem: full, read-only, gone
    NO_CHECKPOINT = "no_checkpoint"  # the run has committed steps but none can be read
    TRANSIENT = "transient"    # retried and still failing: memory, storage timeouts, permissions


class HostError(Exception):
    """An exception in a host process, with what the driver needs: the host's rank, the last step it
    reported, the exception's type and text, its traceback, and its kind."""

    def __init__(self, rank: int, step: int | None, kind: ErrorKind, exception_type: str, message: str,
                 traceback_text: str, phase: Phase | None = None):
        super().__init__(f"host {rank} failed after step {step}: {exception_type}: {message}")
        self.rank, self.step, self.kind = rank, step, kind
        self.exception_type, self.message, self.traceback_text = exception_type, message, traceback_text
        self.phase = phase
        """Where the host was when it raised: before TRAINING, it had not reported a step of this attempt."""

    def __reduce__(self) -> tuple[type[HostError], tuple[Any, ...]]:
        return HostError, (self.rank, self.step, self.kind, self.exception_type, self.message, self.traceback_text,
                           self.phase)

    @property
    def summary(self) -> str:
        """`ValueError: bad batch`: the exception's own first line."""
        first = self.message.strip().splitlines()[:1] or [""]
        return f"{self.exception_type}: {first[0]}"


class ExitHow(enum.StrEnum):
    """How the driver saw a host end badly (the Ray adapter translates Ray's errors into these)."""

    RAISED = "raised"                  # the host's code raised (a HostError comes with it)
    PROCESS_DIED = "process_died"      # the process is gone: crash, SIGKILL, out of memory
    NODE_DIED = "node_died"            # Ray says the host's node died
    NODE_PREEMPTED = "node_preempted"  # Ray says the node was preempted (drained by the cloud)
    UNREACHABLE = "unreachable"        # the connection broke and no cause is known yet


class NodeLiveness(enum.StrEnum):
    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWN = "unknown"  # neither confirmed alive nor declared dead yet


@dataclasses.dataclass(frozen=True)
class HostExit:
    """One host's bad ending, as observed; `jaxlaunch.launcher.control.policy.classify` makes a Diagnosis of it."""

    rank: int
    how: ExitHow
    at: float
    """Driver clock when it was observed."""
    step: int | None
    """The last step the host reported."""
    detail: str = ""
    """Ray's own words, for the message."""
    error: HostError | None = None
    node: NodeLiveness = NodeLiveness.UNKNOWN
    """The host's node at the time, as Ray (or a probe of its raylet) reports it."""
    since: float | None = None
    """When the host was last heard from, for an unreachable one."""


# ---- the driver's view of a group ---------------------------------------------------------------------

@dataclasses.dataclass
class HostStatus:
    """The driver's running view of one host, updated by every poll."""

    rank: int
    phase: Phase = Phase.STARTING
    step: int | None = None
    last_heard: float = 0.0
    """Driver clock at the last answer to a poll."""
    last_progress: float = 0.0
    """Driver clock at which `step` or `phase` last changed."""
    committed: dict[str, int] = dataclasses.field(default_factory=dict)
    """The newest step of each tier whose save this host reported committed in this attempt."""
    first_reported: int | None = None
    """The first step the driver heard this host report training in this attempt (a poll may come
    a few steps late: it is that step or a later one)."""

    def heard(self, step: int | None, phase: Phase, now: float) -> None:
        """A poll's answer: where the host is."""
        if (step, phase) != (self.step, self.phase):
            self.step, self.phase, self.last_progress = step, phase, now
        if self.first_reported is None and phase.started_training and step is not None:
            self.first_reported = step

    @property
    def past_first_step(self) -> bool:
        """It reported a step after its first: that first step's result was read (a host reads a
        step's result before it reports the next), so its execution, the end of a start-up, is over."""
        return self.step is not None and self.first_reported is not None and self.step > self.first_reported

    def heard_committed(self, saves: tuple[tuple[str, int], ...]) -> None:
        for tier, step in saves:
            self.committed[tier] = max(step, self.committed.get(tier, step))


@dataclasses.dataclass
class GroupPoll:
    hosts: list[HostStatus]
    records: list[dict[str, Any]]
    events: list[tuple[int, HostEvent]]
    """(rank, event), already filtered: group-wide events from rank 0 only."""
    results: dict[int, HostResult]
    exits: list[HostExit]
    busy: dict[int, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)
    """Each host's (step, busy seconds) since the previous poll, by rank."""
    notices: list[Event] = dataclasses.field(default_factory=list)
    """What the worker group itself found (a keeper restarted), for the records."""
    checksums: dict[int, list[ReplicaChecksums]] = dataclasses.field(default_factory=dict)
    """Each host's replica checksums since the previous poll, by rank."""

    @property
    def finished(self) -> bool:
        return len(self.results) == len(self.hosts)

    def committed(self, tier: str) -> int | None:
        """The newest step the hosts reported committed in `tier` this attempt: a memory step once
        every host's part is held, a durable one once rank 0 finished it."""
        steps = [h.committed.get(tier) for h in self.hosts]
        if tier == "memory":
            return None if not steps or None in steps else min(s for s in steps if s is not None)
        return max((s for s in steps if s is not None), default=None)


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """Where a host process runs."""

    node_id: str
    """Ray's id of the node."""
    ip: str
    pid: int


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    coordinator: str
    nodes: list[str]
    pids: list[int]
    on_standby: bool = False
    """Whether the warm standby's spare processes took this group over (placed and started before;
    their imports may still have been under way)."""


@dataclasses.dataclass(frozen=True)
class StopAnswer:
    """A host's answer to the driver's proposed stop step."""

    accepted: bool
    """The host has not passed the step: it will wait there until the driver confirms or moves it."""
    step: int | None
    """The last step the host checked for a stop (None: none yet)."""


class PlacementError(RuntimeError):
    """The cluster could not place the hosts asked for in time."""


class WorkerGroup(Protocol):
    """One attempt's hosts. `jaxlaunch.launcher.cluster.worker_group.RayWorkerGroup` on Ray; a fake in unit tests."""

    def start(self, num_hosts: int, attempt: int, injections: tuple[Injection, ...] = ()) -> GroupInfo: ...
    def poll(self) -> GroupPoll: ...
    def propose_stop(self, step: int) -> dict[int, StopAnswer]: ...
    def confirm_stop(self, step: int, ranks: list[int]) -> list[int]: ...
    def kill(self, rank: int) -> None: ...
    def dump_stacks(self, rank: int) -> str | None: ...
    def hosts_nodes(self, lost_after_s: float) -> dict[int, NodeLiveness]: ...
    def shutdown(self) -> None: ...


class Cluster(Protocol):
    """Where groups run: capacity (without the nodes the job avoids), a description, and whether it
    is still there."""

    embedded: bool

    def placeable_hosts(self, avoiding: Sequence[str] = (), held: Sequence[str] = ()) -> int: ...
    def avoid(self, node: str) -> None: ...
    def describe(self) -> str: ...
    def alive(self) -> bool: ...
    def restart(self) -> None: ...


XLA_CPU_NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
"""The XLA option (jaxlib 0.10.2) that keeps XLA:CPU from handing operations (dots, reductions) to
YNNPACK, whose kernels build their pipelines in a program's first execution: the small preset's first
step took 0.80-0.85 s against 0.23-0.30 s without, its steady steps 0.215-0.241 s against 0.195-0.218 s
(one process, 2 cores). XLA aborts a process whose XLA_FLAGS holds an option it does not know, so
`tests/unit/test_compat.py` starts JAX with it."""


def host_env(platform: str, devices_per_host: int, ynnpack: bool = False) -> dict[str, str]:
    """Environment variables for a host process. Ray starts each host actor with them, so they are in
    place before the process imports JAX. On cpu, `ynnpack` False turns XLA's YNNPACK fusions off
    (`XLA_CPU_NO_YNN`)."""
    env = {"JAX_PLATFORMS": platform, "PYTHONUNBUFFERED": "1"}
    if platform == "cpu":
        flags = [f"--xla_force_host_platform_device_count={devices_per_host}"] + ([] if ynnpack else [XLA_CPU_NO_YNN])
        env["XLA_FLAGS"] = " ".join(flags)
    return env


HOST_PROGRAM = "jaxlaunch.workers.host:HostActor"
"""The host process's program, which the driver starts by this name as a Ray actor (the way a
process manager starts a program it never imports for its own use)."""
KEEPER_PROGRAM = "jaxlaunch.workers.checkpoints.keeper:Keeper"
"""The memory tier's keeper, one per node, which the driver starts by this name as a Ray actor."""
KEEPER_CONCURRENCY = 4
"""Calls a keeper serves at once besides hand-offs: replicas from other keepers, index, reads, pings."""
KEEPER_HOLD_GROUP = "hold"
"""The keeper's concurrency group for hosts' hand-offs (`Keeper.hold`), which wait on another node's
keeper: in a group of their own, they never take the threads that keeper's own `hold_replica` and
`address` need, so two nodes' keepers cannot wait on each other, however many hosts a node runs."""
KEEPER_HOLDS = 16
"""Hand-offs a keeper serves at once (one per host of its node at most is in flight; more queue)."""
MONITOR_GROUP = "monitor"
"""The host actor's concurrency group for polls, stop requests and stack dumps, answered while
training runs."""
