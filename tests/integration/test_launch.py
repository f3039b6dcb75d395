"""A 2-host job trains and checkpoints; a stopped job resumes bit for bit."""

import numpy as np

from tests.integration.helpers import (
    SHORT_RUN,
    assert_no_host_left,
    committed_steps,
    events,
    final_arrays,
    launch,
    read_jsonl,
    start,
    stop_with_sigterm_after,
    summary,
    trajectory,
)


def test_two_host_run_trains_and_checkpoints(reference_run):
    s = summary(reference_run)
    assert s["status"] == "finished" and s["final_step"] == 30
    assert s["process_count"] == 2 and s["num_devices"] == 4 and s["mesh"] == {"data": 2, "model": 2}
    assert s["final_loss"] < s["first_loss"] - 1.0, "the loss must fall clearly"
    assert committed_steps(reference_run) == [10, 20, 30]
    for step in (10, 20, 30):
        state = reference_run / "checkpoints" / str(step) / "state"
        assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir(), \
            "both processes wrote their shards"
    assert [r["step"] for r in read_jsonl(reference_run / "metrics.jsonl")] == list(range(1, 31))
    assert sorted(p.name for p in (reference_run / "hosts").glob("*.log")) == [
        "attempt-1-rank-0.log", "attempt-1-rank-1.log"]
    ended = events(reference_run, "attempt_ended")
    assert [e["cause"] for e in ended] == ["finished"]
    assert_no_host_left(reference_run)


def test_metrics_reach_tensorboard(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference_run / "tensorboard"))
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = trajectory(reference_run)
    assert losses.keys() == expected.keys()
    assert all(abs(losses[s] - expected[s]) < 1e-6 for s in expected)
    assert {"train/learning_rate", "train/tokens_per_s", "train/checkpoint_blocking_s"} <= set(events.Tags()["scalars"])


def test_sigterm_saves_on_every_host_and_resume_is_bit_for_bit(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = start("--hosts", "2", *SHORT_RUN, "--run-dir", str(run_dir))
    code, out, err = stop_with_sigterm_after(proc, run_dir, 12)
    assert code == 143, out + err
    stopped_at = max(trajectory(run_dir))
    assert stopped_at < 30
    assert committed_steps(run_dir)[-1] == stopped_at, "every host saved the last step it completed"
    assert "--resume" in out
    assert_no_host_left(run_dir)

    result = launch("--resume", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    restored = events(run_dir, "restored")
    assert [e["step"] for e in restored] == [stopped_at], "no step was lost"
    assert trajectory(run_dir) == trajectory(reference_run), "losses equal bit for bit"
    ours, reference = final_arrays(run_dir, 30), final_arrays(reference_run, 30)
    assert ours.keys() == reference.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
