"""The warm standby across launches on an existing cluster (`--standby-linger`, which the suite's
launches on its shared instance use): a launch's unused spares wait for the next launch, which
starts on them and computes what a launch on fresh processes computes; spares no launch can use are
ended; spares whose driver was killed end with their lease."""

import os
import signal
from typing import Any

import psutil

from tests.integration.helpers import (
    EXAMPLE_RUN,
    GATED,
    MINIMAL,
    alive,
    events,
    host_pids,
    launch,
    open_gate,
    start,
    trajectory,
    wait_for,
)

GATE = 100
LEASE_BOUND_S = 15 + 30
"""A spare group's lease while its driver holds it (`SPARE_HOLD_S`), and as much again for Ray to end
the processes of a removed placement group on a loaded 2-core machine."""


def host_actors() -> set[int]:
    """Every host actor process on this machine (hosts and spares)."""
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "ray::HostActor" in " ".join(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


def spares_made(run_dir, before: set[int], proc, num_hosts: int) -> set[int]:
    """Waits until the gated launch stands at its gate with its spare group made; their processes."""
    def spares() -> set[int]:
        return host_actors() - before - set(host_pids(run_dir))

    open_gate_ready = run_dir / f"at-{GATE}"
    wait_for(lambda: open_gate_ready.exists() and len(spares()) == num_hosts, 120, "the launch's spare group", proc)
    return spares()


def leaves_spares(run_dir, *args: str, num_hosts: int = 2) -> dict[str, Any]:
    """A gated launch on the shared instance whose spares exist before it ends: its `spares_left` event."""
    before = host_actors()
    proc = start("--hosts", str(num_hosts), *GATED, "--set", f"gates={GATE}", *EXAMPLE_RUN, *args,
                 "--run-dir", str(run_dir))
    made = spares_made(run_dir, before, proc, num_hosts)
    open_gate(run_dir, GATE, proc)
    (run_dir / f"go-{GATE}").write_text("")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    (left,) = events(run_dir, "spares_left")
    assert set(left["pids"]) == made and left["num_hosts"] == num_hosts
    return left


def test_a_launch_starts_on_the_spares_the_launch_before_it_left_and_computes_the_same(minimal_reference, tmp_path):
    left = leaves_spares(tmp_path / "first", "--standby-linger", "120")
    assert left["linger_s"] == 120 and all(alive(p) for p in left["pids"]), "they wait for the next launch"
    second = tmp_path / "second"
    # The same code (the entry's folder, shipped), without gates: examples/minimal.py's job.
    done = launch("--hosts", "2", *GATED, *EXAMPLE_RUN, "--standby-linger", "120", "--run-dir", str(second))
    assert done.returncode == 0, done.stdout + done.stderr
    (taken,) = events(second, "spares_taken_over")
    assert sorted(taken["pids"]) == sorted(left["pids"])
    assert sorted(host_pids(second, attempt=1)) == sorted(left["pids"]), "its first hosts are the left spares"
    assert trajectory(second) == trajectory(minimal_reference)
    assert trajectory(tmp_path / "first") == trajectory(minimal_reference)


def test_spares_a_launch_cannot_use_are_ended_and_it_starts_its_own(tmp_path):
    left = leaves_spares(tmp_path / "two", "--standby-linger", "120")
    done = launch("--hosts", "1", *MINIMAL, "--steps", "60", "--run-dir", str(tmp_path / "one"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert events(tmp_path / "one", "spares_taken_over") == []
    assert not set(host_pids(tmp_path / "one")) & set(left["pids"])
    wait_for(lambda: not any(alive(p) for p in left["pids"]), LEASE_BOUND_S, "the 2-host spares to be ended")


def test_spares_whose_driver_was_killed_end_with_their_lease(tmp_path):
    run_dir = tmp_path / "run"
    before = host_actors()
    proc = start("--hosts", "2", *GATED, "--set", f"gates={GATE}", *EXAMPLE_RUN, "--standby-linger", "120",
                 "--run-dir", str(run_dir), new_session=True)
    made = spares_made(run_dir, before, proc, 2)
    hosts = set(host_pids(run_dir))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    wait_for(lambda: not any(alive(p) for p in made | hosts), LEASE_BOUND_S,
             "the killed driver's spares to end with their lease, and its hosts with it")
