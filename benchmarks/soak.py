"""The soak: N runs of examples/minimal.py on 2 hosts under `--chaos` with a short mean (several
kills a run), each compared bit for bit with one uninterrupted run of the same settings.

A run succeeds when `launch.py` exits 0 and its final trajectory (every step's loss, as
`jaxlaunch.launcher.records.history` derives it from metrics.jsonl) equals the reference's exactly.
Recovery of a kill is measured as the side-by-side kill is (`launches.summarize`): from the kill
(the run's `chaos_kill` event) to the first metric record of a later attempt. A failed run's
directory is kept under benchmarks/out/soak-failures/."""

from __future__ import annotations

import pathlib
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

from benchmarks import launches

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENTRY = str(ROOT / "examples" / "minimal.py") + ":main"
FAILURES = ROOT / "benchmarks" / "out" / "soak-failures"
RUNS, STEPS, MEAN_S = 20, 1500, 4.0
"""1,500 steps: with the memory tier's millisecond saves and restores, 300 steps took about 15 s on
2 cores, and some runs saw no kill at all; the checkpoint cadence is the defaults' (auto)."""


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (a measured value, never an interpolated one)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))]


def trajectory(run_dir: pathlib.Path) -> dict[int, Any]:
    from jaxlaunch.launcher.records import history
    from jaxlaunch.launcher.records.runs import RunDir

    return {step: record.get("loss") for step, record in history.load_history(RunDir(run_dir)).trajectory.items()}


def recoveries(events: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> list[float | None]:
    """Each chaos kill -> the first step recorded by a later attempt (None: none came)."""
    out = []
    for kill in (e for e in events if e["event"] == "chaos_kill"):
        later = [m for m in metrics if m["attempt"] > kill["attempt"]]
        out.append(later[0]["time"] - kill["time"] if later else None)
    return out


def first_difference(run: dict[int, Any], reference: dict[int, Any]) -> int | None:
    for step in sorted(set(run) | set(reference)):
        if run.get(step) != reference.get(step) or (step in run) != (step in reference):
            return step
    return None


def _launch(run_dir: pathlib.Path, config: dict[str, Any], *chaos: str) -> dict[str, Any]:
    try:
        return launches.launch(run_dir, "--entry", ENTRY, "--hosts", "2", "--steps", str(STEPS), *chaos,
                               config=config, check=False)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "output_tail": f"timed out after {launches.LAUNCH_TIMEOUT_S} s",
                "events": launches._read(run_dir / "events.jsonl"),
                "metrics": launches._read(run_dir / "metrics.jsonl")}


def run(work: pathlib.Path, config: dict[str, Any], runs: int = RUNS, mean_s: float = MEAN_S,
        say: Callable[[str], Any] = print) -> dict[str, Any]:
    """`config`: the cluster config of every launch (one compilation cache for all of them)."""
    started = time.time()
    ref = _launch(work / "soak-reference", config)
    if ref["returncode"] != 0:
        raise RuntimeError(f"the uninterrupted reference run exited {ref['returncode']}:\n{ref['output_tail']}")
    reference = trajectory(work / "soak-reference")
    rows, all_recoveries = [], []
    for i in range(runs):
        run_dir = work / f"soak-{i:02d}"
        r = _launch(run_dir, config, "--chaos", str(mean_s), "--max-restarts", "1000")
        got = trajectory(run_dir) if run_dir.exists() else {}
        differs = first_difference(got, reference)
        rec = recoveries(r["events"], r["metrics"])
        all_recoveries += [s for s in rec if s is not None]
        row = {"run": i, "exit_code": r["returncode"], "kills": len(rec), "success": r["returncode"] == 0
               and differs is None, "first_differing_step": differs, "final_step": max(got, default=None),
               "recovery_s": rec, "wall_s": r["ended"] - r["started"] if "ended" in r else None}
        if not row["success"]:
            kept = FAILURES / f"{time.strftime('%Y%m%d-%H%M%S')}-soak-{i:02d}"
            shutil.copytree(run_dir, kept, dirs_exist_ok=True) if run_dir.exists() else kept.mkdir(parents=True)
            (kept / "launch-output-tail.txt").write_text(r["output_tail"])
            row["kept_run_dir"], row["output_tail"] = str(kept), r["output_tail"][-1500:]
        rows.append(row)
        say(f"soak run {i + 1}/{runs}: exit {row['exit_code']}, {row['kills']} kills, "
            f"{'equal' if differs is None else f'differs from step {differs}'}")
    successes = sum(row["success"] for row in rows)
    kills = [row["kills"] for row in rows]
    return {
        "job": {"entry": "examples/minimal.py:main", "hosts": 2, "steps": STEPS, "save_every": "auto (the defaults)",
                "chaos_mean_s": mean_s, "max_restarts": 1000},
        "runs": runs, "successes": successes, "success_rate": successes / runs if runs else None,
        "runs_without_a_kill": sum(k == 0 for k in kills),
        "kills_total": sum(kills), "kills_per_run": {"median": statistics.median(kills) if kills else None,
                                                     "min": min(kills, default=None), "max": max(kills, default=None)},
        "recovery_s": {"p50": percentile(all_recoveries, 50), "p95": percentile(all_recoveries, 95),
                       "max": max(all_recoveries, default=None), "n": len(all_recoveries),
                       "definition": "chaos_kill event -> first metric record of a later attempt"},
        "kills_without_recovery": sum(kills) - len(all_recoveries),
        "reference": {"wall_s": ref["ended"] - ref["started"], "final_step": max(reference, default=None)},
        "rows": rows, "wall_s": time.time() - started,
    }
