"""A run's history from its records alone: the attempt table, goodput and its badput split, the
summary and the picture; TensorBoard without folded curves."""

import dataclasses
import json
import pathlib
import re
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxlaunch.launcher.records import goodput, history, report
from jaxlaunch.launcher.records.recorder import StepRanges, TensorBoard
from jaxlaunch.launcher.records.runs import RunDir
from rich.console import Console

from jaxlaunch.contract import events
from jaxlaunch.contract.events import FailureKind, JobStatus, PlannedEnd
from jaxlaunch.contract.layout import read_jsonl

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
OLD_RUN = FIXTURES / "run_v0_kill"
"""A run written before events were typed (a kill of host 1 and a restart of examples/minimal.py)."""


def write_run(tmp_path):
    run = RunDir(tmp_path)
    run.create()
    t = 1000.0
    for event in [
        events.Launch(time=t, entry="models.lm:main"),
        events.AttemptStarted(attempt=1, num_hosts=4, mesh={"data": 4}, time=t + 1),
        events.Failure(attempt=1, cause=FailureKind.CRASHED, host=2, step=3, detection_latency_s=0.5,
                       failed_at=t + 8.5, time=t + 9),
        events.AttemptEnded(attempt=1, cause=FailureKind.CRASHED, host=2, first_step=1, last_step=3,
                            time_to_first_step_s=5.0, duration_s=8.0, detection_latency_s=0.5, time=t + 9),
        events.Restarting(reason="host 2 crashed", backoff_s=0.0, time=t + 9),
        events.WaitingForCapacity(time=t + 10),
        events.AttemptStarted(attempt=2, num_hosts=2, mesh={"data": 2}, time=t + 14),
        events.Restored(attempt=2, step=2, seconds=0.5, time=t + 16),
        events.AttemptEnded(attempt=2, cause=PlannedEnd.FINISHED, first_step=3, last_step=4,
                            time_to_first_step_s=4.0, duration_s=6.0, recovery_time_s=9.0, process_count=2,
                            num_devices=4, mesh={"data": 2}, time=t + 20),
        events.JobEnded(status=JobStatus.FINISHED, time=t + 21),
    ]:
        run.event(event)
    run.metrics([
        {"step": 1, "loss": 5.0, "step_time_s": None, "attempt": 1, "time": t + 6},  # compiled: time not known
        {"step": 2, "loss": 4.0, "step_time_s": 1.0, "checkpoint_blocking_s": 0.25, "attempt": 1, "time": t + 7},
        {"step": 3, "loss": 3.5, "step_time_s": 1.0, "attempt": 1, "time": t + 8},  # lost with attempt 1
        {"step": 3, "loss": 3.4, "step_time_s": None, "attempt": 2, "time": t + 18},
        {"step": 4, "loss": 3.0, "step_time_s": 0.5, "attempt": 2, "time": t + 18.5},
    ])
    return run


def test_the_split_is_a_partition_of_the_wall_time(tmp_path):
    r = history.load_history(write_run(tmp_path))
    assert r.wall_s == pytest.approx(21.0)
    # Steps 1, 2, 3 (its last run) and 4; a first step's time is its attempt's typical one.
    assert r.productive_s == pytest.approx(1.0 + 1.0 + 0.5 + 0.5)
    assert r.badput_s == pytest.approx({
        "checkpoint": 0.25,  # right after step 2, inside step 3's report-to-report time: counted once
        "recompute": 0.75 + 0.5,  # step 3's first run less the save, and the time from it to the kill
        "restore": 0.5,
        "capacity_wait": 4.0,
        "downtime": 0.5 + 1.0,  # from the kill to the attempt's end, and on to the wait for capacity
        "startup": 1.0 + 4.0 + (3.5 - 0.5),  # to the first attempt; its start; the second's, less its restore
        "other": 1.5 + 1.0,  # the hosts' ending after the last step; the driver's after the attempt's
    })
    assert r.productive_s + sum(r.badput_s.values()) == pytest.approx(r.wall_s, abs=1e-9)
    assert sum(r.split.shares().values()) == pytest.approx(1.0)
    assert {s: rec["loss"] for s, rec in r.trajectory.items()} == {1: 5.0, 2: 4.0, 3: 3.4, 4: 3.0}
    assert [(x["step"], x["loss"]) for x in r.recomputed] == [(3, 3.5)]
    assert [(a.num_hosts, a.cause, a.restored_step) for a in r.attempts] == [
        (4, FailureKind.CRASHED, None), (2, PlannedEnd.FINISHED, 2)]


def test_overlapping_time_counts_once_for_the_highest_priority():
    spans = [(0.0, 10.0)]
    marks = [goodput.Interval(0, 6, "startup"), goodput.Interval(2, 8, "productive"),
             goodput.Interval(3, 4, "checkpoint"), goodput.Interval(7, 12, "downtime")]
    assert goodput.partition(marks, spans) == pytest.approx({
        "startup": 2.0, "productive": 5.0, "checkpoint": 1.0, "downtime": 2.0, "recompute": 0.0, "restore": 0.0,
        "capacity_wait": 0.0, "other": 0.0})


def test_a_hang_is_detection_time_not_other(tmp_path):
    """The watchdog's wait for a hung host, from its last step to the failure, is detection."""
    run = RunDir(tmp_path)
    run.create()
    for event in [
        events.Launch(time=0.0), events.AttemptStarted(attempt=1, time=1.0),
        events.Failure(attempt=1, cause=FailureKind.HUNG, host=1, detection_latency_s=10.0, failed_at=3.0, time=13.5),
        events.AttemptEnded(attempt=1, cause=FailureKind.HUNG, duration_s=12.5, time=13.5),
        events.JobEnded(status=JobStatus.FAILED, time=14.0),
    ]:
        run.event(event)
    run.metrics([{"step": s, "step_time_s": 0.5, "attempt": 1, "time": 1.0 + 0.5 * s} for s in range(1, 5)])
    split = history.load_history(run).split
    assert split.badput_s["downtime"] == pytest.approx(13.5 - 3.0)
    assert split.badput_s["other"] == pytest.approx(0.5), "only the driver's ending after the attempt"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(events.EventKind)), st.floats(0, 100), st.floats(0, 20)),
                max_size=30),
       st.lists(st.tuples(st.integers(1, 20), st.floats(0, 100), st.one_of(st.none(), st.floats(0, 5)),
                          st.one_of(st.none(), st.floats(0, 3)), st.integers(1, 4)), max_size=40))
def test_any_records_split_into_parts_that_add_up_to_the_wall_time(raw_events, raw_metrics):
    """Whatever the order, overlap or gaps of the records (clock skew between machines, a driver killed
    mid-run, a resumed run), the parts are never negative and add up to the wall time."""
    evts = [events.Launch(time=0.0)]
    for kind, time, seconds in sorted(raw_events, key=lambda e: e[1]):
        fields = {"time": time, "extra": {}}
        cls = type(events.parse_event({"event": kind.value, "time": time, "attempt": 1, "step": 1, "host": 0,
                                 "seconds": seconds}))
        names = {f.name for f in dataclasses.fields(cls)}
        for name, value in (("attempt", int(seconds) % 3 + 1), ("step", 1), ("seconds", seconds),
                            ("duration_s", seconds), ("detection_latency_s", seconds), ("failed_at", time - seconds),
                            ("cause", FailureKind.CRASHED if seconds > 10 else PlannedEnd.FINISHED), ("host", 0)):
            if name in names:
                fields[name] = value
        evts.append(cls(**fields))
    metrics = [{"step": step, "time": time, "step_time_s": seconds, "checkpoint_blocking_s": blocked,
                "attempt": attempt} for step, time, seconds, blocked, attempt in raw_metrics]
    split = goodput.split_wall_time(evts, metrics)
    assert min(split.badput_s.values(), default=0) >= 0 and split.productive_s >= 0
    assert split.productive_s + sum(split.badput_s.values()) == pytest.approx(split.wall_s, abs=1e-6)


def test_a_running_job_s_split_counts_up_to_now(tmp_path):
    """A live exporter asks for the split of the records so far: the open launch runs until `until`."""
    run = write_run(tmp_path)
    later = [events.Launch(time=2000.0), events.AttemptStarted(attempt=3, time=2001.0)]
    for event in later:
        run.event(event)
    run.metrics([{"step": 5, "step_time_s": 0.5, "attempt": 3, "time": 2003.0}])
    split = goodput.split_wall_time(run.events(), run.metric_records(), until=2010.0)
    assert split.wall_s == pytest.approx(21.0 + 10.0)
    assert split.productive_s + sum(split.badput_s.values()) == pytest.approx(split.wall_s)
    assert split.badput_s["startup"] == pytest.approx(8.0 + 1.0 + 1.5), "the open attempt's start-up counts"


def test_an_attempt_still_starting_up_is_start_up_time_while_the_job_runs(tmp_path):
    """A live exporter at t+60 of an attempt started at t+1 that has trained no step yet: 59 s of
    start-up (before, "other" until its first step, then all of it start-up at once)."""
    run = RunDir(tmp_path)
    run.create()
    for event in (events.Launch(time=0.0), events.AttemptStarted(attempt=1, time=1.0)):
        run.event(event)
    split = goodput.split_wall_time(run.events(), run.metric_records(), until=60.0)
    assert (split.badput_s["startup"], split.badput_s["other"]) == (pytest.approx(60.0), 0.0)
    # The driver was killed then; a --resume at t+100 runs an attempt whose steps leave gaps: those are
    # the new launch's, not the dead attempt's start-up.
    run.event(events.Launch(time=100.0))
    run.event(events.AttemptStarted(attempt=2, time=101.0))
    run.metrics([{"step": s, "step_time_s": 1.0, "attempt": 2, "time": 105.0 + 2 * s} for s in range(1, 4)])
    run.event(events.AttemptEnded(attempt=2, cause="finished", time=112.0))
    run.event(events.JobEnded(status=events.JobStatus.FINISHED, time=112.0))
    split = goodput.split_wall_time(run.events(), run.metric_records())
    assert split.badput_s["other"] == pytest.approx(2.0 + 1.0), "the gaps between the new launch's steps, and its end"


def test_the_summary_is_a_view_of_the_same_history(tmp_path):
    run = write_run(tmp_path)
    past = history.load_history(run)
    s = past.summary(run)
    assert s["goodput"] == past.goodput and s["attempt_table"] == [a.to_dict() for a in past.attempts]
    assert (s["status"], s["final_step"], s["final_loss"], s["process_count"]) == ("finished", 4, 3.0, 2)
    assert s["restarts_by_cause"] == {"crashed": 1} and s["cold_start_s"] == 5.0


def test_a_resumed_run_counts_every_launch(tmp_path):
    run = write_run(tmp_path)
    t = 2000.0
    for event in [
        events.Launch(time=t),
        events.AttemptStarted(attempt=3, num_hosts=2, mesh={"data": 2}, time=t + 1),
        events.AttemptEnded(attempt=3, cause=PlannedEnd.FINISHED, first_step=5, last_step=6,
                            time_to_first_step_s=2.0, duration_s=4.0, time=t + 5),
        events.JobEnded(status=JobStatus.FINISHED, time=t + 6),
    ]:
        run.event(event)
    run.metrics([{"step": 5, "loss": 2.9, "step_time_s": None, "attempt": 3, "time": t + 3},
                 {"step": 6, "loss": 2.8, "step_time_s": 1.0, "attempt": 3, "time": t + 4}])
    past = history.load_history(run)
    assert past.wall_s == pytest.approx(21.0 + 6.0), "the time between launches is nobody's"
    assert past.productive_s + sum(past.badput_s.values()) == pytest.approx(past.wall_s)
    assert past.summary(run)["final_step"] == 6 and len(past.attempts) == 3


def test_picture_and_text(tmp_path):
    console = Console(width=200, record=True)
    path = report.write(write_run(tmp_path).path, console=console)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    out = console.export_text()
    assert "goodput 14.3%" in out and "crashed" in out and "waiting for capacity" in out
    assert re.search(r"total \(wall time\)\s+│\s+21\.0 │ 100\.0%", out)


def test_the_goodput_bar_shows_every_part_and_ends_at_the_whole(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = history.load_history(write_run(tmp_path)).split
    fig, bar = plt.subplots()
    report._goodput_bar(bar, split)
    widths = [p.get_width() for p in bar.patches]
    plt.close(fig)
    assert len(widths) == sum(v > 0 for v in split.shares().values()) == 8
    assert sum(widths) == pytest.approx(1.0) and min(widths) >= report.MIN_BAR_SHARE * 0.9


# ---- a run written by the version before typed events ----------------------------------------------

def test_an_old_run_reads_into_typed_records_and_its_split_adds_up(tmp_path):
    run = RunDir(shutil.copytree(OLD_RUN, tmp_path / "run"))
    past = history.load_history(run)
    old_summary = json.loads((OLD_RUN / "summary.json").read_text())
    assert all(e is not None for e in map(events.parse_event, read_jsonl(OLD_RUN / "events.jsonl")))
    keys = ("attempt", "num_hosts", "mesh", "cause", "failed_host", "first_step", "last_step", "restored_step",
            "detection_latency_s", "recovery_time_s", "time_to_first_step_s", "process_count")
    assert [{k: a.to_dict()[k] for k in keys} for a in past.attempts] == [
        {k: a[k] for k in keys} for a in old_summary["attempt_table"]]
    assert [a.cause for a in past.attempts] == [FailureKind.CRASHED, PlannedEnd.FINISHED]
    assert past.wall_s == pytest.approx(old_summary["wall_time_s"])
    assert past.productive_s + sum(past.badput_s.values()) == pytest.approx(past.wall_s, rel=1e-9)
    old_parts = old_summary["goodput"] * old_summary["wall_time_s"] + sum(old_summary["badput_s"].values())
    assert old_parts > 1.1 * old_summary["wall_time_s"], "the old split counted overlapping time twice"
    summary = past.summary(run)
    assert (summary["status"], summary["final_step"], summary["restarts_by_cause"]) == ("finished", 200, {"crashed": 1})
    console = Console(width=200, record=True)
    assert report.write(run.path, console=console).exists()
    assert "crashed" in console.export_text()


def test_every_kind_of_old_line_parses_to_its_type():
    """The lines every writer of the version before typed events wrote, one of each kind."""
    old = [
        {"event": "waiting_for_capacity", "min_hosts": 2, "placeable_hosts": 1, "time": 1.0},
        {"event": "grow", "attempt": 2, "from_hosts": 1, "to_hosts": 2, "time": 1.0},
        {"event": "stop_requested", "attempt": 1, "signal": "SIGTERM", "time": 1.0},
        {"event": "job_failed", "reason": "budget spent", "time": 1.0},
        {"event": "job_stopped", "reason": "stopped by SIGINT", "signal": "SIGINT", "time": 1.0},
        {"event": "chaos_kill", "attempt": 1, "host": 0, "step": 7, "time": 1.0},
        {"event": "low_disk_space", "free_bytes": 1, "needed_bytes": 2, "checkpoints": 4, "message": "m", "time": 1.0},
        {"event": "checkpoint_fallback", "attempt": 2, "rank": 0, "step": 20, "error": "e", "moved_to": "x",
         "time": 1.0},
        {"event": "compilation_cache_disabled", "attempt": 1, "rank": 0, "reason": "read-only", "time": 1.0},
        {"event": "job_ended", "status": "interrupted", "reason": None, "time": 1.0},
    ]
    parsed = [events.parse_event(line) for line in old]
    assert [e.kind for e in parsed] == [line["event"] for line in old]
    assert [e.to_dict() for e in parsed] == [{**line, **{k: None for k in e.to_dict() if k not in line}}
                                             for line, e in zip(old, parsed, strict=True)]
    assert parsed[-1].status == JobStatus.INTERRUPTED
    assert set(events.EventKind) == {e.kind for e in map(events.parse_event, [
        {"event": k.value, "time": 0.0, "attempt": 1, "step": 1, "host": 0, "seconds": 0.0}
        for k in events.EventKind])}, "every kind has its type"


def test_a_line_from_a_newer_version_keeps_what_this_one_does_not_know():
    line = {"event": "restored", "time": 5.0, "attempt": 2, "rank": 0, "step": 10, "seconds": 0.1, "warmth": "hot"}
    restored = events.parse_event(line)
    assert isinstance(restored, events.Restored) and restored.extra == {"warmth": "hot"}
    assert restored.to_dict()["warmth"] == "hot"
    assert events.parse_event({"event": "some_future_kind", "time": 1.0}) is None
    assert events.parse_event({"event": "attempt_started", "time": 1.0}) is None, "no attempt number: skipped"
    assert events.parse_event({"event": "failure", "attempt": 1, "cause": "gremlins", "time": 1.0}) is None


def test_a_metric_other_than_loss_is_plotted(tmp_path):
    run = RunDir(tmp_path)
    run.create()
    run.event(events.Launch(time=1.0))
    run.event(events.JobEnded(time=2.0))
    run.metrics([{"step": 1, "accuracy": 0.5, "step_time_s": 0.1, "time": 1.5},
                 {"step": 2, "accuracy": 0.7, "step_time_s": 0.1, "time": 1.6}])
    assert report.plotted_metric(history.load_history(run)) == "accuracy"
    assert report.write(run.path, show=False).exists()


def test_the_report_picture_leaves_the_process_s_plotting_backend_as_it_was(tmp_path):
    """In a notebook, `jaxlaunch.launch` draws report.png in the user's kernel: their plots must
    still show inline afterwards."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend of the user's, as a notebook's inline one is
    figures = plt.get_fignums()
    run = write_run(tmp_path)
    run.event(events.HostBusy(attempt=2, busy_s=[0.01, 0.03], steps=5, time=1030.0))  # the 3-panel picture
    try:
        picture = report.save_plot(history.load_history(run), run)
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == figures, "no figure of the report's left open to show in the notebook"
    finally:
        matplotlib.use(before)
    assert pathlib.Path(picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_a_full_dev_shm_leaves_the_run_without_tensorboard_files_and_says_so(tmp_path, monkeypatch, caplog):
    """TensorBoard's writer needs a semaphore in /dev/shm; a full /dev/shm refuses it. The driver went
    down with it ("the filesystem is full" naming the run directory, which was not): TensorBoard's
    files are a view of the records, and the run goes on without them."""
    import tensorboardX
    from jaxlaunch.launcher.records import recorder

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensorboardX, "SummaryWriter", full)
    board = TensorBoard(tmp_path / "tb")
    with caplog.at_level("WARNING", logger=recorder.__name__):
        board.write([{"step": 1, "loss": 1.0}])
        board.write([{"step": 2, "loss": 0.5}])
    board.close()
    assert [r.getMessage() for r in caplog.records if "no TensorBoard file" in r.getMessage()] == [
        f"no TensorBoard file in {tmp_path / 'tb'} for this launch ([Errno 28] No space left on device); "
        "metrics.jsonl and events.jsonl are written as always"], "said once"


def test_restarts_by_cause_counts_restarts_not_the_failure_that_ended_the_job(tmp_path):
    """The restart budget spent on two crashes, a third ends the job: two restarts, as the trackers
    and the Prometheus counter say, not three."""
    run = RunDir(tmp_path)
    run.create()
    t = 1000.0
    for n in (1, 2, 3):
        run.event(events.AttemptStarted(attempt=n, num_hosts=2, mesh={"data": 2}, time=t + 10 * n))
        run.event(events.Failure(attempt=n, cause=FailureKind.CRASHED, host=1, step=3, time=t + 10 * n + 5))
        run.event(events.AttemptEnded(attempt=n, cause=FailureKind.CRASHED, host=1, time=t + 10 * n + 5))
        if n < 3:
            run.event(events.Restarting(reason="host 1 crashed", backoff_s=1.0, time=t + 10 * n + 6))
    run.event(events.JobEnded(status=JobStatus.FAILED, time=t + 40))
    assert history.load_history(run).summary(run)["restarts_by_cause"] == {"crashed": 2}


def test_a_wait_for_capacity_that_ends_the_job_and_a_give_up_s_persist_are_their_own_time(tmp_path):
    """After the last attempt failed, 300 s of waiting for capacity, then 100 s writing memory's step
    durably: capacity wait and checkpoint time, not the driver's `other`; and so while it still waits."""
    run = RunDir(tmp_path)
    run.create()
    for event in [
        events.Launch(time=0.0), events.AttemptStarted(attempt=1, time=1.0),
        events.Failure(attempt=1, cause=FailureKind.CRASHED, host=1, failed_at=3.0, time=3.5),
        events.AttemptEnded(attempt=1, cause=FailureKind.CRASHED, duration_s=2.5, time=3.5),
        events.Restarting(reason="host 1 crashed", backoff_s=0.0, time=3.5),
        events.WaitingForCapacity(time=4.0),
        events.PersistingMemory(attempt=1, step=4, durable_step=2, num_hosts=1, time=304.0),
        events.MemoryPersisted(step=4, durable_step=2, num_hosts=1, seconds=100.0, persisted=True, time=404.0),
        events.JobEnded(status=JobStatus.FAILED, time=404.5),
    ]:
        run.event(event)
    run.metrics([{"step": s, "step_time_s": 0.5, "attempt": 1, "time": 1.0 + 0.5 * s} for s in range(1, 5)])
    split = history.load_history(run).split
    assert split.badput_s["capacity_wait"] == pytest.approx(300.0)
    assert split.badput_s["checkpoint"] == pytest.approx(100.0)
    assert split.badput_s["other"] == pytest.approx(0.5), "only the driver's ending after the persist"
    live = goodput.split_wall_time(run.events()[:6], run.metric_records(), until=104.0)
    assert live.badput_s["capacity_wait"] == pytest.approx(100.0), "counted while it waits"


def test_the_gap_of_a_resize_is_downtime_while_the_next_group_is_scheduled():
    evts = [events.Launch(time=0.0), events.AttemptStarted(attempt=1, time=1.0),
            events.AttemptEnded(attempt=1, cause=events.PlannedEnd.RESIZE, duration_s=9.0, time=10.0)]
    metrics = [{"step": s, "step_time_s": 1.0, "attempt": 1, "time": 1.0 + s} for s in range(1, 9)]
    live = goodput.split_wall_time(evts, metrics, until=13.0)
    # From the last step (at 9) through the drain to now: teardown, then scheduling the next group.
    assert live.badput_s["downtime"] == pytest.approx(4.0) and live.badput_s["other"] == pytest.approx(0.0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=-3, max_value=60), max_size=80))
def test_the_recorder_s_recorded_steps_are_the_steps_it_was_given(steps):
    """The recorder knows which steps metrics.jsonl holds (a restore's carried records are written only
    for steps it lacks): in any order of arrival, the same answers as a set of every step."""
    recorded, given = StepRanges(), set()
    for step in steps:
        recorded.update([step])
        given.add(step)
        assert [s for s in range(-5, 63) if s in recorded] == sorted(given)
    assert recorded.newest() == max(given, default=-1)


def test_the_recorder_holds_a_few_ranges_however_many_steps_a_run_records():
    """A million steps, a restore that replays 40 of them, and a resumed run's hole: three numbers a
    range, not an int per step (a set of a million steps held 66 MB of the driver)."""
    recorded = StepRanges(range(1, 500_001))
    recorded.update(range(499_961, 1_000_001))  # restored at 499,960: its steps recorded again
    recorded.update(range(1_000_101, 1_000_201))  # records of a later launch; 1,000,001-1,000,100 never came
    assert list(zip(recorded.firsts, recorded.lasts, strict=True)) == [(1, 1_000_000), (1_000_101, 1_000_200)]
    assert 1_000_050 not in recorded and 1_000_150 in recorded and 0 not in recorded


def test_an_attempt_s_steps_and_its_failure_s_step_are_what_its_records_show_not_the_driver_s_last_poll(tmp_path):
    """Steps of milliseconds outrun the driver's polls: it last saw step 3, yet the host had saved
    step 24 (whose records a restore brought back) and killed itself at step 30."""
    run = RunDir(tmp_path)
    run.create()
    t = 1000.0
    for event in [
        events.Launch(time=t),
        events.AttemptStarted(attempt=1, num_hosts=2, time=t + 1),
        events.Failure(attempt=1, cause=FailureKind.CRASHED, host=0, step=3, time=t + 3),
        events.AttemptEnded(attempt=1, cause=FailureKind.CRASHED, host=0, first_step=1, last_step=3, time=t + 3),
        events.AttemptStarted(attempt=2, num_hosts=2, time=t + 4),
        events.Restored(attempt=2, step=24, seconds=0.1, time=t + 5),
    ]:
        run.event(event)
    run.metrics([{"step": s, "loss": 1.0, "attempt": 1, "time": t + 2} for s in range(1, 25)]
                + [{"step": s, "loss": 1.0, "attempt": 2, "time": t + 6} for s in range(25, 31)])
    run.record_injection({"kind": "kill", "attempt": 1, "rank": 0, "step": 30, "time": t + 2.5})
    first, second = history.load_history(run).attempts
    assert (first.first_step, first.last_step, first.failed_step) == (1, 30, 30)
    assert (second.first_step, second.last_step) == (None, None), "a running attempt is the live view's"
    out = Console(record=True, width=120)
    report.print_attempts([first], out)
    assert "1..30" in out.export_text()


def test_a_failure_that_names_its_own_step_keeps_it_whatever_the_attempt_reached(tmp_path):
    """Replicas found to disagree at step 40 while the hosts went on to step 100: the failure is at 40."""
    run = RunDir(tmp_path)
    run.create()
    for event in [
        events.AttemptStarted(attempt=1, num_hosts=2, time=1.0),
        events.Failure(attempt=1, cause=FailureKind.REPLICA_MISMATCH, host=1, step=40, time=3.0),
        events.AttemptEnded(attempt=1, cause=FailureKind.REPLICA_MISMATCH, host=1, first_step=1, last_step=90,
                            time=3.0),
    ]:
        run.event(event)
    run.metrics([{"step": s, "loss": 1.0, "attempt": 1, "time": 2.0} for s in range(1, 101)])
    (row,) = history.load_history(run).attempts
    assert (row.last_step, row.failed_step) == (100, 40)
