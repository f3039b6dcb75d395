"""Deciding, separate from doing: typed failures, the restart policy and the scaling policy.

Pure objects without Ray or JAX, so every decision is unit-tested on its own; the driver carries
the decisions out."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence


class FailureKind(enum.StrEnum):
    CRASHED = "crashed"          # the host process died (crash, SIGKILL, out of memory)
    NODE_LOST = "node_lost"      # the Ray node under a host went away
    HUNG = "hung"                # no step completed within the watchdog's limit
    EXCEPTION = "exception"      # Python exception in the training code
    PREEMPTED = "preempted"      # the host or the driver was asked to stop (SIGTERM)

    @property
    def is_preemption(self) -> bool:
        """Preemptions and lost nodes spend their own, larger budget: the job did nothing wrong."""
        return self in (FailureKind.PREEMPTED, FailureKind.NODE_LOST)


@dataclasses.dataclass(frozen=True)
class Failure:
    kind: FailureKind
    rank: int | None
    """The host that failed first (None: the whole group, e.g. the driver was preempted)."""
    message: str
    step: int | None = None
    """The last step the group completed before the failure."""
    detected_at: float = 0.0
    failed_at: float | None = None
    """When the failure happened, where known (a hang: the last progress)."""
    traceback: str | None = None

    def signature(self) -> tuple:
        """Equal for the same exception at the same step: a deterministic failure."""
        last_line = (self.traceback or self.message).strip().splitlines()[-1:] or [""]
        return (self.kind, self.step, last_line[0])


# Text of errors that a host raises because *another* host died or went silent under it.
SECONDARY_ERROR_MARKERS = (
    "gloo", "nccl", "connection closed", "connection reset", "broken pipe", "deadline_exceeded",
    "coordination service", "heartbeat", "unavailable", "barrier timed out", "timed out",
)
_KIND_PRIORITY = {
    FailureKind.HUNG: 0, FailureKind.NODE_LOST: 1, FailureKind.CRASHED: 2,
    FailureKind.PREEMPTED: 3, FailureKind.EXCEPTION: 4,
}


def is_secondary(failure: Failure) -> bool:
    """An exception caused by another host's failure (a collective or the coordinator lost a peer)."""
    text = f"{failure.message}\n{failure.traceback or ''}".lower()
    return failure.kind == FailureKind.EXCEPTION and any(m in text for m in SECONDARY_ERROR_MARKERS)


def primary_failure(failures: Sequence[Failure]) -> Failure:
    """The root cause among failures seen together: a dead, lost or silent host before the
    exceptions it caused on the others; then the earliest."""
    return min(failures, key=lambda f: (_KIND_PRIORITY[f.kind], is_secondary(f), f.detected_at))


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

    max_restarts: int = 3
    """Budget for crashes, hangs and exceptions."""
    max_preemptions: int = 20
    """Budget for preemptions and lost nodes."""
    backoff_s: float = 1.0
    """Wait before the second consecutive restart; doubles with each one after (the first is
    immediate)."""
    max_backoff_s: float = 30.0

    def decide(self, failures: Sequence[Failure]) -> Decision:
        """What to do after the last of `failures` (every failure of the job so far, in order)."""
        latest = failures[-1]
        same_budget = [f for f in failures if f.kind.is_preemption == latest.kind.is_preemption]
        budget = self.max_preemptions if latest.kind.is_preemption else self.max_restarts
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
        # The first restart is immediate (most failures are one-off); a failure that repeats backs
        # off exponentially, so a crash loop cannot hammer the cluster.
        backoff = 0.0 if consecutive == 1 else min(self.max_backoff_s, self.backoff_s * 2 ** (consecutive - 2))
        return Decision(Action.RESTART, f"{latest.kind.value} on host {latest.rank}", backoff)


@dataclasses.dataclass(frozen=True)
class ScalingPolicy:
    """Which host count to run on: the largest the cluster can place now that the job fits."""

    min_hosts: int
    max_hosts: int
    fits: Callable[[int], bool]
    """Whether a host count divides the mesh and the global batch."""

    def choose(self, placeable_hosts: int) -> int | None:
        """The host count for the next attempt, or None to wait for capacity."""
        for n in range(min(self.max_hosts, placeable_hosts), self.min_hosts - 1, -1):
            if self.fits(n):
                return n
        return None


@dataclasses.dataclass(frozen=True)
class Watchdog:
    """Finds a hung host from poll snapshots: actor liveness alone cannot see a process that is
    stopped or stuck in a collective, but its step stops moving."""

    startup_timeout_s: float
    """Before a host's first step: start-up, compilation and restore."""
    hang_timeout_s: float
    """Once training: the longest time without progress."""

    def hung(self, hosts: Sequence, now: float) -> tuple[int, float] | None:
        """(rank, time of its last progress) of the host to blame, or None.

        A stopped host also stalls every other host in the next collective; the one to blame is the
        host that stopped answering polls, or else the one furthest behind."""
        late = []
        for h in hosts:
            limit = self.hang_timeout_s if h.phase in ("training", "saving") else self.startup_timeout_s
            if now - h.last_progress > limit:
                late.append(h)
        if not late:
            return None
        culprit = min(late, key=lambda h: (h.last_heard, h.step if h.step is not None else -1))
        return culprit.rank, culprit.last_progress
