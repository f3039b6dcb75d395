"""The run report: what happened to a run, from its records alone (events.jsonl, metrics.jsonl).

`python launch.py report RUN_DIR` prints the attempt table and the goodput with its badput split,
and writes RUN_DIR/report.png: the loss against the step with a marker at every failure and a band
for each attempt's topology, and a goodput bar. The driver writes the same report after every run.
Works across launches of one run (a `--resume` adds to the same records)."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from rich.console import Console
from rich.table import Table

from launcher.runs import RunDir

BADPUT_LABELS = {
    "startup": "start-up (processes, JAX init, compile)",
    "restore": "restoring checkpoints",
    "recompute": "recomputing lost steps",
    "checkpoint": "checkpoint blocking",
    "capacity_wait": "waiting for capacity",
    "downtime": "detection, teardown, backoff",
    "other": "other (driver, Ray, polling)",
}

BADPUT_COLORS = ("tab:orange", "tab:purple", "tab:red", "tab:brown", "tab:olive", "tab:pink", "tab:gray")


@dataclasses.dataclass
class Report:
    attempts: list[dict[str, Any]]
    wall_s: float
    productive_s: float
    badput_s: dict[str, float]
    trajectory: dict[int, float]
    """step -> loss of the final trajectory."""
    recomputed: list[tuple[int, float]]
    """(step, loss) of computations that a failure threw away."""

    @property
    def goodput(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0


def build(run: RunDir) -> Report:
    events = run.read_jsonl(run.events_path)
    metrics = run.read_jsonl(run.metrics_path)
    attempts = _attempts(events)
    last: dict[int, dict[str, Any]] = {}
    recomputed = []
    for record in metrics:
        if record["step"] in last:
            recomputed.append(last[record["step"]])
        last[record["step"]] = record
    productive = sum(r["step_time_s"] for r in last.values())
    badput = dict.fromkeys(BADPUT_LABELS, 0.0)
    badput["recompute"] = sum(r["step_time_s"] for r in recomputed)
    badput["checkpoint"] = sum(r.get("checkpoint_blocking_s", 0.0) for r in metrics)
    for a in attempts:
        badput["restore"] += a.get("restore_s") or 0.0
        first = a.get("time_to_first_step_s")
        badput["startup"] += (first - (a.get("restore_s") or 0.0)) if first is not None else a.get("duration_s", 0.0)
    badput["capacity_wait"], badput["downtime"] = _gaps(events)
    wall = _wall_time(events)
    badput["other"] = max(0.0, wall - productive - sum(badput.values()))
    return Report(
        attempts=attempts, wall_s=wall, productive_s=productive, badput_s=badput,
        trajectory={s: r["loss"] for s, r in sorted(last.items())},
        recomputed=[(r["step"], r["loss"]) for r in recomputed],
    )


def _attempts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_number: dict[int, dict[str, Any]] = {}
    for e in events:
        if "attempt" not in e:
            continue
        a = by_number.setdefault(e["attempt"], {"attempt": e["attempt"]})
        if e["event"] == "attempt_started":
            a.update(num_hosts=e["num_hosts"], mesh=e["mesh"], started=e["time"])
        elif e["event"] == "restored":
            a.update(restored_step=e["step"], restore_s=e["seconds"])
        elif e["event"] == "attempt_ended":
            a.update({k: e.get(k) for k in ("cause", "first_step", "last_step", "detection_latency_s",
                                            "recovery_time_s", "time_to_first_step_s", "duration_s")},
                     failed_host=e.get("host"), ended=e["time"])
    return [by_number[n] for n in sorted(by_number)]


def _wall_time(events: list[dict[str, Any]]) -> float:
    """Sum over launches of launch -> job end (the time between launches is nobody's badput)."""
    total, start, last = 0.0, None, None
    for e in events:
        if e["event"] == "launch":
            if start is not None:
                total += last - start
            start = e["time"]
        last = e["time"]
    if start is not None:
        total += last - start
    return total


def _gaps(events: list[dict[str, Any]]) -> tuple[float, float]:
    """(waiting for capacity, other downtime) between a failed attempt's end and the next start."""
    capacity = downtime = 0.0
    ended_at = waiting_at = None
    for e in events:
        if e["event"] == "attempt_ended" and e.get("cause") not in ("finished", "stopped"):
            ended_at, waiting_at = e["time"], None
        elif e["event"] == "waiting_for_capacity" and ended_at is not None:
            waiting_at = e["time"]
        elif e["event"] == "attempt_started" and ended_at is not None:
            if waiting_at is not None:
                capacity += e["time"] - waiting_at
                downtime += waiting_at - ended_at
            else:
                downtime += e["time"] - ended_at
            ended_at = waiting_at = None
    return capacity, downtime


# ---- text ---------------------------------------------------------------------------------------

def print_report(report: Report, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="attempts")
    for column in ("attempt", "hosts", "mesh", "steps", "restored", "end", "host", "detect s", "recover s"):
        table.add_column(column)
    for a in report.attempts:
        mesh = ",".join(f"{k}={v}" for k, v in (a.get("mesh") or {}).items())
        table.add_row(
            str(a["attempt"]), str(a.get("num_hosts", "-")), mesh,
            f"{_s(a.get('first_step'))}..{_s(a.get('last_step'))}", _s(a.get("restored_step")),
            a.get("cause") or "running?", _s(a.get("failed_host")),
            _f(a.get("detection_latency_s")), _f(a.get("recovery_time_s")),
        )
    console.print(table)
    goodput = Table(title=f"goodput {report.goodput:.1%} of {report.wall_s:.1f} s")
    goodput.add_column("time")
    goodput.add_column("seconds", justify="right")
    goodput.add_column("share", justify="right")
    goodput.add_row("productive training", f"{report.productive_s:.1f}", f"{report.goodput:.1%}")
    for key, label in BADPUT_LABELS.items():
        seconds = report.badput_s[key]
        goodput.add_row(label, f"{seconds:.1f}", f"{seconds / report.wall_s:.1%}" if report.wall_s else "-")
    console.print(goodput)


def _s(value: Any) -> str:
    return "-" if value is None else str(value)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---- picture ------------------------------------------------------------------------------------

def plot(report: Report, path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bar) = plt.subplots(2, 1, figsize=(12, 6.5), gridspec_kw={"height_ratios": [4, 1]})
    colors = plt.get_cmap("Pastel1")
    sizes = sorted({a.get("num_hosts") for a in report.attempts if a.get("num_hosts")})
    labelled = set()
    for a in report.attempts:
        if a.get("first_step") is None:
            continue
        start = (a.get("restored_step") or 0)
        hosts = a.get("num_hosts")
        mesh = ",".join(f"{k}={v}" for k, v in (a.get("mesh") or {}).items())
        label = f"{hosts} hosts ({mesh})"
        ax.axvspan(start, a["last_step"], color=colors(sizes.index(hosts) % 9), alpha=0.6,
                   label=None if label in labelled else label, lw=0)
        labelled.add(label)
    steps = list(report.trajectory)
    ax.plot(steps, list(report.trajectory.values()), color="black", lw=1.2, label="loss")
    if report.recomputed:
        xs, ys = zip(*report.recomputed, strict=True)
        ax.scatter(xs, ys, s=6, color="grey", label="lost (recomputed) steps", zorder=3)
    failed = [a for a in report.attempts if a.get("cause") not in (None, "finished", "stopped", "resize")]
    for i, a in enumerate(failed):
        step = a.get("last_step") or a.get("restored_step") or 0
        ax.axvline(step, color="red", ls="--", lw=1, label="failure" if i == 0 else None)
        ax.annotate(f"{a['cause']}" + (f" (host {a['failed_host']})" if a.get("failed_host") is not None else ""),
                    (step, 1), xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points",
                    color="red", fontsize=8, rotation=0)
    for a in report.attempts:
        if a.get("cause") == "resize":
            ax.axvline(a["last_step"], color="tab:blue", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
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
    bar.set_title(f"goodput {report.goodput:.1%} of {report.wall_s:.0f} s wall time", fontsize=10)
    bar.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(run_dir: str | pathlib.Path, console: Console | None = None, show: bool = True) -> pathlib.Path:
    """Builds the report of a run directory, prints it (if `show`) and writes report.png."""
    run = RunDir(run_dir)
    report = build(run)
    if show:
        print_report(report, console)
    return plot(report, run.path / "report.png")
