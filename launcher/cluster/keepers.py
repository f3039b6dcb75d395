"""The memory tier's keepers, from the driver's side: one keeper actor per node that runs hosts,
started by name (`KEEPER_PROGRAM`) on that node, outliving every attempt's host processes, and
stopped with the launch. A keeper lost with its node is dropped; a new node gets a fresh one."""

from __future__ import annotations

import importlib
import logging
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from jaxlaunch.contract import tiers
from jaxlaunch.contract.protocol import KEEPER_CONCURRENCY, KEEPER_PROGRAM, CheckpointConfig

log = logging.getLogger(__name__)
KEEPER_START_TIMEOUT_S = 60.0
KEEPER_PING_TIMEOUT_S = 5.0


class KeeperPool:
    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        self.keepers: dict[str, Any] = {}
        self.lost: list[str] = []
        """Nodes whose keeper was found gone by the latest `ensure` (lost with their node)."""

    @property
    def enabled(self) -> bool:
        return self.cfg.memory_tier

    def ensure(self, nodes: list[str]) -> dict[str, Any]:
        """A live keeper on each of `nodes`; returns every live keeper (node id -> handle), those of
        nodes no host runs on now included: they may hold the replicas of a lost node's parts."""
        if not self.enabled:
            return {}
        self._drop_dead()
        module, _, name = KEEPER_PROGRAM.partition(":")
        remote_cls = ray.remote(getattr(importlib.import_module(module), name))
        budget = int(self.cfg.memory_budget_mb * 1e6) if self.cfg.memory_budget_mb is not None else None
        started = {}
        for node in dict.fromkeys(nodes):
            if node not in self.keepers:
                started[node] = remote_cls.options(
                    num_cpus=0, max_concurrency=KEEPER_CONCURRENCY, max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                ).remote(node, budget, self.cfg.memory_keep)
        if started:
            ray.get([k.ping.remote() for k in started.values()], timeout=KEEPER_START_TIMEOUT_S)
            self.keepers.update(started)
        return dict(self.keepers)

    def _drop_dead(self) -> None:
        self.lost = []
        pings = {node: k.ping.remote() for node, k in self.keepers.items()}
        ready, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=KEEPER_PING_TIMEOUT_S)
        for node, ref in pings.items():
            try:
                if ref not in ready:
                    raise TimeoutError("no answer")
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a keeper lost with its node
                log.info("the keeper of node %s is gone: %s", node[:12], err)
                del self.keepers[node]
                self.lost.append(node)

    def newest_committed(self) -> tuple[int, int] | None:
        """The newest step committed in memory that the live keepers still hold whole, with the number
        of hosts that saved it; None when there is none."""
        if not self.enabled or not self.keepers:
            return None
        self._drop_dead()
        held = []
        for node, keeper in self.keepers.items():
            try:
                held += [tiers.Held.from_dict(d) for d in ray.get(keeper.index.remote(), timeout=KEEPER_PING_TIMEOUT_S)]
            except Exception as err:  # noqa: BLE001 - a keeper lost since the ping holds nothing
                log.info("the keeper of node %s did not answer: %s", node[:12], err)
        steps = tiers.committed_steps(held)
        if not steps:
            return None
        return steps[0], max(h.num_hosts for h in held if h.step == steps[0])

    def forget(self) -> None:
        """Drops the keepers without asking Ray (its Ray instance is gone)."""
        self.keepers = {}

    def shutdown(self) -> None:
        for keeper in self.keepers.values():
            try:
                ray.kill(keeper, no_restart=True)
            except Exception as err:  # noqa: BLE001
                log.debug("kill failed: %s", err)
        self.keepers = {}
