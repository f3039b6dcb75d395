"""Deciding, separate from doing: what a host's ending means, whom to blame, whether to restart, on how
many hosts, and whether a host hangs.

Pure functions and small frozen objects over the typed contract of `jaxlaunch.contract.protocol`: no Ray, no
JAX, no clock of their own. Each is built from the config it owns and unit-tested alone; the driver
carries the decisions out."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Collection, Sequence
from typing import Literal

from jaxlaunch.contract.events import FailureKind
from jaxlaunch.contract.flags import flag
from jaxlaunch.contract.protocol import ErrorKind, ExitHow, HostExit, HostStatus, NodeLiveness, Phase


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    """Restart budgets and the elastic range."""

    max_restarts: int = flag(3)
    """Restarts after crashes, hangs and exceptions; then the job fails."""
    max_preemptions: int = flag(20)
    """Restarts after preemptions and lost nodes (a separate, larger budget)."""
    backoff_s: float = 1.0
    """Wait before a second consecutive restart, doubling after (the first restart is immediate)."""
    max_backoff_s: float = 30.0
    """Longest wait between attempts."""
    min_hosts: int | None = flag(None)
    """Fewest hosts to continue on after a failure (default: --hosts)."""
    max_hosts: int | None = flag(None)
    """Most hosts to grow to when capacity returns (default: --hosts)."""
    capacity_timeout_s: float = flag(300.0)
    """Seconds a restart waits for room for --min-hosts (placements that time out count too)."""
    grow_check_interval_s: float = 5.0
    """How often a running job checks whether capacity came back to grow on."""
    straggler_factor: float = 1.3
    """A host is a straggler when its busy time per step is at least this many times its peers' median..."""
    straggler_steps: int = 20
    """...in two thirds of the newest this many steps every host timed, and its excess over its peers
    is at least 0.1 of the step time there (what every host waits for it; a `straggler` event names it)."""
    straggler_action: Literal["warn", "replace"] = flag("warn")
    """What a straggler (and, with 3 or more replicas, a host whose replica disagreed) makes the job do:
    warn, or replace: save at one step and restart on nodes without its node, when the cluster has
    room elsewhere (else it warns)."""
    verify_every: int = flag(100)
    """Check that replicated arrays agree on every host every this many steps, besides every save
    step (0: at save steps only). One check costs 10-20 % of a step (benchmarks/replica_checks.py):
    every 100 steps keeps it well under 1 % of step time, and a corruption costs at most 100 steps."""


@dataclasses.dataclass(frozen=True)
class WatchdogConfig:
    """The driver's limits on a host's silence, by phase."""

    startup_timeout_s: float = flag(300.0)
    """Seconds a host may take to its first step: process start, jax.distributed, restore, compilation."""
    hang_timeout_s: float = flag(60.0)
    """Seconds without a reported step, while training, before a host counts as hung."""
    save_timeout_s: float = flag(600.0)
    """Seconds a blocking part of a checkpoint save (or the final wait for one) may take: a long save
    is progress, a stuck one is not."""
    poll_interval_s: float = 0.25
    """How often the driver polls the hosts."""


# ---- failures --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Diagnosis:
    kind: FailureKind
    rank: int | None
    """The host to blame (None: the whole group)."""
    message: str
    step: int | None = None
    """The last step completed before the failure."""
    detected_at: float = 0.0
    failed_at: float | None = None
    """When it happened, where known (a hang: the last progress)."""
    traceback: str | None = None
    secondary: bool = False
    """Caused by another host's failure (a collective or the coordinator lost a peer)."""
    progressed: bool = False
    """The failed attempt committed a checkpoint newer than the one it started from: it trained
    well before it failed, so it is no part of a crash loop."""
    phase: Phase | None = None
    """Where the host was when it raised (None: unknown, or it did not raise)."""
    on_every_host: bool = False
    """Every host of the attempt raised it before its first step: an entry error, which no restart fixes."""

    @property
    def before_first_step(self) -> bool:
        """The user's code raised before the host reported a step of its attempt."""
        return (self.kind == FailureKind.EXCEPTION and not self.secondary and self.phase is not None
                and not self.phase.started_training)

    @property
    def exception_type(self) -> str:
        return self.message.partition(":")[0]

    def signature(self) -> tuple:
        """Equal for the same exception at the same step: a deterministic failure."""
        last_line = (self.traceback or self.message).strip().splitlines()[-1:] or [""]
        return (self.kind, self.step, last_line[0])


_ERROR_KINDS = {
    ErrorKind.USER: FailureKind.EXCEPTION,
    ErrorKind.COLLECTIVE: FailureKind.EXCEPTION,
    ErrorKind.STORAGE: FailureKind.STORAGE,
    ErrorKind.NO_CHECKPOINT: FailureKind.NO_CHECKPOINT,
    ErrorKind.TRANSIENT: FailureKind.TRANSIENT,
}


def classify(exit: HostExit, now: float, node_wait_s: float) -> Diagnosis | None:
    """The failure a host's bad ending is, or None while that cannot be known yet.

    A process that died is a crash only if its node is alive: Ray may report the death of a lost
    node's processes before it declares the node dead, so an unknown node is waited for, up to
    `node_wait_s` (then the node counts as lost: its raylet stopped answering)."""
    def failure(kind: FailureKind, message: str, failed_at: float | None = None) -> Diagnosis:
        return Diagnosis(kind, exit.rank, message, exit.step, exit.at, failed_at)

    if exit.how == ExitHow.RAISED:
        err = exit.error
        assert err is not None, "a raised exit carries the host's error"
        step = err.step if err.step is not None else exit.step
        return Diagnosis(_ERROR_KINDS[err.kind], exit.rank, err.summary, step, exit.at, exit.at,
                       traceback=f"host {exit.rank} (rank {exit.rank}), after step {step}:\n{err.traceback_text}",
                       secondary=err.kind == ErrorKind.COLLECTIVE, phase=err.phase)
    if exit.how == ExitHow.NODE_PREEMPTED:
        return failure(FailureKind.PREEMPTED, f"the host's node was preempted: {exit.detail}")
    if exit.how == ExitHow.NODE_DIED or exit.node == NodeLiveness.DEAD:
        return failure(FailureKind.NODE_LOST, f"the host's Ray node was lost: {exit.detail}", exit.since)
    if exit.node == NodeLiveness.ALIVE:
        what = "host process died" if exit.how == ExitHow.PROCESS_DIED else "host process unreachable"
        return failure(FailureKind.CRASHED, f"{what}: {exit.detail}", exit.since)
    if now - exit.at < node_wait_s:
        return None
    return failure(FailureKind.NODE_LOST, f"the host's node stopped answering for {node_wait_s:g} s: {exit.detail}",
                   exit.since)


_KIND_PRIORITY = {
    FailureKind.STORAGE: 0, FailureKind.NO_CHECKPOINT: 0, FailureKind.HUNG: 1, FailureKind.NODE_LOST: 2,
    FailureKind.CRASHED: 3, FailureKind.PREEMPTED: 4, FailureKind.TRANSIENT: 5, FailureKind.EXCEPTION: 5,
}


def primary_failure(failures: Sequence[Diagnosis]) -> Diagnosis:
    """The root cause among failures seen together: a root cause before the collective errors it
    caused on the others; a dead, lost or silent host before an exception; then the earliest."""
    return min(failures, key=lambda f: (f.secondary, _KIND_PRIORITY[f.kind], f.detected_at))


ENTRY_ERROR_WAIT_S = 5.0
"""After an exception before the first step, how long the driver waits for the other hosts' own:
raised on every host, it is an entry error (the hosts reach the entry's code within moments of
each other, after `jax.distributed` has joined them)."""


def keep_listening(failures: Sequence[Diagnosis], num_ended: int, num_hosts: int, now: float, grace_s: float,
                   hear_out_s: float, entry_wait_s: float = ENTRY_ERROR_WAIT_S) -> bool:
    """Whether to wait for more of the group before deciding, while not every host has ended: up to
    `grace_s` while every failure so far is a collective error (the host that died, or its lost node,
    is often reported after the errors it causes), up to `entry_wait_s` while every failure is an
    exception before the first step (to learn whether every host raises it), and a brief
    `hear_out_s` otherwise (a survivor's collective library may abort its process when a peer
    vanishes, which looks like a crash of its own, reported a moment before the lost node it was
    caused by)."""
    if num_ended >= num_hosts:
        return False
    first = min(f.detected_at for f in failures)
    if all(f.secondary for f in failures):
        limit = grace_s
    elif all(f.before_first_step for f in failures):
        limit = max(entry_wait_s, hear_out_s)
    else:
        limit = hear_out_s
    return now - first < limit


def entry_error(failures: Sequence[Diagnosis], num_hosts: int) -> Diagnosis | None:
    """The failure to record when every host raised the same type of exception before its first
    step (the lowest rank's, marked `on_every_host`), else None."""
    early = {f.rank: f for f in failures if f.before_first_step and f.rank is not None}
    if len(early) < num_hosts or len({f.exception_type for f in early.values()}) != 1:
        return None
    return dataclasses.replace(early[min(early)], on_every_host=True)


def likely_fix(failure: Diagnosis) -> str:
    """One line for an entry error: what to change."""
    message = failure.message
    if failure.exception_type == "LaunchInsideHostError" or "calls jaxlaunch.launch when it is imported" in message:
        return ("call jaxlaunch.launch only on the driver: put the call under `if __name__ == \"__main__\":` in "
                "the file the hosts import")
    if failure.exception_type == "EntryChangedError":
        return ("resume with --resume --allow-change entry to train on with the edited file, or put the file back "
                "as it was and --resume")
    if failure.exception_type in ("ModuleNotFoundError", "ImportError") or "cannot import" in message:
        return ("make that module importable where the hosts run: install it, or keep it next to your entry file "
                "(on this machine the hosts see the driver's sys.path; on a cluster the entry's folder is shipped)")
    if failure.phase == Phase.RESTORING:
        return "check init(): building the state (shapes, dtypes, shardings) fails on every host"
    if failure.phase == Phase.COMPILING:
        return "check the first step (the batch's and the model's shapes): it fails on every host before any step"
    return "fix the error in your entry's code above; run it with plain python to see it at once"


def embedded_node_died(step: int | None, now: float) -> Diagnosis:
    return Diagnosis(FailureKind.NODE_LOST, None, "the embedded Ray node died", step, now)


def blame(failures: Sequence[Diagnosis], hosts: Sequence[HostStatus], now: float, silent_after_s: float,
          returned: Collection[int] = (), unsure: Collection[int] = ()) -> Diagnosis | None:
    """The failure to record: the root cause among those seen, unless a host had stopped answering
    before it (the others then failed because of its silence: it hung; or None while its node does
    not answer either (`unsure`): the node may be lost, which the group says within its wait). A
    host that returned is not silent (no one polls it), nor is one that went quiet only after the
    root cause."""
    everywhere = entry_error(failures, len(hosts))
    if everywhere is not None:
        return everywhere
    first = primary_failure(failures)
    failed = {f.rank for f in failures} | set(returned)
    at = first.failed_at if first.failed_at is not None else first.detected_at
    silent = [h for h in hosts if at - h.last_heard > silent_after_s and h.rank not in failed]
    if silent and not first.kind.is_fatal:
        host = min(silent, key=lambda h: h.last_heard)
        if host.rank in unsure:  # a powered-off or cut-off node: Ray declares it dead only after its health checks
            return None
        return Diagnosis(FailureKind.HUNG, host.rank,
                         f"stopped answering {at - host.last_heard:.1f} s before host {first.rank} failed "
                         f"({first.message})", first.step, now, host.last_heard)
    return first


# ---- restarts ----------------------------------------------------------------------------------------

class Action(enum.StrEnum):
    RESTART = "restart"
    STOP = "stop"


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    backoff_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """How many failures of each kind a job survives, and how long it waits between attempts."""

    cfg: FaultConfig

    def decide(self, failures: Sequence[Diagnosis]) -> Decision:
        """What to do after the last of `failures` (every failure of the job so far, in order)."""
        latest = failures[-1]
        if latest.kind.is_fatal:
            return Decision(Action.STOP, latest.message)
        if latest.on_every_host:  # spends no budget: no restart runs other code
            return Decision(Action.STOP, f"entry error: every host raised {latest.exception_type} before its first "
                            f"step, so it was not retried; fix: {likely_fix(latest)}")
        same_budget = [f for f in failures if f.kind.is_preemption == latest.kind.is_preemption]
        budget = self.cfg.max_preemptions if latest.kind.is_preemption else self.cfg.max_restarts
        name = "preemption" if latest.kind.is_preemption else "restart"
        if len(same_budget) > budget:
            return Decision(Action.STOP, f"{name} budget spent: {len(same_budget)} failures, budget {budget}")
        if (
            latest.kind == FailureKind.EXCEPTION
            and len(failures) >= 2
            and failures[-2].signature() == latest.signature()
        ):
            return Decision(
                Action.STOP,
                f"deterministic failure: the same exception at step {latest.step} on two attempts in a row",
            )
        consecutive = 0
        for f in reversed(failures):
            if f.kind.is_preemption != latest.kind.is_preemption:
                break
            consecutive += 1
            if f.progressed:  # the loop, if any, started after this attempt's progress
                break
        # The first restart is immediate (most failures are one-off); failures that repeat without
        # a new committed step in between back off exponentially, so a crash loop cannot hammer
        # the cluster, while a long job's occasional failures, hours apart, never wait.
        backoff = 0.0 if consecutive == 1 else min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** (consecutive - 2))
        return Decision(Action.RESTART, f"{latest.kind.value} on host {latest.rank}", backoff)


@dataclasses.dataclass(frozen=True)
class ScalingPolicy:
    """Which host count to run on: the largest the cluster can place now that the job fits."""

    min_hosts: int
    max_hosts: int
    fits: Callable[[int], bool]
    """Whether a host count divides the mesh and suits the job (e.g. its global batch)."""

    def choose(self, placeable_hosts: int, at_most: int | None = None) -> int | None:
        """The host count for the next attempt, or None to wait for capacity. `at_most` caps it
        below a count whose placement just timed out."""
        top = min(self.max_hosts, placeable_hosts, at_most if at_most is not None else math.inf)
        for n in range(int(top), self.min_hosts - 1, -1):
            if self.fits(n):
                return n
        return None

    def can_leave_node(self, num_hosts: int, room_elsewhere: int) -> bool:
        """Whether a job of `num_hosts` can restart as large on the room it has without one node (its
        own hosts on the other nodes, and what is free there)."""
        target = self.choose(room_elsewhere)
        return target is not None and target >= num_hosts


@dataclasses.dataclass(frozen=True)
class Policies:
    """The decisions the driver carries out: restarts, host counts, hangs."""

    restart: RestartPolicy
    scaling: ScalingPolicy
    watchdog: Watchdog

    @property
    def fault(self) -> FaultConfig:
        return self.restart.cfg


# ---- stops the driver starts -------------------------------------------------------------------------

def stop_step(steps: Sequence[int | None], floor: int | None, margin: int) -> int:
    """The step to propose for a stop every host saves at: `margin` steps past the furthest step
    known, whether a host reported it or said it had passed it (`floor`, which also holds the step
    proposed before)."""
    known = [s for s in (*steps, floor) if s is not None]
    return max(known, default=0) + margin


# ---- hangs -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Watchdog:
    """Finds a hung host from poll snapshots: actor liveness alone cannot see a process that is
    stopped or stuck in a collective, but its step stops moving."""

    cfg: WatchdogConfig

    def limit(self, phase: Phase) -> float:
        if phase == Phase.SAVING:
            return self.cfg.save_timeout_s
        if phase == Phase.TRAINING:
            return self.cfg.hang_timeout_s
        return self.cfg.startup_timeout_s

    def hung(self, hosts: Sequence[HostStatus], now: float, silent_after_s: float,
             returned: Collection[int] = ()) -> tuple[HostStatus, float] | None:
        """(the host to blame, the limit it broke) once any host is past its limit, or None.

        A stopped host also stalls every other host in the next collective, often a moment before
        its own limit runs out; the one to blame is the host that stopped answering polls, or else
        the one furthest behind. A host that returned (`returned`) is polled no more: never blamed."""
        hosts = [h for h in hosts if h.rank not in returned]
        late = [h for h in hosts if now - h.last_progress > self.limit(h.phase)]
        if not late:
            return None
        silent = [h for h in hosts if now - h.last_heard > silent_after_s]
        culprit = min(silent or late, key=lambda h: (h.last_heard if silent else 0.0,
                                                     h.step if h.step is not None else -1, h.last_progress))
        return culprit, self.limit(culprit.phase if culprit in late else late[0].phase)
