"""The memory tier's commit rule, its keeper's budget, and the reassembly of held shards into other
shardings, in one process without Ray."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxlaunch.workers import extras
from jaxlaunch.workers.keeper import Keeper, kept
from jaxlaunch.workers.memory import _assemble, part_nbytes, snapshot

from jaxlaunch.contract.tiers import Held, Role, committed_steps, replica_node, sources

P, R = Role.PRIMARY, Role.REPLICA


def part(step, rank, node, role=P, replicated=False, num_hosts=2):
    return Held(step, rank, num_hosts, node, role, 100, replicated)


def test_a_step_is_committed_only_when_every_part_and_its_replica_are_held():
    held = [part(5, 0, "a", replicated=True), part(5, 1, "b", replicated=True),
            part(6, 0, "a", replicated=True), part(6, 1, "b"),  # rank 1's replica not acknowledged yet
            part(7, 0, "a", replicated=True)]                   # rank 1 never handed over step 7
    assert committed_steps(held) == [5]


def test_a_lost_nodes_parts_count_through_their_replicas():
    # Node "b" is gone: only "a"'s keeper answers, with its own part and b's replica.
    held = [part(5, 0, "a", replicated=True), part(5, 1, "a", R)]
    assert committed_steps(held) == [5]
    assert [(s.rank, s.node, s.role) for s in sources(held, 5)] == [(0, "a", P), (1, "a", R)]


def test_a_part_whose_primary_and_replica_are_both_gone_leaves_the_step_uncommitted():
    held = [part(5, 0, "c", R)]  # rank 0's replica on c; rank 1's primary and replica are gone
    assert committed_steps(held) == []


def test_parts_of_attempts_of_different_sizes_never_make_a_whole_step():
    held = [part(5, 0, "a", replicated=True), part(5, 1, "b", replicated=True, num_hosts=4)]
    assert committed_steps(held) == []


def test_a_one_node_cluster_commits_its_primaries_alone_and_a_host_reads_its_own_copy():
    held = [part(3, 0, "a", replicated=True), part(3, 1, "a", replicated=True)]
    assert committed_steps(held) == [3]
    both = [part(3, 1, "a", replicated=True), part(3, 1, "b", R)]
    assert sources(both, 3, prefer={1: "b"})[0].node == "b"


def test_each_node_replicates_to_one_other_node():
    nodes = ["c", "a", "b"]
    assert [replica_node(n, nodes) for n in ("a", "b", "c")] == ["b", "c", "a"]
    assert replica_node("a", ["a"]) is None


def shards_part(step, rank, n):
    x = np.arange(n * 4, dtype=np.float32).reshape(n, 4) + step
    return {"shards": [{"path": "x", "index": ((rank * n // 2, (rank + 1) * n // 2), (0, 4)),
                        "data": x[rank * n // 2:(rank + 1) * n // 2]}], "arrays": {}, "plain": {}}


def test_the_keeper_keeps_the_newest_steps_within_its_budget():
    keeper = Keeper("a", budget_bytes=256, keep=2)  # 4 parts of 64 bytes: 2 whole steps, 2 in flight
    for step in (1, 2, 3, 4, 5):  # as a host sends them: the floor is its save before the previous one
        assert keeper.hold(step, 0, 1, shards_part(step, 0, 8), None, floor=step - 2) is None
    assert sorted({h["step"] for h in keeper.index()}) == [2, 3, 4, 5], "the oldest step made room"
    assert keeper.hold(1, 0, 1, shards_part(1, 0, 8), None) == "step 1 is older than the 2 steps held"
    held = keeper.fetch(3, 0, "primary")
    assert np.array_equal(held["shards"][0]["data"], np.arange(32, dtype=np.float32).reshape(8, 4)[:4] + 3)
    refused = keeper.hold(6, 0, 1, shards_part(6, 0, 16), None, floor=4)
    assert refused is not None and "over its budget" in refused, refused
    assert sorted({h["step"] for h in keeper.index()}) == [2, 3, 4, 5], "a refused part evicts nothing"
    assert keeper.reserve(0, 1, 10**15) is not None, "a reservation the node cannot hold is refused"
    keeper.forget_after(2)
    assert {h["step"] for h in keeper.index()} == {2}
    assert keeper.hold(3, 0, 1, shards_part(3, 0, 8), None, floor=2) is None, "the floor went back with the run"


def test_a_keeper_keeps_the_newest_steps_every_host_handed_over_and_all_newer_ones():
    # Every host handed over step 7 whole (the floor); 8 and 9 may still be replicating elsewhere, and
    # if the partner node dies now, step 7 is the newest whole one: no keeper may have dropped it.
    held = [part(7, 0, "a", replicated=True), part(7, 1, "a", R), part(8, 0, "a", replicated=True),
            part(9, 0, "a"), part(6, 0, "a", replicated=True), part(5, 0, "a", replicated=True)]
    assert kept(held, 2, floor=7) == {6, 7, 8, 9}, "step 8 settled here says nothing of the other keepers"
    assert kept(held + [part(10, 0, "a")], 2, floor=8) == {7, 8, 9, 10}
    assert kept(held, 2, floor=-1) == {5, 6, 7, 8, 9}, "before any floor: nothing is known whole"


def mesh_of(shape, names):
    return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def test_held_shards_reassemble_into_other_shardings_bit_for_bit():
    values = jax.random.normal(jax.random.key(0), (8, 6))
    saved = jax.device_put(values, NamedSharding(mesh_of((4,), ("data",)), PartitionSpec("data")))
    key = jax.device_put(jax.random.key(7), NamedSharding(mesh_of((4,), ("data",)), PartitionSpec()))
    whole = snapshot({"w": saved, "k": key, "n": 3})
    # Split this process's part as 4 hosts of one device each would have held it.
    parts = {r: {**whole, "shards": [s for s in whole["shards"] if s["path"] != "['w']" or
                                     s["index"][0][0] == 2 * r]} for r in range(4)}
    assert [len([s for s in p["shards"] if s["path"] == "['w']"]) for p in parts.values()] == [1, 1, 1, 1]
    new = mesh_of((2, 2), ("data", "model"))
    targets = {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(new, PartitionSpec("model",
                                                                                                        "data"))),
               "k": jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(new, PartitionSpec())),
               "n": 0}
    loaded = {0: parts[0]}
    restored = _assemble(targets, loaded, lambda: loaded.update(parts), own=0)
    assert len(loaded) == 4, "other parts are read only when the host's own does not cover its shards"
    assert np.array_equal(np.asarray(restored["w"]), np.asarray(values))
    assert restored["w"].sharding.spec == PartitionSpec("model", "data")
    assert np.array_equal(jax.random.key_data(restored["k"]), jax.random.key_data(key))
    assert restored["n"] == 3
    assert part_nbytes(targets) == 8 * 6 * 4 + 8


def test_a_part_that_covers_nothing_is_an_error_not_zeros():
    saved = jax.device_put(jnp.ones((4, 2)), NamedSharding(mesh_of((2,), ("data",)), PartitionSpec("data")))
    whole = snapshot({"w": saved})
    half = {**whole, "shards": whole["shards"][:1]}
    target = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32,
                                        sharding=NamedSharding(mesh_of((1,), ("data",)), PartitionSpec()))}
    with pytest.raises(RuntimeError, match="no copy of part of"):
        _assemble(target, {0: half}, lambda: None, own=0)


class Counter:
    def __init__(self):
        self.position = 0

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_extras_set_iterators_back_in_place_and_return_values():
    it = Counter()
    it.position = 7
    saved = extras.snapshot({"data": it, "best": {"loss": 0.5}})
    fresh = Counter()
    out = extras.restore({"data": fresh, "best": {"loss": float("inf")}, "new": 1}, saved)
    assert fresh.position == 7 and out["data"] is fresh
    assert out["best"] == {"loss": 0.5} and out["new"] == 1
    assert extras.of_rank([{"a": 0}, {"a": 1}], 3) == {"a": 1}


def grain_ctx(run_dir, steps):
    import dataclasses

    from jaxlaunch.workers.context import HostContext
    from jaxlaunch.workers.progress import HostProgress
    from jaxlaunch.workers.sharding import build_mesh

    from examples import grain_iter
    from jaxlaunch.contract.protocol import CheckpointConfig, DistributedConfig, EntryRef, HostSpec

    spec = HostSpec(entry=EntryRef("examples.grain_iter", "main"), config=dict(grain_iter.SETTINGS),
                    run_dir=str(run_dir), attempt=1, rank=0, num_hosts=1, coordinator_address="127.0.0.1:1",
                    mesh={"data": -1, "model": 2}, steps=steps, schedule_steps=steps, seed=0, platform="cpu",
                    distributed=DistributedConfig(), checkpoint=CheckpointConfig(save_every=3))
    (run_dir / "hosts").mkdir(parents=True, exist_ok=True)
    progress = HostProgress()
    ctx = HostContext(dataclasses.replace(spec), build_mesh(spec.mesh), progress)
    returned = grain_iter.main(ctx)
    records = list(progress.drain().records) + list(ctx._finish(returned).final_snapshot.records)
    return {r["step"]: r["loss"] for r in records}, returned


def test_a_durable_checkpoint_carries_the_grain_position_and_json_values(tmp_path):
    whole, best = grain_ctx(tmp_path / "whole", 10)
    first, _ = grain_ctx(tmp_path / "cut", 7)
    rest, resumed_best = grain_ctx(tmp_path / "cut", 10)
    assert min(rest) == 8, "resumed after the last step saved"
    assert {**first, **rest} == whole, "the same batches, bit for bit"
    assert resumed_best == best
