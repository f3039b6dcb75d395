"""Which host makes the others wait: the straggler rule as a pure function, the driver's watch that
records it, and the `slow@` injection's form."""

import pytest
from jaxlaunch.launcher.control.states import Attempt
from jaxlaunch.launcher.control.stragglers import StragglerWatch, find_stragglers, straggler_message
from jaxlaunch.workers.supervision.faults import FaultHook

from jaxlaunch.contract import events
from jaxlaunch.contract.protocol import (
    ConfigError,
    GroupInfo,
    GroupPoll,
    HostStatus,
    Injection,
    InjectionKind,
)

FACTOR, STEPS = 1.3, 20
USUAL_S = 0.010
STEP_S = 0.050
"""A step's time: a 3x host's excess (20 ms) is 0.4 of it."""


def times_of(steps: range, seconds: float = STEP_S) -> dict[int, float]:
    return {step: seconds for step in steps}


TIMES = times_of(range(1, 200))


def find_straggler(*args):
    """The straggler that stands out most, or None."""
    return next(iter(find_stragglers(*args)), None)


def busy_of(num_hosts: int, steps: range, slow: dict[int, float] | None = None,
            jitter: float = 0.1) -> dict[int, dict[int, float]]:
    """Busy seconds by rank and step: every host about USUAL_S (a deterministic ripple of ±jitter),
    a slow host `factor` times that from its step on (`slow`: step -> factor, for host 1)."""
    out: dict[int, dict[int, float]] = {}
    for rank in range(num_hosts):
        out[rank] = {}
        for step in steps:
            seconds = USUAL_S * (1 + jitter * ((step * (rank + 3)) % 7 - 3) / 3)
            factor = max([f for start, f in (slow or {}).items() if step >= start and rank == 1], default=1.0)
            out[rank][step] = seconds * factor
    return out


def test_a_host_three_times_as_busy_for_twenty_steps_is_named_with_its_factor():
    busy = busy_of(4, range(1, 61), slow={30: 3.0})
    found = find_straggler(busy, FACTOR, STEPS, TIMES)
    assert found is not None and found.rank == 1
    assert found.steps == list(range(41, 61)), "the newest 20 steps"
    assert 2.4 < found.factor < 3.6 and found.busy_s > 2 * found.peers_busy_s


def test_the_host_must_stay_slow_through_most_of_the_steps_not_one_burst():
    assert find_straggler(busy_of(4, range(1, 53), slow={40: 3.0}), FACTOR, STEPS, TIMES) is None, "13 of 20 steps slow"
    found = find_straggler(busy_of(4, range(1, 54), slow={40: 3.0}), FACTOR, STEPS, TIMES)
    assert found is not None and found.rank == 1, "14 of 20: two thirds"
    busy = busy_of(4, range(1, 61), slow={30: 3.0})
    busy[1][45] = busy[1][55] = USUAL_S  # an ordinary step now and then...
    busy[2][51] *= 10  # ...and a moment in which most of its peers were starved too
    busy[3][51] *= 10
    found = find_straggler(busy, FACTOR, STEPS, TIMES)
    assert found is not None and found.rank == 1, "a few ordinary steps do not make a slow host fast"
    starved = busy_of(4, range(1, 61))
    for step in range(45, 53):  # one host starved for 8 steps of a shared machine
        starved[0][step] *= 10
    assert find_straggler(starved, FACTOR, STEPS, TIMES) is None
    assert find_straggler(busy_of(4, range(1, 30)), FACTOR, STEPS, TIMES) is None, "fewer than 20 steps timed"


def test_even_hosts_or_a_mild_slowdown_name_nobody():
    assert find_straggler(busy_of(4, range(1, 61)), FACTOR, STEPS, TIMES) is None
    assert find_straggler(busy_of(4, range(1, 61), slow={1: 1.15}, jitter=0.0), FACTOR, STEPS, TIMES) is None
    assert find_straggler(busy_of(1, range(1, 61)), FACTOR, STEPS, TIMES) is None, "a single host has no peers"


def test_a_host_whose_excess_is_a_small_part_of_the_step_is_not_named():
    """Twice its peers' busy time, but 10 ms of a 200 ms step: the job loses 5 %. The same host in
    40 ms steps costs a quarter of each and is named. Steps whose time is not known are passed over."""
    busy = busy_of(4, range(1, 61), slow={1: 2.0}, jitter=0.0)
    assert find_straggler(busy, FACTOR, STEPS, times_of(range(1, 61), 0.200)) is None
    found = find_straggler(busy, FACTOR, STEPS, times_of(range(1, 61), 0.040))
    assert found is not None and found.rank == 1 and 1.9 < found.factor < 2.1
    assert find_straggler(busy, FACTOR, STEPS, times_of(range(1, 15))) is None, "20 steps with known times needed"


def test_steps_in_which_nobody_worked_say_nothing():
    """A save reads its step back at once on every host: busy 0 everywhere. Such steps are passed over."""
    busy = busy_of(4, range(1, 61), slow={30: 3.0})
    for rank in busy:
        for step in (40, 50, 60):
            busy[rank][step] = 0.0
    found = find_straggler(busy, FACTOR, STEPS, TIMES)
    assert found is not None and found.rank == 1 and 40 not in found.steps and len(found.steps) == STEPS


def watched(busy: dict[int, dict[int, float]]):
    """A watch of 4 hosts on nodes a-d fed `busy` for steps 1-80, a poll every 5 steps: (the watch,
    the attempt, what it recorded, what it told)."""
    recorded: list[events.Event] = []
    told: list[str] = []
    watch = StragglerWatch(FACTOR, STEPS, recorded.append, told.append)
    attempt = Attempt(number=1, num_hosts=4, mesh={}, started_at=0.0, latest_committed=None,
                      group=GroupInfo("c:1", ["node-a", "node-b", "node-c", "node-d"], [1, 2, 3, 4]))
    hosts = [HostStatus(rank) for rank in range(4)]
    for first in range(1, 81, 5):
        window = {rank: [(s, busy[rank][s]) for s in range(first, first + 5)] for rank in range(4)}
        records = [{"step": s, "step_time_s": STEP_S} for s in range(first, first + 5)]
        watch.on_poll(None, attempt, GroupPoll(hosts, records, [], {}, [], window))
    return watch, attempt, recorded, told


def test_the_watch_records_the_straggler_once_with_its_node_and_every_hosts_busy_time():
    watch, attempt, recorded, told = watched(busy_of(4, range(1, 81), slow={30: 3.0}))
    [straggler] = [e for e in recorded if isinstance(e, events.Straggler)]
    assert (straggler.host, straggler.node, straggler.steps) == (1, "node-b", STEPS)
    assert 30 < straggler.last_step < 30 + 30, "named within 30 steps of the slowdown"
    assert told == [straggler_message(straggler)] and "host 1 (node node-b) is slow" in told[0]
    watch.on_attempt_ended(None, type("Ended", (), {"attempt": attempt})())
    [per_host] = [e for e in recorded if isinstance(e, events.HostBusy)]
    assert per_host.busy_s[1] > 1.5 * max(per_host.busy_s[r] for r in (0, 2, 3))
    assert events.parse_event(straggler.to_dict()) == straggler, "the event reads back from events.jsonl"


def test_two_slow_hosts_are_each_named_and_the_slowest_left_first():
    """Hosts 1 (3.2x) and 2 (3x) of 4: only the worst was ever named, and host 2 stayed hidden for the
    whole attempt. Each is named once; under `replace` the slowest is offered to leave first."""
    busy = busy_of(4, range(1, 81), slow={30: 3.2})
    busy[2] = {s: seconds * (3.0 if s >= 30 else 1.0) for s, seconds in busy[2].items()}
    watch, attempt, recorded, told = watched(busy)
    named = [e.host for e in recorded if isinstance(e, events.Straggler)]
    assert sorted(named) == [1, 2] and len(told) == 2
    assert watch.replacement(attempt).host == 1


def test_the_slow_injection_parses_with_its_factor_and_refuses_a_bad_one():
    slow = Injection.parse("slow@step=10,host=1,factor=3")
    assert (slow.kind, slow.step, slow.host, slow.factor) == (InjectionKind.SLOW, 10, 1, 3.0)
    assert str(slow) == "slow@step=10,host=1,factor=3"
    for bad in ("slow@step=10,host=1", "slow@step=10,host=1,factor=0.5", "kill@step=3,host=0,factor=2"):
        with pytest.raises(ConfigError, match="factor"):
            Injection.parse(bad)


def test_a_slow_host_stretches_its_own_work_by_the_factor(tmp_path, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("jaxlaunch.workers.supervision.faults.time.sleep", slept.append)
    run = type("Run", (), {"record_injection": lambda self, line: None})()
    hook = FaultHook((Injection.parse("slow@step=3,host=0,factor=3"),), 0, 1, run, lambda: False)
    for step, seconds in ((1, 0.010), (2, 0.012)):
        hook.observe_busy(seconds)
        hook.at_step(step)
    assert slept == []
    hook.at_step(3)
    hook.observe_busy(0.033)  # its own stretched steps do not move its usual time
    hook.at_step(4)
    assert slept == pytest.approx([2 * 0.011, 2 * 0.011])


def test_the_watch_s_memory_of_busy_times_stays_bounded_and_its_median_is_the_hosts(monkeypatch):
    """20,000 steps of 2 hosts (host 1 twice as busy from the start), the sample capped at 1,000: the
    driver keeps 1,000 busy times a host, and the attempt's median is each host's within 5 %."""
    from jaxlaunch.launcher.control import stragglers

    monkeypatch.setattr(stragglers, "BUSY_SAMPLE", 1000)
    recorded: list[events.Event] = []
    watch = StragglerWatch(FACTOR, STEPS, recorded.append, lambda _: None)
    attempt = Attempt(number=1, num_hosts=2, mesh={}, started_at=0.0, latest_committed=None)
    hosts = [HostStatus(rank) for rank in range(2)]
    busy = busy_of(2, range(1, 20_001), slow={1: 2.0})
    for first in range(1, 20_001, 100):
        window = {rank: [(s, busy[rank][s]) for s in range(first, first + 100)] for rank in range(2)}
        watch.on_poll(None, attempt, GroupPoll(hosts, [], [], {}, [], window))
    assert [len(watch.all_busy[r]) for r in range(2)] == [1000, 1000]
    watch.on_attempt_ended(None, type("Ended", (), {"attempt": attempt})())
    [per_host] = [e for e in recorded if isinstance(e, events.HostBusy)]
    exact = [sorted(busy[r].values())[10_000] for r in range(2)]
    assert per_host.steps == 20_000
    assert all(abs(m - e) <= 0.05 * e for m, e in zip(per_host.busy_s, exact, strict=True)), (per_host.busy_s, exact)
