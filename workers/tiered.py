"""Restore from the newest complete step of either tier: host memory (`jaxlaunch.workers.memory`)
or Orbax in the run directory (`jaxlaunch.workers.checkpoint`). Memory wins when its newest committed
step is at least the newest durable one; any reason memory cannot serve is an event, and the durable
tier serves instead, from its newest readable step."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jaxlaunch.workers import extras
from jaxlaunch.workers.checkpoint import Checkpointer
from jaxlaunch.workers.memory import MemoryTier, any_host
from jaxlaunch.workers.progress import HostProgress
from jaxlaunch.workers.state import StateLayout

from jaxlaunch.contract import events, tiers


@dataclasses.dataclass
class TierRestore:
    step: int
    state: Any
    meta: dict[str, Any]
    extra: dict[str, Any]
    """This host's non-array state."""
    tier: str
    """"memory" or "durable"."""
    seconds: float
    durable_bytes: int
    """Bytes of the durable step read (0 from memory)."""
    memory_bytes: int
    """Bytes this host fetched from keepers."""
    replicas: list[int]
    """Ranks whose part came from its replica (their own node's keeper was gone)."""


def restore_newest(checkpointer: Checkpointer, memory: MemoryTier | None, layout: StateLayout,
                   progress: HostProgress) -> TierRestore | None:
    if memory is not None:
        durable_steps = checkpointer.steps_from_rank_0()
        newest_durable = durable_steps[0] if durable_steps else 0
        held = memory.held()
        step = memory.newest_step(held)
        if step is not None and step >= newest_durable:
            error = None
            try:
                got = memory.restore(step, held, layout.targets())
            except Exception as err:  # noqa: BLE001 - every host agrees below; the durable tier serves
                error = f"{type(err).__name__}: {err}"[:500]
            if not any_host(error is not None):
                return TierRestore(got.step, got.state, got.meta, got.extra, "memory", got.seconds, 0,
                                got.bytes_fetched, [s.rank for s in got.sources if s.role == tiers.Role.REPLICA])
            progress.event(events.MemoryFallback(
                step=step, durable_step=newest_durable or None,
                reason=f"memory step {step} did not read back: {error or 'another host could not'}"))
        else:
            why = _why_not_whole(held, newest_durable, memory.lost)
            if why is not None:
                progress.event(events.MemoryFallback(step=None, durable_step=newest_durable or None, reason=why))
    restored = checkpointer.restore_latest(layout.targets(), check_structure=layout.mismatch)
    if restored is None:
        return None
    for aside in restored.set_aside:
        progress.event(events.CheckpointFallback(**aside))
    mine = extras.of_rank(restored.meta.get("extra"), jax.process_index())
    read = checkpointer.store.size(str(restored.step))
    return TierRestore(restored.step, restored.state, restored.meta, mine, "durable", restored.seconds, read, 0, [])


def _why_not_whole(held: list[tiers.Held], newest_durable: int, lost: list[str]) -> str | None:
    """Why the keepers hold no step newer than the durable tier's newest, when they held one (or
    keepers were lost): None when memory simply has nothing newer."""
    newer = sorted({h.step for h in held if h.step > newest_durable}, reverse=True)
    gone = f"; the keepers of {len(lost)} node(s) did not answer (gone with their nodes)" if lost else ""
    if newer:
        step = newer[0]
        parts = [h for h in held if h.step == step]
        have = {h.rank for h in parts if h.role == tiers.Role.REPLICA or h.replicated}
        missing = sorted(set(range(max(h.num_hosts for h in parts))) - have)
        return (f"memory step {step} is not whole: no committed copy of rank(s) {missing} is held{gone}; "
                f"restoring durable step {newest_durable or 'none'}")
    if lost:
        return f"no step newer than durable step {newest_durable or 'none'} is held in memory{gone}"
    return None

