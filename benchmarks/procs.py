"""Run a function in N fresh JAX processes joined by jax.distributed on this machine, without Ray:
the measurements that isolate one mechanism (checkpointing, restore, compilation) use it."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
from typing import Any

from jaxlaunch.contract.protocol import host_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(target: str, num_processes: int, devices_per_process: int, args: dict[str, Any],
        timeout_s: float = 1200, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Runs `target` ("module:function", called as function(**args)) in every process; returns each
    process's JSON-able result, by rank."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(num_processes):
            spec = {"target": target, "args": args, "rank": rank, "num_processes": num_processes,
                    "coordinator": f"127.0.0.1:{port}", "out": f"{tmp}/{rank}.json"}
            penv = {**os.environ, **(env or {}), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
                    "XLA_FLAGS": host_env("cpu", devices_per_process)["XLA_FLAGS"]}
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.procs", json.dumps(spec)],
                                          env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = []
        try:
            for p in procs:
                out, _ = p.communicate(timeout=timeout_s)
                outputs.append(out)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if os.environ.get("BENCHMARK_ECHO"):
            for rank, out in enumerate(outputs):
                print(f"--- process {rank} ---\n{out}", file=sys.stderr)
        for rank, p in enumerate(procs):
            if p.returncode != 0:
                raise RuntimeError(f"benchmark process {rank} failed:\n{outputs[rank][-3000:]}")
        return [json.loads(pathlib.Path(f"{tmp}/{rank}.json").read_text()) for rank in range(num_processes)]


def _main(spec: dict[str, Any]) -> None:
    import importlib

    import jax
    from jaxlaunch.workers import runtime

    from jaxlaunch.contract.protocol import DistributedConfig

    jax.config.update("jax_platforms", "cpu")
    runtime.initialize(
        coordinator_address=spec["coordinator"], num_processes=spec["num_processes"],
        process_id=spec["rank"], bind_address=spec["coordinator"], platform="cpu",
        timeouts=DistributedConfig(),
    )
    module, function = spec["target"].split(":")
    result = getattr(importlib.import_module(module), function)(**spec["args"])
    pathlib.Path(spec["out"]).write_text(json.dumps(result))
    runtime.shutdown()


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
