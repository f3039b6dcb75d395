"""The memory tier on real processes: every save held in host memory by a keeper per node, a
replica on another node, Orbax behind it. Each restore says which tier it read."""

import os
import pathlib
import signal

import psutil
import pytest
import ray
from jaxlaunch.launcher.records.runs import RunDir
from jaxlaunch.workers.checkpoints.durable import read_arrays
from ray.cluster_utils import Cluster

from jaxlaunch.contract.tiers import launch_dir
from tests.integration.helpers import (
    GATED,
    GATED_CLASSIFIER,
    GATED_GRAIN,
    GRAIN,
    MINIMAL,
    SHARED_RAY,
    alive,
    attempts,
    committed_steps,
    events,
    host_pids,
    last_step,
    launch,
    open_gate,
    ray_processes_left,
    read_jsonl,
    start,
    summary,
    trajectory,
    wait_for,
)
from tests.unit.test_tiers import flip_a_bit

pytestmark = pytest.mark.standby  # restores from memory land on the spares beside their node's keeper

MEMORY = ("--memory-tier", "--save-every", "1", "--persist-every", "50", "--steps", "200")
HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
          "health_check_failure_threshold": 3}


def restores(run_dir):
    return events(run_dir, "restored")


def told(run_dir, restored):
    """A failed assertion's account of a restore: its tier and step, the newest durable step and
    every fallback said (a whole event is cut short in pytest's report)."""
    return (f"restored {restored['tier']} step {restored['step']}, durable steps {committed_steps(run_dir)}, "
            f"fallbacks {[e['reason'] for e in events(run_dir, 'memory_fallback')]}, "
            f"refused {[(e['step'], e['reason'][:120]) for e in events(run_dir, 'memory_save_refused')]}")


@pytest.mark.soak
def test_a_host_killed_with_its_hand_off_in_flight_resumes_from_memory_bit_for_bit(minimal_reference, tmp_path,
                                                                                    soak_round):
    """The kill lands right after the host sent its part of step 75 to the keeper: the keeper may hold
    it or not; either way the restore is whole, from memory (never the durable step 50), and the
    losses are the uninterrupted run's (`--soak 5` runs it 5 times in a row)."""
    run_dir = tmp_path / "run"
    result = launch("--hosts", "2", *MINIMAL, *MEMORY, "--inject", "kill@step=75,host=1", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    [injected] = [line for line in RunDir(run_dir).injections() if line["kind"] == "kill"]
    assert injected["saving_in_progress"], "the hand-off of step 75 was in flight when the host died"
    (restored,) = restores(run_dir)
    assert restored["tier"] == "memory" and restored["durable_bytes_read"] == 0, restored
    assert 74 <= restored["step"] <= 75, restored
    assert trajectory(run_dir) == trajectory(minimal_reference), "bit for bit"


def keeper_pids(run_dir):
    pids = []
    for pid in ray_processes_left(run_dir):
        try:
            if "Keeper" in " ".join(psutil.Process(pid).cmdline()):
                pids.append(pid)
        except psutil.Error:
            continue
    return pids



@pytest.mark.own_ray  # finds the keeper among the embedded instance's processes
@pytest.mark.soak
def test_a_dead_keeper_is_restarted_and_the_tier_goes_on(minimal_reference, tmp_path, soak_round):
    """SIGKILL of the keeper (its node up) at step 30, then of a host before any other save: Ray
    restarts the keeper, the driver says so once, and the new keeper, which took over the part files
    the dead one held (one node: no replica anywhere else, no durable step before 50), serves the
    restore. The tier goes on: a host killed at step 40 restores a step the new keeper took."""
    run_dir = tmp_path / "run"
    proc = start("--hosts", "2", *GATED, "--set", "gates=30-40", *MEMORY, "--run-dir", str(run_dir))
    try:
        open_gate(run_dir, 30, proc)
        (keeper,) = keeper_pids(run_dir)
        os.kill(keeper, signal.SIGKILL)
        wait_for(lambda: events(run_dir, "keeper_restarted"), 120, "the keeper's restart", proc)
        os.kill(host_pids(run_dir, 1)[1], signal.SIGKILL)
        (run_dir / "go-30").write_text("")
        open_gate(run_dir, 40, proc)
        os.kill(host_pids(run_dir, 2)[1], signal.SIGKILL)
        (run_dir / "go-40").write_text("")
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    (restarted,) = events(run_dir, "keeper_restarted")
    assert restarted["old_pid"] == keeper and restarted["pid"] not in (None, keeper), restarted
    assert "took over the part files it left whole" in " ".join(out.split() + err.split()), "said on the console"
    refused = events(run_dir, "memory_save_refused")
    assert all(len(e["reason"]) < 300 for e in refused), refused
    taken_over, went_on = restores(run_dir)
    assert taken_over["tier"] == "memory" and taken_over["durable_bytes_read"] == 0, told(run_dir, taken_over)
    assert 29 <= taken_over["step"] <= 30, "what the dead keeper held: no save came after it died"
    assert went_on["tier"] == "memory" and 39 <= went_on["step"] <= 40, told(run_dir, went_on)
    assert not events(run_dir, "memory_fallback")
    assert trajectory(run_dir) == trajectory(minimal_reference), "bit for bit"


def test_a_memory_budget_too_small_warns_and_trains_durable_only(minimal_reference, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("checkpoint: {memory_budget_mb: 0.001}\n")
    run_dir = tmp_path / "run"
    result = launch("--config", str(config), "--hosts", "2", *MINIMAL, "--memory-tier", "--save-every", "20",
                    "--steps", "200", "--inject", "kill@step=75,host=1", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    off = events(run_dir, "memory_tier_off")
    assert off and "budget" in off[0]["reason"], off
    assert [r["tier"] for r in restores(run_dir)] == ["durable"]
    assert restores(run_dir)[0]["step"] in (40, 60), "today's behaviour: a durable save every --save-every steps"
    assert trajectory(run_dir) == trajectory(minimal_reference)


@pytest.mark.own_ray  # the embedded instance ends with its driver
def test_a_sigkilled_driver_leaves_no_process_and_resumes_from_the_newest_durable_step(minimal_reference, tmp_path):
    """SIGKILL to the launcher's whole process group (the driver cannot clean up): every process of its
    embedded Ray instance and every host ends with it; the resume reads the newest durable step."""
    run_dir = tmp_path / "run"
    proc = start("--hosts", "2", *MINIMAL, *MEMORY[:-2], "--persist-every", "20", "--steps", "200",
                 "--run-dir", str(run_dir), new_session=True)
    wait_for(lambda: last_step(run_dir) >= 45 and 40 in committed_steps(run_dir), 300, "step 45", proc)
    assert ray_processes_left(run_dir), "the embedded Ray is running"
    hosts = host_pids(run_dir)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert launch_dirs(run_dir), "the killed driver's keepers left their part files"
    wait_for(lambda: not ray_processes_left(run_dir) and not any(alive(p) for p in hosts), 60,
             "every process of the embedded Ray and every host to end with its driver")
    newest = committed_steps(run_dir)[-1]
    with SHARED_RAY.for_these_launches():
        resumed = launch("--resume", "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    (restored,) = restores(run_dir)
    assert restored["tier"] == "durable" and restored["step"] == newest and restored["durable_bytes_read"] > 0
    assert trajectory(run_dir) == trajectory(minimal_reference)
    assert not launch_dirs(run_dir), "the next launch deleted the part files the killed driver's keepers left"


@pytest.mark.soak
def test_a_job_that_gives_up_first_writes_its_newest_intact_memory_step_durably_running_no_user_code(
        classifier_reference, tmp_path, soak_round):
    """The classifier (its hidden layer split over the mesh's `model` axis across the 2 hosts) fails
    for good at step 75 (no restart budget): before it fails, the driver's Persisting state runs the
    launcher's own host program, which writes a memory step with Orbax into the shardings that saved
    it, agreed from the parts alone; the entry is called only by the attempt's hosts. A bit of host
    1's part of step 75, memory's newest, flipped while it was held (its only copy on this one node):
    the persist passes it over, says why, and writes step 74. The resume reads that step like any
    durable one, bit for bit."""
    run_dir = tmp_path / "run"
    proc = start("--hosts", "2", *GATED_CLASSIFIER, "--set", "gates=75", *MEMORY, "--max-restarts", "0",
                 "--run-dir", str(run_dir))
    try:
        open_gate(run_dir, 75, proc)
        newest = [f"*/held/75-{rank}-primary.json" for rank in (0, 1)]
        wait_for(lambda: all(any(d.glob(n)) for d in launch_dirs(run_dir) for n in newest), 300,
                 "both parts of step 75 held", proc)
        (held,) = [p for d in launch_dirs(run_dir) for p in d.glob("*/held/75-1-primary.part")]
        flip_a_bit(held)
        os.kill(host_pids(run_dir, 1)[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err
    ending = ("failure", "attempt_ended", "persisting_memory", "memory_persisted", "job_failed")
    assert [e["event"] for e in events(run_dir) if e["event"] in ending] == list(ending), "the persist is its own state"
    (persisting,) = events(run_dir, "persisting_memory")
    (persisted,) = events(run_dir, "memory_persisted")
    assert persisted["persisted"] and persisted["durable_step"] == 50 and persisted["step"] == 74, persisted
    assert persisted["newest_step"] == 75 and len(persisted["passed_over"]) == 1, persisted
    assert persisted["passed_over"][0].startswith("memory step 75 did not read back on host(s) [1]: ")
    assert "the primary of rank 1's part of step 75" in persisted["passed_over"][0]
    assert "changed since it was held" in persisted["passed_over"][0]
    assert (persisting["step"], persisting["durable_step"], persisting["num_hosts"]) == (75, 50, 2)
    assert persisted["bytes"] == RunDir(run_dir).checkpoint_bytes(persisted["step"]) > 0
    assert committed_steps(run_dir)[-1] == persisted["step"], "the memory step is the newest committed durable step"
    said = " ".join(err.split())
    assert "memory step 74 written to durable storage" in said and "memory step 75 did not read back" in said
    (job_failed,) = events(run_dir, "job_failed")
    assert job_failed["reason"].startswith("restart budget"), "the failure stays the job's reason"
    # No user code in the persist: the entry ran in the attempt's 2 host processes, and nowhere else.
    calls = [line.split() for line in (run_dir / "entry-calls").read_text().splitlines()]
    assert sorted(int(pid) for _, _, pid in calls) == sorted(host_pids(run_dir, 1)), calls
    assert (run_dir / "hosts" / "persist-1-rank-0.log").exists()
    # What a durable save of the step would have written: the same arrays and the same metadata.
    run = RunDir(run_dir)
    assert run.checkpoint_meta(persisted["step"]).keys() == run.checkpoint_meta(50).keys()
    assert run.checkpoint_meta(persisted["step"])["topology"] == run.checkpoint_meta(50)["topology"]
    assert read_arrays(run_dir / "checkpoints" / str(persisted["step"])).keys() == read_arrays(
        run_dir / "checkpoints" / "50").keys()
    (run_dir / "go-75").write_text("")  # the resume passes the gate
    resumed = launch("--resume", "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    restored = restores(run_dir)[-1]
    assert restored["tier"] == "durable" and restored["step"] == persisted["step"], restored
    assert restored["sharding"] == "P(None, 'model')", restored
    assert trajectory(run_dir) == trajectory(classifier_reference), "bit for bit, nothing recomputed past step 50"


@pytest.fixture
def cluster():
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": HEALTH})
    yield made
    ray.shutdown()
    made.shutdown()


def cluster_config(tmp_path, cluster):
    config = tmp_path / "cluster.yaml"
    config.write_text(f'cluster: {{address: "{cluster.address}", placement_strategy: STRICT_SPREAD, '
                      "resources_per_host: {CPU: 1}}\n")
    return config


def node_of_rank(run_dir, rank):
    return events(run_dir, "attempt_started")[0]["nodes"][rank]


GATE = 35


def run_and_remove(cluster, tmp_path, hosts, spare, lose, *args):
    """A run of `hosts` hosts on as many nodes (and `spare` more), with nodes of ranks `lose` removed
    without warning while the job waits at step 35: past the durable step 20, before the durable 40.
    (Removed at a step reached by polling, the loss could land at step 40, whose durable save may
    commit before its memory copy: then the durable tier serves, rightly, and the test meant memory.)"""
    nodes = [cluster.add_node(num_cpus=1) for _ in range(hosts + spare)]
    cluster.wait_for_nodes()
    run_dir = tmp_path / "run"
    proc = start("--config", str(cluster_config(tmp_path, cluster)), "--hosts", str(hosts), *GATED, "--set",
                 f"gates={GATE}", *MEMORY, "--persist-every", "20", "--steps", "60", *args, "--run-dir", str(run_dir))
    try:
        open_gate(run_dir, GATE, proc)
        wait_for(lambda: 20 in committed_steps(run_dir), 300, "the durable step 20", proc)
        for rank in lose:
            node = next(n for n in nodes if n.node_id == node_of_rank(run_dir, rank))
            cluster.remove_node(node, allow_graceful=False)
        # Opened once the driver has seen the loss, so that the next attempt passes it (no step
        # after 35 can commit before: it needs the lost host).
        wait_for(lambda: events(run_dir, "failure"), 300, "the loss to be seen", proc)
        (run_dir / f"go-{GATE}").write_text("")
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    return run_dir


@pytest.mark.soak
def test_a_removed_nodes_shards_come_from_their_replica(cluster, tmp_path, soak_round):
    run_dir = run_and_remove(cluster, tmp_path, 2, 0, [1], "--min-hosts", "1")
    (restored,) = restores(run_dir)
    assert attempts(run_dir)[-1]["num_hosts"] == 1
    assert restored["tier"] == "memory" and restored["replicas"] == [1], told(run_dir, restored)
    assert restored["durable_bytes_read"] == 0
    assert restored["step"] > 30


@pytest.mark.soak
def test_four_hosts_shrink_to_two_from_memory(cluster, tmp_path, soak_round):
    run_dir = run_and_remove(cluster, tmp_path, 4, 0, [1], "--min-hosts", "2")
    (restored,) = restores(run_dir)
    assert [a["num_hosts"] for a in attempts(run_dir)] == [4, 2]
    assert restored["tier"] == "memory" and restored["durable_bytes_read"] == 0, told(run_dir, restored)
    # The lost rank's part comes from its replica; another rank's may too, when its replica is on the
    # node a new host landed on (a host reads the copy on its own node first).
    assert 1 in restored["replicas"] and restored["saved_topology"]["num_hosts"] == 4
    # Each host reads only the boxes of held shards its new shards overlap, not whole parts.
    assert 0 < restored["memory_bytes_read"] <= 1.5 * restored["memory_part_bytes"], restored
    assert restored["step"] > 30


@pytest.mark.soak
def test_a_shard_lost_with_its_replica_falls_back_to_durable_with_an_event(cluster, tmp_path, soak_round):
    run_dir = run_and_remove(cluster, tmp_path, 2, 2, [0, 1])
    (restored,) = restores(run_dir)
    assert restored["tier"] == "durable" and restored["durable_bytes_read"] > 0, restored
    (fallback,) = events(run_dir, "memory_fallback")
    assert "gone with their nodes" in fallback["reason"] and fallback["durable_step"] == restored["step"], fallback


def test_a_grain_pipeline_resumes_its_position_exactly_after_a_kill(grain_reference, tmp_path):
    killed = tmp_path / "killed"
    second = launch(*GRAIN, "--hosts", "2", "--steps", "60", "--memory-tier", "--save-every", "1",
                    "--persist-every", "25", "--inject", "kill@step=37,host=0", "--run-dir", str(killed))
    assert second.returncode == 0, second.stdout + second.stderr
    (restored,) = restores(killed)
    assert restored["tier"] == "memory" and 36 <= restored["step"] <= 37, restored
    assert trajectory(killed) == trajectory(grain_reference), "the same batches, bit for bit"
    assert summary(killed)["returned"] == summary(grain_reference)["returned"], "the best-loss tracker came back too"


@pytest.mark.soak
def test_a_give_up_persisted_on_fewer_hosts_keeps_every_host_s_iterator_position(cluster, grain_reference, tmp_path,
                                                                                   soak_round):
    """A Grain job with per-host iterators, on 2 nodes, loses the node of host 1 at step 35 (durable
    step 20) and cannot go on (`--min-hosts 2`): the persist runs on the one host left and writes
    memory step 35 with both hosts' iterator positions (host 1's part from its replica), where it
    refused to, and lost 15 steps. A resume on 2 nodes sees the uninterrupted run's batches."""
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    run_dir, config = tmp_path / "run", cluster_config(tmp_path, cluster)
    proc = start("--config", str(config), "--hosts", "2", "--min-hosts", "2", "--capacity-timeout", "5",
                 *GATED_GRAIN, "--set", f"gates={GATE}", *MEMORY, "--persist-every", "20", "--steps", "60",
                 "--max-restarts", "1", "--run-dir", str(run_dir))
    try:
        open_gate(run_dir, GATE, proc)
        copies = [f"*/held/{GATE}-{rank}-{role}.json" for rank in (0, 1) for role in ("primary", "replica")]
        wait_for(lambda: 20 in committed_steps(run_dir) and all(
            any(p for d in launch_dirs(run_dir) for p in d.glob(c)) for c in copies), 300,
            f"step {GATE} held whole, with its replicas", proc)
        cluster.remove_node(next(n for n in nodes if n.node_id == node_of_rank(run_dir, 1)), allow_graceful=False)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err
    (persisting,) = events(run_dir, "persisting_memory")
    (persisted,) = events(run_dir, "memory_persisted")
    assert (persisting["num_hosts"], persisted["step"], persisted["durable_step"]) == (1, GATE, 20), persisted
    assert persisted["persisted"], persisted
    assert [sorted(e) for e in RunDir(run_dir).checkpoint_meta(GATE)["extra"]] == [["best", "data"]] * 2, \
        "both saved hosts' iterator positions"
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    (run_dir / f"go-{GATE}").write_text("")  # the resume passes the gate
    resumed = launch("--resume", "--config", str(config), "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    restored = restores(run_dir)[-1]
    assert (restored["tier"], restored["step"]) == ("durable", GATE), restored
    assert trajectory(run_dir) == trajectory(grain_reference), "each host's own batches, bit for bit"


def launch_dirs(run_dir: pathlib.Path) -> set[pathlib.Path]:
    """The memory tier's folders in this machine's shared memory of the run's launches (a launch's
    folder is named after its driver's process; other launches on the machine are not this test's)."""
    drivers = {str(e["pid"]) for e in events(run_dir, "launch")}
    return {d for d in launch_dir("any").parent.glob("jaxlaunch-*") if d.name.split("-")[1] in drivers}


@pytest.mark.soak
def test_a_host_killed_inside_its_hand_off_loses_nothing_and_leaves_no_file(cluster, minimal_reference, tmp_path,
                                                                           soak_round):
    """Two nodes, so each part's replica streams to the other node's keeper. Host 1 is SIGKILLed inside
    its hand-off of step 75 (its keeper asked to hold the part, no answer yet): whether the keeper got
    the part and its replica or not, the restore is whole, from memory, step 74 or 75 (nothing committed
    is lost), the losses are the uninterrupted run's, and no part file outlives the launch
    (`--soak 5` runs it 5 times in a row)."""
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    run_dir = tmp_path / "run"
    proc = start("--config", str(cluster_config(tmp_path, cluster)), "--hosts", "2", *MINIMAL, *MEMORY,
                 "--inject", "kill_in_handoff@step=75,host=1", "--run-dir", str(run_dir))
    try:
        wait_for(lambda: any(list(d.glob("*/held/*.part")) for d in launch_dirs(run_dir)), 300,
                 "part files in shared memory", proc)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    [injected] = [line for line in RunDir(run_dir).injections() if line["kind"] == "kill_in_handoff"]
    assert injected["step"] == 75 and injected["saving_in_progress"], injected
    (restored,) = restores(run_dir)
    assert restored["tier"] == "memory" and restored["durable_bytes_read"] == 0, restored
    assert 74 <= restored["step"] <= 75, restored
    assert not events(run_dir, "memory_fallback") and not events(run_dir, "memory_save_refused")
    assert trajectory(run_dir) == trajectory(minimal_reference), "bit for bit"
    assert not launch_dirs(run_dir), "every part file went with the launch"
    saves = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "memory_copies" in r]
    assert len(saves) > 100 and all(r["memory_copies_on_node"] == 1 and r["memory_copies"] == 3 for r in saves), \
        "each save: the host's write, the replica's send and its receive, nothing more"
