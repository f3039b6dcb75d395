"""The warm standby: a spare group of host processes, placed and warmed up, that the next attempt takes
over, so that a restart skips process start and imports.

With `cluster.standby_linger_s` (on an existing cluster) the spares a launch did not use outlive it
for that long, and the next launch on the same cluster whose hosts would be started alike (the same
environment, resources, placement, code and Python: `spare_key`) takes them over as its first hosts.
Ray no longer ends such spares with their driver: they are detached actors in a detached placement
group, and their lease (`jaxlaunch.workers.supervision.lease`) does: renewed while a driver holds the
group, set to the linger time when the launch ends, renewed by each poll once they are hosts. Every
launch on an existing cluster takes such a group over if it can (whatever its own linger time) and ends
the others, idle as they are, so that their room counts as free (`take_over_lingering`)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import pathlib
import sys
import time
import uuid
from typing import Any

import ray
from jaxlaunch.launcher.cluster.host_actors import SPARES_NAMESPACE, create_hosts, release
from jaxlaunch.launcher.cluster.ray_cluster import RayCluster
from jaxlaunch.launcher.records.runs import RunDir
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table

from jaxlaunch.contract import events
from jaxlaunch.contract.protocol import HOST_PROGRAM, SPARE_HOLD_S, NodeInfo, host_env

log = logging.getLogger(__name__)
LEADER_PREFIX = "spares"
LEASE_CALL_TIMEOUT_S = 10.0


def spare_key(cluster: RayCluster, num_hosts: int) -> str:
    """What makes a spare group's processes those this launch would start: two launches with the same
    key start identical host processes (the same environment, resources, placement, Python, and the
    same code: jaxlaunch's and the entry's folder, by content)."""
    cfg = cluster.cfg
    what = {"env": host_env(cfg.platform, cfg.devices_per_host, cfg.ynnpack), "resources": cfg.resources_per_host,
            "strategy": cfg.placement_strategy, "selectors": cluster.bundle_selectors(num_hosts),
            "runtime_env": _job_runtime_env(), "program": HOST_PROGRAM, "version": _version(),
            "code": str(pathlib.Path(__file__).resolve().parents[2]), "python": sys.executable, "hosts": num_hosts}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _job_runtime_env() -> dict[str, Any]:
    """The job's runtime environment as Ray holds it: shipped folders as content-addressed package URIs
    (`gcs://_ray_pkg_<hash>.zip`), so that the same code shipped again matches and edited code does not."""
    return dict(ray.get_runtime_context().runtime_env)


def _version() -> str | None:
    try:
        return importlib.metadata.version("jaxlaunch")
    except importlib.metadata.PackageNotFoundError:
        return None


def leader_name(key: str, num_hosts: int) -> str:
    return f"{LEADER_PREFIX}-{num_hosts}-{key}-{uuid.uuid4().hex[:8]}"


class StandbyPool:
    """A spare group of host processes, placed and warmed up (Python, JAX, Flax, Orbax imported),
    waiting to take over the next attempt. It is made only while the cluster has room for it beside
    the running group, and its hosts count as placeable (they are given up whenever the next attempt
    needs a different count)."""

    def __init__(self, cluster: RayCluster, run: RunDir, linger_s: float = 0.0):
        self.cluster, self.run = cluster, run
        self.linger_s = linger_s if not cluster.embedded else 0.0
        self.pg: PlacementGroup | None = None
        self.placed: ray.ObjectRef | None = None
        self.actors: list[ActorHandle] = []
        self.made = 0
        self.adopted = 0
        """Lingering spare groups of earlier launches this launch took over."""
        self.leased = False
        """The group outlives its driver, bound by its lease (made to linger, or taken over)."""
        self._renewed = 0.0

    @property
    def reserved_hosts(self) -> int:
        if self.pg is None or not ray.wait([self.placed], timeout=0)[0]:
            return 0
        return len(self.actors)

    @property
    def nodes(self) -> set[str]:
        """The nodes its spares are placed on (none before they are)."""
        if self.pg is None or self.reserved_hosts == 0:
            return set()
        return set(placement_group_table(self.pg).get("bundles_to_node_id", {}).values())

    def replenish(self, num_hosts: int) -> None:
        if self.actors or self.cluster.placeable_hosts() < num_hosts:
            return
        self.made += 1
        cfg = self.cluster.cfg
        lingering = self.linger_s > 0
        self.pg = pg = placement_group([dict(cfg.resources_per_host)] * num_hosts, strategy=cfg.placement_strategy,
                                       bundle_label_selector=self.cluster.bundle_selectors(num_hosts),
                                       lifetime="detached" if lingering else None)
        self.placed = pg.ready()
        logs = [str(self.run.hosts / f"standby-{self.made}-rank-{rank}.log") for rank in range(num_hosts)]
        name = leader_name(spare_key(self.cluster, num_hosts), num_hosts) if lingering else None
        self.actors = create_hosts(cfg, pg, logs, 0, leader_name=name)
        for actor in self.actors:
            actor.warm.remote((pg, SPARE_HOLD_S) if lingering else None)
        self.leased, self._renewed = lingering, time.monotonic()

    def take(self, num_hosts: int) -> tuple[PlacementGroup, list[ActorHandle]] | None:
        """The spare group's placement group and actors, if it is ready and of the right size."""
        if not self.actors:
            return None
        pg = self.pg
        if pg is None or len(self.actors) != num_hosts or self.reserved_hosts == 0:
            self.shutdown()
            return None
        taken, self.pg, self.placed, self.actors = (pg, self.actors), None, None, []
        self.leased = False  # the hosts' polls renew it from now on
        return taken

    def renew(self) -> None:
        """Keeps a leased group's lease while this launch holds it (every third of the lease)."""
        if not self.leased or not self.actors or time.monotonic() - self._renewed < SPARE_HOLD_S / 3:
            return
        self._renewed = time.monotonic()
        for actor in self.actors:
            actor.renew.remote(SPARE_HOLD_S)

    # -- across launches --------------------------------------------------------------------------
    def adopt(self, pg: PlacementGroup, actors: list[ActorHandle], pids: list[int]) -> events.SparesTakenOver:
        """A lingering group of an earlier launch, taken over: this launch's spare group now."""
        self.pg, self.placed, self.actors = pg, pg.ready(), actors
        self.leased, self._renewed = True, time.monotonic()
        self.adopted += 1
        log.info("took over %d lingering spare host(s) of an earlier launch", len(actors))
        return events.SparesTakenOver(num_hosts=len(actors), pids=pids)

    def shelve_or_release(self) -> events.SparesLeft | None:
        """At the launch's end: a leased group that is ready is left for the next launch (its lease
        set to the linger time) when this launch lingers; anything else is released."""
        if (self.linger_s > 0 and self.leased and self.actors and self.pg is not None
                and ray.wait([self.placed], timeout=LEASE_CALL_TIMEOUT_S)[0]):
            leader, rest = self.actors[0], self.actors[1:]
            try:
                infos: list[NodeInfo] = ray.get([a.node_info.remote() for a in self.actors],
                                                timeout=LEASE_CALL_TIMEOUT_S)
                ray.get([leader.shelve.remote((self.pg, self.actors), self.linger_s)]
                        + [a.renew.remote(self.linger_s) for a in rest], timeout=LEASE_CALL_TIMEOUT_S)
                left = events.SparesLeft(num_hosts=len(self.actors), pids=[i.pid for i in infos],
                                         linger_s=self.linger_s)
                self.forget()
                return left
            except Exception as err:  # noqa: BLE001 - a spare died: none is left
                log.info("the spare group could not be left for the next launch: %s", err)
        self.shutdown()
        return None

    def forget(self) -> None:
        """Drops the spare group without asking Ray (its Ray instance is gone, or it was left)."""
        self.pg, self.placed, self.actors, self.leased = None, None, [], False

    def shutdown(self) -> None:
        release(self.actors, self.pg)
        self.pg, self.placed, self.actors, self.leased = None, None, [], False


def take_over_lingering(cluster: RayCluster, pool: StandbyPool | None) -> events.SparesTakenOver | None:
    """Before a launch on an existing cluster counts its room: the lingering spare groups earlier
    launches left (`cluster.standby_linger_s`). One whose processes this launch would start alike
    becomes `pool`'s spare group; the others are ended (idle: their room is this launch's)."""
    if cluster.embedded:
        return None
    taken = None
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry.get("name", "") if isinstance(entry, dict) else ""
        if entry.get("namespace") != SPARES_NAMESPACE or not name.startswith(f"{LEADER_PREFIX}-"):
            continue
        try:
            _, size, key, _ = name.split("-")
            leader = ray.get_actor(name, namespace=SPARES_NAMESPACE)
        except ValueError:
            continue  # ended meanwhile, or not one of ours
        if pool is None or pool.actors or key != spare_key(cluster, int(size)):
            leader.end_if_shelved.remote()  # a group a running launch holds is not ended
            continue
        group: Any = None
        try:
            group = ray.get(leader.claim.remote(), timeout=LEASE_CALL_TIMEOUT_S)  # (pg, actors) or None
            if group is None:
                continue  # held by a launch that runs
            pg, actors = group
            ray.get([a.renew.remote(SPARE_HOLD_S) for a in actors], timeout=LEASE_CALL_TIMEOUT_S)
            infos: list[NodeInfo] = ray.get([a.node_info.remote() for a in actors], timeout=LEASE_CALL_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - its lease ran out meanwhile: this launch makes its own
            log.info("a lingering spare group could not be taken over: %s", err)
            release(list(group[1]) if group else [], group[0] if group else None)
            continue
        taken = pool.adopt(pg, actors, [i.pid for i in infos])
    return taken
