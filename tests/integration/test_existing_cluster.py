"""An existing Ray cluster started with `ray start` on loopback (a head and two worker nodes, token
authentication on): the launcher ships a user's entry to it, runs there with --address, and runs as
a Ray Job. The cluster is stopped through its own processes, never with a machine-wide `ray stop`."""

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.integration.helpers import EXAMPLES, MINIMAL, ROOT, assert_refused, events, launch, summary

RAY = str(pathlib.Path(sys.executable).parent / "ray")
NODE_START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ports() -> list[str]:
    """Ports of a node's agents: nodes on one address (or beside another Ray) would collide on the
    defaults."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Head plus two workers, each offering one `host` slot, each `ray start --block` in a session of
    its own: stopping the cluster is killing those sessions. Each node's `ray start` output is kept
    in the cluster's temp folder, for the message if the cluster does not come up."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    temp = tmp_path_factory.mktemp("ray")
    port, dashboard = free_port(), free_port()
    common = ["--num-cpus=1", '--resources={"host": 1}', "--node-ip-address=127.0.0.1", "--disable-usage-stats",
              "--block"]
    nodes: list[subprocess.Popen] = []

    def start_node(name: str, args: list[str]) -> None:
        with open(temp / f"{name}.out", "wb") as out:
            nodes.append(subprocess.Popen([RAY, "start", *args, *common, *node_ports()], env=env,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start_node("head", ["--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={dashboard}", f"--temp-dir={temp}"])
        _wait_for_nodes(port, 1, env, nodes, temp)
        for count in (2, 3):
            start_node(f"worker-{count}", [f"--address=127.0.0.1:{port}"])
            _wait_for_nodes(port, count, env, nodes, temp)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        for node in reversed(nodes):
            for proc in session_processes(node.pid):
                with contextlib.suppress(psutil.NoSuchProcess):  # gone since listed: its parent's end took it
                    proc.kill()
            node.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(session_processes(n.pid) for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(session_processes(n.pid) for n in nodes), "the test cluster's processes are gone"


PROBE_TIMEOUT_S = 30
"""One probe of the cluster (a Ray driver connecting and listing the nodes). A probe that does not
answer in time is asked again until the cluster's deadline: once, in CI's suite on 2 cores, a probe's
driver could not reach the head's GCS for 60 s (why is not known: a cluster that does not come up now
fails with the nodes' output and the GCS log)."""


def _wait_for_nodes(port: int, count: int, env, nodes: list[subprocess.Popen], temp: pathlib.Path) -> None:
    code = (f"import ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR'); "
            f"print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    last = "no probe answered"
    while time.monotonic() < deadline:
        if any(node.poll() is not None for node in nodes):
            raise AssertionError(f"a node of the test cluster exited while waiting for {count} nodes\n"
                                 + _cluster_output(temp))
        try:
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired as late:
            last = f"a probe did not answer in {PROBE_TIMEOUT_S} s: {_text(late.stderr)[-1500:]}"
            continue
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        last = f"a probe answered {out.returncode}: {out.stdout[-500:]}{out.stderr[-1500:]}"
        time.sleep(1)
    raise AssertionError(f"the test cluster did not reach {count} nodes in {NODE_START_TIMEOUT_S} s ({last})\n"
                         + _cluster_output(temp))


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _cluster_output(temp: pathlib.Path) -> str:
    """Each node's `ray start` output and the head's GCS log, their last lines."""
    files = sorted(temp.glob("*.out")) + sorted(temp.glob("session_latest/logs/gcs_server.*"))
    return "\n".join(f"--- {path.name}:\n{path.read_text(errors='replace')[-2000:]}" for path in files)


def test_a_user_entry_is_shipped_to_distinct_nodes_of_an_existing_cluster(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    result = launch("--config", str(ROOT / "cluster_configs" / "ray-cluster.yaml"), "--entry",
                    str(EXAMPLES / "classifier.py"), "--address", ray_cluster["address"], "--hosts", "2",
                    "--steps", "10", "--save-every", "5", "--run-dir", str(run_dir), env={"RAY_AUTH_MODE": "token"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary(run_dir)["process_count"] == 2 and summary(run_dir)["final_step"] == 10
    assert len(set(events(run_dir, "attempt_started")[0]["nodes"])) == 2, "each host process on its own node"
    log = (run_dir / "hosts" / "attempt-1-rank-1.log").read_text()
    assert "running classifier:main" in log, "the hosts found the shipped file, not the local one"


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


@pytest.mark.parametrize("given", ["host:port", "auto with RAY_ADDRESS"])
def test_an_address_where_no_cluster_answers_is_refused_at_once_and_leaves_no_run_directory(tmp_path, given):
    """Ray's own connection to a head that is not there retries without end (over 10 minutes, a warning
    every 5 s): the launch refuses it as bad input instead, whether the address is given or is the
    RAY_ADDRESS that `--address auto` joins."""
    with socket.socket() as held:  # bound, never listening: a connection to it is refused
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        if given == "host:port":
            result = launch(*MINIMAL, "--address", address, "--run-dir", str(tmp_path / "run"), timeout=120)
        else:
            result = launch(*MINIMAL, "--address", "auto", "--run-dir", str(tmp_path / "run"), timeout=120,
                            env={"RAY_ADDRESS": address})
    if given == "host:port":
        assert_refused(result, f"no Ray cluster answers at --address {address} (")
    else:  # Ray writes a loopback host as this machine's address
        assert_refused(result, "no Ray cluster answers at --address auto, resolved by Ray to ")
        assert f":{address.rpartition(':')[2]} (" in result.stderr
    assert "leave --address out" in result.stderr
    assert not (tmp_path / "run").exists(), "a refused launch leaves no run directory behind"


@pytest.mark.parametrize("told", ["ray://127.0.0.1:1", "http://127.0.0.1:1", "local"])
def test_auto_leaves_a_ray_address_that_is_not_host_port_to_ray(monkeypatch, told):
    """A RAY_ADDRESS of Ray Client, of a Ray Jobs URL (as Ray's docs have users export for `ray job
    submit`) or "local": not probed, not refused (it was a ValueError traceback when resolved here)."""
    from jaxlaunch.launcher.cluster import ray_cluster

    def resolved(address: str) -> str:
        raise AssertionError("not resolved here")

    monkeypatch.setenv("RAY_ADDRESS", told)
    monkeypatch.setattr(ray_cluster, "resolved_address", resolved)
    assert ray_cluster.refuse_if_nothing_answers("auto") is None


def test_auto_without_a_cluster_is_one_line_not_ray_s_traceback(monkeypatch):
    """`--address auto` where Ray finds no cluster: Ray's ConnectionError was a traceback, exit 1 and an
    empty run directory; it is now refused as bad input (ConfigError: one line, exit 2) before the launch
    writes anything (`runner.run_job`). Ray's own search is replaced here: the session's shared instance
    would be found."""
    from jaxlaunch.launcher.cluster import ray_cluster

    from jaxlaunch.contract.protocol import ConfigError

    def no_cluster(address: str) -> str:
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to "
                              "by setting `--address` flag or `RAY_ADDRESS` environment variable.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster, "resolved_address", no_cluster)
    with pytest.raises(ConfigError) as refused:
        ray_cluster.refuse_if_nothing_answers("auto")
    assert str(refused.value).startswith("no Ray cluster to join at --address auto (Could not find any running "
                                         "Ray instance): start one"), refused.value
    assert "\n" not in str(refused.value)
