"""The global device mesh and the mapping of logical parameter axes onto it."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from launcher.config import resolve_mesh

# Logical axis -> mesh axis. `embed` over `data` is FSDP (parameters and optimizer state are split
# across the data-parallel hosts); `heads`, `mlp` and `vocab` over `model` is tensor parallelism.
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "embed": "data",
    "heads": "model",
    "mlp": "model",
    "vocab": "model",
    "pos": None,
}
BATCH_AXIS = "data"


def build_mesh(axes: dict[str, int], devices: list | None = None) -> Mesh:
    """A mesh over every device of every process (or `devices`), one axis size possibly -1."""
    devices = jax.devices() if devices is None else devices
    sizes = resolve_mesh(axes, len(devices))
    return jax.make_mesh(
        tuple(sizes.values()),
        tuple(sizes),
        axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
        devices=devices,
    )


def partition_spec(shape: tuple[int, ...], logical_axes: tuple[str | None, ...] | None, mesh: Mesh) -> PartitionSpec:
    """Maps logical axes to mesh axes; a dimension the mesh axis does not divide stays replicated."""
    if not logical_axes:
        return PartitionSpec()
    spec, used = [], set()
    for dim, name in zip(shape, logical_axes, strict=True):
        axis = LOGICAL_AXIS_RULES.get(name) if name else None
        if axis is None or axis not in mesh.shape or axis in used or dim % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def _logical_axes(variable: nnx.Variable):
    return variable.get_metadata().get("out_sharding")


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
    """The NamedSharding of every leaf of an (abstract) nnx.State, from its logical annotations."""

    def sharding(variable: nnx.Variable) -> nnx.Variable:
        value = variable.get_value()
        spec = partition_spec(value.shape, _logical_axes(variable), mesh)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_targets(abstract_state: nnx.State, shardings: nnx.State) -> nnx.State:
    """Restore targets: ShapeDtypeStruct leaves that carry their new NamedSharding.

    Built leaf by leaf rather than read from `nnx.eval_shape`, which can drop shardings
    (flax issue 5110)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch split over the data axis, replicated over the others."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS if BATCH_AXIS in mesh.shape else None))
