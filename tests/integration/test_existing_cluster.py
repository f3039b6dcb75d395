"""An existing Ray cluster started with `ray start` on loopback (a head and two worker nodes, token
authentication on): the launcher runs on it with --address, and as a Ray Job."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from tests.integration.helpers import ROOT, events, launch, summary

RAY = str(pathlib.Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """Head plus two workers, each offering one `host` slot. Stopped with `ray stop`, which stops
    every Ray process on this machine (the other tests leave none running)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    port, dashboard = free_port(), free_port()
    common = ["--num-cpus=1", '--resources={"host": 1}', "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", *common],
                       check=True, env=env, capture_output=True, timeout=120)
        for _ in range(2):
            subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common],
                           check=True, env=env, capture_output=True, timeout=120)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_hosts_run_on_distinct_nodes_of_an_existing_cluster(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    result = launch("--config", str(ROOT / "cluster_configs" / "ray-cluster.yaml"),
                    "--address", ray_cluster["address"], "--hosts", "2", "--steps", "10",
                    "--save-every", "5", "--run-dir", str(run_dir), env={"RAY_AUTH_MODE": "token"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary(run_dir)["process_count"] == 2 and summary(run_dir)["final_step"] == 10
    nodes = events(run_dir, "group_started")[0]["nodes"]
    assert len(set(nodes)) == 2, "each host process on its own node"


def test_ray_job_submit(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", str(ROOT), "--",
         "python", "launch.py", "--address", "auto", "--config", "cluster_configs/ray-cluster.yaml",
         "--hosts", "2", "--steps", "10", "--save-every", "5", "--run-dir", str(run_dir)],
        env=ray_cluster["env"], capture_output=True, text=True, timeout=400,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "succeeded" in submit.stdout + submit.stderr
    assert summary(run_dir)["status"] == "finished" and summary(run_dir)["process_count"] == 2
