"""A host's save cadence (`jaxlaunch.workers.checkpoints.cadence`): every host follows rank 0's choice from the same
step, whatever each host measured, with a fake broadcast instead of JAX's."""

import math

from jaxlaunch.workers.checkpoints.cadence import FIRST_CHECK_AFTER_STEPS, MAX_CHECK_STEPS, SaveCadence

from jaxlaunch.contract.events import CadenceChosen
from jaxlaunch.contract.protocol import CheckpointConfig


class Lockstep:
    """Two hosts' broadcasts: rank 0 calls first at a step and rank 1 gets its values."""

    def __init__(self):
        self.sent: list[int] | None = None
        self.calls = 0

    def rank_0(self, values):
        assert self.sent is None, "rank 1 skipped an agreement step rank 0 reached"
        self.sent, self.calls = list(values), self.calls + 1
        return list(values)

    def rank_1(self, values):
        assert self.sent is not None, "rank 1 reached an agreement step rank 0 did not"
        sent, self.sent = self.sent, None
        return sent


def run(cfg: CheckpointConfig, steps: range, step_time, memory_cost, durable_cost, start: int = 0,
        durable_step: int | None = None):
    """Both hosts through `steps`; host 1 measures 1.5x host 0's times. Returns each host's saves and
    rank 0's events."""
    told: list[CadenceChosen] = []
    wire = Lockstep()
    hosts = [SaveCadence(cfg, True, 0, start, told.append, wire.rank_0, durable_step=durable_step),
             SaveCadence(cfg, True, 1, start, told.append, wire.rank_1, durable_step=durable_step)]
    saved: list[list[tuple[int, bool, bool]]] = [[], []]
    cost = memory_cost if callable(memory_cost) else lambda step, since: memory_cost
    last_memory = [start, start]
    for step in steps:
        for host, scale in zip(hosts, (1.0, 1.5), strict=True):
            host.step_time(step_time(step) * scale)
            due = host.due(step, final=False)
            if due.any:
                saved[host.rank].append((step, due.memory, due.durable))
            memory_s = cost(step, step - last_memory[host.rank]) * scale if due.memory else None
            if due.memory:
                last_memory[host.rank] = step
            host.after_save(step, due, memory_s, durable_cost * scale if due.durable else None)
    assert wire.sent is None, "rank 1 skipped rank 0's last agreement step"
    return saved, told, wire


def test_saves_dear_only_at_first_are_chosen_again_more_often_once_they_are_cheap():
    """The first measured memory saves write into fresh shared-memory pages, later ones reuse dropped
    parts' pages: made-up costs of 85 ms (every 11 steps at 0.78 s steps), then 17 ms. The cadence
    follows."""
    cfg = CheckpointConfig(persist_max_age_s=600.0)
    saved, told, _ = run(cfg, range(1, 400), lambda s: 0.78, lambda step, since: 0.085 if step < 40 else 0.017,
                         durable_cost=0.5)
    memory = [e.memory_every for e in told]
    assert memory[0] == 11 and memory[-1] == 3, [e.reason for e in told]
    assert "memory saves cost 17.0 ms now: every 3 steps keeps them within their share" in told[-1].reason
    assert saved[0] == saved[1]


def test_a_cadence_found_over_its_share_is_not_chosen_again_when_a_longer_one_is_cheap():
    """Every step, a save waits for the previous hand-off (30 ms per 1 s step, over its share); every
    3 steps it does not (5 ms): the cadence settles at 3 and, once every step was found over its
    share, does not see-saw back to 1 (600 steps: about 20 agreement steps)."""
    cfg = CheckpointConfig(persist_max_age_s=600.0)
    saved, told, _ = run(cfg, range(1, 600), lambda s: 1.0, lambda step, since: 0.03 if since == 1 else 0.005,
                         durable_cost=0.5)
    memory = [e.memory_every for e in told if e.memory_every]
    # The measuring saves (steps 3 and 4) ask for every 3; at 3, 5 ms asks for every step, tried once.
    assert memory == [3, 1, 3], [e.reason for e in told]
    assert "over their share" in told[-1].reason
    assert saved[0] == saved[1]


def test_every_host_saves_at_the_same_steps_and_rank_0_alone_tells_the_choice():
    saved, told, wire = run(CheckpointConfig(), range(1, 400), lambda s: 0.1, memory_cost=0.004, durable_cost=0.2)
    assert saved[0] == saved[1], "host 1 measured other times, yet saves at rank 0's steps"
    assert saved[0][:2] == [(FIRST_CHECK_AFTER_STEPS - 1, True, False), (FIRST_CHECK_AFTER_STEPS, True, False)], \
        "two memory saves early, to measure the second (the first also sets up the transfer)"
    first = told[0]
    assert (first.step, first.memory_every, first.durable_every) == (4, 4, 6000), "4 ms against 1 ms of 0.1 s"
    assert first.durable_blocking_s is None and "not measured yet" in first.reason
    assert [s for s, memory, _ in saved[0] if memory][:5] == [3, 4, 8, 12, 16]
    assert wire.calls <= 1 + 399 // MAX_CHECK_STEPS + 1, \
        "a broadcast only at agreement steps (about every 30 s of steps, at most MAX_CHECK_STEPS apart)"


def test_the_cadence_is_chosen_again_once_orbax_is_measured_and_when_the_steps_slow_down():
    cfg = CheckpointConfig(persist_max_age_s=20.0)
    saved, told, _ = run(cfg, range(1, 900), lambda s: 0.1 if s < 500 else 0.4, memory_cost=0.004, durable_cost=0.5)
    assert [(e.memory_every, e.durable_every) for e in told] == [(4, 200), (4, 200), (1, 50)]
    assert "Orbax's first save was measured" in told[1].reason
    assert 500 <= told[2].step <= 800 and "the step time moved from 100.0 ms to 400.0 ms" in told[2].reason
    durable = [s for s, _, d in saved[0] if d]
    assert all(b - a <= 200 for a, b in zip(durable, durable[1:], strict=False)), "never more than 20 s apart"
    assert saved[0] == saved[1]


def test_after_a_restore_from_memory_the_durable_age_counts_from_the_newest_durable_step():
    """Memory step 500 restored, 0.1 s steps, durable saves at most 20 s (200 steps) apart. With the
    newest durable step at 400, the next durable save is at 600, not 700 (200 steps after the step
    restored); with it at 100, at the first agreement. Counted from the step restored, a host crashing
    every 30 s would keep the durable tier where it was for good, and a SIGKILL of the driver would
    lose all since."""
    cfg = CheckpointConfig(persist_max_age_s=20.0)

    def durable_saves(durable_step):
        saved, _, _ = run(cfg, range(501, 900), lambda s: 0.1, memory_cost=0.004, durable_cost=0.5, start=500,
                          durable_step=durable_step)
        assert saved[0] == saved[1]
        return [s for s, _, d in saved[0] if d]

    assert durable_saves(400) == [600, 800]
    assert durable_saves(100) == [500 + FIRST_CHECK_AFTER_STEPS + 1, 705], "overdue: at once, once chosen"
    assert durable_saves(500) == [700], "restored from the durable tier: 200 steps on"


def test_steps_slowing_gradually_keep_the_durable_saves_near_the_age_bound_without_a_choice_per_agreement():
    """Orbax's saves (30 s) are over their share at any interval the 600 s bound allows, so the bound
    holds the durable interval; the steps slow from 1.0 s to 1.3 s over 20,000 steps (less than 2x).
    The interval is chosen again only when saves would be 10 % past the bound (it was chosen again at
    almost every agreement, one step shorter each time, or never, letting saves drift 30 % apart)."""
    cfg = CheckpointConfig(persist_max_age_s=600.0)

    def step_time(step):
        return 1.0 + 0.3 * step / 20000

    saved, told, _ = run(cfg, range(1, 20000), step_time, memory_cost=0.004, durable_cost=30.0)
    assert len(told) <= 5, [(e.step, e.durable_every, e.reason) for e in told]
    assert sum("more than 600 s apart" in e.reason for e in told) >= 2
    durable = [s for s, _, d in saved[0] if d]
    assert max((b - a) * step_time(b) for a, b in zip(durable, durable[1:], strict=False)) <= 1.1 * 600
    assert saved[0] == saved[1]


def test_numbers_the_user_gave_need_no_agreement():
    cfg = CheckpointConfig(save_every=5, persist_every=10)
    saved, told, wire = run(cfg, range(1, 21), lambda s: 0.1, memory_cost=0.5, durable_cost=5.0)
    assert [s for s, _, _ in saved[0]] == [5, 10, 15, 20] and told == [] and wire.calls == 0


def test_the_cadence_is_chosen_again_from_steady_steps_once_whatever_the_factor():
    """The first choice times 3 steps just after compiling (0.68 s here, 0.42 s once steady): with
    52 ms saves, every 8 steps would be 1.5 % of steady step time; the next agreement chooses every
    13 from the steady steps, though the step time moved less than 2x."""
    cfg = CheckpointConfig(persist_max_age_s=600.0)
    saved, told, _ = run(cfg, range(1, 200), lambda s: 0.68 if s < 10 else 0.42, memory_cost=0.052,
                         durable_cost=0.3)
    assert [e.memory_every for e in told][:2] == [8, 13], [e.reason for e in told]
    assert "the steps settled at 420.0 ms (from 680.0 ms)" in told[1].reason
    memory = [s for s, m, _ in saved[0] if m]
    steady = [b - a for a, b in zip(memory, memory[1:], strict=False) if a > told[1].step]
    assert steady and set(steady) == {13} and 0.052 / 13 <= 0.01 * 0.42
    assert saved[0] == saved[1]


def test_a_durable_number_given_never_chooses_memory_before_memory_was_measured():
    """`--persist-every 2` with memory saves left to the rule: Orbax's save at step 2, before the
    measuring memory saves, is no agreement step (it chose memory every step, "not measured", for the
    next 30 s of training: 50 ms saves against 0.1 s steps, every 50 once measured)."""
    cfg = CheckpointConfig(persist_every=2, persist_max_age_s=600.0)
    saved, told, _ = run(cfg, range(1, 200), lambda s: 0.1, memory_cost=0.05, durable_cost=0.3)
    assert [(e.step, e.memory_every, e.durable_every) for e in told][:1] == [(FIRST_CHECK_AFTER_STEPS, 50, 2)]
    assert all("not measured" not in e.reason for e in told), [e.reason for e in told]
    assert [s for s, m, _ in saved[0] if m][:3] == [3, 4, 54]
    assert saved[0] == saved[1]


def test_steps_slowing_sharply_right_after_an_agreement_keep_durable_saves_near_the_age_bound():
    """50 ms steps, then 2 s steps from step 3,000: the next agreement was 30 s of the fast steps (600
    steps) away, so the durable interval chosen by the 600 s bound for 50 ms steps (12,000 steps) held
    for 600 slow steps, and the first durable save came 1,360 s into them. Agreements are at most
    MAX_CHECK_STEPS apart."""
    cfg = CheckpointConfig(persist_max_age_s=600.0)

    def step_time(step):
        return 0.05 if step < 3000 else 2.0

    saved, told, _ = run(cfg, range(1, 4000), step_time, memory_cost=0.004, durable_cost=0.5)
    durable = [0] + [s for s, _, d in saved[0] if d]
    gaps = [sum(step_time(s) for s in range(a + 1, b + 1)) for a, b in zip(durable, durable[1:], strict=False)]
    assert max(gaps) <= 600 + MAX_CHECK_STEPS * 2.0, (durable, [round(g) for g in gaps])
    assert any("the step time moved" in e.reason for e in told)
    assert saved[0] == saved[1]


def test_very_fast_steps_agree_at_most_once_a_second():
    """1 ms steps: 100 steps between agreements would be a broadcast (about 1 ms) every 0.1 s, 1 % of
    step time on its own; they are at least MIN_CHECK_S of steps apart."""
    cfg = CheckpointConfig(persist_max_age_s=600.0)
    _, _, wire = run(cfg, range(1, 5001), lambda s: 0.001, memory_cost=0.00001, durable_cost=0.01)
    assert wire.calls <= 1 + 5000 // 1000 + 1, wire.calls


def test_after_a_restart_with_durable_saves_overdue_the_cadence_still_settles_on_steady_steps():
    """Restarted at step 1,000 with no durable step: Orbax saves at once after the first agreement,
    and its agreement came before steady steps. It used up the one choice from steady steps, keeping
    memory every 9 (chosen from 0.68 s steps just after compiling) instead of every 14 for 0.42 s
    steps, and said "the steps settled" for what was Orbax's first save."""
    cfg = CheckpointConfig(persist_max_age_s=600.0)
    saved, told, _ = run(cfg, range(1001, 1300), lambda s: 0.68 if s < 1010 else 0.42, memory_cost=0.058,
                         durable_cost=0.3, start=1000, durable_step=0)
    assert "Orbax's first save was measured" in told[1].reason, [e.reason for e in told]
    settled = [e for e in told if "the steps settled at 420.0 ms" in e.reason]
    assert settled and settled[0].memory_every == 14, [(e.step, e.memory_every, e.reason) for e in told]
    assert saved[0] == saved[1]


def one_host_slowed(steps: range, step_time, memory_cost, slowdown=lambda step: 0.025):
    """One host through `steps`, each step right after a memory save `slowdown(step)` slower (its
    hand-off beside it); the first step read back has no time of its own (it paid for compiling), as
    in a run. Returns rank 0's events and the steps that saved to memory."""
    told: list[CadenceChosen] = []
    host = SaveCadence(CheckpointConfig(persist_max_age_s=600.0), True, 0, 0, told.append, list)
    memory_saves: set[int] = set()
    for step in steps:
        if step > 1:
            host.step_time(step_time(step) + (slowdown(step) if step - 1 in memory_saves else 0.0), step)
        due = host.due(step, final=False)
        if due.memory:
            memory_saves.add(step)
        host.after_save(step, due, memory_cost(step) if due.memory else None, 0.3 if due.durable else None)
    return told, memory_saves


def test_the_slowdown_of_the_step_after_a_memory_save_is_measured_and_counted():
    """A 25 ms save whose next step takes 25 ms longer (its hand-off beside it) costs 50 ms: with 0.5 s
    steps, every 10 steps keeps it within 1 %; its blocking alone gave every 5."""
    told, memory_saves = one_host_slowed(range(1, 500), lambda step: 0.5, lambda step: 0.025)
    assert told[0].memory_every == 5 and told[0].memory_slowdown_s == 0.0, "not measured at the first choice"
    slowed = told[-1]
    assert abs(slowed.memory_slowdown_s - 0.025) < 1e-9 and "slows the next step by 25.0 ms" in slowed.reason
    assert slowed.memory_every == math.ceil(0.05 / (0.01 * slowed.step_time_s) - 1e-9) == 10, slowed.reason
    steps = sorted(memory_saves)
    gaps = {b - a for a, b in zip(steps, steps[1:], strict=False) if a > slowed.step}
    assert gaps == {10}, "the host saves at that cadence"


def test_a_refused_memory_save_leaves_the_later_commits_of_the_attempt_reported():
    """A keeper restarted by Ray refuses the save whose file went with its folder's emptying; the
    tier goes on, and each later save that commits is reported (the progress line's memory step, and
    the attempt's progress that keeps a failure after it out of the crash-loop back-off)."""
    from jaxlaunch.workers.checkpoints.cadence import CommitWatch, Due

    class Memory:
        refused: str | None = None
        refused_steps: set[int] = set()

        def handing_off(self):
            return False

    memory = Memory()
    watch = CommitWatch(memory, saving=lambda: False, rank=0)  # type: ignore[arg-type]
    watch.started(10, Due(memory=True, durable=False))
    memory.refused, memory.refused_steps = "the part file of step 10 is gone", {10}
    assert watch.done() == [], "a refused save is not committed"
    watch.started(11, Due(memory=True, durable=False))
    assert watch.done() == [("memory", 11)]


def test_steps_just_after_compiling_are_not_taken_for_the_slowdown_of_a_memory_save():
    """The first saves, which measure the memory tier's cost, fall in the slow steps just after
    compiling (0.96 s here, 0.56 s once steady) and are dear (109 ms: their files are new), so the
    first choice saves every 12 steps. Counting the slow steps after the measuring saves as a save's
    slowdown (225 ms) chose every 45 from the steady steps (a benchmark run chose every 42 on 0.56 s
    steps and recomputed 11-17 steps after a kill). With 2 steady steps after a save timed by then, the
    choice from steady steps counts the blocking alone (27 ms: every 5); once 3 are timed, the next
    agreement counts their slowdown too: 27 ms and 25 ms cost 52 ms, and every 10 steps keeps that
    within 1 % of 0.56 s steps."""
    told, memory_saves = one_host_slowed(range(1, 300), lambda step: 0.96 if step <= 6 else 0.56,
                                         lambda step: 0.109 if step <= FIRST_CHECK_AFTER_STEPS else 0.027)
    assert [(e.memory_every, e.memory_slowdown_s) for e in told[:2]] == [(12, 0.0), (5, 0.0)], [e.reason for e in told]
    assert "the steps settled at 560.0 ms" in told[1].reason
    last = told[-1]
    assert len(told) == 3 and "the steps right after memory saves were timed" in last.reason, [e.reason for e in told]
    assert abs(last.memory_slowdown_s - 0.025) < 1e-9, last.reason
    assert last.memory_every == math.ceil(0.052 / (0.01 * 0.56)) == 10, last.reason
    steps = sorted(memory_saves)
    assert {b - a for a, b in zip(steps, steps[1:], strict=False) if a > last.step} == {10}


def test_nor_is_the_step_after_the_first_choice_s_own_save():
    """Steps slow until step 13: the one after the first choice's own save (step 4, every 8 chosen)
    and the one after the save at step 12 are both just after compiling. Counting them with the 2
    steady ones (steps 21 and 29) made the slowdown 225 ms and chose every 45 at step 36."""
    told, _ = one_host_slowed(range(1, 300), lambda step: 0.96 if step <= 13 else 0.56,
                              lambda step: 0.076 if step <= FIRST_CHECK_AFTER_STEPS else 0.027)
    assert [(e.step, e.memory_every) for e in told] == [(4, 8), (36, 10)], [e.reason for e in told]
    assert abs(told[1].memory_slowdown_s - 0.025) < 1e-9, told[1].reason


def test_a_slowdown_measured_now_and_then_never_sees_saws_the_cadence():
    """Cheap saves (3 ms against 100 ms steps), the step after one slower by 2.5 ms in some stretches
    and not in others: the cadence counts the slowdown once it is measured, then changes only past
    the 2x rule, not at every agreement the slowdown changes."""
    told, _ = one_host_slowed(range(1, 4000), lambda step: 0.1, lambda step: 0.003,
                              slowdown=lambda step: 0.0025 if (step // 300) % 2 else 0.0)
    assert len(told) <= 2, [(e.step, e.memory_every, e.reason) for e in told]


def test_saves_every_step_compare_no_step_after_them_with_normal_steps_timed_before():
    """Saves dear at first (every 30 steps), then cheap (every step): no normal step lies between
    them, and those timed under the earlier cadence are not compared with the steps after the saves,
    which get 1 % slower at step 600 for reasons of their own (compared, that was a 1 ms slowdown, and
    every 2 chosen at step 604)."""
    told, _ = one_host_slowed(range(1, 1600), lambda step: 0.1 if step < 600 else 0.101,
                              lambda step: 0.03 if step < 400 else 0.0005, slowdown=lambda step: 0.0)
    assert told[-1].memory_every == 1, [(e.step, e.memory_every, e.reason) for e in told]
    assert not [e for e in told if "were timed" in e.reason], [(e.step, e.memory_every, e.reason) for e in told]
