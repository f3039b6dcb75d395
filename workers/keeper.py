"""The keeper: one process per node, started by the driver, that holds the memory tier's parts in its
own RAM, so they outlive the host processes that saved them.

A host hands its part of a step (its addressable shards with their global indices, and its non-array
state) to its own node's keeper, which keeps a copy of its own (the host's objects die with the host)
and forwards one copy to the keeper of another node (the replica); the hand-off returns once the
replica is held, and a host hands over its next part only after its previous one returned, so
replication never lags more than one save behind a host.

Each part carries the host's `floor`: the newest step every host is known to have handed over whole
(primary and replica). A keeper keeps every step above the newest floor it has seen (the last two
saves at most) and the newest `keep` at or below it, within its budget, checked against the node's
available RAM at every part; a part that would not fit is refused: a refusal leaves the step
uncommitted in memory, never a node out of memory. Keeping by the floor, not by what this keeper's
own parts look like, means no keeper drops the newest step that is whole across all keepers.

A keeper whose process dies is restarted by Ray on its node (the driver says so), empty: the tier
goes on from the next save, and what the other keepers hold of earlier steps still counts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
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
REPLICA_TIMEOUT_S = 30.0
IN_FLIGHT_SAVES = 2
"""Steps above the floor a keeper may hold besides its `keep` whole ones: a host's previous save,
still replicating on another host, and its newest."""


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
        self.floor = -1
        """The newest step every host handed over whole, as the newest part said."""
        self.parts: dict[tuple[int, int, Role], tuple[Held, dict[str, Any]]] = {}

    def ping(self) -> int:
        """This keeper's process id: another one after Ray restarted it."""
        return os.getpid()

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
        needed = step_bytes * (self.keep + IN_FLIGHT_SAVES)
        available = psutil.virtual_memory().available - self.reserve_bytes
        if needed > self.budget:
            return (f"the memory tier needs {_mb(needed)} on node {self.node[:12]} for "
                    f"{self.keep + IN_FLIGHT_SAVES} steps; its budget is {_mb(self.budget)}")
        if needed > available:
            return (f"the memory tier needs {_mb(needed)} on node {self.node[:12]} for "
                    f"{self.keep + IN_FLIGHT_SAVES} steps; the node has {_mb(max(available, 0))} available "
                    "beyond its reserve")
        return None

    # -- holding ---------------------------------------------------------------------------------
    def hold(self, step: int, rank: int, num_hosts: int, part: dict[str, Any], replica_to: Any | None,
             floor: int = -1) -> str | None:
        """Holds a host's own part and has `replica_to` (another node's keeper; None on a one-node
        cluster) hold a copy. Returns why the step is not committed here, or None once the primary and
        its replica are held. `floor`: the newest step every host handed over whole."""
        owned = _own(part)
        held = Held(step, rank, num_hosts, self.node, Role.PRIMARY, part_bytes(owned), replicated=replica_to is None)
        refused = self._store(held, owned, floor)
        if refused is not None or replica_to is None:
            return refused
        return self._replicate(held, owned, replica_to, floor)

    def hold_replica(self, held: dict[str, Any], part: dict[str, Any], floor: int = -1) -> str | None:
        owned = _own(part)
        copy = dataclasses.replace(Held.from_dict(held), node=self.node, role=Role.REPLICA, replicated=False)
        return self._store(copy, owned, floor)

    def _replicate(self, held: Held, part: dict[str, Any], replica_to: Any, floor: int) -> str | None:
        import ray

        try:
            refused = ray.get(replica_to.hold_replica.remote(held.to_dict(), part, floor), timeout=REPLICA_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - a lost replica leaves the step uncommitted, nothing more
            refused = f"the replica's keeper did not answer ({first_line(err)})"
        if refused is not None:
            log.warning("the replica of step %d rank %d was not held: %s", held.step, held.rank, refused)
            return f"its replica was not held: {refused}"
        with self.lock:
            key = (held.step, held.rank, Role.PRIMARY)
            if key in self.parts and self.parts[key][0] == held:
                self.parts[key] = (dataclasses.replace(held, replicated=True), self.parts[key][1])
        return None

    def _store(self, held: Held, part: dict[str, Any], floor: int) -> str | None:
        """Holds a part, making room by dropping steps `kept` no longer needs; a part that does not
        fit leaves everything held as it was."""
        with self.lock:
            self.floor = max(self.floor, floor)
            key = (held.step, held.rank, held.role)
            after = {k: h for k, (h, _) in self.parts.items() if k != key} | {key: held}
            steps = kept(list(after.values()), self.keep, self.floor)
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
        steps = kept([h for h, _ in self.parts.values()], self.keep, self.floor)
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
            self.floor = min(self.floor, step)
            for key in [k for k in self.parts if k[0] > step]:
                del self.parts[key]


def kept(held: list[Held], keep: int, floor: int) -> set[int]:
    """The steps a keeper keeps: every step above `floor` (the newest step every host handed over
    whole; above it, only saves whose hand-off may still be in flight somewhere) and the newest
    `keep` at or below it. A step is never dropped for newer ones that may yet fail to replicate
    (their partner node lost mid-copy): those are above the floor."""
    steps = {h.step for h in held}
    settled = sorted((s for s in steps if s <= floor), reverse=True)[:keep]
    return {s for s in steps if s > floor} | set(settled)


def first_line(err: BaseException) -> str:
    """An error in one short line: Ray's own texts run to a screenful."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.0f} MB" if nbytes >= 10e6 else f"{nbytes / 1e6:.3f} MB"
