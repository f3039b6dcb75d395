"""Topology-invariant input: the global batch of a step, built from a function of (step, rows).

Row `i` of step `s` is whatever `rows_fn(s, [.., i, ..])` makes of it, so the global batch is the
same on 1 host or 64; each process calls the function only for the rows its own devices hold."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

RowsFn = Callable[[int, np.ndarray], Any]
"""(step, row indices) -> a pytree of numpy arrays whose leading dimension is len(rows)."""
Index = tuple[slice, ...]
"""A device's part of a global array: a slice per dimension."""


def batch_axes(mesh: Mesh, axes: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over: `axes`, or "data" where the mesh has it."""
    if axes is None:
        return ("data",) if "data" in mesh.shape else ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def global_batch(rows_fn: RowsFn, step: int, batch_size: int, mesh: Mesh,
                 axes: str | Sequence[str] | None = None) -> Any:
    """The batch of `step` as global jax.Arrays, rows split over `axes` (default: "data"),
    everything else replicated."""
    split = batch_axes(mesh, axes)
    ways = int(np.prod([mesh.shape[a] for a in split])) if split else 1
    if batch_size % ways:
        raise ValueError(f"a batch of {batch_size} rows does not split {ways} ways over mesh axes {split}: "
                         f"use a batch size that is a multiple of {ways}")
    spec_axis = (split[0] if len(split) == 1 else split) if split else None
    rows_sharding = NamedSharding(mesh, PartitionSpec(spec_axis))
    cache: dict[tuple[int, int], list[np.ndarray]] = {}
    treedef = None

    def rows_of(index: Index | None) -> list[np.ndarray]:
        nonlocal treedef
        assert index is not None, "a NamedSharding gives every device a slice"
        start, stop, _ = index[0].indices(batch_size)
        if (start, stop) not in cache:
            leaves, treedef = jax.tree.flatten(rows_fn(step, np.arange(start, stop)))
            for leaf in leaves:
                if np.shape(leaf)[:1] != (stop - start,):
                    raise ValueError(f"the batch function returned an array of shape {np.shape(leaf)} for "
                                     f"{stop - start} rows: its leading dimension must be the number of rows")
            cache[(start, stop)] = [np.asarray(leaf) for leaf in leaves]
        return cache[(start, stop)]

    def leaf_part(leaf: int, index: Index | None) -> np.ndarray:
        """A device's part of one leaf: its rows, and its slice of the trailing dimensions."""
        assert index is not None, "a NamedSharding gives every device a slice"
        return rows_of(index)[leaf][(slice(None), *index[1:])]

    # One call for this process's first rows tells the structure and the trailing shapes.
    first_index = next(iter(rows_sharding.addressable_devices_indices_map((batch_size,)).values()))
    sample = rows_of(first_index)
    arrays = []
    for i, leaf in enumerate(sample):
        shape = (batch_size, *leaf.shape[1:])
        sharding = NamedSharding(mesh, PartitionSpec(spec_axis, *([None] * (leaf.ndim - 1))))
        arrays.append(jax.make_array_from_callback(shape, sharding, functools.partial(leaf_part, i)))
    return jax.tree.unflatten(treedef, arrays)
