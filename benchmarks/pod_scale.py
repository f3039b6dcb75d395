"""The driver at pod scale, in simulation: the real Driver, policies, Recorder and history against a
simulated worker group of N hosts (no Ray, no JAX), measuring what grows with N:

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

from jaxlaunch.launcher import history
from jaxlaunch.launcher.driver import Driver
from jaxlaunch.launcher.policy import FaultConfig, RestartPolicy, ScalingPolicy, Watchdog, WatchdogConfig
from jaxlaunch.launcher.recorder import Recorder
from jaxlaunch.launcher.runs import RunDir
from jaxlaunch.launcher.states import Restarting, Running

from jaxlaunch.contract.protocol import (
    ErrorKind,
    ExitHow,
    GroupInfo,
    GroupPoll,
    HostError,
    HostEvent,
    HostExit,
    HostStatus,
    NodeLiveness,
    Phase,
)

POLL_INTERVAL_S = WatchdogConfig().poll_interval_s
TRAIN_POLLS = 400
"""Polls of steady training measured per host count (a step completes at every poll)."""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class SimCluster:
    embedded = False

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    def placeable_hosts(self) -> int:
        return self.capacity

    def describe(self) -> str:
        return f"{self.capacity} simulated hosts"

    def alive(self) -> bool:
        return True

    def restart(self) -> None:
        raise AssertionError("a simulated cluster is never restarted")


class SimGroup:
    """N hosts that report a step at every poll; `fail_at` (a poll number) kills host N // 2 and,
    one poll later, fails every other host with a collective error, as gloo does."""

    def __init__(self, clock: Clock, fail_at: int | None) -> None:
        self.clock, self.fail_at = clock, fail_at
        self.polls = 0
        self.exits: dict[int, HostExit] = {}
        self.poll_seconds = 0.0

    def start(self, num_hosts: int, attempt: int, injections=()) -> GroupInfo:
        now = self.clock()
        self.num_hosts, self.attempt = num_hosts, attempt
        self.hosts = [HostStatus(r, Phase.TRAINING, 0, now, now) for r in range(num_hosts)]
        return GroupInfo("10.0.0.1:1234", [f"node-{r:05d}" for r in range(num_hosts)],
                         [100_000 + r for r in range(num_hosts)])

    def poll(self) -> GroupPoll:
        started = time.process_time()
        self.clock.sleep(POLL_INTERVAL_S)
        self.polls += 1
        now = self.clock()
        records, events = [], []
        if self.fail_at is not None and self.polls >= self.fail_at:
            victim = self.num_hosts // 2
            if victim not in self.exits:
                self.exits[victim] = HostExit(victim, ExitHow.PROCESS_DIED, now, self.hosts[victim].step,
                                              "worker died", node=NodeLiveness.ALIVE, since=now)
            elif self.polls == self.fail_at + 1:
                for h in self.hosts:
                    if h.rank != victim:
                        error = HostError(h.rank, h.step, ErrorKind.COLLECTIVE, "JaxRuntimeError",
                                          "UNKNOWN: Gloo AllGather failed: Connection closed by peer", "...")
                        self.exits[h.rank] = HostExit(h.rank, ExitHow.RAISED, now, h.step, error=error)
        else:
            step = self.polls
            for h in self.hosts:
                h.step, h.last_heard, h.last_progress = step, now, now
            if step == 1:  # every host tells where its start-up time went, as real hosts do
                events = [(h.rank, HostEvent("startup_timeline", now, {"actor_init": now - 9, "initializing": now - 8,
                                                                         "restoring": now - 6, "compiling": now - 5,
                                                                         "training": now}, per_host=True))
                          for h in self.hosts]
            records.append({"step": step, "time": now, "loss": 1.0 / step, "step_time_s": POLL_INTERVAL_S,
                            "attempt": self.attempt, "num_hosts": self.num_hosts})
        poll = GroupPoll(self.hosts, records, events, {}, list(self.exits.values()))
        self.poll_seconds += time.process_time() - started
        return poll

    def preempt(self) -> None:
        pass

    def kill(self, rank: int) -> None:
        pass

    def dump_stacks(self, rank: int) -> str | None:
        return None

    def lost_hosts(self) -> list[int]:
        return []

    def shutdown(self) -> None:
        pass


def _driver(n: int, run: RunDir, fail_at: int | None, clock: Clock) -> tuple[Driver, list[SimGroup]]:
    groups: list[SimGroup] = []

    def make_group() -> SimGroup:
        groups.append(SimGroup(clock, fail_at if not groups else None))
        return groups[-1]

    fault = FaultConfig(max_restarts=3)
    driver = Driver(
        cluster=SimCluster(n), make_group=make_group, restart_policy=RestartPolicy(fault),
        scaling_policy=ScalingPolicy(n, n, lambda k: True), watchdog=Watchdog(WatchdogConfig()), fault=fault,
        committed_step=lambda: None, listeners=[Recorder(run, lambda k: {"data": k})], clock=clock,
        sleep=clock.sleep,
    )
    return driver, groups


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
    while not isinstance(driver.state, Restarting):
        driver.step()
    decision_cpu = time.process_time() - cpu - (groups[0].poll_seconds - poll_cost_before)
    decision_sim = clock() - sim_failed_at
    cpu = time.process_time()
    past = history.load(run)
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
