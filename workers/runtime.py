"""Platform set-up and `jax.distributed` start and stop for one host process (its environment,
`jaxlaunch.contract.protocol.host_env`, is set by the driver before the process imports JAX)."""

from __future__ import annotations

import logging
import math
import os
import pathlib
import socket
import stat
import time

from jaxlaunch.workers.compat.jax import write_cache_from_every_process

from jaxlaunch.contract.protocol import DistributedConfig, ErrorKind

log = logging.getLogger(__name__)


def private_directory(path: pathlib.Path) -> str | None:
    """Why `path` is not safe for code that will be loaded and run (None: it is): it must be owned
    by this user and writable by nobody else, or anyone who can write it runs code in the job."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as err:
        return f"cannot create {path}: {err.strerror}"
    if info.st_uid != os.getuid():
        return f"{path} belongs to uid {info.st_uid}, not to this user ({os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by its group or by others (mode {stat.filemode(info.st_mode)})"
    return None


CACHE_WRITES_ENV = "JAXLAUNCH_CACHE_WRITES"
"""Set to "process0" in a host's environment to keep JAX's own rule (only process 0 writes)."""
CACHE_MAX_BYTES = 4 * 2**30
"""JAX evicts the least recently used compiled programs beyond this."""


def default_cache_dir() -> str:
    """The job user's own compilation cache on this host, shared by all their runs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxlaunch", "compile")


def enable_compilation_cache(directory: str) -> str | None:
    """JAX's persistent compilation cache in `directory`, if it is the job user's alone (the cache
    is loaded as native code). Returns why it was not enabled, or None."""
    import jax

    problem = private_directory(pathlib.Path(directory))
    if problem is not None:
        log.warning("compilation cache disabled: %s", problem)
        return problem
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    # GPU autotuning options would put the cache's path into every key; off, a moved cache folder
    # keeps its entries.
    jax.config.update("jax_persistent_cache_enable_xla_caches", "")
    if os.environ.get(CACHE_WRITES_ENV) != "process0":  # the benchmarks' way to measure JAX's own behaviour
        write_cache_from_every_process()
    return None


def initialize(*, coordinator_address: str, num_processes: int, process_id: int, bind_address: str,
               platform: str, timeouts: DistributedConfig) -> None:
    """Joins the job's JAX processes. Every timeout is explicit: JAX's defaults (300 s start-up,
    100 s heartbeat) would leave survivors of a failure waiting for minutes."""
    import jax

    if platform == "cpu":
        # Across processes CPU collectives need gloo; within one process XLA's own are faster
        # (measured: 35% more steps per second for a 1-host job).
        jax.config.update("jax_cpu_collectives_implementation", "gloo" if num_processes > 1 else None)
    deadline = time.monotonic() + timeouts.init_timeout_s
    if process_id != 0 and not wait_for_coordinator(coordinator_address, deadline):
        log.warning("the coordinator at %s (process 0) did not listen within %d s", coordinator_address,
                    timeouts.init_timeout_s)
    log.info("jax.distributed.initialize(coordinator=%s, num_processes=%d, process_id=%d)",
             coordinator_address, num_processes, process_id)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=max(1, math.ceil(deadline - time.monotonic())),
        heartbeat_timeout_seconds=timeouts.heartbeat_timeout_s,
        shutdown_timeout_seconds=timeouts.shutdown_timeout_s,
        coordinator_bind_address=bind_address,
    )
    log.info("joined: process %d of %d, %d local and %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


COORDINATOR_POLL_S = (0.005, 0.05)
"""A host tries the coordinator's port again after 5 ms, then 1.5 times longer each time, up to
50 ms: soon after process 0 opens it, without hundreds of tries a second while process 0 is slow."""


def wait_for_coordinator(address: str, deadline: float) -> bool:
    """Whether the coordinator (process 0's `jax.distributed` service) accepts connections at
    `address` ("host:port") before `deadline` (time.monotonic()). A host that joins before process 0
    has opened it is refused, and JAX's client then waits out gRPC's reconnect backoff: 1 s after
    the first refusal, growing with each, measured as a second lost in half the joins of two hosts
    started at once. Trying a plain TCP connection until one is taken costs milliseconds."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # an IPv6 address is written [::1]:port
    pause, longest = COORDINATOR_POLL_S
    while True:
        remaining = deadline - time.monotonic()
        try:
            socket.create_connection((host, int(port)), timeout=max(0.1, min(1.0, remaining))).close()
            return True
        except OSError:
            if remaining <= pause:
                return False
            time.sleep(pause)
            pause = min(longest, pause * 1.5)


def shutdown() -> None:
    import jax

    jax.distributed.shutdown()


_PEER_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED", "FAILED_PRECONDITION")
_PEER_TEXT = ("gloo", "nccl", "by peer", "coordination service", "heartbeat")


def error_kind(err: BaseException) -> ErrorKind:
    """What kind of failure an exception on a host is. A collective error is a JAX runtime error that
    a lost peer causes; the user's own exceptions are never taken for one, whatever their text."""
    import jax
    from jaxlaunch.workers.checkpoints.durable import CheckpointError

    from jaxlaunch.contract.storage import chain

    for e in chain(err):
        if isinstance(e, CheckpointError):
            return e.kind
    for e in chain(err):
        if isinstance(e, jax.errors.JaxRuntimeError):
            text = str(e)
            if text.split(":", 1)[0].strip() in _PEER_STATUS or any(m in text.lower() for m in _PEER_TEXT):
                return ErrorKind.COLLECTIVE
    return ErrorKind.USER
