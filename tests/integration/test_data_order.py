"""The data a job sees across restarts and host-count changes (examples/elastic_grain.py): an
ElasticIterator pipeline sees, step by step, the global batches of an uninterrupted run (compared by
their fingerprints, `data_hash` in metrics.jsonl) through a lost node, its return and a --resume on
another host count; a per-host pipeline with a `filter` is refused on such a --resume, and an elastic
shrink goes on and records that its data order changed."""

import pathlib

import pytest

from tests.integration.helpers import (
    EXAMPLES,
    attempts,
    events,
    last_step,
    launch,
    read_jsonl,
    start,
    summary,
    tree_snapshot,
    wait_for,
)
from tests.integration.test_multinode import elastic_config

ELASTIC_GRAIN = ("--entry", f"{EXAMPLES / 'elastic_grain.py'}:main")
PER_HOST = (*ELASTIC_GRAIN, "--elastic", "false")
STEPS = 600
"""Steps take milliseconds: enough that the 1-host group still trains when the node comes back."""


def hashes(run_dir: pathlib.Path) -> list[tuple[int, int]]:
    """(step, data_hash) of every record, recomputed steps included."""
    return [(r["step"], r["data_hash"]) for r in read_jsonl(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, int]:
    """step -> data_hash of the elastic pipeline, uninterrupted on 2 hosts."""
    run_dir = tmp_path_factory.mktemp("elastic-reference") / "run"
    result = launch("--hosts", "2", *ELASTIC_GRAIN, "--steps", str(STEPS), "--save-every", "100",
                    "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    reference = dict(hashes(run_dir))
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert len(set(reference.values())) == STEPS, "every step's batch differs from every other's"
    return reference


def lose_a_node(cluster, worker, run_dir: pathlib.Path, proc, come_back: bool) -> tuple[str, str]:
    """Removes `worker` once step 12 is reported; after the restart on 1 host, adds a node back if
    `come_back`. Returns the launcher's output once it ends."""
    try:
        wait_for(lambda: last_step(run_dir) >= 12, 240, "step 12", proc)
        cluster.remove_node(worker, allow_graceful=False)
        wait_for(lambda: any(e["num_hosts"] == 1 for e in events(run_dir, "attempt_started")), 120,
                 "a restart on 1 host", proc)
        if come_back:
            cluster.add_node(num_cpus=1)
        return proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_an_elastic_pipeline_sees_the_uninterrupted_batches_through_a_lost_node_and_its_return(
        uninterrupted, two_nodes, tmp_path):
    cluster, workers = two_nodes
    run_dir = tmp_path / "run"
    proc = start("--config", elastic_config(tmp_path, cluster), "--hosts", "2", "--min-hosts", "1", *ELASTIC_GRAIN,
                 "--steps", str(STEPS), "--save-every", "5", "--run-dir", str(run_dir))
    out, err = lose_a_node(cluster, workers[1], run_dir, proc, come_back=True)
    assert proc.returncode == 0, out + err
    assert [(a["num_hosts"], a["cause"]) for a in attempts(run_dir)] == [
        (2, "node_lost"), (1, "resize"), (2, "finished")]
    seen = hashes(run_dir)
    assert sorted({s for s, _ in seen}) == list(range(1, STEPS + 1))
    wrong = [(s, h, uninterrupted[s]) for s, h in seen if h != uninterrupted[s]]
    assert not wrong, f"steps whose global batch differs from the uninterrupted run's: {wrong[:5]}"
    assert not events(run_dir, "data_order_changed") and not events(run_dir, "data_order_at_risk")


def test_an_elastic_pipeline_resumed_on_one_host_sees_the_uninterrupted_batches(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    first = launch("--hosts", "2", *ELASTIC_GRAIN, "--steps", "20", "--save-every", "10", "--run-dir", str(run_dir))
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = launch("--resume", "--hosts", "1", "--steps", "40", "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [a["num_hosts"] for a in attempts(run_dir)] == [2, 1]
    seen = dict(hashes(run_dir))
    assert sorted(seen) == list(range(1, 41))
    assert seen == {s: uninterrupted[s] for s in range(1, 41)}
    assert not events(run_dir, "data_order_changed")


def test_a_per_host_pipeline_resumed_on_another_host_count_is_refused_unless_allowed(tmp_path):
    run_dir = tmp_path / "run"
    first = launch("--hosts", "2", *PER_HOST, "--steps", "8", "--save-every", "4", "--run-dir", str(run_dir))
    assert first.returncode == 0, first.stdout + first.stderr
    before = tree_snapshot(run_dir)
    refused = launch("--resume", "--hosts", "1", "--steps", "12", "--run-dir", str(run_dir))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    line = refused.stderr.strip()
    assert "\n" not in line and "'data'" in line and "--allow-change data_order" in line, line
    assert tree_snapshot(run_dir) == before, "a refused resume writes nothing"
    allowed = launch("--resume", "--hosts", "1", "--steps", "12", "--allow-change", "data_order",
                     "--run-dir", str(run_dir))
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    changed = events(run_dir, "data_order_changed")
    assert [(e["keys"], e["old_hosts"], e["new_hosts"], e["step"]) for e in changed] == [(["data"], 2, 1, 8)]
    assert summary(run_dir)["data_order_changed"][0]["step"] == 8
    assert "the data order changed at step 8" in allowed.stdout


def test_a_per_host_pipeline_under_an_elastic_shrink_goes_on_and_says_so(two_nodes, tmp_path):
    cluster, workers = two_nodes
    run_dir = tmp_path / "run"
    proc = start("--config", elastic_config(tmp_path, cluster), "--hosts", "2", "--min-hosts", "1", *PER_HOST,
                 "--steps", "300", "--save-every", "5", "--run-dir", str(run_dir))
    out, err = lose_a_node(cluster, workers[1], run_dir, proc, come_back=False)
    assert proc.returncode == 0, out + err
    assert [(a["num_hosts"], a["cause"]) for a in attempts(run_dir)] == [(2, "node_lost"), (1, "finished")]
    warned = events(run_dir, "data_order_at_risk")
    assert len(warned) == 1 and "elastic_iterator" in warned[0]["message"], "one warning, naming the fix"
    # Told once on the terminal (a failed host's log tail, quoted after a failure, may hold its own line).
    assert out.count("warning: extra 'data' holds each host's own data position") == 1, out
    (changed,) = events(run_dir, "data_order_changed")
    restored = events(run_dir, "restored")[-1]
    assert (changed["keys"], changed["old_hosts"], changed["new_hosts"], changed["step"]) == (
        ["data"], 2, 1, restored["step"])
    assert f"the data order changed at step {restored['step']}" in out
    assert summary(run_dir)["data_order_changed"][0]["new_hosts"] == 1
