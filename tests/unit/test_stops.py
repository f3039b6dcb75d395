"""The stop the driver agrees with a host: a host never passes a step it accepted, and stops exactly
at the one that was confirmed."""

import threading

from jaxlaunch.workers.supervision.stops import DriverStop


def run_loop(stop: DriverStop, last: int, stopped: list[int]) -> threading.Thread:
    def loop():
        for step in range(1, last + 1):
            if stop.reached(step):
                stopped.append(step)
                return
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_a_host_waits_at_an_accepted_step_until_it_is_confirmed_and_stops_there():
    stop = DriverStop()
    assert stop.propose(5).accepted
    stopped: list[int] = []
    thread = run_loop(stop, 100, stopped)
    thread.join(0.2)
    assert thread.is_alive() and stopped == [], "waiting at step 5, not past it"
    assert stop.confirm(5)
    thread.join(5)
    assert stopped == [5]


def test_a_later_proposal_releases_the_host_to_the_new_step():
    stop = DriverStop()
    stop.propose(3)
    stopped: list[int] = []
    thread = run_loop(stop, 100, stopped)
    thread.join(0.2)
    assert stop.propose(9).accepted, "not yet past step 9"
    assert not stop.confirm(3), "an outdated proposal cannot be made final"
    assert stop.confirm(9)
    thread.join(5)
    assert stopped == [9]


def test_a_step_the_host_already_checked_is_refused_with_where_it_is():
    stop = DriverStop()
    for step in range(1, 8):
        assert not stop.reached(step)
    answer = stop.propose(7)
    assert (answer.accepted, answer.step) == (False, 7)
    assert not stop.confirm(7)
    assert stop.propose(8).accepted
