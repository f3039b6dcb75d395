"""A user's train state, abstract first: its shape, its shardings on today's mesh, and the two ways to
make it real (materialised straight into its shardings, or restored into them).

`init()` may build NNX objects (a Module, an nnx.Optimizer, or a tuple, list or dict of them) or any
pytree of arrays. Shardings come from the NNX annotations (`nnx.with_partitioning`) mapped through
the user's logical-axis rules; plain pytrees take `shardings` (a pytree of PartitionSpecs, or a
function of a leaf's path and abstract value); anything unannotated is replicated."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxlaunch.workers.sharding import Rules, partition_spec

Shardings = Any
"""A pytree of PartitionSpec/NamedSharding shaped like init()'s output, or a function
(path: str, leaf: jax.ShapeDtypeStruct) -> PartitionSpec | None."""


def _is_nnx(tree: Any) -> bool:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Pytree | nnx.Variable))
    return any(isinstance(x, nnx.Pytree | nnx.Variable) for x in leaves)


def _path(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


@dataclasses.dataclass
class StateLayout:
    """The abstract state: its structure, the abstract leaves and their shardings on `mesh`."""

    is_nnx: bool
    structure: Any
    """nnx GraphDef, or a jax treedef for plain pytrees."""
    abstract: Any
    """The state's leaves as ShapeDtypeStructs (an nnx.State for NNX, the pytree otherwise)."""
    shardings: Any
    mesh: Mesh
    _order: _LeafOrder | None = dataclasses.field(default=None, repr=False, compare=False)
    """How an NNX state's arrays sit in its objects' own pytree, learnt at the first split (`split`)."""

    @classmethod
    def of(cls, init: Callable[[], Any], mesh: Mesh, rules: Rules | None = None,
           shardings: Shardings = None) -> StateLayout:
        # Annotations only: shardings are applied by jit's out_shardings, never eagerly and with no
        # mesh in context (annotations name logical axes), so the same init() serves abstract
        # evaluation and the sharded initialiser.
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(init)
        if _is_nnx(abstract):
            graphdef, state = nnx.split(abstract)

            def sharding(variable: nnx.Variable) -> nnx.Variable:
                value = variable.get_value()
                axes = variable.get_metadata().get("out_sharding")
                return variable.replace(NamedSharding(mesh, partition_spec(value.shape, axes, mesh, rules)))

            specs = jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
            return cls(True, graphdef, state, specs, mesh)
        treedef = jax.tree.structure(abstract)
        return cls(False, treedef, abstract, _tree_shardings(abstract, shardings, mesh), mesh)

    def targets(self) -> Any:
        """Restore targets: ShapeDtypeStructs that carry today's NamedSharding, built leaf by leaf
        (`nnx.eval_shape` can drop shardings: flax issue 5110)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.shardings)

    def materialize(self, init: Callable[[], Any]) -> Any:
        """A fresh state made straight into its shardings: each process computes only its own
        shards, and no host ever holds a full copy of a sharded array."""
        is_nnx = self.is_nnx

        def make() -> Any:
            with nnx.use_eager_sharding(False):
                built = init()
            return nnx.split(built)[1] if is_nnx else built

        return jax.jit(make, out_shardings=self.shardings)()

    def merge(self, state: Any) -> Any:
        """The state in the form init() returned it (live NNX objects for NNX)."""
        return nnx.merge(self.structure, state) if self.is_nnx else state

    def split(self, obj: Any) -> Any:
        """The arrays of `obj` (what init() returned, trained) as the tree a checkpoint holds."""
        if self.is_nnx:
            if not _is_nnx(obj):
                raise TypeError("ctx.maybe_save got a state without NNX objects, but init() built NNX objects: "
                                "pass the same objects restore_or_init returned")
            leaves, objects = jax.tree.flatten(obj)
            order = self._order
            known = order is not None and objects == order.objects
            fast = order.take(leaves) if order is not None and known else None
            if fast is not None:
                return fast
            graphdef, state = nnx.split(obj)
            if graphdef != self.structure:
                raise TypeError("ctx.maybe_save got a state whose structure differs from what init() built: "
                                "pass the same objects restore_or_init returned")
            if not known:
                self._order = _LeafOrder.learn(leaves, objects, state)
            return state
        if jax.tree.structure(obj) != self.structure:
            raise TypeError(f"ctx.maybe_save got a pytree of structure {jax.tree.structure(obj)}, but init() "
                            f"built {self.structure}: pass the state in the form restore_or_init returned")
        return obj

    def num_bytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self.abstract)
                   if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))

    def mismatch(self, saved_tree: Any) -> str | None:
        """Why a checkpoint's state (its tree metadata) cannot be restored into this layout, or None."""
        saved = {_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
        wanted = {_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(self.abstract)[0]}
        missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
        if missing or extra:
            parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
                [f"unexpected {', '.join(extra[:3])}"] if extra else [])
            return "; ".join(parts)
        for key, leaf in wanted.items():
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                continue
            shape = tuple(getattr(saved[key], "shape", leaf.shape) or ())
            if shape != tuple(leaf.shape):
                return f"{key} has shape {shape} in the checkpoint, {tuple(leaf.shape)} now"
        return None


def _tree_shardings(abstract: Any, shardings: Shardings, mesh: Mesh) -> Any:
    def named(spec: Any) -> NamedSharding:
        if isinstance(spec, NamedSharding):
            return spec
        return NamedSharding(mesh, spec if isinstance(spec, PartitionSpec) else PartitionSpec())

    if shardings is None:
        return jax.tree.map(lambda _: named(None), abstract)
    if callable(shardings):
        return jax.tree_util.tree_map_with_path(lambda p, leaf: named(shardings(_path(p), leaf)), abstract)
    leaves, treedef = jax.tree.flatten(abstract)
    specs = jax.tree.leaves(shardings, is_leaf=lambda x: x is None or isinstance(x, PartitionSpec | NamedSharding))
    if len(specs) != len(leaves):
        raise ValueError(f"restore_or_init(shardings=...) has {len(specs)} entries but init() builds {len(leaves)} "
                         f"arrays: give one PartitionSpec (or None) per array, or a function of (path, leaf)")
    return jax.tree.unflatten(treedef, [named(spec) for spec in specs])


def largest_array(state: Any) -> tuple[str, jax.Array]:
    """The state's largest array (the first by path among equals): evidence of where a restore put
    things."""
    leaves = [(_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
              if isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    size = max(x.size for _, x in leaves)
    return min((item for item in leaves if item[1].size == size), key=lambda item: item[0])


@dataclasses.dataclass(frozen=True)
class _LeafOrder:
    """An NNX state's split without walking its object graph: NNX objects are pytrees, so their
    arrays come out of `jax.tree.flatten` (0.6 ms for the small preset's model and optimizer, 231
    arrays) where `nnx.split` walks the graph in Python (6.3 ms, at every save). Learnt from one full
    split: where each of the state's arrays sits among the objects' leaves, by identity. Used only
    while the objects' pytree structure is the one learnt (same modules, attributes and variables)
    and no array appears twice among the leaves (a variable reachable by two paths, tied after the
    split was learnt, is one entry of nnx.split's state: the full split and its check decide)."""

    objects: Any
    """The objects' pytree structure when learnt."""
    state: Any
    """The split state's pytree structure (its nnx.State and variables)."""
    positions: tuple[int, ...] | None
    """Per leaf of the state, its position among the objects' leaves; None when identities cannot
    tell them apart for this structure (then every save of it takes the full split, learning nothing)."""

    @classmethod
    def learn(cls, leaves: list[Any], objects: Any, state: Any) -> _LeafOrder:
        """From the objects' leaves and their full split. Not learnable: a leaf that is not a JAX
        array (a Python number may be shared), or one array under two names (tied or aliased variables)."""
        wanted, structure = jax.tree.flatten(state)
        where = {id(x): i for i, x in enumerate(leaves)}
        learnable = (all(isinstance(x, jax.Array) for x in (*leaves, *wanted)) and len(where) == len(leaves)
                     and len(wanted) == len(leaves) and len({id(x) for x in wanted}) == len(wanted)
                     and all(id(x) in where for x in wanted))
        return cls(objects, structure, tuple(where[id(x)] for x in wanted) if learnable else None)

    def take(self, leaves: list[Any]) -> Any:
        """The state from the leaves of objects of the learnt structure, or None (not learnable, or
        an array that now appears twice)."""
        if self.positions is None or len({id(x) for x in leaves}) != len(leaves):
            return None
        return jax.tree.unflatten(self.state, [leaves[i] for i in self.positions])
