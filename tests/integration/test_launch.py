"""The built-in model, a client of the public API like any other: it trains and checkpoints on 2
hosts, saves on every host when its driver gets SIGTERM, lands in a new layout on fewer hosts, and
falls back past a corrupt step."""

import subprocess
import sys

from tests.integration.helpers import (
    DRIVERS,
    ROOT,
    SHORT_RUN,
    ForkedLaunch,
    _env,
    assert_no_host_left,
    attempts,
    committed_steps,
    events,
    launch,
    read_jsonl,
    signal_after,
    start,
    summary,
    trajectory,
)


def test_two_host_run_trains_and_checkpoints(reference_run):
    s = summary(reference_run)
    assert s["status"] == "finished" and s["final_step"] == 30 and s["entry"] == "jaxlaunch.models.lm:main"
    assert s["process_count"] == 2 and s["num_devices"] == 4 and s["mesh"] == {"data": 2, "model": 2}
    assert s["final_loss"] < s["first_loss"] - 1.0, "the loss must fall clearly"
    assert s["returned"]["model"] == "tiny", "what the function returned on rank 0"
    assert committed_steps(reference_run) == [10, 20, 30]
    for step in (10, 20, 30):
        state = reference_run / "checkpoints" / str(step) / "state"
        assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir(), \
            "both processes wrote their shards"
    records = read_jsonl(reference_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(r["tokens_per_s"] > 0 and r["learning_rate"] >= 0 for r in records[1:])
    assert sorted(p.name for p in (reference_run / "hosts").glob("attempt-*.log")) == [
        "attempt-1-rank-0.log", "attempt-1-rank-1.log"]
    assert [e["cause"] for e in events(reference_run, "attempt_ended")] == ["finished"]
    assert_no_host_left(reference_run)


def test_metrics_reach_tensorboard(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(reference_run / "tensorboard"))
    board.Reload()
    losses = {e.step: e.value for e in board.Scalars("train/loss")}
    expected = trajectory(reference_run)
    assert losses.keys() == expected.keys()
    assert all(abs(losses[s] - expected[s]) < 1e-6 for s in expected)
    assert {"train/learning_rate", "train/tokens_per_s", "train/checkpoint_blocking_s"} <= set(board.Tags()["scalars"])


def test_sigterm_saves_on_every_host_and_resume_on_fewer_hosts_lands_in_the_new_layout(reference_run, tmp_path):
    """SIGTERM to the driver of a 4-host run: every host saves the last step it completed, the driver
    says how to resume, nothing is left running; resumed on 2 hosts, the state lands in their layout.
    (Bit for bit after a stop and a resume on the same hosts: tests/integration/test_hostile.py.)"""
    run_dir = tmp_path / "run"
    proc = start("--hosts", "4", *SHORT_RUN, "--run-dir", str(run_dir))
    code, out, err = signal_after(proc, run_dir, 8)
    assert code == 143, out + err
    stopped_at = max(trajectory(run_dir))
    assert stopped_at < 30
    assert committed_steps(run_dir)[-1] == stopped_at, "every host saved the last step it completed"
    assert "--resume" in out
    assert_no_host_left(run_dir)

    result = launch("--resume", "--run-dir", str(run_dir), "--hosts", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [e["step"] for e in events(run_dir, "restored")] == [stopped_at], "no step was lost"
    restored = events(run_dir, "restored")[0]
    assert restored["saved_topology"]["num_hosts"] == 4 and restored["mesh"] == {"data": 2, "model": 2}
    # The largest array, a (256, 64) embedding sharded (model, data): its shard follows the data axis.
    assert restored["sharding"] == "P('model', 'data')" and restored["shard_shape"] == [128, 32]
    assert summary(run_dir)["process_count"] == 2
    # Same global batch every step, only the data-parallel split changes: the losses agree up to
    # float32 summation order.
    ours, reference = trajectory(run_dir), trajectory(reference_run)
    assert ours.keys() == reference.keys()
    assert max(abs(ours[s] - reference[s]) for s in ours) < 1e-3


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_used(reference_run, copy_of):
    run_dir = copy_of(reference_run)
    data_files = sorted((run_dir / "checkpoints" / "30" / "state").glob("ocdbt.process_*/d/*"))
    assert data_files
    for path in data_files:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])  # truncated
    result = launch("--resume", "--run-dir", str(run_dir), "--steps", "40")
    assert result.returncode == 0, result.stdout + result.stderr
    fallback = events(run_dir, "checkpoint_fallback")
    assert [e["step"] for e in fallback] == [30]
    assert "unreadable_checkpoints/30-" in fallback[0]["moved_to"], "set aside, not deleted"
    assert [e["step"] for e in events(run_dir, "restored")] == [20]
    assert summary(run_dir)["final_step"] == 40 and attempts(run_dir)[-1]["cause"] == "finished"
    told = " ".join(result.stdout.split())  # as one line, however the terminal wrapped it
    assert "checkpoint step 30 set aside in" in told and "an older one serves" in told, result.stdout


def test_a_forked_driver_answers_as_python_launch_py_does(tmp_path):
    """The suite's drivers are forked from a server that imported the libraries (`forked.py`): a bad
    input given both ways gives the same exit code and the same words, and writes nothing either way."""
    args = ["--hosts", "0", "--run-dir", str(tmp_path / "run")]
    proc = DRIVERS.start(args, ROOT, _env())
    assert DRIVERS.fresh or isinstance(proc, ForkedLaunch), "the suite's launches are forked"
    out, err = proc.communicate(timeout=120)
    fresh = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert proc.returncode == fresh.returncode == 2, err + fresh.stderr
    assert (out, err) == (fresh.stdout, fresh.stderr)
    assert not (tmp_path / "run").exists()
