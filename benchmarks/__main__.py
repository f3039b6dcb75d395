"""`python -m benchmarks [--quick]`: jaxlaunch side by side with its peers, and its own costs, as
ratios measured in one run.

- peers: the built-in tiny model, 2 hosts x 2 CPU devices, data-parallel, a checkpoint every 5
  steps, under jaxlaunch, Ray Train v2's JaxTrainer and plain `jax.distributed` processes started
  by hand (the floor): cold start, SIGKILL and SIGSTOP of a host to the first step after restore,
  steps recomputed, whether the last checkpoint reported before the fault survived, throughput
  with checkpoints over a plain loop;
- changes, before and after in the same run: the warm standby group, compiled programs cached by
  every process, one compilation cache per user, checkpoint options, metrics read a step late;
- checkpoints at disk speed (small and base presets against `dd`), and steps during a save;
- a restart's first step with XLA's YNNPACK fusions off (the default on cpu) and on, in rounds;
- restores after a topology change: a checkpoint written by 4 hosts restored on 2, and by 2 on 4,
  against the restores on the same hosts that wrote it;
- goodput under `--chaos 60`, and the driver at pod scale in simulation;
- the soak: runs of examples/minimal.py under `--chaos 4`, each compared bit for bit with an
  uninterrupted run (`python -m benchmarks soak`, or `--only soak`; `--soak-runs N`).

Prints one table and writes benchmarks/results.json (every figure, the machine it ran on)."""

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

from benchmarks import first_step, launches, memory_tier, peers, pod_scale, procs, soak

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.json"
SAVE_EVERY = 5
FAULT_STEP = 20


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _cache(work: pathlib.Path, name: str) -> dict[str, Any]:
    """A compilation cache of its own, empty at first: cold starts are measured cold."""
    return {"cluster": {"compilation_cache_dir": str(work / f"cache-{name}")}}


# ---- peers, side by side ----------------------------------------------------------------------------

def side_by_side(work: pathlib.Path, quick: bool) -> dict[str, Any]:
    """In --quick, Ray Train's hang is not waited for: it recovers only through JAX's 100 s
    heartbeat (see the full run), so it would take longer than everything else together."""
    steps, fault_step = (22, 10) if quick else (60, FAULT_STEP)
    job = dict(steps=steps, save_every=SAVE_EVERY, fault_step=fault_step)
    # Untimed: the first launch after a while reads Python's files from disk; every measured one
    # (each peer's too) then finds them in the page cache. Its compilation cache is its own.
    launches.jaxlaunch_job(work, "warm-up", steps=2, save_every=SAVE_EVERY, config=_cache(work, "warm-up"))
    jl = {"kill": launches.jaxlaunch_job(work, "jl-kill", fault="kill", config=_cache(work, "kill"), **job)}
    # On the kill run's cache: a new run of a program compiled before, whose start is the warm-cache
    # cold start (its restart after the hang is a restart like the kill run's, on a warm cache).
    jl["hang"] = launches.jaxlaunch_job(work, "jl-hang", fault="hang", config=_cache(work, "kill"), **job)
    # In a fresh process, timed from before it starts, as jaxlaunch's launch and plain JAX's processes.
    rt = {"kill": peers.ray_train_fresh(work / "rt", fault="kill", **job)}
    rt["hang"] = (peers.ray_train_fresh(work / "rt", fault="hang", recover_timeout_s=150, **job) if not quick else
                  {"recovered": None, "recovery_s": None, "steps_recomputed": None,
                   "last_reported_checkpoint_survived": None, "note": "measured in the full run only"})
    plain = {
        "no_checkpoints": peers.plain_jax(work / "pj", steps=steps, save_every=None),
        "checkpoints": peers.plain_jax(work / "pj", steps=steps, save_every=SAVE_EVERY),
    }
    floor = plain["no_checkpoints"]["steps_per_s"]
    rows = {
        "jaxlaunch": _peer_row(jl["kill"], jl["hang"], jl["kill"]["cold_start_s"], floor),
        "ray_train": _peer_row(rt["kill"], rt["hang"], rt["kill"]["cold_start_from_process_s"], floor),
        "plain_jax": {"cold_start_s": plain["no_checkpoints"]["cold_start_s"],
                      "steps_per_s_checkpoints_over_plain": ratio(plain["checkpoints"]["steps_per_s"], floor)},
    }
    rows["jaxlaunch"]["cold_start_warm_cache_s"] = jl["hang"]["cold_start_s"]
    ours, theirs = rows["jaxlaunch"], rows["ray_train"]
    return {
        "job": {"model": "tiny", "hosts": 2, "devices_per_host": 2, "steps": steps, "save_every": SAVE_EVERY,
                "fault_step": fault_step, "jaxlaunch_hang_timeout_s": 5},
        "rows": rows,
        "ratios": {
            "cold_start_jaxlaunch_over_ray_train": ratio(ours["cold_start_s"], theirs["cold_start_s"]),
            "cold_start_warm_cache_over_ray_train": ratio(ours["cold_start_warm_cache_s"], theirs["cold_start_s"]),
            "kill_recovery_jaxlaunch_over_ray_train": ratio(ours["kill_recovery_s"], theirs["kill_recovery_s"]),
            "hang_recovery_jaxlaunch_over_ray_train": ratio(ours["hang_recovery_s"], theirs["hang_recovery_s"]),
        },
        "raw": {"jaxlaunch": _strip(jl), "ray_train": _strip(rt), "plain_jax": _strip(plain)},
    }


def _peer_row(kill: dict[str, Any], hang: dict[str, Any], cold_start: float, floor: float | None) -> dict[str, Any]:
    return {
        "cold_start_s": cold_start,
        "kill_recovery_s": kill["recovery_s"],
        "hang_recovery_s": hang["recovery_s"] if hang.get("recovered") else None,
        "hang_recovered": hang.get("recovered"),
        "steps_recomputed_kill": kill["steps_recomputed"],
        "steps_recomputed_hang": hang["steps_recomputed"],
        "last_checkpoint_survived_kill": kill["last_reported_checkpoint_survived"],
        "last_checkpoint_survived_hang": hang["last_reported_checkpoint_survived"],
        "steps_per_s_checkpoints_over_plain": ratio(kill["steps_per_s"], floor),
    }


def _strip(results: dict[str, Any]) -> dict[str, Any]:
    return {k: {kk: vv for kk, vv in v.items() if kk not in ("losses", "recovery_timeline")}
            for k, v in results.items()}


# ---- changes, before and after ------------------------------------------------------------------------

RECOVERY_KEYS = ("recovery_s", "recovery_split", "detection_s")


def changes(work: pathlib.Path, all_on: dict[str, Any]) -> dict[str, Any]:
    """Kill recovery with each restart improvement switched off in turn, beside the side-by-side
    kill run (`all_on`, the same job with everything on)."""
    job = dict(steps=35, save_every=SAVE_EVERY, fault="kill", fault_step=FAULT_STEP)
    variants = {
        "no_warm_standby": ({"cluster": {"warm_standby": False}}, {}),
        "cache_written_by_process_0_only": ({}, {"JAXLAUNCH_CACHE_WRITES": "process0"}),
    }
    out: dict[str, Any] = {"all_on": {k: all_on[k] for k in RECOVERY_KEYS}}
    for name, (config, env) in variants.items():
        config = {**config, "cluster": {**config.get("cluster", {}), **_cache(work, f"change-{name}")["cluster"]}}
        r = launches.jaxlaunch_job(work, f"change-{name}", config=config, env=env, **job)
        out[name] = {k: r[k] for k in RECOVERY_KEYS}
    return out


def per_step_stall(work: pathlib.Path, quick: bool) -> dict[str, Any]:
    """The launcher's loop on 1 host (metrics read a step late, and, before, read at once) against a
    plain loop that never waits for the device; the small preset."""
    steps = 14 if quick else 40
    common = ("--hosts", "1", "--steps", str(steps), "--no-memory-tier", "--save-every", "100000", "--mesh",
              "data=-1,model=2")
    late = launches.launch(work / "stall-late", *common, "--model", "small", "--global-batch-size", "8",
                           "--seq-len", "64")
    synced = None if quick else launches.launch(
        work / "stall-synced", *common, "--entry", launches.SYNCED_ENTRY, "--set", "model=small",
        "--set", "global_batch_size=8", "--set", "seq_len=64")
    plain = json.loads(subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plain_jax.py"), "--model", "small", "--steps", str(steps),
         "--global-batch-size", "8", "--seq-len", "64"], capture_output=True, text=True, check=True,
        timeout=900).stdout.strip().splitlines()[-1])["steps_per_s"]
    late_s = launches.steps_per_second(late["metrics"])
    synced_s = launches.steps_per_second(synced["metrics"]) if synced else None
    return {"plain_steps_per_s": plain, "launcher_steps_per_s": late_s, "synced_steps_per_s": synced_s,
            "launcher_over_plain": ratio(late_s, plain), "synced_over_plain": ratio(synced_s, plain)}


# ---- checkpoints ----------------------------------------------------------------------------------------

STALL_SHAPES = {"small": (4, 64, 6), "base": (2, 32, 3)}  # global batch, sequence, normal steps


def checkpoint_costs(preset: str, saves: int, work: pathlib.Path) -> dict[str, Any]:
    batch, seq, normal = STALL_SHAPES[preset]
    r = procs.run("benchmarks.checkpointing:stall", 2, 2, dict(
        preset=preset, global_batch=batch, seq_len=seq, normal_steps=normal, saves=saves,
        directory=str(work / f"stall-{preset}")))[0]
    out = {k: stats(v) for k, v in r.items() if isinstance(v, list) and v}
    out["state_bytes"] = r["state_bytes"]
    out["save_bytes_per_s"] = stats([r["state_bytes"] / t for t in r["sync_save_s"]])
    out["restore_bytes_per_s"] = stats([r["state_bytes"] / t for t in r["restore_s"]])
    out["step_during_save_over_normal"] = out["step_during_save_s"]["median"] / out["normal_step_s"]["median"]
    return out


RESHARDS = ((4, 2), (2, 4), (2, 2), (4, 4))  # (hosts that wrote the checkpoint, hosts that restore it)
RESHARD_DEVICES_PER_HOST = 2


def resharding(preset: str, repeats: int, work: pathlib.Path) -> dict[str, Any]:
    """A checkpoint written by N hosts restored on M hosts (N x 2 devices, a data x model mesh), the
    launcher's own Checkpointer and state layout in `jax.distributed` processes. A restore's time is
    its slowest host's; each is set beside the restore of the same M hosts from a checkpoint that M
    hosts wrote (what the restore costs without a topology change)."""
    written: dict[int, dict[str, Any]] = {}
    for hosts in sorted({n for n, _ in RESHARDS}):
        directory = work / f"reshard-{preset}-by-{hosts}"
        saved = procs.run("benchmarks.checkpointing:save_once", hosts, RESHARD_DEVICES_PER_HOST,
                          dict(preset=preset, directory=str(directory)))[0]
        written[hosts] = {**saved, "directory": directory}
    restores: dict[str, dict[str, Any]] = {}
    for by, into in RESHARDS:
        r = procs.run("benchmarks.checkpointing:restore_times", into, RESHARD_DEVICES_PER_HOST,
                      dict(preset=preset, directory=str(written[by]["directory"]), repeats=repeats))
        slowest = [max(host["restore_s"][i] for host in r) for i in range(repeats)]
        restores[f"{by}_to_{into}"] = {"restore_s": stats(slowest), "saved_mesh": written[by]["mesh"],
                                       **{k: r[0][k] for k in ("mesh", "array", "sharding", "shard_shape")}}
    for by, into in RESHARDS:
        restores[f"{by}_to_{into}"]["over_same_topology"] = (
            restores[f"{by}_to_{into}"]["restore_s"]["median"] / restores[f"{into}_to_{into}"]["restore_s"]["median"])
    return {"preset": preset, "state_bytes": written[RESHARDS[0][0]]["state_bytes"],
            "devices_per_host": RESHARD_DEVICES_PER_HOST, "repeats": repeats, "restores": restores,
            # The figure measured before (a 4 -> 2 restore over a 4 -> 4 one: two groups of different size).
            "4_to_2_over_4_to_4": restores["4_to_2"]["restore_s"]["median"] / restores["4_to_4"]["restore_s"]["median"]}


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


# ---- goodput under chaos ----------------------------------------------------------------------------------

def goodput_under_chaos(work: pathlib.Path, steps: int, mean_s: float, name: str = "chaos",
                        saves: tuple[str, ...] = ("--no-memory-tier", "--save-every", "10")) -> dict[str, Any]:
    from jaxlaunch.launcher.records import history
    from jaxlaunch.launcher.records.runs import RunDir

    run_dir = work / name
    launches.launch(run_dir, "--hosts", "2", "--steps", str(steps), *saves, "--chaos", str(mean_s),
                    "--max-restarts", "1000", config=_cache(work, name))
    past = history.load_history(RunDir(run_dir))
    return {"mean_time_between_failures_s": mean_s, "steps": steps, "wall_s": past.wall_s, "goodput": past.goodput,
            "failures": len(past.failures), "badput_share": {k: v / past.wall_s for k, v in past.badput_s.items()}}


# ---- the whole set ------------------------------------------------------------------------------------------

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
            "orbax": orbax.checkpoint.__version__, "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def run_all(quick: bool, work: pathlib.Path, console: Console, out: pathlib.Path,
            only: list[str] | None = None, soak_runs: int = soak.RUNS) -> dict[str, Any]:
    results: dict[str, Any] = {"quick": quick, "machine": machine()}
    if only:  # measure these again; keep the other sections of the last run
        results = {**json.loads(out.read_text()), **results}
    plan = [
        ("side_by_side", lambda: side_by_side(work, quick)),
        *([] if quick else [
            ("changes", lambda: changes(work, results["side_by_side"]["raw"]["jaxlaunch"]["kill"]))]),
        ("per_step_stall", lambda: per_step_stall(work, quick)),
        ("disk", lambda: disk_bandwidth(work, 256 if quick else 1024, 2 if quick else 3)),
        ("checkpoint_small", lambda: checkpoint_costs("small", 1 if quick else 4, work)),
        *([] if quick else [("checkpoint_base", lambda: checkpoint_costs("base", 3, work))]),
        ("memory_tier", lambda: memory_tier.run(work, quick)),
        *([] if quick else [("first_step", lambda: first_step.run(work))]),
        ("resharding", lambda: resharding("tiny" if quick else "small", 3 if quick else 5, work)),
        ("pod_scale", pod_scale.run_all),
        *([] if quick else [("goodput_under_chaos", lambda: goodput_under_chaos(work, 1500, 60.0))]),
        *([] if quick else [("goodput_under_chaos_memory_tier", lambda: goodput_under_chaos(
            work, 1500, 60.0, "chaos-memory", ("--memory-tier", "--save-every", "1", "--persist-every", "100")))]),
        # The defaults: the memory tier on, each tier's cadence chosen from its measured cost.
        *([] if quick else [("goodput_under_chaos_defaults", lambda: goodput_under_chaos(
            work, 1500, 60.0, "chaos-defaults", ()))]),
        ("node_removed", lambda: memory_tier.elastic(work)),
        *([] if quick else [("soak", lambda: soak.run(work, _cache(work, "soak"), soak_runs, say=console.print))]),
    ]
    unknown = set(only or ()) - {name for name, _ in plan}
    if unknown:
        raise SystemExit(f"error: --only {', '.join(sorted(unknown))}: not a section of this run "
                         f"({', '.join(name for name, _ in plan)})")
    for name, measure in plan:
        if only and name not in only:
            continue
        start = time.time()
        console.print(f"[dim]measuring {name}...[/dim]")
        results[name] = measure()
        results[name]["measured_in_s"] = time.time() - start
        _write(out, results)  # what is measured so far survives a later section's failure
    return results


def _write(path: pathlib.Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")


def _f(value: Any, digits: str = ".2f") -> str:
    return "-" if value is None else (f"{value:{digits}}" if isinstance(value, float) else str(value))


def table(results: dict[str, Any]) -> Table:
    t = Table(title="jaxlaunch benchmarks" + (" (quick)" if results["quick"] else ""))
    for column in ("measurement", "jaxlaunch", "Ray Train", "plain JAX", "ratio", "what"):
        t.add_column(column)
    side = results["side_by_side"]
    jl, rt, pj = side["rows"]["jaxlaunch"], side["rows"]["ray_train"], side["rows"]["plain_jax"]
    r = side["ratios"]
    t.add_row("cold start to first step (s)", _f(jl["cold_start_s"]), _f(rt["cold_start_s"]), _f(pj["cold_start_s"]),
              _f(r["cold_start_jaxlaunch_over_ray_train"]), "from process start; empty compile cache")
    t.add_row("cold start, warm compile cache (s)", _f(jl["cold_start_warm_cache_s"]), "-", "-",
              _f(r["cold_start_warm_cache_over_ray_train"]), "a run of a program compiled before")
    t.add_row("SIGKILL to first step after restore (s)", _f(jl["kill_recovery_s"]), _f(rt["kill_recovery_s"]), "-",
              _f(r["kill_recovery_jaxlaunch_over_ray_train"]), f"host 1 at step {side['job']['fault_step']}")
    t.add_row("SIGSTOP to first step after restore (s)", _f(jl["hang_recovery_s"]), _f(rt["hang_recovery_s"]), "-",
              _f(r["hang_recovery_jaxlaunch_over_ray_train"]), "jaxlaunch --hang-timeout 5")
    t.add_row("steps recomputed (kill, hang)", f"{jl['steps_recomputed_kill']}, {jl['steps_recomputed_hang']}",
              f"{rt['steps_recomputed_kill']}, {rt['steps_recomputed_hang']}", "-", "", "")
    t.add_row("last reported checkpoint survived (kill, hang)",
              f"{jl['last_checkpoint_survived_kill']}, {jl['last_checkpoint_survived_hang']}",
              f"{rt['last_checkpoint_survived_kill']}, {rt['last_checkpoint_survived_hang']}", "-", "", "")
    t.add_row("steps/s with a checkpoint every 5 / plain loop", _f(jl["steps_per_s_checkpoints_over_plain"]),
              _f(rt["steps_per_s_checkpoints_over_plain"]), _f(pj["steps_per_s_checkpoints_over_plain"]), "", "")
    ch = results.get("changes", {})
    for name, label in (("no_warm_standby", "warm standby group"),
                        ("cache_written_by_process_0_only", "cache written by every process")):
        if name not in ch:
            continue
        without = ch[name]["recovery_s"]
        t.add_row(f"recovery with / without {label}", _f(ch["all_on"]["recovery_s"]), "", "",
                  _f(ratio(ch["all_on"]["recovery_s"], without)), f"without: {_f(without)} s")
    if "first_step" in results:
        fs = results["first_step"]
        for key, label in (("recovery_s", "small, 2 hosts: SIGKILL -> first step"),
                           ("first_step_execution_s", "small, 2 hosts: a restart's first step's execution"),
                           ("steady_step_s", "small, 2 hosts: a steady step")):
            v = fs[key]
            t.add_row(f"{label}, YNNPACK off / on (s)", _f(v["off"]), "", "", _f(v["off_over_on"]),
                      f"on: {_f(v['on'])} s; median of {len(fs['rounds']['off'])} rounds; the same final loss: "
                      f"{fs['same_final_loss']}")
    st = results["per_step_stall"]
    t.add_row("launcher / plain loop steps per s (small, 1 host)", _f(st["launcher_steps_per_s"]), "",
              _f(st["plain_steps_per_s"]), _f(st["launcher_over_plain"], ".3f"),
              f"reading each loss at once: {_f(st['synced_over_plain'], '.3f')}")
    disk = results["disk"]
    for preset in ("small", "base"):
        c = results.get(f"checkpoint_{preset}")
        if not c:
            continue
        mb = c["state_bytes"] / 1e6
        t.add_row(f"{preset}: sync save / dd write", _f(c["save_bytes_per_s"]["median"] / 1e6, ".0f") + " MB/s", "", "",
                  _f(c["save_bytes_per_s"]["median"] / disk["write_bytes_per_s"]["median"]),
                  f"dd {disk['write_bytes_per_s']['median'] / 1e6:.0f} MB/s, {mb:.0f} MB state")
        t.add_row(f"{preset}: restore / dd direct read", _f(c["restore_bytes_per_s"]["median"] / 1e6, ".0f") + " MB/s",
                  "", "", _f(c["restore_bytes_per_s"]["median"] / disk["read_bytes_per_s"]["median"]),
                  f"dd {disk['read_bytes_per_s']['median'] / 1e6:.0f} MB/s")
        t.add_row(f"{preset}: step during a save / normal step", "", "", "", _f(c["step_during_save_over_normal"]),
                  f"{c['step_during_save_s']['median']:.3f} s vs {c['normal_step_s']['median']:.3f} s; async "
                  f"blocking {c['async_blocking_s']['median']:.3f} s")
    if "resharding" in results:
        rs = results["resharding"]
        for key, r in rs["restores"].items():
            by, into = key.split("_to_")
            same = rs["restores"][f"{into}_to_{into}"]["restore_s"]["median"]
            t.add_row(f"{rs['preset']}: restore {by} -> {into} hosts (s)", _f(r["restore_s"]["median"], ".3f"),
                      "", "", _f(r["over_same_topology"]),
                      f"over {into} -> {into} ({same:.3f} s); shard {r['shard_shape']} of {r['array']}, "
                      f"{rs['state_bytes'] / 1e6:.0f} MB")
    if "goodput_under_chaos" in results:
        g = results["goodput_under_chaos"]
        t.add_row("goodput under --chaos 60", _f(g["goodput"], ".3f"), "", "", "",
                  f"{g['failures']} kills in {g['wall_s']:.0f} s; badput "
                  + ", ".join(f"{k} {v:.1%}" for k, v in g["badput_share"].items() if v >= 0.001))
    if "goodput_under_chaos_memory_tier" in results:
        g = results["goodput_under_chaos_memory_tier"]
        t.add_row("goodput under --chaos 60, memory tier every step", _f(g["goodput"], ".3f"), "", "", "",
                  f"{g['failures']} kills in {g['wall_s']:.0f} s; badput "
                  + ", ".join(f"{k} {v:.1%}" for k, v in g["badput_share"].items() if v >= 0.001))
    if "goodput_under_chaos_defaults" in results:
        g = results["goodput_under_chaos_defaults"]
        t.add_row("goodput under --chaos 60, the defaults", _f(g["goodput"], ".3f"), "", "", "",
                  f"{g['failures']} kills in {g['wall_s']:.0f} s; badput "
                  + ", ".join(f"{k} {v:.1%}" for k, v in g["badput_share"].items() if v >= 0.001))
    if "node_removed" in results:
        mem, dur = results["node_removed"]["memory"], results["node_removed"]["durable"]
        t.add_row("node removed -> first step on 1 host, memory / Orbax (s)", _f(mem["first_step_on_fewer_hosts_s"]),
                  "", _f(dur["first_step_on_fewer_hosts_s"]),
                  _f(ratio(mem["first_step_on_fewer_hosts_s"], dur["first_step_on_fewer_hosts_s"])),
                  f"recomputed {mem['steps_recomputed']} / {dur['steps_recomputed']}; durable bytes read "
                  f"{mem['durable_bytes_read']} / {dur['durable_bytes_read']}")
    if "memory_tier" in results:
        m = results["memory_tier"]
        mem, dur = m["memory"], m["durable"]
        t.add_row("small, 2 hosts: save blocking, memory / async Orbax", _f(mem["memory_blocking_s"], ".4f"), "", "",
                  "", f"Orbax every 10 steps: {_f(dur['durable_blocking_s'], '.3f')} s")
        t.add_row("step saving to memory every step / never saving", "", "", "", _f(m["memory_step_over_normal"]),
                  f"Orbax every 10: {_f(m['durable_step_over_normal'])}; steps/s ratio "
                  f"{_f(m['memory_steps_per_s_over_never'])}")
        t.add_row("host SIGKILL -> first step, memory / Orbax", _f(mem["recovery_s"]), "", _f(dur["recovery_s"]),
                  _f(ratio(mem["recovery_s"], dur["recovery_s"])),
                  f"recomputed {mem['steps_recomputed']} / {dur['steps_recomputed']}; restored from "
                  f"{mem['restored_tier']}, {mem['durable_bytes_read']} durable bytes")
        t.add_row("restore from memory / from Orbax", _f(mem["restore_s"], ".3f"), "", _f(dur["restore_s"], ".3f"),
                  _f(m["restore_memory_over_orbax"]), "")
        if "copies_per_save_on_own_node" in m:
            t.add_row("copies of a host's part per save, on its own node (target 1)",
                      _f(m["copies_per_save_on_own_node"], ".0f"), "", "", "",
                      f"all copies {_f(mem['memory_copies'], '.0f')} (write, replica send and receive; one node "
                      f"here: no replica); {_f(mem['memory_bytes_per_save'], '.0f')} bytes moved per save")
            t.add_row("bytes read per host on a 4 -> 2 restore / its new part (target <= 1.5)",
                      _f(m["restore_4_to_2_bytes_over_new_part"], ".2f"), "", "", "",
                      f"restored from {m['shrink_4_to_2']['restored_tier']}")
        if "defaults" in m:
            d = m["defaults"]
            t.add_row("the defaults: steps/s over durable-only / step over never saving",
                      _f(m["defaults_steps_per_s_over_durable"]), "", "", _f(m["defaults_step_over_normal"]),
                      f"cadence {[(c['memory_every'], c['durable_every']) for c in d['cadence']]} (memory, durable)")
            t.add_row("the defaults: host SIGKILL -> first step / Orbax's", _f(d["recovery_s"]), "",
                      _f(dur["recovery_s"]), _f(m["defaults_recovery_over_durable"]),
                      f"recomputed {m.get('defaults_steps_recomputed', d['steps_recomputed'])} / "
                      f"{dur['steps_recomputed']}; restored from {d['restored_tier']}")
            if "rounds" in m:
                t.add_row(f"the defaults over {len(m['rounds'])} rounds: steps/s over never saving (median)",
                          "", "", "", _f(m["defaults_steady_steps_per_s_over_never"]),
                          f"range {_range(m, 'defaults_steady_steps_per_s_over_never')}; a step during a save / a "
                          f"normal one {_f(m['defaults_during_save_over_normal'])}; SIGKILL / Orbax's range "
                          f"{_range(m, 'defaults_recovery_over_durable')}")
    if "soak" in results:
        s, rec = results["soak"], results["soak"]["recovery_s"]
        t.add_row(f"soak: runs under --chaos {s['job']['chaos_mean_s']:g} equal to an uninterrupted run",
                  f"{s['successes']} / {s['runs']}", "", "", _f(s["success_rate"]),
                  f"{s['kills_total']} kills; kill -> first step p50 {_f(rec['p50'])} s, p95 {_f(rec['p95'])} s, "
                  f"max {_f(rec['max'])} s")
    pod = results["pod_scale"]
    for row in pod["rows"]:
        t.add_row(f"driver at {row['hosts']} simulated hosts", "", "", "", "",
                  f"{row['driver_cpu_per_poll_s'] * 1e3:.2f} ms CPU a poll, decision {row['decision_cpu_s'] * 1e3:.1f} "
                  f"ms, {row['record_bytes_per_step']:.0f} B of records a step")
    return t


def _range(m: dict[str, Any], key: str) -> str:
    low_high = m.get(key + "_range")
    return f"{_f(low_high[0])}-{_f(low_high[1])}" if low_high else "-"


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the side-by-side ratios (without Ray Train's 100 s hang), the stall, the small preset's "
                        "checkpoints, the tiny preset's resharding restores and the pod-scale simulation, in about "
                        "5 minutes; the full run adds Ray Train's hang, the changes before and after, the base preset "
                        "and the chaos run")
    p.add_argument("--out", default=str(RESULTS), help="where to write the results JSON")
    p.add_argument("--only", default=None,
                   help="comma-separated sections to measure again, e.g. side_by_side,changes; the others are "
                        "kept from --out")
    p.add_argument("--soak-runs", type=int, default=soak.RUNS, help="runs of the soak section")
    p.add_argument("sections", nargs="*", metavar="SECTION",
                   help="the same as --only: e.g. `python -m benchmarks soak`")
    args = p.parse_args()
    only = [*(args.only.split(",") if args.only else []), *args.sections] or None
    if only and not pathlib.Path(args.out).exists():
        p.error(f"--only needs the results of an earlier run in {args.out}")
    console = Console(width=220)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="jaxlaunch-bench-", dir=ROOT / "benchmarks") as tmp:
        results = run_all(args.quick, pathlib.Path(tmp), console, pathlib.Path(args.out), only, args.soak_runs)
    total = "total_s" if not only else "total_s_of_" + "_".join(only)
    results[total] = time.time() - started
    _write(pathlib.Path(args.out), results)
    console.print(table(results))
    console.print(f"wrote {args.out} in {results[total]:.0f} s on {results['machine']['cpu']}, "
                  f"{results['machine']['cores']} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
