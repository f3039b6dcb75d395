"""The Ray actor of one host: a fresh process that runs one attempt of the job.

Ray starts it with the platform environment already set (see `workers.runtime.host_env`), so JAX is
first imported inside `run`, after the process's output has been sent to its own log file.
`poll` runs in its own concurrency group, so the driver hears from a host even while its training
thread is blocked in a collective."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import signal
import socket
import sys
import time
import traceback
from typing import Any

import psutil
import ray

from launcher.config import Injection, JobConfig
from workers.progress import HostProgress

MONITOR_GROUP = "monitor"


@dataclasses.dataclass(frozen=True)
class AttemptSpec:
    """What one host needs to run one attempt."""

    job: JobConfig
    run_dir: str
    attempt: int
    rank: int
    num_hosts: int
    coordinator_address: str
    """host:port of the jax.distributed coordinator (rank 0's node, a port fresh for this attempt)."""
    injections: tuple[Injection, ...] = ()
    """Failures to inject in this attempt."""


class HostError(RuntimeError):
    """An exception in a host's training code, with the host's rank, the last step it completed
    and the original traceback (what the driver shows and compares across attempts)."""

    def __init__(self, rank: int, step: int | None, traceback_text: str):
        super().__init__(f"host {rank} failed after step {step}:\n{traceback_text}")
        self.rank, self.step, self.traceback_text = rank, step, traceback_text

    def __reduce__(self):
        return HostError, (self.rank, self.step, self.traceback_text)

    @property
    def summary(self) -> str:
        """The exception's own line: `ValueError: ...`."""
        lines = self.traceback_text.strip().splitlines()
        return lines[-1] if lines else "unknown error"


def _node_ip() -> str:
    """The address this Ray node was started with (`ray start --node-ip-address`), which is the one
    its peers can reach; the machine's default address may not be."""
    node_id = ray.get_runtime_context().get_node_id()
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)


class HostActor:
    def __init__(self, log_path: str, attempt: int, rank: int):
        self.rank, self.attempt = rank, attempt
        self.progress = HostProgress()
        self.progress.timeline["process_created"] = psutil.Process().create_time()
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

    def node_info(self) -> dict[str, Any]:
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": _node_ip(), "pid": os.getpid()}

    @ray.method(concurrency_group=MONITOR_GROUP)
    def poll(self) -> dict[str, Any]:
        return self.progress.drain()

    @ray.method(concurrency_group=MONITOR_GROUP)
    def preempt(self) -> None:
        """A preemption notice: SIGTERM to this process, caught by JAX's preemption service, which
        makes every host save at one common step and stop."""
        os.kill(os.getpid(), signal.SIGTERM)

    @ray.method(concurrency_group=MONITOR_GROUP)
    def kill(self) -> None:
        """SIGKILL to this process (chaos testing)."""
        os.kill(os.getpid(), signal.SIGKILL)

    def run(self, spec: AttemptSpec) -> dict[str, Any]:
        from workers import runtime, train

        log = logging.getLogger(__name__)
        try:
            self.progress.phase("initializing")
            if spec.job.cluster.compilation_cache:
                runtime.enable_compilation_cache(str(pathlib.Path(spec.run_dir) / "compile_cache"))
            runtime.initialize(
                coordinator_address=spec.coordinator_address,
                num_processes=spec.num_hosts,
                process_id=spec.rank,
                bind_address=spec.coordinator_address,
                platform=spec.job.cluster.platform,
                timeouts=spec.job.distributed,
            )
            result = train.train(
                spec.job, pathlib.Path(spec.run_dir), self.progress, spec.injections, spec.attempt
            )
            runtime.shutdown()
            # What no poll has drained yet travels with the result, so no record is lost.
            return {**result, "final_poll": self.progress.drain()}
        except Exception as err:
            text = traceback.format_exc()
            log.error("host failed:\n%s", text)
            raise HostError(spec.rank, self.progress.drain()["step"], text) from err
        except BaseException:
            log.error("host stopped:\n%s", traceback.format_exc())
            raise
