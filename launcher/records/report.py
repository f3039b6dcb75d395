"""The run report: what happened to a run, from its records alone (`jaxlaunch.launcher.records.history`).

`python launch.py report RUN_DIR` prints the attempt table and the goodput with its badput split,
and writes RUN_DIR/report.png: the loss (or the first reported metric) against the step with a
marker at every failure and a band for each attempt's topology, and a goodput bar. The driver writes
the same report after every run. Works across launches of one run (a `--resume` adds to the same
records)."""

from __future__ import annotations

import io
import pathlib
from typing import TYPE_CHECKING, Any, BinaryIO

from jaxlaunch.launcher.records.goodput import BADPUT_LABELS, PRODUCTIVE, Split
from jaxlaunch.launcher.records.history import AttemptRecord, History, load_history
from jaxlaunch.launcher.records.runs import RunDir
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from jaxlaunch.contract import events
from jaxlaunch.contract.events import FailureKind, HostBusy, PlannedEnd, Straggler

if TYPE_CHECKING:
    from matplotlib.axes import Axes

BADPUT_COLORS = ("tab:orange", "tab:purple", "tab:red", "tab:brown", "tab:olive", "tab:pink", "tab:gray")
MIN_BAR_SHARE = 0.005
"""The narrowest a part of the goodput bar is drawn, as a share of the bar."""


# ---- text ---------------------------------------------------------------------------------------

def print_report(report: History, console: Console | None = None) -> None:
    console = console or Console()
    print_attempts(report.attempts, console)
    print_goodput(report.split, console)


def print_goodput(split: Split, console: Console) -> None:
    """The wall time's partition: every row's seconds and shares add up to the total row."""
    shares = split.shares()
    goodput = Table(title=f"goodput {split.goodput or 0:.1%} of {split.wall_s:.1f} s")
    goodput.add_column("time")
    goodput.add_column("seconds", justify="right")
    goodput.add_column("share", justify="right")
    goodput.add_row("productive training", f"{split.productive_s:.1f}", f"{shares[PRODUCTIVE]:.1%}")
    for key, label in BADPUT_LABELS.items():
        goodput.add_row(label, f"{split.badput_s[key]:.1f}", f"{shares[key]:.1%}")
    goodput.add_row("total (wall time)", f"{split.wall_s:.1f}", f"{sum(shares.values()):.1%}" if split.wall_s else "-",
                    style="bold")
    console.print(goodput)


UNBOUNDED_WIDTH = 10_000
"""Columns to measure a table's natural width in."""
ATTEMPT_COLUMNS = ("#", "hosts", "mesh", "steps", "from", "ended", "host", "detect", "recover")
"""The attempt table's columns: the attempt, its hosts and mesh, the steps it trained, the step it
restored, how it ended, the host that failed, and the seconds to detect the failure and to recover."""


def print_attempts(attempts: list[AttemptRecord], console: Console) -> None:
    """The attempt table, whole at the console's width: a table where it fits, a line per attempt
    where it does not (never a cell cut to "crash…")."""
    axes = {tuple(a.mesh or {}) for a in attempts}
    one_layout = len(axes) == 1 and () not in axes
    rows = []
    for a in attempts:
        sizes = a.mesh or {}
        mesh = "×".join(map(str, sizes.values())) if one_layout else ",".join(f"{k}={v}" for k, v in sizes.items())
        rows.append((str(a.attempt), _s(a.num_hosts), mesh, f"{_s(a.first_step)}..{_s(a.last_step)}",
                     _s(a.restored_step), a.cause or "running?", _s(a.failed_host), _f(a.detection_latency_s),
                     _f(a.recovery_time_s)))
    mesh_header = "×".join(next(iter(axes))) if one_layout else "mesh"
    table = Table(title="attempts (detect, recover: seconds)", box=None, pad_edge=False, padding=(0, 1))
    for column in ATTEMPT_COLUMNS:
        table.add_column(mesh_header if column == "mesh" else column, no_wrap=True,
                         justify="right" if column in ("detect", "recover") else "left")
    for row in rows:
        table.add_row(*row)
    if Measurement.get(console, console.options.update_width(UNBOUNDED_WIDTH), table).maximum <= console.width:
        console.print(table)
        return
    console.print("attempts")
    for (number, hosts, mesh, steps, restored, cause, host, detect, recover) in rows:
        failed = f" (host {host})" if host != "-" else ""
        timing = "".join(f", {name} {value} s" for name, value in (("detect", detect), ("recover", recover))
                         if value != "-")
        restored = f" from {restored}" if restored != "-" else ""
        console.print(f"  {number}: {hosts} hosts, {mesh_header} {mesh}, steps {steps}{restored}, {cause}{failed}"
                      f"{timing}", markup=False, highlight=False)


def _s(value: Any) -> str:
    return "-" if value is None else str(value)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---- picture ------------------------------------------------------------------------------------

def plot(report: History, path: pathlib.Path | BinaryIO) -> pathlib.Path | BinaryIO:
    # Matplotlib's object API, not pyplot: no backend chosen for the whole process (a notebook's
    # inline one stays), no figure registered globally, and pyplot's import (0.6 s) not paid.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    busy = [e for e in report.events if isinstance(e, HostBusy) and any(b is not None for b in e.busy_s)]
    if busy:
        fig = Figure(figsize=(12, 9))
        ax, bar, hosts_ax = fig.subplots(3, 1, gridspec_kw={"height_ratios": [4, 1, 2]})
    else:
        fig = Figure(figsize=(12, 6.5))
        ax, bar = fig.subplots(2, 1, gridspec_kw={"height_ratios": [4, 1]})
    colors = colormaps["Pastel1"]
    sizes = sorted({a.num_hosts for a in report.attempts if a.num_hosts})
    labelled = set()
    for a in report.attempts:
        if a.first_step is None or a.last_step is None or a.num_hosts is None:
            continue
        start = a.restored_step or 0
        hosts = a.num_hosts
        mesh = ",".join(f"{k}={v}" for k, v in (a.mesh or {}).items())
        label = f"{hosts} hosts ({mesh})"
        ax.axvspan(start, a.last_step, color=colors(sizes.index(hosts) % 9), alpha=0.6,
                   label=None if label in labelled else label, lw=0)
        labelled.add(label)
    metric = plotted_metric(report)
    points = [(s, r[metric]) for s, r in report.trajectory.items() if isinstance(r.get(metric), int | float)]
    if points:
        ax.plot(*zip(*points, strict=True), color="black", lw=1.2, label=metric)
    lost = [(r["step"], r[metric]) for r in report.recomputed if isinstance(r.get(metric), int | float)]
    if lost:
        ax.scatter(*zip(*lost, strict=True), s=6, color="grey", label="lost (recomputed) steps", zorder=3)
    failed = [a for a in report.attempts if isinstance(a.cause, FailureKind)]
    for i, a in enumerate(failed):
        step = a.last_step or a.restored_step or 0
        ax.axvline(step, color="red", ls="--", lw=1, label="failure" if i == 0 else None)
        ax.annotate(f"{a.cause}" + (f" (host {a.failed_host})" if a.failed_host is not None else ""),
                    (step, 1), xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points",
                    color="red", fontsize=8, rotation=0)
    for a in report.attempts:
        if a.cause in (PlannedEnd.RESIZE, PlannedEnd.REPLACE) and a.last_step is not None:
            ax.axvline(a.last_step, color="tab:blue", ls=":", lw=1)
    changed = [e for e in report.events if isinstance(e, events.DataOrderChanged) and e.step is not None]
    for i, e in enumerate(changed):
        ax.axvline(e.step, color="tab:orange", ls="-.", lw=1.2, label="data order changed" if i == 0 else None)
        ax.annotate(f"data order: {e.old_hosts}->{e.new_hosts} hosts", (e.step, 0), xycoords=("data", "axes fraction"),
                    xytext=(3, 4), textcoords="offset points", color="tab:orange", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{len(report.attempts)} attempt(s), {len(failed)} failure(s)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    _goodput_bar(bar, report.split)
    if busy:
        _host_busy(hosts_ax, busy[-1], [e for e in report.events if isinstance(e, Straggler)])
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path


def _goodput_bar(bar: Axes, split: Split) -> None:
    """The partition as one bar of shares that add up to 1: every part with time in it is drawn (at
    least a sliver wide, so that none vanishes) and named in the legend with its share."""
    colors = dict(zip((PRODUCTIVE, *BADPUT_LABELS), ("tab:green", *BADPUT_COLORS), strict=True))
    shares = {k: v for k, v in split.shares().items() if v > 0}
    widths = {k: max(v, MIN_BAR_SHARE) for k, v in shares.items()}
    scale = 1.0 / sum(widths.values()) if widths else 1.0
    left = 0.0
    for name, share in shares.items():
        bar.barh(0, widths[name] * scale, left=left, color=colors[name], label=f"{name} {share:.1%}")
        left += widths[name] * scale
    bar.set_xlim(0, 1)
    bar.set_yticks([])
    bar.set_title(f"goodput {split.goodput or 0:.1%} of {split.wall_s:.0f} s wall time", fontsize=10)
    bar.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4, fontsize=8, frameon=False)


def _host_busy(ax: Axes, busy: HostBusy, stragglers: list[Straggler]) -> None:
    """Each host's median busy time per step (its own work between steps) in the newest attempt that
    timed its steps; a host the driver named a straggler in it is drawn red."""
    named = {s.host for s in stragglers if s.attempt == busy.attempt}
    ranks = range(len(busy.busy_s))
    ax.bar(ranks, [(b or 0.0) * 1e3 for b in busy.busy_s],
           color=["tab:red" if r in named else "tab:blue" for r in ranks])
    ax.set_xticks(list(ranks), [f"host {r}" + (" (straggler)" if r in named else "") for r in ranks], fontsize=8)
    ax.set_ylabel("ms per step")
    ax.set_title(f"busy time per host, attempt {busy.attempt} (median over {busy.steps} steps)", fontsize=10)


def plotted_metric(report: History) -> str:
    """"loss" if the run reports one, else its first reported metric."""
    names = [k for r in report.trajectory.values() for k, v in r.items()
             if isinstance(v, int | float) and k not in ("step", "time", "attempt", "num_hosts", "step_time_s")]
    return "loss" if "loss" in names else (names[0] if names else "loss")


def write(run_dir: str | pathlib.Path, console: Console | None = None, show: bool = True) -> pathlib.Path | str:
    """Builds the report of a run directory (a path or a URL), prints it (if `show`) and writes
    report.png beside its records: where it went."""
    run = RunDir(run_dir)
    report = load_history(run)
    if show:
        print_report(report, console)
    return save_plot(report, run)


def save_plot(report: History, run: RunDir) -> pathlib.Path | str:
    """report.png, written whole into the run directory: where it went."""
    picture = io.BytesIO()
    plot(report, picture)
    return run.write_object("report.png", picture.getvalue())
