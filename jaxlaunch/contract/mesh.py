"""Mesh sizes in plain Python: the driver validates a job's mesh with them before any host starts,
and the hosts build the same mesh from them."""

from __future__ import annotations

import math
from collections.abc import Mapping

from jaxlaunch.contract.protocol import ConfigError


def resolve_mesh(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Sizes of every mesh axis for `num_devices` devices, with the one -1 inferred."""
    if not axes:
        raise ConfigError("mesh needs at least one axis, e.g. {data: -1, model: 2}")
    inferred = [name for name, size in axes.items() if size == -1]
    bad = [name for name, size in axes.items()
           if size != -1 and (isinstance(size, bool) or not isinstance(size, int) or size < 1)]
    if bad or len(inferred) > 1:
        raise ConfigError(f"mesh sizes must be positive integers with at most one -1, got {dict(axes)}")
    known = math.prod(size for size in axes.values() if size != -1)
    if inferred and num_devices % known:
        raise ConfigError(f"mesh {mesh_str(axes)} does not divide the {num_devices} devices: "
                          f"choose axis sizes whose product divides {num_devices}")
    if not inferred and known != num_devices:
        raise ConfigError(f"mesh {mesh_str(axes)} needs {known} devices but the job has {num_devices}: "
                          f"make one axis -1 or change --hosts")
    return {name: (num_devices // known if size == -1 else size) for name, size in axes.items()}


def mesh_str(axes: Mapping[str, int]) -> str:
    return ",".join(f"{name}={size}" for name, size in axes.items())
