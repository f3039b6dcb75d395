"""The driver's Persisting state, decided and judged: whether a job that gives up, or stops without a
save at one step, has a memory step to write durably first, on how many hosts, and what came of it
(`MemoryPersisted`). Pure functions of what the driver hands them; the driver starts, polls and tears
down the hosts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxlaunch.launcher.control.states import Failed, Persisting, Stopped

from jaxlaunch.contract.events import MemoryFallback, MemoryPersisted
from jaxlaunch.contract.protocol import GroupPoll, WorkerGroup

PERSIST_TIMEOUT_S = 900.0
"""How long the hosts get to start, restore the step and write it, unless the job says (its startup
and save timeouts together, `runner`)."""


def _nothing() -> None:
    pass


@dataclasses.dataclass(frozen=True)
class MemoryPersist:
    """What the driver needs to write the memory tier's newest step durably before a job fails or stops."""

    newest: Callable[[], tuple[int, int] | None]
    """The memory tier's newest committed step and how many hosts saved it; None when none is held."""
    make_group: Callable[[], WorkerGroup]
    """A group whose hosts run the persist program."""
    step_bytes: Callable[[int], int | None]
    """The bytes of a durable step in the run directory."""
    before: Callable[[], None] = _nothing
    """Called once there is a step to write, before the hosts are counted (the job's warm standby
    gives up its room to them)."""
    timeout_s: float = PERSIST_TIMEOUT_S
    fits: Callable[[int], bool] = lambda num_hosts: True
    """Whether the job's mesh can be built on a host count (the persist runs no user code: only the
    mesh counts, not the entry's own check)."""


def plan(persist: MemoryPersist, outcome: Failed | Stopped, attempt: int, durable: int | None,
         placeable: Callable[[], int], now: float, stop_asked: bool = False) -> Persisting | Failed | Stopped:
    """Persisting when memory holds a step newer than the durable tier's, else the job ends at once.
    `stop_asked`: a stop was asked before a give-up (`Persisting.stop_asked`)."""
    newest = persist.newest()
    if newest is None or (durable is not None and newest[0] <= durable):
        return outcome
    step, saved_hosts = newest
    persist.before()
    room = min(saved_hosts, placeable())
    num_hosts = next((n for n in range(room, 0, -1) if persist.fits(n)), 0)
    if num_hosts < 1:
        why = "the cluster has no room for a host" if room < 1 else f"the mesh fits no host count up to {room}"
        return ended(outcome, MemoryPersisted(step=step, durable_step=durable, reason=why))
    return Persisting(outcome, attempt, step, durable, num_hosts, now, stop_asked=stop_asked)


def heard(poll: GroupPoll, state: Persisting) -> Persisting:
    """The state with what its hosts said in `poll`: the memory steps they passed over (rank 0's
    `memory_fallback`) and, once they returned, the step they wrote (their `final_step`)."""
    passed = tuple(e.reason for _, e in poll.events if isinstance(e, MemoryFallback) and e.reason)
    written = next((r.final_step for _, r in sorted(poll.results.items()) if r.final_step is not None), state.written)
    if not passed and written == state.written:
        return state
    return dataclasses.replace(state, passed_over=state.passed_over + passed, written=written)


def judge(poll: GroupPoll, state: Persisting, now: float, timeout_s: float) -> tuple[bool, str | None]:
    """(whether the run is over, why the step was not written if it is known to have failed)."""
    if poll.exits:
        ended_host = poll.exits[0]
        why = ended_host.error.message if ended_host.error is not None else ended_host.detail
        return True, f"host {ended_host.rank} ended: {why}"[:500]
    if len(poll.results) == state.num_hosts:
        return True, None
    if now - state.since > timeout_s:
        return True, f"not written within {timeout_s:g} s"
    return False, None


def result(state: Persisting, reason: str | None, durable_now: int | None, step_bytes: Callable[[int], int | None],
           now: float) -> MemoryPersisted:
    """What came of the run, from the durable listing: persisted when a step newer than the durable
    one before it (memory's newest, or an older one when the newest did not read back) is now the
    newest committed durable step, whatever ended the run after its commit (a signal, a host lost in
    the shutdown, the time limit)."""
    step = state.written if state.written is not None else state.step
    before = state.durable_step if state.durable_step is not None else -1
    persisted = False
    if durable_now is not None and before < durable_now <= state.step:
        step, reason, persisted = durable_now, None, True
    elif reason is None:
        # The hosts' own account first when they wrote nothing (no step newer than durable read back).
        reason = "; ".join(state.passed_over) if state.written is None and state.passed_over else \
            "; ".join([f"the hosts ended without a committed save of step {step}", *state.passed_over])
    return MemoryPersisted(step=step, durable_step=state.durable_step, num_hosts=state.num_hosts,
                           seconds=now - state.since, persisted=persisted, reason=reason[:500] if reason else None,
                           bytes=step_bytes(step) if persisted else None,
                           newest_step=state.step if step < state.step else None, passed_over=list(state.passed_over))


def ended(outcome: Failed | Stopped, persisted: MemoryPersisted) -> Failed | Stopped:
    """The job's end (failure or stop), its reason first, with what became of the memory step."""
    return dataclasses.replace(outcome, reason=f"{outcome.reason}; {persisted.message}", persisted=persisted)
