"""The driver's Prometheus endpoint and TensorBoard's goodput, from a run's records."""

import socket
import urllib.error
import urllib.request

import pytest
from jaxlaunch.launcher.records.history import restarts_by_cause
from jaxlaunch.launcher.records.runs import RunDir
from jaxlaunch.launcher.views import live_metrics
from jaxlaunch.launcher.views.live_metrics import Exporter, LiveMetrics
from prometheus_client.parser import text_string_to_metric_families

from jaxlaunch.contract.events import parse_event
from jaxlaunch.contract.protocol import ConfigError


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def write_run(path):
    """Launch, an attempt that crashed at step 3, a restart, an attempt that runs on."""
    run = RunDir(path)
    run.create()
    t = 1000.0
    run._events.add([
        {"event": "launch", "time": t, "num_hosts": 2},
        {"event": "attempt_started", "attempt": 1, "num_hosts": 2, "mesh": {"data": 2}, "time": t + 1},
        {"event": "failure", "attempt": 1, "cause": "crashed", "host": 1, "step": 3, "time": t + 9},
        {"event": "attempt_ended", "attempt": 1, "cause": "crashed", "host": 1, "first_step": 1, "last_step": 3,
         "time_to_first_step_s": 5.0, "duration_s": 8.0, "time": t + 9},
        {"event": "restarting", "reason": "crashed", "backoff_s": 1.0, "time": t + 9},
        {"event": "attempt_started", "attempt": 2, "num_hosts": 2, "mesh": {"data": 2}, "time": t + 12},
    ])
    run.metrics([{"step": s, "loss": 1.0, "step_time_s": 1.0, "checkpoint_blocking_s": 0.25 if s == 2 else None,
                  "attempt": 1 if s < 4 else 2, "time": t + 5 + s} for s in range(1, 5)])
    return run


@pytest.fixture
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_endpoint_serves_the_runs_numbers_and_stops(tmp_path, free_port):
    run = write_run(tmp_path / "run")
    exporter = Exporter(free_port)
    try:
        live = LiveMetrics(run, lambda: 2, exporter, wall_clock=lambda: 1020.0)
        live.refresh()
        got = scrape(free_port)
    finally:
        exporter.close()
    assert got[("jaxlaunch_restarts_total", (("cause", "crashed"),))] == 1
    assert got[("jaxlaunch_last_committed_step", ())] == 2
    badput = {labels[0][1]: v for (name, labels), v in got.items() if name == "jaxlaunch_badput_seconds"}
    assert set(badput) >= {"startup", "recompute", "checkpoint", "downtime", "other"}
    productive = got[("jaxlaunch_productive_seconds", ())]
    # The running launch counts up to now (1020), not to its last record: the parts add up to 20 s.
    assert productive + sum(badput.values()) == pytest.approx(20.0)
    assert got[("jaxlaunch_goodput_ratio", ())] == pytest.approx(productive / 20.0)
    with pytest.raises(urllib.error.URLError):
        scrape(free_port)


def test_a_port_in_use_is_bad_input(free_port):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", free_port))
        taken.listen()
        with pytest.raises(ConfigError, match=f"--metrics-port {free_port}: .*choose a free port"):
            Exporter(free_port)


def test_the_cli_refuses_a_port_in_use_before_ray_starts(tmp_path, free_port, capsys):
    pytest.importorskip("ray")  # the launch imports Ray's client library, then stops before starting Ray
    import ray
    from jaxlaunch.launcher import cli

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", free_port))
        taken.listen()
        code = cli.main(["--metrics-port", str(free_port), "--run-dir", str(tmp_path / "run"), "--hosts", "1",
                         "--mesh", "data=-1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--metrics-port {free_port}" in err
    assert not (tmp_path / "run").exists() and not ray.is_initialized()


def test_goodput_reaches_tensorboard_against_the_newest_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = write_run(tmp_path / "run")
    live = LiveMetrics(run, lambda: None, None, wall_clock=lambda: 1020.0)
    live.high_step = 6
    live.refresh()
    live.close()
    board = EventAccumulator(str(run.tensorboard_dir / "goodput"))
    board.Reload()
    points = board.Scalars("goodput/ratio")
    assert [p.step for p in points] == [6, 6]
    assert 0 < points[0].value < 1
    assert "badput_seconds/recompute" in board.Tags()["scalars"]


def test_restarts_are_counted_by_the_failure_before_them():
    lines = [{"event": "failure", "attempt": 1, "cause": "crashed"}, {"event": "restarting"},
             {"event": "failure", "attempt": 2, "cause": "hung"}, {"event": "job_failed"},
             {"event": "grow", "attempt": 3}, {"event": "failure", "attempt": 4, "cause": "preempted"},
             {"event": "restarting"}]
    history = [e for e in map(parse_event, lines) if e is not None]
    assert len(history) == len(lines)
    assert restarts_by_cause(history) == {"crashed": 1, "resize": 1, "preempted": 1}


def test_goodput_is_refreshed_at_most_every_interval(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    now = [0.0]
    live = LiveMetrics(run, lambda: None, None, clock=lambda: now[0], wall_clock=lambda: 1020.0)
    loads = []
    real = live_metrics.history.load_history
    monkeypatch.setattr(live_metrics.history, "load_history", lambda r, until=None: loads.append(1) or real(r, until))

    class Attempt:
        num_hosts, number, last_step = 2, 2, 4

    class Poll:
        records = []

    for t in (0.0, 1.0, live_metrics.GOODPUT_REFRESH_S + 0.5):
        now[0] = t
        live.on_poll(None, Attempt(), Poll())
    assert len(loads) == 2


def served_busy(tmp_path, port, polls):
    """The endpoint's busy time by host after `polls` of (attempt number, its host count, busy times by
    host); an attempt other than the first is told as started before its poll."""
    from jaxlaunch.launcher.control.states import Attempt, AttemptStartNotice

    from jaxlaunch.contract.protocol import GroupPoll, HostStatus

    exporter = Exporter(port)
    try:
        live = LiveMetrics(write_run(tmp_path / "run"), lambda: 2, exporter, wall_clock=lambda: 1020.0)
        for i, (number, hosts, busy) in enumerate(polls):
            attempt = Attempt(number=number, num_hosts=hosts, mesh={}, started_at=0.0, latest_committed=None,
                              last_step=5)
            if i and number != polls[i - 1][0]:
                live.on_attempt_started(None, AttemptStartNotice(attempt, ()))
            live.on_poll(None, attempt, GroupPoll([HostStatus(r) for r in range(hosts)], [], [], {}, [], busy))
        got = scrape(port)
    finally:
        exporter.close()
    return {dict(labels)["host"]: value for (name, labels), value in got.items()
            if name == "jaxlaunch_host_busy_seconds"}


def test_each_hosts_busy_time_is_served_by_host(tmp_path, free_port):
    busy = {0: [(4, 0.002), (5, 0.003)], 1: [(4, 0.009), (5, 0.012)]}
    assert served_busy(tmp_path, free_port, [(2, 2, busy)]) == {"0": 0.003, "1": 0.012}, "the newest step's, by host"


def test_a_host_the_job_no_longer_has_is_no_longer_served(tmp_path, free_port):
    """After a shrink from 4 hosts to 2, hosts 2 and 3 kept their last busy time on the endpoint."""
    polls = [(2, 4, {r: [(5, 0.01)] for r in range(4)}), (3, 2, {r: [(6, 0.02)] for r in range(2)})]
    assert served_busy(tmp_path, free_port, polls) == {"0": 0.02, "1": 0.02}


def test_a_launch_whose_lock_another_took_closes_its_tensorboard_writers(tmp_path):
    """A launch from Python goes on in its process after RunLockLost: its TensorBoard writers' threads,
    left open, flushed into the run the other launch holds whenever their timer said."""
    import threading
    import time

    from jaxlaunch.launcher.records.recorder import Recorder

    run = write_run(tmp_path)
    before = set(threading.enumerate())
    recorder = Recorder(run, lambda n: {"data": n})
    recorder.metrics([{"step": 9, "loss": 1.0, "attempt": 2, "time": 1100.0}])
    live = LiveMetrics(run, lambda: 9, None)
    live.refresh(final=True)
    assert set(threading.enumerate()) - before, "no TensorBoard writer was opened"
    recorder.abandon()
    live.abandon()
    recorder.metrics([{"step": 10, "loss": 1.0, "attempt": 2, "time": 1101.0}])  # none is reopened
    deadline = time.monotonic() + 30
    while set(threading.enumerate()) - before:
        assert time.monotonic() < deadline, [t.name for t in set(threading.enumerate()) - before]
        time.sleep(0.01)
