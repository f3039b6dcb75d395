"""The keeper: one process per node, started by the driver, that holds the memory tier's parts in its
own RAM, so they outlive the host processes that saved them.

A host hands its part of a step (its addressable shards with their global indices, and its non-array
state) to its own node's keeper, which keeps a copy of its own (the host's objects die with the host)
and forwards one copy to the keeper of another node (the replica). It keeps the newest `keep` steps
within its budget, checked against the node's available RAM at every part, and refuses a part that
would not fit: a refusal leaves the step uncommitted in memory, never a node out of memory.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
from typing import Any

import numpy as np
import psutil

from jaxlaunch.contract.tiers import Held, Role

log = logging.getLogger(__name__)
RAM_RESERVE_FRACTION = 0.1
"""Of the node's total RAM, what a keeper always leaves available to everything else."""
DEFAULT_BUDGET_FRACTION = 0.25
"""Without a configured budget: the share of the RAM available when the keeper starts."""
REPLICA_TIMEOUT_S = 120.0


def part_bytes(part: dict[str, Any]) -> int:
    return sum(leaf["data"].nbytes for leaf in part["shards"])


def _own(part: dict[str, Any]) -> dict[str, Any]:
    """The part with arrays this process owns: what Ray hands an actor is backed by an object its
    sender owns, which dies with the sender."""
    return {**part, "shards": [{**leaf, "data": np.array(leaf["data"], copy=True)} for leaf in part["shards"]]}


class Keeper:
    """One node's memory tier. Methods are called by the hosts (hold, fetch, index) and by other
    keepers (hold_replica); several at once (a threaded actor)."""

    def __init__(self, node: str, budget_bytes: int | None, keep: int):
        self.node, self.keep = node, keep
        memory = psutil.virtual_memory()
        self.budget = budget_bytes if budget_bytes is not None else int(memory.available * DEFAULT_BUDGET_FRACTION)
        self.reserve_bytes = int(memory.total * RAM_RESERVE_FRACTION)
        self.lock = threading.Lock()
        self.reserved: dict[int, int] = {}
        self.parts: dict[tuple[int, int, Role], tuple[Held, dict[str, Any]]] = {}
        self.forwarder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="replica")

    def ping(self) -> str:
        return self.node

    def reserve(self, rank: int, num_hosts: int, step_bytes: int) -> str | None:
        """A host of an attempt of `num_hosts` will hand over parts of `step_bytes` a step (its own
        and the replica it causes another node to take, about as much as this node takes from
        others): why `keep` steps of every host reserved here cannot be held, or None."""
        with self.lock:
            self.reserved = {r: b for r, b in self.reserved.items() if r < num_hosts}
            self.reserved[rank] = step_bytes
            return self.fits(sum(self.reserved.values()))

    def fits(self, step_bytes: int) -> str | None:
        """Why `keep` steps of `step_bytes` (this node's parts and the replicas it takes, together)
        cannot be held here, or None."""
        needed = step_bytes * self.keep
        available = psutil.virtual_memory().available - self.reserve_bytes
        if needed > self.budget:
            return (f"the memory tier needs {_mb(needed)} on node {self.node[:12]} for {self.keep} steps; "
                    f"its budget is {_mb(self.budget)}")
        if needed > available:
            return (f"the memory tier needs {_mb(needed)} on node {self.node[:12]} for {self.keep} steps; "
                    f"the node has {_mb(max(available, 0))} available beyond its reserve")
        return None

    # -- holding ---------------------------------------------------------------------------------
    def hold(self, step: int, rank: int, num_hosts: int, part: dict[str, Any], replica_to: Any | None) -> str | None:
        """Holds a host's own part and sends a copy to `replica_to` (another node's keeper; None on a
        one-node cluster). Returns why it refused, or None once the primary is held."""
        owned = _own(part)
        held = Held(step, rank, num_hosts, self.node, Role.PRIMARY, part_bytes(owned), replicated=replica_to is None)
        refused = self._store(held, owned)
        if refused is None and replica_to is not None:
            self.forwarder.submit(self._replicate, held, owned, replica_to)
        return refused

    def hold_replica(self, held: dict[str, Any], part: dict[str, Any]) -> str | None:
        owned = _own(part)
        copy = dataclasses.replace(Held.from_dict(held), node=self.node, role=Role.REPLICA, replicated=False)
        return self._store(copy, owned)

    def _replicate(self, held: Held, part: dict[str, Any], replica_to: Any) -> None:
        import ray

        try:
            refused = ray.get(replica_to.hold_replica.remote(held.to_dict(), part), timeout=REPLICA_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - a lost replica leaves the step uncommitted, nothing more
            refused = f"{type(err).__name__}: {err}"
        if refused is not None:
            log.warning("the replica of step %d rank %d was not held: %s", held.step, held.rank, refused)
            return
        with self.lock:
            key = (held.step, held.rank, Role.PRIMARY)
            if key in self.parts and self.parts[key][0] == held:
                self.parts[key] = (dataclasses.replace(held, replicated=True), self.parts[key][1])
                self._drop_unkept()

    def _store(self, held: Held, part: dict[str, Any]) -> str | None:
        """Holds a part, making room by dropping steps `kept` no longer needs; a part that does not
        fit leaves everything held as it was."""
        with self.lock:
            key = (held.step, held.rank, held.role)
            after = {k: h for k, (h, _) in self.parts.items() if k != key} | {key: held}
            steps = kept(list(after.values()), self.keep)
            if held.step not in steps:
                return f"step {held.step} is older than the {self.keep} steps held"
            total = sum(h.nbytes for k, h in after.items() if k[0] in steps)
            available = psutil.virtual_memory().available - self.reserve_bytes
            if total > self.budget:
                return (f"holding step {held.step} would take {_mb(total)} on node {self.node[:12]}, over "
                        f"its budget of {_mb(self.budget)}")
            if held.nbytes > available:
                return (f"node {self.node[:12]} has {_mb(max(available, 0))} available beyond its "
                        f"reserve, less than step {held.step}'s {_mb(held.nbytes)}")
            self.parts[key] = (held, part)
            self._drop_unkept()
            return None

    def _drop_unkept(self) -> None:
        steps = kept([h for h, _ in self.parts.values()], self.keep)
        for old in [k for k in self.parts if k[0] not in steps]:
            del self.parts[old]

    # -- reading ---------------------------------------------------------------------------------
    def index(self) -> list[dict[str, Any]]:
        with self.lock:
            return [h.to_dict() for h, _ in self.parts.values()]

    def fetch(self, step: int, rank: int, role: str) -> dict[str, Any] | None:
        with self.lock:
            entry = self.parts.get((step, rank, Role(role)))
        return entry[1] if entry is not None else None

    def forget_after(self, step: int) -> None:
        """Drops steps newer than `step`: the run continues from `step`, and a newer step held from
        before is not part of its history any more."""
        with self.lock:
            for key in [k for k in self.parts if k[0] > step]:
                del self.parts[key]


def kept(held: list[Held], keep: int) -> set[int]:
    """The steps a keeper keeps: the newest `keep` whose parts here are all settled (replicas, or
    primaries whose replica was acknowledged), and up to `keep` newer ones still settling. A step is
    never dropped for a newer one that may yet fail to replicate (its partner node lost mid-copy)."""
    steps: dict[int, bool] = {}
    for h in held:
        steps[h.step] = steps.get(h.step, True) and (h.role == Role.REPLICA or h.replicated)
    newest_first = sorted(steps, reverse=True)
    settled = [s for s in newest_first if steps[s]][:keep]
    newest_settled = settled[0] if settled else -1
    settling = [s for s in newest_first if not steps[s] and s > newest_settled][:keep]
    return set(settled) | set(settling)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.0f} MB" if nbytes >= 10e6 else f"{nbytes / 1e6:.3f} MB"
