"""Input that stays exact when the host count changes, and a fingerprint to prove it.

`elastic_iterator(map_ds, global_batch_size)`: Grain's `ElasticIterator` sharded over this job's
hosts. Host r reads rows `g + r, g + r + N, ...` of the global stream from the global position `g`,
so the global batch of a step holds the same examples on any host count N (their order inside the
batch follows N). Its state (`{"global_next_index": g}`) is the same on every host: given to
`ctx.restore_or_init(..., extra=...)`, it restores on any host count.

`batch_fingerprint(batch)`: a 32-bit hash of a step's global batch, computed on the devices from the
global arrays, whatever their sharding: the sum over rows of a hash of each row's bytes. A sum is
exact (unsigned integers wrap) and blind to the rows' order, so the same examples give the same
fingerprint on any host count, and no host reads another's rows (XLA adds one scalar all-reduce).
Report it (`ctx.report(step, data_hash=batch_fingerprint(batch))`) and compare two runs'
metrics.jsonl step by step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)
"""Spreads the leaf and word positions over the 32-bit range before mixing."""


def elastic_iterator(map_ds: Any, global_batch_size: int, **options: Any) -> Any:
    """Grain's `ElasticIterator` over `map_ds` (unbatched, unsharded, without `filter`), in batches of
    this host's share of `global_batch_size` (which the host count must divide), sharded over the
    job's processes. `options`: ElasticIterator's own keywords (read_options, multiprocessing_options).
    Call `next()` on it directly and pass it itself in `extra`, so that jaxlaunch knows its state is
    valid on any host count."""
    import grain

    shards = grain.sharding.ShardOptions(shard_index=jax.process_index(), shard_count=jax.process_count(),
                                         drop_remainder=True)
    return grain.experimental.ElasticIterator(map_ds, global_batch_size, shards, **options)


def _mix(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit reaches every output bit."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _words(leaf: jax.Array) -> jax.Array:
    """A leaf of shape (rows, ...) as (rows, words) of uint32, bit for bit."""
    rows = leaf.reshape(leaf.shape[0], -1)
    if rows.dtype == jnp.bool_:
        rows = rows.astype(jnp.uint8)
    size = rows.dtype.itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(rows, jnp.uint32).reshape(rows.shape[0], -1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(rows, unsigned).astype(jnp.uint32)


@jax.jit
def batch_fingerprint(batch: Any) -> jax.Array:
    """A uint32 scalar (replicated on every device) that depends on the set of rows of the global
    batch and on each row's content: leaves are arrays whose first dimension is the row. Two batches
    with the same rows in any order, on any number of hosts, give the same value."""
    leaves = jax.tree.leaves(batch)
    row_hash = jnp.zeros(leaves[0].shape[0], jnp.uint32)
    for index, leaf in enumerate(leaves):
        words = _words(jnp.asarray(leaf))
        positions = jnp.arange(words.shape[1], dtype=jnp.uint32) + np.uint32(index) * _GOLDEN
        row_hash = row_hash + jnp.sum(_mix(words ^ _mix(positions)), axis=1, dtype=jnp.uint32)
    return jnp.sum(_mix(row_hash + _GOLDEN), dtype=jnp.uint32)
