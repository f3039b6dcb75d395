"""How a launch's result looks in a notebook: a table of the outcome and of its attempts, with the run's
report picture inline (what `LaunchResult._repr_html_` and `_repr_markdown_` return). Everything is
read from the run's summary, the one record the terminal's tables come from too."""

from __future__ import annotations

import base64
import html
import pathlib
from collections.abc import Iterable
from typing import Any

from jaxlaunch.contract.store import open_store

REPORT_WIDTH_PX = 720
"""The report picture's width in a notebook cell."""
ATTEMPT_COLUMNS = ("attempt", "hosts", "steps", "restored from", "ended by", "failed host", "duration")


def overview(summary: dict[str, Any], reason: str | None) -> list[tuple[str, str]]:
    """(label, value) rows of the outcome, from a run's summary."""
    rows = [("status", summary.get("status", "?") + (f": {reason}" if reason else ""))]
    if summary.get("final_step") is not None:
        rows.append(("final step", str(summary["final_step"])))
    if isinstance(summary.get("first_loss"), float) and isinstance(summary.get("final_loss"), float):
        rows.append(("loss", f"{summary['first_loss']:.4f} → {summary['final_loss']:.4f}"))
    if summary.get("num_hosts") is not None:
        rows.append(("hosts", f"{summary['num_hosts']} ({summary.get('num_devices')} devices, mesh "
                              f"{summary.get('mesh')})"))
    if summary.get("goodput") is not None:
        rows.append(("goodput", f"{summary['goodput']:.1%} of {summary.get('wall_time_s') or 0:.1f} s"))
    rows.append(("run directory", str(summary.get("run_dir"))))
    return rows


def attempt_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    def text(value: Any) -> str:
        return "–" if value is None else str(value)

    out: list[tuple[str, ...]] = []
    for a in summary.get("attempt_table", []):
        steps = "–" if a.get("first_step") is None else f"{a['first_step']}–{a.get('last_step')}"
        duration = f"{a['duration_s']:.1f} s" if isinstance(a.get("duration_s"), float) else "–"
        out.append((text(a.get("attempt")), text(a.get("num_hosts")), steps, text(a.get("restored_step")),
                    text(a.get("cause")), text(a.get("failed_host")), duration))
    return out


def _picture(run_dir: pathlib.Path | str) -> str | None:
    try:
        return base64.b64encode(open_store(run_dir).read("report.png")).decode()
    except OSError:
        return None


def to_html(summary: dict[str, Any], reason: str | None, run_dir: pathlib.Path | str) -> str:
    def row(cells: Iterable[str], tag: str = "td") -> str:
        return "<tr>" + "".join(f"<{tag} style='text-align:left'>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    parts = ["<div><table>", *(row(r) for r in overview(summary, reason)), "</table>"]
    attempts = attempt_rows(summary)
    if attempts:
        parts += ["<table>", row(ATTEMPT_COLUMNS, "th"), *(row(r) for r in attempts), "</table>"]
    picture = _picture(run_dir)
    if picture is not None:
        parts.append(f"<img src='data:image/png;base64,{picture}' width='{REPORT_WIDTH_PX}' alt='report'/>")
    return "\n".join([*parts, "</div>"])


def to_markdown(summary: dict[str, Any], reason: str | None, run_dir: pathlib.Path | str) -> str:
    def row(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [row(("outcome", "")), row(("---", "---")), *(row(r) for r in overview(summary, reason)), ""]
    attempts = attempt_rows(summary)
    if attempts:
        lines += [row(ATTEMPT_COLUMNS), row(["---"] * len(ATTEMPT_COLUMNS)), *(row(r) for r in attempts), ""]
    picture = _picture(run_dir)
    if picture is not None:
        lines.append(f"![report](data:image/png;base64,{picture})")
    return "\n".join(lines)
