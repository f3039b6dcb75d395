"""When a host saves, and to which tier: the save schedule and the choice of its cadence from
measured cost, written once as pure values (no Ray, JAX or clock), so that the host context asks
them and the tests drive them with made-up measurements.

The cadence rule (`choose`): a tier saves as often as keeps its measured cost at or below
`BLOCKING_SHARE` (1 %) of step time: every step when a save costs less than a hundredth of a step,
every k steps otherwise. A save's cost is its blocking time; a memory save's also what the step
after it took beyond a normal step (its hand-off and replica run beside that step). Durable saves
are also never more than `max_age_s` apart, which bounds what a SIGKILL of the driver (whose keepers
hold the memory tier) can cost. A number the user gave wins over the rule.
"""

from __future__ import annotations

import dataclasses
import math

BLOCKING_SHARE = 0.01
"""The share of step time a tier's saves may block the loop."""
RECHOOSE_FACTOR = 2.0
"""The cadence is chosen again when the step time moved by more than this factor either way."""
AGE_OVERRUN = 1.1
"""Durable saves drifted apart by slower steps are chosen again once they would be this factor past
the age bound: a bound met to the step would be chosen again at almost every agreement of a job whose
steps slow down gradually."""


@dataclasses.dataclass(frozen=True)
class Due:
    """The tiers a step saves to (both False: no save)."""

    memory: bool
    durable: bool

    @property
    def any(self) -> bool:
        return self.memory or self.durable


@dataclasses.dataclass(frozen=True)
class SaveSchedule:
    """Which tier saves at a step. `memory_every` None: no memory tier, every save is durable.

    A tier without an anchor saves at the multiples of its interval (a number the user gave: saves at
    10, 20, ...). A chosen cadence counts from the tier's previous save (its anchor): a tier saves
    once its interval has passed since then, so that a new interval, or a save at an agreed stop,
    starts afresh, and a shorter interval chosen, or an anchor older than the interval (the durable
    tier's newest step, behind a memory step restored), saves at once: the durable age bound holds
    across a change of cadence and a restart."""

    memory_every: int | None
    durable_every: int
    memory_anchor: int | None = None
    durable_anchor: int | None = None
    measure_at: tuple[int, ...] = ()
    """Saves at these steps whatever the intervals (memory with the tier, else durable), to measure them."""

    def due(self, step: int, final: bool = False) -> Due:
        """`final`: the run's last step or an agreed stop, which the durable tier always saves."""
        first = step in self.measure_at
        memory = self.memory_every is not None and (first or _on(step, self.memory_every, self.memory_anchor))
        durable = final or (first and self.memory_every is None) or _on(step, self.durable_every,
                                                                          self.durable_anchor)
        return Due(memory, durable)

    def after(self, step: int, saved: Due) -> SaveSchedule:
        """The schedule once `step` saved to the tiers in `saved`: anchored intervals start again."""
        return dataclasses.replace(
            self, memory_anchor=step if saved.memory and self.memory_anchor is not None else self.memory_anchor,
            durable_anchor=step if saved.durable and self.durable_anchor is not None else self.durable_anchor)


def _on(step: int, every: int, anchor: int | None) -> bool:
    if anchor is None:
        return step % every == 0
    return step - anchor >= every


Floor = tuple[int, int]
"""Per tier (memory, durable): the longest interval its saves were found to block over their share
at (0: none)."""


@dataclasses.dataclass(frozen=True)
class Measured:
    """What a host measured: its steps' own time (median) and each tier's blocking time per save
    (None: no save of that tier measured yet), and how much longer the step after a memory save took
    than a normal step (median; 0 until both were measured)."""

    step_time_s: float
    memory_blocking_s: float | None = None
    durable_blocking_s: float | None = None
    memory_slowdown_s: float = 0.0

    @property
    def memory_cost_s(self) -> float | None:
        """What a memory save costs the loop: its blocking time and its slowdown of the next step."""
        return None if self.memory_blocking_s is None else self.memory_blocking_s + self.memory_slowdown_s


@dataclasses.dataclass(frozen=True)
class Cadence:
    """A chosen cadence: every how many steps each tier saves, and why."""

    memory_every: int | None
    """None: no memory tier."""
    durable_every: int
    reason: str

    @property
    def intervals(self) -> tuple[int | None, int]:
        return self.memory_every, self.durable_every


@dataclasses.dataclass(frozen=True)
class CadenceRule:
    """The user's settings: a number fixes a tier's cadence, None leaves it to the measurements."""

    memory_tier: bool
    save_every: int | None
    persist_every: int | None
    max_age_s: float
    share: float = BLOCKING_SHARE

    @property
    def given_durable(self) -> int | None:
        return given_durable(self.memory_tier, self.save_every, self.persist_every)

    @property
    def fixed(self) -> Cadence | None:
        """The cadence when the user fixed every interval that applies (nothing to measure)."""
        if self.memory_tier and self.save_every is not None and self.persist_every is not None:
            return Cadence(self.save_every, self.persist_every, "--save-every and --persist-every given")
        if not self.memory_tier and self.given_durable is not None:
            flag = "--save-every" if self.save_every is not None else "--persist-every"
            return Cadence(None, self.given_durable, f"{flag} given")
        return None

    def choose(self, measured: Measured, floor: Floor = (0, 0)) -> Cadence:
        """The cadence for these measurements (the same values give the same cadence on any host).
        `floor`: per tier (memory, durable), an interval its saves were found to block over their share
        at; the tier saves less often than that (0: none found)."""
        step = measured.step_time_s
        reasons = []
        memory_every: int | None = None
        if self.memory_tier:
            if self.save_every is not None:
                memory_every = self.save_every
                reasons.append(f"memory every {memory_every} (given)")
            else:
                memory_every = max(self._every(measured.memory_cost_s, step), floor[0] + 1)
                reasons.append(f"memory every {memory_every}: " + self._why(
                    measured.memory_blocking_s, step, measured.memory_slowdown_s))
        given_durable = self.given_durable
        if given_durable is not None:
            durable_every = given_durable
            reasons.append(f"durable every {durable_every} (given)")
        else:
            by_age = self._by_age(step)
            blocking = measured.durable_blocking_s
            by_cost = max(self._every(blocking, step), floor[1] + 1) if blocking is not None else None
            durable_every = min(by_cost, by_age) if by_cost is not None else by_age
            if by_cost is None:
                why = f"not measured yet, so at most {self.max_age_s:g} s apart"
            elif by_cost > by_age:
                why = (f"{self._why(measured.durable_blocking_s, step)}, but at most {self.max_age_s:g} s apart "
                       f"(checkpoint.persist_max_age_s)")
            else:
                why = self._why(measured.durable_blocking_s, step)
            reasons.append(f"durable every {durable_every}: {why}")
        return Cadence(memory_every, durable_every, "; ".join(reasons))

    def rechoose(self, chosen: Measured, cadence: Cadence, now: Measured, floor: Floor = (0, 0)) -> str | None:
        """Why a cadence chosen from `chosen` no longer fits the measurements `now` (None: it fits):
        the step time moved by more than `RECHOOSE_FACTOR`, the durable saves drifted `AGE_OVERRUN` past
        the age bound (steps slower by less than that factor), a chosen tier's saves block more than
        that factor over their share (a save's blocking includes its wait for the previous hand-off,
        which one copy alone did not show), Orbax's first save has been measured since, or a tier's
        saves now cost so little that it could save `RECHOOSE_FACTOR` times as often (the first
        measured saves also paid for fresh memory pages) and still stay within its share, above the
        `floor` it was once found over its share at (so that a cadence never see-saws)."""
        if moved(chosen.step_time_s, now.step_time_s):
            return f"the step time moved from {chosen.step_time_s * 1e3:.1f} ms to {now.step_time_s * 1e3:.1f} ms"
        given_durable = self.given_durable
        if given_durable is None and chosen.durable_blocking_s is None and now.durable_blocking_s is not None:
            return "Orbax's first save was measured"
        if (given_durable is None and cadence.durable_every > 1
                and cadence.durable_every * now.step_time_s > self.max_age_s * AGE_OVERRUN):
            return (f"durable saves every {cadence.durable_every} steps of {now.step_time_s * 1e3:.1f} ms are more "
                    f"than {self.max_age_s:g} s apart (checkpoint.persist_max_age_s)")
        tiers = (("memory", cadence.memory_every, now.memory_cost_s, self.save_every),
                 ("durable", cadence.durable_every, now.durable_blocking_s, given_durable))
        for (name, every, cost, _), over in zip(tiers, self.over_share(cadence, now), strict=True):
            if over:
                return f"{name} saves cost {(cost or 0.0) * 1e3:.1f} ms every {every} steps, over their share"
        proposed = self.choose(now, floor)
        for (name, every, cost, given), wanted in zip(tiers, proposed.intervals, strict=True):
            if given is None and every and wanted and cost is not None and RECHOOSE_FACTOR * wanted <= every:
                return (f"{name} saves cost {cost * 1e3:.1f} ms now: every {wanted} steps keeps them within "
                        f"their share, not only every {every}")
        return None

    def over_share(self, cadence: Cadence, now: Measured) -> Floor:
        """Per tier, the chosen interval if its saves now cost more than `RECHOOSE_FACTOR` times
        their share at it (0: within it, given by the user, not measured, or durable saves at the
        age bound already)."""
        given_durable = self.given_durable
        tiers = ((cadence.memory_every, now.memory_cost_s, self.save_every),
                 (cadence.durable_every, now.durable_blocking_s, given_durable))
        memory, durable = (every if given is None and every and cost is not None and
                           cost / every > RECHOOSE_FACTOR * self.share * now.step_time_s else 0
                           for every, cost, given in tiers)
        if durable and now.step_time_s > 0 and durable >= self._by_age(now.step_time_s):
            durable = 0  # the age bound holds it there: no longer interval may be chosen
        return memory, durable

    def _by_age(self, step_time_s: float) -> int:
        """The longest durable interval the age bound allows at this step time."""
        return max(1, math.floor(self.max_age_s / step_time_s)) if step_time_s > 0 else 1

    def _every(self, cost_s: float | None, step_time_s: float) -> int:
        if not cost_s or step_time_s <= 0:
            return 1
        return max(1, math.ceil(cost_s / (self.share * step_time_s) - 1e-9))

    def _why(self, blocking_s: float | None, step_time_s: float, slowdown_s: float = 0.0) -> str:
        if blocking_s is None:
            return "not measured"
        slows = f" and slows the next step by {slowdown_s * 1e3:.1f} ms" if slowdown_s > 0 else ""
        return (f"a save blocks {blocking_s * 1e3:.1f} ms{slows} against {step_time_s * 1e3:.1f} ms steps, "
                f"at most {self.share:.0%} of step time")


def given_durable(memory_tier: bool, save_every: int | None, persist_every: int | None) -> int | None:
    """The durable interval the user gave (None: chosen from the measurements). With the memory tier,
    --persist-every's; without it every save is durable: --save-every's, else --persist-every's (a
    tier the keepers could not hold turns off for an attempt, and the user's durable number holds)."""
    if memory_tier:
        return persist_every
    return save_every if save_every is not None else persist_every


def moved(decided_step_time_s: float, step_time_s: float, factor: float = RECHOOSE_FACTOR) -> bool:
    """Whether the step time moved by more than `factor` either way since the cadence was chosen."""
    if decided_step_time_s <= 0 or step_time_s <= 0:
        return decided_step_time_s != step_time_s
    ratio = step_time_s / decided_step_time_s
    return ratio > factor or ratio < 1 / factor
