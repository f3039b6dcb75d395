"""The Ray connection: an embedded local instance the launcher owns (started, restarted when its node
dies, stopped at the end, in its own session so that a signal to the launcher's process group leaves
it running until the hosts have saved), or an existing cluster it joins and leaves.

Capacity is judged by what is free on each alive node, not by node totals, so a busy cluster (or one
this job already occupies) is seen as it is. On an autoscaling cluster the launcher asks Ray's
autoscaler for the hosts' resources, and withdraws the request when the job ends."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import sysconfig
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import ray
from jaxlaunch.launcher.compat.ray import available_resources_per_node, resolved_address
from jaxlaunch.launcher.configuration.schema import ClusterConfig

from jaxlaunch.contract.protocol import ConfigError, NodeLiveness
from jaxlaunch.contract.store import endpoint_environment

if TYPE_CHECKING:
    from jaxlaunch.launcher.cluster.embedded_ray import EmbeddedRay

log = logging.getLogger(__name__)
RAYLET_PROBE_TIMEOUT_S = 1.0
PROBE_THREADS = 64
GCS_PROBE_TIMEOUT_S = 10.0
"""How long an existing cluster's head is given to take a TCP connection before the launch is refused."""
NODE_ID_LABEL = "ray.io/node-id"
"""The label Ray gives every node, its id: a placement's label selector leaves avoided nodes out by it."""


class InstanceBound(Protocol):
    """What lives in the embedded Ray instance and is dropped, without asking Ray, when it dies."""

    def forget(self) -> None: ...


class Spares(InstanceBound, Protocol):
    """Placed spare hosts (the warm standby), which count as room for hosts."""

    @property
    def reserved_hosts(self) -> int: ...

    @property
    def nodes(self) -> set[str]: ...

    @property
    def per_node(self) -> dict[str, int]: ...

    def shutdown(self) -> None: ...


def refuse_if_nothing_answers(address: str | None) -> None:
    """Bad input, refused before anything is written, when no Ray cluster can be there: `--address auto`
    that Ray resolves to no cluster, or a HOST:PORT (given, or the one `auto` resolves to: RAY_ADDRESS,
    the newest `ray start` on this machine) where nothing takes a TCP connection.

    Ray 2.60's `ray.init(address=HOST:PORT)` of a cluster that is not there never returns: tried with a
    head that had stopped, it printed "Failed to connect to GCS" every 5 s for over 10 minutes. An
    address that is none of these (no port, an IPv6 host without brackets) was Ray's ValueError traceback.
    "local" and `ray://` addresses (given, or in the RAY_ADDRESS that `auto` would use) are left to Ray;
    a head that takes the connection is Ray's to judge."""
    if address is None or _ray_takes(address):
        return
    named = "--address"
    if address == "auto":
        if _ray_takes(os.environ.get("RAY_ADDRESS", "")):
            return
        try:
            address, named = resolved_address(address), "--address auto, resolved by Ray to"
        except (ConnectionError, ValueError) as err:
            raise ConfigError(f"no Ray cluster to join at --address auto ({_first_sentence(err)}): start one "
                              "(`ray start --head`), name it with --address HOST:PORT, or leave --address out "
                              "to run on an embedded instance") from None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or (":" in host and not host.startswith("[")):
        raise ConfigError(f"--address {address} is not an address of a Ray cluster: write HOST:PORT (an IPv6 "
                          "host in brackets: [::1]:6379), auto, or leave --address out to run on an embedded instance")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=GCS_PROBE_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"no Ray cluster answers at {named} {address} ({reason}): start its head "
                          "(`ray start --head`), fix the address, or leave --address out to run on an "
                          "embedded instance") from None


def refuse_if_connected() -> None:
    """Bad input, refused before anything is written: Ray already initialized in this process (the
    user's own `ray.init`, or another launch still running in it). Joining it would fail in `ray.init`
    after the run directory was made, and the failed launch's `ray.shutdown` would cut the connection
    the other one trains through."""
    if ray.is_initialized():
        raise ConfigError("Ray is already initialized in this process (your ray.init, or another launch still "
                          "running in it): a launch connects on its own; call ray.shutdown() first (pass that "
                          "cluster's address as --address / address=), or launch from another process")


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """`ray.init` (2.60) puts a SIGTERM handler of its own in the main thread (`sys.exit(15)`): the
    launch's own (`signals.sigterm_unwinds`: unwind, exit 143) goes back after it."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _ray_takes(address: str) -> bool:
    """An address Ray resolves itself: Ray Client's, a Ray Jobs URL (`://`), or a new local instance."""
    return address == "local" or "://" in address


def _first_sentence(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0].rstrip(".")


class RayCluster:
    def __init__(self, cfg: ClusterConfig, runtime_env: dict[str, Any]):
        self.cfg = cfg
        self.runtime_env = runtime_env
        self.embedded = cfg.address is None
        self.instance: EmbeddedRay | None = None
        self._requested = False
        self._connected = False
        """This launch's own `ray.init` succeeded: its `ray.shutdown` is this launch's to call."""
        self.standby: Spares | None = None
        """The spare group (`worker_group.StandbyPool`), whose hosts count as placeable."""
        self.keepers: InstanceBound | None = None
        """The memory tier's keepers (`keepers.KeeperPool`), which go with a restarted instance."""
        self.avoided: list[str] = []
        """Nodes no host of this launch is placed on again (a straggler's, a corrupt replica's)."""

    # -- connection ------------------------------------------------------------------------------
    def connect(self) -> None:
        # Ray turns token authentication on by default and warns about it on the user's terminal;
        # the choice is ours and documented.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if self.embedded:
            from jaxlaunch.launcher.cluster.embedded_ray import EmbeddedRay

            self.instance = EmbeddedRay(self.cfg.embedded_num_cpus)
            address: str | None = self.instance.start()
        else:
            address = self.cfg.address
        try:
            with _sigterm_kept():
                ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env=self.runtime_env)
        except ConnectionError as err:
            if self.embedded:
                raise
            raise ConfigError(f"could not join the Ray cluster at --address {address} ({_first_sentence(err)}): "
                              "check that it runs and that this machine may reach it, or leave --address out "
                              "to run on an embedded instance") from None
        finally:
            # Ray was not initialized before (`refuse_if_connected`): a connection there now is this
            # launch's, also when ray.init was interrupted after it connected.
            self._connected = ray.is_initialized()

    def shutdown(self) -> None:
        try:
            if self._requested and ray.is_initialized():
                self.request_hosts(0)
        finally:
            try:
                if self._connected and ray.is_initialized():
                    self._connected = False
                    ray.shutdown()
            finally:  # a Ctrl-C during Ray's shutdown still stops the instance this launch started
                if self.instance is not None:
                    self.instance.stop()
                    self.instance = None

    def alive(self) -> bool:
        """False once the embedded instance's node is gone (an existing cluster is not ours to judge)."""
        return self.instance is None or self.instance.alive()

    def restart(self) -> None:
        """A fresh embedded instance after its node died."""
        assert self.embedded, "only the embedded instance is the launcher's to restart"
        if self.standby is not None:
            self.standby.forget()  # its processes went with the old instance
        if self.keepers is not None:
            self.keepers.forget()
        self.shutdown()
        self.connect()

    # -- capacity --------------------------------------------------------------------------------
    def placeable_hosts(self, avoiding: Sequence[str] = (), held: Sequence[str] = ()) -> int:
        """Hosts one placement could put on the alive nodes neither avoided nor in `avoiding`: in what
        they have free now, the spares' room, and `held`, the nodes of this job's running hosts (one
        host's room each, once it restarts), as the placement strategy allows: one host a node under
        STRICT_SPREAD, one node's worth under STRICT_PACK."""
        need, left_out = self.cfg.resources_per_host, {*self.avoided, *avoiding}
        room: dict[str, int] = {}
        for node, free in available_resources_per_node().items():
            room[node] = min((math.floor(free.get(k, 0) / v + 1e-9) for k, v in need.items()), default=0)
        for node in held:
            room[node] = room.get(node, 0) + 1
        # The spares' room (on a node left out, none: the standby is given up when a node is avoided,
        # which frees the rest of its room).
        for node, spares in (self.standby.per_node if self.standby is not None else {}).items():
            room[node] = room.get(node, 0) + spares
        room = {node: n for node, n in room.items() if node not in left_out}
        if self.cfg.placement_strategy == "STRICT_SPREAD":
            return sum(n >= 1 for n in room.values())
        if self.cfg.placement_strategy == "STRICT_PACK":
            return max(room.values(), default=0)
        return sum(room.values())

    def avoid(self, node: str) -> None:
        """Places no host on `node` from now on. Spares placed there would count as room on it: the
        standby is given up, and made again elsewhere."""
        self.avoided.append(node)
        if self.standby is not None:
            self.standby.shutdown()

    def bundle_selectors(self, num_hosts: int) -> list[dict[str, str]] | None:
        """Each bundle's label selector that keeps a placement group off the avoided nodes (None: none avoided)."""
        if not self.avoided:
            return None
        return [{NODE_ID_LABEL: f"!in({','.join(self.avoided)})"}] * num_hosts

    def request_hosts(self, num_hosts: int) -> None:
        """Asks an autoscaler for room for `num_hosts` hosts (0 withdraws the request). Harmless on a
        cluster without one."""
        if self.embedded:
            return
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[dict(self.cfg.resources_per_host) for _ in range(num_hosts)])
        self._requested = num_hosts > 0

    def placement_message(self, wanted: int, placeable: int, waited: bool = False) -> str:
        """Why `wanted` hosts do not fit, what the cluster has, and what to pass instead."""
        cfg = self.cfg
        waited_for = f" after waiting {cfg.placement_timeout_s:g} s" if waited else ""
        return (f"cannot place {wanted} hosts of {cfg.resources_per_host} ({cfg.placement_strategy}){waited_for}: "
                f"the cluster has {self.describe()}, room for {placeable}; pass --hosts {placeable} or fewer, "
                f"or add capacity")

    def describe(self) -> str:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        res, free = ray.cluster_resources(), ray.available_resources()
        parts = [f"{k}={free.get(k, 0):g}/{v:g} free" for k, v in sorted(res.items())
                 if k in ("CPU", "GPU", "TPU", "host")]
        return f"{len(nodes)} node(s) with {', '.join(parts) or 'no resources'}"

    # -- nodes -----------------------------------------------------------------------------------
    def nodes_liveness(self, node_ids: list[str]) -> dict[str, NodeLiveness]:
        """Each node's liveness: dead by Ray's word; else a probe of its raylet, where refused means
        the raylet (and so the node) is gone and no answer means unknown for now. One listing of
        Ray's nodes, the raylets probed side by side (a pod's hundreds in about one probe's time)."""
        known = {n["NodeID"]: n for n in ray.nodes()}
        nodes = list(dict.fromkeys(node_ids))
        with concurrent.futures.ThreadPoolExecutor(min(PROBE_THREADS, max(1, len(nodes)))) as pool:
            return dict(zip(nodes, pool.map(lambda n: _probe(known.get(n)), nodes), strict=True))


def _probe(node: dict[str, Any] | None) -> NodeLiveness:
    """A node as Ray lists it (None: Ray has forgotten it) probed at its raylet's port."""
    if node is None or not node.get("Alive"):
        return NodeLiveness.DEAD
    try:
        with socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]),
                                      timeout=RAYLET_PROBE_TIMEOUT_S):
            return NodeLiveness.ALIVE
    except ConnectionRefusedError:
        return NodeLiveness.DEAD
    except OSError:
        return NodeLiveness.UNKNOWN


SITE_DIRS = ("site-packages", "dist-packages")


def runtime_env(embedded: bool, code_dirs: list[str]) -> dict[str, Any]:
    """How host processes find the launcher's and the user's code: on this machine through
    PYTHONPATH, on a cluster shipped as Ray py_modules; both with the variables that say where the
    run's object store is (`endpoint_environment`), set when each host process starts."""
    if embedded:
        # What this process can import, the hosts on this machine can import too (the current
        # directory and any folder a test runner or the user put on sys.path).
        # Not another environment's site-packages that a .pth file added: the hosts' interpreter adds
        # it again in its place, after this one's, while on PYTHONPATH it would come first and its
        # editable-install finder (a module of the same name as this one's) would shadow this
        # checkout's jaxlaunch with another's.
        installed = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
        local = [p for p in sys.path if p and os.path.isdir(p) and not any(p.startswith(i) for i in installed)
                 and os.path.basename(p.rstrip(os.sep)) not in SITE_DIRS]
        paths = list(dict.fromkeys([*code_dirs, os.getcwd(), *local]))
        existing = os.environ.get("PYTHONPATH")
        return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths + ([existing] if existing else [])),
                             **endpoint_environment()}}
    endpoints = endpoint_environment()
    return {"py_modules": code_dirs, **({"env_vars": endpoints} if endpoints else {})}
