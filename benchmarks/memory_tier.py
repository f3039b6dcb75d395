"""The memory tier against the durable-only path, side by side in one run: the built-in model's small
preset on 2 hosts, the defaults (the memory tier, each tier's cadence chosen from measured cost) vs a
save every step in memory vs an asynchronous Orbax save every 10 steps vs no saves, each SIGKILLed at
the same step (host 1) except the run without saves. The copies of a host's part per save are
counted, not assumed (the save's `memory_copies*` metrics), and so are the bytes each host reads on a
4 -> 2 restore from memory against its new part. The four runs are made ROUNDS times, each ratio
taken within a round and its median over the rounds reported with its range."""

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


STEADY_FROM = 10
"""The first step of the window every run's throughput is taken over (compilation, the standby's
warm-up and the cadence's first measuring saves lie before it)."""


def _steady_steps_per_s(metrics: list[dict[str, Any]], until: int) -> float | None:
    """Attempt 1's steps per second of wall time from step STEADY_FROM to `until`: the same window in
    every run, saves and all."""
    at = {m["step"]: m["time"] for m in metrics if m["attempt"] == 1}
    if STEADY_FROM not in at or until not in at:
        return None
    return (until - STEADY_FROM) / (at[until] - at[STEADY_FROM])


def _within_run(metrics: list[dict[str, Any]], until: int) -> dict[str, float | None]:
    """In one run, so that no other run's noise is in it: the time of a step while a save's hand-off
    runs (the step after a save, whose own time excludes the save's blocking) over a normal step's
    (steps neither saving nor right after a save), and the share of the window's wall time the saves
    cost, their blocking plus what the steps after them took beyond a normal step."""
    steps = {m["step"]: m for m in metrics if m["attempt"] == 1 and STEADY_FROM <= m["step"] <= until}
    saves = sorted(s for s, m in steps.items() if m.get("checkpoint_tier"))
    after = [steps[s + 1]["step_time_s"] for s in saves if s + 1 in steps and steps[s + 1].get("step_time_s")]
    near = {s + d for s in saves for d in (0, 1, 2)}
    normal = [m["step_time_s"] for s, m in steps.items() if s not in near and m.get("step_time_s")]
    if not normal or not saves:
        return {"saves_in_window": len(saves), "during_save_over_normal": None, "save_cost_share": None}
    typical = statistics.median(normal)
    blocking = sum(steps[s].get("checkpoint_blocking_s") or 0.0 for s in saves)
    excess = sum(max(0.0, t - typical) for t in after)
    wall = steps[max(steps)]["time"] - steps[min(steps)]["time"]
    return {"saves_in_window": len(saves),
            "during_save_over_normal": statistics.median(after) / typical if after else None,
            "save_cost_share": (blocking + excess) / wall if wall > 0 else None}


def _median(metrics: list[dict[str, Any]], key: str) -> float | None:
    values = [m[key] for m in metrics if m.get(key) is not None]
    return statistics.median(values) if values else None


def _run(work: pathlib.Path, name: str, steps: int, kill_at: int | None, *args: str,
         until: int) -> dict[str, Any]:
    """One launch; its throughput and save costs over steps STEADY_FROM to `until`."""
    r = launch(work / name, *SMALL, "--steps", str(steps), *args, fault="kill" if kill_at else None,
               fault_step=kill_at)
    out = summarize(r)
    restored = [e for e in r["events"] if e["event"] == "restored"]
    steady = [m for m in r["metrics"] if m["attempt"] == 1]
    return {"steps_per_s": steps_per_second(steady), "step_time_s": _step_time(r["metrics"]),
            "steady_steps_per_s": _steady_steps_per_s(r["metrics"], until), "window": [STEADY_FROM, until],
            **_within_run(r["metrics"], until),
            "memory_blocking_s": _blocking(r["metrics"], "memory"), "durable_blocking_s": _blocking(r["metrics"],
                                                                                                   "durable"),
            "recovery_s": out["recovery_s"], "steps_recomputed": out["steps_recomputed"],
            "recovery_split": out.get("recovery_split"), "detection_s": out.get("detection_s"),
            "restore_s": restored[0]["seconds"] if restored else None,
            "restored_tier": restored[0].get("tier") if restored else None,
            "durable_bytes_read": restored[0].get("durable_bytes_read") if restored else None,
            "cadence": [{k: e.get(k) for k in ("step", "memory_every", "durable_every", "step_time_s",
                                                "memory_blocking_s", "durable_blocking_s")}
                        for e in r["events"] if e["event"] == "cadence_chosen" and e.get("attempt") == 1],
            "memory_copies_on_node": _median(r["metrics"], "memory_copies_on_node"),
            "memory_copies": _median(r["metrics"], "memory_copies"),
            "memory_bytes_per_save": _median(r["metrics"], "memory_bytes"),
            "memory_part_bytes": _median(r["metrics"], "memory_part_bytes"),
            "restore_bytes_over_new_part": _ratio(restored[0].get("memory_bytes_read"),
                                                  restored[0].get("memory_part_bytes")) if restored else None}


ROUNDS = 3
"""Rounds of the four runs. On this small, shared machine one run's median step moves by 10 % or more
from one run to the next, either way: each ratio is taken within a round, and the median over the
rounds reported with its range."""


def _round(work: pathlib.Path, number: int, steps: int, kill_at: int) -> dict[str, Any]:
    """The four runs once, in an order turned by one each round (a run's place in the order is not
    what a ratio measures)."""
    window = kill_at - 1  # every run's throughput over the same steps, before the kill
    runs = {
        "never": lambda: _run(work, f"never-{number}", steps, None, "--no-memory-tier", "--save-every", str(NEVER),
                              until=window),
        "defaults": lambda: _run(work, f"defaults-{number}", steps, kill_at, until=window),
        "memory": lambda: _run(work, f"memory-{number}", steps, kill_at, "--memory-tier", "--save-every", "1",
                               "--persist-every", str(NEVER), until=window),
        "durable": lambda: _run(work, f"durable-{number}", steps, kill_at, "--no-memory-tier", "--save-every", "10",
                                until=window),
    }
    names = list(runs)
    order = names[number % len(names):] + names[:number % len(names)]
    r = {name: runs[name]() for name in order}
    never, defaults, memory, durable = r["never"], r["defaults"], r["memory"], r["durable"]
    return {
        **r, "order": order,
        "defaults_steps_per_s_over_durable": _ratio(defaults["steps_per_s"], durable["steps_per_s"]),
        "defaults_step_over_normal": _ratio(defaults["step_time_s"], never["step_time_s"]),
        # The same window of steps in each run (STEADY_FROM to the step before the kill).
        "defaults_steady_steps_per_s_over_never": _ratio(defaults["steady_steps_per_s"], never["steady_steps_per_s"]),
        "durable_steady_steps_per_s_over_never": _ratio(durable["steady_steps_per_s"], never["steady_steps_per_s"]),
        "defaults_recovery_over_durable": _ratio(defaults["recovery_s"], durable["recovery_s"]),
        "memory_blocking_over_step": _ratio(memory["memory_blocking_s"], memory["step_time_s"]),
        "memory_steps_per_s_over_never": _ratio(memory["steps_per_s"], never["steps_per_s"]),
        "memory_step_over_normal": _ratio(memory["step_time_s"], never["step_time_s"]),
        "durable_step_over_normal": _ratio(durable["step_time_s"], never["step_time_s"]),
        "restore_memory_over_orbax": _ratio(memory["restore_s"], durable["restore_s"]),
    }


RATIOS = ("defaults_steps_per_s_over_durable", "defaults_step_over_normal", "defaults_steady_steps_per_s_over_never",
          "durable_steady_steps_per_s_over_never", "defaults_recovery_over_durable", "memory_blocking_over_step",
          "memory_steps_per_s_over_never", "memory_step_over_normal", "durable_step_over_normal",
          "restore_memory_over_orbax")


def run(work: pathlib.Path, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    steps, kill_at = (30, 20) if quick else (60, 45)
    rounds = rounds or (1 if quick else ROUNDS)
    done = [_round(work, number, steps, kill_at) for number in range(rounds)]
    shrink = node_removed(work, "memory-4-to-2", "--memory-tier", "--save-every", "1", "--persist-every", "100",
                          hosts=4, min_hosts=2)
    first = done[0]
    out: dict[str, Any] = {name: first[name] for name in ("never", "defaults", "memory", "durable")}
    out["rounds"] = [{k: v for k, v in r.items() if k in RATIOS or k == "order"} | {
        f"{name}_{key}": r[name][key] for name in ("defaults", "memory", "durable")
        for key in ("recovery_s", "steps_recomputed", "restored_tier", "during_save_over_normal", "save_cost_share")}
        for r in done]
    for key in RATIOS:
        values = [r[key] for r in done if r[key] is not None]
        out[key] = _median(done, key)
        out[key + "_range"] = [min(values), max(values)] if values else None
    defaults = [r["defaults"] for r in done]
    out["defaults_during_save_over_normal"] = _median(defaults, "during_save_over_normal")
    out["defaults_save_cost_share"] = _median(defaults, "save_cost_share")
    out["defaults_steps_recomputed"] = [r["defaults"]["steps_recomputed"] for r in done]
    out["shrink_4_to_2"] = shrink
    # Targets: 1 copy on the saving node (its write); at most 1.5x its new part read per host.
    out["copies_per_save_on_own_node"] = _median([r["memory"] for r in done], "memory_copies_on_node")
    out["restore_4_to_2_bytes_over_new_part"] = shrink["restore_bytes_over_new_part"]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---- a node removed: the elastic probe ------------------------------------------------------------------

HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
          "health_check_failure_threshold": 3}
REMOVE_AT_STEP = 30


def node_removed(work: pathlib.Path, name: str, *args: str, hosts: int = 2, min_hosts: int = 1) -> dict[str, Any]:
    """examples/minimal.py on `hosts` one-CPU nodes of a `ray.cluster_utils.Cluster` (its head has
    none); rank 1's node removed without warning at step REMOVE_AT_STEP; the job goes on on fewer
    hosts (`min_hosts` at least). From the removal to the first step on fewer hosts, the steps trained
    again, and the bytes read from durable storage and, by rank 0, from memory."""
    import time

    import ray
    from ray.cluster_utils import Cluster

    from benchmarks.launches import ROOT, _read

    run_dir = work / f"node-removed-{name}"

    def remove_rank_1_node(proc: Any) -> float:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            records = _read(run_dir / "metrics.jsonl")
            if records and records[-1]["step"] >= REMOVE_AT_STEP:
                break
            time.sleep(0.02)
        started = next(e for e in _read(run_dir / "events.jsonl") if e["event"] == "attempt_started")
        node = next(n for n in nodes if n.node_id == started["nodes"][1])
        removed_at = time.time()
        cluster.remove_node(node, allow_graceful=False)
        return removed_at

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": HEALTH})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(hosts)]
        cluster.wait_for_nodes()
        r = launch(run_dir, "--hosts", str(hosts), "--min-hosts", str(min_hosts),
                   "--entry", str(ROOT / "examples" / "minimal.py"), "--steps", "400", *args, during=remove_rank_1_node,
                   config={"cluster": {"address": cluster.address, "placement_strategy": "STRICT_SPREAD",
                                       "resources_per_host": {"CPU": 1}}})
    finally:
        ray.shutdown()
        cluster.shutdown()
    metrics, events = r["metrics"], r["events"]
    later = [m for m in metrics if m["attempt"] > 1]
    restored = next(e for e in events if e["event"] == "restored")
    trained_before = max(m["step"] for m in metrics if m["attempt"] == 1)
    recomputed = trained_before - restored["step"]
    return {"first_step_on_fewer_hosts_s": later[0]["time"] - r["during"], "hosts_after": later[0]["num_hosts"],
            "steps_recomputed": recomputed,
            # What the steps trained again cost, in the time the first attempt took a step.
            "recomputed_s": recomputed * (_step_time(metrics) or 0.0), "restored_tier": restored.get("tier", "durable"),
            "durable_bytes_read": restored.get("durable_bytes_read"),
            "restore_bytes_over_new_part": _ratio(restored.get("memory_bytes_read"), restored.get("memory_part_bytes"))}


def elastic(work: pathlib.Path) -> dict[str, Any]:
    return {"memory": node_removed(work, "memory", "--memory-tier", "--save-every", "1", "--persist-every", "100"),
            "durable": node_removed(work, "durable", "--no-memory-tier", "--save-every", "10"),
            "defaults": node_removed(work, "defaults")}
