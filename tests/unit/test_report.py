"""The run report from records alone: attempts, goodput and its badput split, the picture."""

import pytest
from rich.console import Console

from launcher import report
from launcher.runs import RunDir


def write_run(tmp_path):
    run = RunDir(tmp_path)
    run.create()
    t = 1000.0
    events = [
        {"event": "launch", "time": t},
        {"event": "attempt_started", "attempt": 1, "num_hosts": 4, "mesh": {"data": 4}, "time": t + 1},
        {"event": "attempt_ended", "attempt": 1, "cause": "crashed", "host": 2, "first_step": 1, "last_step": 3,
         "time_to_first_step_s": 5.0, "duration_s": 8.0, "detection_latency_s": 0.1, "time": t + 9},
        {"event": "waiting_for_capacity", "time": t + 10},
        {"event": "attempt_started", "attempt": 2, "num_hosts": 2, "mesh": {"data": 2}, "time": t + 14},
        {"event": "restored", "attempt": 2, "step": 2, "seconds": 0.5, "time": t + 16},
        {"event": "attempt_ended", "attempt": 2, "cause": "finished", "first_step": 3, "last_step": 4,
         "time_to_first_step_s": 4.0, "duration_s": 6.0, "recovery_time_s": 9.0, "time": t + 20},
        {"event": "job_ended", "time": t + 21},
    ]
    for e in events:
        run._append(run.events_path, [e])
    metrics = [
        {"step": 1, "loss": 5.0, "step_time_s": 1.0},
        {"step": 2, "loss": 4.0, "step_time_s": 1.0, "checkpoint_blocking_s": 0.25},
        {"step": 3, "loss": 3.5, "step_time_s": 1.0},  # lost with attempt 1
        {"step": 3, "loss": 3.4, "step_time_s": 0.5},
        {"step": 4, "loss": 3.0, "step_time_s": 0.5},
    ]
    run.metrics(metrics)
    run.close()
    return run


def test_goodput_and_badput_split(tmp_path):
    r = report.build(write_run(tmp_path))
    assert r.wall_s == pytest.approx(21.0)
    assert r.productive_s == pytest.approx(3.0)  # steps 1, 2, 3 (its last run), 4
    assert r.badput_s["recompute"] == pytest.approx(1.0)
    assert r.badput_s["checkpoint"] == pytest.approx(0.25)
    assert r.badput_s["restore"] == pytest.approx(0.5)
    assert r.badput_s["startup"] == pytest.approx(5.0 + 3.5)
    assert r.badput_s["capacity_wait"] == pytest.approx(4.0)
    assert r.badput_s["downtime"] == pytest.approx(1.0)
    assert r.productive_s + sum(r.badput_s.values()) == pytest.approx(r.wall_s)
    assert r.trajectory == {1: 5.0, 2: 4.0, 3: 3.4, 4: 3.0}
    assert r.recomputed == [(3, 3.5)]
    assert [(a["num_hosts"], a["cause"], a.get("restored_step")) for a in r.attempts] == [
        (4, "crashed", None), (2, "finished", 2)]


def test_picture_and_text(tmp_path):
    console = Console(width=200, record=True)
    path = report.write(write_run(tmp_path).path, console=console)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    out = console.export_text()
    assert "goodput 14.3%" in out and "crashed" in out and "waiting for capacity" in out


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = write_run(tmp_path)
    events = EventAccumulator(str(run.tensorboard_dir))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3, 3, 4]
    assert [e.value for e in scalars] == pytest.approx([5.0, 4.0, 3.5, 3.4, 3.0])
    assert [e.value for e in events.Scalars("train/checkpoint_blocking_s")] == [0.25]
    assert {"train/step_time_s", "train/loss"} <= set(events.Tags()["scalars"])
