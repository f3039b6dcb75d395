"""Ray side of the driver: the cluster connection, and one group of host actors per attempt.

The group is placed with a placement group (one bundle per host), gets a fresh coordinator port,
and is torn down as a whole: every actor killed, the placement group removed."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from launcher.config import PROJECT_ROOT, ClusterConfig, JobConfig
from launcher.driver import PlacementError
from launcher.policy import Failure, FailureKind
from launcher.runs import RunDir
from workers.host import MONITOR_GROUP, AttemptSpec, HostActor, HostError
from workers.runtime import host_env

log = logging.getLogger(__name__)
CODE_PACKAGES = ("launcher", "workers", "models")
ACTOR_CALL_TIMEOUT_S = 120.0
NODE_DEATH_WAIT_S = 30.0
"""How long an unreachable host may stay unexplained before it counts as crashed (Ray's default
node health checks declare a silent node dead after about 15 s)."""
NODE_DIED_MARKER = "because its node has died"  # Ray GCS: "The actor died because its node has died."


class RayCluster:
    """The Ray connection: an embedded local instance this process starts and stops, or an
    existing cluster it joins and leaves."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.embedded = cfg.address is None

    def connect(self) -> None:
        if self.embedded:
            # Ray turns token authentication on by default (making a token if there is none) and
            # warns about it on the user's terminal; the choice is ours and documented.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            # address="local" never joins a cluster left behind by an earlier `ray start`.
            ray.init(
                address="local",
                num_cpus=self.cfg.embedded_num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}},
            )
        else:
            ray.init(
                address=self.cfg.address,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"py_modules": [str(PROJECT_ROOT / p) for p in CODE_PACKAGES]},
            )

    def shutdown(self) -> None:
        if ray.is_initialized():
            ray.shutdown()

    def placeable_hosts(self, resources: dict[str, float], strategy: str) -> int:
        """Hosts the alive nodes can hold, from their total resources."""
        total = 0
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            have = node.get("Resources", {})
            fit = min((math.floor(have.get(k, 0) / v + 1e-9) for k, v in resources.items()), default=0)
            total += min(fit, 1) if strategy == "STRICT_SPREAD" else fit
        return total

    def placement_message(self, wanted: int, placeable: int, waited: bool = False) -> str:
        """Why `wanted` hosts do not fit, what the cluster has, and what to pass instead."""
        cfg = self.cfg
        waited_for = f" after waiting {cfg.placement_timeout_s:g} s" if waited else ""
        return (
            f"cannot place {wanted} hosts of {cfg.resources_per_host} ({cfg.placement_strategy}){waited_for}: "
            f"the cluster has {self.describe()}, room for {placeable}; "
            f"pass --hosts {placeable} or fewer, or add capacity"
        )

    def describe(self) -> str:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        res = ray.cluster_resources()
        parts = [f"{k}={v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU", "TPU", "host")]
        return f"{len(nodes)} node(s) with {', '.join(parts) or 'no resources'}"


@dataclasses.dataclass
class HostPoll:
    rank: int
    phase: str = "starting"
    step: int | None = None
    last_heard: float = 0.0
    """Driver time of the last answer to a poll."""
    last_progress: float = 0.0
    """Driver time at which `step` or `phase` last changed."""


@dataclasses.dataclass
class GroupPoll:
    hosts: list[HostPoll]
    records: list[dict[str, Any]]
    events: list[dict[str, Any]]
    results: dict[int, dict[str, Any]]
    failures: list[Failure]
    unresolved: int = 0
    """Hosts that went unreachable and are not yet known to be dead or lost with their node."""

    @property
    def finished(self) -> bool:
        return len(self.results) == len(self.hosts)


class RayWorkerGroup:
    """One attempt's hosts: placement group, actors, coordinator, polls, teardown."""

    def __init__(self, job: JobConfig, run_dir: str, cluster: RayCluster):
        self.job, self.run_dir, self.cluster = job, run_dir, cluster
        self.pg = None
        self.actors: list[Any] = []
        self.run_refs: dict[int, ray.ObjectRef] = {}
        self.poll_refs: dict[int, ray.ObjectRef] = {}
        self.hosts: list[HostPoll] = []
        self.results: dict[int, dict[str, Any]] = {}
        self.node_info: list[dict[str, Any]] = []
        self.unreachable: dict[int, float] = {}

    # -- start -----------------------------------------------------------------------------------
    def start(self, num_hosts: int, attempt: int, injections: tuple = ()) -> dict[str, Any]:
        cfg = self.job.cluster
        placeable = self.cluster.placeable_hosts(cfg.resources_per_host, cfg.placement_strategy)
        if num_hosts > placeable:
            raise PlacementError(self.cluster.placement_message(num_hosts, placeable))
        self.pg = placement_group([dict(cfg.resources_per_host)] * num_hosts, strategy=cfg.placement_strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=cfg.placement_timeout_s)
        if not ready:
            raise PlacementError(self.cluster.placement_message(num_hosts, placeable, waited=True))
        resources = dict(cfg.resources_per_host)
        num_cpus, num_gpus = resources.pop("CPU", 0), resources.pop("GPU", 0)
        remote_cls = ray.remote(concurrency_groups={MONITOR_GROUP: 1})(HostActor)
        env = host_env(cfg)
        now = time.monotonic()
        for rank in range(num_hosts):
            log_path = str(RunDir(self.run_dir).host_log(attempt, rank))
            self.actors.append(
                remote_cls.options(
                    num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.pg, placement_group_bundle_index=rank
                    ),
                    runtime_env={"env_vars": env},
                    max_restarts=0,
                ).remote(log_path, attempt, rank)
            )
            self.hosts.append(HostPoll(rank, last_heard=now, last_progress=now))
        self.node_info = ray.get([a.node_info.remote() for a in self.actors], timeout=ACTOR_CALL_TIMEOUT_S)
        coordinator = ray.get(self.actors[0].reserve_coordinator_address.remote(), timeout=ACTOR_CALL_TIMEOUT_S)
        for rank, actor in enumerate(self.actors):
            spec = AttemptSpec(
                job=self.job, run_dir=self.run_dir, attempt=attempt, rank=rank,
                num_hosts=num_hosts, coordinator_address=coordinator, injections=tuple(injections),
            )
            self.run_refs[rank] = actor.run.remote(spec)
        return {
            "coordinator": coordinator,
            "nodes": [n["node_id"] for n in self.node_info],
            "pids": [n["pid"] for n in self.node_info],
        }

    # -- poll ------------------------------------------------------------------------------------
    def poll(self) -> GroupPoll:
        failures: list[Failure] = []
        records: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for rank, actor in enumerate(self.actors):
            if rank not in self.poll_refs and rank not in self.results:
                self.poll_refs[rank] = actor.poll.remote()
        pending = list(self.run_refs.values()) + list(self.poll_refs.values())
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=self.job.distributed.poll_interval_s)
        ready = set(ready)
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
            if (snapshot["step"], snapshot["phase"]) != (host.step, host.phase):
                host.step, host.phase, host.last_progress = snapshot["step"], snapshot["phase"], now
            records += snapshot["records"]
            events += self._events_of(rank, snapshot)
        for rank, ref in list(self.run_refs.items()):
            if ref not in ready:
                continue
            del self.run_refs[rank]
            try:
                result = ray.get(ref)
            except ActorUnavailableError:
                # The connection to the host broke: its process died, or its whole node is going.
                # Ray declares a node dead only after its health checks fail, so wait for that.
                self.unreachable.setdefault(rank, now)
                continue
            except Exception as err:  # noqa: BLE001 - every way a host can end is classified
                failures.append(self._classify(rank, err, now))
                continue
            try:
                drained = [result.pop("final_poll")]
                if rank in self.poll_refs:  # a poll in flight may hold records drained before the end
                    drained.insert(0, ray.get(self.poll_refs.pop(rank), timeout=ACTOR_CALL_TIMEOUT_S))
                for snapshot in drained:
                    records += snapshot["records"]
                    events += self._events_of(rank, snapshot)
                self.results[rank] = result
            except Exception as err:  # noqa: BLE001 - every way a host can end is classified
                failures.append(self._classify(rank, err, now))
        failures += self._resolve_unreachable(now)
        records.sort(key=lambda r: r["step"])
        return GroupPoll(self.hosts, records, events, self.results, failures, len(self.unreachable))

    @staticmethod
    def _events_of(rank: int, snapshot: dict[str, Any]) -> list[dict[str, Any]]:
        """Events about the group (every host restores the same step) come from rank 0 alone;
        events marked per_host from every host, with its rank."""
        return [{**e, "rank": rank} for e in snapshot["events"] if rank == 0 or e.get("per_host")]

    def _node_alive(self, rank: int) -> bool:
        node_id = self.node_info[rank]["node_id"]
        return any(n["NodeID"] == node_id and n.get("Alive") for n in ray.nodes())

    def _resolve_unreachable(self, now: float) -> list[Failure]:
        failures = []
        for rank, since in list(self.unreachable.items()):
            step = self.hosts[rank].step
            if not self._node_alive(rank):
                del self.unreachable[rank]
                failures.append(Failure(FailureKind.NODE_LOST, rank, "the host's Ray node was lost", step, now, since))
            elif now - since > NODE_DEATH_WAIT_S:
                del self.unreachable[rank]
                failures.append(Failure(FailureKind.CRASHED, rank, "host process unreachable", step, now, since))
        return failures

    def _classify(self, rank: int, err: Exception, now: float) -> Failure:
        step = self.hosts[rank].step
        if isinstance(err, RayTaskError):
            cause = err.cause
            if isinstance(cause, HostError):
                return Failure(FailureKind.EXCEPTION, rank, cause.summary, cause.step, now, now,
                               traceback=f"host {rank}, after step {cause.step}:\n{cause.traceback_text}")
            message = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(err)
            return Failure(FailureKind.EXCEPTION, rank, message.splitlines()[-1], step, now, now, traceback=str(err))
        log.debug("host %d ended: %s", rank, err)
        text = str(err)
        reason = next((line.strip() for line in text.splitlines() if " because " in line), text.strip())
        reason = reason.splitlines()[0] if reason else type(err).__name__
        if isinstance(err, ActorDiedError) and err.preempted:
            return Failure(FailureKind.PREEMPTED, rank, f"the node was preempted: {reason}", step, now, None)
        if NODE_DIED_MARKER in text.lower():
            return Failure(FailureKind.NODE_LOST, rank, f"the host's Ray node was lost: {reason}", step, now, None)
        if not self._node_alive(rank):
            return Failure(FailureKind.NODE_LOST, rank, f"the host's Ray node was lost: {reason}", step, now, None)
        return Failure(FailureKind.CRASHED, rank, f"host process died: {reason}", step, now, None)

    # -- interventions ---------------------------------------------------------------------------
    def preempt(self) -> None:
        """Asks every host to save at one common step and stop (a SIGTERM to each host process)."""
        for rank, actor in enumerate(self.actors):
            if rank not in self.results:
                actor.preempt.remote()

    def kill(self, rank: int) -> None:
        """SIGKILLs one host process (chaos)."""
        self.actors[rank].kill.remote()

    # -- teardown --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Kills every actor of the group and frees its placement group; safe to call twice."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as err:  # noqa: BLE001 - teardown goes on whatever one actor does
                log.debug("kill failed: %s", err)
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception as err:  # noqa: BLE001
                log.debug("placement group removal failed: %s", err)
        self.actors, self.run_refs, self.poll_refs, self.pg = [], {}, {}, None

