"""The memory tier's commit rule, its keeper's budget, and the reassembly of held shards into other
shardings, in one process without Ray."""

import dataclasses
import os
import pathlib
import shutil
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxlaunch.workers import extras
from jaxlaunch.workers.checkpoints import keeper as keeper_module
from jaxlaunch.workers.checkpoints import replica_stream
from jaxlaunch.workers.checkpoints.keeper import Keeper, incoming_name
from jaxlaunch.workers.checkpoints.memory import PartReader, assemble, part_nbytes
from jaxlaunch.workers.checkpoints.part_file import PartFile, PartWriter, digest

from jaxlaunch.contract.tiers import Held, Role, kept, memory_serves, replica_node, sources, whole_steps

P, R = Role.PRIMARY, Role.REPLICA


def part(step, rank, node, role=P, replicated=False, num_hosts=2):
    return Held(step, rank, num_hosts, node, role, 100, replicated)


def test_a_step_is_committed_only_when_every_part_and_its_replica_are_held():
    held = [part(5, 0, "a", replicated=True), part(5, 1, "b", replicated=True),
            part(6, 0, "a", replicated=True), part(6, 1, "b"),  # rank 1's replica not acknowledged yet
            part(7, 0, "a", replicated=True)]                   # rank 1 never handed over step 7
    assert whole_steps(held) == [5]


def test_a_lost_nodes_parts_count_through_their_replicas():
    # Node "b" is gone: only "a"'s keeper answers, with its own part and b's replica.
    held = [part(5, 0, "a", replicated=True), part(5, 1, "a", R)]
    assert whole_steps(held) == [5]
    assert [(s.rank, s.node, s.role) for s in sources(held, 5)] == [(0, "a", P), (1, "a", R)]


def test_a_part_whose_primary_and_replica_are_both_gone_leaves_the_step_uncommitted():
    held = [part(5, 0, "c", R)]  # rank 0's replica on c; rank 1's primary and replica are gone
    assert whole_steps(held) == []


def test_parts_of_attempts_of_different_sizes_never_make_a_whole_step():
    held = [part(5, 0, "a", replicated=True), part(5, 1, "b", replicated=True, num_hosts=4)]
    assert whole_steps(held) == []


def test_a_one_node_cluster_commits_its_primaries_alone_and_a_host_reads_its_own_copy():
    held = [part(3, 0, "a", replicated=True), part(3, 1, "a", replicated=True)]
    assert whole_steps(held) == [3]
    both = [part(3, 1, "a", replicated=True), part(3, 1, "b", R)]
    assert sources(both, 3, prefer={1: "b"})[0].node == "b"


def test_each_node_replicates_to_one_other_node():
    nodes = ["c", "a", "b"]
    assert [replica_node(n, nodes) for n in ("a", "b", "c")] == ["b", "c", "a"]
    assert replica_node("a", ["a"]) is None


@pytest.fixture
def keeper():
    made = Keeper("a", budget_bytes=256, keep=2, launch_id=f"test-{uuid.uuid4().hex[:8]}")
    yield made
    made.close()
    assert not made.dir.parent.exists(), "close() leaves nothing in shared memory"


def put(keeper, step, nbytes, pid=None):
    """A host's part file of `nbytes` in the keeper's inbox, as a host of process `pid` wrote it."""
    name = incoming_name(step, 0, pid or os.getpid())
    (pathlib.Path(keeper.inbox()) / name).write_bytes(bytes(nbytes))
    return name


def mine(keeper):
    """The hosts' files in the keeper's inbox (not its spares)."""
    return [p for p in keeper.incoming.iterdir() if not p.name.startswith("spare-")]


def spare_bytes(keeper):
    return sum(p.stat().st_size for p in keeper.incoming.glob("spare-*"))


def held_files(keeper):
    """The part files it holds (each has its record beside it, `<part>.json`)."""
    return sorted(p.name for p in keeper.held_dir.iterdir() if p.suffix == ".part")


def test_the_keeper_keeps_the_newest_steps_within_its_budget(keeper):
    # 4 parts of 64 bytes: 2 whole steps, 2 in flight
    for step in range(6):
        assert keeper.hold(step, 0, 1, put(keeper, step, 64), None, floor=step - 2).refused is None
    assert sorted({h["step"] for h in keeper.index()}) == [2, 3, 4, 5], "the oldest step made room"
    assert held_files(keeper) == [f"{s}-0-primary.part" for s in (2, 3, 4, 5)], "dropped: not held"
    assert keeper.hold(1, 0, 1, put(keeper, 1, 64), None).refused == "step 1 is older than the 2 steps held"
    refused = keeper.hold(6, 0, 1, put(keeper, 6, 128), None, floor=4).refused
    assert "over its budget" in refused, refused
    assert sorted({h["step"] for h in keeper.index()}) == [2, 3, 4, 5], "a refused part evicts nothing"
    assert not mine(keeper), "a refused part's file is deleted"
    assert spare_bytes(keeper) == 0, "the budget is full: no dropped part's file is kept"
    assert keeper.reserve(0, 1, 10**15) is not None, "a reservation the node cannot hold is refused"
    keeper.forget_after(2, attempt=1)
    assert {h["step"] for h in keeper.index()} == {2} and held_files(keeper) == ["2-0-primary.part"]
    keeper.hold(3, 0, 1, put(keeper, 3, 64), None, floor=2, attempt=1)
    assert 0 < spare_bytes(keeper) <= 256 - 2 * 64, "dropped parts' files are kept for reuse, within the budget"
    keeper.forget_after(2, attempt=2)
    assert keeper.hold(3, 0, 1, put(keeper, 3, 64), None, floor=2, attempt=2).refused is None, \
        "the floor went back with the run"


def test_a_restarted_keeper_takes_over_what_its_earlier_process_held(monkeypatch):
    """Ray restarts a dead keeper on its node with the same arguments. The part files outlive the
    process: the new one holds the same steps, bit for bit, and goes on keeping by the floor. A part
    whose record was never written (killed between its two renames), a torn record and the replicas
    being received (their streams died with it) are deleted."""
    from jaxlaunch.workers.checkpoints import keeper as keeper_module

    monkeypatch.setattr(keeper_module, "_actor_id", lambda: "a1")  # the same actor: Ray's restart of it
    launch = f"test-{uuid.uuid4().hex[:8]}"
    dead = Keeper("a", budget_bytes=256, keep=2, launch_id=launch)
    for step in range(3):
        payload = bytes([step]) * 64
        name = incoming_name(step, 0, os.getpid())
        (pathlib.Path(dead.inbox()) / name).write_bytes(payload)
        assert dead.hold(step, 0, 1, name, None, floor=step - 2).refused is None
    held = sorted(dead.index(), key=lambda h: h["step"])
    files = {p.name: p.read_bytes() for p in dead.held_dir.glob("*.part")}
    (dead.held_dir / "3-0-primary.part").write_bytes(bytes(64))  # renamed in, its record not yet written
    (dead.held_dir / "9-0-primary.part").write_bytes(bytes(64))
    (dead.held_dir / "9-0-primary.json").write_text('{"step": 9, "ra')  # torn
    (dead.received / ".stream.part").write_bytes(bytes(8))
    again = Keeper("a", budget_bytes=256, keep=2, launch_id=launch)  # what dead's restart runs
    try:
        assert sorted(again.index(), key=lambda h: h["step"]) == held
        assert whole_steps([Held.from_dict(h) for h in again.index()]) == [2, 1, 0], "one node: committed alone"
        assert {p.name: p.read_bytes() for p in again.held_dir.glob("*.part")} == files, "the same bytes"
        assert sorted(p.name for p in again.held_dir.iterdir() if p.suffix == ".json") == \
            [f"{s}-0-primary.json" for s in range(3)]
        assert not list(again.received.iterdir())
        assert again.hold(3, 0, 1, put(again, 3, 64), None, floor=2).refused is None
        assert sorted({h["step"] for h in again.index()}) == [1, 2, 3], "keeps by the floor, as before"
        assert not (again.held_dir / "0-0-primary.json").exists(), "a dropped part's record goes with it"
    finally:
        again.close()
    assert not again.dir.parent.exists()


def test_a_keeper_started_in_place_of_a_stopped_one_takes_over_nothing(monkeypatch):
    """The driver stops a keeper that does not answer and starts another on its node: the stopped one
    may have missed the drop of steps the run left (restarting or stuck meanwhile), so its successor,
    a new actor rather than Ray's restart of it, deletes what it left."""
    from jaxlaunch.workers.checkpoints import keeper as keeper_module

    launch = f"test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(keeper_module, "_actor_id", lambda: "a1")
    stopped = Keeper("a", budget_bytes=256, keep=2, launch_id=launch)
    name = incoming_name(5, 0, os.getpid())
    (pathlib.Path(stopped.inbox()) / name).write_bytes(bytes(64))
    assert stopped.hold(5, 0, 1, name, None, floor=4).refused is None
    monkeypatch.setattr(keeper_module, "_actor_id", lambda: "a2")  # another actor, on the same node
    successor = Keeper("a", budget_bytes=256, keep=2, launch_id=launch)
    try:
        assert successor.index() == [] and not list(successor.held_dir.iterdir())
    finally:
        successor.close()


def test_a_part_of_a_history_the_run_left_is_never_held_whenever_it_arrives(monkeypatch):
    """Attempt 1 saved step 26 and died; attempt 2 restored step 20, and its keepers dropped the
    steps after it. A replica of step 26 still streaming then, or a dead host's hand-off that Ray
    delivers late, arrives after the drop: held, it would make step 26 whole again, and a later
    restore would read attempt 1's step as this run's. Refused, also by Ray's restart of the keeper;
    attempt 2's own saves past step 20 are held."""
    from jaxlaunch.workers.checkpoints import keeper as keeper_module

    monkeypatch.setattr(keeper_module, "_actor_id", lambda: "b1")
    launch = f"test-{uuid.uuid4().hex[:8]}"
    keeper = Keeper("b", budget_bytes=4096, keep=2, launch_id=launch)

    def late_replica(on, step, attempt):
        name = f"{step}-1-{uuid.uuid4().hex}.part"
        (on.received / name).write_bytes(bytes(64))  # what the stream wrote
        sent = Held(step, 1, 2, "a", P, 64, replicated=False, attempt=attempt)
        return on.hold_replica(sent.to_dict(), name, floor=step - 2), on.received / name

    assert keeper.hold(20, 0, 2, put(keeper, 20, 64), None, floor=18, attempt=1).refused is None
    keeper.forget_after(20, attempt=2)
    refused, streamed = late_replica(keeper, 26, attempt=1)
    assert refused == "step 26 of attempt 1 is of a history the run left: attempt 2 went on from step 20"
    assert not streamed.exists(), "its file is deleted"
    assert "history the run left" in keeper.hold(26, 0, 2, put(keeper, 26, 64), None, floor=20, attempt=1).refused
    assert keeper.hold(26, 0, 2, put(keeper, 26, 64), None, floor=20, attempt=2).refused is None
    assert late_replica(keeper, 26, attempt=2)[0] is None, "attempt 2's own replica"
    assert sorted((h["step"], h["attempt"]) for h in keeper.index()) == [(20, 1), (26, 2), (26, 2)]
    restarted = Keeper("b", budget_bytes=4096, keep=2, launch_id=launch)  # what Ray's restart of it runs
    try:
        assert "history the run left" in late_replica(restarted, 27, attempt=1)[0]
        assert sorted((h["step"], h["attempt"]) for h in restarted.index()) == [(20, 1), (26, 2), (26, 2)]
    finally:
        restarted.close()


def test_a_keeper_reserves_room_for_the_hosts_of_the_newest_attempt_only():
    """Ranks are placed anew each attempt: rank 0 ran on this node in attempt 1, rank 1 does in
    attempt 2. Counting rank 0 too would ask twice the room and turn the tier off for nothing."""
    keeper = Keeper("a", budget_bytes=1200, keep=2, launch_id=f"test-{uuid.uuid4().hex[:8]}")
    try:
        assert keeper.reserve(0, 1, 200) is None  # 2 kept + 2 in flight: 800 bytes
        assert keeper.reserve(1, 2, 200) is None, "rank 0 of attempt 1 is not a host of attempt 2"
        assert keeper.reserve(0, 1, 200) is None and set(keeper.reserved) == {1}, "a late call of attempt 1"
        assert "its budget is" in keeper.reserve(0, 2, 200), "two hosts of attempt 2 on this node: 1,600 bytes"
    finally:
        keeper.close()


def test_a_part_dropped_while_it_streams_to_its_replica_is_never_reused_under_the_stream(keeper):
    """A host's next write reuses a dropped part's file as a spare; one still streaming to the partner
    keeper would be overwritten under the stream, and the replica would hold another step's bytes."""
    assert keeper.hold(1, 0, 1, put(keeper, 1, 64), None, floor=0).refused is None
    streaming = keeper.parts[(1, 0, Role.PRIMARY)][1]
    keeper.sending.add(streaming)  # as _replicate marks it while the stream reads it
    with open(streaming, "rb") as stream:  # the sender's open file
        keeper.forget_after(0, attempt=1)
        assert not streaming.exists() and spare_bytes(keeper) == 0, "deleted, not made a spare"
        assert stream.read() == bytes(64), "the stream still reads the whole part"


def test_a_failed_part_write_leaves_no_file(tmp_path, monkeypatch):
    """A write that fails mid-file (a full tmpfs): no part-sized leftover under a new name each step."""
    from jaxlaunch.workers.checkpoints import part_file

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(part_file.np, "ascontiguousarray", full)
    with pytest.raises(OSError, match="No space left"):
        PartWriter().write(tmp_path, "p.part", {"x": jnp.arange(3.0)}, {}, {})
    assert list(tmp_path.iterdir()) == []


def test_a_tier_that_is_on_gets_spare_files_for_its_first_saves_within_the_budget():
    """Once every host agreed the tier is on (`prepare`), the first saves find spare files whose pages
    exist, as later ones find dropped parts': keep + 2 per host reserved on the node, within the
    budget. A reservation alone (the tier may still be off) prepares nothing."""
    from jaxlaunch.workers.checkpoints.keeper import IN_FLIGHT_SAVES, SPARE_HEADER_ROOM

    part = 1 << 20
    roomy = Keeper("a", budget_bytes=64 << 20, keep=2, launch_id=f"test-{uuid.uuid4().hex[:8]}")
    tight = Keeper("b", budget_bytes=5 << 20, keep=2, launch_id=f"test-{uuid.uuid4().hex[:8]}")
    try:
        for keeper in (roomy, tight):
            assert keeper.reserve(0, 1, part, part) is None
            assert list(keeper.incoming.iterdir()) == [], "nothing before the tier is agreed on"
            keeper.prepare()
            preparing = keeper.preparing
            if preparing is not None:
                preparing.join(timeout=60)
        spares = list(roomy.incoming.glob("spare-*"))
        assert len(spares) == 2 + IN_FLIGHT_SAVES and not [p for p in roomy.incoming.iterdir() if p not in spares]
        assert all(p.stat().st_blocks * 512 >= part + SPARE_HEADER_ROOM for p in spares), "their pages exist"
        assert spare_bytes(tight) <= 5 << 20 and len(list(tight.incoming.glob("spare-*"))) == 2, "within the budget"
        PartWriter().write(roomy.incoming, incoming_name(1, 0, os.getpid()), {"x": jnp.zeros(part // 4)}, {}, {})
        assert len(list(roomy.incoming.glob("spare-*"))) == 1 + IN_FLIGHT_SAVES, "the first save took one"
        assert roomy.hold(1, 0, 1, incoming_name(1, 0, os.getpid()), None).refused is None
    finally:
        roomy.close()
        tight.close()


def test_a_keeper_closed_while_it_prepares_spares_leaves_nothing():
    keeper = Keeper("c", budget_bytes=1 << 30, keep=8, launch_id=f"test-{uuid.uuid4().hex[:8]}")
    assert keeper.reserve(0, 1, 8 << 20, 8 << 20) is None
    keeper.prepare()
    keeper.close()
    assert keeper.preparing is None and not keeper.dir.parent.exists()


def test_a_keeper_deletes_the_files_of_writers_that_died(keeper):
    dead = psutil_dead_pid()
    put(keeper, 7, 64, pid=dead)
    (keeper.incoming / f".{incoming_name(8, 0, dead)}.tmp").write_bytes(bytes(10))  # killed mid-write
    assert keeper.hold(9, 0, 1, put(keeper, 9, 64), None).refused is None
    assert not mine(keeper), "only a live host's files stay until their hand-off"
    assert "is gone" in keeper.hold(10, 0, 1, incoming_name(10, 0, dead), None).refused


def psutil_dead_pid():
    import psutil

    pid = 2**22 - 1
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


def test_a_replica_streams_only_with_the_launchs_secret(tmp_path):
    part = tmp_path / "part"
    part.write_bytes(np.arange(100_000, dtype=np.uint8).tobytes())
    (tmp_path / "in").mkdir()
    listener = replica_stream.ReplicaListener(tmp_path / "in", "s3cret", "127.0.0.1")
    try:
        assert replica_stream.send(listener.address, "s3cret", part, "1-0-x.part") == 100_000
        assert (tmp_path / "in" / "1-0-x.part").read_bytes() == part.read_bytes()
        with pytest.raises(ConnectionError):
            replica_stream.send(listener.address, "guess", part, "2-0-x.part")
        assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["1-0-x.part"]
    finally:
        listener.close()


def test_a_keeper_keeps_the_newest_steps_every_host_handed_over_and_all_newer_ones():
    # Every host handed over step 7 whole (the floor); 8 and 9 may still be replicating elsewhere, and
    # if the partner node dies now, step 7 is the newest whole one: no keeper may have dropped it.
    held = [part(7, 0, "a", replicated=True), part(7, 1, "a", R), part(8, 0, "a", replicated=True),
            part(9, 0, "a"), part(6, 0, "a", replicated=True), part(5, 0, "a", replicated=True)]
    assert kept(held, 2, floor=7) == {6, 7, 8, 9}, "step 8 settled here says nothing of the other keepers"
    assert kept(held + [part(10, 0, "a")], 2, floor=8) == {7, 8, 9, 10}
    assert kept(held, 2, floor=-1) == {5, 6, 7, 8, 9}, "before any floor: nothing is known whole"


def test_a_step_some_host_could_not_hand_over_counts_for_nothing_at_or_below_the_floor():
    # Steps 4 and 5 were handed over by every host, but a keeper refused host 1's part of both: the floor
    # passing them says nothing of their being whole, and steps 2 and 3 are the newest whole ones.
    held = [part(s, 0, "a", replicated=True) for s in range(1, 8)]
    assert kept(held, 2, floor=5) == {4, 5, 6, 7}
    assert kept(held, 2, floor=5, not_whole=frozenset({(0, 4), (0, 5)})) == {2, 3, 6, 7}
    assert kept(held, 2, floor=5, not_whole=frozenset({(1, 4), (1, 5)})) == {4, 5, 6, 7}, "another attempt's"


def test_a_node_that_refuses_its_parts_never_leaves_the_other_keepers_without_a_whole_step(monkeypatch):
    """Two nodes, a host on each. From step 4 node b refuses host 1's parts (its budget was outgrown);
    host 0's saves go on and its floor passes the steps host 1 could not hand over. Host 1 tells every
    keeper as it goes on, so node a keeps the newest whole steps (2 and 3) instead of dropping them
    for steps that are not whole; told nothing, it would hold no whole step at all by step 7. Ray's
    restart of a keeper keeps what it was told."""
    from jaxlaunch.workers.checkpoints import keeper as keeper_module

    monkeypatch.setattr(keeper_module, "_actor_id", lambda: "k1")  # the same actor across the restart below
    launch = f"test-{uuid.uuid4().hex[:8]}"
    a, b = (Keeper(n, budget_bytes=4 * 64, keep=2, launch_id=launch) for n in ("a", "b"))
    try:
        for step in range(1, 10):
            for rank, keeper, nbytes in ((0, a, 64), (1, b, 64 if step < 4 else 4 * 64)):
                name = incoming_name(step, rank, os.getpid())
                (pathlib.Path(keeper.inbox()) / name).write_bytes(bytes(nbytes))
                handed = keeper.hold(step, rank, 2, name, None, floor=step - 2)
                if handed.refused is not None:  # what the host does (`MemoryTier._refuse`)
                    assert rank == 1 and step >= 4 and "over its budget" in handed.refused, handed
                    for told in (a, b):
                        told.mark_not_whole(0, step)
            held = [Held.from_dict(h) for h in a.index() + b.index()]
            assert whole_steps(held)[:1] == [min(step, 3)], (step, sorted(h.step for h in held))
        assert sorted({h["step"] for h in a.index()}) == [2, 3, 8, 9], "within its budget: 2 whole, 2 in flight"
        restarted = Keeper("a", budget_bytes=4 * 64, keep=2, launch_id=launch)  # what Ray's restart of a runs
        assert restarted.not_whole == {(0, s) for s in range(4, 10)}
        assert sorted({h["step"] for h in restarted.index()}) == [2, 3, 8, 9]
    finally:
        a.close()
        b.close()


def test_a_keeper_s_spare_files_stay_within_its_budget_beside_what_it_holds(keeper):
    for step in range(8):
        assert keeper.hold(step, 0, 1, put(keeper, step, 64), None, floor=step - 2).refused is None
        held = sum(h["nbytes"] for h in keeper.index())
        assert held + spare_bytes(keeper) <= keeper.budget, (step, held, spare_bytes(keeper))


def test_a_save_s_copies_are_counted_from_the_bytes_each_copy_moved(tmp_path, monkeypatch):
    """On CPU the write reads each shard's buffer in place: one copy of the arrays on the node, counted
    from the bytes written. A shard the write could not read in place (an accelerator's, moved to the
    host first) counts its host copy too; the replica's stream counts the file's bytes sent and received."""
    from jaxlaunch.workers.checkpoints import part_file
    from jaxlaunch.workers.checkpoints.part_file import Copies

    tree = {"w": jax.device_put(jnp.arange(64.0), NamedSharding(mesh_of((4,), ("data",)), PartitionSpec("data"))),
            "b": jnp.ones(5, jnp.int32)}
    writer = PartWriter()
    header = writer.write(tmp_path, "p.part", tree, {}, {})
    assert header.nbytes == 64 * 4 + 5 * 4 and writer.copied_bytes == header.nbytes
    assert writer.file_bytes == (tmp_path / "p.part").stat().st_size > header.nbytes
    copies = Copies(header.nbytes, writer.file_bytes, writer.copied_bytes, writer.file_bytes, writer.file_bytes)
    assert copies.to_record() == {"memory_copies": 3.0, "memory_copies_on_node": 1.0,
                                  "memory_bytes": header.nbytes + 2 * writer.file_bytes,
                                  "memory_part_bytes": header.nbytes}
    monkeypatch.setattr(part_file, "_in_place", lambda shard, host: False)  # as on an accelerator
    writer.write(tmp_path, "q.part", tree, {}, {})
    assert writer.copied_bytes == 2 * header.nbytes, "the host copy and the write"


def mesh_of(shape, names):
    return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def as_hosts(tmp_path, tree, num_hosts, owns):
    """One part file of this process's part of `tree`, and `num_hosts` headers that split it as hosts
    of one device each would have held it (`owns(rank, shard)`)."""
    PartWriter().write(tmp_path, "p.part", tree, {"step": 3}, {"rank": 0})
    whole = PartFile(tmp_path / "p.part")
    headers = {r: dataclasses.replace(whole.header, shards=tuple(e for e in whole.header.shards if owns(r, e)))
               for r in range(num_hosts)}
    return whole, headers


@pytest.mark.parametrize("remote", [False, True], ids=["mapped", "from-keepers"])
def test_held_shards_reassemble_into_other_shardings_bit_for_bit_reading_each_byte_once(tmp_path, remote):
    values = jax.random.normal(jax.random.key(0), (8, 6))
    saved = jax.device_put(values, NamedSharding(mesh_of((4,), ("data",)), PartitionSpec("data")))
    key = jax.device_put(jax.random.key(7), NamedSharding(mesh_of((4,), ("data",)), PartitionSpec()))
    scalar = jax.device_put(jnp.int32(5), NamedSharding(mesh_of((4,), ("data",)), PartitionSpec()))
    whole, headers = as_hosts(tmp_path, {"w": saved, "k": key, "c": scalar, "n": 3}, 4,
                              lambda r, e: e.path != "['w']" or e.index[0][0] == 2 * r)
    assert [len([s for s in h.shards if s.path == "['w']"]) for h in headers.values()] == [1, 1, 1, 1]
    new = mesh_of((2, 2), ("data", "model"))
    targets = {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(new, PartitionSpec("model",
                                                                                                        "data"))),
               "k": jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(new, PartitionSpec())),
               "c": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(new, PartitionSpec())),
               "n": 0}
    boxes = []

    def remote_box(rank, shard, box):
        boxes.append((headers[rank].shards[shard].path, box))
        return whole.contiguous_box(headers[rank].shards[shard], box)  # as the keeper sends it

    reader = PartReader(0, [0, 1, 2, 3], lambda r: (headers[r], None if remote else whole), remote_box)
    restored = assemble(targets, reader)
    assert len(reader.parts) == 4, "other parts are read only when the host's own does not cover its shards"
    assert np.array_equal(np.asarray(restored["w"]), np.asarray(values))
    assert restored["w"].sharding.spec == PartitionSpec("model", "data")
    assert np.array_equal(jax.random.key_data(restored["k"]), jax.random.key_data(key))
    assert restored["n"] == 3 and restored["c"].shape == () and int(restored["c"]) == 5
    assert part_nbytes(targets) == 8 * 6 * 4 + 8 + 4
    assert reader.bytes_read == part_nbytes(targets), "each byte of the new part read once, nothing more"
    assert not remote or all(b[0][1] - b[0][0] == 2 and b[1][1] - b[1][0] == 3 for p, b in boxes if p == "['w']"), \
        "another node's keeper sends only the sub-box a new shard overlaps"


def test_a_part_file_is_written_once_from_the_device_buffer_and_maps_back_exactly(tmp_path):
    x = jax.device_put(jnp.arange(12.0).reshape(4, 3), NamedSharding(mesh_of((2,), ("data",)), PartitionSpec("data")))
    assert all(np.asarray(s.data).ctypes.data == s.data.unsafe_buffer_pointer() for s in x.addressable_shards), \
        "on CPU a shard's numpy array is its buffer: the file write is the one copy"
    (tmp_path / "spare-1.part").write_bytes(b"\xff" * 10_000)  # a dropped part's file, larger
    header = PartWriter().write(tmp_path, "p.part", {"x": x, "s": "plain"}, {"m": 1}, {"e": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["p.part"], "the spare was reused; no temporary file is left"
    part = PartFile(tmp_path / "p.part")
    assert part.header == header and header.nbytes == 48 and header.plain == {"['s']": "plain"}
    assert [np.asarray(part.shard(e)).tolist() for e in header.shards] == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8],
                                                                                                  [9, 10, 11]]]


def test_a_writer_lays_out_each_save_of_one_state_once_and_again_when_the_state_changes(tmp_path):
    """Every save of an attempt writes a state of one layout: the writer works it out at the first and
    keeps it; each part maps back to its own step's values, whatever the plan was made from. A state of
    another shape or sharding is laid out afresh, never written by the old plan."""
    mesh = mesh_of((2,), ("data",))

    def state(scale, shape=(4, 3), spec=("data",)):
        x = jax.device_put(jnp.arange(float(np.prod(shape))).reshape(shape) * scale,
                           NamedSharding(mesh, PartitionSpec(*spec)))
        return {"x": x, "k": jax.device_put(jax.random.key(scale), NamedSharding(mesh, PartitionSpec())), "n": scale}

    writer = PartWriter()
    writer.write(tmp_path, "a.part", state(1), {}, {})
    plan = writer.plan
    header = writer.write(tmp_path, "b.part", state(2), {}, {})
    assert writer.plan is plan, "the second save of the same layout reuses the plan"
    part = PartFile(tmp_path / "b.part")
    assert part.header == header and header.plain == {"['n']": 2}
    rows = [np.asarray(part.shard(e)).tolist() for e in header.shards if e.path == "['x']"]
    assert rows == [[[0, 2, 4], [6, 8, 10]], [[12, 14, 16], [18, 20, 22]]]
    stored_key = next(e for e in header.shards if e.path == "['k']")
    assert np.array_equal(part.shard(stored_key), jax.random.key_data(jax.random.key(2))), "this save's key"
    for changed in (state(3, shape=(6, 2)), state(3, spec=(None, None))):
        header = writer.write(tmp_path, "c.part", changed, {}, {})
        assert writer.plan is not plan
        plan = writer.plan
        part = PartFile(tmp_path / "c.part")
        whole = np.concatenate([np.asarray(part.shard(e)) for e in header.shards if e.path == "['x']"])
        assert np.array_equal(whole, np.asarray(changed["x"])), "each shard once, at its own offset"
    as_numpy = {**state(4), "x": np.arange(12.0).reshape(4, 3)}  # an array leaf that is no JAX array now
    header = writer.write(tmp_path, "d.part", as_numpy, {}, {})
    assert writer.plan is not plan and "['x']" in header.plain and all(e.path != "['x']" for e in header.shards)


def test_a_part_that_covers_nothing_is_an_error_not_zeros(tmp_path):
    saved = jax.device_put(jnp.ones((4, 2)), NamedSharding(mesh_of((2,), ("data",)), PartitionSpec("data")))
    whole, headers = as_hosts(tmp_path, {"w": saved}, 1, lambda r, e: e.index[0][0] == 0)
    target = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32,
                                        sharding=NamedSharding(mesh_of((1,), ("data",)), PartitionSpec()))}
    with pytest.raises(RuntimeError, match="no copy of part of"):
        assemble(target, PartReader(0, [0], lambda r: (headers[r], whole), None))


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
    from jaxlaunch.workers.sharding import build_mesh
    from jaxlaunch.workers.supervision.progress import HostProgress

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


def test_the_files_of_a_driver_that_died_on_this_machine_are_deleted_and_no_others():
    import socket

    from jaxlaunch.contract.tiers import launch_dir, remove_orphans

    tag = uuid.uuid4().hex[:8]
    dead, alive = launch_dir(f"{psutil_dead_pid()}-{tag}-{socket.gethostname()}"), launch_dir(
        f"{os.getpid()}-{tag}-{socket.gethostname()}")
    elsewhere = launch_dir(f"{psutil_dead_pid()}-{tag}-another-machine")
    try:
        for folder in (dead, alive, elsewhere):
            (folder / "node" / "held").mkdir(parents=True)
            (folder / "node" / "held" / "1-0-primary.part").write_bytes(bytes(8))
        assert dead.name in remove_orphans()
        assert not dead.exists() and alive.exists() and elsewhere.exists()
    finally:
        for folder in (dead, alive, elsewhere):
            shutil.rmtree(folder, ignore_errors=True)


def test_a_launch_whose_keeper_lives_is_never_taken_for_a_dead_driver_s(tmp_path, monkeypatch):
    """A driver in another pid namespace (a container sharing this machine's name and /dev/shm) looks
    dead by its pid: its live keepers' files were deleted. A keeper holds its mark's lock while it
    lives, and the kernel drops the lock with its process."""
    import socket

    from jaxlaunch.contract import tiers

    monkeypatch.setattr(tiers, "SHM_ROOT", tmp_path)
    folder = tiers.launch_dir(f"{psutil_dead_pid()}-abcd1234-{socket.gethostname()}")
    fd = tiers.hold_alive(folder, "node-a")
    (folder / "node-a" / "held").mkdir(parents=True)
    try:
        assert tiers.remove_orphans() == [] and (folder / "node-a" / "held").is_dir()
    finally:
        os.close(fd)  # the keeper's process ends
    assert tiers.remove_orphans() == [folder.name] and not folder.exists()


def test_a_keeper_deletes_other_launches_folders_on_its_node_whose_keeper_is_long_gone(tmp_path, monkeypatch):
    """A driver SIGKILLed on another machine leaves its keepers' files on every node until reboot: no
    driver deletes another machine's files. A keeper starting on the node deletes those whose keeper
    is gone (its mark free) and has not touched its mark for ORPHAN_AFTER_S (Ray restarts a dead keeper,
    which takes its files over, within seconds)."""
    from jaxlaunch.contract import tiers

    monkeypatch.setattr(tiers, "SHM_ROOT", tmp_path)
    gone, recent, live, own = (tiers.launch_dir(f"1-{name}-elsewhere") for name in ("gone", "recent", "live", "own"))
    fds = [tiers.hold_alive(folder, "node-a") for folder in (gone, recent, live, own)]
    for folder in (gone, recent, live, own):
        (folder / "node-a" / "held").mkdir(parents=True)
    os.close(fds[0])
    os.close(fds[1])
    old = time.time() - tiers.ORPHAN_AFTER_S - 1
    for folder in (gone, live, own):
        os.utime(folder / f"{tiers.ALIVE_PREFIX}node-a", (old, old))
    try:
        assert tiers.sweep_dead_keepers(own) == [f"{gone.name}/node-a"]
        assert not gone.exists() and recent.exists() and live.exists() and own.exists()
        assert not tiers.keeper_alive(recent / f"{tiers.ALIVE_PREFIX}node-a")
        assert tiers.keeper_alive(live / f"{tiers.ALIVE_PREFIX}node-a")
        with monkeypatch.context() as m:  # another user's mark, which this process may not open
            m.setattr(tiers.os, "open", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
            assert tiers.keeper_alive(recent / f"{tiers.ALIVE_PREFIX}node-a"), "not this user's to judge"
    finally:
        for fd in fds[2:]:
            os.close(fd)


def test_memory_serves_a_restore_when_it_is_at_least_as_new_as_the_durable_tier():
    assert memory_serves(40, [40, 30]), "the same step: memory reads faster"
    assert memory_serves(47, [40]) and memory_serves(3, [])
    assert not memory_serves(39, [40, 30]), "an older memory step never wins"


@pytest.mark.parametrize("nodes, says", [
    ([{"NodeID": "n1", "Alive": True}], "did not drop the steps after 7"),
    ([{"NodeID": "n1", "Alive": False}], None),  # gone with its node: its files went too
    (RuntimeError("the GCS did not answer"), "did not drop the steps after 7"),  # unknown: counted up
])
def test_rank_0_says_a_keeper_missed_the_drop_unless_its_node_is_known_gone(monkeypatch, nodes, says):
    """A keeper that did not drop the steps after the restored one makes the attempt save durably only;
    only a keeper Ray lists dead is passed over. When Ray cannot list its nodes, a keeper that did not
    answer counts as one whose node is up (the safe side: no step of the history the run left read)."""
    import ray
    from jaxlaunch.workers.checkpoints.memory import MemoryTier

    def listed():
        if isinstance(nodes, Exception):
            raise nodes
        return nodes

    monkeypatch.setattr(ray, "nodes", listed)
    tier = object.__new__(MemoryTier)  # rank 0's, without Ray's runtime
    tier.rank = 0
    monkeypatch.setattr(tier, "_ask_keepers", lambda call: ({}, {"n1": "no answer in 60 s"}), raising=False)
    said = tier.forget_after(7)
    assert (said is None) if says is None else (says in said), said


class Durable:
    """A durable tier with committed steps (newest first) that read back or not: by default 100 and 80,
    whose step 100 does not read back (or does)."""

    def __init__(self, newest_reads: bool = False, readable: dict[int, bool] | None = None):
        self.readable = readable if readable is not None else {100: newest_reads, 80: True}
        self.tried, self.read = [], []
        """`newer_than` of each call; each step read."""

    def steps_from_rank_0(self):
        return sorted(self.readable, reverse=True)

    def restore_latest(self, targets, check_structure=None, newer_than=None, failed_before=()):
        """As the real one: the newest step past `newer_than` not in `failed_before` that reads back."""
        from jaxlaunch.workers.checkpoints.durable import DurableRestore, NoCheckpointError, NoneNewerReadBack

        self.tried.append(newer_than)
        skip = {f["step"] for f in failed_before}
        failed = []
        for step in self.steps_from_rank_0():
            if step in skip or (newer_than is not None and step <= newer_than):
                continue
            self.read.append(step)
            if self.readable[step]:
                return DurableRestore(step, {"w": step}, {}, self.set_aside_failed([*failed_before, *failed]), 0.1)
            failed.append({"step": step, "error": "corrupt"})
        if newer_than is not None:
            raise NoneNewerReadBack(failed, [])
        if failed_before or failed:
            raise NoCheckpointError("none can be restored")
        return None

    def set_aside_unverified(self):
        return []

    def set_aside_failed(self, failed):
        return [dict(f, moved_to=f"unreadable_checkpoints/{f['step']}") for f in failed]

    class store:
        @staticmethod
        def size(step):
            return 1


class Memory:
    """The memory tier holding `steps` whole (newest first); those in `unreadable` do not read back."""

    lost, lost_alive, replaced = [], [], []

    def __init__(self, steps=(90,), unreadable=(), passed_over=()):
        self.steps, self.unreadable, self.tried = list(steps), set(unreadable), []
        self.passed_over = list(passed_over)

    def held(self):
        return []

    def whole_steps(self, held, at_most=None):
        return [s for s in self.steps if at_most is None or s <= at_most]

    def restore(self, step, held, targets):
        from jaxlaunch.workers.checkpoints.memory import MemoryRestore

        self.tried.append(step)
        if step in self.unreadable:
            raise ValueError(f"{step}-1-primary.part is not a memory-tier part file")
        return MemoryRestore(step, {"w": step}, {}, {}, [], 0.01, 0, self.passed_over)


class Layout:
    mismatch = None

    def targets(self):
        return {"w": None}


@pytest.mark.parametrize("newest_reads", [False, True])
def test_an_unreadable_newest_durable_step_leaves_memory_s_newer_step_to_serve(newest_reads):
    """Durable steps 100 and 80, memory step 90 whole. Durable 100 serves when it reads back; when it
    does not, memory's 90 is newer than anything left, where falling back to durable 80 would lose
    ten steps (and the restore's drop then deletes memory's 90)."""
    from jaxlaunch.workers.checkpoints.tiered import restore_newest
    from jaxlaunch.workers.supervision.progress import HostProgress

    from jaxlaunch.contract.events import CheckpointFallback

    durable, progress = Durable(newest_reads), HostProgress()
    restored = restore_newest(durable, Memory(), Layout(), progress)
    told = progress.drain().events
    if newest_reads:
        assert (restored.tier, restored.step, restored.state) == ("durable", 100, {"w": 100})
        assert restored.durable_step == 100
        assert told == ()
    else:
        assert (restored.tier, restored.step, restored.state) == ("memory", 90, {"w": 90})
        assert restored.durable_step == 80, "the durable cadence counts from the newest durable step left"
        assert [(e.step, e.moved_to) for e in told if isinstance(e, CheckpointFallback)] == \
            [(100, "unreadable_checkpoints/100")], "set aside, and said"
    assert durable.tried == [90], "only the durable steps newer than memory's were tried"


@pytest.mark.parametrize("older_durable", [True, False], ids=["durable-80-too", "no-older-durable"])
def test_memory_steps_older_than_an_unreadable_durable_step_still_serve(older_durable):
    """Memory holds 100 and 90 whole; 100 does not read back, and durable step 95 (the newest durable)
    does not either. Memory's 90 is the newest step that reads: before, a memory step older than the
    durable tier's newest was never tried, and the job restored durable 80 (ten steps trained again,
    memory's 90 dropped) or, with no older durable step, stopped with no_checkpoint."""
    from jaxlaunch.workers.checkpoints.tiered import restore_newest
    from jaxlaunch.workers.supervision.progress import HostProgress

    from jaxlaunch.contract.events import CheckpointFallback, MemoryFallback

    durable = Durable(readable={95: False, 80: True} if older_durable else {95: False})
    memory, progress = Memory(steps=[100, 90], unreadable={100}), HostProgress()
    restored = restore_newest(durable, memory, Layout(), progress)
    assert (restored.tier, restored.step, restored.state) == ("memory", 90, {"w": 90})
    assert memory.tried == [100, 90] and durable.read == [95], "80 is older than memory's 90: never read"
    assert restored.durable_step == (80 if older_durable else 0), "the durable cadence counts from a readable step"
    told = progress.drain().events
    assert [(e.step, e.moved_to) for e in told if isinstance(e, CheckpointFallback)] == \
        [(95, "unreadable_checkpoints/95")]
    [fallback] = [e for e in told if isinstance(e, MemoryFallback)]
    assert fallback.step == 100 and fallback.reason.endswith("; next: durable step 95")


def test_durable_steps_between_unreadable_memory_steps_are_tried_in_order():
    """Memory 100 and 90 and durable 95 and 92 (none past 95 reads but 92): the newest that reads is
    durable 92, tried after memory 100 and durable 95 failed, before memory 90."""
    from jaxlaunch.workers.checkpoints.tiered import restore_newest
    from jaxlaunch.workers.supervision.progress import HostProgress

    from jaxlaunch.contract.events import CheckpointFallback

    durable = Durable(readable={95: False, 92: True, 80: True})
    memory, progress = Memory(steps=[100, 90], unreadable={100}), HostProgress()
    restored = restore_newest(durable, memory, Layout(), progress)
    assert (restored.tier, restored.step) == ("durable", 92)
    assert memory.tried == [100] and durable.read == [95, 92]
    assert [e.step for e in progress.drain().events if isinstance(e, CheckpointFallback)] == [95]


class NoDurable(Durable):
    def __init__(self):
        super().__init__(newest_reads=True)

    def steps_from_rank_0(self):
        return []

    def restore_latest(self, targets, check_structure=None, newer_than=None, failed_before=()):
        self.tried.append(newer_than)
        return None


def test_a_memory_step_that_does_not_read_back_leaves_the_next_committed_one_to_serve():
    """A part of memory step 50 is unreadable (a torn or flipped header): step 40, also whole in
    memory, serves, where the run restarted from scratch; the event names the host and the error."""
    from jaxlaunch.workers.checkpoints.tiered import restore_newest
    from jaxlaunch.workers.supervision.progress import HostProgress

    from jaxlaunch.contract.events import MemoryFallback

    memory, progress = Memory(steps=[50, 40], unreadable={50}), HostProgress()
    restored = restore_newest(NoDurable(), memory, Layout(), progress)
    assert (restored.tier, restored.step) == ("memory", 40) and memory.tried == [50, 40]
    assert restored.durable_step == 0, "no durable step: the durable cadence counts from step 0"
    [fallback] = [e for e in progress.drain().events if isinstance(e, MemoryFallback)]
    assert fallback.step == 50 and fallback.reason == (
        "memory step 50 did not read back on host(s) [0]: ValueError: 50-1-primary.part is not a memory-tier "
        "part file; next: memory step 40")

    memory, progress = Memory(steps=[50], unreadable={50}), HostProgress()
    assert restore_newest(NoDurable(), memory, Layout(), progress) is None
    [fallback] = [e for e in progress.drain().events if isinstance(e, MemoryFallback)]
    assert fallback.reason.endswith("; next: a fresh state (no durable step)"), "a fresh start is said"


def test_a_memory_step_another_host_could_not_read_is_let_go_before_the_next_one_is_read(monkeypatch):
    """Memory step 50 read back here but not on host 1: this host lets its copy of step 50 go before it
    reads step 40 (and before a durable step), rather than hold two states on its devices."""
    import gc
    import weakref

    from jaxlaunch.workers.checkpoints import tiered
    from jaxlaunch.workers.checkpoints.memory import MemoryRestore
    from jaxlaunch.workers.supervision.progress import HostProgress

    class State:
        pass

    alive: dict[int, list[int]] = {}
    earlier: list[weakref.ref] = []

    class Holding(Memory):
        def restore(self, step, held, targets):
            gc.collect()
            alive[step] = [i for i, ref in enumerate(earlier) if ref() is not None]
            state = State()
            earlier.append(weakref.ref(state))
            return MemoryRestore(step, {"w": state}, {}, {}, [], 0.01, 0, [])

    class Checking(NoDurable):
        def restore_latest(self, targets, check_structure=None, newer_than=None, failed_before=()):
            gc.collect()
            alive["durable"] = [i for i, ref in enumerate(earlier) if ref() is not None]
            return None

    monkeypatch.setattr(tiered, "host_errors", lambda error: {1: "ValueError: torn"})
    assert tiered.restore_newest(Checking(), Holding(steps=[50, 40]), Layout(), HostProgress()) is None
    assert alive == {50: [], 40: [], "durable": []}, alive


def test_a_restore_that_passed_over_a_copy_says_which_and_why():
    """The primary of a part changed since it was held, and its replica served: the restore says which
    copy it passed over and why (`memory_copy_passed_over`), once per copy, at the step that served."""
    from jaxlaunch.workers.checkpoints.tiered import restore_newest
    from jaxlaunch.workers.supervision.progress import HostProgress

    from jaxlaunch.contract.events import MemoryCopyPassedOver

    why = "the primary of rank 1's part of step 90 on node a changed since it was held (digest 1, held 2)"
    progress = HostProgress()
    restored = restore_newest(NoDurable(), Memory(passed_over=[why]), Layout(), progress)
    assert (restored.tier, restored.step) == ("memory", 90)
    said = [e for e in progress.drain().events if isinstance(e, MemoryCopyPassedOver)]
    assert [(e.step, e.reason) for e in said] == [(90, why)]
    assert said[0].message == f"a memory copy was not read: {why}; another copy of the part served"


def test_after_a_replica_mismatch_memory_serves_its_newest_step_whose_replicas_agreed():
    """The replicas disagreed at step 60; step 50's agreed. Memory holds 60 (perhaps the corrupt copy)
    and 50: 50 serves, as the driver said it would, where the run restarted from scratch."""
    from jaxlaunch.workers.checkpoints.tiered import restore_newest
    from jaxlaunch.workers.supervision.progress import HostProgress

    memory = Memory(steps=[60, 50])
    restored = restore_newest(NoDurable(), memory, Layout(), HostProgress(), at_most=50)
    assert (restored.tier, restored.step) == ("memory", 50) and memory.tried == [50], "60 is never read"


def test_a_restart_after_a_keeper_was_replaced_empty_says_its_steps_are_gone(monkeypatch):
    """The driver stopped a keeper that did not answer for a minute (its node up) and started another
    on its node, empty: the steps it held are gone. The restart said nothing and trained from step 1."""
    from jaxlaunch.workers.checkpoints import memory as memory_module
    from jaxlaunch.workers.checkpoints.tiered import restore_newest
    from jaxlaunch.workers.supervision.progress import HostProgress

    from jaxlaunch.contract.events import MemoryFallback

    tier = object.__new__(memory_module.MemoryTier)  # its __init__ asks Ray for this node
    tier.keepers, tier.lost_before, tier.rank = {"node-a": "the new keeper"}, ["node-a"], 0
    monkeypatch.setattr(tier, "_ask_keepers", lambda call: ({"node-a": []}, {}))
    monkeypatch.setattr(memory_module, "_alive_nodes", lambda: {"node-a"})
    progress = HostProgress()
    assert restore_newest(NoDurable(), tier, Layout(), progress) is None
    assert [e.reason for e in progress.drain().events if isinstance(e, MemoryFallback)] == [
        "no step is held in memory; the keepers of 1 node(s) stopped answering and were replaced, empty; "
        "starting from a fresh state (no durable step)"]


class Remote:
    """A keeper as the hosts hold it: `handle.method.remote(...)` gives the answer (`ray.get` is patched
    to return it as it is)."""

    def __init__(self, keeper):
        self.keeper = keeper

    def __getattr__(self, name):
        import types

        return types.SimpleNamespace(remote=getattr(self.keeper, name))


def flip_a_bit(path):
    """One bit of the first shard's data (a stored weight) flipped in place."""
    part = PartFile(path)
    where = part.start + part.header.shards[0].offset + 1
    part.map.close()
    with open(path, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x10]))


def test_a_memory_copy_whose_bytes_changed_is_never_read_and_the_part_s_other_copy_serves(monkeypatch):
    """A bit flips in a held part file (RAM, a stray write): the restore read it and trained on the
    wrong state. Each keeper takes a digest of a part when it first holds it, checks a replica against
    it on arrival, and checks its copy again before a restore reads it: a changed copy is passed over
    (and said), the other copy of the part serves; with none intact the step does not serve."""
    import ray
    from jaxlaunch.workers.checkpoints.memory import MemoryTier

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    launch = f"test-{uuid.uuid4().hex[:8]}"
    a = Keeper("a", budget_bytes=1 << 20, keep=2, launch_id=launch)
    b = Keeper("b", budget_bytes=1 << 20, keep=2, launch_id=launch)
    try:
        sharding = NamedSharding(mesh_of((2,), ("data",)), PartitionSpec("data"))
        x = jax.device_put(jnp.arange(12.0).reshape(4, 3), sharding)
        name = incoming_name(1, 0, os.getpid())
        PartWriter().write(a.incoming, name, {"w": x}, {"m": 1}, {})
        assert a.hold(1, 0, 1, name, None, floor=0).refused is None
        [record] = a.index()
        primary = a.parts[(1, 0, Role.PRIMARY)][1]
        shutil.copy(primary, b.received / "streamed.part")
        flip_a_bit(b.received / "streamed.part")  # a bad stream
        assert "arrived changed" in b.hold_replica(record, "streamed.part")
        shutil.copy(primary, b.received / "streamed.part")
        assert b.hold_replica(record, "streamed.part") is None
        assert a.check(1, 0, "primary") is None and b.check(1, 0, "replica") is None

        flip_a_bit(primary)
        tier = object.__new__(MemoryTier)  # its __init__ asks Ray for this node
        tier.keepers, tier.rank, tier.node, tier.attempt = {"a": Remote(a), "b": Remote(b)}, 0, "a", 2
        tier.reading = "restore-2"
        held = [Held.from_dict(h) for keeper in (a, b) for h in keeper.index()]
        targets = {"w": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)}
        got = tier.restore(1, held, targets)
        assert np.array_equal(np.asarray(got.state["w"]), np.asarray(x)), "bit for bit, from the replica"
        assert [(s.node, s.role) for s in got.sources] == [("b", Role.REPLICA)]
        [said] = got.passed_over
        assert said.startswith("the primary of rank 0's part of step 1 on node a changed since it was held")

        flip_a_bit(b.parts[(1, 0, Role.REPLICA)][1])
        # A copy found intact is hashed once per reading: the same attempt's give-up persist hashes again.
        tier.reading = "persist-2"
        with pytest.raises(RuntimeError, match="no copy of rank 0's part of memory step 1 is intact"):
            tier.restore(1, held, targets)
    finally:
        a.close()
        b.close()


def test_a_part_held_with_its_host_s_digest_is_checked_against_it(monkeypatch):
    """The host hashes its part through its own mapping and hands the digest over with the file: the
    keeper keeps that digest (hashing nothing), and a bit flipped after the hand-off is caught."""
    keeper = Keeper("a", budget_bytes=1 << 20, keep=2, launch_id=f"test-{uuid.uuid4().hex[:8]}")
    try:
        sharding = NamedSharding(mesh_of((2,), ("data",)), PartitionSpec("data"))
        x = jax.device_put(jnp.arange(12.0).reshape(4, 3), sharding)
        name = incoming_name(1, 0, os.getpid())
        writer = PartWriter()
        writer.write(keeper.incoming, name, {"w": x}, {}, {})
        writer.close()
        host = digest(keeper.incoming / name)
        hashed = []
        monkeypatch.setattr(keeper_module, "digest", lambda path: hashed.append(path) or digest(path))
        assert keeper.hold(1, 0, 1, name, None, floor=0, part_digest=host).refused is None
        assert hashed == [], "the keeper took the host's digest"
        held, path = keeper.parts[(1, 0, Role.PRIMARY)]
        assert held.digest == host and keeper.check(1, 0, "primary") is None
        flip_a_bit(path)
        assert "changed since it was held" in keeper.check(1, 0, "primary", reading="after the flip")
    finally:
        keeper.close()


def test_the_memory_steps_a_restore_tries_are_the_newest_committed_up_to_the_verified_step():
    """Rank 0's list (every host gets the same one): committed steps only, newest first, none past
    `at_most` (after a replica mismatch, the newest step whose replicas agreed)."""
    from jaxlaunch.workers.checkpoints.memory import MemoryTier

    tier = object.__new__(MemoryTier)  # its __init__ asks Ray for this node
    tier.rank = 0
    held = [part(s, r, "a", replicated=True) for s in (30, 40, 50, 60) for r in (0, 1)] + [part(70, 0, "a")]
    assert tier.whole_steps(held) == [60, 50, 40, 30], "step 70 is not committed"
    assert tier.whole_steps(held, at_most=55) == [50, 40, 30]
