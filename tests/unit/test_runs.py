"""The run directory: records that survive torn lines, atomic files, the lock, committed steps."""

import json
import logging
import os
import pathlib
import subprocess
import sys
import time

import pytest
from jaxlaunch.launcher.records import runs
from jaxlaunch.launcher.records.runs import LOCK_STALE_S, RunDir, RunLockLost

from jaxlaunch.contract import events
from jaxlaunch.contract.layout import committed_steps, read_jsonl
from jaxlaunch.contract.protocol import ConfigError


def test_a_torn_line_is_skipped_with_a_warning_and_the_rest_is_kept(tmp_path, caplog):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "launch", "time": 1}\n{"event": "attempt_st')
    with caplog.at_level(logging.WARNING):
        assert read_jsonl(path) == [{"event": "launch", "time": 1}]
    assert "line 2 is torn" in caplog.text


def test_a_line_whose_time_is_not_a_number_is_skipped_and_a_report_of_the_rest_is_written(tmp_path, caplog):
    from jaxlaunch.launcher import cli

    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "launch", "time": 1}\n{"event": "launch", "time": null}\n'
                    '{"event": "job_ended", "time": "yesterday"}\n')
    with caplog.at_level(logging.WARNING):
        assert read_jsonl(path) == [{"event": "launch", "time": 1}]
    assert "line 2 has a time that is not a number (None)" in caplog.text
    assert cli.main(["report", str(tmp_path)]) == 0 and (tmp_path / "report.png").is_file()
    (tmp_path / "report.png").unlink()
    (tmp_path / "report.png").mkdir()
    assert cli.main(["report", str(tmp_path)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "report.png"], "no temporary file left"


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 8, b'{"event": "zzz", "time": 1}\nnot json\n'])
def test_a_report_of_a_folder_whose_events_record_no_launch_is_one_line_and_writes_nothing(tmp_path, capsys,
                                                                                           content):
    from jaxlaunch.launcher import cli

    (tmp_path / "events.jsonl").write_bytes(content)
    assert cli.main(["report", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert (out.out + out.err).strip().splitlines() == [
        f"error: {tmp_path} is not a run directory (its events.jsonl records no launch); pass the --run-dir of "
        f"a launch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl"]


def test_appending_after_a_torn_line_starts_a_new_line(tmp_path):
    run = RunDir(tmp_path)
    run.events_path.write_text('{"event": "launch", "time": 1}\n{"event": "torn')
    run.event(events.AttemptStarted(attempt=1))
    assert [e.kind for e in run.events()] == ["launch", "attempt_started"]


def test_non_finite_numbers_are_written_as_null(tmp_path):
    run = RunDir(tmp_path)
    run.metrics([{"step": 1, "loss": float("nan")}, {"step": 2, "loss": float("inf")}])
    assert [json.loads(line)["loss"] for line in run.metrics_path.read_text().splitlines()] == [None, None]


def test_summary_and_config_are_written_whole(tmp_path):
    run = RunDir(tmp_path)
    run.write_summary({"status": "finished"})
    run.save_config({"num_hosts": 2})
    assert json.loads(run.summary_path.read_text()) == {"status": "finished"}
    assert run.load_config() == {"num_hosts": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "summary.json"], "no temporary left"


def test_a_torn_config_is_a_clear_error(tmp_path):
    run = RunDir(tmp_path)
    run.config_path.write_text('{"num_hosts": ')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        run.load_config()


def test_storage_errors_are_named_with_their_filesystem(tmp_path):
    import errno

    from jaxlaunch.contract import storage

    assert storage.storage_errno(ValueError("write failed: No space left on device")) == errno.ENOSPC
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system")
    assert storage.storage_errno(wrapped) == errno.EROFS
    assert storage.storage_errno(ValueError("bad shape")) is None
    line = storage.describe_storage_error(tmp_path / "gone" / "checkpoints", errno.ENOENT, 5_000_000)
    assert "the run directory is gone" in line and "MB free of" in line and "about 5 MB" in line


def test_a_compilation_cache_others_can_write_is_not_used(tmp_path):
    from jaxlaunch.workers.runtime import private_directory

    assert private_directory(tmp_path / "mine") is None and oct((tmp_path / "mine").stat().st_mode)[-3:] == "700"
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert "writable by its group or by others" in private_directory(shared)


def test_committed_steps_need_orbax_s_commit_marker(tmp_path):
    for step, committed in ((10, True), (20, True), (30, False)):
        (tmp_path / str(step)).mkdir()
        if committed:
            (tmp_path / str(step) / "_CHECKPOINT_METADATA").write_text("{}")
    (tmp_path / "40.orbax-checkpoint-tmp-123").mkdir()
    assert committed_steps(tmp_path) == [20, 10]


def test_a_second_launch_is_refused_naming_the_holder(tmp_path):
    first = RunDir(tmp_path).lock()
    first.acquire()
    try:
        with pytest.raises(ConfigError, match=rf"in use by the launch of pid {os.getpid()} on .* since"):
            RunDir(tmp_path).lock().acquire()
    finally:
        first.release()
    assert not (tmp_path / ".lock").exists()
    second = RunDir(tmp_path).lock()
    second.acquire()
    second.release()


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    # A launch that exits without releasing its lock, as a killed one would.
    code = f"from jaxlaunch.launcher.records.runs import RunDir; RunDir({str(tmp_path)!r}).lock().acquire()"
    holder = subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[2])
    assert holder.returncode == 0 and (tmp_path / ".lock").exists()
    lock = RunDir(tmp_path).lock()
    lock.acquire()
    assert lock.took_over is not None and lock.took_over["pid"] != os.getpid()
    lock.release()


def test_a_lock_not_refreshed_for_long_is_stale_on_any_host(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": "another-machine", "pid": 1, "since": 0}))
    lock = RunDir(tmp_path).lock()
    with pytest.raises(ConfigError, match="another-machine"):
        lock.acquire()
    old = time.time() - LOCK_STALE_S - 5
    os.utime(tmp_path / ".lock", (old, old))
    lock.acquire()
    assert lock.took_over["host"] == "another-machine"
    lock.release()


def test_a_live_launch_on_this_host_keeps_its_lock_however_old(tmp_path):
    """A launch stopped with Ctrl-Z, or on a laptop that slept, has not refreshed its lock for minutes:
    its pid is alive on this host, so it still holds the run (before, age alone let another take it)."""
    first = RunDir(tmp_path).lock()
    first.acquire()
    try:
        old = time.time() - LOCK_STALE_S - 60
        os.utime(tmp_path / ".lock", (old, old))
        with pytest.raises(ConfigError, match=rf"in use by the launch of pid {os.getpid()}"):
            RunDir(tmp_path).lock().acquire()
    finally:
        first.release()


def test_a_launch_whose_lock_was_taken_finds_out_and_writes_nothing_over_the_new_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "LOCK_REFRESH_S", 0.01)
    lock = RunDir(tmp_path).lock()
    lock.acquire()
    theirs = json.dumps({"host": "another-machine", "pid": 9, "since": 1.0, "token": "theirs"}).encode()
    (tmp_path / ".lock").write_bytes(theirs)  # taken by a launch that judged this one dead
    lock._thread.join(30)  # the refresh that finds it taken ends the refreshing
    assert not lock._thread.is_alive()
    with pytest.raises(RunLockLost, match="was taken by the launch of pid 9 on another-machine"):
        lock.check()
    lock.release()
    assert (tmp_path / ".lock").read_bytes() == theirs, "neither refreshed over nor released"


def test_a_launch_whose_lock_another_took_stops_at_once_with_no_save(tmp_path):
    """The driver's loop ends on the loss at its next poll: the group torn down, no stop agreed (so no
    save into the run the other launch now holds), and RunLockLost for the command line (exit 1)."""
    from jaxlaunch.launcher.runner import LockWatch

    from tests.unit.fakes import make_driver, trains_to

    lock = RunDir(tmp_path).lock()

    def taken_at_3(group, i):
        if i == 3:
            lock.lost = {"host": "another-machine", "pid": 9}
        return trains_to(10)(group, i)
    driver, log, _, _ = make_driver([taken_at_3], listeners=[LockWatch(lock)])
    with pytest.raises(RunLockLost, match="stopped at once, saving and writing nothing more"):
        driver.run()
    assert log == [("start", 1, 2), ("shutdown", 1)] and driver.attempts[0].last_step <= 3


def test_a_launch_whose_lock_is_taken_while_it_waits_for_room_stops_at_its_next_step(tmp_path):
    """Waiting for capacity makes no poll and no transition for minutes: the lock is looked at before
    every step of the driver's loop."""
    from jaxlaunch.launcher.control.states import AwaitingCapacity
    from jaxlaunch.launcher.runner import LockWatch

    from tests.unit.fakes import make_driver, trains_to

    lock = RunDir(tmp_path).lock()
    driver, log, _, _ = make_driver([trains_to(3)], placeable=0, listeners=[LockWatch(lock)])
    for _ in range(5):
        driver.step()
    assert isinstance(driver.state, AwaitingCapacity)
    lock.lost = {}  # deleted
    with pytest.raises(RunLockLost, match="was deleted"):
        driver.step()
    assert log == []


def test_a_lock_that_names_no_launch_is_said_so(tmp_path):
    (tmp_path / ".lock").write_bytes(b"")
    with pytest.raises(ConfigError, match="has a lock that names no launch \\(written 0 s ago\\); it counts as a "
                                          "dead launch's 60 s after that"):
        RunDir(tmp_path).lock().acquire()


def test_a_refused_launch_removes_the_folders_it_made_and_none_it_found(tmp_path):
    from jaxlaunch.launcher import runner

    run = tmp_path / "nest" / "a" / "b" / "run"
    made = runner._first_missing(run)
    assert made == tmp_path / "nest"
    run.mkdir(parents=True)
    runner._remove_if_empty(run, made)
    assert list(tmp_path.iterdir()) == [], "nest/a/b, made for the run, are gone with it"
    (tmp_path / "kept" / "a").mkdir(parents=True)
    (tmp_path / "kept" / "note").write_text("the user's")
    run = tmp_path / "kept" / "a" / "run"
    made = runner._first_missing(run)
    run.mkdir()
    runner._remove_if_empty(run, made)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["a", "note"], "folders found are left"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, ConnectionError])
def test_a_launch_stopped_while_it_joins_ray_or_waits_for_capacity_stops_what_it_started(tmp_path, monkeypatch, stop):
    """Ctrl-C during the capacity wait (or a failed join of an embedded instance): the Ray instance
    it started is stopped and the autoscaler's request withdrawn (`RayCluster.shutdown`)."""
    from jaxlaunch.launcher import runner
    from jaxlaunch.launcher.configuration.job import prepare

    calls = []

    class Cluster:
        def __init__(self, cfg, env):
            pass

        def connect(self):
            calls.append("connect")

        def request_hosts(self, n):
            calls.append(f"request {n}")

        def shutdown(self):
            calls.append("shutdown")

    def wait(cluster, job, waiting):
        raise stop()

    monkeypatch.setattr(runner, "RayCluster", Cluster)
    monkeypatch.setattr(runner, "wait_for_capacity", wait)
    prepared = prepare({"run_dir": str(tmp_path / "run"), "hosts": 1, "mesh": "data=-1"})
    with pytest.raises(stop):
        runner._run_job(prepared, None, None)
    assert calls == ["connect", "request 1", "shutdown"]


def test_ray_already_initialized_in_this_process_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The user's own ray.init, or another launch still running in this process: the launch's ray.init
    failed after the run directory was made, and its ray.shutdown cut the other one's connection (a
    launch in a thread then lost its actors mid-training, with no summary)."""
    from jaxlaunch.launcher import runner
    from jaxlaunch.launcher.cluster import ray_cluster
    from jaxlaunch.launcher.configuration.job import prepare

    shutdowns = []
    monkeypatch.setattr(ray_cluster.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray_cluster.ray, "shutdown", lambda: shutdowns.append(1))
    prepared = prepare({"run_dir": str(tmp_path / "run"), "hosts": 1, "mesh": "data=-1"})
    with pytest.raises(ConfigError, match="Ray is already initialized in this process"):
        runner.run_job(prepared)
    assert not (tmp_path / "run").exists() and shutdowns == []


def test_a_launch_that_fails_between_taking_the_lock_and_joining_ray_releases_the_lock(tmp_path, monkeypatch):
    """A full /tmp when the code to ship is staged: the lock stayed held, and refreshed, for the life of
    the process, so the next launch of the run in it (a notebook's) was refused naming its own pid."""
    import tempfile

    from jaxlaunch.launcher import runner
    from jaxlaunch.launcher.configuration.job import prepare

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", full)
    prepared = prepare({"run_dir": str(tmp_path / "run"), "hosts": 1, "mesh": "data=-1", "address": "local"})
    with pytest.raises(OSError, match="No space left"):
        runner._run_job(prepared, None, None)
    lock = RunDir(tmp_path / "run").lock()
    lock.acquire()  # not "in use by the launch of pid <this one>"
    lock.release()


def test_every_step_of_the_teardown_runs_whatever_an_earlier_one_raised(tmp_path, monkeypatch):
    """A Ctrl-C in the keepers' close (the notebook's stop button): the display was left running, and
    no summary, report or job_ended was written, nor the trackers closed."""
    import types

    from jaxlaunch.launcher import runner

    calls = []

    def step(name, raises=None):
        def run():
            calls.append(name)
            if raises is not None:
                raise raises
        return run

    parts = types.SimpleNamespace(
        driver=types.SimpleNamespace(run=lambda: calls.append("run") or 0, stop=lambda *a: None),
        standby=types.SimpleNamespace(shutdown=step("standby")),
        keepers=types.SimpleNamespace(shutdown=step("keepers", KeyboardInterrupt())),
        display=types.SimpleNamespace(stop=step("display")))
    lock = types.SimpleNamespace(lost=None, check=lambda: None)
    monkeypatch.setattr(runner, "_build", lambda *args: parts)
    monkeypatch.setattr(runner, "_finish", lambda parts, code: calls.append(f"finish {code}"))
    with pytest.raises(KeyboardInterrupt):
        runner._drive(None, None, None, None, None, lock, None, None)
    assert calls == ["run", "standby", "keepers", "display", "finish 0"]


def test_sigterm_while_a_launch_starts_or_ends_unwinds_it_and_exits_143(tmp_path, monkeypatch):
    """Outside the driver's loop (joining Ray, the records at the end) SIGTERM took Python's default:
    the process ended at once (-15, not 143), the run's lock and the code staged for a cluster left
    behind. It now unwinds the launch as a Ctrl-C does, and the handler before it is back after."""
    import signal

    from jaxlaunch.launcher import cli, runner

    unwound = []

    def run_job(prepared):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the launch")
        finally:
            unwound.append(True)

    monkeypatch.setattr(runner, "run_job", run_job)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["--run-dir", str(tmp_path / "run"), "--hosts", "1"]) == 143
    assert unwound == [True] and signal.getsignal(signal.SIGTERM) is before
