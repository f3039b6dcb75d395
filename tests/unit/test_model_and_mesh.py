import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from launcher.config import DEFAULT_CLUSTER_CONFIG, load_file, override
from models.config import PRESETS, ModelConfig, preset
from models.transformer import build
from workers import mesh as mesh_lib
from workers.train import Trainer, TrainState


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_config(name):
    cfg = PRESETS[name]
    model = nnx.eval_shape(lambda: build(cfg, 0))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == cfg.num_params


def test_preset_sizes_are_the_advertised_orders_of_magnitude():
    assert 0.5e5 < preset("tiny").num_params < 2e5
    assert 0.5e7 < preset("small").num_params < 2e7
    assert 0.5e8 < preset("base").num_params < 2e8


def test_model_is_causal():
    cfg = ModelConfig(num_layers=1, d_model=16, num_heads=2, d_ff=32, max_seq_len=8)
    model = build(cfg, 0)
    tokens = jnp.arange(8)[None] % 256
    changed = tokens.at[0, 5].set(99)
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(a[0, :5], b[0, :5])
    assert not np.allclose(a[0, 5:], b[0, 5:])


def test_mesh_uses_every_device_with_inferred_axis():
    mesh = mesh_lib.build_mesh({"data": -1, "model": 2})
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert mesh.size == jax.device_count() == 8


def test_partition_spec_maps_logical_axes_and_replicates_what_does_not_divide():
    mesh = mesh_lib.build_mesh({"data": -1, "model": 2})
    assert mesh_lib.partition_spec((64, 256), ("embed", "mlp"), mesh) == P("data", "model")
    assert mesh_lib.partition_spec((256, 64), ("vocab", "embed"), mesh) == P("model", "data")
    assert mesh_lib.partition_spec((128, 64), ("pos", "embed"), mesh) == P(None, "data")
    assert mesh_lib.partition_spec((6, 3), ("embed", "mlp"), mesh) == P(None, None)  # 6 % 4, 3 % 2
    assert mesh_lib.partition_spec((7,), None, mesh) == P()


def _job(**changes):
    return override(load_file(DEFAULT_CLUSTER_CONFIG), **changes)


def test_train_state_shardings_follow_the_annotations():
    mesh = mesh_lib.build_mesh({"data": -1, "model": 2})
    trainer = Trainer(_job(), mesh)
    state = trainer.init_state()
    params = state["model"]
    assert params["blocks"][0]["mlp"]["up"]["kernel"].get_value().sharding.spec == P("data", "model")
    assert params["blocks"][0]["attention"]["out"]["kernel"].get_value().sharding.spec == P("model", "data")
    assert params["token_embedding"]["embedding"].get_value().sharding.spec == P("model", "data")
    # Adam's moments are sharded like their parameters (FSDP over the optimizer state too).
    mu = state["optimizer"]["opt_state"][1][0]["mu"]
    assert mu["blocks"][0]["mlp"]["up"]["kernel"].get_value().sharding.spec == P("data", "model")
    # No device holds a full copy of a sharded array.
    kernel = params["blocks"][0]["mlp"]["up"]["kernel"].get_value()
    assert kernel.addressable_shards[0].data.shape == (64 // 4, 256 // 2)


def test_restore_targets_carry_the_new_mesh_shardings():
    for axes, shard_shape in (({"data": -1, "model": 2}, (16, 128)), ({"data": 2, "model": 4}, (32, 64))):
        mesh = mesh_lib.build_mesh(axes)
        trainer = Trainer(_job(), mesh)
        target = trainer.restore_targets()["model"]["blocks"][0]["mlp"]["up"]["kernel"].get_value()
        assert isinstance(target, jax.ShapeDtypeStruct)
        assert target.sharding.mesh.shape == mesh.shape and target.sharding.spec == P("data", "model")
        assert target.sharding.shard_shape(target.shape) == shard_shape


def test_train_state_holds_step_and_rng():
    abstract = nnx.eval_shape(lambda: TrainState(preset("tiny"), _job().train))
    state = nnx.state(abstract)
    assert state["optimizer"]["step"].get_value().shape == ()
    assert state["data_key"].get_value().dtype == jnp.uint32
