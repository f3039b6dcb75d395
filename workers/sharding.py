"""The global device mesh, and shardings from logical axis annotations (its sizes come from
`jaxlaunch.contract.mesh`, which the driver validates with)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from jaxlaunch.contract.mesh import resolve_mesh

if TYPE_CHECKING:
    from jax.sharding import Mesh, PartitionSpec

Rules = Mapping[str, "str | tuple[str, ...] | None"]
"""Logical axis name -> mesh axis (or axes, or None for replicated)."""


def build_mesh(axes: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A mesh over every device of every process (or `devices`), one axis size possibly -1. Axis
    types are Auto: shardings propagate from the arrays without annotations everywhere."""
    import jax

    devices = jax.devices() if devices is None else devices
    sizes = resolve_mesh(axes, len(devices))
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes),
                         axis_types=(jax.sharding.AxisType.Auto,) * len(sizes), devices=devices)


def partition_spec(shape: tuple[int, ...], logical_axes: tuple | None, mesh: Mesh,
                   rules: Rules | None) -> PartitionSpec:
    """Maps a leaf's logical axes to mesh axes. A name maps through `rules`, or to itself when it is a
    mesh axis; a mesh axis that is absent, already used, or does not divide the dimension leaves the
    dimension replicated (so a small layer still works on a large mesh)."""
    from jax.sharding import PartitionSpec

    if not logical_axes:
        return PartitionSpec()
    spec: list[str | tuple[str, ...] | None] = []
    used: set[str] = set()
    for dim, name in zip(shape, logical_axes, strict=True):
        target = None
        if name is not None:
            target = rules[name] if rules is not None and name in rules else (name if name in mesh.shape else None)
        axes = tuple(a for a in ((target,) if isinstance(target, str) else (target or ())) if a in mesh.shape)
        size = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if not axes or used & set(axes) or dim % size:
            spec.append(None)
        else:
            spec.append(axes[0] if len(axes) == 1 else axes)
            used |= set(axes)
    return PartitionSpec(*spec)
