"""The save schedule and the cadence rule (`jaxlaunch.contract.schedule`), as pure values."""

import dataclasses

import pytest

from jaxlaunch.contract.schedule import Cadence, CadenceRule, Due, Measured, SaveSchedule, moved


def saves(schedule: SaveSchedule, steps: range, final: int | None = None) -> list[tuple[int, str]]:
    out = []
    for step in steps:
        due = schedule.due(step, final=step == final)
        if due.any:
            out.append((step, "+".join(t for t, on in (("mem", due.memory), ("disk", due.durable)) if on)))
        schedule = schedule.after(step, due)
    return out


def test_user_numbers_save_at_their_multiples_and_the_last_step_is_durable():
    assert saves(SaveSchedule(memory_every=5, durable_every=10), range(1, 24), final=23) == [
        (5, "mem"), (10, "mem+disk"), (15, "mem"), (20, "mem+disk"), (23, "disk")]
    assert saves(SaveSchedule(memory_every=None, durable_every=4), range(1, 10)) == [(4, "disk"), (8, "disk")]


def test_a_chosen_cadence_counts_from_the_previous_save_so_an_agreed_stop_restarts_it():
    schedule = SaveSchedule(memory_every=3, durable_every=6, memory_anchor=10, durable_anchor=10)
    assert saves(schedule, range(11, 24), final=14) == [
        (13, "mem"), (14, "disk"), (16, "mem"), (19, "mem"), (20, "disk"), (22, "mem")]


def test_an_interval_already_passed_since_the_anchor_saves_at_once():
    """Durable every 80 from step 80, re-chosen at step 140 as every 50: the next save is at 141, not
    at 180 (a 100-step gap where 50 were chosen); the same for an anchor older than the interval."""
    schedule = SaveSchedule(memory_every=None, durable_every=50, durable_anchor=80)
    assert saves(schedule, range(141, 250)) == [(141, "disk"), (191, "disk"), (241, "disk")]
    assert SaveSchedule(memory_every=None, durable_every=50, durable_anchor=80).due(129).durable is False


def test_the_first_save_measures_memory_with_the_tier_and_orbax_without():
    with_tier = SaveSchedule(memory_every=2**40, durable_every=2**40, memory_anchor=0, durable_anchor=0,
                             measure_at=(3, 4))
    assert saves(with_tier, range(1, 9)) == [(3, "mem"), (4, "mem")]
    durable_only = SaveSchedule(memory_every=None, durable_every=2**40, durable_anchor=0, measure_at=(4,))
    assert durable_only.due(4) == Due(memory=False, durable=True)


AUTO = CadenceRule(memory_tier=True, save_every=None, persist_every=None, max_age_s=600.0)


def test_a_copy_cheap_next_to_the_step_saves_every_step():
    cadence = AUTO.choose(Measured(step_time_s=1.0, memory_blocking_s=0.004, durable_blocking_s=0.5))
    assert cadence.memory_every == 1
    assert cadence.durable_every == 50, "0.5 s of Orbax at most 1 % of 1 s steps: every 50 steps"
    assert "at most 1% of step time" in cadence.reason


def test_a_dear_copy_saves_every_k_steps_to_stay_within_one_percent():
    cadence = AUTO.choose(Measured(step_time_s=0.025, memory_blocking_s=0.0012, durable_blocking_s=0.3))
    assert cadence.memory_every == 5, "1.2 ms against 0.25 ms (1 % of 25 ms): every 5 steps"
    assert 0.0012 / cadence.memory_every <= 0.01 * 0.025
    assert 0.0012 / (cadence.memory_every - 1) > 0.01 * 0.025, "and no less often than needed"


def test_the_age_bound_caps_the_durable_interval_and_says_so():
    cadence = AUTO.choose(Measured(step_time_s=2.0, memory_blocking_s=0.01, durable_blocking_s=30.0))
    assert cadence.durable_every == 300, "by cost every 1500 steps (3000 s), by age every 300 (600 s)"
    assert "at most 600 s apart (checkpoint.persist_max_age_s)" in cadence.reason


def test_an_unmeasured_orbax_saves_by_the_age_bound_alone():
    cadence = AUTO.choose(Measured(step_time_s=0.1, memory_blocking_s=0.0001))
    assert (cadence.memory_every, cadence.durable_every) == (1, 6000)
    assert "not measured yet" in cadence.reason


def test_numbers_the_user_gave_win():
    rule = CadenceRule(memory_tier=True, save_every=7, persist_every=None, max_age_s=600.0)
    cadence = rule.choose(Measured(step_time_s=1.0, memory_blocking_s=5.0, durable_blocking_s=0.5))
    assert (cadence.memory_every, cadence.durable_every) == (7, 50)
    assert CadenceRule(True, 7, 70, 600.0).fixed.memory_every == 7
    assert CadenceRule(False, 9, None, 600.0).fixed.durable_every == 9
    assert CadenceRule(True, 7, None, 600.0).fixed is None, "persist_every is auto: measured"
    durable_only = CadenceRule(memory_tier=False, save_every=None, persist_every=70, max_age_s=600.0)
    assert durable_only.choose(Measured(1.0, None, 2.0)).memory_every is None
    assert durable_only.choose(Measured(1.0, None, 2.0)).durable_every == 70, \
        "without the tier (off for an attempt, or --no-memory-tier), the user's durable number holds"
    assert durable_only.fixed == Cadence(None, 70, "--persist-every given")
    assert CadenceRule(False, 9, 70, 600.0).fixed.durable_every == 9, "every save is durable: --save-every's"
    assert CadenceRule(False, None, None, 600.0).choose(Measured(1.0, None, 2.0)).durable_every == 200


@pytest.mark.parametrize(("before", "after", "expected"), [
    (1.0, 2.0, False), (1.0, 2.01, True), (1.0, 0.5, False), (1.0, 0.49, True)])
def test_the_cadence_is_chosen_again_when_the_step_time_moves_more_than_twice(before, after, expected):
    assert moved(before, after) is expected
    measured = Measured(step_time_s=before, memory_blocking_s=0.001, durable_blocking_s=0.1)
    cadence = AUTO.choose(measured)
    why = AUTO.rechoose(measured, cadence, Measured(after, 0.001, 0.1))
    assert (why is not None and why.startswith("the step time moved")) is expected, why


def test_saves_that_block_more_than_twice_their_share_are_chosen_again_and_cheaper_ones_are_not():
    chosen = Measured(step_time_s=1.0, memory_blocking_s=0.005, durable_blocking_s=0.1)
    cadence = AUTO.choose(chosen)
    assert cadence.memory_every == 1
    # Every step, a save waits for the previous hand-off: 30 ms per 1 s step is three times the share.
    assert "memory saves cost 30.0 ms every 1 steps" in AUTO.rechoose(chosen, cadence, Measured(1.0, 0.03, 0.1))
    assert AUTO.rechoose(chosen, cadence, Measured(1.0, 0.001, 0.1)) is None, "every step already"
    unmeasured = Measured(step_time_s=1.0, memory_blocking_s=0.005)
    assert AUTO.rechoose(unmeasured, AUTO.choose(unmeasured), chosen) == "Orbax's first save was measured"


def test_saves_that_got_cheap_are_chosen_again_more_often_but_never_at_an_interval_found_over_its_share():
    warm_up = Measured(step_time_s=0.78, memory_blocking_s=0.085, durable_blocking_s=0.5)
    cadence = AUTO.choose(warm_up)
    assert cadence.memory_every == 11, "85 ms against 7.8 ms (1 % of 0.78 s)"
    steady = Measured(step_time_s=0.78, memory_blocking_s=0.017, durable_blocking_s=0.5)
    assert "every 3 steps keeps them within their share, not only every 11" in AUTO.rechoose(warm_up, cadence, steady)
    assert AUTO.choose(steady).memory_every == 3
    assert AUTO.rechoose(warm_up, cadence, Measured(0.78, 0.05, 0.5)) is None, "every 7 is not twice as often"
    # Every step was found over its share (30 ms waiting for the previous hand-off); every 3 is not:
    # 5 ms there would ask for every step again, which the floor refuses.
    every_3 = AUTO.choose(Measured(1.0, 0.03, 0.1), floor=(1, 0))
    assert every_3.memory_every == 3
    assert AUTO.over_share(AUTO.choose(Measured(1.0, 0.005, 0.1)), Measured(1.0, 0.03, 0.1)) == (1, 0)
    assert AUTO.rechoose(Measured(1.0, 0.03, 0.1), every_3, Measured(1.0, 0.005, 0.1), floor=(1, 0)) is None
    assert AUTO.rechoose(Measured(1.0, 0.03, 0.1), every_3, Measured(1.0, 0.005, 0.1)) is not None, "no floor: it would"


def test_durable_saves_drifted_past_the_age_bound_are_chosen_again_though_the_steps_moved_less_than_2x():
    """Chosen at 1.0 s steps: durable every 600 steps (by age; by cost 3000). The steps slow to 1.9 s, less
    than 2x: 600 steps are now 1140 s, over the 600 s bound, and the cadence is chosen again (315)."""
    chosen = Measured(step_time_s=1.0, memory_blocking_s=0.004, durable_blocking_s=30.0)
    cadence = AUTO.choose(chosen)
    assert cadence.durable_every == 600
    now = dataclasses.replace(chosen, step_time_s=1.9)
    assert not moved(1.0, 1.9)
    why = AUTO.rechoose(chosen, cadence, now)
    assert why == ("durable saves every 600 steps of 1900.0 ms are more than 600 s apart "
                   "(checkpoint.persist_max_age_s)")
    assert AUTO.choose(now).durable_every == 315
    for within in (1.0, 1.1):  # at most 10 % past the bound: not chosen again for age (no choice per agreement)
        assert "apart" not in (AUTO.rechoose(chosen, cadence, dataclasses.replace(chosen, step_time_s=within)) or "")


def test_a_memory_save_costs_its_blocking_and_its_slowdown_of_the_next_step():
    """4 ms of blocking alone is within 1 % of a 1 s step; with the next step 16 ms slower, every 2."""
    assert AUTO.choose(Measured(step_time_s=1.0, memory_blocking_s=0.004)).memory_every == 1
    cadence = AUTO.choose(Measured(step_time_s=1.0, memory_blocking_s=0.004, memory_slowdown_s=0.016))
    assert cadence.memory_every == 2 and "slows the next step by 16.0 ms" in cadence.reason
