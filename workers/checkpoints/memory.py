"""The memory tier on a host: each save writes this host's addressable shards (with their global
indices) and its non-array state once, straight from the device buffers, into a part file in its
node's shared memory (`jaxlaunch.workers.checkpoints.part_file`), and a background thread tells the node's keeper
(`jaxlaunch.workers.checkpoints.keeper`), which adopts the file beyond this process and streams a replica to
another node. A restore reads the newest step committed in memory (`jaxlaunch.contract.tiers`) back
into today's shardings, reading only the bytes it needs: a part on this node by mapping its file,
another node's by asking its keeper for the sub-boxes of its shards that today's shards overlap."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from jaxlaunch.workers.checkpoints.agree import any_host
from jaxlaunch.workers.checkpoints.keeper import HandOff, incoming_name
from jaxlaunch.workers.checkpoints.part_file import (
    Copies,
    Index,
    PartFile,
    PartHeader,
    PartWriter,
    is_key,
    normal,
    overlap,
)

from jaxlaunch.contract import tiers
from jaxlaunch.contract.event_base import first_line
from jaxlaunch.contract.protocol import KEEPER_HOLD_GROUP
from jaxlaunch.contract.tiers import Held

log = logging.getLogger(__name__)
KEEPER_CALL_TIMEOUT_S = 60.0
MARK_TIMEOUT_S = 30.0
"""How long a refusal's mark (`_refuse`) waits for the keepers, a restarting one included."""
WHOLE_STEPS_TRIED = 4
"""A restore tries the newest committed memory steps in turn, at most this many (a keeper keeps
`--memory-keep` whole steps and the saves in flight)."""


def part_nbytes(targets: Any) -> int:
    """The bytes of this host's part of a state with these targets' shardings, before it exists."""
    total = 0
    for leaf in jax.tree.leaves(targets):
        if not isinstance(getattr(leaf, "sharding", None), jax.sharding.Sharding):
            continue
        itemsize = 8 if is_key(leaf) else np.dtype(leaf.dtype).itemsize
        indices = {normal(i, leaf.shape) for i in leaf.sharding.addressable_devices_indices_map(leaf.shape).values()}
        total += sum(int(np.prod([b - a for a, b in index])) * itemsize for index in indices)
    return total


@dataclasses.dataclass
class MemoryRestore:
    step: int
    state: Any
    meta: dict[str, Any]
    extra: dict[str, Any]
    sources: list[tiers.Source]
    seconds: float
    bytes_fetched: int
    """Bytes of held parts this host read: mapped on its node or fetched from other nodes' keepers."""
    passed_over: list[str] = dataclasses.field(default_factory=list)
    """Why each copy this host passed over was not read (another copy of the same part served)."""
    extras: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """A give-up persist's: the non-array state of each saved rank this host writes (`checkpoints.persist`)."""


@dataclasses.dataclass
class OpenStep:
    """A memory step being restored on this host (`MemoryTier.open`)."""

    step: int
    reader: PartReader
    found: dict[int, list[tiers.Source]]
    """Each saved rank's held copies, the ones to try first first."""
    read_from: dict[int, tiers.Source]
    """The copy of each rank's part this host checked and reads."""
    passed_over: list[str]
    started: float

    @property
    def header(self) -> PartHeader:
        """This host's own part's header (its structure, arrays and shards)."""
        return self.reader.header(self.reader.own)


class MemoryTier:
    """One host's side of the memory tier for one attempt."""

    def __init__(self, keepers: dict[str, Any], rank: int, num_hosts: int, attempt: int, lost: tuple[str, ...] = (),
                 reading: str = "restore"):
        import ray

        self.keepers, self.rank, self.num_hosts, self.lost_before = keepers, rank, num_hosts, list(lost)
        self.attempt = attempt
        self.reading = f"{reading}-{attempt}"
        """What its keepers hash a copy once for (`Keeper.check`): a persist after a restore of the same
        attempt hashes again."""
        self.node = ray.get_runtime_context().get_node_id()
        self.keeper = keepers[self.node]
        partner = tiers.replica_node(self.node, list(keepers))
        self.replica_to = keepers[partner] if partner is not None else None
        self.active = True
        self.refused: str | None = None
        """The first refusal of the attempt (said once, in an event), of step `refused_step`."""
        self.refused_step: int | None = None
        self.refused_steps: set[int] = set()
        """The steps of the newest saves whose hand-off was refused (not committed in memory)."""
        self.refusing = threading.Lock()
        self.inbox: pathlib.Path | None = None
        self.sender = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-tier")
        self.in_flight: concurrent.futures.Future | None = None
        self.handed: list[int] = []
        """This host's saves of the attempt, in order: all but the newest were handed over (waited for)."""
        self.copies: dict[int, Copies] = {}
        """The copies of this host's part of its newest saves, by step, once their hand-off is done."""
        self.lost: list[str] = list(lost)
        """Nodes whose keeper is gone (found by the driver, or not answering `held()`)."""
        self.lost_alive: list[str] = []
        """Of those, the nodes Ray still lists alive at `held()` (their keeper died, its node did not)."""
        self.replaced: list[str] = []
        """Nodes whose keeper the driver stopped (it did not answer) and started anew, empty, since the
        previous attempt: what it held is gone."""
        self.writer = PartWriter()
        self._structure: tuple[Any, bytes | None] | None = None
        """The saved state's pytree structure, pickled once: the same at every save of an attempt."""

    # -- the budget, agreed by every host -------------------------------------------------------------
    def reserve(self, nbytes: int) -> str | None:
        """Asks this node's keeper whether it can hold its steps of this attempt's parts; every host
        learns whether all could, and the tier is on for all or for none. Returns this host's reason."""
        import ray

        step_bytes = nbytes * (2 if self.replica_to is not None else 1)
        try:
            reason, inbox = ray.get([self.keeper.reserve.remote(self.rank, self.attempt, step_bytes, nbytes),
                                     self.keeper.inbox.remote()], timeout=KEEPER_CALL_TIMEOUT_S)
            self.inbox = pathlib.Path(inbox)
        except Exception as err:  # noqa: BLE001 - no keeper: no memory tier, said in the event
            reason = f"this node's keeper did not answer: {type(err).__name__}: {err}"
        self.active = not any_host(reason is not None)
        if self.active:
            self.keeper.prepare.remote()  # spare files for the first saves, made in the background
        return reason

    # -- saving -----------------------------------------------------------------------------------
    def save(self, step: int, tree: Any, meta: dict[str, Any], extra: dict[str, Any],
             fault: Callable[[], None] | None = None) -> None:
        """Writes this host's part of `step` into its node's shared memory (the one copy on this
        node) and hands the file to the keeper in the background; waits for the previous hand-off
        (its primary and replica held), so that one part at most is in flight and replication never
        lags more than one save.

        The floor sent with the part: this host's save before the previous one. Every host has handed
        that one over, because the write of `step` above waited for `step`'s computation, whose
        collectives every host entered only after its own previous save, which waited for that one;
        and a host whose hand-off or write failed told every keeper before it went on (`_refuse`).
        `fault`: an injected failure, set off once the keeper was asked to hold the part."""
        assert self.inbox is not None, "reserve() runs before the first save"
        name = incoming_name(step, self.rank, os.getpid())
        try:
            header = self.writer.write(self.inbox, name, tree, meta, extra, self._pickled_structure(tree))
        except OSError as err:  # the keeper restarted and emptied its folder, or the tmpfs is full
            self._refuse(step, f"the part file could not be written ({first_line(err)})")
            self.wait()
            return
        self.wait()
        floor = self.handed[-2] if len(self.handed) >= 2 else -1
        self.handed = self.handed[-1:] + [step]
        copied = Copies(header.nbytes, self.writer.file_bytes, on_node_bytes=self.writer.copied_bytes)
        self.in_flight = self.sender.submit(self._hand_off, step, name, copied, floor, fault, self.writer.file_key)

    def _pickled_structure(self, tree: Any) -> bytes | None:
        """The state's tree structure (what the keys of the part's arrays cannot tell: a list from a
        dict with integer keys, an empty optimizer state): a durable save of the part without the
        user's `init` (`jaxlaunch.workers.checkpoints.persist`) rebuilds the very tree a durable save writes. As
        bytes, so that no keeper unpickles classes it may not import; None if it cannot be pickled
        (that save then says why it cannot be persisted)."""
        treedef = jax.tree.structure(tree)
        if self._structure is None or self._structure[0] != treedef:
            try:
                pickled: bytes | None = cloudpickle.dumps(treedef)
            except Exception as err:  # noqa: BLE001 - the tier goes on; only a give-up persist needs it
                log.warning("the state's structure cannot be pickled (%s): a give-up persist cannot write it", err)
                pickled = None
            self._structure = (treedef, pickled)
        return self._structure[1]

    def _hand_off(self, step: int, name: str, written: Copies, floor: int, fault: Callable[[], None] | None,
                  file_key: tuple[int, int] | None) -> None:
        import ray

        try:
            taken = self.writer.digest(file_key)  # through this host's mapping: a third of a keeper's hash
            # The hand-off group: it waits on the partner keeper, whose other threads take the replica.
            asked = self.keeper.hold.options(concurrency_group=KEEPER_HOLD_GROUP).remote(
                step, self.rank, self.num_hosts, name, self.replica_to, floor, self.attempt, part_digest=taken)
            if fault is not None:
                fault()
            answer: HandOff = ray.get(asked, timeout=KEEPER_CALL_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the step is not committed in memory; durable goes on
            answer = HandOff(f"this node's keeper did not answer ({first_line(err)}); the driver restarts a dead one")
        try:  # spares the keeper deleted to take this part: free now, not at the next save
            self.writer.release_deleted()
        except OSError as err:  # never fail a save over it: the next write tries again
            log.warning("the part files the keeper deleted were not let go: %s", first_line(err))
        # A new dict, not a change to the one the training thread may be reading.
        self.copies = {**{s: c for s, c in self.copies.items() if s >= step - 1},
                       step: dataclasses.replace(written, sent_bytes=answer.sent_bytes,
                                                 received_bytes=answer.received_bytes)}
        if answer.refused is not None:
            self._refuse(step, answer.refused)

    def _refuse(self, step: int, reason: str) -> None:
        """Step `step` is not committed in memory: said, and told to every keeper (`Keeper.mark_not_whole`)
        before this host goes on, so none counts it as a whole step a floor passed."""
        with self.refusing:  # the training thread (a write that failed) and the hand-off thread both refuse
            # A new set, not a change to the one the training thread may be reading; the newest saves only.
            self.refused_steps = {s for s in self.refused_steps if s >= step - 2} | {step}
            if self.refused is None:
                self.refused, self.refused_step = reason, step
            log.warning("the memory tier did not hold step %d (%s); the durable tier goes on", step, reason)
        try:  # a restarting keeper is asked again once Ray restarted it; a keeper gone holds nothing
            _, failed = self._ask_keepers(lambda keeper: keeper.mark_not_whole.remote(self.attempt, step),
                                          MARK_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - never fail a save over the mark of one that failed
            failed = {"every node": first_line(err)}
        for node, why in failed.items():
            log.warning("the keeper of node %s was not told step %d is not whole: %s", node[:12], step, why)

    def copies_record(self) -> dict[str, int]:
        """For a save's metrics: the copies of this host's part that the newest save whose hand-off is
        done (replica included; the one before the newest save) made, and its step."""
        copies = self.copies
        if not copies:
            return {}
        step = max(copies)
        return {**copies[step].to_record(), "memory_copies_step": step}

    def handing_off(self) -> bool:
        return self.in_flight is not None and not self.in_flight.done()

    def wait(self) -> None:
        if self.in_flight is not None:
            self.in_flight.result()
            self.in_flight = None

    def close(self) -> None:
        self.wait()
        self.sender.shutdown()
        self.writer.close()

    # -- restoring --------------------------------------------------------------------------------
    def held(self) -> list[Held]:
        """What every live keeper holds (a lost node's keeper is gone with it; a restarting one is asked
        again, and holds what its earlier process did)."""
        answers, failed = self._ask_keepers(lambda keeper: keeper.index.remote())
        for node, why in failed.items():
            log.info("the keeper of node %s did not answer: %s", node[:12], why)
        self.lost = [n for n in self.lost_before if n not in self.keepers] + list(failed)
        self.lost_alive = sorted(set(self.lost) & (_alive_nodes() or set())) if self.lost else []
        self.replaced = [n for n in self.lost_before if n in self.keepers and n not in failed]
        return [Held.from_dict(d) for node in answers for d in answers[node]]

    def _ask_keepers(self, call: Callable[[Any], Any],
                     timeout_s: float = KEEPER_CALL_TIMEOUT_S) -> tuple[dict[str, Any], dict[str, str]]:
        """Each keeper's answer to `call` (its handle -> an ObjectRef), and why each that gave none did
        not. A keeper whose process died is asked again until `timeout_s`: Ray restarts it on its node,
        and the new process takes over the part files the earlier one held."""
        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout_s
        answers: dict[str, Any] = {}
        failed: dict[str, str] = {}
        asking, wait_s = dict(self.keepers), 0.1
        while asking:
            refs = {node: call(keeper) for node, keeper in asking.items()}
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs),
                                timeout=max(0.0, deadline - time.monotonic()))
            again = {}
            for node, ref in refs.items():
                try:
                    if ref not in ready:
                        raise TimeoutError(f"no answer in {timeout_s:.0f} s")
                    answers[node] = ray.get(ref)
                except ActorUnavailableError as err:
                    if time.monotonic() + wait_s < deadline:
                        again[node] = asking[node]  # its process died; Ray is starting another on its node
                    else:
                        failed[node] = f"still restarting after {timeout_s:.0f} s ({first_line(err)})"
                except Exception as err:  # noqa: BLE001 - gone with its node, or stopped by the driver
                    failed[node] = first_line(err)
            asking = again
            if asking:
                time.sleep(wait_s)  # a back-off between asks of a restarting actor, not a synchronisation
                wait_s = min(2 * wait_s, 2.0)
        return answers, failed

    def whole_steps(self, held: list[Held], at_most: int | None = None) -> list[int]:
        """Rank 0's committed steps in memory (up to `at_most`), newest first, the same on every host:
        the newest `WHOLE_STEPS_TRIED`, the ones a restore tries in turn."""
        steps = [s for s in tiers.whole_steps(held) if at_most is None or s <= at_most] if self.rank == 0 else []
        sent = np.full(WHOLE_STEPS_TRIED, -1, dtype=np.int64)
        sent[:len(steps[:WHOLE_STEPS_TRIED])] = steps[:WHOLE_STEPS_TRIED]
        if jax.process_count() > 1:
            sent = multihost_utils.broadcast_one_to_all(sent)
        return [int(s) for s in sent if s >= 0]

    def restore(self, step: int, held: list[Held], targets: Any) -> MemoryRestore:
        """`step` from the keepers into `targets` (ShapeDtypeStructs with today's shardings)."""
        return self.read(self.open(step, held), targets)

    def open(self, step: int, held: list[Held]) -> OpenStep:
        """`step`'s parts ready to read, this host's own part's copy checked and its header read: what
        can fail on one host alone before the state's layout is known (`read` reads the arrays), so that
        a caller whose targets take a collective (the give-up persist) has every host agree first."""
        import ray

        start = time.perf_counter()
        num_saved = max(h.num_hosts for h in held if h.step == step)
        # On other host counts, host r takes the non-array state of saved rank r % num_saved.
        own = self.rank % num_saved
        found = tiers.copies(held, step, prefer={own: self.node})
        if set(found) != set(range(num_saved)):
            raise RuntimeError(f"memory step {step} is no longer whole in the keepers")
        by_rank: dict[int, tiers.Source] = {}
        passed_over: list[str] = []

        def source(rank: int) -> tiers.Source:
            """The first copy of `rank`'s part (this node's, the primary, the replica) whose keeper finds
            its file as it was held, checked when this host first reads the part."""
            if rank not in by_rank:
                problems = []
                for copy in found[rank]:
                    try:
                        problem = ray.get(self.keepers[copy.node].check.remote(step, rank, str(copy.role),
                                                                               self.reading),
                                          timeout=KEEPER_CALL_TIMEOUT_S)
                    except Exception as err:  # noqa: BLE001 - its keeper is gone or stuck: the other copy serves
                        problem = f"the keeper of node {copy.node[:12]} did not check its copy ({first_line(err)})"
                    if problem is None:
                        by_rank[rank] = copy
                        break
                    problems.append(problem)
                passed_over.extend(problems)
                if rank not in by_rank:
                    raise RuntimeError(f"no copy of rank {rank}'s part of memory step {step} is intact: "
                                       f"{'; '.join(problems)}")
            return by_rank[rank]

        def keeper_of(rank: int) -> Any:
            return self.keepers[source(rank).node]

        def locate(rank: int) -> tuple[PartHeader, PartFile | None]:
            got = ray.get(keeper_of(rank).header.remote(step, rank, str(by_rank[rank].role)),
                          timeout=KEEPER_CALL_TIMEOUT_S)
            if got is None:
                raise RuntimeError(f"the keeper no longer holds rank {rank}'s part of memory step {step}")
            path, header = got
            return header, PartFile(path) if by_rank[rank].node == self.node else None

        def remote_box(rank: int, shard: int, box: Index) -> np.ndarray:
            data = ray.get(keeper_of(rank).read_box.remote(step, rank, str(by_rank[rank].role), shard, box),
                           timeout=KEEPER_CALL_TIMEOUT_S)
            if data is None:
                raise RuntimeError(f"the keeper no longer holds rank {rank}'s part of memory step {step}")
            return data

        reader = PartReader(own, sorted(found), locate, remote_box)
        reader.header(own)
        return OpenStep(step, reader, found, by_rank, passed_over, start)

    def read(self, opened: OpenStep, targets: Any) -> MemoryRestore:
        """The opened step's state in `targets`, reading only what today's shards need."""
        reader = opened.reader
        state = assemble(targets, reader)
        # A rank not read (this host's own part covered it): the copy it would have read.
        sources = [opened.read_from.get(r, copies[0]) for r, copies in opened.found.items()]
        return MemoryRestore(opened.step, state, reader.header(0).meta, reader.header(reader.own).extra or {},
                             sources, time.perf_counter() - opened.started, reader.bytes_read, opened.passed_over)

    def forget_after(self, step: int) -> str | None:
        """Rank 0 has every keeper drop the steps after `step` (the run goes on from it): why a keeper
        on a node that is up did not, or None (on the other ranks too). Waited for: no host saves a
        step past `step` before the keepers forgot the old ones, since rank 0 enters the next step's
        collectives only after this returns. A keeper that missed it would keep, and a restart of it
        take over, steps of a history the run left (a keeper gone with its node took its files along)."""
        if self.rank != 0:
            return None
        try:
            _, failed = self._ask_keepers(lambda keeper: keeper.forget_after.remote(step, self.attempt))
        except Exception as err:  # noqa: BLE001 - said, and agreed on by every host (they wait for rank 0)
            return f"the keepers could not be asked to drop the steps after {step} ({first_line(err)})"
        alive = _alive_nodes() if failed else set()
        # A keeper gone with its node took its files along; when Ray cannot say, every one counts as up.
        stuck = {node: why for node, why in failed.items() if alive is None or node in alive}
        if not stuck:
            return None
        return (f"the keeper(s) of node(s) {', '.join(n[:12] for n in stuck)} did not drop the steps after {step} "
                f"({'; '.join(stuck.values())[:200]})")


def _alive_nodes() -> set[str] | None:
    """The nodes Ray lists alive; None when it cannot be asked."""
    import ray

    try:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    except Exception as err:  # noqa: BLE001 - unknown: each caller says which way it errs
        log.info("Ray's node list could not be read: %s", first_line(err))
        return None


class PartReader:
    """The held parts of one step, read as needed: a part's header on first use, then only the
    sub-boxes asked for, from its mapped file when it is on this node, else from its keeper."""

    def __init__(self, own: int, ranks: list[int], locate: Callable[[int], tuple[PartHeader, PartFile | None]],
                 remote_box: Callable[[int, int, Index], np.ndarray]):
        self.own, self.ranks, self.locate, self.remote_box = own, ranks, locate, remote_box
        self.parts: dict[int, tuple[PartHeader, PartFile | None]] = {}
        self.bytes_read = 0

    def header(self, rank: int) -> PartHeader:
        if rank not in self.parts:
            self.parts[rank] = self.locate(rank)
        return self.parts[rank][0]

    def box(self, rank: int, shard: int, box: Index) -> np.ndarray:
        header, mapped = self.header(rank), self.parts[rank][1]
        entry = header.shards[shard]
        data = mapped.box(entry, box) if mapped is not None else self.remote_box(rank, shard, box)
        self.bytes_read += data.nbytes
        return data


def assemble(targets: Any, reader: PartReader) -> Any:
    """Each target array made from the held shards: its own host's shard of the same index when
    there is one, else the pieces of the held shards that overlap it, each element read once."""
    own = reader.header(reader.own)

    def piece(key: str, shape: tuple[int, ...], dtype: np.dtype, index: tuple[slice, ...] | None) -> np.ndarray:
        assert index is not None, "a NamedSharding gives every device a slice"
        wanted = normal(index, shape)
        for i, entry in enumerate(own.shards):
            if entry.path == key and entry.index == wanted:
                return _owned(reader.box(reader.own, i, wanted))
        out = np.empty([b - a for a, b in wanted], dtype)
        covered = np.zeros(out.shape, bool)
        # Other parts are read only when the host's own does not cover its shard.
        for rank in [reader.own] + [r for r in reader.ranks if r != reader.own]:
            for i, entry in enumerate(reader.header(rank).shards):
                box = overlap(wanted, entry.index) if entry.path == key else None
                if box is None:
                    continue
                dst = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(box, wanted, strict=True))
                if covered[dst].all():
                    continue  # a replicated array's other copies: read once
                out[dst] = reader.box(rank, i, box)
                covered[dst] = True
            if covered.all():
                return out
        raise RuntimeError(f"the memory tier holds no copy of part of {key}")

    def make(path: jax.tree_util.KeyPath, target: Any) -> Any:
        key = jax.tree_util.keystr(path)
        if not isinstance(getattr(target, "sharding", None), jax.sharding.Sharding):
            return own.plain[key]
        info = own.array(key)
        shape, dtype = info.shape, np.dtype(info.dtype)
        sharding = target.sharding
        if info.key_impl is not None:
            spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec))
        array = jax.make_array_from_callback(shape, sharding, lambda i: piece(key, shape, dtype, i))
        if info.key_impl is not None:
            return jax.device_put(jax.random.wrap_key_data(array, impl=info.key_impl), target.sharding)
        return array

    return jax.tree_util.tree_map_with_path(make, targets)


def _owned(data: np.ndarray) -> np.ndarray:
    """`data` in memory of its own: on CPU, JAX may make an aligned array the device buffer without a
    copy, and a donated buffer in a read-only mapping of a part file would be written by the next step."""
    return data if data.flags.writeable and data.flags.owndata else np.array(data)
