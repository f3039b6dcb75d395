"""A run's history from its records alone: the attempt table, goodput and its badput split, the
summary and the picture; TensorBoard without folded curves."""

import pytest
from jaxlaunch.launcher import history, report
from jaxlaunch.launcher.recorder import TensorBoard
from jaxlaunch.launcher.runs import RunDir
from rich.console import Console


def write_run(tmp_path):
    run = RunDir(tmp_path)
    run.create()
    t = 1000.0
    events = [
        {"event": "launch", "time": t, "entry": "models.lm:main"},
        {"event": "attempt_started", "attempt": 1, "num_hosts": 4, "mesh": {"data": 4}, "time": t + 1},
        {"event": "failure", "attempt": 1, "cause": "crashed", "host": 2, "step": 3, "time": t + 9},
        {"event": "attempt_ended", "attempt": 1, "cause": "crashed", "host": 2, "first_step": 1, "last_step": 3,
         "time_to_first_step_s": 5.0, "duration_s": 8.0, "detection_latency_s": 0.1, "time": t + 9},
        {"event": "waiting_for_capacity", "time": t + 10},
        {"event": "attempt_started", "attempt": 2, "num_hosts": 2, "mesh": {"data": 2}, "time": t + 14},
        {"event": "restored", "attempt": 2, "step": 2, "seconds": 0.5, "time": t + 16},
        {"event": "attempt_ended", "attempt": 2, "cause": "finished", "first_step": 3, "last_step": 4,
         "time_to_first_step_s": 4.5, "duration_s": 6.0, "recovery_time_s": 9.0, "process_count": 2,
         "num_devices": 4, "mesh": {"data": 2}, "time": t + 20},
        {"event": "job_ended", "status": "finished", "time": t + 21},
    ]
    run._events.add(events)
    run.metrics([
        {"step": 1, "loss": 5.0, "step_time_s": None, "attempt": 1},  # compiled: its time is not known
        {"step": 2, "loss": 4.0, "step_time_s": 1.0, "checkpoint_blocking_s": 0.25, "attempt": 1},
        {"step": 3, "loss": 3.5, "step_time_s": 1.0, "attempt": 1},  # lost with attempt 1
        {"step": 3, "loss": 3.4, "step_time_s": None, "attempt": 2},
        {"step": 4, "loss": 3.0, "step_time_s": 0.5, "attempt": 2},
    ])
    return run


def test_goodput_and_badput_split(tmp_path):
    r = history.load(write_run(tmp_path))
    assert r.wall_s == pytest.approx(21.0)
    # Steps 1, 2, 3 (its last run) and 4; a first step's time is its attempt's typical one.
    assert r.productive_s == pytest.approx(1.0 + 1.0 + 0.5 + 0.5)
    assert r.badput_s["recompute"] == pytest.approx(1.0)
    assert r.badput_s["checkpoint"] == pytest.approx(0.25)
    assert r.badput_s["restore"] == pytest.approx(0.5)
    assert r.badput_s["startup"] == pytest.approx((5.0 - 1.0) + (4.5 - 0.5 - 0.5))
    assert r.badput_s["capacity_wait"] == pytest.approx(4.0)
    assert r.badput_s["downtime"] == pytest.approx(1.0)
    assert r.productive_s + sum(r.badput_s.values()) == pytest.approx(r.wall_s)
    assert {s: rec["loss"] for s, rec in r.trajectory.items()} == {1: 5.0, 2: 4.0, 3: 3.4, 4: 3.0}
    assert [(x["step"], x["loss"]) for x in r.recomputed] == [(3, 3.5)]
    assert [(a["num_hosts"], a["cause"], a["restored_step"]) for a in r.attempts] == [
        (4, "crashed", None), (2, "finished", 2)]


def test_the_summary_is_a_view_of_the_same_history(tmp_path):
    run = write_run(tmp_path)
    past = history.load(run)
    s = past.summary(run)
    assert s["goodput"] == past.goodput and s["attempt_table"] == past.attempts
    assert (s["status"], s["final_step"], s["final_loss"], s["process_count"]) == ("finished", 4, 3.0, 2)
    assert s["restarts_by_cause"] == {"crashed": 1} and s["cold_start_s"] == 5.0


def test_a_resumed_run_counts_every_launch(tmp_path):
    run = write_run(tmp_path)
    t = 2000.0
    run._events.add([
        {"event": "launch", "time": t},
        {"event": "attempt_started", "attempt": 3, "num_hosts": 2, "mesh": {"data": 2}, "time": t + 1},
        {"event": "attempt_ended", "attempt": 3, "cause": "finished", "first_step": 5, "last_step": 6,
         "time_to_first_step_s": 2.0, "duration_s": 4.0, "time": t + 5},
        {"event": "job_ended", "status": "finished", "time": t + 6},
    ])
    run.metrics([{"step": 5, "loss": 2.9, "step_time_s": None, "attempt": 3},
                 {"step": 6, "loss": 2.8, "step_time_s": 1.0, "attempt": 3}])
    past = history.load(run)
    assert past.wall_s == pytest.approx(21.0 + 6.0), "the time between launches is nobody's"
    assert past.summary(run)["final_step"] == 6 and len(past.attempts) == 3


def test_picture_and_text(tmp_path):
    console = Console(width=200, record=True)
    path = report.write(write_run(tmp_path).path, console=console)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    out = console.export_text()
    assert "goodput 14.3%" in out and "crashed" in out and "waiting for capacity" in out


def test_a_metric_other_than_loss_is_plotted(tmp_path):
    run = RunDir(tmp_path)
    run.create()
    run._events.add([{"event": "launch", "time": 1.0}, {"event": "job_ended", "time": 2.0}])
    run.metrics([{"step": 1, "accuracy": 0.5, "step_time_s": 0.1}, {"step": 2, "accuracy": 0.7, "step_time_s": 0.1}])
    assert report.plotted_metric(history.load(run)) == "accuracy"
    assert report.write(run.path, show=False).exists()


def test_tensorboard_replaces_recomputed_steps_instead_of_folding_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = TensorBoard(tmp_path / "tb")
    board.write([{"step": s, "loss": 10.0 - s, "step_time_s": 0.1} for s in range(1, 6)])
    board.write([{"step": s, "loss": 20.0 - s, "step_time_s": 0.1} for s in range(3, 8)])  # restored at 2
    board.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert points == [(1, 9.0), (2, 8.0), (3, 17.0), (4, 16.0), (5, 15.0), (6, 14.0), (7, 13.0)]
