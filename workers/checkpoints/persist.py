"""The give-up persist on a host: the launcher's own program, not the user's. After the driver gave up
on a job, a short run of the hosts writes the memory tier's newest committed step that reads back
(`newest_intact`) with Orbax, so that a `--resume` reads it like any durable step: the same tree, the
same metadata, records and non-array state as a durable save of that step (on fewer hosts than saved
it too: each writing host brings the non-array state, a per-host iterator's position, of the saved
ranks it stands for).

No user code runs (the entry is not even imported): the state is rebuilt from what the memory tier
saved. Each part carries the state's pytree structure (what the arrays' paths cannot tell: a list
from a dict with integer keys, an optimizer's empty state), each array's global shape and dtype,
and this host's shards with their global indices. Each array is restored into the sharding that
wrote it: the PartitionSpec on this mesh whose shard indices are the ones the saving host held,
agreed by every host (on another host count none may match; the most-sharded spec that divides the
array then serves, reassembled from the parts as any memory restore on another topology)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import pickle
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxlaunch.workers import extras
from jaxlaunch.workers.checkpoints.agree import host_errors
from jaxlaunch.workers.checkpoints.durable import Checkpointer
from jaxlaunch.workers.checkpoints.memory import MemoryRestore, MemoryTier, OpenStep
from jaxlaunch.workers.checkpoints.part_file import ArrayEntry, Index, PartHeader
from jaxlaunch.workers.supervision.progress import HostProgress

from jaxlaunch.contract import entry as entry_lib
from jaxlaunch.contract import events, tiers
from jaxlaunch.contract.layout import RunLayout
from jaxlaunch.contract.protocol import Ending, EntryRef, HostResult, HostSpec, Phase

log = logging.getLogger(__name__)
MAX_SPECS = 4096
"""Candidate PartitionSpecs tried per array at most (a deep mesh on a high-rank array): past it, only
the replicated spec and the fallback are tried."""


def write_newest(spec: HostSpec, mesh: Mesh, progress: HostProgress) -> HostResult:
    """Every host calls this at once: the memory tier's newest committed step that reads back, when
    it is newer than the newest durable step, restored from the keepers and saved with Orbax (a step
    whose copies of a part all fail their check leaves the next older one to serve, as a restore's
    does). Its `final_step` is the step written, or None when there was nothing newer to write."""
    progress.enter(Phase.RESTORING)
    rank, num_hosts = jax.process_index(), jax.process_count()
    checkpointer = Checkpointer(RunLayout(spec.run_dir).checkpoints, spec.checkpoint)
    memory = MemoryTier(spec.keepers, rank, num_hosts, spec.attempt, spec.lost_keepers, reading="persist")
    written = None
    try:
        durable = checkpointer.steps_from_rank_0()
        held = memory.held()
        # After a replica mismatch, not a step past the newest whose replicas agreed.
        steps = [s for s in memory.whole_steps(held, spec.newest_restorable)
                 if tiers.memory_serves(s, durable) and s not in durable]
        restored = newest_intact(memory, steps, held, mesh, progress, durable[0] if durable else None, spec.entry)
        if restored is None:
            log.info("memory holds no step newer than durable step %s that reads back: nothing to write", durable[:1])
        else:
            step = restored.step
            log.info("restored memory step %d in %.2f s", step, restored.seconds)
            for reason in restored.passed_over:
                log.warning(events.MemoryCopyPassedOver(step=step, reason=reason).message)
            progress.enter(Phase.SAVING)
            started = time.perf_counter()
            # What a durable save of this step carries: rank 0's metadata (records, topology, the
            # shared non-array state) and every saved host's own non-array state, also when fewer
            # hosts write it (each brings those of the saved ranks it stands for).
            checkpointer.save(step, restored.state, {**restored.meta, "extra": saved_extras(restored.extras)})
            checkpointer.wait()
            progress.event(events.FinalSave(seconds=time.perf_counter() - started))
            log.info("wrote memory step %d durably", step)
            written = step
    finally:
        checkpointer.close()
        memory.close()
    progress.enter(Phase.DONE)
    return HostResult(ending=Ending.STOPPED, final_step=written, process_index=rank, process_count=num_hosts,
                      num_devices=jax.device_count(), mesh=dict(mesh.shape), final_snapshot=progress.drain())


def newest_intact(memory: MemoryTier, steps: list[int], held: list[tiers.Held], mesh: Mesh, progress: HostProgress,
                  durable_step: int | None, entry: EntryRef | None = None) -> MemoryRestore | None:
    """The newest of `steps` (memory's whole steps newer than the durable tier's, newest first, the
    same on every host) that reads back on every host, restored into the shardings that saved it;
    None when none does. A step passed over is said (`memory_fallback`, rank 0's reaches the driver).
    Every host agrees before each collective: a copy that fails its check on one host (a flipped
    bit, a torn file) would otherwise leave the others waiting in `SavedLayout.agreed`. `entry`: the
    job's, whose modules a pytree class of the state may come from (`structure_of`)."""
    for i, step in enumerate(steps):
        opened: OpenStep | None = None
        restored: MemoryRestore | None = None
        error = None
        try:
            opened = memory.open(step, held)
            layout = SavedLayout.of(opened.header, mesh, entry)
        except Exception as err:  # noqa: BLE001 - every host agrees below; an older step serves
            error = f"{type(err).__name__}: {err}"
        errors = host_errors(error)
        if not errors:
            assert opened is not None
            agreed = layout.agreed()  # a collective, entered by every host
            try:
                restored = memory.read(opened, layout.targets(agreed))
                # Host r of n stands for saved ranks r, r + n, ...: their own non-array state (a
                # per-host iterator's position) goes into the durable step as theirs.
                restored.extras = {k: opened.reader.header(k).extra or {} for k in opened.reader.ranks
                                   if k % jax.process_count() == jax.process_index()}
            except Exception as err:  # noqa: BLE001 - as above
                error = f"{type(err).__name__}: {err}"
            errors = host_errors(error)
        if not errors:
            return restored
        failed = sorted(errors)
        log.warning("memory step %d did not read back on host(s) %s: %s", step, failed, errors[failed[0]])
        then = f"writing memory step {steps[i + 1]}" if i + 1 < len(steps) else \
            f"no older memory step newer than durable step {durable_step} to write" if durable_step else \
            "no older memory step to write"
        progress.event(events.MemoryFallback(step=step, durable_step=durable_step, reason=(
            f"memory step {step} did not read back on host(s) {failed}: {errors[failed[0]]}; {then}")))
    return None


def saved_extras(mine: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every saved rank's non-array state, rank by rank, from what each host brings (a collective):
    the list a durable save by the hosts that saved the step writes (none: an empty list)."""
    everyone = extras.gather({str(rank): extra for rank, extra in mine.items()})
    by_rank = {int(rank): extra for host in everyone for rank, extra in host.items()}
    return [by_rank[rank] for rank in range(len(by_rank))] if any(by_rank.values()) else []


def structure_of(part: PartHeader, entry: EntryRef | None = None) -> Any:
    """The state's pytree structure, as the part's host saved it. A pytree class of the state that
    the job's own code defines (a dataclass in the entry file, or in a module beside it) is found
    where the hosts found it: `entry`'s folder on the path and, for a class of the entry file, the
    file imported under its name (its top level only, as unpickling any class imports its module)."""
    if part.structure is None:
        raise RuntimeError("the memory part carries no state structure (it could not be pickled when saved)")
    asked: set[str] = set()
    while True:
        try:
            return pickle.loads(part.structure)
        except ModuleNotFoundError as err:
            if entry is None or not err.name or err.name in asked or not entry_lib.import_for_unpickling(
                    entry, err.name):
                raise
            asked.add(err.name)
            log.info("the state's structure names module %s of the entry %s: imported it", err.name, entry)


def saved_targets(part: PartHeader, mesh: Mesh) -> Any:
    """The state's tree as the part's host saved it, each array a ShapeDtypeStruct with the sharding
    that wrote it (every host agrees on it), each other leaf as it was saved."""
    layout = SavedLayout.of(part, mesh)
    return layout.targets(layout.agreed())


@dataclasses.dataclass(frozen=True)
class SavedLayout:
    """What a host's own part says of the sharding of each array that saved it: the candidate specs
    on today's mesh, and which of them give this host the shards it held. `of` and `targets` are this
    host's own work (they may fail on one host alone); `agreed` is a collective between them."""

    mesh: Mesh
    treedef: Any
    arrays: dict[str, ArrayEntry]
    candidates: dict[str, list[PartitionSpec]]
    mine: np.ndarray

    @classmethod
    def of(cls, part: PartHeader, mesh: Mesh, entry: EntryRef | None = None) -> SavedLayout:
        treedef = structure_of(part, entry)
        arrays: dict[str, ArrayEntry] = {a.path: a for a in part.arrays}
        indices: dict[str, set[Index]] = {}
        for shard in part.shards:
            indices.setdefault(shard.path, set()).add(tuple(shard.index))
        candidates = {key: _candidates(info.shape, info.key_impl is not None, mesh) for key, info in arrays.items()}
        mine = np.array([_indices(arrays[k].shape, spec, mesh) == indices.get(k, set())
                         for k, specs in candidates.items() for spec in specs], dtype=bool)
        return cls(mesh, treedef, arrays, candidates, mine)

    def agreed(self) -> np.ndarray:
        """Which candidates give every host the shards it held (a collective)."""
        if jax.process_count() > 1 and self.mine.size:
            return np.all(multihost_utils.process_allgather(self.mine).reshape(-1, self.mine.size), axis=0)
        return self.mine

    def targets(self, agreed: np.ndarray) -> Any:
        chosen, at = {}, 0
        for key, specs in self.candidates.items():
            matches = [spec for spec, ok in zip(specs, agreed[at:at + len(specs)], strict=True) if ok]
            at += len(specs)
            chosen[key] = matches[0] if matches else _most_sharded(specs, self.arrays[key].shape, self.mesh)
        treedef, leaves = self.treedef, list[Any]()
        for path, _ in jax.tree_util.tree_flatten_with_path(jax.tree.unflatten(treedef, [0] * treedef.num_leaves))[0]:
            key = jax.tree_util.keystr(path)
            if key not in self.arrays:
                leaves.append(key)  # not an array: the memory restore hands back the saved value
                continue
            leaves.append(_target(self.arrays[key], NamedSharding(self.mesh, chosen[key])))
        return jax.tree.unflatten(treedef, leaves)


def _target(info: ArrayEntry, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    shape, impl = info.shape, info.key_impl
    if impl is None:
        return jax.ShapeDtypeStruct(shape, np.dtype(info.dtype), sharding=sharding)
    # A typed PRNG key array: the part holds its key data, whose last dimension is the key's own.
    keys = jax.eval_shape(lambda: jax.random.wrap_key_data(jax.numpy.zeros(shape, info.dtype), impl=impl))
    return jax.ShapeDtypeStruct(keys.shape, keys.dtype,
                                sharding=NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:len(keys.shape)])))


def _candidates(shape: tuple[int, ...], is_key: bool, mesh: Mesh) -> list[PartitionSpec]:
    """The PartitionSpecs an array of this shape may have had on `mesh`, the replicated one first (a
    key array's last dimension, its key data, is never split)."""
    ndim = len(shape) - (1 if is_key else 0)
    axes = [name for name, size in mesh.shape.items() if size > 1]
    specs = list(itertools.islice(_specs(ndim, axes), MAX_SPECS))
    return [PartitionSpec(*spec, *([None] if is_key else [])) for spec in specs]


def _specs(ndim: int, axes: list[str]) -> Iterator[tuple[Any, ...]]:
    for placement in itertools.product(range(ndim + 1), repeat=len(axes)):  # `ndim`: the axis is unused
        groups = [[a for a, d in zip(axes, placement, strict=True) if d == dim] for dim in range(ndim)]
        for orders in itertools.product(*(itertools.permutations(g) for g in groups)):
            yield tuple(None if not o else o[0] if len(o) == 1 else o for o in orders)


def _indices(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> set[Index] | None:
    """The global indices of this host's shards of an array with `spec`; None when it cannot have it."""
    try:
        index_map = NamedSharding(mesh, spec).addressable_devices_indices_map(shape)
    except ValueError:
        return None
    return {tuple(s.indices(n)[:2] for s, n in zip(index or (), shape, strict=True)) for index in index_map.values()}


def _most_sharded(specs: list[PartitionSpec], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The spec with the most distinct shards that divides the array evenly (the first among equals):
    the same on every host, as it depends on the shape and the mesh alone."""

    def shards(spec: PartitionSpec) -> int:
        count = 1
        for dim, entry in enumerate(spec):
            names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            size = int(np.prod([mesh.shape[n] for n in names]))
            if shape[dim] % size:
                return 0
            count *= size
        return count

    return max(specs, key=shards)
