"""One attempt's hosts on Ray: a placement group with one bundle per host, one actor per host, a fresh
coordinator port, polls, and a teardown that kills every actor and frees the placement group.

This adapter only translates: Ray's objects and errors become the typed contract of
`jaxlaunch.contract.protocol`; what a host's ending means is decided by `jaxlaunch.launcher.control.policy`."""

from __future__ import annotations

import collections
import importlib
import logging
import shutil
import subprocess
import time
from typing import Any, Protocol

import ray
from jaxlaunch.launcher.cluster.keepers import KeeperPool
from jaxlaunch.launcher.cluster.ray_cluster import RayCluster
from jaxlaunch.launcher.configuration.schema import ClusterConfig
from jaxlaunch.launcher.control.limits import UNANSWERED_CONFIRM_S
from jaxlaunch.launcher.records.runs import RunDir
from ray.actor import ActorHandle
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from jaxlaunch.contract.events import Event
from jaxlaunch.contract.protocol import (
    HOST_PROGRAM,
    MONITOR_GROUP,
    ErrorKind,
    ExitHow,
    GroupInfo,
    GroupPoll,
    HostError,
    HostExit,
    HostResult,
    HostSnapshot,
    HostSpec,
    HostStatus,
    Injection,
    NodeInfo,
    NodeLiveness,
    PlacementError,
    ReplicaChecksums,
    StopAnswer,
    host_env,
)

log = logging.getLogger(__name__)
ACTOR_CALL_TIMEOUT_S = 120.0
LAST_POLL_TIMEOUT_S = 10.0
"""For the records a host holds after its code raised: a live process answers in milliseconds."""
STACK_DUMP_TIMEOUT_S = 20.0
STOP_CALL_TIMEOUT_S = 5.0
"""How long a stop proposal or confirmation waits for the hosts' monitor threads (they answer at once)."""
PG_REMOVAL_WAIT_S = 5.0
DISCONNECT_TIMEOUT_S = 15.0
"""How long the hosts of a group that every host returned from may take to leave jax.distributed
together (its shutdown barrier, a moment when all of them call it) before they are killed anyway."""
NODE_DIED_MARKER = "because its node has died"  # Ray GCS: "The actor died because its node has died."


class MakeSpec(Protocol):
    """What a host of an attempt is told to run (the run's own settings bound in)."""

    def __call__(self, *, attempt: int, rank: int, num_hosts: int, coordinator_address: str,
                 injections: tuple[Injection, ...], keepers: dict[str, Any] | None = None,
                 lost_keepers: tuple[str, ...] = ()) -> HostSpec: ...


class RayWorkerGroup:
    """One attempt's hosts: placement group, actors, coordinator, polls, teardown."""

    def __init__(self, cluster: RayCluster, run: RunDir, make_spec: MakeSpec, poll_interval_s: float,
                 standby: StandbyPool | None = None, keepers: KeeperPool | None = None, logs_as: str = "attempt"):
        self.cluster, self.run, self.make_spec, self.poll_interval_s = cluster, run, make_spec, poll_interval_s
        self.logs_as = logs_as
        """The host logs' prefix: `attempt` (attempt-N-rank-R.log), or another run's (`persist`)."""
        self.standby, self.keepers = standby, keepers
        self.replenished = False
        self.pg: PlacementGroup | None = None
        self.actors: list[ActorHandle] = []
        self.run_refs: dict[int, ray.ObjectRef] = {}
        self.poll_refs: dict[int, ray.ObjectRef] = {}
        self.hosts: list[HostStatus] = []
        self.results: dict[int, HostResult] = {}
        self.exits: dict[int, HostExit] = {}
        self._unknown_since: dict[int, float] = {}
        """Each host whose node does not answer: since when (monotonic), across asks."""
        self.node_info: list[NodeInfo] = []
        self.attempt = 0
        """The attempt `start` started (the hosts' events are of it)."""

    # -- start -----------------------------------------------------------------------------------
    def start(self, num_hosts: int, attempt: int, injections: tuple[Injection, ...] = ()) -> GroupInfo:
        cfg = self.cluster.cfg
        self.attempt = attempt
        logs = [str(self.run.host_log(attempt, rank, self.logs_as)) for rank in range(num_hosts)]
        on_standby = self._take_standby(num_hosts, logs, attempt)
        if not on_standby:
            self.pg = pg = placement_group([dict(cfg.resources_per_host)] * num_hosts, strategy=cfg.placement_strategy,
                                           bundle_label_selector=self.cluster.bundle_selectors(num_hosts))
            ready, _ = ray.wait([pg.ready()], timeout=cfg.placement_timeout_s)
            if not ready:
                raise PlacementError(self.cluster.placement_message(num_hosts, self.cluster.placeable_hosts(),
                                                                    waited=True))
            self.actors = create_hosts(cfg, pg, logs, attempt)
            self.node_info = ray.get([a.node_info.remote() for a in self.actors], timeout=ACTOR_CALL_TIMEOUT_S)
        address: ray.ObjectRef[str] = self.actors[0].reserve_coordinator_address.remote()
        coordinator = ray.get(address, timeout=ACTOR_CALL_TIMEOUT_S)
        keepers = self.keepers.ensure([n.node_id for n in self.node_info]) if self.keepers is not None else {}
        for rank, actor in enumerate(self.actors):
            spec = self.make_spec(attempt=attempt, rank=rank, num_hosts=num_hosts, coordinator_address=coordinator,
                                  injections=injections, keepers=keepers,
                                  lost_keepers=tuple(self.keepers.lost) if self.keepers is not None else ())
            self.run_refs[rank] = actor.run.remote(spec)
        if self.keepers is not None:
            self.keepers.wait_started()
        # The start-up clock runs from here: the keepers' start (and drops) above is no host's start-up.
        now = time.monotonic()
        self.hosts = [HostStatus(rank, last_heard=now, last_progress=now) for rank in range(num_hosts)]
        return GroupInfo(coordinator, [n.node_id for n in self.node_info], [n.pid for n in self.node_info],
                         on_standby)

    def _take_standby(self, num_hosts: int, logs: list[str], attempt: int) -> bool:
        """Whether the spare group took over (placed, its processes started and warmed up)."""
        taken = self.standby.take(num_hosts) if self.standby is not None else None
        if taken is None:
            return False
        self.pg, self.actors = taken
        try:
            self.node_info = ray.get([a.activate.remote(logs[r], attempt, r) for r, a in enumerate(self.actors)],
                                     timeout=ACTOR_CALL_TIMEOUT_S)
            return True
        except Exception as err:  # noqa: BLE001 - a spare that died is replaced by a fresh group
            log.info("the standby group could not take over (%s); starting a fresh one", err)
            self.shutdown()
            return False

    # -- poll ------------------------------------------------------------------------------------
    def poll(self) -> GroupPoll:
        records, events = [], []
        busy: dict[int, list[tuple[int, float]]] = {}
        checksums: dict[int, list[ReplicaChecksums]] = {}
        for rank, actor in enumerate(self.actors):
            if rank not in self.poll_refs and rank not in self.results and rank not in self.exits:
                self.poll_refs[rank] = actor.poll.remote()
        pending = list(self.run_refs.values()) + list(self.poll_refs.values())
        ready = set(ray.wait(pending, num_returns=len(pending), timeout=self.poll_interval_s)[0]) if pending else set()
        now = time.monotonic()
        for rank, ref in list(self.poll_refs.items()):
            if ref not in ready:
                continue
            del self.poll_refs[rank]
            try:
                snapshot = ray.get(ref)
            except (RayActorError, ActorUnavailableError):
                continue  # the run ref reports the death
            host = self.hosts[rank]
            host.last_heard = now
            host.heard(snapshot.step, snapshot.phase, now)
            records += snapshot.records
            events += [(rank, e) for e in snapshot.events if rank == 0 or e.per_host]
            busy.setdefault(rank, []).extend(snapshot.busy)
            checksums.setdefault(rank, []).extend(snapshot.checksums)
            host.heard_committed(snapshot.committed)
        for rank, ref in list(self.run_refs.items()):
            if ref not in ready:
                continue
            del self.run_refs[rank]
            try:
                result: HostResult = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - every way a host can end is translated
                self.exits[rank] = self._exit(rank, err, now)
                if self.exits[rank].how != ExitHow.RAISED:
                    continue
                # The process lives on after its code raised: the records of its last steps, made
                # since the last poll, are the ones that show what led to the error.
                snapshots = self._last_polls(rank, self.actors[rank].poll.remote())
            else:
                snapshots = [*self._last_polls(rank), result.final_snapshot]
                self.results[rank] = result
            for snapshot in snapshots:
                records += snapshot.records
                events += [(rank, e) for e in snapshot.events if rank == 0 or e.per_host]
                busy.setdefault(rank, []).extend(snapshot.busy)
                checksums.setdefault(rank, []).extend(snapshot.checksums)
                self.hosts[rank].heard_committed(snapshot.committed)
        self._refresh_liveness()
        if self.standby is not None and not self.replenished and all(h.past_first_step for h in self.hosts):
            # Only once every first step ran: the spares' imports would slow this group's start-up.
            self.replenished = True
            self.standby.replenish(len(self.actors))
        records.sort(key=lambda r: r["step"])
        reported = [h.step for h in self.hosts if h.step is not None]
        notices: list[Event] = []
        if self.keepers is not None:
            notices += self.keepers.watch(max(reported) if reported else None)
            self.keepers.heard((event for _, event in events), self.attempt)
        return GroupPoll(self.hosts, records, events, dict(self.results), list(self.exits.values()), busy,
                         notices=notices, checksums=checksums)

    def _last_polls(self, rank: int, *more: ray.ObjectRef) -> list[HostSnapshot]:
        """A host's poll in flight as it ended (it may hold records drained before the end), then `more`
        (answered at once by a live process: its monitor group does not wait for the training thread)."""
        refs = [self.poll_refs.pop(rank)] if rank in self.poll_refs else []
        snapshots = []
        for ref in (*refs, *more):
            try:
                snapshots.append(ray.get(ref, timeout=ACTOR_CALL_TIMEOUT_S if ref in refs else LAST_POLL_TIMEOUT_S))
            except Exception as err:  # noqa: BLE001
                log.debug("last poll of host %d lost: %s", rank, err)
        return snapshots

    def _exit(self, rank: int, err: Exception, now: float) -> HostExit:
        step = self.hosts[rank].step
        if isinstance(err, RayTaskError) and isinstance(err.cause, HostError):
            return HostExit(rank, ExitHow.RAISED, now, step, error=err.cause)
        if isinstance(err, RayTaskError):  # raised outside our handler (e.g. while unpickling the spec)
            cause = err.cause
            error = HostError(rank, step, ErrorKind.USER, type(cause).__name__, str(cause), str(err))
            return HostExit(rank, ExitHow.RAISED, now, step, error=error)
        text = str(err)
        detail = next((line.strip() for line in text.splitlines() if " because " in line), text.strip())
        detail = (detail.splitlines() or [type(err).__name__])[0][:300]
        if isinstance(err, ActorDiedError) and err.preempted:
            return HostExit(rank, ExitHow.NODE_PREEMPTED, now, step, detail)
        if NODE_DIED_MARKER in text.lower():
            return HostExit(rank, ExitHow.NODE_DIED, now, step, detail, node=NodeLiveness.DEAD)
        how = ExitHow.UNREACHABLE if isinstance(err, ActorUnavailableError) else ExitHow.PROCESS_DIED
        since = self.hosts[rank].last_heard
        return HostExit(rank, how, now, step, detail, node=self._liveness([rank])[rank], since=since)

    def _liveness(self, ranks: list[int]) -> dict[int, NodeLiveness]:
        """Each rank's node as Ray and its raylet tell it now: one listing, all probes at once."""
        try:
            nodes = self.cluster.nodes_liveness([self.node_info[rank].node_id for rank in ranks])
        except Exception as err:  # noqa: BLE001 - the GCS itself may be gone with an embedded node
            log.debug("liveness of hosts %s's nodes unknown: %s", ranks, err)
            return dict.fromkeys(ranks, NodeLiveness.UNKNOWN)
        return {rank: nodes[self.node_info[rank].node_id] for rank in ranks}

    def _refresh_liveness(self) -> None:
        """A death whose node was unknown is looked at again: Ray declares a lost node dead only
        after its health checks fail."""
        unknown = [rank for rank, exit in self.exits.items()
                   if exit.how in (ExitHow.PROCESS_DIED, ExitHow.UNREACHABLE) and exit.node == NodeLiveness.UNKNOWN]
        for rank, node in (self._liveness(unknown) if unknown else {}).items():
            if node != NodeLiveness.UNKNOWN:
                exit = self.exits[rank]
                self.exits[rank] = HostExit(rank, exit.how, exit.at, exit.step, exit.detail, node=node,
                                            since=exit.since)

    def hosts_nodes(self, lost_after_s: float) -> dict[int, NodeLiveness]:
        """Each host's node now (gone by Ray's word or a refused raylet, alive, or not answering),
        whether or not its ending was reported yet; a host that returned is left out. A node counts
        as gone once its host has been silent for `lost_after_s` and the node has not answered any
        ask for UNANSWERED_CONFIRM_S (one probe that timed out on a busy machine is no lost node)."""
        now = time.monotonic()
        nodes = self._liveness([rank for rank in range(len(self.node_info)) if rank not in self.results])
        for rank, node in nodes.items():
            if node != NodeLiveness.UNKNOWN:
                self._unknown_since.pop(rank, None)
                continue
            since = self._unknown_since.setdefault(rank, now)
            silent_since = self.hosts[rank].last_heard if rank < len(self.hosts) else since
            if now - since >= UNANSWERED_CONFIRM_S and now - silent_since >= lost_after_s:
                nodes[rank] = NodeLiveness.DEAD
        return nodes

    # -- interventions ---------------------------------------------------------------------------
    def propose_stop(self, step: int) -> dict[int, StopAnswer]:
        """Every running host's answer to a proposed stop step; a host that does not answer in time
        is left out (the driver proposes again)."""
        ranks = [rank for rank in range(len(self.actors)) if rank not in self.results and rank not in self.exits]
        return {rank: answer for rank, answer in zip(ranks, self._ask(ranks, "propose_stop", step), strict=True)
                if isinstance(answer, StopAnswer)}

    def confirm_stop(self, step: int, ranks: list[int]) -> list[int]:
        """The ranks that took `step` as final."""
        return [rank for rank, ok in zip(ranks, self._ask(ranks, "confirm_stop", step), strict=True) if ok is True]

    def _ask(self, ranks: list[int], method: str, *args: Any) -> list[Any]:
        """One call to each host's monitor thread, side by side; None for a host that did not answer."""
        refs = [getattr(self.actors[rank], method).remote(*args) for rank in ranks]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=STOP_CALL_TIMEOUT_S)[0]) if refs else set()
        answers = []
        for ref in refs:
            try:
                answers.append(ray.get(ref) if ref in ready else None)
            except Exception as err:  # noqa: BLE001 - a host that died is reported by its run ref
                log.debug("%s failed: %s", method, err)
                answers.append(None)
        return answers

    def kill(self, rank: int) -> None:
        """SIGKILLs one host process (chaos)."""
        self.actors[rank].kill.remote()

    def dump_stacks(self, rank: int) -> str | None:
        """Every thread's Python stack of a host process, read from outside it with py-spy on its node
        (a hung or stopped process cannot answer for itself)."""
        info = self.node_info[rank]
        dump = ray.remote(num_cpus=0)(_py_spy_dump).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(info.node_id, soft=False))
        try:
            return ray.get(dump.remote(info.pid), timeout=STACK_DUMP_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - a dump is a diagnosis, never a reason to fail
            log.debug("stack dump of host %d failed: %s", rank, err)
            return None

    # -- teardown --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Kills every actor of the group and frees its placement group; safe to call twice. A group
        whose every host returned first leaves jax.distributed, all hosts at once (its barrier)."""
        if self.cluster.alive():
            if self.actors and len(self.results) == len(self.actors):
                try:
                    ray.get([actor.disconnect.remote() for actor in self.actors], timeout=DISCONNECT_TIMEOUT_S)
                except Exception as err:  # noqa: BLE001 - the processes are killed next either way
                    log.info("the hosts did not all leave jax.distributed: %s", err)
            release(self.actors, self.pg)
        else:
            # The embedded instance died with its node, and the group with it: nothing to release
            # (its GCS, kept until the instance stops, answers, but goes with the instance).
            log.info("the embedded Ray instance is gone: the group went with it")
        self.actors, self.run_refs, self.poll_refs, self.pg = [], {}, {}, None


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


def create_hosts(cfg: ClusterConfig, pg: PlacementGroup, logs: list[str], attempt: int) -> list[ActorHandle]:
    """One host actor per bundle of `pg`, each with the platform's environment."""
    resources = dict(cfg.resources_per_host)
    num_cpus, num_gpus = resources.pop("CPU", 0), resources.pop("GPU", 0)
    module, _, name = HOST_PROGRAM.partition(":")
    host_actor = getattr(importlib.import_module(module), name)
    # Ray's overloads of ray.remote omit the actor option concurrency_groups, which it documents and takes.
    remote_cls = ray.remote(concurrency_groups={MONITOR_GROUP: 1})(host_actor)  # type: ignore[call-overload]
    env = host_env(cfg.platform, cfg.devices_per_host, cfg.ynnpack)
    return [remote_cls.options(
        num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
        runtime_env={"env_vars": env}, max_restarts=0,
    ).remote(log_path, attempt, rank) for rank, log_path in enumerate(logs)]


class StandbyPool:
    """A spare group of host processes, placed and warmed up (Python, JAX, Flax, Orbax imported),
    waiting to take over the next attempt, so that a restart skips process start and imports. It is
    made only while the cluster has room for it beside the running group, and its hosts count as
    placeable (they are given up whenever the next attempt needs a different count)."""

    def __init__(self, cluster: RayCluster, run: RunDir):
        self.cluster, self.run = cluster, run
        self.pg: PlacementGroup | None = None
        self.placed: ray.ObjectRef | None = None
        self.actors: list[ActorHandle] = []
        self.made = 0

    @property
    def reserved_hosts(self) -> int:
        if self.pg is None or not ray.wait([self.placed], timeout=0)[0]:
            return 0
        return len(self.actors)

    @property
    def nodes(self) -> set[str]:
        """The nodes its spares are placed on (none before they are)."""
        return set(self.per_node)

    @property
    def per_node(self) -> dict[str, int]:
        """How many spares each node holds (none before they are placed)."""
        if self.pg is None or self.reserved_hosts == 0:
            return {}
        return dict(collections.Counter(placement_group_table(self.pg).get("bundles_to_node_id", {}).values()))

    def replenish(self, num_hosts: int) -> None:
        if self.actors or self.cluster.placeable_hosts() < num_hosts:
            return
        self.made += 1
        cfg = self.cluster.cfg
        self.pg = pg = placement_group([dict(cfg.resources_per_host)] * num_hosts, strategy=cfg.placement_strategy,
                                       bundle_label_selector=self.cluster.bundle_selectors(num_hosts))
        self.placed = pg.ready()
        logs = [str(self.run.hosts / f"standby-{self.made}-rank-{rank}.log") for rank in range(num_hosts)]
        self.actors = create_hosts(cfg, pg, logs, 0)
        for actor in self.actors:
            actor.warm.remote()

    def take(self, num_hosts: int) -> tuple[PlacementGroup, list[ActorHandle]] | None:
        """The spare group's placement group and actors, if it is ready and of the right size."""
        if not self.actors:
            return None
        pg = self.pg
        if pg is None or len(self.actors) != num_hosts or self.reserved_hosts == 0:
            self.shutdown()
            return None
        taken, self.pg, self.placed, self.actors = (pg, self.actors), None, None, []
        return taken

    def forget(self) -> None:
        """Drops the spare group without asking Ray (its Ray instance is gone)."""
        self.pg, self.placed, self.actors = None, None, []

    def shutdown(self) -> None:
        release(self.actors, self.pg)
        self.pg, self.placed, self.actors = None, None, []


def _py_spy_dump(pid: int) -> str:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        import sys
        from pathlib import Path

        candidate = Path(sys.executable).parent / "py-spy"
        py_spy = str(candidate) if candidate.exists() else None
    if py_spy is None:
        return "py-spy is not installed on the host's node"
    result = subprocess.run([py_spy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True,
                            timeout=STACK_DUMP_TIMEOUT_S - 2)
    return result.stdout if result.returncode == 0 else f"py-spy failed: {result.stderr.strip()[:500]}"
