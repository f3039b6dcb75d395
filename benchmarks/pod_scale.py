"""The driver at pod scale, in simulation: the real Driver, policies, Recorder and history against a
fake worker group of N hosts (the unit tests' own, `tests/unit/fakes.py`; no Ray, no JAX), measuring
what grows with N:

- the driver's CPU time per poll while training, and so its CPU seconds per wall second at the
  default poll interval;
- from a host's death to the restart decision: the driver's CPU time, and the simulated time
  (which the policy's hearing-out dominates);
- the bytes of records written per training step, and per attempt start;
- deriving the history (summary, attempt table, goodput) from the records.

    python -m benchmarks.pod_scale            (64, 256 and 1024 hosts)
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import tempfile
import time
from typing import Any

from jaxlaunch.launcher.control.driver import Driver
from jaxlaunch.launcher.control.policy import FaultConfig
from jaxlaunch.launcher.control.states import Relaunching, Running
from jaxlaunch.launcher.records import history
from jaxlaunch.launcher.records.recorder import Recorder
from jaxlaunch.launcher.records.runs import RunDir

from jaxlaunch.contract.events import StartupTimeline
from jaxlaunch.contract.protocol import ErrorKind, NodeLiveness
from tests.unit.fakes import POLL_INTERVAL_S, Clock, FakeGroup, make_driver

TRAIN_POLLS = 400
"""Polls of steady training measured per host count (a step completes at every poll)."""


def pod(fail_at: int | None):
    """N hosts that report a step at every poll; at poll `fail_at` host N // 2 dies and, one poll
    later, every other host fails with a collective error, as gloo does."""
    def behaviour(group: FakeGroup, poll: int) -> list[dict[str, Any]]:
        victim = group.num_hosts // 2
        if fail_at is not None and poll >= fail_at:
            if victim not in group.exits:
                group.die(victim, step=group.hosts[victim].step, node=NodeLiveness.ALIVE)
            elif poll == fail_at + 1:
                for h in group.hosts:
                    if h.rank != victim:
                        group.raise_(h.rank, ErrorKind.COLLECTIVE, "JaxRuntimeError: UNKNOWN: Gloo AllGather failed: "
                                     "Connection closed by peer", step=h.step)
            return []
        if poll == 1:  # every host tells where its start-up time went, as real hosts do
            now = group.clock()
            group.events += [(h.rank, StartupTimeline(time=now, actor_init=now - 9, initializing=now - 8,
                                                      restoring=now - 6, compiling=now - 5, training=now))
                             for h in group.hosts]
        return group.train(poll, loss=1.0 / poll)
    return behaviour


def _driver(n: int, run: RunDir, fail_at: int | None, clock: Clock) -> tuple[Driver, list[FakeGroup]]:
    driver, _, _, cluster = make_driver(
        [pod(fail_at), pod(None)], hosts=n, fault=FaultConfig(max_restarts=3), clock=clock,
        listeners=[Recorder(run, lambda k: {"data": k}, wall_clock=clock)])
    return driver, cluster.groups


def measure(n: int, work: pathlib.Path) -> dict[str, Any]:
    run = RunDir(work / f"pod-{n}")
    run.create()
    clock = Clock()
    driver, groups = _driver(n, run, fail_at=TRAIN_POLLS + 1, clock=clock)
    started_bytes = run.events_path.stat().st_size if run.events_path.exists() else 0
    driver.step()  # scheduling -> running (the attempt's start is recorded)
    assert isinstance(driver.state, Running)
    attempt_start_bytes = run.events_path.stat().st_size - started_bytes
    before_events, before_metrics = run.events_path.stat().st_size, 0
    cpu = time.process_time()
    for _ in range(TRAIN_POLLS):
        driver.step()
    train_cpu = time.process_time() - cpu - groups[0].poll_seconds
    per_step_bytes = (run.events_path.stat().st_size - before_events
                      + run.metrics_path.stat().st_size - before_metrics) / TRAIN_POLLS
    # From the poll that shows the death to the decision to restart.
    sim_failed_at = clock() + POLL_INTERVAL_S
    cpu = time.process_time()
    poll_cost_before = groups[0].poll_seconds
    while not isinstance(driver.state, Relaunching):
        driver.step()
    decision_cpu = time.process_time() - cpu - (groups[0].poll_seconds - poll_cost_before)
    decision_sim = clock() - sim_failed_at
    cpu = time.process_time()
    past = history.load_history(run)
    past.summary(run)
    history_cpu = time.process_time() - cpu
    per_poll = train_cpu / TRAIN_POLLS
    return {
        "hosts": n,
        "driver_cpu_per_poll_s": per_poll,
        "driver_cpu_per_wall_s": per_poll / POLL_INTERVAL_S,
        "decision_cpu_s": decision_cpu,
        "decision_simulated_s": decision_sim,
        "record_bytes_per_step": per_step_bytes,
        "record_bytes_per_attempt_start": attempt_start_bytes,
        "history_cpu_s": history_cpu,
        "failure": driver.state.failure.kind.value,
        "blamed_host": driver.state.failure.rank,
    }


def growth(rows: list[dict[str, Any]], key: str) -> float:
    """The exponent k of cost ~ hosts^k between the smallest and the largest host count."""
    first, last = rows[0], rows[-1]
    if first[key] <= 0:
        return float("nan")
    return math.log(last[key] / first[key]) / math.log(last["hosts"] / first["hosts"])


def run_all(host_counts: tuple[int, ...] = (64, 256, 1024)) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jaxlaunch-pod-") as tmp:
        rows = [measure(n, pathlib.Path(tmp)) for n in host_counts]
    keys = ("driver_cpu_per_poll_s", "decision_cpu_s", "record_bytes_per_step", "record_bytes_per_attempt_start",
            "history_cpu_s")
    return {"rows": rows, "growth_exponent": {k: growth(rows, k) for k in keys}}


if __name__ == "__main__":
    json.dump(run_all(), sys.stdout, indent=2)
    print()
