"""The memory tier on a host: each save copies this host's addressable shards (with their global
indices) and its non-array state into host memory, and a background thread hands them to the node's
keeper (`jaxlaunch.workers.keeper`), which holds them beyond this process and sends a replica to
another node. A restore reads the newest step committed in memory (`jaxlaunch.contract.tiers`) back
into today's shardings: on the same topology each host takes back its own part; on another one, the
held shards are reassembled into the new shardings."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from jaxlaunch.workers.keeper import first_line

from jaxlaunch.contract import tiers
from jaxlaunch.contract.tiers import Held

log = logging.getLogger(__name__)
KEEPER_CALL_TIMEOUT_S = 60.0
Index = tuple[tuple[int, int], ...]


def _normal(index: tuple[slice, ...], shape: tuple[int, ...]) -> Index:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def snapshot(tree: Any) -> dict[str, Any]:
    """This host's part of `tree`: each array's addressable shards once per global index, copied to
    host memory now (the next step may overwrite or donate the device buffers), and every other leaf."""
    arrays, plain, live = {}, {}, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(path)
        if not isinstance(leaf, jax.Array):
            plain[key] = leaf
            continue
        data = jax.random.key_data(leaf) if _is_key(leaf) else leaf
        arrays[key] = {"shape": tuple(data.shape), "dtype": str(data.dtype),
                       "key_impl": str(jax.random.key_impl(leaf)) if _is_key(leaf) else None}
        seen = set()
        for shard in data.addressable_shards:
            index = _normal(shard.index, data.shape)
            if index not in seen:
                seen.add(index)
                shard.data.copy_to_host_async()
                live.append((key, index, shard.data))
    shards = [{"path": key, "index": index, "data": np.array(value, copy=True)} for key, index, value in live]
    return {"arrays": arrays, "plain": plain, "shards": shards}


def part_nbytes(targets: Any) -> int:
    """The bytes of this host's part of a state with these targets' shardings, before it exists."""
    total = 0
    for leaf in jax.tree.leaves(targets):
        if not isinstance(getattr(leaf, "sharding", None), jax.sharding.Sharding):
            continue
        itemsize = 8 if _is_key(leaf) else np.dtype(leaf.dtype).itemsize
        indices = {_normal(i, leaf.shape) for i in leaf.sharding.addressable_devices_indices_map(leaf.shape).values()}
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


class MemoryTier:
    """One host's side of the memory tier for one attempt."""

    def __init__(self, keepers: dict[str, Any], rank: int, num_hosts: int, lost: tuple[str, ...] = ()):
        import ray

        self.keepers, self.rank, self.num_hosts, self.lost_before = keepers, rank, num_hosts, list(lost)
        self.node = ray.get_runtime_context().get_node_id()
        self.keeper = keepers[self.node]
        partner = tiers.replica_node(self.node, list(keepers))
        self.replica_to = keepers[partner] if partner is not None else None
        self.active = True
        self.refused: str | None = None
        self.sender = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-tier")
        self.in_flight: concurrent.futures.Future | None = None
        self.handed: list[int] = []
        """This host's saves of the attempt, in order: all but the newest were handed over (waited for)."""
        self.lost: list[str] = list(lost)
        """Nodes whose keeper is gone (found by the driver, or not answering `held()`): lost with their node."""
        self._structure: tuple[Any, bytes | None] | None = None
        """The saved state's pytree structure, pickled once: the same at every save of an attempt."""

    # -- the budget, agreed by every host -------------------------------------------------------------
    def reserve(self, nbytes: int) -> str | None:
        """Asks this node's keeper whether it can hold its steps of this attempt's parts; every host
        learns whether all could, and the tier is on for all or for none. Returns this host's reason."""
        import ray

        step_bytes = nbytes * (2 if self.replica_to is not None else 1)
        try:
            reason = ray.get(self.keeper.reserve.remote(self.rank, self.num_hosts, step_bytes),
                             timeout=KEEPER_CALL_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - no keeper: no memory tier, said in the event
            reason = f"this node's keeper did not answer: {type(err).__name__}: {err}"
        self.active = not any_host(reason is not None)
        return reason

    # -- saving -----------------------------------------------------------------------------------
    def save(self, step: int, tree: Any, meta: dict[str, Any], extra: dict[str, Any]) -> None:
        """Copies this host's part of `step` to host memory and hands it to the keeper in the
        background; waits for the previous hand-off (its primary and replica held), so that one part
        at most is in flight and replication never lags more than one save.

        The floor sent with the part: this host's save before the previous one. Every host has handed
        that one over whole, because the copy of `step` above waited for `step`'s computation, whose
        collectives every host entered only after its own previous save, which waited for that one."""
        part = {**snapshot(tree), "structure": self._pickled_structure(tree), "meta": meta, "extra": extra}
        self.wait()
        floor = self.handed[-2] if len(self.handed) >= 2 else -1
        self.handed = self.handed[-1:] + [step]
        self.in_flight = self.sender.submit(self._hand_off, step, part, floor)

    def _pickled_structure(self, tree: Any) -> bytes | None:
        """The state's tree structure (what the keys of the part's arrays cannot tell: a list from a
        dict with integer keys, an empty optimizer state): a durable save of the part without the
        user's `init` (`jaxlaunch.workers.persist`) rebuilds the very tree a durable save writes. As
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

    def _hand_off(self, step: int, part: dict[str, Any], floor: int) -> None:
        import ray

        try:
            refused = ray.get(self.keeper.hold.remote(step, self.rank, self.num_hosts, part, self.replica_to, floor),
                              timeout=KEEPER_CALL_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the step is not committed in memory; durable goes on
            refused = f"this node's keeper did not answer ({first_line(err)}); the driver restarts a dead one"
        if refused is not None and self.refused is None:
            self.refused = refused
            log.warning("the memory tier did not hold step %d (%s); the durable tier goes on", step, refused)

    def handing_off(self) -> bool:
        return self.in_flight is not None and not self.in_flight.done()

    def wait(self) -> None:
        if self.in_flight is not None:
            self.in_flight.result()
            self.in_flight = None

    def close(self) -> None:
        self.wait()
        self.sender.shutdown()

    # -- restoring --------------------------------------------------------------------------------
    def held(self) -> list[Held]:
        """What every live keeper holds (a lost node's keeper is gone with it)."""
        import ray

        refs = {node: k.index.remote() for node, k in self.keepers.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=KEEPER_CALL_TIMEOUT_S)
        out, self.lost = [], list(self.lost_before)
        for node, ref in refs.items():
            try:
                if ref not in ready:
                    raise TimeoutError("no answer")
                out += [Held.from_dict(d) for d in ray.get(ref)]
            except Exception as err:  # noqa: BLE001 - a keeper lost with its node holds nothing
                log.info("the keeper of node %s did not answer: %s", node[:12], err)
                self.lost.append(node)
        return out

    def newest_step(self, held: list[Held]) -> int | None:
        """Rank 0's newest committed step in memory, the same on every host."""
        steps = tiers.committed_steps(held) if self.rank == 0 else []
        step = steps[0] if steps else -1
        if jax.process_count() > 1:
            step = int(multihost_utils.broadcast_one_to_all(np.array(step, dtype=np.int64)))
        return None if step < 0 else step

    def restore(self, step: int, held: list[Held], targets: Any) -> MemoryRestore:
        """`step` from the keepers into `targets` (ShapeDtypeStructs with today's shardings), or into
        `targets(part)` when it is a function of this host's own part (its arrays, structure and
        shards), for a restore that knows the state only from what was saved."""
        import ray

        start = time.perf_counter()
        num_saved = max(h.num_hosts for h in held if h.step == step)
        # On other host counts, host r takes the non-array state of saved rank r % num_saved.
        own = self.rank % num_saved
        by_rank = {s.rank: s for s in tiers.sources(held, step, prefer={own: self.node})}
        if set(by_rank) != set(range(num_saved)):
            raise RuntimeError(f"memory step {step} is no longer whole in the keepers")
        parts: dict[int, dict[str, Any]] = {}
        fetched = 0

        def load(ranks: list[int]) -> None:
            nonlocal fetched
            refs = {r: self.keepers[by_rank[r].node].fetch.remote(step, r, str(by_rank[r].role))
                    for r in ranks if r not in parts}
            for r, ref in refs.items():
                part = ray.get(ref, timeout=KEEPER_CALL_TIMEOUT_S)
                if part is None:
                    raise RuntimeError(f"the keeper no longer holds rank {r}'s part of memory step {step}")
                parts[r] = part
                fetched += sum(s["data"].nbytes for s in part["shards"])

        # Its own part covers a host's shards on the same topology; other parts only when it does not.
        load([own])
        if callable(targets):
            targets = targets(parts[own])
        state = _assemble(targets, parts, lambda: load(sorted(by_rank)), own)
        meta = parts[0]["meta"] if 0 in parts else self._fetch_meta(step, by_rank[0])
        return MemoryRestore(step, state, meta, parts[own].get("extra") or {}, list(by_rank.values()),
                              time.perf_counter() - start, fetched)

    def _fetch_meta(self, step: int, source: tiers.Source) -> dict[str, Any]:
        import ray

        part = ray.get(self.keepers[source.node].fetch.remote(step, source.rank, str(source.role)),
                       timeout=KEEPER_CALL_TIMEOUT_S)
        return part["meta"]

    def forget_after(self, step: int) -> None:
        """Waited for: no host saves a step past `step` before the keepers forgot the old ones, since
        rank 0 enters the next step's collectives only after this returns."""
        import ray

        if self.rank == 0:
            try:
                ray.get([k.forget_after.remote(step) for k in self.keepers.values()], timeout=KEEPER_CALL_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - a keeper gone holds nothing to forget
                log.info("a keeper did not forget the steps after %d: %s", step, first_line(err))


def _assemble(targets: Any, parts: dict[int, dict[str, Any]], load_all: Callable[[], None], own: int) -> Any:
    """Each target array made from the held shards: its own host's shard of the same index when
    there is one, else the pieces of every part that overlap it."""

    def shards_of(key: str) -> list[tuple[int, Index, np.ndarray]]:
        out = [(r, s["index"], s["data"]) for r, p in parts.items() for s in p["shards"] if s["path"] == key]
        return sorted(out, key=lambda item: item[0] != own)

    def piece(key: str, shape: tuple[int, ...], dtype: np.dtype, index: tuple[slice, ...] | None) -> np.ndarray:
        assert index is not None, "a NamedSharding gives every device a slice"
        wanted = _normal(index, shape)
        for _, held_index, data in shards_of(key):
            if held_index == wanted:
                return data
        for attempt in range(2):
            out = np.empty([b - a for a, b in wanted], dtype)
            covered = np.zeros(out.shape, bool)
            for _, held_index, data in shards_of(key):
                lo = [max(a, c) for (a, _), (c, _) in zip(wanted, held_index, strict=True)]
                hi = [min(b, d) for (_, b), (_, d) in zip(wanted, held_index, strict=True)]
                if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
                    continue
                dst = tuple(slice(lo_ - a, h - a) for lo_, h, (a, _) in zip(lo, hi, wanted, strict=True))
                src = tuple(slice(lo_ - c, h - c) for lo_, h, (c, _) in zip(lo, hi, held_index, strict=True))
                out[dst] = data[src]
                covered[dst] = True
            if covered.all():
                return out
            if attempt == 0:
                load_all()
        raise RuntimeError(f"the memory tier holds no copy of part of {key}")

    plain = {k: v for p in parts.values() for k, v in p["plain"].items()}
    arrays = parts[own]["arrays"]

    def make(path: jax.tree_util.KeyPath, target: Any) -> Any:
        key = jax.tree_util.keystr(path)
        if not isinstance(getattr(target, "sharding", None), jax.sharding.Sharding):
            return plain[key]
        info = arrays[key]
        shape, dtype = tuple(info["shape"]), np.dtype(info["dtype"])
        sharding = target.sharding
        if info["key_impl"] is not None:
            spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec))
        array = jax.make_array_from_callback(shape, sharding, lambda i: piece(key, shape, dtype, i))
        if info["key_impl"] is not None:
            return jax.device_put(jax.random.wrap_key_data(array, impl=info["key_impl"]), target.sharding)
        return array

    return jax.tree_util.tree_map_with_path(make, targets)


def any_host(flag: bool) -> bool:
    """Whether any host's flag is set, known on every host."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
