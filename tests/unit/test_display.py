"""What the terminal shows, read as printed: the progress line's checkpoint, the attempt table and the
closing lines at 80 columns."""

import io
import os
import pathlib

import pytest
from jaxlaunch.launcher.control.states import Attempt, Running
from jaxlaunch.launcher.records.history import AttemptRecord
from jaxlaunch.launcher.records.report import print_attempts
from jaxlaunch.launcher.records.runs import RunDir
from jaxlaunch.launcher.views.display import ConsoleView, Display
from rich.console import Console

from jaxlaunch.contract.events import FailureKind, FinalSave, PlannedEnd, Restored
from jaxlaunch.contract.protocol import GroupPoll, HostStatus, Phase


def console(width: int = 80) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, highlight=False), out


def test_the_progress_line_shows_each_tier_s_checkpoint_once_the_hosts_report_it_committed(tmp_path):
    """Memory saves every step, durable ones at 10 and 20: the line shows each tier's newest committed
    step as the hosts report it (a memory step once every host's part is held, a durable one once
    rank 0 finished it), and never lists the run directory."""
    term, out = console()
    run = RunDir(tmp_path / "run")
    view = ConsoleView(Display(term), run, 22, memory_tier=True)
    attempt = Attempt(number=1, num_hosts=2, mesh={"data": 2}, started_at=0.0, latest_committed=None)
    view.on_transition(None, None, Running(attempt))
    hosts = [HostStatus(rank, Phase.TRAINING, 0) for rank in range(2)]
    for step in range(1, 23):
        for host in hosts:
            host.step = step
            # host 1's hand-off of a step returns a poll later than host 0's: the step is whole then
            host.heard_committed((("memory", step - host.rank),))
        if step in (11, 21):
            hosts[0].heard_committed((("durable", step - 1),))
        view.on_poll(None, attempt, GroupPoll(hosts, [{"step": step, "loss": 1.0}], [], {}, []))
    lines = out.getvalue().splitlines()
    assert lines[-1] == "step 22/22  loss 1.0000  hosts 2  ckpt 21 mem · 20 disk"
    assert "step 12/22  loss 1.0000  hosts 2  ckpt 11 mem · 10 disk" in lines
    assert not run.path.exists(), "the view never touched the run directory"


def test_without_the_memory_tier_the_line_shows_the_durable_step_and_keeps_it_across_attempts(tmp_path):
    term, out = console()
    view = ConsoleView(Display(term), RunDir(tmp_path / "run"), 10, memory_tier=False)
    first = Attempt(number=1, num_hosts=1, mesh={"data": 1}, started_at=0.0, latest_committed=None)
    view.on_transition(None, None, Running(first))
    host = HostStatus(0, Phase.TRAINING, 5, committed={"durable": 4})
    view.on_poll(None, first, GroupPoll([host], [{"step": 5, "loss": 1.0}], [], {}, []))
    second = Attempt(number=2, num_hosts=1, mesh={"data": 1}, started_at=1.0, latest_committed=4)
    view.on_transition(None, None, Running(second))
    view.on_poll(None, second, GroupPoll([HostStatus(0, Phase.TRAINING, 10)], [{"step": 10, "loss": 1.0}], [], {}, []))
    assert out.getvalue().splitlines()[-1] == "step 10/10  loss 1.0000  hosts 1  ckpt 4"


def test_a_save_left_after_the_entry_raised_is_a_warning_naming_its_host(tmp_path):
    """Only the wait that was cut short is said: a save that ended is no news."""
    term, out = console(width=200)
    view = ConsoleView(Display(term), RunDir(tmp_path / "run"), 10, memory_tier=False)
    attempt = Attempt(number=1, num_hosts=2, mesh={"data": 2}, started_at=0.0, latest_committed=None)
    view.on_transition(None, None, Running(attempt))
    hosts = [HostStatus(rank, Phase.SAVING, 4) for rank in range(2)]
    said = [(0, FinalSave(seconds=0.4, after_error=True)), (1, FinalSave(seconds=30.0, after_error=True, ended=False))]
    view.on_poll(None, attempt, GroupPoll(hosts, [], said, {}, []))
    [warning] = [line for line in out.getvalue().splitlines() if "warning" in line]
    assert warning.startswith("warning: host 1: a save in flight when the entry raised had not ended after 30.0 s")
    assert FinalSave(seconds=1.0, after_error=True).per_host and not FinalSave(seconds=1.0).per_host


class Shown(Display):
    """What the progress line is given at each poll."""

    def __init__(self) -> None:
        super().__init__(console()[0])
        self.shown: list[tuple[int, float | None, str]] = []

    def update(self, step, record, hosts, checkpoint):
        self.shown.append((step, record.get("loss") if record else None, checkpoint))


@pytest.mark.parametrize(("tier", "checkpoint"), [("memory", "110 mem · 100 disk"), ("durable", "- mem · 100 disk")])
def test_after_a_restart_the_line_shows_the_step_the_new_attempt_restored_and_what_the_tiers_still_hold(
        tmp_path, tier, checkpoint):
    """Attempt 1 reached step 120 (memory 120, disk 100) and failed; attempt 2 restores 110 from memory,
    or 100 from disk when memory's steps were not whole. Until it trains, the line shows where it
    starts, not the dead attempt's step 120 and loss, and no memory step the restore dropped."""
    shown = Shown()
    view = ConsoleView(shown, RunDir(tmp_path / "run"), 200, memory_tier=True)
    first = Attempt(number=1, num_hosts=2, mesh={"data": 2}, started_at=0.0, latest_committed=None)
    view.on_transition(None, None, Running(first))
    hosts = [HostStatus(rank, Phase.TRAINING, 120, committed={"memory": 120, "durable": 100}) for rank in range(2)]
    view.on_poll(None, first, GroupPoll(hosts, [{"step": 120, "loss": 0.5}], [], {}, []))
    assert shown.shown[-1] == (120, 0.5, "120 mem · 100 disk")
    second = Attempt(number=2, num_hosts=2, mesh={"data": 2}, started_at=1.0, latest_committed=100)
    view.on_transition(None, None, Running(second))
    step = 110 if tier == "memory" else 100
    restored = [(0, Restored(time=2.0, step=step, seconds=0.1, tier=tier))]
    view.on_poll(None, second, GroupPoll([HostStatus(r, Phase.RESTORING) for r in range(2)], [], restored, {}, []))
    assert shown.shown[-1] == (step, None, checkpoint)


ATTEMPTS = [
    AttemptRecord(attempt=1, num_hosts=4, mesh={"data": 4, "model": 2}, first_step=1, last_step=1250,
                  restored_step=None, cause=FailureKind.NODE_LOST, failed_host=3, detection_latency_s=12.25,
                  recovery_time_s=None),
    AttemptRecord(attempt=2, num_hosts=2, mesh={"data": 2, "model": 2}, first_step=1201, last_step=2400,
                  restored_step=1200, cause=FailureKind.EXCEPTION, failed_host=1, detection_latency_s=0.31,
                  recovery_time_s=31.52),
    AttemptRecord(attempt=3, num_hosts=4, mesh={"data": 4, "model": 2}, first_step=2401, last_step=10000,
                  restored_step=2400, cause=PlannedEnd.FINISHED, failed_host=None, detection_latency_s=None,
                  recovery_time_s=4.02),
]


@pytest.mark.parametrize("width", [80, 60])
def test_the_attempt_table_is_whole_at_the_terminal_s_width(width):
    term, out = console(width)
    print_attempts(ATTEMPTS, term)
    text = out.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
    for value in ("node_lost", "exception", "finished", "1201..2400", "2401..10000", "12.25", "31.52", "4×2"):
        assert value in text, f"{value} is shown whole"
    if width == 80:
        assert text.splitlines()[1].split() == ["#", "hosts", "data×model", "steps", "from", "ended", "host",
                                                "detect", "recover"]


def test_the_closing_lines_are_never_broken(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    term, out = console(40)
    run_path = pathlib.Path(tmp_path / "runs" / "a-very-long-entry-name-20261129-181500").absolute()
    Display(term).closing(run_path, run_path / "report.png")
    assert out.getvalue().splitlines() == [f"report: jaxlaunch report {os.path.relpath(run_path)}",
                                           f"picture: {os.path.relpath(run_path)}/report.png"]
