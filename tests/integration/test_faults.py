"""Failures of every kind on a local Ray cluster: the job recovers and loses nothing."""


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


def attempts(run_dir):
    return summary(run_dir)["attempt_table"]


def test_killed_hosts_and_a_save_cut_short_change_nothing(reference_run, tmp_path):
    """Host 1 is SIGKILLed mid-training; then rank 0 (the coordinator) is SIGKILLed during the
    asynchronous save of step 20, after its blocking phase. The result equals, bit for bit, the
    uninterrupted run's, and the cut-short step 20 is never restored."""
    run_dir = tmp_path / "run"
    result = launch("--hosts", "2", *SHORT_RUN, "--run-dir", str(run_dir),
                    "--inject", "kill@step=12,host=1", "--inject", "kill@step=20,host=0")
    assert result.returncode == 0, result.stdout + result.stderr
    table = attempts(run_dir)
    assert [(a["cause"], a["failed_host"]) for a in table] == [("crashed", 1), ("crashed", 0), ("finished", None)]
    assert [a["restored_step"] for a in table] == [None, 10, 10], "step 20 never committed, never restored"
    injected = read_jsonl(run_dir / "hosts" / "injections.jsonl")
    assert injected[1]["step"] == 20 and injected[1]["saving_in_progress"], "killed during the async save"
    assert committed_steps(run_dir) == [10, 20, 30], "the saves after the failures happened"
    assert all(a["detection_latency_s"] < 5 for a in table[:2])
    assert trajectory(run_dir) == trajectory(reference_run)
    ours, reference = final_arrays(run_dir, 30), final_arrays(reference_run, 30)
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
    assert "crashed on host 1" in result.stdout
    assert f"last lines of {run_dir}/hosts/attempt-1-rank-1.log" in result.stdout.replace("\n", "")
    assert "injecting kill at step 12" in result.stdout, "the tail of the failed host's log"
    assert_no_host_left(run_dir)
    # The driver wrote the report; the report command prints it again.
    assert (run_dir / "report.png").stat().st_size > 20_000
    printed = launch("report", str(run_dir))
    assert printed.returncode == 0 and "goodput" in printed.stdout and "crashed" in printed.stdout


def test_a_hung_host_is_found_by_the_watchdog(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    result = launch("--hosts", "2", *SHORT_RUN, "--run-dir", str(run_dir),
                    "--inject", "hang@step=14,host=1", "--hang-timeout", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    first = attempts(run_dir)[0]
    assert (first["cause"], first["failed_host"]) == ("hung", 1)
    assert first["detection_latency_s"] <= 5 + 2, first
    assert trajectory(run_dir) == trajectory(reference_run)
    assert_no_host_left(run_dir)


def test_an_exception_reaches_the_user_and_a_deterministic_one_stops_the_job(tmp_path):
    run_dir = tmp_path / "run"
    result = launch("--hosts", "2", "--steps", "30", "--save-every", "2", "--run-dir", str(run_dir),
                    "--inject", "exception@step=3,host=1,times=100", "--max-restarts", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "deterministic failure" in result.stderr and "checkpoints are kept" in result.stderr
    assert "InjectedFailure: injected exception at step 3" in result.stdout  # the traceback
    assert "attempts" in result.stdout and "exception" in result.stdout  # the attempt table
    table = attempts(run_dir)
    assert [(a["cause"], a["failed_host"]) for a in table] == [("exception", 1), ("exception", 1)]
    assert committed_steps(run_dir) == [2], "checkpoints are kept"
    failure = events(run_dir, "failure")[0]
    assert "rank 1" in failure["traceback"] or "host 1" in result.stdout


def test_budget_spent_exits_nonzero_with_the_attempt_table(tmp_path):
    run_dir = tmp_path / "run"
    result = launch("--hosts", "2", *SHORT_RUN, "--run-dir", str(run_dir),
                    "--inject", "crash@step=4,host=1,times=10", "--max-restarts", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "restart budget spent" in result.stderr
    assert [a["cause"] for a in attempts(run_dir)] == ["crashed", "crashed"]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(reference_run, copy_of):
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
    assert summary(run_dir)["final_step"] == 40
    assert "fell back" in result.stdout


def _resume_on(hosts_before: int, hosts_after: int, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = start("--hosts", str(hosts_before), *SHORT_RUN, "--run-dir", str(run_dir))
    code, out, err = stop_with_sigterm_after(proc, run_dir, 8)
    assert code == 143, out + err
    result = launch("--resume", "--run-dir", str(run_dir), "--hosts", str(hosts_after))
    assert result.returncode == 0, result.stdout + result.stderr
    restored = events(run_dir, "restored")[0]
    assert restored["saved_topology"]["num_hosts"] == hosts_before
    assert restored["mesh"] == {"data": hosts_after, "model": 2}
    # the (256, 64) embedding is sharded (model, data): its shard follows the new data axis
    assert restored["embedding_shard_shape"] == [128, 64 // hosts_after]
    assert summary(run_dir)["process_count"] == hosts_after
    # Same global batch every step, only the data-parallel split changes: the losses agree up to
    # float32 summation order (|delta| ~ 1e-6 per step, bounded here by 1e-3 over 30 steps).
    ours, reference = trajectory(run_dir), trajectory(reference_run)
    assert ours.keys() == reference.keys()
    assert max(abs(ours[s] - reference[s]) for s in ours) < 1e-3


def test_resume_on_fewer_hosts(reference_run, tmp_path):
    _resume_on(4, 2, reference_run, tmp_path)


def test_resume_on_more_hosts(reference_run, tmp_path):
    _resume_on(2, 4, reference_run, tmp_path)


def test_preemption_notice_to_a_host_restarts_without_losing_a_step(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    result = launch("--hosts", "2", *SHORT_RUN, "--run-dir", str(run_dir), "--inject", "preempt@step=13,host=1",
                    "--max-restarts", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = attempts(run_dir)
    assert first["cause"] == "preempted"
    assert second["restored_step"] == first["last_step"], "every host saved at the same, last step"
    assert trajectory(run_dir) == trajectory(reference_run)


