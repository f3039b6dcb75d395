"""What the user sees on the driver's terminal: a live progress bar on a terminal, a line every 10%
elsewhere (CI, log files), a line for every failure and restart, and the final tables.

`ConsoleView` is a listener of the driver: it turns state changes and polls into these lines."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from typing import Any

from jaxlaunch.launcher.control.driver import Driver, Listener
from jaxlaunch.launcher.control.states import (
    Attempt,
    AttemptEndNotice,
    AwaitingCapacity,
    Draining,
    DrainReason,
    Failed,
    Persisting,
    Relaunching,
    Running,
    State,
)
from jaxlaunch.launcher.records.runs import RunDir
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from jaxlaunch.contract import events
from jaxlaunch.contract.events import FailureKind
from jaxlaunch.contract.protocol import GroupPoll

LOG_TAIL_LINES = 12
STACK_TAIL_LINES = 16


JUPYTER_REFRESHES_PER_S = 2
"""A live bar in a notebook redraws its widget this often (each redraw is a message to the browser)."""


def _widgets() -> bool:
    """Rich draws a live bar in a notebook inside an ipywidgets Output, redrawn in place."""
    return importlib.util.find_spec("ipywidgets") is not None


class Display:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=False, highlight=False, quiet=quiet)
        # A notebook without ipywidgets gets the lines of a log file (one every 10 %): each print is
        # an output of its own there, and a redrawn bar would flood the cell.
        jupyter = self.console.is_jupyter and _widgets()
        self.live = (self.console.is_terminal or jupyter) and not quiet
        self.refreshes_per_s = JUPYTER_REFRESHES_PER_S if jupyter else 10
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.total = 0
        self._last_line_step = -1

    def start(self, first_step: int, total_steps: int) -> None:
        self.total = total_steps
        if self.live and self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                console=self.console, transient=False, refresh_per_second=self.refreshes_per_s,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=first_step, info="starting")
            self.progress.start()

    def update(self, step: int, record: dict[str, Any] | None, hosts: int, checkpoint: str) -> None:
        """`checkpoint`: the newest committed step of each tier ("57 mem · 50 disk")."""
        parts = []
        if record is not None:
            if "loss" in record:
                loss = record["loss"]
                parts.append(f"loss {loss:.4f}" if isinstance(loss, float) else f"loss {loss}")
            if isinstance(record.get("tokens_per_s"), float):
                parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        parts += [f"hosts {hosts}", f"ckpt {checkpoint}"]
        info = "  ".join(parts)
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif step != self._last_line_step and (
            step == self.total or step - max(self._last_line_step, 0) >= max(1, self.total // 10)
        ):
            self._last_line_step = step
            self.console.print(f"step {step}/{self.total}  {info}")

    def message(self, text: str, soft_wrap: bool = False) -> None:
        """A line; with `soft_wrap`, never broken by the display (a command or a path to copy)."""
        self.console.print(text, soft_wrap=soft_wrap)

    def lines(self, title: str, lines: list[str]) -> None:
        self.console.print(f"[dim]{escape(title)}[/dim]")
        # One print: in a notebook, each print is an output of its own.
        self.console.print("\n".join(f"  {line}" for line in lines), markup=False, highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, summary: dict[str, Any]) -> None:
        table = Table(title="summary", show_header=False)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")  # a long path breaks across lines rather than losing its end
        for key in ("status", "final_step", "first_loss", "final_loss", "num_hosts", "process_count",
                    "num_devices", "mesh", "attempts", "goodput", "wall_time_s", "run_dir"):
            if summary.get(key) is not None:
                value = summary[key]
                text = shown(value) if key == "run_dir" else f"{value:.4f}" if isinstance(value, float) else str(value)
                table.add_row(key, text)
        self.console.print(table)

    def closing(self, run_path: pathlib.Path | str, picture: pathlib.Path | str) -> None:
        """Where to look next, one unbroken line each, to copy at any terminal width."""
        for line in (f"report: jaxlaunch report {shown(run_path)}", f"picture: {shown(picture)}"):
            self.console.print(line, soft_wrap=True, markup=False, highlight=False)


def shown(path: pathlib.Path | str) -> str:
    """A path as the user would type it: relative to the working directory when it is under it (a
    URL as it is)."""
    if "://" in str(path):
        return str(path)
    try:
        here = pathlib.Path.cwd()
    except FileNotFoundError:  # the working directory was removed under us (a Ray Job's, once it ends)
        return str(path)
    try:
        absolute = pathlib.Path(path).absolute()
        return os.path.relpath(absolute, here) if absolute.is_relative_to(here) else str(path)
    except ValueError:
        return str(path)


class ConsoleView(Listener):
    """The driver's listener for the terminal."""

    def __init__(self, display: Display, run: RunDir, total_steps: int, memory_tier: bool):
        self.display, self.run, self.total_steps, self.memory_tier = display, run, total_steps, memory_tier
        self.committed = CommittedSteps()
        """From what the hosts report: the progress line lists no checkpoints."""
        self.last_record: dict[str, Any] | None = None
        """The running attempt's newest record (None until it trains: the step shown is where it starts)."""
        self.start_step = 0
        self.risk_told = False

    def on_transition(self, driver: Driver, old: State, new: State) -> None:
        d = self.display
        if isinstance(new, Running) and not isinstance(old, Running):
            self.committed.heard(durable=new.attempt.latest_committed)  # the driver listed it to start the attempt
            self.last_record, self.start_step = None, new.attempt.latest_committed or 0  # not the last attempt's
            d.start(self.start_step, self.total_steps)
        elif isinstance(new, AwaitingCapacity) and not isinstance(old, AwaitingCapacity):
            d.message(f"waiting for capacity: room for {new.placeable} hosts, at least "
                      f"{driver.policies.scaling.min_hosts} needed")
        elif isinstance(new, Draining) and not isinstance(old, Draining):
            if new.reason == DrainReason.RESIZE:
                d.message(f"capacity for {new.target_hosts} hosts: saving, then restarting on {new.target_hosts}")
            elif new.reason == DrainReason.STOP:  # a replacement was told with the node it avoids
                d.message(f"{driver.stop_name}: saving a checkpoint on every host, then stopping "
                          f"(again to stop at once)")
        elif isinstance(new, Persisting) and not isinstance(old, Persisting):
            failed = isinstance(new.outcome, Failed)
            ends = "the job gives up" if failed else "stopping"
            again = "" if failed else f" ({driver.stop_name} again to stop at once)"
            d.message(f"{ends} ({escape(new.outcome.reason)}); first writing memory step {new.step} to durable "
                      f"storage on {new.num_hosts} host(s){again}")
        if isinstance(new, Relaunching):
            d.message(f"restarting in {new.decision.backoff_s:.1f} s: {new.decision.reason}")

    def on_attempt_ended(self, driver: Driver, ended: AttemptEndNotice) -> None:
        failure, d = ended.failure, self.display
        if failure is None:
            return
        where = f"host {failure.rank}" if failure.rank is not None else "the group"
        d.message(f"[red]{failure.kind.value}[/red] on {where} after step {failure.step}: {escape(failure.message)}")
        if failure.traceback:
            lines = failure.traceback.rstrip().splitlines()
            if failure.kind == FailureKind.HUNG:
                d.lines("innermost frames of the hung host:", lines[:STACK_TAIL_LINES])
            else:
                d.message(escape(failure.traceback))
        if failure.rank is not None:
            self._log_tail(ended.attempt.number, failure.rank)

    def on_poll(self, driver: Driver, attempt: Attempt, poll: GroupPoll) -> None:
        for rank, event in poll.events:
            if isinstance(event, events.CheckpointFallback):
                why = next(iter((event.error or "").strip().splitlines()), "unreadable")
                self.display.message(f"[yellow]checkpoint step {event.step} set aside in "
                                     f"{escape(str(event.moved_to))} ({escape(why)}); an older one "
                                     f"serves[/yellow]")
            elif isinstance(event, events.CadenceChosen):
                self.display.message(escape(event.message))
            elif isinstance(event, events.Restored):
                self.committed.restored(event.step, event.tier)
                self.start_step = event.step
            elif isinstance(event, events.DataOrderAtRisk) and self.risk_told:
                continue  # each attempt's hosts warn alike: once per launch
            elif isinstance(event, events.FinalSave) and not event.ended:
                self.display.message(f"[yellow]warning: host {rank}: {escape(event.message)}[/yellow]")
            elif isinstance(event, events.LowDiskSpace | events.CompilationCacheDisabled | events.MemoryTierOff
                            | events.MemorySaveRefused | events.MemoryFallback | events.MemoryCopyPassedOver
                            | events.DataOrderChanged
                            | events.DataOrderAtRisk):
                self.risk_told = self.risk_told or isinstance(event, events.DataOrderAtRisk)
                self.display.message(f"[yellow]warning: {escape(str(event.message))}"
                                     f"[/yellow]")
        for notice in poll.notices:
            if isinstance(notice, events.KeeperRestarted):
                self.display.message(f"[yellow]{escape(notice.message)}[/yellow]")
        if poll.records:
            self.last_record = poll.records[-1]
        steps = [h.step for h in poll.hosts if h.step is not None]
        step = self.last_record["step"] if self.last_record else (max(steps) if steps else self.start_step)
        self.committed.heard(memory=poll.committed("memory"), durable=poll.committed("durable"))
        self.display.update(step, self.last_record, attempt.num_hosts, self.committed.line(self.memory_tier))

    def _log_tail(self, attempt: int, rank: int) -> None:
        path = self.run.host_log(attempt, rank)
        try:
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return
        self.display.lines(f"last lines of {path}:", lines)


class CommittedSteps:
    """The newest committed step of each tier, as the hosts reported their saves (and the driver's
    listing at an attempt's start): lower only where a restore dropped the newer steps."""

    def __init__(self) -> None:
        self.memory: int | None = None
        self.durable: int | None = None

    def heard(self, memory: int | None = None, durable: int | None = None) -> None:
        if memory is not None:
            self.memory = max(memory, self.memory or memory)
        if durable is not None:
            self.durable = max(durable, self.durable or durable)

    def restored(self, step: int, tier: str | None) -> None:
        """An attempt restored `step` from `tier`: what memory held past it was dropped, and a durable
        restore took the newest durable step that read back (newer ones were set aside)."""
        if tier == "memory":
            self.memory = step
        else:
            self.memory = None if self.memory is not None and self.memory > step else self.memory
            self.durable = step

    def line(self, memory_tier: bool) -> str:
        def shown(step: int | None) -> str:
            return "-" if step is None else str(step)
        return f"{shown(self.memory)} mem · {shown(self.durable)} disk" if memory_tier else shown(self.durable)


def error(text: str) -> None:
    print(f"error: {text}", file=sys.stderr)
