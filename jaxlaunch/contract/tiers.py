"""The memory tier's commit rule, as a value: which steps the keepers' holdings make restorable, and
where each host's part of a step is read from. Pure functions over what the live keepers report, so
the rule is written once and tested without Ray or JAX.

A step is committed in memory when every host's part of it and that part's replica (on another
node) are held. A keeper records a primary part as `replicated` once the keeper of the other node
acknowledged its copy, so the rule can be read back after a node is lost: a part is committed if its
replica is still held, or its primary is held and was replicated. On a cluster of one node there is
no other node to hold a replica, and a held primary is committed on its own (losing that node loses
the driver too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import os
import pathlib
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Set as AbstractSet

SHM_ROOT = pathlib.Path("/dev/shm")
"""Node-local shared memory (tmpfs): a file there outlives the process that wrote it, with no copy."""


def launch_dir(launch_id: str) -> pathlib.Path:
    """The folder of one launch's memory-tier part files on each node: `/dev/shm/jaxlaunch-<launch id>`
    (the temporary folder where a system has no /dev/shm)."""
    root = SHM_ROOT if SHM_ROOT.is_dir() else pathlib.Path(tempfile.gettempdir())
    return root / f"jaxlaunch-{launch_id}"


def new_launch_id() -> str:
    """The driver's process and machine, and a random part: a later launch on this machine deletes
    the files of a driver that was SIGKILLed (its keepers died unasked: `remove_orphans`)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}"


def remove_orphans() -> list[str]:
    """Deletes the part-file folders on this machine of launches whose driver, on this machine, is
    gone and none of whose keepers lives (a driver in another pid namespace, a container sharing this
    machine's name and /dev/shm, looks gone by its pid); returns their names. Another machine's driver
    is not this one's to judge: its keepers' own folders go with `sweep_dead_keepers`."""
    removed = []
    for folder in launch_dir("any").parent.glob("jaxlaunch-*"):
        parts = folder.name.removeprefix("jaxlaunch-").split("-", 2)
        if len(parts) != 3 or not parts[0].isdigit() or parts[2] != socket.gethostname():
            continue
        try:
            os.kill(int(parts[0]), 0)
        except ProcessLookupError:
            if any(keeper_alive(mark) for mark in folder.glob(f"{ALIVE_PREFIX}*")):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
        except PermissionError:
            continue  # alive, another user's
    return removed


ALIVE_PREFIX = ".keeper-alive-"
"""A keeper's mark in its launch's folder, `.keeper-alive-<node>`, locked (flock) while it lives."""
ORPHAN_AFTER_S = 600.0
"""A node's folder whose keeper is gone is another launch's to delete once its mark is this old: its
keeper touches the mark while it lives (`keeper_files.Alive.touch`), and Ray restarts a dead keeper, which takes
its files over, within seconds."""


def alive_mark(launch_folder: pathlib.Path, node: str) -> pathlib.Path:
    return launch_folder / f"{ALIVE_PREFIX}{node}"


def hold_alive(launch_folder: pathlib.Path, node: str) -> int:
    """Marks this process as the live keeper of `node`'s folder in `launch_folder`: an exclusive flock
    on its mark, which the kernel drops with the process (in any pid namespace). The mark is locked
    before it is in place (a rename), so no sweep finds it free while its keeper lives. Returns the
    descriptor, to keep open for the process's life."""
    launch_folder.mkdir(parents=True, exist_ok=True)
    temporary = launch_folder / f"{ALIVE_PREFIX}{node}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(temporary, alive_mark(launch_folder, node))
    return fd


def keeper_alive(mark: pathlib.Path) -> bool:
    """Whether a live process holds `mark`'s lock (a mark that is gone, or a temporary one, is no keeper)."""
    if mark.name.endswith(".tmp"):
        return False
    try:
        fd = os.open(mark, os.O_RDONLY)
    except PermissionError:
        return True  # another user's keeper (a /dev/shm shared between users): not this one's to judge
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sweep_dead_keepers(own: pathlib.Path, now: float | None = None) -> list[str]:
    """Deletes, on this node, the folders of other launches' keepers that are gone (their mark free
    and untouched for `ORPHAN_AFTER_S`), and a launch's folder once nothing is left in it; returns
    what it deleted. A driver SIGKILLed on another machine left them; no driver deletes another
    machine's files."""
    now = time.time() if now is None else now
    removed = []
    for folder in launch_dir("any").parent.glob("jaxlaunch-*"):
        if folder == own:
            continue
        for mark in folder.glob(f"{ALIVE_PREFIX}*"):
            node = mark.name.removeprefix(ALIVE_PREFIX)
            try:
                if node.endswith(".tmp") or now - mark.stat().st_mtime < ORPHAN_AFTER_S or keeper_alive(mark):
                    continue
            except OSError:
                continue
            shutil.rmtree(folder / node, ignore_errors=True)
            try:
                mark.unlink(missing_ok=True)
            except OSError:
                continue  # a folder this process may not write in: another user's
            removed.append(f"{folder.name}/{node}")
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty
    return removed


class Role(enum.StrEnum):
    PRIMARY = "primary"  # held by the keeper of the node the host ran on
    REPLICA = "replica"  # a copy of a primary, held by another node's keeper


@dataclasses.dataclass(frozen=True)
class Held:
    """One part a keeper holds: one host's shards of one step, with their non-array state."""

    step: int
    rank: int
    num_hosts: int
    """Hosts of the attempt that saved the step."""
    node: str
    """The node whose keeper holds this copy."""
    role: Role
    nbytes: int
    replicated: bool = False
    """For a primary: the replica's keeper acknowledged its copy (or the cluster has one node)."""
    digest: str | None = None
    """Of the part's whole file (xxh3-64, hex), taken by the keeper that first held it: a copy whose
    file no longer matches it (a flipped bit, a torn page, a bad replica stream) is never read."""
    attempt: int = 0
    """The attempt that saved the step: a step of an earlier attempt past the step a later one
    restored belongs to a history the run left (`LeftHistory`)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Held:
        return cls(**{**d, "role": Role(d["role"])})


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one rank's part of a step is read from."""

    rank: int
    node: str
    role: Role


def whole_steps(held: list[Held]) -> list[int]:
    """Steps committed in memory and still readable, newest first: every rank of the step's attempt
    has a committed part, and a copy of it is held by a live keeper (`held` lists only live ones)."""
    by_step: dict[int, list[Held]] = {}
    for part in held:
        by_step.setdefault(part.step, []).append(part)
    return sorted((step for step, parts in by_step.items() if _complete(parts)), reverse=True)


def memory_serves(memory_step: int, durable_steps: list[int]) -> bool:
    """Whether the memory tier's newest committed step is the one to read: at least as new as the
    newest durable step (`durable_steps`, newest first; the same step: memory reads faster)."""
    return memory_step >= (durable_steps[0] if durable_steps else 0)


def _complete(parts: list[Held]) -> bool:
    counts = {p.num_hosts for p in parts}
    if len(counts) != 1:
        return False  # two attempts of different sizes saved the same step: neither is whole here
    (num_hosts,) = counts
    committed = {p.rank for p in parts if p.role == Role.REPLICA or p.replicated}
    return committed == set(range(num_hosts))


def kept(held: list[Held], keep: int, floor: int, not_whole: AbstractSet[tuple[int, int]] = frozenset()) -> set[int]:
    """The steps a keeper keeps: every step above `floor` (the newest step every host handed over;
    above it, only saves whose hand-off may still be in flight somewhere) and the newest `keep` at or
    below it that are whole. A step is never dropped for newer ones that may yet fail to replicate
    (their partner node lost mid-copy): those are above the floor. `not_whole`: (attempt, step) of
    saves some host's hand-off or write failed for (a refusal anywhere, told to every keeper before
    that host hands over its next save): handed over, yet not whole, so they count for nothing at or
    below the floor, and are dropped there."""
    steps = {h.step for h in held}
    broken = {h.step for h in held if (h.attempt, h.step) in not_whole}
    settled = sorted((s for s in steps if s <= floor and s not in broken), reverse=True)[:keep]
    return {s for s in steps if s > floor} | set(settled)


@dataclasses.dataclass(frozen=True)
class LeftHistory:
    """Attempt `attempt` restored `step`: every step after it that an earlier attempt saved is of a
    history the run left, whenever its part reaches a keeper (a replica still streaming, or a dead
    host's hand-off that Ray delivers late, arrives after the drop)."""

    attempt: int
    step: int

    def holds(self, part: Held) -> bool:
        """Whether `part` is of that left history."""
        return part.attempt < self.attempt and part.step > self.step


def copies(held: list[Held], step: int, prefer: dict[int, str] | None = None) -> dict[int, list[Source]]:
    """For a committed `step`: every held copy of each rank's part, the one to read first first: on the
    node `prefer` gives for the rank (a host's own), else the primary, else the replica."""
    prefer = prefer or {}
    by_rank: dict[int, list[Source]] = {}
    order = sorted((p for p in held if p.step == step),
                   key=lambda p: (p.node != prefer.get(p.rank), p.role != Role.PRIMARY, p.node))
    for part in order:
        by_rank.setdefault(part.rank, []).append(Source(part.rank, part.node, part.role))
    return dict(sorted(by_rank.items()))


def sources(held: list[Held], step: int, prefer: dict[int, str] | None = None) -> list[Source]:
    """For a committed `step`: one copy per rank, the first of `copies`."""
    return [found[0] for found in copies(held, step, prefer).values()]


def replica_node(own: str, nodes: list[str]) -> str | None:
    """The node that holds the replica of a part saved on `own`: the next of the keepers' nodes in
    sorted order, so that each node's parts go to one other node and no two nodes pick each other
    needlessly; None when there is no other node."""
    others = sorted(n for n in set(nodes) if n != own)
    if not others:
        return None
    after = [n for n in others if n > own]
    return after[0] if after else others[0]
