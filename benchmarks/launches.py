"""jaxlaunch's side of the side-by-side benchmark, and the other measurements that need whole
launches: `python launch.py` run as a user runs it, faults sent from outside by this process, and
every figure computed from the run's own records."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 900
WARMUP_STEPS_EXCLUDED = 5
SYNCED_ENTRY = "benchmarks.entries:lm_synced"


def _read(path: pathlib.Path) -> list[dict[str, Any]]:
    from jaxlaunch.contract.layout import read_jsonl

    return read_jsonl(path)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return {**env, "COLUMNS": "200", **(extra or {})}


def launch(run_dir: pathlib.Path, *args: str, config: dict[str, Any] | None = None,
           env: dict[str, str] | None = None, fault: str | None = None, fault_step: int | None = None,
           fault_rank: int = 1, during: Callable[[subprocess.Popen], Any] | None = None,
           check: bool = True) -> dict[str, Any]:
    """Runs `python launch.py` to its end, optionally sending `fault` ("kill": SIGKILL, "hang":
    SIGSTOP) from here to host `fault_rank` once the run has reported `fault_step`, or doing
    `during(process)` while it runs. Returns the process's start and end, the records, the fault's
    moment with the newest checkpoint then, and what `during` returned. `check=False`: a launch that
    exits non-zero is returned too (its `returncode` and the output's tail), not raised."""
    cmd = [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir), *args]
    if config:
        path = run_dir.parent / f"{run_dir.name}.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        cmd += ["--config", str(path)]
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(env))
    fault_at, committed_then, done = None, None, None
    try:
        if fault is not None:
            fault_at, committed_then = _send_fault(proc, run_dir, fault, fault_step, fault_rank)
        if during is not None:
            done = during(proc)
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if proc.returncode != 0 and check:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}")
    return {"started": started, "ended": time.time(), "events": _read(run_dir / "events.jsonl"),
            "metrics": _read(run_dir / "metrics.jsonl"), "fault_at": fault_at, "committed_then": committed_then,
            "during": done, "returncode": proc.returncode, "output_tail": out[-4000:]}


def _send_fault(proc: subprocess.Popen, run_dir: pathlib.Path, fault: str, step: int, rank: int):
    from jaxlaunch.contract.layout import committed_steps

    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        records = _read(run_dir / "metrics.jsonl")
        if records and records[-1]["step"] >= step:
            started = [e for e in _read(run_dir / "events.jsonl") if e["event"] == "attempt_started"]
            pid = started[-1]["pids"][rank]
            committed = committed_steps(run_dir / "checkpoints")
            os.kill(pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            return time.time(), (committed[0] if committed else None)
        time.sleep(0.02)
    raise RuntimeError(f"the run never reached step {step}")


def steps_per_second(metrics: list[dict[str, Any]], attempt: int | None = None) -> float | None:
    """Wall-clock throughput over the steady state of one attempt: after the first steps, before
    the final save."""
    attempt = attempt if attempt is not None else metrics[0]["attempt"]
    window = [r for r in metrics if r["attempt"] == attempt][WARMUP_STEPS_EXCLUDED:-1]
    if len(window) < 2:
        return None
    return (len(window) - 1) / (window[-1]["time"] - window[0]["time"])


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """The side-by-side figures of one launch, as `benchmarks.peers` gives them for its peers."""
    metrics, events = r["metrics"], r["events"]
    first = metrics[0]
    out: dict[str, Any] = {
        "cold_start_s": first["time"] - r["started"],
        "final_step": max(m["step"] for m in metrics),
        "steps_recomputed": len(metrics) - len({m["step"] for m in metrics}),
        "steps_per_s": steps_per_second(metrics),
        "recovery_s": None, "recovered": None, "last_reported_checkpoint_survived": None,
        "losses": {m["step"]: m.get("loss") for m in metrics},
    }
    if r["fault_at"] is not None:
        later = [m for m in metrics if m["attempt"] > first["attempt"]]
        out["recovered"] = bool(later)
        out["recovery_s"] = later[0]["time"] - r["fault_at"] if later else None
        restored = [e["step"] for e in events if e["event"] == "restored"]
        out["restored_step"] = restored[0] if restored else None
        out["last_reported_checkpoint_survived"] = (r["committed_then"] is None
                                                    or (restored and restored[0] == r["committed_then"]))
        failure = next(e for e in events if e["event"] == "failure")
        out["detection_s"] = failure["detection_latency_s"]
        out["recovery_split"] = (recovery_split(events, later[0], r["fault_at"], failure["time"])
                                 if later else None)
    return out


SPLIT = (("processes", "actor_init"), ("host_setup", "initializing"),
         ("jax_distributed_and_import", "restoring"), ("restore_or_init", "compiling"),
         ("trace_and_compile", "first_step_done"))
"""The phases of a host's start, each ending when the slowest host entered the next (its
`startup_timeline`); `first_step_done` is the first step's `ctx.report`: its dispatch in a loop that
reads its loss a step later (the built-in one), its end in one that reads it at once (the peers'
job), where `trace_and_compile` then holds the first step's execution too."""


def recovery_split(events: list[dict[str, Any]], first: dict[str, Any], fault_at: float,
                   failed_at: float) -> dict[str, float]:
    """Where the time from the fault to the first step's record of the next attempt went, each second
    once: the phases follow one another (a phase a warm standby had done before is 0), and they add
    up to the recovery time."""
    attempt = first["attempt"]
    lines = [e for e in events if e["event"] == "startup_timeline" and e["attempt"] == attempt]
    started = next(e["time"] for e in events if e["event"] == "attempt_started" and e["attempt"] == attempt)
    bounds = [("detection", failed_at), ("to_attempt_start", started),
              *((name, max(line[key] for line in lines)) for name, key in SPLIT),
              # From the dispatch to the record: the record is written when the step's result is read.
              ("first_step_execution", first["time"])]
    split, at = {}, fault_at
    for name, end in bounds:
        split[name] = max(0.0, end - at)
        at = max(at, end)
    return split


def jaxlaunch_job(work: pathlib.Path, name: str, *, steps: int, save_every: int, fault: str | None = None,
                  fault_step: int | None = None, hosts: int = 2, extra: tuple[str, ...] = (),
                  config: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The built-in tiny model on `hosts` hosts, as the peers run it: a data-parallel mesh, each step's
    loss read on the host at once, so that a step's record, like theirs, is written once the step is
    done (the built-in loop reads it a step later; `per_step_stall` measures that), and an Orbax save
    to disk every `save_every` steps, as theirs (`--no-memory-tier`: the memory tier's own comparison
    is the `memory_tier` section)."""
    args = ("--hosts", str(hosts), "--steps", str(steps), "--save-every", str(save_every), "--mesh", "data=-1",
            "--hang-timeout", "5", "--no-memory-tier", "--entry", SYNCED_ENTRY, *extra)
    r = launch(work / name, *args, config=config, env=env, fault=fault, fault_step=fault_step)
    return {**summarize(r), "wall_s": r["ended"] - r["started"]}


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None
