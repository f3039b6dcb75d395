"""Hostile conditions: torn records, a full disk, signals to the whole process group, a lost embedded
node, bad numbers. Each gets a clear answer, and nothing committed is lost. (Two launches on one run:
test_tracking.py's trackers test; a SIGKILLed driver's process group: test_memory_tier.py.)"""

import json
import signal

import numpy as np
import pytest

from tests.integration.helpers import (
    DURABLE_ONLY,
    EXAMPLE_RUN,
    MINIMAL,
    SHARED_RAY,
    assert_no_host_left,
    assert_refused,
    attempts,
    committed_steps,
    dashboard_agent,
    events,
    final_arrays,
    launch,
    ray_processes_left,
    signal_after,
    start,
    summary,
    trajectory,
    tree_snapshot,
    wait_for,
)


def test_torn_records_are_skipped_by_the_report_and_by_resume(minimal_reference, copy_of):
    run_dir = copy_of(minimal_reference)
    for name in ("events.jsonl", "metrics.jsonl"):
        with (run_dir / name).open("a") as f:
            f.write('{"event": "attempt_st')  # a driver killed mid-write, or a full disk
    report = launch("report", str(run_dir))
    assert report.returncode == 0 and "goodput" in report.stdout, report.stdout + report.stderr
    assert "is torn or not JSON; skipped it" in report.stderr
    resumed = launch("--resume", "--run-dir", str(run_dir), "--steps", "203")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert sorted(trajectory(run_dir)) == list(range(1, 204))
    assert json.loads((run_dir / "summary.json").read_text())["final_step"] == 203


BIG_STATE = """
import jax


def main(ctx):
    init = lambda: {"w": jax.random.normal(jax.random.key(0), (ctx.config["elements"],))}  # incompressible
    state, start = ctx.restore_or_init(init)
    for step in range(start + 1, ctx.steps + 1):
        state = {"w": state["w"] * 1.5}
        ctx.report(step)
        ctx.maybe_save(step, state)
"""


def test_a_full_disk_stops_at_once_naming_the_filesystem_and_keeps_older_steps(tmp_path, small_filesystem):
    """Room for the records and two checkpoints of 4 MB, not three: the third save fails, the job
    stops at once with exit 1 and one line about the space, spends no restart budget, and keeps the
    two older steps (before, every attempt failed alike until the budget was spent)."""
    entry = tmp_path / "big_state.py"
    entry.write_text(BIG_STATE)
    config = tmp_path / "no-cache.yaml"
    config.write_text("cluster: {compilation_cache: false}\ncheckpoint: {async_save: false}\n")
    mount = small_filesystem(11_000_000)
    run_dir = mount / "run"
    result = launch("--entry", str(entry), "--set", "elements=1000000", "--hosts", "2", "--mesh", "data=-1",
                    "--steps", "3", "--save-every", "1", *DURABLE_ONLY, "--run-dir", str(run_dir),
                    "--max-restarts", "5", "--config", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "the filesystem is full" in line and f"on {mount}" in line and "MB free of" in line, line
    assert "one checkpoint needs about 4 MB" in line, line
    assert len(attempts(run_dir)) == 1 and attempts(run_dir)[0]["cause"] == "storage", "no budget spent"
    assert committed_steps(run_dir) == [1, 2], "older committed steps are intact"


def test_a_run_directory_that_vanishes_stops_the_job_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = start("--hosts", "2", *MINIMAL, "--steps", "2000", "--save-every", "20", *DURABLE_ONLY, "--run-dir",
                 str(run_dir))
    wait_for(lambda: 20 in committed_steps(run_dir), 300, "step 20 committed", proc)
    run_dir.rename(tmp_path / "moved away")  # gone from where the launch writes
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "the run directory is gone" in lines[0], err
    assert "Traceback" not in err


@pytest.mark.own_ray  # no process of the embedded instance is left
@pytest.mark.standby  # nor a spare's
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_whole_process_group_saves_then_resume_is_bit_for_bit(minimal_reference, tmp_path,
                                                                              signum, code):
    """What Slurm's scancel, systemd, a container runtime (SIGTERM) or a terminal's Ctrl-C (SIGINT)
    send: every process of the launcher's group gets it. Ray lives on until the hosts saved. The
    command is the same both times, with `--resume auto`, as a requeued batch job's is: it starts the
    run, then continues it."""
    run_dir = tmp_path / "run"
    command = ("--hosts", "2", *MINIMAL, *EXAMPLE_RUN, "--resume", "auto", "--run-dir", str(run_dir))
    proc = start(*command, new_session=True)
    got, out, err = signal_after(proc, run_dir, 30, signum, group=True)
    assert got == code, out + err
    stopped_at = max(trajectory(run_dir))
    assert committed_steps(run_dir)[-1] == stopped_at, "every host saved the step it stopped at"
    assert attempts(run_dir)[-1]["cause"] == "stopped"
    assert ray_processes_left(run_dir) == []
    with SHARED_RAY.for_these_launches():
        resumed = launch(*command)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [e["resume"] for e in events(run_dir, "launch")] == [False, True]
    assert [e["step"] for e in events(run_dir, "restored")] == [stopped_at]
    assert trajectory(run_dir) == trajectory(minimal_reference), "bit for bit"
    ours, reference = final_arrays(run_dir, 200), final_arrays(minimal_reference, 200)
    assert ours.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)


@pytest.mark.own_ray  # the embedded node is lost
@pytest.mark.standby  # with its spares (StandbyPool.forget)
def test_a_lost_embedded_node_is_restarted_and_the_run_resumes(minimal_reference, tmp_path):
    """The local node's DashboardAgent is SIGKILLed (as an OOM killer might); Ray takes the node
    down. The driver starts a fresh local Ray and resumes from the latest committed step."""
    run_dir = tmp_path / "run"
    proc = start("--hosts", "2", *MINIMAL, *EXAMPLE_RUN, *DURABLE_ONLY, "--run-dir", str(run_dir),
                 "--max-restarts", "0")
    try:
        wait_for(lambda: 20 in committed_steps(run_dir), 300, "step 20 committed", proc)
        dashboard_agent(ray_processes_left(run_dir)).kill()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    first = attempts(run_dir)[0]
    assert first["cause"] == "node_lost", "a lost node, on the preemption budget (max-restarts is 0)"
    assert summary(run_dir)["restarts_by_cause"] == {"node_lost": 1}
    assert trajectory(run_dir) == trajectory(minimal_reference)
    assert ray_processes_left(run_dir) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--hosts", "0"], "--hosts must be at least 1"),
    (["--hang-timeout", "0"], "watchdog.hang_timeout_s must be a finite number above 0, got 0.0"),
    (["--hang-timeout", "nan"], "watchdog.hang_timeout_s must be a finite number above 0, got nan"),
    (["--startup-timeout", "inf"], "watchdog.startup_timeout_s must be a finite number above 0, got inf"),
    (["--capacity-timeout", "-5"], "fault.capacity_timeout_s must be a finite number above 0"),
    (["--chaos", "nan"], "--chaos must be a finite number of seconds above 0"),
    (["--steps", "100000000000000"], "train.steps must be at most 2147483647"),
    (["--mesh", "data=-1,model=3"], "does not divide the 8 devices"),
    (["--global-batch-size", "30"], "not divisible by the data-parallel size 4"),
    (["--model", "huge"], "unknown model preset 'huge'"),
    (["--data", "/nonexistent/corpus.txt"], "no such file or folder"),
    (["--inject", "explode@step=3"], "--inject 'explode@step=3'"),
    (["--min-hosts", "5"], "--min-hosts"),
    (["--entry", "examples/nothing.py:main"], "no such file"),
    (["--set", "nonsense"], "expected KEY=VALUE"),
    (["--steps", "1.5"], "Invalid value for --steps: expected int, got '1.5'"),
    (["--save-every", "often"], "Invalid value for --save-every: expected int or 'auto', got 'often'"),
    (["--straggler-action", "kill"], 'Invalid value "kill" for --straggler-action. Choose from: "warn", "replace".'),
    (["--hang-timeout"], "Parameter --hang-timeout requires an argument."),
    (["--seq-lenght", "64"], "unknown flag --seq-lenght (did you mean --seq-len?)"),
    (["--seq-len", "long"], "--seq-len 'long': expected int like its default 128"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, args, message):
    run_dir = tmp_path / "run"
    assert_refused(launch(*args, "--run-dir", str(run_dir)), message)
    assert not run_dir.exists()


def test_bad_run_directories(tmp_path, minimal_reference):
    afile = tmp_path / "file"
    afile.write_text("x")
    assert_refused(launch("--run-dir", str(afile)), "is a file, not a directory")
    assert_refused(launch("--resume", "--run-dir", str(tmp_path / "nothing")), "does not exist")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert_refused(launch("--resume", "--run-dir", str(tmp_path / "notes")), "holds no run")
    before = tree_snapshot(minimal_reference)
    assert_refused(launch("--hosts", "2", "--run-dir", str(minimal_reference)), "is not empty: pass --resume")
    assert_refused(launch("--resume", "--run-dir", str(minimal_reference), "--set", "learning_rate=0.5"),
                   "would change the run: learning_rate")
    assert_refused(launch("--resume", "--run-dir", str(minimal_reference), "--seed", "3"),
                   "would change the run: seed 0 -> 3; pass --allow-change seed")
    assert tree_snapshot(minimal_reference) == before, "nothing written or deleted"


@pytest.mark.own_ray  # what fits on the embedded instance, refused at once
def test_more_hosts_than_the_cluster_can_place(tmp_path):
    run_dir = tmp_path / "run"
    result = launch("--hosts", "16", "--mesh", "data=-1", "--run-dir", str(run_dir))
    assert_refused(result, "cannot place 16 hosts")
    assert "room for 8" in result.stderr and "--hosts 8" in result.stderr
    assert not run_dir.exists() and str(run_dir) not in result.stdout, "no word of a run directory it removed"


def test_a_long_final_save_is_progress_not_a_hang(tmp_path):
    """A state of 3,000 arrays (as big models have) whose last save outlasts a 1 s hang limit: the
    watchdog counts a save under way as progress (before, the hosts were killed as hung)."""
    entry = tmp_path / "many.py"
    entry.write_text(
        "import jax.numpy as jnp\n"
        "def main(ctx):\n"
        "    init = lambda: {f'w{i}': jnp.zeros((8,)) + i for i in range(3000)}\n"
        "    state, start = ctx.restore_or_init(init)\n"
        "    for step in range(start + 1, ctx.steps + 1):\n"
        "        ctx.report(step)\n"
        "        ctx.maybe_save(step, state)\n")
    run_dir = tmp_path / "run"
    result = launch("--entry", str(entry), "--hosts", "2", "--mesh", "data=-1", "--steps", "3", "--save-every", "3",
                    "--hang-timeout", "1", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    [waited] = events(run_dir, "final_save")
    assert waited["seconds"] > 1, f"the save was too quick to show anything: {waited}"
    assert attempts(run_dir)[0]["cause"] == "finished" and committed_steps(run_dir) == [3]
    assert_no_host_left(run_dir)
