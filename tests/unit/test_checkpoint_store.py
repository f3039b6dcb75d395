"""Orbax checkpoints in a run directory on S3 (moto's server) and GCS (fake-gcs-server), in one
process: committed by Orbax's commit file, a save cut short never counts and is saved anew, and a
step reads back with plain Orbax."""

from __future__ import annotations

import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxlaunch.workers.checkpoints.durable import Checkpointer, read_arrays

from jaxlaunch.contract.layout import committed_steps
from jaxlaunch.contract.protocol import CheckpointConfig
from jaxlaunch.contract.store import open_store
from tests.integration.object_stores import EMULATORS


@pytest.fixture(params=sorted(EMULATORS))
def checkpoints(request, monkeypatch):
    with EMULATORS[request.param]() as emulator:
        bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
        emulator.create_bucket(bucket)
        for key, value in emulator.env.items():
            monkeypatch.setenv(key, value)
        yield f"{emulator.scheme}://{bucket}/run/checkpoints"


def test_a_save_cut_short_never_counts_and_the_step_is_saved_anew(checkpoints):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=sharding)}
    first = Checkpointer(checkpoints, CheckpointConfig())
    first.save(10, {"w": jnp.arange(16.0).reshape(4, 4)}, {"step": 10})
    first.wait()
    first.close()
    store = open_store(checkpoints)
    # The save of step 20 was cut short: its metadata and part of its state, no commit file.
    store.write("20/_CHECKPOINT_METADATA", store.read("10/_CHECKPOINT_METADATA"))
    store.write("20/state/_METADATA", b"{}")
    assert committed_steps(checkpoints) == [10], "a step without Orbax's commit file does not exist"

    again = Checkpointer(checkpoints, CheckpointConfig())
    restored = again.restore_latest(target)
    assert restored.step == 10 and restored.meta == {"step": 10}
    again.save(20, {"w": restored.state["w"] * 2}, {"step": 20})
    again.wait()
    again.close()
    assert committed_steps(checkpoints) == [20, 10]
    np.testing.assert_array_equal(read_arrays(f"{checkpoints}/20")["['w']"], np.arange(16.0).reshape(4, 4) * 2)


@pytest.mark.parametrize("name", sorted(EMULATORS))
def test_a_store_endpoint_that_changes_in_the_process_is_the_one_written_to(name, monkeypatch):
    """Two emulators one after the other in one process (a notebook's new settings, a test after
    another): each save reaches the endpoint of its day, never a cached one that is gone."""
    for _ in range(2):
        with EMULATORS[name]() as emulator:
            bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
            emulator.create_bucket(bucket)
            for key, value in emulator.env.items():
                monkeypatch.setenv(key, value)
            url = f"{emulator.scheme}://{bucket}/run/checkpoints"
            checkpointer = Checkpointer(url, CheckpointConfig())
            checkpointer.save(1, {"w": jnp.ones((2, 2))}, {"step": 1})
            checkpointer.wait()
            checkpointer.close()
            assert committed_steps(url) == [1]
