"""The Ray actor of one host: a fresh process that runs one attempt of the user's function.

Ray starts it with the platform environment already set (see `jaxlaunch.workers.runtime.host_env`), so JAX is
first imported inside `run`, after the process's output has been sent to its own log file.
`poll`, the stop requests and `kill` run in their own concurrency group, so the driver hears from a
host even while its training thread is blocked in a collective."""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import socket
import sys
import time
import traceback

import psutil
import ray
from jaxlaunch.workers.supervision.progress import HostProgress
from jaxlaunch.workers.supervision.stops import DriverStop

from jaxlaunch.contract import events
from jaxlaunch.contract.entry import mark_host_process
from jaxlaunch.contract.protocol import (
    MONITOR_GROUP,
    ErrorKind,
    HostError,
    HostResult,
    HostSnapshot,
    HostSpec,
    NodeInfo,
    Phase,
    StopAnswer,
)


def _node_ip() -> str:
    """The address this Ray node was started with (`ray start --node-ip-address`), which is the one
    its peers can reach; the machine's default address may not be."""
    node_id = ray.get_runtime_context().get_node_id()
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)


class HostActor:
    def __init__(self, log_path: str, attempt: int, rank: int):
        self.created = psutil.Process().create_time()
        self._start(log_path, attempt, rank)

    def warm(self) -> float:
        """A spare's warm-up while it waits (a standby group): import what every attempt needs, so
        that taking over skips it. Not the user's module: its import may compute with JAX, which must
        wait for jax.distributed. Never fails: a problem here shows again in `run`."""
        started = time.perf_counter()
        try:
            import flax.nnx  # noqa: F401
            import optax  # noqa: F401
            import orbax.checkpoint  # noqa: F401
            from jaxlaunch.workers import context, runtime  # noqa: F401
        except Exception as err:  # noqa: BLE001 - warming up is best effort
            logging.getLogger(__name__).warning("warming up failed: %s", err)
        return time.perf_counter() - started

    def activate(self, log_path: str, attempt: int, rank: int) -> NodeInfo:
        """A spare takes over as a host of an attempt: its output goes to that attempt's log now."""
        self._start(log_path, attempt, rank)
        return self.node_info()

    def _start(self, log_path: str, attempt: int, rank: int) -> None:
        self.rank, self.attempt = rank, attempt
        mark_host_process(rank)  # a `jaxlaunch.launch` in this process is refused
        self.progress = HostProgress()
        self.driver_stop = DriverStop()
        self.progress.timeline["process_created"] = self.created
        self.progress.timeline["actor_init"] = time.time()
        pathlib.Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # Redirect the file descriptors, not only sys.stdout: XLA and gloo write from C++.
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, force=True,
            format=f"%(asctime)s attempt {attempt} rank {rank} %(levelname)s %(name)s: %(message)s",
        )
        logging.getLogger(__name__).info("host process pid %d on %s", os.getpid(), socket.gethostname())

    def reserve_coordinator_address(self) -> str:
        """host:port on this node for the jax.distributed coordinator, with a port free right now."""
        ip = _node_ip()
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as sock:
            sock.bind((ip, 0))
            port = sock.getsockname()[1]
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    def node_info(self) -> NodeInfo:
        return NodeInfo(ray.get_runtime_context().get_node_id(), _node_ip(), os.getpid())

    @ray.method(concurrency_group=MONITOR_GROUP)
    def poll(self) -> HostSnapshot:
        return self.progress.drain()

    @ray.method(concurrency_group=MONITOR_GROUP)
    def propose_stop(self, step: int) -> StopAnswer:
        """The driver proposes to save and stop at `step` (`jaxlaunch.workers.supervision.stops`)."""
        return self.driver_stop.propose(step)

    @ray.method(concurrency_group=MONITOR_GROUP)
    def confirm_stop(self, step: int) -> bool:
        return self.driver_stop.confirm(step)

    @ray.method(concurrency_group=MONITOR_GROUP)
    def kill(self) -> None:
        """SIGKILL to this process (chaos testing)."""
        os.kill(os.getpid(), signal.SIGKILL)

    def disconnect(self) -> None:
        """Once every host of the group returned, all at once: leaves jax.distributed cleanly, so that
        no peer's coordination client aborts (and logs a fatal error) as the group is torn down."""
        from jaxlaunch.workers import runtime

        try:
            runtime.shutdown()
        except Exception as err:  # noqa: BLE001 - the group is ending either way
            logging.getLogger(__name__).warning("leaving jax.distributed failed: %s", err)

    def run(self, spec: HostSpec) -> HostResult:
        from jaxlaunch.workers import runtime

        from jaxlaunch.contract import entry as entry_lib

        log = logging.getLogger(__name__)
        ctx = None
        try:
            self.progress.enter(Phase.INITIALIZING)
            if spec.compilation_cache:
                problem = runtime.enable_compilation_cache(spec.compilation_cache_dir or runtime.default_cache_dir())
                if problem and spec.rank == 0:
                    self.progress.event(events.CompilationCacheDisabled(reason=problem))
            runtime.initialize(
                coordinator_address=spec.coordinator_address, num_processes=spec.num_hosts, process_id=spec.rank,
                bind_address=spec.coordinator_address, platform=spec.platform, timeouts=spec.distributed,
            )
            from jaxlaunch.workers.context import HostContext
            from jaxlaunch.workers.sharding import build_mesh

            if spec.persist_only:
                # The launcher's own program: no function of the user's entry is called, and its file
                # is imported only if the state's pytree holds a class of it (`persist.structure_of`).
                from jaxlaunch.workers.checkpoints import persist

                return persist.write_newest(spec, build_mesh(spec.mesh), self.progress)
            # After jax.distributed: importing the user's module (or unpickling a function sent by
            # value) may already compute with JAX.
            function = entry_lib.load_entry(spec.entry, spec.entry_code, spec.entry_imports)

            ctx = HostContext(spec, build_mesh(spec.mesh), self.progress, self.driver_stop)
            log.info("mesh %s; running %s", dict(ctx.mesh.shape), spec.entry)
            # No jax.distributed.shutdown() here: its barrier aborts a host whose peers return over
            # `shutdown_timeout_s` later (rank 0's evaluation after training); `disconnect` does it.
            return ctx._finish(function(ctx))
        except (Exception, SystemExit) as err:  # sys.exit() in the entry (argparse, absl) is its error too
            text = traceback.format_exc()
            log.error("host failed:\n%s", text)
            kind, phase = runtime.error_kind(err), self.progress.phase
            if ctx is not None:
                try:  # a save in flight commits first, unless a lost peer's barrier would never end
                    ctx._after_error(0.0 if kind == ErrorKind.COLLECTIVE else spec.pending_save_wait_s)
                except Exception as late:  # noqa: BLE001 - the error to report is the user's
                    log.warning("the records of the steps before the error were not sent: %s", late)
            raise HostError(spec.rank, self.progress.step, kind, type(err).__name__, str(err), text,
                            phase) from None
        except BaseException:
            log.error("host stopped:\n%s", traceback.format_exc())
            raise
