"""The memory tier's keepers, from the driver's side: one keeper actor per node that runs hosts,
started by name (`KEEPER_PROGRAM`) on that node, outliving every attempt's host processes, and
stopped with the launch. A keeper lost with its node is dropped; a new node gets a fresh one. A
keeper whose process dies while its node is up is restarted by Ray on that node (the handles the
hosts and the other keepers hold stay valid); `watch`, called at every poll, notices the new process
and says so once.

Every keeper of a launch gets the launch's id (its folder in each node's shared memory) and a secret
that authenticates the replica streams between keepers. `shutdown` asks each keeper to delete its
folder before killing it, and deletes what is left of the launch's folder on this machine (a keeper
killed with its node or its Ray instance could not)."""

from __future__ import annotations

import importlib
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from jaxlaunch.contract import events, tiers
from jaxlaunch.contract.event_base import first_line
from jaxlaunch.contract.protocol import (
    KEEPER_CONCURRENCY,
    KEEPER_HOLD_GROUP,
    KEEPER_HOLDS,
    KEEPER_PROGRAM,
    CheckpointConfig,
    NodeLiveness,
)

log = logging.getLogger(__name__)
KEEPER_START_TIMEOUT_S = 60.0
KEEPER_PING_TIMEOUT_S = 5.0
KEEPER_CLOSE_TIMEOUT_S = 10.0
KEEPER_RETRY_S = 0.5
"""Between asks of a keeper that Ray is restarting."""
KEEPER_WATCH_INTERVAL_S = 1.0
"""How often `watch` asks the keepers for their process: a dead one is restarted by Ray at once,
this only bounds how late the driver says so."""


class KeeperPool:
    def __init__(self, cfg: CheckpointConfig, liveness: Callable[[list[str]], dict[str, NodeLiveness]]):
        self.cfg = cfg
        self.liveness = liveness
        """The cluster's word on nodes (`RayCluster.nodes_liveness`): a keeper not answering on a node
        that is not dead may be restarting."""
        self.launch_id = tiers.new_launch_id()
        self.secret = secrets.token_hex(16)
        self.keepers: dict[str, Any] = {}
        self.pids: dict[str, int] = {}
        """Each keeper's process, as its latest answer gave it."""
        self.watching: dict[str, ray.ObjectRef] = {}
        self.starting: dict[str, ray.ObjectRef] = {}
        """The first answer (process id) asked of each keeper `ensure` started, until `wait_started`."""
        self.watched_at = 0.0
        self.lost: list[str] = []
        """Nodes whose keeper was found gone by the latest `ensure` (lost with their node)."""
        self.stopped: set[str] = set()
        """Nodes whose keeper the driver killed (it never deleted its folder) and started none since."""
        self.left: list[tiers.LeftHistory] = []
        """Steps restored whose later steps a keeper on a node that is up did not drop (`kept_after` of a
        `MemoryTierOff`, with its attempt): before the next attempt's hosts or a persist read the
        keepers, each drops them or is replaced (`_drop_left_behind`)."""
        if self.enabled:
            removed = tiers.remove_orphans()
            if removed:
                log.info("deleted the memory-tier files of launches whose driver died: %s", removed)

    @property
    def enabled(self) -> bool:
        return self.cfg.memory_tier

    def ensure(self, nodes: list[str]) -> dict[str, Any]:
        """A keeper on each of `nodes`, started (without waiting: `wait_started`) where there is none;
        returns every keeper (node id -> handle), those of nodes no host runs on now included: they may
        hold the replicas of a lost node's parts. A keeper's handle takes calls at once (Ray queues them
        until its process is up), so the hosts start beside the keepers' processes."""
        if not self.enabled:
            return {}
        self._drop_dead()
        if self.left:  # before any host of the attempt is told where the keepers are
            self._drop_left_behind()
        self._start(nodes)
        return dict(self.keepers)

    def _start(self, nodes: list[str]) -> None:
        """A keeper on each of `nodes` that has none. A new keeper starts empty: one the driver stopped
        left files that are not the run's to read (Ray's restart of a keeper takes them over)."""
        module, _, name = KEEPER_PROGRAM.partition(":")
        # Ray's overloads of ray.remote omit the actor option concurrency_groups, which it documents and takes.
        remote_cls = ray.remote(concurrency_groups={KEEPER_HOLD_GROUP: KEEPER_HOLDS})(  # type: ignore[call-overload]
            getattr(importlib.import_module(module), name))
        budget = int(self.cfg.memory_budget_mb * 1e6) if self.cfg.memory_budget_mb is not None else None
        started = {}
        for node in dict.fromkeys(nodes):
            if node not in self.keepers:
                started[node] = remote_cls.options(
                    # Restarted on its node whenever its process dies; not on another node.
                    num_cpus=0, max_concurrency=KEEPER_CONCURRENCY, max_restarts=-1, max_task_retries=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                ).remote(node, budget, self.cfg.memory_keep, self.launch_id, self.secret)
        self.starting.update({node: keeper.ping.remote() for node, keeper in started.items()})
        self.keepers.update(started)
        self.stopped -= set(started)  # a keeper started anew empties the folder its node's last one left

    def heard(self, host_events: Iterable[events.Event], attempt: int) -> None:
        """Notes, from the hosts' events of `attempt`, a keeper on a node that is up that did not drop
        the steps after the one restored (rank 0's `MemoryTierOff`)."""
        for event in host_events:
            if isinstance(event, events.MemoryTierOff) and event.kept_after is not None:
                self.left.append(tiers.LeftHistory(attempt, event.kept_after))

    def _drop_left_behind(self) -> None:
        """Has every keeper drop what each of `left` left (and refuse it from now on); one that does
        not within `KEEPER_START_TIMEOUT_S` is stopped (a keeper started later on its node starts
        empty). Then no keeper holds them."""
        left, self.left = self.left, []
        asked = {node: [k.forget_after.remote(x.step, x.attempt) for x in left] for node, k in self.keepers.items()}
        refs = [ref for node_refs in asked.values() for ref in node_refs]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=KEEPER_START_TIMEOUT_S)
        steps = ", ".join(str(x.step) for x in left)
        for node, node_refs in asked.items():
            try:
                for ref in node_refs:
                    if ref not in ready:
                        raise TimeoutError(f"no answer in {KEEPER_START_TIMEOUT_S:.0f} s")
                    ray.get(ref)
            except Exception as err:  # noqa: BLE001 - replaced: what it holds is not read
                log.warning("the keeper of node %s did not drop the steps after %s, which the run left (%s): "
                            "replaced, empty", node[:12], steps, first_line(err))
                self._stop(node)
                self.lost.append(node)  # what it held is gone: the next restore says so
        log.info("no keeper holds the steps after %s any more", steps)

    def wait_started(self) -> None:
        """Waits for the keepers `ensure` started to answer (their processes). One that did not within
        `KEEPER_START_TIMEOUT_S` is stopped and dropped (a later `ensure` starts another on its node,
        and none may come up beside it in the same folder), and this raises, as a host that did not
        start does."""
        starting, self.starting = self.starting, {}
        if not starting:
            return
        ready, _ = ray.wait(list(starting.values()), num_returns=len(starting), timeout=KEEPER_START_TIMEOUT_S)
        failed = []
        for node, ref in starting.items():
            try:
                if ref not in ready:
                    raise TimeoutError(f"no answer in {KEEPER_START_TIMEOUT_S:.0f} s")
                self.pids[node] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - said below, with every keeper that did not start
                failed.append(f"{node[:12]} ({first_line(err)})")
                self._stop(node)
        if failed:
            raise RuntimeError(f"the memory tier's keeper did not start on node(s) {', '.join(failed)}")

    def watch(self, step: int | None) -> list[events.KeeperRestarted]:
        """Without waiting: each keeper found in a new process since the last answer (Ray restarted it
        on its node), once. `step`: the newest step the hosts reported, for the record."""
        found = []
        for node, ref in list(self.watching.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            del self.watching[node]
            try:
                pid = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - restarting, or gone with its node: asked again
                log.debug("the keeper of node %s did not answer: %s", node[:12], err)
                continue
            if node in self.pids and self.pids[node] != pid:
                found.append(events.KeeperRestarted(node=node, pid=pid, old_pid=self.pids[node], step=step))
                log.warning("the keeper of node %s died; Ray restarted it (process %d)", node[:12], pid)
            self.pids[node] = pid
        now = time.monotonic()
        if self.enabled and now - self.watched_at >= KEEPER_WATCH_INTERVAL_S:
            self.watched_at = now
            for node, keeper in self.keepers.items():
                if node not in self.watching:
                    self.watching[node] = keeper.ping.remote()
        return found

    def _drop_dead(self) -> None:
        """Drops the keepers that do not answer: at once one whose node Ray lists dead or that does not
        answer in `KEEPER_PING_TIMEOUT_S`; one on a node that is up after `KEEPER_START_TIMEOUT_S`,
        since Ray may be restarting it (its process died, with a host's perhaps), and its restart takes
        over what it held where a keeper started in its place would start empty."""
        self.lost = []
        deadline = time.monotonic() + KEEPER_START_TIMEOUT_S
        asking, timeout_s, alive = dict(self.keepers), KEEPER_PING_TIMEOUT_S, None
        while asking:
            pings = {node: k.ping.remote() for node, k in asking.items()}
            ready, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=timeout_s)
            again = {}
            for node, ref in pings.items():
                try:
                    if ref not in ready:
                        raise TimeoutError("no answer")
                    ray.get(ref)
                except (TimeoutError, ActorUnavailableError) as err:
                    alive = self._not_dead(list(self.keepers)) if alive is None else alive
                    if node in alive and time.monotonic() < deadline:
                        again[node] = asking[node]  # restarting on its node, or busy: asked again
                    else:
                        self._gone(node, err)
                except Exception as err:  # noqa: BLE001 - a keeper lost with its node
                    self._gone(node, err)
            asking, timeout_s = again, max(0.0, min(KEEPER_PING_TIMEOUT_S, deadline - time.monotonic()))
            if asking:
                time.sleep(KEEPER_RETRY_S)  # a back-off between asks of a restarting actor, not a synchronisation

    def _not_dead(self, nodes: list[str]) -> set[str]:
        """Of `nodes`, those the cluster does not know to be dead; none when it cannot be asked (a
        keeper not answering then counts as gone; a stopped keeper's folder stays, as a dead node's)."""
        try:
            return {n for n, how in self.liveness(nodes).items() if how != NodeLiveness.DEAD}
        except Exception as err:  # noqa: BLE001 - said, and erring toward replacing the keeper
            log.info("the nodes' liveness could not be read: %s", first_line(err))
            return set()

    def _gone(self, node: str, err: Exception) -> None:
        log.info("the keeper of node %s is gone: %s", node[:12], first_line(err))
        self._stop(node)
        self.lost.append(node)

    def _stop(self, node: str) -> None:
        """Drops the keeper of `node`, killing its process if it has one (a keeper that did not answer
        in time but lives would otherwise come up beside its successor)."""
        keeper = self.keepers.pop(node)
        self.stopped.add(node)
        self.pids.pop(node, None)
        self.watching.pop(node, None)
        self.starting.pop(node, None)
        try:
            ray.kill(keeper, no_restart=True)
        except Exception as err:  # noqa: BLE001 - gone with its node
            log.debug("kill failed: %s", err)

    def newest_committed(self, at_most: int | None = None) -> tuple[int, int] | None:
        """The newest step committed in memory (up to `at_most`) that the live keepers still hold whole,
        with the number of hosts that saved it; None when there is none."""
        if not self.enabled or not self.keepers:
            return None
        self._drop_dead()
        if self.left:
            self._drop_left_behind()
        held = []
        for node, keeper in self.keepers.items():
            try:
                held += [tiers.Held.from_dict(d) for d in ray.get(keeper.index.remote(), timeout=KEEPER_PING_TIMEOUT_S)]
            except Exception as err:  # noqa: BLE001 - a keeper lost since the ping holds nothing
                log.info("the keeper of node %s did not answer: %s", node[:12], err)
        steps = [s for s in tiers.whole_steps(held) if at_most is None or s <= at_most]
        if not steps:
            return None
        return steps[0], max(h.num_hosts for h in held if h.step == steps[0])

    def forget(self) -> None:
        """Drops the keepers without asking Ray (its Ray instance is gone, and its keepers with it)."""
        self.keepers, self.pids, self.watching, self.starting, self.stopped = {}, {}, {}, {}, set()
        self._remove_local_files()

    def shutdown(self) -> None:
        """Every keeper closed (its files deleted) and stopped, this node's folders removed; also when
        asking them fails (Ray gone, a Ctrl-C): the rest still runs."""
        try:
            self._start_on_stopped()
            if self.keepers:
                closing = [k.close.remote() for k in self.keepers.values()]
                ready, _ = ray.wait(closing, num_returns=len(closing), timeout=KEEPER_CLOSE_TIMEOUT_S)
                for ref in ready:
                    try:
                        ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - a keeper lost with its node: its files went too
                        log.debug("a keeper did not close: %s", err)
        finally:
            try:
                for node in list(self.keepers):
                    self._stop(node)
            finally:
                self._remove_local_files()

    def _start_on_stopped(self) -> None:
        """A keeper on each node that is up whose keeper the driver killed and did not replace (a stuck
        one, its node no longer running hosts): it empties the folder the killed one left, and the
        shutdown's `close` deletes it. Another node's shared memory is reached only through a process
        there."""
        if not self.enabled or not self.stopped:
            return
        self._start(sorted(self._not_dead(sorted(self.stopped))))
        self.starting = {}  # not waited for: the shutdown's close waits for them

    def _remove_local_files(self) -> None:
        """The launch's part files on this machine, whatever its keepers managed: a keeper killed
        mid-close, or a dead Ray instance's, leaves its folder behind. (Other nodes' shared memory is
        theirs to clear: their keepers' `close`.)"""
        if self.enabled:
            shutil.rmtree(tiers.launch_dir(self.launch_id), ignore_errors=True)
