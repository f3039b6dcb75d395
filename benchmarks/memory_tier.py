"""The memory tier against today's durable-only path, side by side in one run: the built-in model's
small preset on 2 hosts, a save every step in memory vs an asynchronous Orbax save every 10 steps vs
no saves, each SIGKILLed at the same step (host 1) except the run without saves."""

from __future__ import annotations

import pathlib
import statistics
from typing import Any

from benchmarks.launches import launch, steps_per_second, summarize

SMALL = ("--model", "small", "--global-batch-size", "4", "--seq-len", "64", "--hosts", "2", "--hang-timeout", "30")
NEVER = 1_000_000


def _blocking(metrics: list[dict[str, Any]], tier: str) -> float | None:
    values = [m["checkpoint_blocking_s"] for m in metrics if m.get("checkpoint_tier") == tier and m["attempt"] == 1
              and m["step"] > 2]
    return statistics.median(values) if values else None


def _step_time(metrics: list[dict[str, Any]]) -> float | None:
    values = [m["step_time_s"] for m in metrics if m["attempt"] == 1 and m["step"] > 3 and m.get("step_time_s")]
    return statistics.median(values) if values else None


def _run(work: pathlib.Path, name: str, steps: int, kill_at: int | None, *args: str) -> dict[str, Any]:
    r = launch(work / name, *SMALL, "--steps", str(steps), *args, fault="kill" if kill_at else None,
               fault_step=kill_at)
    out = summarize(r)
    restored = [e for e in r["events"] if e["event"] == "restored"]
    steady = [m for m in r["metrics"] if m["attempt"] == 1]
    return {"steps_per_s": steps_per_second(steady), "step_time_s": _step_time(r["metrics"]),
            "memory_blocking_s": _blocking(r["metrics"], "memory"), "durable_blocking_s": _blocking(r["metrics"],
                                                                                                   "durable"),
            "recovery_s": out["recovery_s"], "steps_recomputed": out["steps_recomputed"],
            "restore_s": restored[0]["seconds"] if restored else None,
            "restored_tier": restored[0].get("tier") if restored else None,
            "durable_bytes_read": restored[0].get("durable_bytes_read") if restored else None}


def run(work: pathlib.Path, quick: bool) -> dict[str, Any]:
    steps, kill_at = (30, 20) if quick else (60, 45)
    never = _run(work, "never", steps, None, "--save-every", str(NEVER))
    memory = _run(work, "memory", steps, kill_at, "--memory-tier", "--save-every", "1", "--persist-every", str(NEVER))
    durable = _run(work, "durable", steps, kill_at, "--save-every", "10")
    return {
        "never": never, "memory": memory, "durable": durable,
        "memory_steps_per_s_over_never": _ratio(memory["steps_per_s"], never["steps_per_s"]),
        "memory_step_over_normal": _ratio(memory["step_time_s"], never["step_time_s"]),
        "durable_step_over_normal": _ratio(durable["step_time_s"], never["step_time_s"]),
        "restore_memory_over_orbax": _ratio(memory["restore_s"], durable["restore_s"]),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
