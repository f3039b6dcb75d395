"""A restart's first step, with the default (XLA's YNNPACK fusions off on cpu, `cluster.ynnpack`) and
with jaxlib's own default (on), side by side in one run: the small preset on 2 hosts, a host SIGKILLed
at step 20 of 30, ROUNDS rounds in alternating order. Per run: the kill -> first step of the next
attempt and its split (`launches.recovery_split`), that first step's execution alone, a steady step of
the first attempt, and the final loss (the flag may change a float's rounding, not the training)."""

from __future__ import annotations

import pathlib
import statistics
from typing import Any

from benchmarks.launches import launch, median, summarize
from benchmarks.memory_tier import SMALL

ROUNDS = 3
KILL_AT, STEPS = 20, 30


def _run(work: pathlib.Path, name: str, ynnpack: bool) -> dict[str, Any]:
    r = launch(work / name, *SMALL, "--steps", str(STEPS), config={"cluster": {"ynnpack": ynnpack}},
               fault="kill", fault_step=KILL_AT)
    out = summarize(r)
    steady = [m["step_time_s"] for m in r["metrics"] if m["attempt"] == 1 and m["step"] > 5 and m.get("step_time_s")]
    last = max(r["metrics"], key=lambda m: m["step"])
    return {"recovery_s": out["recovery_s"], "recovery_split": out["recovery_split"],
            "first_step_execution_s": (out["recovery_split"] or {}).get("first_step_execution"),
            "steady_step_s": statistics.median(steady) if steady else None,
            "final_loss": last.get("loss"), "steps_recomputed": out["steps_recomputed"]}


def run(work: pathlib.Path, rounds: int = ROUNDS) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for number in range(rounds):
        for name in (("off", "on") if number % 2 == 0 else ("on", "off")):
            runs[name].append(_run(work, f"ynnpack-{name}-{number}", name == "on"))

    out: dict[str, Any] = {"rounds": runs}
    for key in ("recovery_s", "first_step_execution_s", "steady_step_s"):
        off, on = (median([r[key] for r in runs[name]]) for name in ("off", "on"))
        out[key] = {"off": off, "on": on, "off_over_on": off / on if off and on else None}
    out["same_final_loss"] = len({r["final_loss"] for r in runs["off"] + runs["on"]}) == 1
    return out
