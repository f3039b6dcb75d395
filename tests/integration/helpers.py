"""Running the launcher as a user does (a subprocess of `python launch.py`) and reading its records."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 420
SHORT_RUN = ("--steps", "30", "--save-every", "10")


def launch(
    *args: str, timeout: float = LAUNCH_TIMEOUT_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**_env(), **(env or {})},
    )


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the hosts get theirs from the launcher
    env.pop("JAX_PLATFORMS", None)
    env["COLUMNS"] = "200"
    return env


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def events(run_dir: pathlib.Path, kind: str | None = None) -> list[dict[str, Any]]:
    found = read_jsonl(run_dir / "events.jsonl")
    return [e for e in found if kind is None or e["event"] == kind]


def trajectory(run_dir: pathlib.Path) -> dict[int, float]:
    """step -> loss of the run's final trajectory (a recomputed step keeps its last value)."""
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


def summary(run_dir: pathlib.Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def committed_steps(run_dir: pathlib.Path) -> list[int]:
    from launcher.runs import RunDir

    return sorted(RunDir(run_dir).committed_steps())


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Waits until `condition()` holds (checked every 0.2 s), failing with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"launcher exited {proc.returncode} while waiting for {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def last_step(run_dir: pathlib.Path) -> int:
    records = read_jsonl(run_dir / "metrics.jsonl")
    return records[-1]["step"] if records else 0


def stop_with_sigterm_after(proc: subprocess.Popen, run_dir: pathlib.Path, step: int) -> tuple[int, str, str]:
    """SIGTERM to the driver once the run has passed `step`; returns its exit code and output."""
    wait_for(lambda: last_step(run_dir) >= step, 300, f"step {step}", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def assert_no_host_left(run_dir: pathlib.Path) -> None:
    """Every host process the run started is gone."""
    for started in events(run_dir, "group_started"):
        for pid in started["pids"]:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            # A zombie or a process of the same pid reused is not ours if its command differs.
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline")
            text = cmdline.read_bytes().decode(errors="replace") if cmdline.exists() else ""
            assert "HostActor" not in text and "ray::" not in text, f"host process {pid} is still running"


def final_arrays(run_dir: pathlib.Path, step: int):
    from workers.checkpoint import read_arrays

    return read_arrays(run_dir / "checkpoints" / str(step))


def tree_snapshot(path: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Every file under `path` with its size and modification time, to prove nothing changed."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}
