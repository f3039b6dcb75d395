"""What a notebook shows: a launch's result as a table with its report picture, and progress that
does not flood the cell."""

import pathlib

from jaxlaunch.launcher.views import display, notebook
from jaxlaunch.launcher.views.display import Display
from rich.console import Console

SUMMARY = {
    "status": "stopped", "final_step": 140, "first_loss": 0.95, "final_loss": 0.21, "num_hosts": 2,
    "num_devices": 4, "mesh": {"data": 2, "model": 2}, "goodput": 0.8125, "wall_time_s": 32.0, "run_dir": "runs/nb",
    "attempt_table": [
        {"attempt": 1, "num_hosts": 2, "first_step": 1, "last_step": 12, "restored_step": None, "cause": "crashed",
         "failed_host": 1, "duration_s": 9.5},
        {"attempt": 2, "num_hosts": 2, "first_step": 1, "last_step": 140, "restored_step": None, "cause": "stopped",
         "failed_host": None, "duration_s": 22.5},
    ],
}


def test_a_result_shows_as_a_table_of_its_attempts_with_its_report_inline(tmp_path: pathlib.Path):
    (tmp_path / "report.png").write_bytes(b"\x89PNG fake")
    shown = notebook.to_html(SUMMARY, "stopped by SIGINT after saving step 140", tmp_path)
    assert "<td style='text-align:left'>stopped: stopped by SIGINT after saving step 140</td>" in shown
    assert "<td style='text-align:left'>81.2% of 32.0 s</td>" in shown
    assert "<td style='text-align:left'>1–12</td>" in shown and "<td style='text-align:left'>crashed</td>" in shown
    assert "data:image/png;base64,iVBORyBmYWtl" in shown
    markdown = notebook.to_markdown(SUMMARY, None, tmp_path)
    assert "| 2 | 2 | 1–140 | – | stopped | – | 22.5 s |" in markdown
    assert "| loss | 0.9500 → 0.2100 |" in markdown
    assert "data:image/png" not in notebook.to_html(SUMMARY, None, tmp_path / "missing"), "no picture, no image"


def test_progress_in_a_notebook_without_widgets_is_a_line_every_10_percent(monkeypatch):
    monkeypatch.setattr(display, "_widgets", lambda: False)
    console = Console(force_jupyter=True, record=True, width=100)
    shown = Display(console)
    assert not shown.live
    shown.start(0, 100)
    for step in range(1, 101):
        shown.update(step, {"step": step, "loss": 1.0 / step}, hosts=2, checkpoint="-")
    lines = console.export_text().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("step 100/100  loss 0.0100")
    monkeypatch.setattr(display, "_widgets", lambda: True)
    assert Display(Console(force_jupyter=True)).live, "with ipywidgets, Rich redraws one bar in place"
