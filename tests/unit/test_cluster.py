"""The Ray layer's own bookkeeping, without a Ray instance: what a launch stops, and what it may not."""

import os
import types

import psutil
import pytest

# The Ray layer's modules import Ray: imported in each test, so this module imports without it
# (`tests/test_architecture.py`).


def test_a_ctrl_c_during_ray_s_shutdown_still_stops_the_embedded_instance(monkeypatch):
    """A second press of a notebook's stop button during `ray.shutdown()`: the GCS, the raylet and the
    agents this launch started must not live on in the kernel."""
    from jaxlaunch.launcher.cluster import ray_cluster

    stopped = []

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_cluster, "ray", types.SimpleNamespace(is_initialized=lambda: True, shutdown=interrupted))
    cluster = object.__new__(ray_cluster.RayCluster)  # without connecting
    cluster._requested, cluster._connected = False, True
    cluster.instance = types.SimpleNamespace(stop=lambda: stopped.append("stop"))
    with pytest.raises(KeyboardInterrupt):
        cluster.shutdown()
    assert stopped == ["stop"] and cluster.instance is None


def test_an_instance_whose_supervisor_pid_went_to_another_process_kills_nothing(monkeypatch):
    """The supervisor exited and was reaped; its pid now belongs to a process made later (here, this
    one), which may lead a session of its own: stopping the instance must not kill that session."""
    from jaxlaunch.launcher.cluster import embedded_ray
    instance = embedded_ray.EmbeddedRay(num_cpus=1)
    instance._proc = types.SimpleNamespace(pid=os.getpid(), returncode=0)
    instance._started_at = psutil.Process().create_time() - 100.0  # the supervisor was made long before
    monkeypatch.setattr(embedded_ray, "_session_members", lambda sid: [sid, 424242])
    assert instance.pids() == []
    instance._started_at = psutil.Process().create_time()  # the same process: its session is the instance's
    assert instance.pids() == [os.getpid(), 424242]


@pytest.mark.parametrize(("strategy", "room"), [("PACK", 8), ("SPREAD", 8), ("STRICT_SPREAD", 2), ("STRICT_PACK", 4)])
def test_the_room_for_a_restart_is_what_one_placement_of_the_strategy_could_take(monkeypatch, strategy, room):
    """Two nodes of 4 CPUs, a 1-CPU host on each running, a spare on each: a STRICT_SPREAD group fits
    2 hosts (one a node), a STRICT_PACK group 4 (one node). Counting each node's free room and then the
    hosts held on top said 4 and 8: the driver drained to grow, found room for 2 again, and did so
    forever."""
    from jaxlaunch.launcher.cluster import ray_cluster
    from jaxlaunch.launcher.configuration.schema import ClusterConfig

    free = {"a": {"CPU": 2.0}, "b": {"CPU": 2.0}}  # of 4 each: one host and one spare on each
    monkeypatch.setattr(ray_cluster, "available_resources_per_node", lambda: free)
    cluster = object.__new__(ray_cluster.RayCluster)
    cluster.cfg = ClusterConfig(resources_per_host={"CPU": 1.0}, placement_strategy=strategy)
    cluster.avoided = []
    cluster.standby = types.SimpleNamespace(per_node={"a": 1, "b": 1})
    assert cluster.placeable_hosts(held=["a", "b"]) == room
    # Leaving node b out (a straggler's): its spare goes too; node a holds 4 hosts' room (its spare's
    # too: the standby is given up when a node is avoided).
    assert cluster.placeable_hosts(avoiding=("b",), held=["a"]) == (1 if strategy == "STRICT_SPREAD" else 4)
    cluster.standby = types.SimpleNamespace(per_node={"a": 2, "b": 1})  # three spares on two nodes: all count
    assert cluster.placeable_hosts(held=["a", "b"]) == {"STRICT_SPREAD": 2, "STRICT_PACK": 5}.get(strategy, 9)


def test_a_silent_host_s_node_counts_as_lost_only_once_it_went_on_not_answering(monkeypatch):
    """Host 1 has been silent for 40 s (a stopped process) and one probe of its node timed out on a busy
    machine: that is no lost node (a hang, with its stacks). Only a node that goes on not answering
    for 5 s, its host silent for the 30 s wait, counts as gone."""
    from jaxlaunch.launcher.cluster import worker_group

    from jaxlaunch.contract.protocol import HostStatus, NodeLiveness

    group = object.__new__(worker_group.RayWorkerGroup)  # without Ray: its bookkeeping only
    group.node_info, group.results, group._unknown_since = [None, None], {}, {}
    group.hosts = [HostStatus(0, last_heard=100.0), HostStatus(1, last_heard=60.0)]
    answers = {0: NodeLiveness.ALIVE, 1: NodeLiveness.UNKNOWN}
    monkeypatch.setattr(group, "_liveness", lambda ranks: {r: answers[r] for r in ranks})
    now = [100.0]
    monkeypatch.setattr(worker_group.time, "monotonic", lambda: now[0])
    seen = []
    for t, answer in ((100.0, NodeLiveness.UNKNOWN), (104.0, NodeLiveness.UNKNOWN), (105.0, NodeLiveness.UNKNOWN),
                      (106.0, NodeLiveness.ALIVE), (107.0, NodeLiveness.UNKNOWN), (111.0, NodeLiveness.UNKNOWN)):
        now[0], answers[1] = t, answer
        seen.append(group.hosts_nodes(30.0)[1])
    assert seen == [NodeLiveness.UNKNOWN, NodeLiveness.UNKNOWN, NodeLiveness.DEAD,
                    NodeLiveness.ALIVE, NodeLiveness.UNKNOWN, NodeLiveness.UNKNOWN], "each run of not answering anew"
    group.hosts[1].last_heard = 149.5  # a host that answers polls is no lost node, whatever its raylet's probes
    now[0], answers[1] = 150.0, NodeLiveness.UNKNOWN
    assert group.hosts_nodes(30.0)[1] == NodeLiveness.UNKNOWN


def test_ray_s_own_sigterm_handler_gives_way_to_the_launch_s_after_it_connects(monkeypatch):
    """ray.init puts a SIGTERM handler of its own in the main thread (sys.exit(15)): a SIGTERM while
    the launch waited for room or wrote its records exited 15 with no line, not 143. The launch's
    handler is back once ray.init returned; and a connection made before ray.init was interrupted is
    still this launch's to shut down."""
    import signal

    from jaxlaunch.launcher.cluster import ray_cluster
    from jaxlaunch.launcher.configuration.schema import ClusterConfig

    connected, shutdowns = [], []

    def ray_s_handler(signum, frame):
        raise SystemExit(signum)

    def init(**kwargs):
        signal.signal(signal.SIGTERM, ray_s_handler)
        connected.append(True)

    def interrupted_init(**kwargs):
        connected.append(True)
        raise KeyboardInterrupt  # after Ray marked itself connected

    def ours(signum, frame):
        pass

    fake = types.SimpleNamespace(init=init, is_initialized=lambda: bool(connected),
                                 shutdown=lambda: shutdowns.append(1))
    monkeypatch.setattr(ray_cluster, "ray", fake)
    previous = signal.signal(signal.SIGTERM, ours)
    try:
        cluster = ray_cluster.RayCluster(ClusterConfig(address="127.0.0.1:6379"), {})
        cluster.connect()
        assert signal.getsignal(signal.SIGTERM) is ours
        connected.clear()
        fake.init = interrupted_init
        cluster = ray_cluster.RayCluster(ClusterConfig(address="127.0.0.1:6379"), {})
        with pytest.raises(KeyboardInterrupt):
            cluster.connect()
        cluster.shutdown()
        assert shutdowns == [1], "the connection made before the interrupt is shut down"
    finally:
        signal.signal(signal.SIGTERM, previous)
