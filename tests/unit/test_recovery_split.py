"""The benchmarks' split of a kill's recovery: each second from the kill to the first step's record
once, whatever order the hosts' timelines give (a warm standby's process predates its attempt)."""

from benchmarks.launches import recovery_split


def _timeline(rank, **phases):
    return {"event": "startup_timeline", "attempt": 2, "rank": rank, **phases}


def test_the_split_adds_up_to_the_recovery_and_no_phase_is_negative():
    events = [
        {"event": "attempt_started", "attempt": 2, "time": 100.5},
        # Warm standbys: their actors were up before the attempt started.
        _timeline(0, actor_init=90.0, initializing=100.6, restoring=101.0, compiling=101.7, first_step_done=103.6),
        _timeline(1, actor_init=90.1, initializing=100.4, restoring=101.1, compiling=101.6, first_step_done=103.7),
    ]
    first = {"attempt": 2, "step": 19, "time": 107.0}
    split = recovery_split(events, first, fault_at=100.0, failed_at=100.2)
    assert abs(sum(split.values()) - (107.0 - 100.0)) < 1e-9, "kill -> first record, each second once"
    assert min(split.values()) >= 0
    assert split["processes"] == 0.0, "the standby's process start is no part of this recovery"
    assert round(split["first_step_execution"], 6) == 3.3, "from the slowest host's dispatch to the record"
    assert round(split["detection"], 6) == 0.2 and round(split["restore_or_init"], 6) == 0.6
