"""Elastic topology on a local multi-node Ray cluster (`ray.cluster_utils.Cluster`, one host slot
per node): a lost node shrinks the job to the topology that fits, and is classified as a lost node
every time; a node added back grows the job."""

import json
import signal
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from tests.integration.helpers import (
    DURABLE_ONLY,
    GATED,
    MINIMAL,
    assert_no_host_left,
    attempts,
    committed_steps,
    events,
    last_step,
    open_gate,
    read_jsonl,
    start,
    summary,
    trajectory,
    wait_for,
)

pytestmark = pytest.mark.standby  # the spares are given up and made again as the host count changes

FAST_HEALTH_CHECKS = {
    # A node killed without warning is declared dead within a few seconds.
    "health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3,
}


def nodes(head_cpus: int, workers: int):
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": head_cpus, "_system_config": FAST_HEALTH_CHECKS})
    added = [cluster.add_node(num_cpus=1) for _ in range(workers)]
    cluster.wait_for_nodes()
    return cluster, added


def elastic_config(tmp_path, cluster) -> str:
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f'cluster: {{address: "{cluster.address}", placement_strategy: STRICT_SPREAD, '
        "resources_per_host: {CPU: 1}}\n"
        "fault: {grow_check_interval_s: 1.0}\n"
    )
    return str(config)


@pytest.fixture
def four_nodes():
    cluster, workers = nodes(head_cpus=1, workers=3)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


GROW_GATE = 30
GROWN_STEPS = 100


def test_lost_node_shrinks_the_job_and_an_added_node_grows_it_back(four_nodes, minimal_reference, tmp_path):
    """4 hosts, one per node, held at step 30 (past the durable step 20): a node is removed; the job
    shrinks to 2 hosts, which stop at the gate again unless the driver has decided to grow before;
    a node is added, and once the driver has decided to grow, the gate opens: the 2 hosts save where
    they are told to stop and the job ends on 4 again. (The gate keeps the 2-host attempt alive until
    the node is back, whatever the speed of its steps, so the job needs no more steps than the
    scenario.)"""
    cluster, workers = four_nodes
    config = elastic_config(tmp_path, cluster)
    run_dir = tmp_path / "run"
    proc = start("--config", config, "--hosts", "4", "--min-hosts", "2", *GATED, "--set", f"gates={GROW_GATE}",
                 "--steps", str(GROWN_STEPS), "--save-every", "20", *DURABLE_ONLY, "--run-dir", str(run_dir))
    try:
        open_gate(run_dir, GROW_GATE, proc)
        wait_for(lambda: 20 in committed_steps(run_dir), 240, "step 20 committed", proc)  # saved asynchronously
        cluster.remove_node(workers[1], allow_graceful=False)
        wait_for(lambda: any(e["num_hosts"] == 2 for e in events(run_dir, "attempt_started")), 120,
                 "a restart on 2 hosts", proc)
        cluster.add_node(num_cpus=1)
        wait_for(lambda: events(run_dir, "grow"), 120, "the driver's decision to grow", proc)
        (run_dir / f"go-{GROW_GATE}").write_text("")
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    table = summary(run_dir)["attempt_table"]
    assert [(a["num_hosts"], a["cause"]) for a in table] == [(4, "node_lost"), (2, "resize"), (4, "finished")]
    assert summary(run_dir)["restarts_by_cause"] == {"node_lost": 1, "resize": 1}, "a lost node, then a growth"
    first_group = events(run_dir, "attempt_started")[0]
    assert len(set(first_group["nodes"])) == 4, "one host per node"
    shrink, grow = events(run_dir, "restored")
    assert shrink["saved_topology"]["num_hosts"] == 4 and shrink["mesh"] == {"data": 2, "model": 2}
    assert grow["saved_topology"]["num_hosts"] == 2 and grow["mesh"] == {"data": 4, "model": 2}
    assert grow["step"] == table[1]["last_step"], "the resize saved where it stopped: no step recomputed"
    # The global batch is fixed, so only float32 summation order differs from the 2-host run.
    ours, reference = trajectory(run_dir), trajectory(minimal_reference)
    assert sorted(ours) == list(range(1, GROWN_STEPS + 1))
    assert max(abs(ours[s] - reference[s]) for s in ours) < 1e-3
    assert_no_host_left(run_dir)


GROW_AFTER_S = 5.0
"""The elastic scenario adds a node back this long after the job shrank."""
ELASTIC_TIMES = "elastic-runs.jsonl"
ELASTIC_STEPS = 4000
"""examples/minimal.py's steps take milliseconds (a save every 5 steps most of it): enough of them
that the 1-host group still trains when the node comes back. 1,000 were enough while every save was
an Orbax save; with the memory tier's saves (milliseconds) the 1-host group finished in 4.9 s. The
job is stopped (SIGTERM) once the grown group has trained GROWN_STEPS_TRAINED, not left to train to the end."""
GROWN_STEPS_TRAINED = 20


@pytest.mark.soak
def test_a_resize_always_happens_and_recomputes_no_step(two_nodes, tmp_path, tmp_path_factory, soak_round):
    """The elastic scenario (`--soak N` runs it N times in a row): 2 hosts of examples/minimal.py, a
    node lost at step 12, the job shrinks to 1 host, a node added back 5 s later. Every run grows back
    to 2 hosts at a step both hosts saved, and trains no step twice across the resize. Fast steps are
    what matter: a stop step that a host computes while it trains on can be passed before it is known."""
    cluster, workers = two_nodes
    run_dir = tmp_path / "run"
    began = time.monotonic()
    proc = start("--config", elastic_config(tmp_path, cluster), "--hosts", "2", "--min-hosts", "1", *MINIMAL,
                 "--steps", str(ELASTIC_STEPS), "--save-every", "5", "--run-dir", str(run_dir))
    try:
        wait_for(lambda: last_step(run_dir) >= 12, 240, "step 12", proc)
        cluster.remove_node(workers[1], allow_graceful=False)
        wait_for(lambda: any(e["num_hosts"] == 1 for e in events(run_dir, "attempt_started")), 120,
                 "a restart on 1 host", proc)
        shrunk_at = time.monotonic()
        wait_for(lambda: time.monotonic() - shrunk_at >= GROW_AFTER_S, GROW_AFTER_S + 1, "the scenario's delay", proc)
        cluster.add_node(num_cpus=1)

        def grown_steps() -> int:  # those of the group grown back to 2 hosts
            grown = [e["attempt"] for e in events(run_dir, "attempt_started") if e["attempt"] > 1
                     and e["num_hosts"] == 2]
            return sum(r["attempt"] in grown for r in read_jsonl(run_dir / "metrics.jsonl"))
        wait_for(lambda: grown_steps() >= GROWN_STEPS_TRAINED, 240, "steps of the grown group", proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    seconds = time.monotonic() - began
    assert proc.returncode == 143, out + err
    table = attempts(run_dir)
    with (tmp_path_factory.getbasetemp() / ELASTIC_TIMES).open("a") as log:
        log.write(json.dumps({"run": soak_round, "seconds": round(seconds, 1),
                              "attempts": [(a["num_hosts"], a["cause"], a["last_step"]) for a in table]}) + "\n")
    assert [(a["num_hosts"], a["cause"]) for a in table] == [(2, "node_lost"), (1, "resize"), (2, "stopped")], table
    resized, grown = table[1], table[2]
    assert grown["restored_step"] == resized["last_step"] < ELASTIC_STEPS, "saved where it stopped, before the end"
    steps_of = {a["attempt"]: [] for a in table}
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        steps_of[record["attempt"]].append(record["step"])
    assert min(steps_of[grown["attempt"]]) == max(steps_of[resized["attempt"]]) + 1, "no step recomputed"
    assert sorted(trajectory(run_dir)) == list(range(1, grown["last_step"] + 1))
    assert_no_host_left(run_dir)


@pytest.fixture
def busy_cluster():
    """One node of 4 CPUs, 2 of them held by another job's actor."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)

    @ray.remote(num_cpus=2)
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote(), timeout=120)
    yield cluster, holder
    ray.shutdown()
    cluster.shutdown()


BUSY_GATE = 3
"""The job waits at this step on the free half of the cluster until it has decided to grow."""


def test_a_busy_cluster_is_judged_by_what_is_free_and_the_job_grows_when_it_frees(busy_cluster, tmp_path):
    cluster, holder = busy_cluster
    config = tmp_path / "cluster.yaml"
    config.write_text(f'cluster: {{address: "{cluster.address}", resources_per_host: {{CPU: 1}}, '
                      "placement_timeout_s: 10}\nfault: {grow_check_interval_s: 1.0}\n")
    run_dir = tmp_path / "run"
    proc = start("--config", str(config), "--hosts", "4", "--min-hosts", "2", *GATED, "--set", f"gates={BUSY_GATE}",
                 "--steps", str(GROWN_STEPS), "--save-every", "100", "--run-dir", str(run_dir))
    try:
        open_gate(run_dir, BUSY_GATE, proc)
        assert events(run_dir, "attempt_started")[0]["num_hosts"] == 2, "2 CPUs are free, not 4"
        assert events(run_dir, "launch")[0]["requested_hosts"] == 4, "the autoscaler was asked for 4 hosts"
        ray.kill(holder)  # the other job ends
        wait_for(lambda: events(run_dir, "grow"), 120, "the driver's decision to grow", proc)
        (run_dir / f"go-{BUSY_GATE}").write_text("")  # the 2 hosts go on, to save and stop where they are told
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    table = summary(run_dir)["attempt_table"]
    assert [(a["num_hosts"], a["cause"]) for a in table] == [(2, "resize"), (4, "finished")]
    assert sorted(trajectory(run_dir)) == list(range(1, GROWN_STEPS + 1))
