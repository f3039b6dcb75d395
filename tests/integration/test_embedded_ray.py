"""The embedded Ray head (jaxlaunch.launcher.cluster.embedded_ray): it serves a driver, survives a signal to the
driver's process group, dies with its driver, reports a dead node, and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psutil
import pytest
from jaxlaunch.launcher.cluster.embedded_ray import EmbeddedRay

from tests.integration.helpers import ROOT, dashboard_agent

pytestmark = pytest.mark.timeout(180)
NUM_CPUS = 2
GONE_TIMEOUT_S = 20.0
"""How long the processes of an instance may take to disappear once it is told to go, or its driver dies."""
DEAD_NODE_TIMEOUT_S = 20.0
DRIVER_TIMEOUT_S = 150.0
GCS_CALL_TIMEOUT_S = 40
"""Less than the 60 s after which Ray ends a driver that cannot reach its GCS."""
POLL_S = 0.05

# A driver that starts its own instance, prints {"supervisor", "pids"} once the instance works, and waits.
# On SIGTERM (handled only after ray.init, which installs its own handler) it runs one more task, prints
# its result, and stops cleanly.
DRIVER = """
import json, os, signal, sys, threading
sys.path.insert(0, {root!r})
import ray
from jaxlaunch.launcher.cluster.embedded_ray import EmbeddedRay

instance = EmbeddedRay({num_cpus})
ray.init(address=instance.start(), log_to_driver=False, configure_logging=False)

@ray.remote
def double(x):
    return 2 * x

assert ray.get(double.remote(1), timeout=120) == 2
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
print(json.dumps({{"supervisor": instance.supervisor_pid, "pids": instance.pids()}}), flush=True)
# A signal to the process group may land on one of Ray's threads; its Python handler then runs in the
# main thread only when that next runs Python code, which a single wait(600) would not do for 600 s.
for _ in range(6000):
    if stop.wait(0.1):
        break
print("result", ray.get(double.remote(21), timeout=60), flush=True)
ray.shutdown()
instance.stop()
"""


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def left_of(supervisor: int, pids: list[int]) -> list[int]:
    """The processes still running of an instance another process owned: those it listed, and any in the
    session its supervisor leads."""
    left = {pid for pid in pids if running(pid)}
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == supervisor and proc.status() != psutil.STATUS_ZOMBIE:
                left.add(proc.pid)
        except (OSError, psutil.Error):
            continue
    return sorted(left)


def wait_for(condition: Callable[[], object], timeout_s: float) -> float:
    """Seconds until `condition()` held; fails the test past the deadline."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"still not true after {timeout_s:g} s"
        time.sleep(POLL_S)
    return time.monotonic() - start


def kill_left(supervisor: int, pids: list[int]) -> None:
    """Cleanup after a failed test: the instance's own processes, never any other Ray's."""
    for pid in left_of(supervisor, pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_driver() -> tuple[subprocess.Popen[str], dict]:
    """The driver in its own session and process group, as a launcher under Slurm or systemd is."""
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER.format(root=str(ROOT), num_cpus=NUM_CPUS)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    line = driver.stdout.readline()
    if not line:
        fail_with_stderr(driver, "driver failed")
    return driver, json.loads(line)


def fail_with_stderr(driver: subprocess.Popen[str], why: str) -> None:
    """Kill the driver and fail the test with the tail of what it wrote to stderr."""
    driver.kill()
    pytest.fail(f"{why}: {driver.communicate(timeout=30)[1][-3000:]}")


@pytest.fixture
def instance(monkeypatch):
    # start() turns token authentication on in this process's environment (drivers started from here
    # inherit it); put the environment back afterwards.
    monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "token"))
    embedded = EmbeddedRay(NUM_CPUS)
    yield embedded
    embedded.stop()


def test_serves_a_driver_and_stops_without_leftovers(instance):
    address = instance.start()
    assert instance.alive()
    pids = instance.pids()
    assert instance.supervisor_pid in pids
    client = """
import os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False,
         runtime_env={"env_vars": {"PYTHONPATH": sys.argv[2]}})

@ray.remote
def square(x):
    return x * x

@ray.remote
class Counter:
    def add(self, n):
        return os.environ["PYTHONPATH"], n + 1

print(ray.get(square.remote(7), timeout=120), *ray.get(Counter.remote().add.remote(1), timeout=120))
"""
    result = subprocess.run(
        [sys.executable, "-c", client, address, str(ROOT)],
        capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["49", str(ROOT), "2"]

    instance.stop()
    assert not instance.alive()
    assert instance.pids() == []
    assert not any(running(pid) for pid in pids)
    assert not os.path.exists(instance.temp_dir)
    instance.stop()  # idempotent


def test_dies_with_a_killed_driver():
    driver, started = start_driver()
    try:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        wait_for(lambda: not left_of(started["supervisor"], started["pids"]), GONE_TIMEOUT_S)
    finally:
        driver.kill()
        kill_left(started["supervisor"], started["pids"])


def test_survives_sigterm_to_the_drivers_process_group():
    driver, started = start_driver()
    try:
        os.killpg(driver.pid, signal.SIGTERM)
        try:
            out, err = driver.communicate(timeout=DRIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            fail_with_stderr(driver, f"the driver did not stop within {DRIVER_TIMEOUT_S:g} s of the SIGTERM")
        assert driver.returncode == 0, err[-3000:]
        assert "result 42" in out
        wait_for(lambda: not left_of(started["supervisor"], started["pids"]), GONE_TIMEOUT_S)
    finally:
        driver.kill()
        kill_left(started["supervisor"], started["pids"])


CALLS_GCS_AFTER_A_LINE = """
import sys, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
print("connected", flush=True)
sys.stdin.readline()
for _ in range(3):
    placement_group([{"CPU": 1}])
print("created", flush=True)
ray.shutdown()
"""


def test_reports_a_dead_node_whose_gcs_still_answers_its_driver(instance):
    """The node's DashboardAgent is SIGKILLed (Ray takes the raylet down): `alive()` turns False, and a
    driver's call to the GCS made then (creating a placement group, as a driver starting a standby
    group does) returns. With the GCS torn down at once, such a call blocked until Ray ended the driver
    60 s later."""
    address = instance.start()
    driver = subprocess.Popen([sys.executable, "-c", CALLS_GCS_AFTER_A_LINE, address], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if driver.stdout.readline().strip() != "connected":
            fail_with_stderr(driver, "the driver did not connect")
        dashboard_agent(instance.pids()).kill()
        wait_for(lambda: not instance.alive(), DEAD_NODE_TIMEOUT_S)
        driver.stdin.write("go\n")
        driver.stdin.flush()
        try:
            out, err = driver.communicate(timeout=GCS_CALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            fail_with_stderr(driver, f"the driver's calls to the GCS did not return within {GCS_CALL_TIMEOUT_S} s")
        assert driver.returncode == 0 and "created" in out.splitlines(), out[-2000:] + err[-3000:]
    finally:
        driver.kill()
    instance.stop()
    assert instance.pids() == []
