"""`python -m benchmarks [--quick]`: the launcher's costs, as ratios measured side by side in one run.

Prints one table and writes benchmarks/results.json (every figure, the machine it ran on). Each
figure is a median with its spread (min..max over the repeats)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks import procs

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.json"


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Ratio of medians, with the spread of the ratio from the extremes."""
    return {"median": a["median"] / b["median"], "min": a["min"] / b["max"], "max": a["max"] / b["min"]}


# ---- 1, 2: checkpoint stall and bandwidth -------------------------------------------------------

STALL_SHAPES = {"small": (4, 64, 6), "base": (2, 32, 3), "tiny": (8, 64, 6)}  # batch, seq, normal steps


def checkpoint_stall(preset: str, saves: int, work: pathlib.Path) -> dict[str, Any]:
    batch, seq, normal = STALL_SHAPES[preset]
    r = procs.run("benchmarks.checkpointing:stall", 2, 2, dict(
        preset=preset, global_batch=batch, seq_len=seq, normal_steps=normal, saves=saves,
        directory=str(work / f"stall-{preset}")))[0]
    out = {k: stats(v) for k, v in r.items() if isinstance(v, list) and v}
    out["state_bytes"] = r["state_bytes"]
    out["blocking_over_sync"] = ratio(out["async_blocking_s"], out["sync_save_s"])
    out["step_inflation"] = ratio(out["step_during_save_s"], out["normal_step_s"])
    out["save_bytes_per_s"] = stats([r["state_bytes"] / t for t in r["sync_save_s"]])
    out["restore_bytes_per_s"] = stats([r["state_bytes"] / t for t in r["restore_s"]])
    return out


def disk_bandwidth(directory: pathlib.Path, megabytes: int, repeats: int) -> dict[str, Any]:
    """The disk's own sequential bandwidth in the same folder: dd with fdatasync, and direct reads."""
    path = directory / "dd.bin"
    writes, reads = [], []
    for _ in range(repeats):
        writes.append(_dd(["if=/dev/zero", f"of={path}", "bs=1M", f"count={megabytes}", "conv=fdatasync"]))
        reads.append(_dd([f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct"]))
    path.unlink()
    return {"write_bytes_per_s": stats(writes), "read_bytes_per_s": stats(reads), "megabytes": megabytes}


def _dd(args: list[str]) -> float:
    err = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", err)
    return int(match.group(1)) / float(match.group(2))


# ---- 4: resharding restore ----------------------------------------------------------------------

def resharding(preset: str, repeats: int, work: pathlib.Path) -> dict[str, Any]:
    directory = str(work / f"reshard-{preset}")
    saved = procs.run("benchmarks.checkpointing:save_once", 4, 2, dict(preset=preset, directory=directory))[0]
    into = {}
    for hosts in (4, 2):
        r = procs.run("benchmarks.checkpointing:restore_times", hosts, 2,
                      dict(preset=preset, directory=directory, repeats=repeats))[0]
        into[hosts] = {"restore_s": stats(r["restore_s"]), "mesh": r["mesh"], "shard_shape": r["shard_shape"]}
    return {"state_bytes": saved["state_bytes"], "saved_mesh": saved["mesh"], "into_4": into[4], "into_2": into[2],
            "ratio_2_over_4": ratio(into[2]["restore_s"], into[4]["restore_s"])}


# ---- launcher runs ------------------------------------------------------------------------------

def launch(run_dir: pathlib.Path, *args: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs `python launch.py` to the end; returns the wall time from the process start and records."""
    cmd = [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir), *args]
    if config:
        path = run_dir.parent / f"{run_dir.name}.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        cmd += ["--config", str(path)]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    started = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    read = lambda name: [json.loads(line) for line in (run_dir / name).read_text().splitlines()]  # noqa: E731
    injections = run_dir / "hosts" / "injections.jsonl"
    return {"started": started, "ended": time.time(), "events": read("events.jsonl"), "metrics": read("metrics.jsonl"),
            "injections": [json.loads(x) for x in injections.read_text().splitlines()] if injections.exists() else []}


def steps_per_second(metrics: list[dict[str, Any]], skip: int = 5) -> float:
    """Wall-clock throughput over the steady state (after `skip` steps, before the final save)."""
    window = [r for r in metrics if skip < r["step"] and "checkpoint_blocking_s" not in r]
    return (len(window) - 1) / (window[-1]["time"] - window[0]["time"])


def startup_split(events: list[dict[str, Any]], attempt: int, since: float) -> dict[str, float]:
    """Where the time from `since` to the attempt's first completed step went, from the hosts'
    timelines (each phase ends when the slowest host has finished it)."""
    lines = [e for e in events if e["event"] == "startup_timeline" and e["attempt"] == attempt]
    started = next(e["time"] for e in events if e["event"] == "attempt_started" and e["attempt"] == attempt)
    last = {key: max(line[key] for line in lines) for key in
            ("actor_init", "initializing", "restoring", "compiling", "training", "first_step_done")}
    return {
        "before_attempt": started - since,
        "new_processes": last["actor_init"] - started,
        "group_setup": last["initializing"] - last["actor_init"],
        "jax_init": last["restoring"] - last["initializing"],
        "restore": last["compiling"] - last["restoring"],
        "compile": last["training"] - last["compiling"],
        "first_step": last["first_step_done"] - last["training"],
    }


def recovery(work: pathlib.Path, repeats: int, cache: bool) -> dict[str, Any]:
    runs = []
    for i in range(repeats):
        run_dir = work / f"recovery-{'cache' if cache else 'nocache'}-{i}"
        r = launch(run_dir, "--hosts", "2", "--steps", "40", "--save-every", "10",
                   "--inject", "kill@step=20,host=1", config={"cluster": {"compilation_cache": cache}})
        events = r["events"]
        first_step = r["metrics"][0]["time"]
        killed = r["injections"][0]["time"]
        failure = next(e for e in events if e["event"] == "failure")
        attempt2 = next(e["attempt"] for e in events if e["event"] == "attempt_started" and e["attempt"] > 1)
        recovered = next(m["time"] for m in r["metrics"] if m["attempt"] == attempt2)
        cold = startup_split(events, 1, r["started"])
        cold["ray_and_driver_start"] = cold.pop("before_attempt")
        split = startup_split(events, attempt2, failure["time"])
        detection = failure["detection_latency_s"]
        split = {"detection": detection, "deciding": failure["time"] - killed - detection,
                 "teardown_and_backoff": split.pop("before_attempt"), **split}
        runs.append({"cold_start_s": first_step - r["started"], "recovery_s": recovered - killed,
                     "cold_split": cold, "recovery_split": split})
    out = {key: stats([run[key] for run in runs]) for key in ("cold_start_s", "recovery_s")}
    for key in ("cold_split", "recovery_split"):
        out[key] = {part: statistics.median(run[key][part] for run in runs) for part in runs[0][key]}
    out["recovery_over_cold_start"] = ratio(out["recovery_s"], out["cold_start_s"])
    return out


def overhead(work: pathlib.Path, repeats: int, steps: int) -> dict[str, Any]:
    launcher, plain = [], []
    for i in range(repeats):
        r = launch(work / f"overhead-{i}", "--hosts", "1", "--steps", str(steps), "--save-every", "100000")
        launcher.append(steps_per_second(r["metrics"]))
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plain_jax.py"), "--steps", str(steps)],
                             capture_output=True, text=True, check=True, timeout=600).stdout
        times = json.loads(out.strip().splitlines()[-1])["step_end_times"][5:]
        plain.append((len(times) - 1) / (times[-1] - times[0]))
    launcher_s, plain_s = stats(launcher), stats(plain)
    return {"launcher_steps_per_s": launcher_s, "plain_steps_per_s": plain_s,
            "launcher_over_plain": ratio(launcher_s, plain_s)}


def scaling(work: pathlib.Path, host_counts: list[int], steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for hosts in host_counts:
        r = launch(work / f"scaling-{hosts}", "--hosts", str(hosts), "--steps", str(steps), "--save-every", "100000",
                   "--mesh", "data=-1,model=2")
        out[str(hosts)] = {"launch_s": r["metrics"][0]["time"] - r["started"],
                           "steps_per_s": steps_per_second(r["metrics"]),
                           "split": startup_split(r["events"], 1, r["started"])}
    return {"hosts": out}


def chaos(work: pathlib.Path, steps: int, mean_s: float) -> dict[str, Any]:
    from launcher import report
    from launcher.runs import RunDir

    run_dir = work / "chaos"
    launch(run_dir, "--hosts", "2", "--steps", str(steps), "--save-every", "10", "--chaos", str(mean_s),
           "--max-restarts", "1000")
    r = report.build(RunDir(run_dir))
    return {"mean_time_between_failures_s": mean_s, "steps": steps, "wall_s": r.wall_s, "goodput": r.goodput,
            "failures": sum(1 for a in r.attempts if a.get("cause") not in ("finished", None)),
            "badput_share": {k: v / r.wall_s for k, v in r.badput_s.items()}}


# ---- the whole set ------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    import jax
    import orbax.checkpoint
    import ray

    cpu = next((line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in pathlib.Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
            "python": platform.python_version(), "jax": jax.__version__, "ray": ray.__version__,
            "orbax": orbax.checkpoint.__version__,
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def run_all(quick: bool, work: pathlib.Path, console: Console) -> dict[str, Any]:
    results: dict[str, Any] = {"quick": quick, "machine": machine()}
    plan = [
        ("checkpoint_small", lambda: checkpoint_stall("small", 2 if quick else 4, work)),
        *([] if quick else [("checkpoint_base", lambda: checkpoint_stall("base", 3, work))]),
        ("disk", lambda: disk_bandwidth(work, 256 if quick else 1024, 2 if quick else 3)),
        ("resharding", lambda: resharding("tiny" if quick else "small", 3, work)),
        ("recovery", lambda: recovery(work, 1 if quick else 2, cache=True)),
        *([] if quick else [("recovery_without_compile_cache", lambda: recovery(work, 2, cache=False))]),
        ("overhead", lambda: overhead(work, 1 if quick else 2, 40 if quick else 80)),
        ("scaling", lambda: scaling(work, [1, 2] if quick else [1, 2, 4, 8], 30 if quick else 40)),
        *([] if quick else [("goodput_under_chaos", lambda: chaos(work, 150, 20.0))]),
    ]
    for name, measure in plan:
        start = time.time()
        console.print(f"[dim]measuring {name}...[/dim]")
        results[name] = measure()
        results[name]["measured_in_s"] = time.time() - start
    return results


def table(results: dict[str, Any]) -> Table:
    t = Table(title="jaxlaunch benchmarks" + (" (quick)" if results["quick"] else ""))
    for column in ("measurement", "ratio", "median", "spread", "what"):
        t.add_column(column)

    def row(name, r, what):
        t.add_row(name, "", f"{r['median']:.3g}", f"{r['min']:.3g}..{r['max']:.3g}", what)

    def ratio_row(name, r, what):
        t.add_row(name, f"{r['median']:.3g}", "", f"{r['min']:.3g}..{r['max']:.3g}", what)

    disk = results["disk"]
    for preset in ("small", "base"):
        c = results.get(f"checkpoint_{preset}")
        if not c:
            continue
        mb = c["state_bytes"] / 1e6
        ratio_row(f"{preset}: async blocking / sync save", c["blocking_over_sync"],
                  f"{c['async_blocking_s']['median']:.3f} s vs {c['sync_save_s']['median']:.3f} s, {mb:.0f} MB state")
        ratio_row(f"{preset}: step during save / normal step", c["step_inflation"],
                  f"{c['step_during_save_s']['median']:.3f} s vs {c['normal_step_s']['median']:.3f} s")
        for what, ours, theirs in (("sync save / dd write", "save_bytes_per_s", "write_bytes_per_s"),
                                   ("restore / dd direct read", "restore_bytes_per_s", "read_bytes_per_s")):
            dd = disk[theirs]["median"]
            ratio_row(f"{preset}: {what} bandwidth", {k: c[ours][k] / dd for k in ("median", "min", "max")},
                      f"{c[ours]['median'] / 1e6:.0f} vs {dd / 1e6:.0f} MB/s")
    rec = results["recovery"]
    ratio_row("recovery / cold start", rec["recovery_over_cold_start"],
              f"{rec['recovery_s']['median']:.2f} s vs {rec['cold_start_s']['median']:.2f} s (2 hosts, SIGKILL)")
    split = ", ".join(f"{k} {v:.2f}" for k, v in rec["recovery_split"].items())
    t.add_row("recovery split (s)", "", "", "", split)
    if "recovery_without_compile_cache" in results:
        before = results["recovery_without_compile_cache"]
        ratio_row("recovery with / without compile cache", ratio(rec["recovery_s"], before["recovery_s"]),
                  f"{rec['recovery_s']['median']:.2f} s vs {before['recovery_s']['median']:.2f} s")
    rs = results["resharding"]
    ratio_row("restore 4->2 hosts / 4->4 hosts", rs["ratio_2_over_4"],
              f"{rs['into_2']['restore_s']['median']:.3f} s vs {rs['into_4']['restore_s']['median']:.3f} s, "
              f"{rs['state_bytes'] / 1e6:.0f} MB")
    ov = results["overhead"]
    ratio_row("launcher / plain JAX steps per s", ov["launcher_over_plain"],
              f"{ov['launcher_steps_per_s']['median']:.2f} vs {ov['plain_steps_per_s']['median']:.2f} (1 host)")
    for hosts, s in results["scaling"]["hosts"].items():
        t.add_row(f"scaling: {hosts} host(s)", "", f"{s['launch_s']:.1f} s",
                  "", f"launch to first step; {s['steps_per_s']:.2f} steps/s; compile {s['split']['compile']:.1f} s, "
                      f"processes {s['split']['new_processes']:.1f} s, jax init {s['split']['jax_init']:.1f} s")
    if "goodput_under_chaos" in results:
        g = results["goodput_under_chaos"]
        t.add_row("goodput under chaos", f"{g['goodput']:.3f}", "", "",
                  f"{g['failures']} kills, MTBF {g['mean_time_between_failures_s']:.0f} s; badput "
                  + ", ".join(f"{k} {v:.0%}" for k, v in g["badput_share"].items() if v >= 0.005))
    return t


def print_results(path: pathlib.Path) -> None:
    results = json.loads(path.read_text())
    Console(width=200).print(table(results))


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a subset, in under 3 minutes")
    p.add_argument("--out", default=str(RESULTS), help="where to write the results JSON")
    args = p.parse_args()
    console = Console(width=200)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="jaxlaunch-bench-", dir=ROOT / "benchmarks") as tmp:
        results = run_all(args.quick, pathlib.Path(tmp), console)
    results["total_s"] = time.time() - started
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    console.print(table(results))
    console.print(f"wrote {args.out} in {results['total_s']:.0f} s on {results['machine']['cpu']}, "
                  f"{results['machine']['cores']} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
