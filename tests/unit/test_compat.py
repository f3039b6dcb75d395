"""Every patch of another library's private code, held to the version it was written for: a new
release of that library fails here, naming the patch to check, before any job meets it."""

import importlib.metadata

import pytest
from jaxlaunch.launcher.compat import ray as ray_compat
from jaxlaunch.workers.compat import etils as etils_compat
from jaxlaunch.workers.compat import jax as jax_compat
from jaxlaunch.workers.compat import orbax as orbax_compat

PATCHES = {"orbax-checkpoint": orbax_compat, "jax": jax_compat, "etils": etils_compat, "ray": ray_compat}


@pytest.mark.parametrize("distribution", sorted(PATCHES))
def test_each_patch_is_for_the_installed_version(distribution):
    module = PATCHES[distribution]
    installed = importlib.metadata.version(distribution)
    assert installed == module.WRITTEN_FOR, (
        f"{module.__name__} patches {module.PATCHED}, written for {distribution} {module.WRITTEN_FOR}; "
        f"{installed} is installed: check the patch against its source, then move WRITTEN_FOR and the pin")


def test_the_patched_names_are_where_the_patches_expect_them():
    from etils.epath import backend
    from jax._src import compiler
    from orbax.checkpoint._src.serialization import tensorstore_utils

    assert callable(tensorstore_utils.build_kvstore_tspec)
    import jax
    from orbax.checkpoint import type_handlers

    default_array_handler = type_handlers.get_type_handler(jax.Array)
    assert default_array_handler._array_metadata_store is not None, "Orbax's default handler keeps array metadata"
    registry = orbax_compat.registry_with_small_arrays_whole()
    assert registry.get(jax.Array)._array_metadata_store is default_array_handler._array_metadata_store
    assert all(registry.get(ty) is type_handlers.get_type_handler(ty)
               for ty in type_handlers.supported_types() if ty is not jax.Array), "the other handlers are Orbax's"
    assert hasattr(backend._FileSystemSpecBackend._get_filesystem, "cache_clear")
    assert jax_compat.write_cache_from_every_process(), "JAX's _cache_write changed its signature"
    computed = jax.block_until_ready(jax.numpy.ones(3))
    assert computed.is_ready() and jax_compat.ready([computed, 1.0]), "jaxlib's arrays lost is_ready"
    assert getattr(compiler._cache_write, jax_compat.EVERY_PROCESS_MARK, False)


def test_s3_specs_go_to_tensorstore_s_s3_driver_at_today_s_endpoint(monkeypatch):
    from orbax.checkpoint._src.serialization import tensorstore_utils

    monkeypatch.setattr(tensorstore_utils, "build_kvstore_tspec", tensorstore_utils.build_kvstore_tspec)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    orbax_compat.route_s3_to_tensorstore()
    orbax_compat.route_s3_to_tensorstore()  # once per process, however often it is asked
    spec = tensorstore_utils.build_kvstore_tspec("s3://bucket/run/checkpoints/10/state", "w")
    flat = repr(spec)
    assert "'driver': 's3'" in flat and "gcs" not in flat and "http://127.0.0.1:9" in flat


YNN_PROBE = """
import jax, jax.numpy as jnp
x = jnp.ones((64, 64))
print(jax.jit(lambda a: jnp.tanh(a @ a).sum()).lower(x).compile().as_text())
"""


@pytest.mark.parametrize("ynnpack", [False, True])
def test_a_cpu_host_s_xla_flags_start_jax_and_decide_its_ynnpack_fusions(ynnpack):
    """`host_env`'s XLA_FLAGS hold `XLA_CPU_NO_YNN`, an option of today's jaxlib: an XLA that no longer
    knows it aborts every host at start, and one that no longer uses YNNPACK makes it useless."""
    import os
    import subprocess
    import sys

    from jaxlaunch.contract.protocol import host_env

    env = {**os.environ, **host_env("cpu", 2, ynnpack=ynnpack)}
    done = subprocess.run([sys.executable, "-c", YNN_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"JAX did not start with XLA_FLAGS={env['XLA_FLAGS']!r}: {done.stderr[-2000:]}"
    assert ("__ynn_fusion" in done.stdout) == ynnpack, done.stdout
