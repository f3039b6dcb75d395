"""Checksums of the shards that several hosts hold, to find a copy that silent corruption changed.

A shard is checked when another device holds a copy of the same global index (a replicated
parameter, or one sharded over fewer devices than the mesh has), on this host or another. Each host
hashes every local copy of each such index on its device (a jitted, bit-exact hash of the shard's
bytes, in chunks of one shape and dtype) and reads back one uint32 per copy: no collective, so the
step is never made to wait for another host. The driver compares the copies
(`jaxlaunch.launcher.control.replicas`): a copy corrupted on any device is seen, also with one host.

`flip_bit` is the `bitflip` injection: one bit of one device's copy of one replicated array."""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxlaunch.workers.inputs.data import _mix, _words

from jaxlaunch.contract.protocol import ReplicaChecksums

log = logging.getLogger(__name__)
Index = tuple[slice, ...]


def _index_text(index: Index, shape: tuple[int, ...]) -> str:
    """A global index as text, with every bound explicit: JAX writes a dimension a shard holds whole
    as `slice(None)` in one place and `slice(0, n)` in another, and both must name the same copy."""
    bounds = (s.indices(size)[:2] for s, size in zip(index, shape, strict=False))
    return "[" + ", ".join(f"{start}:{stop}" for start, stop in bounds) + "]"


def _replicated_shards(tree: Any, every_shard: bool = False) -> list[tuple[str, str, jax.Array]]:
    """(path, global index, a local copy) of every copy on this host of a shard another device also
    holds, in the order of the array's local shards (`every_shard`: of every shard, as if the whole
    state were replicated: the benchmark's worst case)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    layout = (treedef, every_shard, tuple((leaf.shape, leaf.dtype, leaf.sharding) if isinstance(leaf, jax.Array)
                                          else None for leaf in leaves))
    plan = _PLANS.get(layout)
    if plan is None:
        plan = _PLANS[layout] = _plan(tree, every_shard)
        while len(_PLANS) > MAX_PLANS:
            del _PLANS[next(iter(_PLANS))]
    # Leaves of one layout keep their local shards in one order. Each device's own copy: `addressable_data`
    # gives one copy for all of a fully replicated array.
    shards = {position: _hashable(leaves[position]).addressable_shards for position in {entry[0] for entry in plan}}
    return [(path, index, shards[position][local].data) for position, path, index, local in plan]


MAX_PLANS = 8
_PLANS: dict[Any, tuple[tuple[int, str, str, int], ...]] = {}
"""`_plan`'s answers by the state's structure, shapes, dtypes and shardings (and `every_shard`): the
same every step."""


def _plan(tree: Any, every_shard: bool) -> tuple[tuple[int, str, str, int], ...]:
    """(leaf's position, its path, a global index, which of the leaf's local shards) of every shard to
    check: worked out once per layout, as finding who holds which index walks every device of every
    array (a quarter of a small state's save, measured on examples/minimal.py)."""
    found = []
    for position, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        if not isinstance(leaf, jax.Array) or leaf.size == 0:
            continue
        leaf = _hashable(leaf)
        holders = collections.Counter(_index_text(index, leaf.shape)
                                      for index in leaf.sharding.devices_indices_map(leaf.shape).values())
        for local, shard in enumerate(leaf.addressable_shards):
            key = _index_text(shard.index, leaf.shape)
            if every_shard or holders[key] > 1:
                found.append((position, jax.tree_util.keystr(path), key, local))
    return tuple(found)


def _hashable(leaf: jax.Array) -> jax.Array:
    """A typed RNG key (nnx.Rngs) as its uint32 key data, which has bits to hash; any other array as it is."""
    return jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf


def _hash(shard: jax.Array) -> jax.Array:
    """One uint32 for one shard: a position-dependent sum of mixed 32-bit words (every bit counts)."""
    words = _words(jnp.reshape(shard, (1, -1)))[0]
    positions = jnp.arange(words.shape[0], dtype=jnp.uint32)
    return _mix(jnp.sum(_mix(words ^ _mix(positions)), dtype=jnp.uint32))


@jax.jit
def _hashes(shards: Sequence[jax.Array]) -> jax.Array:
    """One uint32 per shard of one shape and dtype, on one device: one program whatever their count
    (`_chunks` keeps it at most CHUNK_SHARDS)."""
    return jax.vmap(_hash)(jnp.stack(shards))


CHUNK_SHARDS = 64
CHUNK_BYTES = 4 << 20
"""At most this many shards, and (for more than one) this many bytes, hashed by one call. One
program over every shard of a state took a process's first check 2.6 s of CPU to trace and compile
for 330 shards, 36 s for 3,300 (a big model's count); in chunks of one shape, 0.35 and 0.66 s, steady
checks 2.0 and 21-23 ms either way (one process, 2 CPU devices, the same harness before and after). The
bytes bound what stacking the chunk may copy."""


def _chunks(datas: Sequence[jax.Array]) -> list[list[int]]:
    """Positions of `datas` in groups of one device, shape and dtype, each at most CHUNK_SHARDS long
    and, past its first shard, CHUNK_BYTES large: the same few programs serve every layer of a model."""
    groups: dict[Any, list[int]] = {}
    for position, data in enumerate(datas):
        groups.setdefault((next(iter(data.devices())), data.shape, data.dtype), []).append(position)
    chunks = []
    for positions in groups.values():
        size = max(1, min(CHUNK_SHARDS, CHUNK_BYTES // max(1, datas[positions[0]].nbytes)))
        chunks += [positions[i:i + size] for i in range(0, len(positions), size)]
    return chunks


class PendingChecksums:
    """Checksums dispatched to the devices at `step`, read back later (`result`), once the step's
    computation is done anyway: checking never makes the host wait for the device."""

    def __init__(self, step: int, tree: Any, every_shard: bool = False):
        self.step = step
        shards = _replicated_shards(tree, every_shard)
        self.keys = [(path, index) for path, index, _ in shards]
        datas = [data for _, _, data in shards]
        self.parts = [(positions, _hashes([datas[p] for p in positions])) for positions in _chunks(datas)]
        for _, hashes in self.parts:
            hashes.copy_to_host_async()

    def result(self) -> ReplicaChecksums:
        sums = [0] * len(self.keys)
        for positions, hashes in self.parts:
            for position, value in zip(positions, np.asarray(hashes), strict=True):
                sums[position] = int(value)
        return ReplicaChecksums(self.step, tuple((path, index, value) for (path, index), value
                                                 in zip(self.keys, sums, strict=True)))


def flip_bit(tree: Any) -> tuple[Any, str] | None:
    """`tree` with the lowest bit of the first element of this host's first local copy of its first
    replicated floating-point array flipped (every other copy, on this host's other devices and on
    other hosts, untouched), and that array's path; None when no array is replicated."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    replicated = {path for path, _, _ in _replicated_shards(tree)}
    for position, (path, leaf) in enumerate(leaves):
        name = jax.tree_util.keystr(path)
        if name not in replicated or not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        local = []
        for number, shard in enumerate(leaf.addressable_shards):
            data = np.array(shard.data)
            if number == 0:
                flat = data.reshape(-1).view(np.dtype(f"uint{8 * data.dtype.itemsize}"))
                flat[0] ^= 1
            local.append(jax.device_put(data, shard.device))
        flipped = jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, local)
        new = [v for _, v in leaves]
        new[position] = flipped
        return jax.tree_util.tree_unflatten(treedef, new), name
    return None
