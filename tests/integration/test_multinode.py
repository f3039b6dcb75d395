"""Elastic topology on a local multi-node Ray cluster (`ray.cluster_utils.Cluster`, one host slot
per node): a lost node shrinks the job to the topology that fits; a node added back grows it."""

import pytest
import ray
from ray.cluster_utils import Cluster

from tests.integration.helpers import (
    SHORT_RUN,
    assert_no_host_left,
    events,
    last_step,
    start,
    summary,
    trajectory,
    wait_for,
)


@pytest.fixture
def four_nodes():
    # Fast health checks: a node killed without warning is declared dead within a few seconds.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "_system_config": {
            "health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
            "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3,
        }},
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_lost_node_shrinks_the_job_and_an_added_node_grows_it_back(four_nodes, reference_run, tmp_path):
    cluster, workers = four_nodes
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f'cluster: {{address: "{cluster.address}", placement_strategy: STRICT_SPREAD, '
        "resources_per_host: {CPU: 1}}\n"
        "fault: {grow_check_interval_s: 1.0}\n"
    )
    run_dir = tmp_path / "run"
    proc = start("--config", str(config), "--hosts", "4", "--min-hosts", "2", *SHORT_RUN, "--run-dir", str(run_dir))
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "10").is_dir() and last_step(run_dir) >= 12, 240,
                 "step 12 with step 10 committed", proc)
        cluster.remove_node(workers[1], allow_graceful=False)
        wait_for(lambda: any(e["num_hosts"] == 2 for e in events(run_dir, "attempt_started")), 120,
                 "a restart on 2 hosts", proc)
        cluster.add_node(num_cpus=1)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    table = summary(run_dir)["attempt_table"]
    assert [(a["num_hosts"], a["cause"]) for a in table] == [(4, "node_lost"), (2, "resize"), (4, "finished")]
    assert summary(run_dir)["restarts_by_cause"] == {"node_lost": 1}, "growing back is not a failure"
    first_group = events(run_dir, "group_started")[0]
    assert len(set(first_group["nodes"])) == 4, "one host per node"
    shrink, grow = events(run_dir, "restored")
    assert shrink["saved_topology"]["num_hosts"] == 4 and shrink["mesh"] == {"data": 2, "model": 2}
    assert shrink["embedding_shard_shape"] == [128, 32]
    assert grow["saved_topology"]["num_hosts"] == 2 and grow["mesh"] == {"data": 4, "model": 2}
    assert grow["embedding_shard_shape"] == [128, 16]
    assert grow["step"] == table[1]["last_step"], "the resize saved where it stopped: no step recomputed"
    # The global batch is fixed, so only float32 summation order differs from the 2-host run.
    ours, reference = trajectory(run_dir), trajectory(reference_run)
    assert ours.keys() == reference.keys()
    assert max(abs(ours[s] - reference[s]) for s in ours) < 1e-3
    assert_no_host_left(run_dir)
