"""JAX: what no public API of JAX serves.

- Every process writes its own compiled programs to the persistent compilation cache: JAX has no
  public setting for which processes write the cache; `jax._src.compiler._cache_write` is wrapped.
- Whether an array's value is computed yet, without waiting for it (`ready`): `jax.Array` declares
  no such method; jaxlib's array class has `is_ready()`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)
WRITTEN_FOR = "0.10.2"
"""The jax release whose `jax._src.compiler._cache_write` this wraps (and whose arrays have `is_ready`)."""
PATCHED = "jax._src.compiler._cache_write, jaxlib's ArrayImpl.is_ready"
EVERY_PROCESS_MARK = "_jaxlaunch_every_process"
"""Marks JAX's cache writer once replaced (on the function object, which JAX's module holds)."""


def write_cache_from_every_process() -> bool:
    """On CPU, JAX keys a compiled program by each process's own topology (its process id and local
    devices), so process 1's restart looks for an entry only process 1 could have written, yet JAX
    writes entries from process 0 alone (jax/_src/compiler.py, `_cache_write`). Each process writes
    its own entry here, so every process of a restart loads instead of compiling (measured: 1.4 s
    -> 0.2 s for a host of rank 1). GPU and TPU keys are shared by every process: unchanged there.
    If its signature changed, this does nothing and says so."""
    import inspect

    from jax._src import compilation_cache, compiler, distributed
    from jax._src import config as jax_config

    original = getattr(compiler, "_cache_write", None)
    expected = ["cache_key", "compile_time_secs", "module_name", "backend", "executable", "host_callbacks"]
    if original is None or list(inspect.signature(original).parameters) != expected:
        log.warning("jax._src.compiler._cache_write changed: only process 0 writes the compilation cache")
        return False
    if getattr(original, EVERY_PROCESS_MARK, False):
        return True

    def cache_write(cache_key: str, compile_time_secs: float, module_name: str, backend: Any, executable: Any,
                    host_callbacks: Sequence[Any]) -> None:
        if distributed.global_state.process_id == 0 or backend.platform != "cpu" or host_callbacks:
            return original(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
        if compile_time_secs < jax_config.persistent_cache_min_compile_time_secs.value:
            return None
        try:  # the key holds this process's topology: a file of its own, no contention
            compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                      int(compile_time_secs))
        except Exception as err:  # noqa: BLE001 - as JAX itself does: a cache write never fails a job
            log.warning("could not write the compilation cache entry of %s: %s", module_name, err)
        return None

    setattr(cache_write, EVERY_PROCESS_MARK, True)
    compiler._cache_write = cache_write
    return True


def ready(values: Sequence[Any]) -> bool:
    """Whether every JAX array among `values` is computed already (waiting for them would return at
    once); False for an array without `is_ready` (then it is read back a step later, as before)."""
    import jax

    return all(getattr(v, "is_ready", lambda: False)() for v in values if isinstance(v, jax.Array))
