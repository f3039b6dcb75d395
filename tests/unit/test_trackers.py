"""Experiment trackers fed by the recorder, against a real MLflow store (SQLite) and W&B in offline
mode: one tracker run across launches, each step once, failures as tags and notes, a tracker that is
down never stopping the run."""

import dataclasses
import json
import time

import pytest
from jaxlaunch.launcher.records.recorder import Recorder
from jaxlaunch.launcher.records.runs import RunDir
from jaxlaunch.launcher.views import tracker_backends, trackers
from jaxlaunch.launcher.views.trackers import Trackers

from jaxlaunch.contract import events
from jaxlaunch.contract.protocol import ConfigError
from tests.integration.helpers import wandb_history

SETTINGS = {"entry": "examples/minimal.py:main", "train": {"steps": 15, "seed": 0}, "config": {"lr": 0.1}}


def loss(step, attempt=1):
    return 1.0 / step + 0.001 * attempt


def records(steps, attempt=1):
    return [{"step": s, "loss": loss(s, attempt), "step_time_s": 0.01, "attempt": attempt, "time": 1000.0 + s}
            for s in steps]


def launch(run, names, resume, steps_and_attempts, status, warnings=None, fail_after=None):
    """One launch of the run as the driver records it: a launch event, then attempts of records,
    a failure and a restart between attempts; then the trackers are closed with the status."""
    run.event(events.Launch(num_hosts=2, resume=resume))
    sink = Trackers(run, names, SETTINGS, (warnings if warnings is not None else []).append)
    recorder = Recorder(run, lambda n: {"data": n}, sinks=[sink])
    for i, (steps, attempt) in enumerate(steps_and_attempts):
        if i:
            recorder.event(events.Failure(attempt=attempt - 1, cause=events.FailureKind.CRASHED, host=1,
                                          step=steps[0] + 2, message="host 1 exited with SIGKILL\ndetails"))
            recorder.event(events.Restarting(reason="crashed (1 of 3 restarts)", backoff_s=0.0))
        recorder.metrics(records(steps, attempt))
        # A restart takes seconds: the trackers have the attempt's steps before the next one begins.
        last = max(steps)
        _wait_until(lambda last=last: all(s.logged_step >= last for s in sink.senders), "the attempt's steps sent")
    recorder.close()
    sink.close(status, {"final_step": steps_and_attempts[-1][0][-1], "goodput": 0.5})
    return sink


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def mlflow_env(mlflow_db, monkeypatch, request):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", request.node.name)
    from mlflow import MlflowClient

    return MlflowClient()


def only_run(client, name):
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    return runs[0]


def test_mlflow_one_run_across_a_restart_and_a_resume_each_step_once(tmp_path, mlflow_env, request):
    run = RunDir(tmp_path / "run")
    run.create()
    # Launch 1: steps 1-10, a crash, steps 6-12 recomputed after restoring step 5; stopped.
    launch(run, ["mlflow"], False, [(range(1, 11), 1), (range(6, 13), 2)], "stopped")
    # Launch 2 (--resume): restored step 10, steps 11-15 again, then finished.
    launch(run, ["mlflow"], True, [(range(11, 16), 3)], "finished")

    found = only_run(mlflow_env, request.node.name)
    history = mlflow_env.get_metric_history(found.info.run_id, "train/loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, 16)), "each step exactly once"
    by_step = {m.step: m.value for m in history}
    assert by_step[8] == pytest.approx(loss(8, 1)) and by_step[12] == pytest.approx(loss(12, 2))
    assert by_step[15] == pytest.approx(loss(15, 3))
    assert found.data.params["train.steps"] == "15" and found.data.params["config.lr"] == "0.1"
    tags = found.data.tags
    assert tags["jaxlaunch.failure.attempt_1"] == "cause=crashed host=1 step=8"
    assert tags["jaxlaunch.restarts.crashed"] == "1" and tags["jaxlaunch.launches"] == "2"
    assert "attempt 1 failed: crashed, host 1, step 8: host 1 exited with SIGKILL" in tags["mlflow.note.content"]
    assert "launch resumed" in tags["mlflow.note.content"]
    assert tags["jaxlaunch.status"] == "finished" and found.info.status == "FINISHED"
    state = json.loads((run.path / trackers.STATE_FILE).read_text())
    assert state["mlflow"]["run_id"] == found.info.run_id and state["mlflow"]["logged_step"] == 15


def test_steps_a_launch_did_not_send_are_sent_by_the_next(tmp_path, mlflow_env, request, monkeypatch):
    """The driver was killed before its tracker took the last steps: they are in metrics.jsonl, past
    the mark, and the next launch sends them first, once."""
    run = RunDir(tmp_path / "run")
    run.create()
    launch(run, ["mlflow"], False, [(range(1, 6), 1)], "stopped")
    run.metrics(records(range(6, 9), 1))  # recorded, never sent: the driver died
    launch(run, ["mlflow"], True, [(range(9, 11), 2)], "finished")
    found = only_run(mlflow_env, request.node.name)
    steps = sorted(m.step for m in mlflow_env.get_metric_history(found.info.run_id, "train/loss"))
    assert steps == list(range(1, 11))


class Flaky(tracker_backends.Mlflow):
    """MLflow that is down while `down` is set, as a server that is restarting."""

    down = True

    def log(self, records):
        if Flaky.down:
            raise ConnectionError("Connection refused")
        super().log(records)


def test_a_tracker_that_is_down_warns_once_and_catches_up(tmp_path, mlflow_env, request, monkeypatch):
    monkeypatch.setattr(trackers, "RETRY_INTERVAL_S", 0.05)
    monkeypatch.setattr(trackers, "SEND_INTERVAL_S", 0.05)
    run = RunDir(tmp_path / "run")
    run.create()
    run.event(events.Launch(num_hosts=2, resume=False))
    warnings = []
    Flaky.down = True
    sink = Trackers(run, ["mlflow"], SETTINGS, warnings.append, backends={"mlflow": Flaky()})
    recorder = Recorder(run, lambda n: {"data": n}, sinks=[sink])
    sender = sink.senders[0]
    recorder.metrics(records(range(1, 6)))
    _wait_until(lambda: sender.down, "the first failure")
    recorder.metrics(records(range(6, 11)))
    _wait_until(lambda: sender.down, "more failures")
    assert len(warnings) == 1 and "not reachable (ConnectionError: Connection refused)" in warnings[0]
    Flaky.down = False
    _wait_until(lambda: sender.logged_step == 10, "catching up")
    recorder.metrics(records(range(11, 13)))
    sink.close("finished", {"final_step": 12, "goodput": None})
    assert len(warnings) == 2 and "answers again" in warnings[1]
    found = only_run(mlflow_env, request.node.name)
    steps = sorted(m.step for m in mlflow_env.get_metric_history(found.info.run_id, "train/loss"))
    assert steps == list(range(1, 13))


def three_steps_to(tmp_path, backend):
    """A launch of 3 steps whose one tracker is `backend`, ended: (its run, the trackers, their warnings)."""
    run = RunDir(tmp_path / "run")
    run.create()
    warnings = []
    sink = Trackers(run, ["mlflow"], SETTINGS, warnings.append, backends={"mlflow": backend})
    Recorder(run, lambda n: {"data": n}, sinks=[sink]).metrics(records(range(1, 4)))
    sink.close("finished", {"final_step": 3, "goodput": None})
    return run, sink, warnings


def test_a_tracker_that_never_answers_leaves_its_steps_for_the_next_launch(tmp_path, monkeypatch):
    """A tracker that hangs (an HTTP client retrying for minutes) and has answered nothing in this
    launch holds up its end for FIRST_ANSWER_S from its first call (at least DOWN_CLOSE_TIMEOUT_S),
    not CLOSE_TIMEOUT_S (20 s), and says once what happened."""
    import threading

    monkeypatch.setattr(trackers, "DOWN_CLOSE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(trackers, "FIRST_ANSWER_S", 0.2)
    monkeypatch.setattr(trackers, "CLOSE_TIMEOUT_S", 120.0)  # longer than the hang: waiting would outlast it
    release = threading.Event()

    class Hanging(tracker_backends.Mlflow):
        def start(self, run_id, name):
            release.wait(60)
            raise ConnectionError("gave up")

    run, sink, warnings = three_steps_to(tmp_path, Hanging())
    assert sink.senders[0].thread.is_alive(), "the launch ended while the tracker's call still hung"
    release.set()
    assert len(warnings) == 2, warnings
    assert "not reachable" in warnings[0] and "3 steps were not sent to mlflow" in warnings[1]
    assert not (run.path / trackers.STATE_FILE).exists()


def test_a_tracker_slow_to_answer_its_first_call_still_gets_the_launch_s_records(tmp_path, mlflow_env, request,
                                                                                monkeypatch):
    """A tracker whose first call takes longer than DOWN_CLOSE_TIMEOUT_S but answers within
    FIRST_ANSWER_S (a W&B run's start online) is waited for at the end of a short launch: its run
    gets every step, with no warning."""
    monkeypatch.setattr(trackers, "DOWN_CLOSE_TIMEOUT_S", 0.05)
    monkeypatch.setattr(trackers, "FIRST_ANSWER_S", 10.0)

    class Slow(tracker_backends.Mlflow):
        def start(self, run_id, name):
            time.sleep(0.5)  # the slow first answer this test is about, not a synchronisation
            return super().start(run_id, name)

    _, _, warnings = three_steps_to(tmp_path, Slow())
    assert warnings == []
    found = only_run(mlflow_env, request.node.name)
    assert sorted(m.step for m in mlflow_env.get_metric_history(found.info.run_id, "train/loss")) == [1, 2, 3]


def _wait_until(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_wandb_offline_one_run_across_a_restart_and_a_resume_each_step_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "jaxlaunch-test")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = RunDir(tmp_path / "run")
    run.create()
    launch(run, ["wandb"], False, [(range(1, 11), 1), (range(6, 13), 2)], "stopped")
    launch(run, ["wandb"], True, [(range(11, 16), 3)], "finished")

    _, run_ids, rows, runs = wandb_history(run.path)
    state = json.loads((run.path / trackers.STATE_FILE).read_text())
    assert run_ids == {state["wandb"]["run_id"]}, "every launch continues the same W&B run"
    steps = [row["_step"] for row in rows]
    assert sorted(steps) == list(range(1, 16)), "each step exactly once"
    by_step = {row["_step"]: row["train/loss"] for row in rows}
    assert by_step[8] == pytest.approx(loss(8, 1)) and by_step[15] == pytest.approx(loss(15, 3))
    configs = [r["config"]["update"] for r in runs if "config" in r]
    assert any(c.get("train", {}).get("steps") == "15" for c in configs)
    notes = [r["notes"] for r in runs if r.get("notes")]
    assert any("attempt 1 failed: crashed, host 1, step 8" in n and "finished at step 15" in n for n in notes)


def test_an_unknown_or_missing_tracker_is_bad_input(monkeypatch):
    with pytest.raises(ConfigError, match="is not one of mlflow, wandb"):
        trackers.check_trackers(["neptune"])
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r'pip install "jaxlaunch\[wandb\]"'):
        trackers.check_trackers(["wandb"])


def test_the_cli_refuses_a_missing_tracker_package_before_anything(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")  # the command line imports Ray's client library on its way to a launch
    from jaxlaunch.launcher import cli

    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    code = cli.main(["--tracker", "mlflow", "--run-dir", str(tmp_path / "run"), "--hosts", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "jaxlaunch[mlflow]"' in err
    assert not (tmp_path / "run").exists()


def test_flags_set_the_tracking_section(tmp_path):
    from jaxlaunch.launcher import cli
    from jaxlaunch.launcher.configuration import job

    _, given, rest = cli.parse(["--tracker", "mlflow,wandb", "--metrics-port", "9100", "--run-dir",
                                str(tmp_path / "run"), "--hosts", "1", "--mesh", "data=-1"])
    prepared = job.prepare(given, rest)
    assert prepared.job.tracking.trackers == ("mlflow", "wandb") and prepared.job.tracking.metrics_port == 9100
    assert job.prepare({"run_dir": str(tmp_path / "run"), "hosts": 1, "mesh": {"data": -1},
                        "trackers": ["wandb"]}).job.tracking.trackers == ("wandb",)


def test_a_config_file_names_trackers_as_a_list_or_one_name():
    from jaxlaunch.launcher.configuration.schema import JobConfig, TrackingConfig, apply, validate

    job = apply(JobConfig(), {"tracking": {"trackers": "mlflow"}, "mesh": {"data": -1}}, "job.yaml")
    assert job.tracking.trackers == ("mlflow",)
    with pytest.raises(ConfigError, match=r"job.yaml.tracking.trackers must be a list of str, got \[3\]"):
        apply(JobConfig(), {"tracking": {"trackers": [3]}, "mesh": {"data": -1}}, "job.yaml")
    with pytest.raises(ConfigError, match="tracking.trackers.0: input should be a valid string, got 3"):
        validate(JobConfig(tracking=TrackingConfig(trackers=(3,))))  # type: ignore[arg-type]


def test_a_straggler_s_replacement_is_a_restart_in_the_trackers_tags_as_in_the_summary(tmp_path):
    """summary.json counted {"replace": 1}; MLflow and W&B showed jaxlaunch.restarts 0, since the
    trackers kept only the events their notes print."""
    from jaxlaunch.launcher.records.history import restarts_by_cause

    run = RunDir(tmp_path)
    run.create()
    replaced = events.HostReplacement(attempt=1, host=1, node="n1", reason=events.EventKind.STRAGGLER, avoided=True)
    run.event(events.Launch(time=1.0))
    run.event(dataclasses.replace(replaced, time=2.0))
    sink = Trackers(run, [], SETTINGS, lambda text: None)  # an earlier launch's replacement, read back
    sink.on_event(dataclasses.replace(replaced, attempt=2, time=3.0))  # and one of this launch
    tags, _ = trackers.tags_and_notes(sink.events)
    assert restarts_by_cause(run.events() + [replaced]) == {"replace": 2}
    assert (tags["jaxlaunch.restarts"], tags["jaxlaunch.restarts.replace"]) == ("2", "2")


def test_a_later_launch_sends_the_run_s_result_not_the_steps_a_rollback_threw_away(tmp_path):
    """Attempt 1 trained to step 8, attempt 2 restored step 5 and was stopped at 6 before the tracker
    got anything: the next launch sends steps 1-6, step 6 of attempt 2, and not attempt 1's 7-8."""
    run = RunDir(tmp_path)
    run.create()
    run.event(events.Launch(time=1.0))
    run.metrics([{"step": s, "loss": 10.0 - s, "attempt": 1, "time": 1.0 + s} for s in range(1, 9)])
    run.event(events.Restored(step=5, attempt=2, time=20.0))
    run.metrics([{"step": 6, "loss": 0.5, "attempt": 2, "time": 21.0}])
    sink = Trackers(run, [], SETTINGS, lambda text: None)
    assert [(r["step"], r["attempt"]) for r in sink._unsent(0)] == [(s, 1) for s in range(1, 6)] + [(6, 2)]


class Remembering:
    """A tracker kept in memory that is down until `up` is set: what it took, step by step."""

    name = "mlflow"

    def __init__(self):
        import threading

        self.up, self.logged, self.status = threading.Event(), [], None

    def new_id(self):
        return "run-1"

    def start(self, run_id, name):
        return run_id

    def log_params(self, params):
        pass

    def log(self, records):
        if not self.up.is_set():
            raise ConnectionError("Connection refused")
        self.logged += [(r["step"], r["attempt"]) for r in records]

    def annotate(self, tags, notes):
        pass

    def finish(self, status):
        self.status = status


@pytest.mark.parametrize("restored", [True, False], ids=["restored", "began-anew"])
def test_a_rollback_in_this_launch_never_sends_the_unsent_steps_it_threw_away(tmp_path, monkeypatch, restored):
    """Attempt 1 trained to step 8 while the tracker was down; attempt 2 restored step 5 (or began anew
    from step 0) and was stopped at step 6. The tracker, back up, gets the run's result: attempt 2's
    steps, never attempt 1's 7-8 that summary.json and a --resume know nothing of."""
    monkeypatch.setattr(trackers, "RETRY_INTERVAL_S", 0.02)
    monkeypatch.setattr(trackers, "SEND_INTERVAL_S", 0.02)
    run = RunDir(tmp_path)
    run.create()
    run.event(events.Launch(time=1.0))
    backend = Remembering()
    sink = Trackers(run, ["mlflow"], SETTINGS, lambda text: None, backends={"mlflow": backend})
    recorder = Recorder(run, lambda n: {"data": n}, sinks=[sink])
    recorder.metrics(records(range(1, 9), attempt=1))
    _wait_until(lambda: sink.senders[0].down, "the tracker found down")
    start = 5 if restored else 0
    if restored:
        recorder.event(events.Restored(step=5, attempt=2, rank=0))
    recorder.metrics(records(range(start + 1, 7), attempt=2))
    backend.up.set()
    recorder.close()
    sink.close("stopped", {"final_step": 6, "goodput": None})
    expected = [(s, 1) for s in range(1, start + 1)] + [(s, 2) for s in range(start + 1, 7)]
    assert backend.logged == expected and backend.status == "stopped"


def test_an_earlier_attempt_s_record_arriving_after_the_rollback_is_never_sent(tmp_path, monkeypatch):
    """Attempt 2 began anew from step 0 while attempt 1's step 3 was still on its way: step 3 of
    attempt 1, arriving in the same batch after attempt 2's first record, is thrown-away work too."""
    monkeypatch.setattr(trackers, "SEND_INTERVAL_S", 0.02)
    run = RunDir(tmp_path)
    run.create()
    backend = Remembering()
    sink = Trackers(run, ["mlflow"], SETTINGS, lambda text: None, backends={"mlflow": backend})
    sink.on_records(records(range(1, 3), attempt=1) + records([1], attempt=2) + records([3], attempt=1)
                    + records([2], attempt=2))
    backend.up.set()
    sink.close("stopped", {"final_step": 2, "goodput": None})
    assert backend.logged == [(1, 2), (2, 2)]


def test_a_launch_whose_lock_another_took_stops_sending_to_its_trackers(tmp_path, monkeypatch):
    """Another launch holds the run, and sends its records to the same tracker run from the mark it
    finds: this launch's senders stop at once (their threads end), and send nothing more."""
    monkeypatch.setattr(trackers, "SEND_INTERVAL_S", 0.02)
    run = RunDir(tmp_path)
    run.create()
    backend = Remembering()
    backend.up.set()
    sink = Trackers(run, ["mlflow"], SETTINGS, lambda text: None, backends={"mlflow": backend})
    sink.on_records(records(range(1, 4)))
    _wait_until(lambda: sink.senders[0].logged_step == 3, "the first steps sent")
    sink.abandon()
    sink.senders[0].thread.join(30)
    assert not sink.senders[0].thread.is_alive(), "the sender's thread outlived the loss of the lock"
    sink.on_records(records(range(4, 6)))
    assert backend.logged == [(1, 1), (2, 1), (3, 1)] and backend.status is None, "nothing more, no run finished"
