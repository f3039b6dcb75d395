"""The hosts' side of the replica check: a bit-exact checksum per shard, and the bitflip injection."""

import jax
import jax.numpy as jnp
import numpy as np
from jaxlaunch.workers.supervision.replica_sums import PendingChecksums, flip_bit


def test_one_flipped_bit_changes_the_checksum_and_equal_bytes_give_equal_ones():
    tree = {"w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8), "b": jnp.ones(8, jnp.bfloat16)}
    first = PendingChecksums(5, tree, every_shard=True).result()
    again = PendingChecksums(5, jax.tree.map(jnp.copy, tree), every_shard=True).result()
    assert first == again and first.step == 5 and {s[0] for s in first.sums} == {"['w']", "['b']"}
    flipped = np.array(tree["w"])
    flipped.reshape(-1).view(np.uint32)[37] ^= 1 << 3
    changed = PendingChecksums(5, {**tree, "w": jnp.asarray(flipped)}, every_shard=True).result()
    assert [a[2] == b[2] for a, b in zip(first.sums, changed.sums, strict=True)].count(False) == 1


def test_an_array_on_one_device_has_no_copy_to_check():
    assert PendingChecksums(1, {"w": jnp.ones((4, 4))}).result().sums == ()
    assert flip_bit({"w": jnp.ones((4, 4))}) is None, "nothing replicated: nothing to flip"


def test_a_bit_flipped_on_one_device_of_a_host_is_seen_and_names_the_host():
    """A parameter replicated on this host's 8 devices: each copy is hashed, so a bit flipped in one
    device's copy alone differs from the other 7 (only the first local copy was hashed: a flip on any
    other device, and any corruption with one host, went unseen)."""
    from jax.sharding import NamedSharding, PartitionSpec
    from jaxlaunch.launcher.control.replicas import find_mismatch

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    tree = {"w": jax.device_put(jnp.arange(16.0), NamedSharding(mesh, PartitionSpec()))}
    clean = PendingChecksums(4, tree).result()
    assert len(clean.sums) == jax.device_count() and find_mismatch(4, {0: clean}) is None
    flipped, path = flip_bit(tree)
    assert path == "['w']"
    for number, shard in enumerate(flipped["w"].addressable_shards):
        assert np.array_equal(shard.data, tree["w"].addressable_shards[number].data) == (number != 0)
    found = find_mismatch(4, {0: PendingChecksums(4, flipped).result()})
    assert found is not None and found.culprit == 0 and found.hosts == [0] * jax.device_count()
    assert found.checksums.count(found.checksums[1]) == jax.device_count() - 1


def test_a_dimension_held_whole_names_the_same_copy_however_jax_writes_it():
    """JAX gives a dimension held whole as slice(None) in a sharding's index map and as slice(0, n) in
    a shard's index (the classifier on an existing cluster raised KeyError '[:]' at its first save)."""
    from jaxlaunch.workers.supervision.replica_sums import _index_text

    assert _index_text((slice(None), slice(0, 4)), (8, 8)) == _index_text((slice(0, 8), slice(None, 4)), (8, 8))
    assert _index_text((slice(None), slice(4, 8)), (8, 8)) == "[0:8, 4:8]"
    assert _index_text((), ()) == "[]"


def test_typed_rng_keys_are_checked_as_their_words():
    """An NNX model's Rngs hold typed keys (dtype key<fry>), which have no bits to bitcast: the
    classifier's first save raised ValueError before keys were hashed as their key data."""
    import jax
    from jaxlaunch.workers.supervision.replica_sums import PendingChecksums

    state = {"key": jax.random.key(0), "w": jax.numpy.ones((4,))}
    pending = PendingChecksums(10, state, every_shard=True)
    assert [path for path, _ in pending.keys] == ["['key']", "['w']"]


def test_a_state_s_arrays_keep_their_shards_in_the_checked_order_however_they_were_made():
    """The shards to check are found once per layout (who holds which index walks every device) and then
    taken from each step's arrays by their position among the array's local shards: an array made by a
    step, by device_put or from single-device arrays in another order, whose copies of one index differ,
    must give the checksums a plan made from that very array gives."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from jaxlaunch.workers.supervision import replica_sums

    mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "model"))
    sharding = NamedSharding(mesh, PartitionSpec(None, "model"))
    values = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    put = jax.device_put(values, sharding)
    stepped = jax.jit(lambda a: a * 1.0, out_shardings=sharding)(put)
    pieces = {shard.device: np.array(shard.data) for shard in put.addressable_shards}
    for position, device in enumerate(pieces):
        pieces[device] = pieces[device] + position  # every device's copy differs from its replica's
    rebuilt = jax.make_array_from_single_device_arrays(
        values.shape, sharding, [jax.device_put(pieces[d], d) for d in reversed(pieces)])
    for made in (stepped, rebuilt):
        # Every local copy of each index, hashed on its own, in the array's order of local shards.
        expected = [(replica_sums._index_text(shard.index, made.shape), int(replica_sums._hash(shard.data)))
                    for shard in made.addressable_shards]
        replica_sums._PLANS.clear()
        PendingChecksums(3, {"w": put}, every_shard=True).result()  # the plan comes from `put`
        sums = PendingChecksums(3, {"w": made}, every_shard=True).result().sums
        assert [(index, value) for _, index, value in sums] == expected


def test_many_arrays_are_hashed_in_chunks_of_one_shape_each_as_if_alone(monkeypatch):
    """A state of hundreds of arrays (a big model's) is hashed in chunks of one shape and dtype, each at
    most CHUNK_SHARDS long and, past its first shard, CHUNK_BYTES large: one program over every shard
    took 36 s of CPU to trace and compile at the first check of 3,300 arrays. Each checksum is still
    its shard's own."""
    from jaxlaunch.workers.supervision import replica_sums

    tree = {**{f"w{i}": jnp.full((8,), i, jnp.float32) for i in range(150)},
            **{f"m{i}": jnp.full((4, 4), i, jnp.bfloat16) for i in range(3)},
            **{f"big{i}": jnp.full((512, 512), i, jnp.float32) for i in range(6)}}  # 1 MiB each
    calls = []
    hashes = replica_sums._hashes
    monkeypatch.setattr(replica_sums, "_hashes", lambda shards: calls.append(list(shards)) or hashes(shards))
    sums = PendingChecksums(2, tree, every_shard=True).result().sums
    assert sorted(len(c) for c in calls) == [2, 3, 4, 22, 64, 64], "64 + 64 + 22 small, 3 of another shape, 4 MiB + 2"
    assert all(len({(s.shape, s.dtype) for s in c}) == 1 for c in calls)
    alone = {f"['{name}']": int(replica_sums._hash(leaf)) for name, leaf in tree.items()}
    assert {path: value for path, _, value in sums} == alone
