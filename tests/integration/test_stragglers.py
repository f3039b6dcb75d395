"""A slow host, in real processes: the driver names it from the hosts' busy time per step, and under
`--straggler-action replace` leaves its node for a spare one at a step every host saved."""

import pytest
import ray

from tests.integration.helpers import (
    EXAMPLE_RUN,
    MINIMAL,
    assert_no_host_left,
    attempts,
    events,
    launch,
    read_jsonl,
    summary,
    trajectory,
)

pytestmark = pytest.mark.standby  # a straggler's replacement as users get it, with the warm standby

SLOW_FROM_STEP = 40
DETECT_WITHIN_STEPS = 30


def test_a_host_three_times_as_busy_is_named_within_30_steps(tmp_path):
    run_dir = tmp_path / "run"
    result = launch("--hosts", "4", *MINIMAL, "--steps", "120", "--save-every", "50", "--run-dir", str(run_dir),
                    "--inject", f"slow@step={SLOW_FROM_STEP},host=1,factor=3")
    assert result.returncode == 0, result.stdout + result.stderr
    stragglers = events(run_dir, "straggler")
    assert [s["host"] for s in stragglers] == [1], stragglers
    [straggler] = stragglers
    # Named once its slow steps are most of the newest 20 (the window may begin before the slowdown).
    assert SLOW_FROM_STEP < straggler["last_step"] <= SLOW_FROM_STEP + DETECT_WITHIN_STEPS, straggler
    [started] = events(run_dir, "attempt_started")
    assert straggler["node"] == started["nodes"][1] and straggler["factor"] >= 1.3
    assert "host 1 (node" in result.stdout and "is slow" in result.stdout, "the user is told on the terminal"
    [per_host] = events(run_dir, "host_busy")
    assert per_host["busy_s"][1] == max(per_host["busy_s"]), per_host
    records = read_jsonl(run_dir / "metrics.jsonl")
    timed = [r for r in records if r.get("step_time_s") is not None]
    assert len(timed) >= 115 and all(abs(r["busy_s"] + r["blocked_s"] - r["step_time_s"]) < 1e-9 for r in timed)
    print(f"straggler named at step {straggler['last_step']} (slow from {SLOW_FROM_STEP}), "
          f"factor {straggler['factor']:.2f}, busy {per_host['busy_s']}")


@pytest.fixture
def three_nodes():
    """A head without CPUs and three 1-CPU nodes: two hosts and a spare node."""
    from tests.integration.test_multinode import nodes

    cluster, workers = nodes(head_cpus=0, workers=3)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_straggler_s_node_is_replaced_by_a_spare_at_a_step_every_host_saved(three_nodes, minimal_reference,
                                                                              tmp_path):
    """2 hosts of examples/minimal.py, one host per node (STRICT_SPREAD), a third node spare; host 1
    three times as busy from step 40. Two hosts, not four: six Ray nodes were too heavy for the shared
    2-core machine this was written on. The straggler factor is 2, not the default 1.3: this test is
    about the replacement, and on a 2-core CI machine running three Ray nodes the default once named a
    second host; how soon the default names a slow host is the 4-host test's subject."""
    config = tmp_path / "cluster.yaml"
    config.write_text(f'cluster: {{address: "{three_nodes.address}", placement_strategy: STRICT_SPREAD, '
                      "resources_per_host: {CPU: 1}}\nfault: {straggler_factor: 2}\n")
    run_dir = tmp_path / "run"
    result = launch("--config", str(config), "--hosts", "2", *MINIMAL, *EXAMPLE_RUN, "--run-dir", str(run_dir),
                    "--straggler-action", "replace", "--inject", f"slow@step={SLOW_FROM_STEP},host=1,factor=3")
    assert result.returncode == 0, result.stdout + result.stderr
    [straggler] = events(run_dir, "straggler")
    # Named, and before the end: the 30-step bound is the 4-host test's above; here one-CPU Ray nodes
    # share 2 cores with the replicas' streams, and a clean-clone run named it at step 72.
    assert straggler["host"] == 1 and straggler["last_step"] <= SLOW_FROM_STEP + 2 * DETECT_WITHIN_STEPS, straggler
    [replaced] = events(run_dir, "host_replacement")
    assert (replaced["host"], replaced["node"], replaced["avoided"]) == (1, straggler["node"], True), replaced
    assert "replacing host 1" in result.stdout, "the user is told on the terminal"
    first, second = events(run_dir, "attempt_started")
    assert straggler["node"] == first["nodes"][1] and straggler["node"] not in second["nodes"], (first, second)
    table = attempts(run_dir)
    assert [(a["num_hosts"], a["cause"]) for a in table] == [(2, "replace"), (2, "finished")], table
    assert summary(run_dir)["restarts_by_cause"] == {"replace": 1}, "a replacement, no failure"
    stopped_at = table[0]["last_step"]
    assert table[1]["restored_step"] == stopped_at, "restored the step every host stopped and saved at"
    steps_of: dict[int, list[int]] = {a["attempt"]: [] for a in table}
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        steps_of[record["attempt"]].append(record["step"])
    assert min(steps_of[table[1]["attempt"]]) == stopped_at + 1, "no step recomputed"
    ours, reference = trajectory(run_dir), trajectory(minimal_reference)
    assert sorted(ours) == list(range(1, 201))
    assert ours[200] == reference[200], (ours[200], reference[200])
    assert_no_host_left(run_dir)
    print(f"straggler named at step {straggler['last_step']}, stopped and saved at {stopped_at}, "
          f"final loss {ours[200]!r} = uninterrupted {reference[200]!r}")
