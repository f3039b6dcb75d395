"""Placing and stopping host actors: one actor per bundle of a placement group, with the platform's
environment, and a release that waits until Ray has freed their resources. Shared by an attempt's
group (`jaxlaunch.launcher.cluster.worker_group`) and the spare group (`jaxlaunch.launcher.cluster.standby`)."""

from __future__ import annotations

import importlib
import logging
import time

import ray
from jaxlaunch.launcher.configuration.schema import ClusterConfig
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from jaxlaunch.contract.protocol import HOST_PROGRAM, MONITOR_GROUP, host_env

log = logging.getLogger(__name__)
PG_REMOVAL_WAIT_S = 5.0
SPARES_NAMESPACE = "jaxlaunch"
"""The Ray namespace of lingering spare groups' named leaders (`jaxlaunch.launcher.cluster.standby`)."""


def release(actors: list[ActorHandle], pg: PlacementGroup | None) -> None:
    """Kills the actors and removes their placement group, waiting until Ray has freed its resources
    (it does so asynchronously; the next capacity check must see them free, or it would settle for
    fewer hosts). Goes on whatever one actor or Ray does."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as err:  # noqa: BLE001
            log.debug("kill failed: %s", err)
    if pg is None:
        return
    try:
        remove_placement_group(pg)
        deadline = time.monotonic() + PG_REMOVAL_WAIT_S
        while time.monotonic() < deadline and placement_group_table(pg).get("state") != "REMOVED":
            time.sleep(0.05)
    except Exception as err:  # noqa: BLE001
        log.debug("placement group removal failed: %s", err)


def create_hosts(cfg: ClusterConfig, pg: PlacementGroup, logs: list[str], attempt: int,
                 leader_name: str | None = None) -> list[ActorHandle]:
    """One host actor per bundle of `pg`, each with the platform's environment. `leader_name`: the
    actors outlive their driver (detached, their lease bounds them: `jaxlaunch.workers.supervision.lease`),
    the first one named so in `SPARES_NAMESPACE`."""
    resources = dict(cfg.resources_per_host)
    num_cpus, num_gpus = resources.pop("CPU", 0), resources.pop("GPU", 0)
    module, _, name = HOST_PROGRAM.partition(":")
    host_actor = getattr(importlib.import_module(module), name)
    # Ray's overloads of ray.remote omit the actor option concurrency_groups, which it documents and takes.
    remote_cls = ray.remote(concurrency_groups={MONITOR_GROUP: 1})(host_actor)  # type: ignore[call-overload]
    env = host_env(cfg.platform, cfg.devices_per_host, cfg.ynnpack)
    detached = {} if leader_name is None else {"lifetime": "detached"}
    return [remote_cls.options(
        num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
        runtime_env={"env_vars": env}, max_restarts=0, **detached,
        **({"name": leader_name, "namespace": SPARES_NAMESPACE} if leader_name is not None and rank == 0 else {}),
    ).remote(log_path, attempt, rank) for rank, log_path in enumerate(logs)]
