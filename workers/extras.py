"""State that is not arrays, saved with every checkpoint of either tier: iterators with
get_state()/set_state() (a Grain DataLoader or IterDataset iterator) and plain JSON values. Each host
keeps its own: a host's position in its data is its own."""

from __future__ import annotations

import base64
import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def _stateful(value: Any) -> bool:
    return callable(getattr(value, "get_state", None)) and callable(getattr(value, "set_state", None))


def snapshot(extra: dict[str, Any]) -> dict[str, Any]:
    """The values to save now: an iterator's state (bytes travel as base64), a value as it is."""
    out = {}
    for name, value in extra.items():
        if _stateful(value):
            state = value.get_state()
            out[name] = ({"bytes": base64.b64encode(state).decode()} if isinstance(state, bytes)
                         else {"state": state})
        else:
            out[name] = {"value": value}
    json.dumps(out)  # a value that a durable checkpoint could not hold fails now, at its first save
    return out


def restore(extra: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """`extra` with the saved values: iterators set back in place, values replaced. A name the
    checkpoint lacks keeps its initial value."""
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
    """A host's values from a checkpoint's list of every host's: its own rank's, or on fewer or more
    hosts than saved it, those of rank `rank % saved hosts`."""
    if isinstance(saved, dict):
        return saved
    return saved[rank % len(saved)] if saved else {}
