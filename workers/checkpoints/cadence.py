"""One host's save cadence for one attempt: the schedule it follows, what it measured, and the
agreement that changes the schedule at one step on every host (a save is collective: a host that
saved at another step would wait for the others forever).

Rank 0 decides (`jaxlaunch.contract.schedule.CadenceRule`) from its own steps' times and saves'
blocking times; every host adopts the decision at the same step through one small broadcast, made
only at agreement steps every host knows: `FIRST_CHECK_AFTER_STEPS` into the attempt (after two
memory saves that measure their cost), the step after Orbax's first measured save, and then the step
rank 0 named with the previous decision (about `CHECK_EVERY_S` of training later). A cadence the user
fixed (numbers for every interval) needs no agreement at all."""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

from jaxlaunch.contract import events
from jaxlaunch.contract.protocol import CheckpointConfig
from jaxlaunch.contract.schedule import Cadence, CadenceRule, Due, Floor, Measured, SaveSchedule, moved

if TYPE_CHECKING:
    from jaxlaunch.workers.checkpoints.memory import MemoryTier

FIRST_CHECK_AFTER_STEPS = 4
"""The first agreement step, counted from the attempt's start step: the first step read back paid
for compilation and has no time, so three steps of this attempt have their time by then. The two
steps before it save, to measure: an attempt's first memory save also pays for setting up the
transfer (0.31 s against 0.027 s for later ones of the small preset's 60 MB parts), so it is not
counted."""
CHECK_EVERY_S = 30.0
"""About how much training lies between two agreement steps after the first (a broadcast each)."""
MAX_CHECK_STEPS = 100
MIN_CHECK_S = 1.0
"""At most MAX_CHECK_STEPS steps between agreements, unless they take less than MIN_CHECK_S: steps that
slow down by a large factor right after one (10 ms to 6 s) reach the next within 100 of the slow
steps, not 30 s of the fast ones apart (3,000 steps, 5 hours), so that durable saves stay near
`checkpoint.persist_max_age_s` apart. An agreement's broadcast took 0.9-1.1 ms (median; 4 ms at the
90th percentile) between 2 processes on 2 cores: one a second at most is 0.1 % of step time."""
UNCHOSEN = 2**40
"""An interval that never comes round: a tier whose cadence is not chosen yet saves only when due
for another reason (the first measuring save, the last step, an agreed stop)."""
STEP_WINDOW = 20
COST_WINDOW = 5
MIN_SLOWDOWN_SAMPLES = 3
"""Steps after a memory save, and normal steps, a slowdown is measured from."""

Broadcast = Callable[[list[int]], list[int]]
"""Rank 0's list of ints, on every host (a collective: every host calls it at the same step)."""


def given(value: int | str) -> int | None:
    return value if isinstance(value, int) else None


class SaveCadence:
    """Which tier saves at each step of one attempt on this host (`due`), measured from the host's
    own steps and saves (`step_time`, `after_save`) and agreed with every other host. `start_step`:
    the step restored; `durable_step`: the durable tier's newest step then (0: none; None: as
    `start_step`), from which a chosen durable interval counts."""

    def __init__(self, cfg: CheckpointConfig, memory_tier: bool, rank: int, start_step: int,
                 tell: Callable[[events.HostEvent], None], broadcast: Broadcast | None = None,
                 durable_step: int | None = None):
        self.rule = CadenceRule(memory_tier, given(cfg.save_every), given(cfg.persist_every), cfg.persist_max_age_s)
        self.rank, self._tell, self._broadcast = rank, tell, broadcast or broadcast_from_rank_0
        self._last_step = start_step
        self._step_times: collections.deque[float] = collections.deque(maxlen=STEP_WINDOW)
        self._costs: dict[str, collections.deque[float]] = {
            tier: collections.deque(maxlen=COST_WINDOW) for tier in ("memory", "durable")}
        self._saved: dict[int, Due] = {}
        """The newest steps that saved, and to which tiers (to tell the steps after them)."""
        self._after_memory: collections.deque[float] = collections.deque(maxlen=COST_WINDOW)
        """Times of steps right after a memory save (its hand-off and replica run beside them)."""
        self._normal: collections.deque[float] = collections.deque(maxlen=STEP_WINDOW)
        """Times of steps not within two steps after a save (a save step's own time ends before its save)."""
        self._slowdown_from = start_step
        """Steps after this one measure the slowdown (moved on when its samples are dropped)."""
        self._slowdown_measured = False
        """Rank 0's: the choice in force counted a slowdown measured since its samples were last dropped."""
        self._durable_measured = False
        self._memory_warm = False
        """This attempt's first memory save was made (its cost, a set-up's, is not counted)."""
        self.chosen: tuple[Measured, Cadence] | None = None
        """Rank 0's: the measurements the cadence in force was chosen from, and the cadence."""
        self.floor: Floor = (0, 0)
        """Rank 0's: per tier, the interval its saves were found over their share at (`CadenceRule.choose`)."""
        self._settled = False
        """Rank 0's: a choice was made from steady steps (the agreement after the first)."""
        fixed = self.rule.fixed
        if fixed is not None:
            self.schedule = SaveSchedule(fixed.memory_every, fixed.durable_every)
            self.next_check: int | None = None
            return
        rule, first = self.rule, start_step + FIRST_CHECK_AFTER_STEPS
        memory_every = (rule.save_every or UNCHOSEN) if memory_tier else None
        durable_given = rule.given_durable
        # The first saves measure the tier with the unknown cost: memory with the tier, else Orbax.
        measure = rule.save_every is None if memory_tier else durable_given is None
        self.schedule = SaveSchedule(
            memory_every, durable_given or UNCHOSEN,
            memory_anchor=None if not memory_tier or rule.save_every is not None else start_step,
            # From the durable tier's newest step, not a newer memory step restored: the age bound
            # counts from the last durable save across restarts (0: none yet).
            durable_anchor=None if durable_given is not None else
            (start_step if durable_step is None else min(durable_step, start_step)),
            measure_at=((first - 1, first) if memory_tier else (first,)) if measure else ())
        self.next_check = first

    def due(self, step: int, final: bool) -> Due:
        return self.schedule.due(step, final)

    def step_time(self, seconds: float, step: int | None = None) -> None:
        """A step's own time (`step`: which one, to tell a step after a save from a normal one)."""
        self._step_times.append(seconds)
        if step is None:
            return
        if step - 1 <= self._slowdown_from:
            return
        if step - 1 in self._saved and self._saved[step - 1].memory:
            self._after_memory.append(seconds)
        elif not any(step - d in self._saved for d in (1, 2)):
            self._normal.append(seconds)

    def slowdown(self) -> float | None:
        """How much longer a step right after a memory save took than a normal one (medians); None
        until there are `MIN_SLOWDOWN_SAMPLES` of each, which memory saves every step or every other
        step never leave room for (their cost is then their blocking, or the slowdown measured last)."""
        if len(self._after_memory) < MIN_SLOWDOWN_SAMPLES or len(self._normal) < MIN_SLOWDOWN_SAMPLES:
            return None
        return max(0.0, statistics.median(self._after_memory) - statistics.median(self._normal))

    def after_save(self, step: int, saved: Due, memory_s: float | None, durable_s: float | None,
                   final: bool = False) -> None:
        """Called by every host at every step, after the step's save (if any): records the save's
        cost and, at an agreement step, adopts rank 0's cadence (rank 0 tells a `cadence_chosen`
        event when it changed). `final`: the loop ends at this step, so nothing is agreed."""
        if step <= self._last_step:
            return  # maybe_save called again at a step: its save and agreement were made
        self._last_step = step
        self.schedule = self.schedule.after(step, saved)
        if saved.any:
            self._saved = {s: d for s, d in self._saved.items() if s > step - 3} | {step: saved}
        first_durable = False
        if saved.memory and memory_s is not None:
            if self._memory_warm:
                self._costs["memory"].append(memory_s)
            self._memory_warm = True
        if saved.durable and durable_s is not None:
            self._costs["durable"].append(durable_s)
            # Orbax's first measured save chooses the durable interval, if the rule chooses it.
            first_durable = not self._durable_measured and self.rule.given_durable is None
            self._durable_measured = True
        if final or self.next_check is None or not (step >= self.next_check or first_durable):
            return
        scheduled = step >= self.next_check
        proposal, event = self._propose(step, scheduled) if self.rank == 0 else ([0, 0, 0, 0], None)
        changed, memory_every, durable_every, next_check = self._broadcast(proposal)
        self.next_check = next_check
        if changed:
            self.schedule = dataclasses.replace(
                self.schedule, measure_at=(), durable_every=durable_every,
                memory_every=memory_every if self.schedule.memory_every is not None else None)
        if event is not None:
            self._tell(event)

    def _propose(self, step: int, scheduled: bool = True) -> tuple[list[int], events.CadenceChosen | None]:
        """Rank 0's decision: [changed, memory_every, durable_every, next agreement step]. `scheduled`
        False: an agreement for Orbax's first measured save, between the scheduled ones (which it
        leaves where they were)."""
        if not self._step_times:
            return [0, 0, 0, step + 1], None  # no step timed yet (the attempt is that short): next step
        before = self.chosen[0] if self.chosen is not None else None
        # A cost not measured since the last choice (no save of the tier, no room for a slowdown) keeps its last value.
        slowdown = _first(self.slowdown(), before.memory_slowdown_s if before is not None else None)
        now = Measured(statistics.median(self._step_times), _median(self._costs["memory"]),
                       _median(self._costs["durable"]), slowdown or 0.0)
        if before is not None:
            now = dataclasses.replace(now, memory_blocking_s=_first(now.memory_blocking_s, before.memory_blocking_s),
                                      durable_blocking_s=_first(now.durable_blocking_s, before.durable_blocking_s))
        if not scheduled and self.next_check is not None:
            next_check = self.next_check
        elif now.step_time_s > 0:
            most = max(MAX_CHECK_STEPS, math.ceil(MIN_CHECK_S / now.step_time_s))
            next_check = step + max(1, min(most, math.ceil(CHECK_EVERY_S / now.step_time_s)))
        else:
            next_check = step + 1
        if self.chosen is None:
            why: str | None = "the attempt started"
        elif not self._settled and scheduled:
            # The first choice timed 3 steps just after compiling, often slower than the steady ones
            # (0.68 s against 0.42 s in a small-preset run): the next agreement chooses from steady
            # steps whatever the factor, and the 2x rule holds from then on.
            self._settled = True
            steady = self.rule.choose(now, self.floor)
            why = None if steady.intervals == self.chosen[1].intervals else \
                f"the steps settled at {now.step_time_s * 1e3:.1f} ms (from {self.chosen[0].step_time_s * 1e3:.1f} ms)"
        else:
            why = self.rule.rechoose(*self.chosen, now, self.floor)
            if why is None and not self._slowdown_measured and self.slowdown() is not None \
                    and self.rule.save_every is None:  # too few steps after a save were timed at the last choice
                why = "the steps right after memory saves were timed"
        if why is None:
            return [0, 0, 0, next_check], None
        sped = self.chosen is not None and moved(self.chosen[0].step_time_s, now.step_time_s)
        if self.chosen is not None:
            # An interval found over its share is not chosen again (no see-saw), until the steps change.
            over = self.rule.over_share(self.chosen[1], now)
            self.floor = (0, 0) if sped else (max(self.floor[0], over[0]), max(self.floor[1], over[1]))
        cadence = self.rule.choose(now, self.floor)
        # The next choice's slowdown is not taken from steps just after compiling (those after the
        # measuring saves among them, the one after this step too) or at another speed, nor, with saves
        # every step or every other step (no normal step between them), from steps timed before.
        first = self.chosen is None or sped
        if first or (cadence.memory_every or UNCHOSEN) <= 2:
            self._after_memory.clear()
            self._normal.clear()
        if first:
            self._slowdown_from = step
        self._slowdown_measured = self.slowdown() is not None
        unchanged = self.chosen is not None and self.chosen[1].intervals == cadence.intervals
        self.chosen = (now, cadence)
        if unchanged and not why.startswith("Orbax"):
            return [0, 0, 0, next_check], None  # e.g. over its share, but the age bound holds it there
        for costs in self._costs.values():
            costs.clear()  # measured under the old cadence (a hand-off's wait depends on it)
        event = events.CadenceChosen(
            step=step, step_time_s=now.step_time_s, memory_blocking_s=now.memory_blocking_s,
            memory_slowdown_s=now.memory_slowdown_s if self.schedule.memory_every is not None else None,
            durable_blocking_s=now.durable_blocking_s, memory_every=cadence.memory_every,
            durable_every=cadence.durable_every, max_age_s=self.rule.max_age_s, reason=f"{why}: {cadence.reason}")
        return [1, cadence.memory_every or 0, cadence.durable_every, next_check], event


def _first(value: float | None, otherwise: float | None) -> float | None:
    return value if value is not None else otherwise


def _median(values: collections.deque[float]) -> float | None:
    return statistics.median(values) if values else None


def broadcast_from_rank_0(values: list[int]) -> list[int]:
    """`Broadcast` over the job's processes (JAX's multihost utilities; one process: itself)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return list(values)
    # 32 bits (JAX without x64), saturated: an interval past 2**31 - 1 steps is never, and an
    # OverflowError on rank 0 alone would leave the other hosts waiting in the collective.
    top = np.iinfo(np.int32).max
    sent = np.array([min(int(v), top) for v in values], dtype=np.int32)
    return [int(v) for v in multihost_utils.broadcast_one_to_all(sent)]


class CommitWatch:
    """The saves of this host that have committed since it last looked, for the driver's progress line
    (which then lists no checkpoints): a memory save once its hand-off returned (its part and the
    replica held), a durable one, on rank 0, once Orbax finished it (rank 0 writes the commit)."""

    def __init__(self, memory: MemoryTier | None, saving: Callable[[], bool], rank: int):
        self._memory, self._saving, self.rank = memory, saving, rank
        self._step: int | None = None
        """The newest memory save watched."""
        self._durable: int | None = None

    def started(self, step: int, saved: Due) -> None:
        if saved.memory:
            self._step = step
        if saved.durable and self.rank == 0:
            self._durable = step

    def done(self) -> list[tuple[str, int]]:
        """(tier, step) of each watched save that has committed since the previous call."""
        out = []
        if self._step is not None and self._memory is not None and not self._memory.handing_off():
            if self._step not in self._memory.refused_steps:
                out.append(("memory", self._step))
            self._step = None
        if self._durable is not None and not self._saving():
            out.append(("durable", self._durable))
            self._durable = None
        return out
