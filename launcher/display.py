"""What the user sees on the driver's terminal: a live progress bar on a terminal, a line every few
percent elsewhere (CI, log files), and the final tables."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class Display:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=False, highlight=False)
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self.total = 0
        self._last_line_step = -1

    def start(self, first_step: int, total_steps: int) -> None:
        self.total = total_steps
        if self.live and self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                console=self.console, transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=first_step, info="starting")
            self.progress.start()

    def update(self, step: int, loss: float | None, tokens_per_s: float | None, hosts: int,
               checkpoint_step: int | None) -> None:
        info = (
            f"loss {loss:.4f}  {tokens_per_s or 0:,.0f} tok/s  hosts {hosts}  "
            f"ckpt {checkpoint_step if checkpoint_step is not None else '-'}"
            if loss is not None else f"hosts {hosts}"
        )
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif step != self._last_line_step and (
            step == self.total or step - max(self._last_line_step, 0) >= max(1, self.total // 10)
        ):
            self._last_line_step = step
            self.console.print(f"step {step}/{self.total}  {info}")

    def message(self, text: str) -> None:
        self.console.print(text)

    def log_tail(self, path, lines: list[str]) -> None:
        self.console.print(f"[dim]last lines of {path}:[/dim]")
        for line in lines:
            self.console.print(f"  {line}", markup=False, highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, summary: dict[str, Any]) -> None:
        table = Table(title="summary", show_header=False)
        for key in ("status", "final_step", "first_loss", "final_loss", "num_hosts", "process_count",
                    "num_devices", "mesh", "attempts", "goodput", "wall_time_s", "run_dir"):
            if key in summary:
                value = summary[key]
                table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        self.console.print(table)


def error(text: str) -> None:
    print(f"error: {text}", file=sys.stderr)
