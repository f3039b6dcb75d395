"""Abstract first, then sharded: meshes, shardings from annotations and rules, restore targets, the
model, and topology-invariant batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from jaxlaunch.models.config import PRESETS, ModelConfig, preset
from jaxlaunch.models.corpus import Corpus
from jaxlaunch.models.lm import SHARDING_RULES
from jaxlaunch.models.transformer import build
from jaxlaunch.workers import sharding as mesh_lib
from jaxlaunch.workers.inputs.batch import global_batch
from jaxlaunch.workers.state import StateLayout, largest_array


def lm_init():
    model = build(preset("tiny"), 0)
    return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_config(name):
    cfg = PRESETS[name]
    model = nnx.eval_shape(lambda: build(cfg, 0))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == cfg.num_params


def test_model_is_causal():
    cfg = ModelConfig(num_layers=1, d_model=16, num_heads=2, d_ff=32, max_seq_len=8)
    model = build(cfg, 0)
    tokens = jnp.arange(8)[None] % 256
    a, b = model(tokens), model(tokens.at[0, 5].set(99))
    np.testing.assert_array_equal(a[0, :5], b[0, :5])
    assert not np.allclose(a[0, 5:], b[0, 5:])


def test_mesh_uses_every_device_with_inferred_axis():
    mesh = mesh_lib.build_mesh({"data": -1, "model": 2})
    assert dict(mesh.shape) == {"data": 4, "model": 2} and mesh.size == jax.device_count() == 8


def test_partition_spec_maps_logical_axes_through_rules_and_replicates_what_does_not_divide():
    mesh = mesh_lib.build_mesh({"data": -1, "model": 2})
    rules = SHARDING_RULES
    assert mesh_lib.partition_spec((64, 256), ("embed", "mlp"), mesh, rules) == P("data", "model")
    assert mesh_lib.partition_spec((256, 64), ("vocab", "embed"), mesh, rules) == P("model", "data")
    assert mesh_lib.partition_spec((128, 64), ("pos", "embed"), mesh, rules) == P(None, "data")
    assert mesh_lib.partition_spec((6, 3), ("embed", "mlp"), mesh, rules) == P(None, None)  # 6 % 4, 3 % 2
    assert mesh_lib.partition_spec((7,), None, mesh, rules) == P()
    # Without rules a name that is a mesh axis maps to itself; other names are replicated.
    assert mesh_lib.partition_spec((8, 8), ("model", "embed"), mesh, None) == P("model", None)
    assert mesh_lib.partition_spec((8, 8), ("x", "y"), mesh, {"x": ("data", "model")}) == P(("data", "model"), None)


def test_nnx_state_shardings_follow_the_annotations_and_the_optimizer_follows_its_parameters():
    mesh = mesh_lib.build_mesh({"data": -1, "model": 2})
    layout = StateLayout.of(lm_init, mesh, SHARDING_RULES)
    state = layout.materialize(lm_init)
    model_state, optimizer_state = state[0], state[1]
    kernel = model_state["blocks"][0]["mlp"]["up"]["kernel"].get_value()
    assert kernel.sharding.spec == P("data", "model")
    assert model_state["token_embedding"]["embedding"].get_value().sharding.spec == P("model", "data")
    mu = optimizer_state["opt_state"][0]["mu"]["blocks"][0]["mlp"]["up"]["kernel"].get_value()
    assert mu.sharding.spec == P("data", "model"), "FSDP over the optimizer state too"
    assert kernel.addressable_shards[0].data.shape == (64 // 4, 256 // 2), "no device holds a full copy"
    model, optimizer = layout.merge(state)
    assert isinstance(model, nnx.Module) and isinstance(optimizer, nnx.Optimizer)


def test_restore_targets_carry_the_new_mesh_shardings():
    for axes, shard_shape in (({"data": -1, "model": 2}, (16, 128)), ({"data": 2, "model": 4}, (32, 64))):
        mesh = mesh_lib.build_mesh(axes)
        targets = StateLayout.of(lm_init, mesh, SHARDING_RULES).targets()
        target = targets[0]["blocks"][0]["mlp"]["up"]["kernel"].get_value()
        assert isinstance(target, jax.ShapeDtypeStruct)
        assert target.sharding.mesh.shape == mesh.shape and target.sharding.spec == P("data", "model")
        assert target.sharding.shard_shape(target.shape) == shard_shape


def test_a_plain_pytree_state_is_replicated_unless_shardings_say_otherwise():
    mesh = mesh_lib.build_mesh({"data": -1, "model": 2})

    def init():
        return {"w": jnp.ones((8, 4)), "b": jnp.zeros((4,)), "step": jnp.int32(0)}

    layout = StateLayout.of(init, mesh)
    assert not layout.is_nnx
    assert all(s.spec == P() for s in jax.tree.leaves(layout.shardings))
    sharded = StateLayout.of(init, mesh, shardings=lambda path, leaf: P("data") if path == "w" else None)
    state = sharded.materialize(init)
    assert state["w"].sharding.spec == P("data") and state["b"].sharding.spec == P()
    assert sharded.merge(state) is state
    listed = StateLayout.of(init, mesh, shardings={"b": None, "step": None, "w": P(None, "model")})
    assert listed.shardings["w"].spec == P(None, "model")
    with pytest.raises(ValueError, match="one PartitionSpec"):
        StateLayout.of(init, mesh, shardings={"w": P()})


def test_saving_a_state_of_another_structure_is_a_clear_error():
    mesh = mesh_lib.build_mesh({"data": -1, "model": 2})
    layout = StateLayout.of(lm_init, mesh, SHARDING_RULES)
    model, optimizer = layout.merge(layout.materialize(lm_init))
    assert layout.split((model, optimizer)) is not None
    with pytest.raises(TypeError, match="structure differs"):
        layout.split((optimizer, model))
    with pytest.raises(TypeError, match="without NNX objects"):
        layout.split({"w": jnp.ones(3)})


def test_a_checkpoint_of_another_model_is_named_as_such():
    mesh = mesh_lib.build_mesh({"data": -1, "model": 2})
    layout = StateLayout.of(lm_init, mesh, SHARDING_RULES)
    assert layout.mismatch(layout.abstract) is None
    other = StateLayout.of(lambda: (build(ModelConfig(num_layers=1, d_model=64, num_heads=4, d_ff=256,
                                                              max_seq_len=128), 0),
                                    nnx.Optimizer(build(preset("tiny"), 0), optax.adam(1e-3), wrt=nnx.Param)),
                           mesh, SHARDING_RULES)
    assert other.mismatch(layout.abstract).startswith("unexpected 0/blocks/1/"), "the checkpoint has more"
    assert layout.mismatch(other.abstract).startswith("missing 0/blocks/1/"), "the checkpoint has less"
    wider = StateLayout.of(lambda: {"w": jnp.ones((4, 4))}, mesh)
    assert "has shape (4, 2) in the checkpoint" in wider.mismatch({"w": jax.ShapeDtypeStruct((4, 2), jnp.float32)})


def test_largest_array_is_the_evidence_of_a_layout():
    mesh = mesh_lib.build_mesh({"data": -1, "model": 2})
    layout = StateLayout.of(lm_init, mesh, SHARDING_RULES)
    path, array = largest_array(layout.materialize(lm_init))
    assert array.size == max(x.size for x in jax.tree.leaves(layout.abstract)) and "/" in path


# ---- batches ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    return Corpus.load()


def test_default_corpus_is_real_text(corpus):
    assert len(corpus) > 1_000_000 and b"def " in corpus.tokens[:100_000].tobytes()


def test_rows_are_a_pure_function_of_seed_step_and_row(corpus):
    all_rows = corpus.rows(7, 3, np.arange(8), 8, 16)
    np.testing.assert_array_equal(corpus.rows(7, 3, np.arange(4, 8), 8, 16)[0], all_rows[0][4:])
    assert not np.array_equal(corpus.rows(7, 4, np.arange(8), 8, 16)[0], all_rows[0])
    assert not np.array_equal(corpus.rows(8, 3, np.arange(8), 8, 16)[0], all_rows[0])
    np.testing.assert_array_equal(all_rows[0][:, 1:], all_rows[1][:, :-1]), "targets are inputs shifted by one"


@pytest.mark.parametrize("axes", [{"data": 8}, {"data": -1, "model": 2}, {"data": 2, "model": 4}, {"model": 8}])
def test_the_global_batch_is_the_same_on_every_mesh_and_each_process_builds_its_own_rows(corpus, axes):
    mesh = mesh_lib.build_mesh(axes)
    asked = []

    def rows(step, indices):
        asked.append(tuple(indices))
        return corpus.rows(0, step, indices, 16, 8)

    inputs, targets = global_batch(rows, 5, 16, mesh)
    expected_inputs, expected_targets = corpus.rows(0, 5, np.arange(16), 16, 8)
    np.testing.assert_array_equal(np.asarray(inputs), expected_inputs)
    np.testing.assert_array_equal(np.asarray(targets), expected_targets)
    data = mesh.shape.get("data", 1)
    assert inputs.addressable_shards[0].data.shape[0] == 16 // data
    assert len(asked) == data, "one call per distinct block of rows, not one per device"


def test_a_batch_that_does_not_split_is_a_clear_error():
    mesh = mesh_lib.build_mesh({"data": -1, "model": 2})
    with pytest.raises(ValueError, match="multiple of 4"):
        global_batch(lambda step, rows: np.zeros((len(rows), 2)), 0, 6, mesh)
    with pytest.raises(ValueError, match="leading dimension must be the number of rows"):
        global_batch(lambda step, rows: np.zeros((3, 2)), 0, 8, mesh)


def test_user_data_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("more text " * 20)
    corpus = Corpus.load(str(tmp_path))
    assert corpus.tokens.tobytes() == (tmp_path / "a.txt").read_bytes() + (tmp_path / "sub" / "b.txt").read_bytes()


def test_a_save_takes_the_arrays_nnx_split_would_after_steps_and_a_replaced_array():
    """The save's split reads the objects' pytree once it learnt where each array sits: it must give
    exactly `nnx.split`'s state (structure and the very arrays) after the optimizer changed them and
    after the user replaced an array, and take the full split again when the structure changes."""
    mesh = mesh_lib.build_mesh({"data": -1, "model": 2})
    layout = StateLayout.of(lm_init, mesh, SHARDING_RULES)
    model, optimizer = layout.merge(layout.materialize(lm_init))

    def same_as_nnx_split(state):
        expected = nnx.split((model, optimizer))[1]
        assert jax.tree.structure(state) == jax.tree.structure(expected)
        assert all(a is b for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True))
        leaves, objects = jax.tree.flatten((model, optimizer))
        order = layout._order
        assert order is not None and order.objects == objects and order.take(leaves) is not None, \
            "the split took the learnt order, not the full split"

    same_as_nnx_split(layout.split((model, optimizer)))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: sum(jnp.sum(p ** 2) for p in jax.tree.leaves(nnx.state(m, nnx.Param))))(model)
        optimizer.update(model, grads)

    before = [np.asarray(x) for x in jax.tree.leaves(layout.split((model, optimizer)))]
    step(model, optimizer)
    after = layout.split((model, optimizer))
    same_as_nnx_split(after)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(after), strict=True))
    embedding = nnx.state(model, nnx.Param)
    path, variable = next(iter(nnx.to_flat_state(embedding)))
    replaced = jnp.full(variable.get_value().shape, 7.0, variable.get_value().dtype)
    nnx.update(model, nnx.from_flat_state([(path, variable.replace(replaced))]))
    same_as_nnx_split(layout.split((model, optimizer)))
    with pytest.raises(TypeError, match="structure differs"):
        layout.split((optimizer, model))
    # Tied after the order was learnt, with the same pytree structure: one module reachable by two paths is
    # one entry of nnx.split's graph, so the structure differs from what init() built.
    model.blocks[1].mlp = model.blocks[0].mlp
    assert jax.tree.flatten((model, optimizer))[1] == layout._order.objects
    with pytest.raises(TypeError, match="structure differs"):
        layout.split((model, optimizer))


def test_variables_sharing_one_array_are_split_by_walking_the_graph():
    """Two variables made from one array cannot be told apart by identity: the split keeps walking
    the graph, and each variable's own value is saved once they differ."""

    class Pair(nnx.Module):
        def __init__(self):
            zeros = jnp.zeros(3)
            self.a, self.b = nnx.Param(zeros), nnx.Param(zeros)

    mesh = mesh_lib.build_mesh({"data": -1})
    layout = StateLayout.of(Pair, mesh)
    pair = layout.merge(layout.materialize(Pair))
    pair.a.set_value(pair.b.get_value())  # one array under two names
    layout.split(pair)
    assert layout._order is not None and layout._order.positions is None, "not learnable: the full split"
    pair.b.set_value(jnp.ones(3))
    state = layout.split(pair)
    assert np.asarray(state["a"].get_value()).tolist() == [0, 0, 0]
    assert np.asarray(state["b"].get_value()).tolist() == [1, 1, 1]
