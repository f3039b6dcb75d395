"""The give-up persist's host program in one process: a memory part written durably without the
user's init, restored through the normal durable restore with the user's targets."""

import os
import sys
import textwrap

import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxlaunch.workers.checkpoints import memory, persist
from jaxlaunch.workers.checkpoints.durable import Checkpointer
from jaxlaunch.workers.checkpoints.part_file import PartFile, PartWriter
from jaxlaunch.workers.sharding import build_mesh
from jaxlaunch.workers.state import StateLayout

from jaxlaunch.contract import entry as entry_lib
from jaxlaunch.contract.protocol import CheckpointConfig, EntryRef

CFG = CheckpointConfig(async_save=False)


class Sharded(nnx.Module):
    """A hidden layer split over the mesh's `model` axis, and dropout with its RNG state."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 8, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                                         (None, "model")), rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)


def nnx_init():
    model = Sharded(nnx.Rngs(0, dropout=1))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def plain_init():
    """Lists, a dict with integer keys, an optimizer state with an empty member, a typed key."""
    params = {"w": jnp.arange(32.0).reshape(8, 4), "layers": [jnp.zeros(3), jnp.ones(3)], "z": {7: jnp.ones(2)}}
    return params, optax.adam(1e-2).init(params), jax.random.key(3)


def plain_shardings(path, leaf):
    return P("data") if path.endswith("w") else None


def part_of(tree, folder, structure=True):
    """A host's memory part of `tree`, as MemoryTier.save writes it, mapped back as a restore reads it."""
    pickled = cloudpickle.dumps(jax.tree.structure(tree)) if structure else None
    PartWriter().write(folder, "p.part", tree, {}, {}, pickled)
    return PartFile(folder / "p.part")


def assembled(targets, part):
    return memory.assemble(targets, memory.PartReader(0, [0], lambda rank: (part.header, part), None))


def values(tree):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


@pytest.mark.parametrize("init, shardings", [(nnx_init, None), (plain_init, plain_shardings)],
                         ids=["nnx", "plain-pytree"])
def test_a_part_written_without_init_restores_through_the_durable_restore(tmp_path, init, shardings):
    mesh = build_mesh({"data": 4, "model": 2})
    layout = StateLayout.of(init, mesh, shardings=shardings)
    saved = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         layout.materialize(init))  # a trained state, not init()'s
    part = part_of(saved, tmp_path)

    targets = persist.saved_targets(part.header, mesh)
    state = assembled(targets, part)
    writer = Checkpointer(tmp_path / "checkpoints", CFG)
    writer.save(5, state, {"step": 5})
    writer.wait()
    writer.close()

    restored = Checkpointer(tmp_path / "checkpoints", CFG).restore_latest(layout.targets(),
                                                                         check_structure=layout.mismatch)
    assert restored is not None and restored.step == 5
    assert jax.tree.structure(restored.state) == jax.tree.structure(saved)
    got, want = values(restored.state), values(saved)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got[key].dtype == want[key].dtype, key
    # Each array went back into the sharding that saved it: no host needed another's shards.
    for target, leaf in zip(jax.tree.leaves(targets), jax.tree.leaves(saved), strict=True):
        assert (target.sharding.addressable_devices_indices_map(target.shape)
                == leaf.sharding.addressable_devices_indices_map(leaf.shape)), (target, leaf.sharding)


def test_on_a_mesh_that_cannot_hold_the_saved_sharding_the_most_sharded_spec_that_divides_serves(tmp_path):
    saved = {"w": jax.device_put(jnp.arange(48.0).reshape(6, 8),
                                 NamedSharding(build_mesh({"data": 2, "model": 4}), P(None, ("data", "model"))))}
    part = part_of(saved, tmp_path)
    smaller = build_mesh({"data": 2, "model": 2}, jax.devices()[:4])
    targets = persist.saved_targets(part.header, smaller)
    (target,) = jax.tree.leaves(targets)
    assert target.sharding.spec == P("data", "model")  # 4 shards; 8 split 6 rows unevenly
    np.testing.assert_array_equal(np.asarray(assembled(targets, part)["w"]),
                                  np.arange(48.0).reshape(6, 8))


def test_a_part_without_a_structure_says_why(tmp_path):
    part = part_of({"w": jnp.zeros(2)}, tmp_path, structure=False)
    with pytest.raises(RuntimeError, match="no state structure"):
        persist.saved_targets(part.header, build_mesh({"data": -1}))


def test_a_persist_whose_newest_memory_step_does_not_read_back_writes_the_next_older_one(monkeypatch):
    """Memory holds steps 1 and 2 whole, but a bit of step 2's only copy flipped since its keeper held it:
    the give-up persist restores step 1 (bit for bit) and says why step 2 did not serve, where it wrote
    nothing and memory's newer-than-durable steps ended with the launcher. With step 1 flipped too,
    nothing is restored, and that is said too."""
    import uuid

    import ray
    from jaxlaunch.workers.checkpoints.keeper import Keeper, incoming_name
    from jaxlaunch.workers.supervision.progress import HostProgress

    from jaxlaunch.contract.events import MemoryFallback
    from jaxlaunch.contract.tiers import Held, Role
    from tests.unit.test_tiers import Remote, flip_a_bit

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    mesh = build_mesh({"data": -1})
    keeper = Keeper("a", budget_bytes=1 << 20, keep=3, launch_id=f"test-{uuid.uuid4().hex[:8]}")
    try:
        saved = {}
        for step in (1, 2):
            saved[step] = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4) * step, NamedSharding(mesh, P("data"))),
                           "b": [jnp.full(3, float(step))]}
            name = incoming_name(step, 0, os.getpid())
            PartWriter().write(keeper.incoming, name, saved[step], {"step": step}, {"best": {"value": step}},
                               cloudpickle.dumps(jax.tree.structure(saved[step])))
            assert keeper.hold(step, 0, 1, name, None, floor=step - 1).refused is None
        flip_a_bit(keeper.parts[(2, 0, Role.PRIMARY)][1])
        tier = object.__new__(memory.MemoryTier)  # its __init__ asks Ray for this node
        tier.keepers, tier.rank, tier.node, tier.attempt, tier.reading = {"a": Remote(keeper)}, 0, "a", 1, "persist-1"
        held = [Held.from_dict(h) for h in keeper.index()]
        steps = tier.whole_steps(held)
        assert steps == [2, 1]

        progress = HostProgress()
        restored = persist.newest_intact(tier, steps, held, mesh, progress, None)
        assert restored is not None and restored.step == 1
        assert jax.tree.structure(restored.state) == jax.tree.structure(saved[1])
        for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(saved[1]), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert restored.extras == {0: {"best": {"value": 1}}}, "the non-array state of the ranks this host writes"
        assert persist.saved_extras(restored.extras) == [{"best": {"value": 1}}]
        [said] = [e for e in progress.drain().events if isinstance(e, MemoryFallback)]
        assert said.step == 2 and said.reason.startswith("memory step 2 did not read back on host(s) [0]: ")
        assert "changed since it was held" in said.reason and said.reason.endswith("; writing memory step 1")

        flip_a_bit(keeper.parts[(1, 0, Role.PRIMARY)][1])
        tier.reading = "persist-2"  # a copy found intact is hashed once per reading
        assert persist.newest_intact(tier, steps, held, mesh, progress, 0) is None
        said = [e for e in progress.drain().events if isinstance(e, MemoryFallback)]
        assert [e.step for e in said] == [2, 1] and said[-1].reason.endswith("; no older memory step to write")
    finally:
        keeper.close()


STATE_CLASS = textwrap.dedent("""
    import dataclasses

    import jax


    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class TrainState:
        params: dict
        step: jax.Array
    """)


@pytest.mark.parametrize("where", ["entry-file", "module-beside-it"])
def test_a_state_class_of_the_job_s_own_code_is_found_by_the_persist(tmp_path, monkeypatch, where):
    """A dataclass state defined in the entry file (or a module beside it): its structure names the
    entry's module, which a persist process (that never imported the entry) could not find, so no
    memory step could be written at a give-up. The persist finds it where the hosts did."""
    folder = tmp_path / "job"
    folder.mkdir()
    if where == "entry-file":
        (folder / "train.py").write_text(STATE_CLASS + "\n\ndef main(ctx):\n    pass\n")
    else:
        (folder / "mystate.py").write_text(STATE_CLASS)
        (folder / "train.py").write_text("from mystate import TrainState\n\n\ndef main(ctx):\n    pass\n")
    ref = EntryRef(module="train", function="main", path=str(folder / "train.py"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    cls = entry_lib.load_entry(ref).__globals__["TrainState"]
    tree = cls({"w": jnp.arange(4.0)}, jnp.array(7))
    part = part_of(tree, tmp_path)
    # As in a persist process, which imported none of the job's code.
    for name in [cls.__module__, *(n for n in sys.modules if n.startswith(entry_lib.ENTRY_MODULE_PREFIX + "train"))]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(folder)])
    with pytest.raises(ModuleNotFoundError):
        persist.structure_of(part.header)
    treedef = persist.structure_of(part.header, ref)
    rebuilt = jax.tree.unflatten(treedef, jax.tree.leaves(tree))
    assert type(rebuilt).__name__ == "TrainState" and type(rebuilt) is not cls
    assert int(rebuilt.step) == 7 and np.array_equal(rebuilt.params["w"], np.arange(4.0))
