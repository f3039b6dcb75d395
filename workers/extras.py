"""State that is not arrays, saved with every checkpoint of either tier: iterators with
get_state()/set_state() (a Grain DataLoader or IterDataset iterator, or an ElasticIterator) and plain
JSON values. What each kind means across host counts: `jaxlaunch.contract.data_order`.

A per-host iterator is restored from the host's own saved part (on another host count, saved host
`r % N`'s). JSON values and elastic iterator states are restored from rank 0's part on every host:
the checkpoint's metadata (one copy, rank 0's, in either tier) carries them, so they are the same
on every host whatever the host count."""

from __future__ import annotations

import base64
import functools
import json
import sys
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlaunch.contract.data_order import GLOBAL_SCOPE, per_host_keys


def _stateful(value: Any) -> bool:
    return callable(getattr(value, "get_state", None)) and callable(getattr(value, "set_state", None))


def _elastic(value: Any) -> bool:
    """Grain's ElasticIterator, or the iterator `iter()` of one returns (`for batch in it`): its state
    is the same on every host and valid on any host count. (A value cannot be one unless the user's
    code imported Grain.)"""
    if "grain" not in sys.modules:
        return False
    return isinstance(value, _elastic_types())


@functools.cache
def _elastic_types() -> tuple[type, ...]:
    """ElasticIterator and the class of what `iter()` of one returns (a class Grain does not export:
    found through the public API, from an iterator over one example that reads nothing)."""
    import grain
    from grain.experimental import ElasticIterator

    one = ElasticIterator(grain.MapDataset.range(1), 1, grain.sharding.ShardOptions(shard_index=0, shard_count=1))
    return ElasticIterator, type(iter(one))


def snapshot(extra: dict[str, Any]) -> dict[str, Any]:
    """The values to save now: an iterator's state (bytes travel as base64), a value as it is."""
    out = {}
    for name, value in extra.items():
        if _stateful(value):
            state = value.get_state()
            out[name] = ({"bytes": base64.b64encode(state).decode()} if isinstance(state, bytes)
                         else {"state": state})
            if _elastic(value):
                out[name]["scope"] = GLOBAL_SCOPE
        else:
            out[name] = {"value": value}
    json.dumps(out)  # a value that a durable checkpoint could not hold fails now, at its first save
    return out


def shared(snapped: dict[str, Any]) -> dict[str, Any]:
    """The entries of a snapshot that every host restores from rank 0's: all but per-host iterators."""
    own = set(per_host_keys(snapped))
    return {name: entry for name, entry in snapped.items() if name not in own}


def per_host_names(extra: dict[str, Any]) -> list[str]:
    """The names of live `extra` values whose state is this host's own shard's position."""
    return sorted(name for name, value in extra.items() if _stateful(value) and not _elastic(value))


def restore(extra: dict[str, Any], own: dict[str, Any], rank_0: dict[str, Any] | None = None) -> dict[str, Any]:
    """`extra` with the saved values: iterators set back in place, values replaced. `own`: this host's
    saved part; `rank_0`: rank 0's shared entries (checkpoints written before they were kept take
    everything from `own`). A name the checkpoint lacks keeps its initial value."""
    saved = {**own, **(rank_0 or {})}
    out = dict(extra)
    for name, value in extra.items():
        held = saved.get(name)
        if held is None:
            continue
        if _stateful(value):
            value.set_state(base64.b64decode(held["bytes"]) if "bytes" in held else held["state"])
        else:
            out[name] = held.get("value")
    return out


def gather(mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every host's values, rank by rank, for a durable checkpoint (whose metadata one host writes)."""
    if jax.process_count() == 1:
        return [mine]
    data = np.frombuffer(json.dumps(mine).encode(), dtype=np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], dtype=np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), dtype=np.uint8)
    padded[:data.size] = data
    everyone = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:size]).decode()) for row, size in zip(everyone, sizes, strict=True)]


def of_rank(saved: list[dict[str, Any]] | dict[str, Any] | None, rank: int) -> dict[str, Any]:
    """A host's part from a checkpoint's list of every host's: its own rank's, or on fewer or more
    hosts than saved it, that of rank `rank % saved hosts` (whose per-host iterators then read
    another shard: `jaxlaunch.contract.data_order`)."""
    if isinstance(saved, dict):
        return saved
    return saved[rank % len(saved)] if saved else {}
