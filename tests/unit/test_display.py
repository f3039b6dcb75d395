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

from jaxlaunch.contract.events import FailureKind, PlannedEnd
from jaxlaunch.contract.layout import CHECKPOINT_COMMIT_MARKER
from jaxlaunch.contract.protocol import GroupPoll, HostStatus, Phase

POLL_S = 0.25


def console(width: int = 80) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, highlight=False), out


def commit(run: RunDir, step: int) -> None:
    folder = run.checkpoints / str(step)
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_COMMIT_MARKER).write_text("{}")


def test_the_progress_line_shows_each_checkpoint_once_it_commits(tmp_path):
    """A fast run (steps every 0.25 s poll, saves at 10 and 20, each committed a poll after its step)
    printed "ckpt -" at step 22: the view looked for commits only every 2 s."""
    term, out = console()
    run = RunDir(tmp_path / "run")
    run.create()
    now = [0.0]
    view = ConsoleView(Display(term), run, 22, lambda: (run.committed_steps() or [None])[0], lambda: now[0],
                       save_every=10)
    attempt = Attempt(number=1, num_hosts=2, mesh={"data": 2}, started_at=0.0, latest_committed=None)
    view.on_transition(None, None, Running(attempt))
    for step in range(1, 23):
        if step in (11, 21):
            commit(run, step - 1)
        hosts = [HostStatus(rank, Phase.TRAINING, step) for rank in range(2)]
        view.on_poll(None, attempt, GroupPoll(hosts, [{"step": step, "loss": 1.0}], [], {}, []))
        now[0] += POLL_S
    lines = out.getvalue().splitlines()
    assert lines[-1] == "step 22/22  loss 1.0000  hosts 2  ckpt 20"
    assert "step 12/22  loss 1.0000  hosts 2  ckpt 10" in lines


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
