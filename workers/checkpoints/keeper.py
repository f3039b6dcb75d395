"""The keeper: one process per node, started by the driver, that owns the memory tier's part files in
its node's shared memory (`jaxlaunch.workers.checkpoints.part_file`), so they outlive the host processes that
wrote them without a copy.

A host writes its part of a step into the keeper's `incoming` folder and tells the keeper its name
(a small Ray call, no array bytes). The keeper adopts the file (a rename) and streams it to the
keeper of another node (`jaxlaunch.workers.checkpoints.replica_stream`: the one network copy), which adopts it as
the replica; the hand-off returns once the replica is held, and a host hands over its next part only
after its previous one returned, so replication never lags more than one save behind a host.

Each part carries the host's `floor`: the newest step every host is known to have handed over whole
(primary and replica). A keeper keeps every step above the newest floor it has seen (the last two
saves at most) and the newest `keep` at or below it, within its budget, checked against the node's
available RAM and the free space of its shared memory; a part that would not fit is refused and its
file deleted: a refusal leaves the step uncommitted in memory, never a node out of memory. A host
whose hand-off was refused (or write failed) tells every keeper so before its next hand-off
(`mark_not_whole`): before any floor reaches that step. Keeping by the floor and those marks, not by
this keeper's own parts, means no keeper drops the newest step that is whole across all keepers.

A keeper whose process dies is restarted by Ray on its node (the driver says so) and takes over what
the earlier process held: each held part has a record beside its file (`<part>.json`, written whole
by a rename once the part is held, rewritten when its replica is), so a part without one was never
held and is deleted, as are the replicas still being received (their streams died with it). The
files outlive the process, so a keeper's death loses no step; the tier goes on from the next save.
A keeper the driver starts anew on a node, in place of one it stopped (gone silent: it may have
missed the drop of steps the run left), takes nothing over: it deletes the folder. `close` deletes
its folder; the driver asks for it at the end of the launch.

A drop (`forget_after`) is also a rule the keeper keeps, on file beside the parts: a part of an
earlier attempt past the step restored is refused whenever it arrives (a replica that was still
streaming, a dead host's hand-off that Ray delivers late), so no restore reads a step of a history
the run left.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import threading
import uuid
from typing import Any

import numpy as np
import psutil
from jaxlaunch.workers.checkpoints import keeper_files, replica_stream
from jaxlaunch.workers.checkpoints.part_file import Index, PartFile, PartHeader, digest

from jaxlaunch.contract.event_base import first_line
from jaxlaunch.contract.tiers import Held, LeftHistory, Role, kept, launch_dir

log = logging.getLogger(__name__)
RAM_RESERVE_FRACTION = 0.1
"""Of the node's total RAM, what a keeper always leaves available to everything else."""
DEFAULT_BUDGET_FRACTION = 0.25
"""Without a configured budget: the share of the RAM available when the keeper starts."""
REPLICA_TIMEOUT_S = 30.0
STALE_RECEIVED_S = 4 * replica_stream.STREAM_TIMEOUT_S
"""A received replica its sender never asked to hold by then (the sender died) is deleted."""
SPARE_HEADER_ROOM = 1 << 20
"""Room a prepared spare has beyond a part's arrays, for its header (the write truncates to its size)."""
CLOSE_WAIT_S = 2.0  # how long `close` waits for a spare being prepared before it deletes the folder
IN_FLIGHT_SAVES = 2
"""Steps above the floor a keeper holds besides its `keep` whole ones: a previous save (replicating) and the newest."""


@dataclasses.dataclass(frozen=True)
class HandOff:
    """A keeper's answer to a host's hand-off."""

    refused: str | None
    """Why the step is not committed here, or None once the primary and its replica are held."""
    sent_bytes: int = 0
    """Bytes of the part file streamed to the replica's node (what the stream sent)."""
    received_bytes: int = 0
    """Bytes of it written into the replica node's shared memory (once the partner confirmed them all)."""


def incoming_name(step: int, rank: int, pid: int) -> str:
    """A host's part file in its keeper's `incoming` folder; the pid tells a dead writer's leftovers."""
    return f"{step}-{rank}-{pid}.part"


def _actor_id() -> str | None:
    """This keeper's Ray actor, the same across Ray's restarts of it (a local call); None outside one."""
    import ray

    if not ray.is_initialized():
        return None  # a test's keeper (asked without Ray, Ray would start an instance)
    return ray.get_runtime_context().get_actor_id()


class Keeper:
    """One node's memory tier. Methods are called by the hosts (inbox, hold, header, read_box, index),
    by other keepers (address, hold_replica) and by the driver (ping, close); several at once (a
    threaded actor)."""

    def __init__(self, node: str, budget_bytes: int | None, keep: int, launch_id: str = "", secret: str = ""):
        self.node, self.keep, self.secret = node, keep, secret
        self.dir = launch_dir(launch_id or f"local{os.getpid()}") / node
        self.alive = keeper_files.Alive(self.dir.parent, node)  # before the folder: no sweep takes it
        self.incoming, self.received, self.held_dir = self.dir / "incoming", self.dir / "received", self.dir / "held"
        # Not Ray's restart of this actor: one the driver started in place of a keeper it stopped (one that
        # did not answer, so may have missed the drop of steps the run left). Nothing in the folder is its own.
        keeper_files.claim(self.dir, _actor_id(), (self.incoming, self.received, self.held_dir))
        self.left: list[LeftHistory] = keeper_files.read_left(self.dir, self.held_dir)
        """The drops asked of this keeper (and its earlier processes): what they left is never held again."""
        self.parts: keeper_files.Parts = keeper_files.take_over(self.held_dir, self.left)
        self.not_whole = keeper_files.read_not_whole(self.dir)  # (attempt, step): `mark_not_whole`
        memory = psutil.virtual_memory()
        # What an earlier process holds is no longer available: the budget it started with counted it so.
        adopted = sum(h.nbytes for h, _ in self.parts.values()) + sum(size for size, _ in self._spares())
        self.budget = budget_bytes if budget_bytes is not None else \
            int((memory.available + adopted) * DEFAULT_BUDGET_FRACTION)
        self.reserve_bytes = int(memory.total * RAM_RESERVE_FRACTION)
        self.lock = threading.Lock()
        self.reserved: dict[int, tuple[int, int]] = {}
        """Each host of the newest attempt that reserved here: its bytes a step (its part and the replica it
        causes) and its own part's size. Ranks are placed anew each attempt: an earlier one's are dropped."""
        self.attempt = -1
        self.preparing: threading.Thread | None = None
        self.preparing_bytes = 0
        """The spare file being prepared now (it counts in the budget before it is one)."""
        self.closed = False
        self.floor = -1
        """The newest step every host handed over, as the newest part said (an adopted part is kept until
        a hand-off says it); whole unless marked (`not_whole`)."""
        self.maps: dict[pathlib.Path, PartFile] = {}
        self.checked: dict[pathlib.Path, str] = {}  # the reading (an attempt's restore) that last found a part intact
        self.sending: set[pathlib.Path] = set()
        """Part files streaming to a partner now: one dropped meanwhile is deleted, never reused as a
        spare that a host's next write would overwrite under the stream."""
        self.listener: replica_stream.ReplicaListener | None = None

    def ping(self) -> int:
        """This keeper's process id: another one after Ray restarted it."""
        self.alive.touch()
        return os.getpid()

    def inbox(self) -> str:
        """The folder a host of this node writes its part files into."""
        return str(self.incoming)

    def address(self) -> tuple[str, int]:
        """Where other keepers stream replicas to (a listener on this node's IP, opened on first ask)."""
        with self.lock:
            if self.listener is None:
                import ray

                self.listener = replica_stream.ReplicaListener(self.received, self.secret,
                                                               ray.util.get_node_ip_address())
            return self.listener.address

    def reserve(self, rank: int, attempt: int, step_bytes: int, part_bytes: int = 0) -> str | None:
        """Host `rank` of `attempt` will hand over parts of `step_bytes` a step (its own and the
        replica it causes another node to take, about as much as this node takes from others): why
        `keep` steps of every host of the attempt reserved here cannot be held, or None. `part_bytes`:
        the size of its own part, for `prepare`."""
        with self.lock:
            if attempt > self.attempt:
                self.attempt, self.reserved = attempt, {}
            if attempt == self.attempt:  # else a late call of a host of an ended attempt
                self.reserved[rank] = (step_bytes, part_bytes)
            return self.fits(sum(step for step, _ in self.reserved.values()))

    def prepare(self) -> None:
        """Once every host agreed the tier is on: prepares spare files in the background (`_prepare`)."""
        with self.lock:
            if self.preparing is not None or self.closed:
                return
            self.preparing = threading.Thread(target=self._prepare, name="prepare-spares", daemon=True)
            self.preparing.start()

    def _prepare(self) -> None:
        """Spare files in this node's shared memory, their pages allocated (`posix_fallocate`), for the
        saves of the hosts reserved here that no dropped part serves yet: their first `keep` +
        `IN_FLIGHT_SAVES` each. A save's write is its blocking time, and writing into a tmpfs file's
        pages is about twice as fast as into new ones (60 MB: 13 against 28 ms, an idle machine); the
        cadence is chosen from the first saves. Within the budget and the node's available RAM,
        counting what is held (a held part, dropped, becomes a spare too); a host never takes a spare
        before it is whole (it is renamed into place then)."""
        try:
            while True:
                with self.lock:
                    spares = self._spares()
                    size = max((part for _, part in self.reserved.values()), default=0) + SPARE_HEADER_ROOM
                    wanted = (self.keep + IN_FLIGHT_SAVES) * len(self.reserved) - len(spares) - len(self.parts)
                    used = sum(h.nbytes for h, _ in self.parts.values()) + sum(size for size, _ in spares)
                    available = psutil.virtual_memory().available - self.reserve_bytes
                    if (self.closed or size <= SPARE_HEADER_ROOM or wanted <= 0 or used + size > self.budget
                            or size > available):
                        return
                    name = uuid.uuid4().hex
                    # The keeper's pid in the name: a sweep takes it for a live writer's file. Made under the
                    # lock: once `close` marked the keeper closed, no file appears in its folder.
                    temporary = self.incoming / f".prepare-{name}-{os.getpid()}.part"
                    try:
                        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    except OSError as err:
                        log.info("no spare file prepared (%s)", first_line(err))
                        return
                    self.preparing_bytes = size
                try:
                    try:
                        os.posix_fallocate(fd, 0, size)
                    finally:
                        os.close(fd)
                    with self.lock:  # not once closed: its rmtree may be under way
                        if self.closed:
                            raise OSError("the keeper closed")
                        os.rename(temporary, self.incoming / f"{keeper_files.SPARE_PREFIX}{name}.part")
                except OSError as err:  # a full tmpfs, or closed (its folder gone): saves write new files
                    temporary.unlink(missing_ok=True)
                    log.info("no spare file prepared (%s)", first_line(err))
                    return
                finally:
                    with self.lock:
                        self.preparing_bytes = 0
        finally:
            with self.lock:
                self.preparing = None

    def _spares(self) -> list[tuple[int, pathlib.Path]]:
        """The spare files (size, path), smallest first."""
        spares = []
        for path in self.incoming.glob(f"{keeper_files.SPARE_PREFIX}*"):
            try:
                spares.append((path.stat().st_size, path))
            except FileNotFoundError:
                continue  # a host claimed it
        return sorted(spares)

    def fits(self, step_bytes: int) -> str | None:
        """Why `keep` steps of `step_bytes` (this node's parts and the replicas it takes, together)
        cannot be held here, or None."""
        needed = step_bytes * (self.keep + IN_FLIGHT_SAVES)
        steps = f"the memory tier needs {_mb(needed)} on node {self.node[:12]} for {self.keep + IN_FLIGHT_SAVES} steps"
        available = psutil.virtual_memory().available - self.reserve_bytes
        if needed > self.budget:
            return f"{steps}; its budget is {_mb(self.budget)}"
        if needed > available:
            return f"{steps}; the node has {_mb(max(available, 0))} available beyond its reserve"
        free = shutil.disk_usage(self.dir).free
        if needed > free:
            return f"{steps}; its shared memory ({self.dir.parent.parent}) has {_mb(free)} free"
        return None

    # -- holding ---------------------------------------------------------------------------------
    def hold(self, step: int, rank: int, num_hosts: int, name: str, replica_to: Any | None,
             floor: int = -1, attempt: int = 0, part_digest: str | None = None) -> HandOff:
        """Adopts a host's part file `name` (in `inbox()`) of `step`, saved by `attempt`, as its primary
        and has `replica_to` (another node's keeper; None on a one-node cluster) hold a copy. `floor`:
        the newest step every host handed over. `part_digest`: the file's `digest`, taken by the host
        once written (else taken here)."""
        self._sweep()
        source = self.incoming / pathlib.Path(name).name
        try:
            nbytes, taken = source.stat().st_size, part_digest or digest(source)
        except FileNotFoundError:
            return HandOff(f"the part file of step {step} is gone (this keeper restarted since it was written)")
        held = Held(step, rank, num_hosts, self.node, Role.PRIMARY, nbytes, replicated=replica_to is None,
                    digest=taken, attempt=attempt)
        refused = self._store(held, source, floor)
        if refused is not None or replica_to is None:
            return HandOff(refused)
        return self._replicate(held, replica_to, floor)

    def hold_replica(self, held: dict[str, Any], name: str, floor: int = -1) -> str | None:
        """Adopts the replica streamed to this keeper as `name`."""
        copy = dataclasses.replace(Held.from_dict(held), node=self.node, role=Role.REPLICA, replicated=False)
        source = self.received / pathlib.Path(name).name
        if not source.exists():
            return f"the streamed replica of step {copy.step} rank {copy.rank} is not here (its keeper restarted)"
        arrived = digest(source) if copy.digest is not None else None
        if arrived != copy.digest:
            source.unlink(missing_ok=True)
            return (f"the replica of step {copy.step} rank {copy.rank} arrived changed (digest {arrived}, "
                    f"sent {copy.digest})")
        return self._store(copy, source, floor)

    def _replicate(self, held: Held, replica_to: Any, floor: int) -> HandOff:
        import ray

        name = f"{held.step}-{held.rank}-{uuid.uuid4().hex}.part"
        sent = received = 0
        try:
            with self.lock:
                path = self.parts[(held.step, held.rank, Role.PRIMARY)][1]
                self.sending.add(path)
            try:
                address = ray.get(replica_to.address.remote(), timeout=REPLICA_TIMEOUT_S)
                sent = replica_stream.send(tuple(address), self.secret, path, name)
            finally:
                with self.lock:
                    self.sending.discard(path)
            received = sent  # the partner confirmed it wrote every byte sent
            refused = ray.get(replica_to.hold_replica.remote(held.to_dict(), name, floor), timeout=REPLICA_TIMEOUT_S)
        except KeyError:
            refused = "its primary was dropped before it was replicated (the run went back)"
        except Exception as err:  # noqa: BLE001 - a lost replica leaves the step uncommitted, nothing more
            refused = f"the replica's keeper did not take it ({first_line(err)})"
        if refused is not None:
            log.warning("the replica of step %d rank %d was not held: %s", held.step, held.rank, refused)
            return HandOff(f"its replica was not held: {refused}", sent, received)
        with self.lock:
            key = (held.step, held.rank, Role.PRIMARY)
            if key in self.parts and self.parts[key][0] == held:
                self.parts[key] = (dataclasses.replace(held, replicated=True), self.parts[key][1])
                try:
                    keeper_files.record(*self.parts[key])
                except OSError as err:  # its record still says not replicated: a restart counts the replica alone
                    log.warning("the record of step %d rank %d was not rewritten: %s", held.step, held.rank,
                                first_line(err))
        return HandOff(None, sent, received)

    def _store(self, held: Held, source: pathlib.Path, floor: int) -> str | None:
        """Adopts a part file, making room by deleting steps `kept` no longer needs; a part that does
        not fit is deleted and leaves everything held as it was."""
        with self.lock:
            refused = self._refusal(held, floor)
            if refused is not None:
                source.unlink(missing_ok=True)
                return refused
            path = self.held_dir / keeper_files.held_name(held)
            path.with_suffix(".json").unlink(missing_ok=True)  # a part of that name from before the run went back
            os.rename(source, path)
            self.maps.pop(path, None)
            self.checked.pop(path, None)
            try:
                keeper_files.record(held, path)
            except OSError as err:  # a full tmpfs: not held, and nothing left untracked
                self.parts.pop((held.step, held.rank, held.role), None)
                path.unlink(missing_ok=True)
                return f"step {held.step}'s record could not be written ({first_line(err)})"
            self.parts[(held.step, held.rank, held.role)] = (held, path)
            self._drop_unkept()
            return None

    def _refusal(self, held: Held, floor: int) -> str | None:
        left = next((left for left in self.left if left.holds(held)), None)
        if left is not None:
            return (f"step {held.step} of attempt {held.attempt} is of a history the run left: attempt "
                    f"{left.attempt} went on from step {left.step}")
        self.floor = max(self.floor, floor)
        key = (held.step, held.rank, held.role)
        after = {k: h for k, (h, _) in self.parts.items() if k != key} | {key: held}
        steps = kept(list(after.values()), self.keep, self.floor, self.not_whole)
        if held.step not in steps:
            return f"step {held.step} is older than the {self.keep} steps held"
        total = sum(h.nbytes for k, h in after.items() if k[0] in steps)
        self._delete_spares(keep_bytes=self.budget - total - self.preparing_bytes)
        available = psutil.virtual_memory().available - self.reserve_bytes
        if total > self.budget:
            return (f"holding step {held.step} would take {_mb(total)} on node {self.node[:12]}, over "
                    f"its budget of {_mb(self.budget)}")
        if held.nbytes > available:
            return (f"node {self.node[:12]} has {_mb(max(available, 0))} available beyond its "
                    f"reserve, less than step {held.step}'s {_mb(held.nbytes)}")
        return None

    def _drop_unkept(self) -> None:
        steps = kept([h for h, _ in self.parts.values()], self.keep, self.floor, self.not_whole)
        for old in [k for k in self.parts if k[0] not in steps]:
            self._delete(old)
        self._trim_spares()

    def mark_not_whole(self, attempt: int, step: int) -> None:
        """A host's save of `step` in `attempt` is not committed in memory (its hand-off was refused, or
        its write failed): never counted as a whole step the floor has passed. On file for a restart."""
        with self.lock:
            oldest = min((h.step for h, _ in self.parts.values()), default=step)
            self.not_whole = {(a, s) for a, s in self.not_whole if s >= oldest} | {(attempt, step)}
            try:
                keeper_files.save_not_whole(self.dir, self.not_whole)
            except OSError as err:
                log.warning("the mark of step %d as not whole is not on file (%s)", step, first_line(err))
            self._drop_unkept()

    def _trim_spares(self) -> None:
        """Dropped parts' files stay spares only as far as the budget has room beside the parts held."""
        held = sum(h.nbytes for h, _ in self.parts.values())
        self._delete_spares(keep_bytes=self.budget - held - self.preparing_bytes)

    def _delete(self, key: tuple[int, int, Role]) -> None:
        """Drops a part. Its file becomes a spare that a host's next write reuses: writing into pages
        a tmpfs file already has is about 4 times as fast as into new ones (60 MB: 15 vs 60-80 ms
        here), and that write is the save's blocking time. Spares count in the budget."""
        _, path = self.parts.pop(key)
        self.maps.pop(path, None)
        self.checked.pop(path, None)  # no reader maps a dropped part: restores end before saves begin
        path.with_suffix(".json").unlink(missing_ok=True)  # first: a restarted keeper never takes it over
        if path in self.sending:
            path.unlink(missing_ok=True)  # the stream reads its open file to the end
            return
        try:
            os.rename(path, self.incoming / f"{keeper_files.SPARE_PREFIX}{uuid.uuid4().hex}.part")
        except FileNotFoundError:
            pass

    def _delete_spares(self, keep_bytes: int) -> None:
        """Deletes spare files until they take at most `keep_bytes`, the largest first."""
        spares = self._spares()
        while spares and sum(size for size, _ in spares) > max(keep_bytes, 0):
            spares.pop()[1].unlink(missing_ok=True)

    def _sweep(self) -> None:
        keeper_files.sweep(self.incoming, self.received, STALE_RECEIVED_S)

    # -- reading ---------------------------------------------------------------------------------
    def index(self) -> list[dict[str, Any]]:
        with self.lock:
            return [h.to_dict() for h, _ in self.parts.values()]

    def _mapped(self, step: int, rank: int, role: str) -> PartFile | None:
        with self.lock:
            entry = self.parts.get((step, rank, Role(role)))
            if entry is None:
                return None
            path = entry[1]
            if path not in self.maps:
                self.maps[path] = PartFile(path)
            return self.maps[path]

    def check(self, step: int, rank: int, role: str, reading: str = "") -> str | None:
        """Why this held copy may not be read (its file no longer matches the digest taken when it was
        first held: a flipped bit, a torn page), or None. Asked before a restore reads a part; hashed
        once per `reading` (an attempt's restore, or a persist: its hosts all ask for what they read)."""
        with self.lock:
            entry = self.parts.get((step, rank, Role(role)))
        if entry is None:
            return f"the {role} of rank {rank}'s part of step {step} is no longer held on node {self.node[:12]}"
        held, path = entry
        if reading and self.checked.get(path) == reading:
            return None
        try:
            now = digest(path) if held.digest is not None else None
        except OSError as err:
            return f"the {role} of rank {rank}'s part of step {step} on node {self.node[:12]} is unreadable " \
                   f"({first_line(err)})"
        if now != held.digest:
            log.warning("the %s of rank %d's part of step %d changed since it was held", role, rank, step)
            return (f"the {role} of rank {rank}'s part of step {step} on node {self.node[:12]} changed since it was "
                    f"held (digest {now}, held {held.digest})")
        self.checked[path] = reading
        return None

    def header(self, step: int, rank: int, role: str) -> tuple[str, PartHeader] | None:
        """A held part's file and header (no array bytes): a host on this node maps the file itself."""
        part = self._mapped(step, rank, role)
        return None if part is None else (str(part.path), part.header)

    def read_box(self, step: int, rank: int, role: str, shard: int, box: Index) -> np.ndarray | None:
        """The sub-box `box` (global coordinates) of a held part's `shard`-th shard: only the bytes a
        host of another node needs."""
        part = self._mapped(step, rank, role)
        if part is None:
            return None
        return part.contiguous_box(part.header.shards[shard], box)

    def forget_after(self, step: int, attempt: int) -> None:
        """Attempt `attempt` goes on from `step`: drops the steps after it that earlier attempts saved,
        and refuses any that arrives later (`LeftHistory`). The rule is also put on file for a restart
        of this keeper; on a full tmpfs it is kept in this process only, said (a failed drop would have
        the keepers replaced, empty, losing the step just restored)."""
        left = LeftHistory(attempt, step)
        with self.lock:
            self.left = [*self.left, left]
            self.floor = min(self.floor, step)
            for key in [k for k, (h, _) in self.parts.items() if left.holds(h)]:
                self._delete(key)
            self._trim_spares()
            try:
                keeper_files.save_left(self.dir, self.left)
            except OSError as err:
                log.warning("the drop of the steps after %d is not on file (%s): a restart of this keeper "
                            "would not refuse them", step, first_line(err))

    def close(self) -> None:
        """Deletes this keeper's folder, and the launch's when no other keeper of this node has one."""
        with self.lock:
            self.closed = True  # no spare is prepared from now on
            preparing = self.preparing
        if preparing is not None:
            # Not longer than the driver waits for `close`: a spare being allocated now has its file
            # deleted with the folder below, and the thread then ends on its own (its rename fails).
            preparing.join(timeout=CLOSE_WAIT_S)
        with self.lock:
            if self.listener is not None:
                self.listener.close()
            self.parts, self.maps = {}, {}
            shutil.rmtree(self.dir, ignore_errors=True)
            self.alive.release()  # and the launch's folder, unless another node's keeper here (a test cluster) has one


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.0f} MB" if nbytes >= 10e6 else f"{nbytes / 1e6:.3f} MB"
