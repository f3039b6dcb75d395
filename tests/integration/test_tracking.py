"""Following a run while it goes: MLflow (a real SQLite store) and W&B (offline mode) across a killed
host and a --resume, and the Prometheus endpoint during a restart with a tracker that is down."""

import signal
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.helpers import (
    EXAMPLE_RUN,
    MINIMAL,
    assert_refused,
    events,
    last_step,
    launch,
    start,
    summary,
    trajectory,
    wait_for,
    wandb_history,
)

SCRAPE_TIMEOUT_S = 300
NEVER_REACHED_STEPS = 100_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trackers_keep_one_run_with_each_step_once_across_a_kill_and_a_resume(tmp_path, monkeypatch):
    """Also, while the first launch runs (past its restart): a second launch on its run directory is
    refused in one line naming the first, which goes on undisturbed and releases the directory when
    it stops."""
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "jaxlaunch-it")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "jaxlaunch-it")
    # A first launch far longer than the test waits for, so the SIGTERM always lands mid-run (with 200
    # steps the fast example sometimes finished before the driver's stop step: exit 0, not 143).
    proc = start(*MINIMAL, "--steps", str(NEVER_REACHED_STEPS), "--save-every", "20", "--hosts", "2",
                 "--inject", "kill@step=30,host=1", "--tracker", "mlflow", "--tracker", "wandb",
                 "--run-dir", str(run_dir))
    try:
        wait_for(lambda: last_step(run_dir) >= 100, 300, "step 100", proc)
        second = launch("--resume", "--hosts", "2", *MINIMAL, "--run-dir", str(run_dir))
        assert_refused(second, f"is in use by the launch of pid {proc.pid} on")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out + err
    assert len(events(run_dir, "launch")) == 1 and not (run_dir / ".lock").exists(), "released at the end"
    stopped_at = summary(run_dir)["final_step"]
    end = stopped_at + 40
    resumed = launch("--resume", "--run-dir", str(run_dir), "--steps", str(end))  # the run keeps its trackers
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert events(run_dir, "restored")[-1]["step"] == stopped_at, "the stop's save, untouched by the refused launch"
    expected = trajectory(run_dir)
    assert sorted(expected) == list(range(1, end + 1))
    failure = events(run_dir, "failure")[0]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("jaxlaunch-it").experiment_id])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, end + 1)), "each step exactly once"
    assert all(m.value == pytest.approx(expected[m.step], abs=1e-6) for m in history)
    tags = runs[0].data.tags
    assert tags[f"jaxlaunch.failure.attempt_{failure['attempt']}"] == f"cause=crashed host=1 step={failure['step']}"
    assert tags["jaxlaunch.restarts.crashed"] == "1" and tags["jaxlaunch.launches"] == "2"
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["train.steps"] == str(NEVER_REACHED_STEPS)

    _, run_ids, rows, _ = wandb_history(run_dir)
    assert len(run_ids) == 1, "every launch continues the same W&B run"
    assert sorted(row["_step"] for row in rows) == list(range(1, end + 1)), "each step exactly once"
    assert all(row["train/loss"] == pytest.approx(expected[row["_step"]], abs=1e-6) for row in rows)


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_metrics_endpoint_counts_a_restart_while_the_job_runs(tmp_path, monkeypatch):
    """Without a warm standby (a config file's setting), so that the restart starts its processes
    cold: what the endpoint shows while it does, and the goodput split of such a restart (its
    downtime and start-up counted, the printed split adding up to the wall time). Its MLflow
    tracker is down the whole time: one warning across the restart, and the job finishes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    port, run_dir = free_port(), tmp_path / "run"
    config = tmp_path / "no-standby.yaml"
    config.write_text("cluster: {warm_standby: false}\n")
    proc = start("--config", str(config), *MINIMAL, *EXAMPLE_RUN, "--hosts", "2", "--inject", "kill@step=60,host=1",
                 "--metrics-port", str(port), "--tracker", "mlflow", "--run-dir", str(run_dir))
    scrapes = []
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:  # bounded polling of the live endpoint
        try:
            scrapes.append(scrape(port))
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    s = summary(run_dir)
    assert [a["cause"] for a in s["attempt_table"]] == ["crashed", "finished"] and s["final_step"] == 200
    flat = " ".join((out + err).split())
    assert flat.count("the mlflow tracker is not reachable") == 1, out + err
    assert "steps were not sent to mlflow; the next --resume of this run sends them" in flat
    assert s["badput_s"]["downtime"] > 0 and s["badput_s"]["startup"] > 0
    assert "total (wall time)" in out and "100.0%" in out
    assert not list((run_dir / "hosts").glob("standby-*")), "no standby was started"
    restarts = [s.get(("jaxlaunch_restarts_total", (("cause", "crashed"),)), 0) for s in scrapes]
    assert 0 in restarts and 1 in restarts, "the restart was counted while the job ran"
    goodput = [s[("jaxlaunch_goodput_ratio", ())] for s in scrapes if ("jaxlaunch_goodput_ratio", ()) in s]
    assert len(set(goodput)) >= 2 and all(0 <= g <= 1 for g in goodput), "goodput moved"
    assert any(s.get(("jaxlaunch_hosts", ())) == 2 for s in scrapes)
    steps = [s.get(("jaxlaunch_step", ()), 0) for s in scrapes]
    assert max(steps) > 60
    assert any(s.get(("jaxlaunch_last_committed_step", ()), 0) >= 20 for s in scrapes)
    assert any(("jaxlaunch_badput_seconds", (("kind", "recompute"),)) in s for s in scrapes)
    assert any(s.get(("jaxlaunch_step_time_seconds", ()), 0) > 0 for s in scrapes)
    assert any(s.get(("jaxlaunch_checkpoint_blocking_seconds", ()), 0) > 0 for s in scrapes)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(port)  # the endpoint ends with the job

    board = EventAccumulator(str(run_dir / "tensorboard" / "goodput"))
    board.Reload()
    points = board.Scalars("goodput/ratio")
    assert len(points) >= 2 and points[-1].step == 200
    assert points[-1].value == pytest.approx(summary(run_dir)["goodput"], abs=1e-6)
