"""The run report: what happened to a run, from its records alone (`jaxlaunch.launcher.history`).

`python launch.py report RUN_DIR` prints the attempt table and the goodput with its badput split,
and writes RUN_DIR/report.png: the loss (or the first reported metric) against the step with a
marker at every failure and a band for each attempt's topology, and a goodput bar. The driver writes
the same report after every run. Works across launches of one run (a `--resume` adds to the same
records)."""

from __future__ import annotations

import io
import pathlib
from typing import Any, BinaryIO

from jaxlaunch.launcher.history import BADPUT_LABELS, History, load
from jaxlaunch.launcher.runs import RunDir
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

BADPUT_COLORS = ("tab:orange", "tab:purple", "tab:red", "tab:brown", "tab:olive", "tab:pink", "tab:gray")


# ---- text ---------------------------------------------------------------------------------------

def print_report(report: History, console: Console | None = None) -> None:
    console = console or Console()
    print_attempts(report.attempts, console)
    goodput = Table(title=f"goodput {report.goodput or 0:.1%} of {report.wall_s:.1f} s")
    goodput.add_column("time")
    goodput.add_column("seconds", justify="right")
    goodput.add_column("share", justify="right")
    goodput.add_row("productive training", f"{report.productive_s:.1f}", f"{report.goodput or 0:.1%}")
    for key, label in BADPUT_LABELS.items():
        seconds = report.badput_s[key]
        goodput.add_row(label, f"{seconds:.1f}", f"{seconds / report.wall_s:.1%}" if report.wall_s else "-")
    console.print(goodput)


UNBOUNDED_WIDTH = 10_000
"""Columns to measure a table's natural width in."""
ATTEMPT_COLUMNS = ("#", "hosts", "mesh", "steps", "from", "ended", "host", "detect", "recover")
"""The attempt table's columns: the attempt, its hosts and mesh, the steps it trained, the step it
restored, how it ended, the host that failed, and the seconds to detect the failure and to recover."""


def print_attempts(attempts: list[dict[str, Any]], console: Console) -> None:
    """The attempt table, whole at the console's width: a table where it fits, a line per attempt
    where it does not (never a cell cut to "crash…")."""
    axes = {tuple(a.get("mesh") or {}) for a in attempts}
    one_layout = len(axes) == 1 and () not in axes
    rows = []
    for a in attempts:
        sizes = a.get("mesh") or {}
        mesh = "×".join(map(str, sizes.values())) if one_layout else ",".join(f"{k}={v}" for k, v in sizes.items())
        rows.append((str(a["attempt"]), _s(a.get("num_hosts")), mesh,
                     f"{_s(a.get('first_step'))}..{_s(a.get('last_step'))}", _s(a.get("restored_step")),
                     a.get("cause") or "running?", _s(a.get("failed_host")),
                     _f(a.get("detection_latency_s")), _f(a.get("recovery_time_s"))))
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bar) = plt.subplots(2, 1, figsize=(12, 6.5), gridspec_kw={"height_ratios": [4, 1]})
    colors = plt.get_cmap("Pastel1")
    sizes = sorted({a.get("num_hosts") for a in report.attempts if a.get("num_hosts")})
    labelled = set()
    for a in report.attempts:
        if a.get("first_step") is None or a.get("last_step") is None or a.get("num_hosts") is None:
            continue
        start = (a.get("restored_step") or 0)
        hosts = a.get("num_hosts")
        mesh = ",".join(f"{k}={v}" for k, v in (a.get("mesh") or {}).items())
        label = f"{hosts} hosts ({mesh})"
        ax.axvspan(start, a["last_step"], color=colors(sizes.index(hosts) % 9), alpha=0.6,
                   label=None if label in labelled else label, lw=0)
        labelled.add(label)
    metric = plotted_metric(report)
    points = [(s, r[metric]) for s, r in report.trajectory.items() if isinstance(r.get(metric), int | float)]
    if points:
        ax.plot(*zip(*points, strict=True), color="black", lw=1.2, label=metric)
    lost = [(r["step"], r[metric]) for r in report.recomputed if isinstance(r.get(metric), int | float)]
    if lost:
        ax.scatter(*zip(*lost, strict=True), s=6, color="grey", label="lost (recomputed) steps", zorder=3)
    failed = [a for a in report.attempts if a.get("cause") not in (None, "finished", "stopped", "resize")]
    for i, a in enumerate(failed):
        step = a.get("last_step") or a.get("restored_step") or 0
        ax.axvline(step, color="red", ls="--", lw=1, label="failure" if i == 0 else None)
        ax.annotate(f"{a['cause']}" + (f" (host {a['failed_host']})" if a.get("failed_host") is not None else ""),
                    (step, 1), xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points",
                    color="red", fontsize=8, rotation=0)
    for a in report.attempts:
        if a.get("cause") == "resize" and a.get("last_step") is not None:
            ax.axvline(a["last_step"], color="tab:blue", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{len(report.attempts)} attempt(s), {len(failed)} failure(s)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    left = 0.0
    parts = [("productive", report.productive_s, "tab:green")] + [
        (key, seconds, color) for (key, seconds), color in zip(report.badput_s.items(), BADPUT_COLORS, strict=True)
    ]
    for name, seconds, color in parts:
        share = seconds / report.wall_s if report.wall_s else 0
        if share <= 0:
            continue
        bar.barh(0, share, left=left, color=color, label=f"{name} {share:.0%}")
        left += share
    bar.set_xlim(0, 1)
    bar.set_yticks([])
    bar.set_title(f"goodput {report.goodput or 0:.1%} of {report.wall_s:.0f} s wall time", fontsize=10)
    bar.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def plotted_metric(report: History) -> str:
    """"loss" if the run reports one, else its first reported metric."""
    names = [k for r in report.trajectory.values() for k, v in r.items()
             if isinstance(v, int | float) and k not in ("step", "time", "attempt", "num_hosts", "step_time_s")]
    return "loss" if "loss" in names else (names[0] if names else "loss")


def write(run_dir: str | pathlib.Path, console: Console | None = None, show: bool = True) -> pathlib.Path | str:
    """Builds the report of a run directory (a path or a URL), prints it (if `show`) and writes
    report.png beside its records: where it went."""
    run = RunDir(run_dir)
    report = load(run)
    if show:
        print_report(report, console)
    return save_plot(report, run)


def save_plot(report: History, run: RunDir) -> pathlib.Path | str:
    """report.png, written whole into the run directory: where it went."""
    picture = io.BytesIO()
    plot(report, picture)
    return run.write_object("report.png", picture.getvalue())
