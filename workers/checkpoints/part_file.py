"""One host's part of one memory-tier save, as one file in node-local shared memory: written once
from the device buffers (on CPU, `np.asarray` of a shard is a view of its buffer, so the write is
the only copy), owned from then on by the node's keeper, read back by mapping it.

The file is a small header (the typed `PartHeader`: arrays, shard entries with their byte offsets,
and the non-array state) and the shards' bytes, each at a 64-byte aligned offset. It is written
under a temporary name and renamed, so a file under its final name is whole: a host killed
mid-write leaves only a temporary file, which its keeper deletes.

JAX is imported only inside the functions that need it (a host's write, `is_key`): the keeper maps
part files, and the driver names the keeper's class, without loading it."""

from __future__ import annotations

import dataclasses
import mmap
import os
import pathlib
import pickle
import struct
from typing import Any

import numpy as np
from jaxlaunch.workers.checkpoints.file_maps import FileMaps, claim_spare

Index = tuple[tuple[int, int], ...]
"""A shard's global index: (start, stop) per dimension."""
MAGIC = b"JLPART1\0"
_PREAMBLE = struct.Struct("<8sQ")
ALIGN = 64
LARGE_PART = 1 << 20
SIZE_QUANTUM = 1 << 16
"""A large part file's size is a multiple of this (`file_size`): at most 64 KiB over its bytes, 0.1 % of a
small-preset part of 60 MB."""

@dataclasses.dataclass(frozen=True)
class ArrayEntry:
    path: str
    """The leaf's key path (`jax.tree_util.keystr`)."""
    shape: tuple[int, ...]
    dtype: str
    """Of the stored data: a typed RNG key is stored as its key data."""
    key_impl: str | None = None


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    path: str
    index: Index
    offset: int
    """Bytes from the start of the data region."""
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.index)


@dataclasses.dataclass(frozen=True)
class PartHeader:
    """What a part file holds besides the shards' bytes."""

    arrays: tuple[ArrayEntry, ...]
    shards: tuple[ShardEntry, ...]
    plain: dict[str, Any]
    """The leaves that are not arrays, by key path."""
    meta: dict[str, Any]
    extra: dict[str, Any]
    structure: bytes | None = None
    """The state's pytree structure, pickled (`jaxlaunch.workers.checkpoints.persist` rebuilds the tree from it
    without the user's `init`); None when it could not be pickled."""

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def array(self, path: str) -> ArrayEntry:
        return next(a for a in self.arrays if a.path == path)


@dataclasses.dataclass(frozen=True)
class Copies:
    """The bytes of one host's part of one save copied, counted where each copy happens."""

    nbytes: int
    """The part's array bytes."""
    file_bytes: int = 0
    """The part file's bytes (its header, then the arrays'): what a replica stream sends."""
    on_node_bytes: int = 0
    """Copied on the saving node: the host's write into shared memory, plus any host copy it needed
    first (an accelerator's device-to-host transfer; none on CPU, where the write reads the buffer)."""
    sent_bytes: int = 0
    """Sent from the saving node to the replica's node (the network; `sendfile` from the file's pages,
    no copy in the keeper's memory)."""
    received_bytes: int = 0
    """Written into the replica node's shared memory, once the partner confirmed the whole file."""

    @property
    def total(self) -> float:
        """Copies of the part: the arrays' bytes copied on the node per array byte, plus the file's
        bytes sent and received per file byte."""
        moved = (self.sent_bytes + self.received_bytes) / self.file_bytes if self.file_bytes else 0.0
        return self.on_own_node + moved

    @property
    def on_own_node(self) -> float:
        return self.on_node_bytes / self.nbytes if self.nbytes else 0.0

    def to_record(self) -> dict[str, Any]:
        return {"memory_copies": round(self.total, 4), "memory_copies_on_node": round(self.on_own_node, 4),
                "memory_bytes": self.on_node_bytes + self.sent_bytes + self.received_bytes,
                "memory_part_bytes": self.nbytes}


def digest(path: str | os.PathLike[str]) -> str:
    """xxh3-64 (hex) of a whole part file, header and shards. 60 MB took 8.9-9.2 ms of CPU here through a
    new mapping (setting up its page table is most of that), 2.4-3.0 ms through one the process holds
    (`FileMaps.digest`)."""
    import xxhash

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64_hexdigest(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return xxhash.xxh3_64_hexdigest(mapped)


def normal(index: tuple[slice, ...], shape: tuple[int, ...]) -> Index:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def is_key(x: Any) -> bool:
    import jax

    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _aligned(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def file_size(used: int) -> int:
    """A part file's size for `used` bytes of header and shards: a large part's rounded up to
    `SIZE_QUANTUM`, so that the header's few bytes more or less from one save to the next (the
    records it carries) leave the file's size, and its mapping (`FileMaps`), as they were."""
    return used if used < LARGE_PART else _aligned(used, SIZE_QUANTUM)


@dataclasses.dataclass(frozen=True)
class PartPlan:
    """What this host's part of a state holds, worked out once for the state's structure, shapes and
    shardings (the same at every save of an attempt) rather than at every save: the key path of each
    leaf, the arrays, and the shards this host writes (each global index once) with their offsets."""

    treedef: Any
    leaves: tuple[tuple[Any, tuple[int, ...], Any] | None, ...]
    """Per leaf: an array's (sharding, shape, dtype); None for a leaf that is not an array."""
    keys: tuple[str, ...]
    """Per leaf: its key path (`jax.tree_util.keystr`)."""
    arrays: tuple[ArrayEntry, ...]
    takes: tuple[tuple[int, int, bool], ...]
    """Per shard written: (leaf, position among the leaf's addressable shards, the leaf is a typed key)."""
    shards: tuple[ShardEntry, ...]
    nbytes: int
    """The data region's bytes (each shard at an aligned offset)."""
    on_accelerator: bool = False
    """The process's default backend is an accelerator, where the state lives: each shard is copied to
    the host, all transfers started at once (on CPU a shard's numpy array is its buffer, and there is
    nothing to start)."""

    @classmethod
    def of(cls, tree: Any) -> PartPlan:
        import jax

        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        leaves: list[tuple[Any, tuple[int, ...], Any] | None] = []
        keys: list[str] = []
        arrays: list[ArrayEntry] = []
        takes: list[tuple[int, int, bool]] = []
        shards: list[ShardEntry] = []
        offset = 0
        for position, (path, leaf) in enumerate(flat):
            key = jax.tree_util.keystr(path)
            keys.append(key)
            if not isinstance(leaf, jax.Array):
                leaves.append(None)
                continue
            leaves.append((leaf.sharding, tuple(leaf.shape), leaf.dtype))
            typed = is_key(leaf)
            data = jax.random.key_data(leaf) if typed else leaf
            arrays.append(ArrayEntry(key, tuple(data.shape), str(data.dtype),
                                     str(jax.random.key_impl(leaf)) if typed else None))
            seen = set()
            for which, shard in enumerate(data.addressable_shards):
                index = normal(shard.index, data.shape)
                if index not in seen:
                    seen.add(index)
                    takes.append((position, which, typed))
                    nbytes = int(shard.data.nbytes)
                    shards.append(ShardEntry(key, index, offset, nbytes))
                    offset += _aligned(nbytes)
        return cls(treedef, tuple(leaves), tuple(keys), tuple(arrays), tuple(takes), tuple(shards), offset,
                   on_accelerator=jax.default_backend() != "cpu")

    def fits(self, leaves: list[Any], treedef: Any) -> bool:
        """Whether a state with these leaves is laid out as this plan's was."""
        import jax

        if treedef != self.treedef:
            return False
        for leaf, known in zip(leaves, self.leaves, strict=True):
            if known is None:
                if isinstance(leaf, jax.Array):
                    return False
                continue
            if not isinstance(leaf, jax.Array):
                return False
            sharding, shape, dtype = known
            if leaf.shape != shape or leaf.dtype != dtype:
                return False
            now = leaf.sharding  # a typed key's is made at each read
            if now is not sharding and now != sharding:
                return False
        return True


class PartWriter:
    """Writes one host's parts, keeping the plan of the state it wrote last (`PartPlan`) and the
    mappings of the files it wrote (`FileMaps`). `close` releases the mappings."""

    def __init__(self) -> None:
        self.plan: PartPlan | None = None
        self.maps = FileMaps()
        self.copied_bytes = self.file_bytes = 0
        """The bytes the last `write` copied on this node (`Copies.on_node_bytes`), and its file's size."""
        self.file_key: tuple[int, int] | None = None
        """The (device, inode) of the file the last `write` wrote."""

    def write(self, directory: pathlib.Path, name: str, tree: Any, meta: dict[str, Any],
              extra: dict[str, Any], structure: bytes | None = None) -> PartHeader:
        """Writes this host's part of `tree` (its addressable shards, each global index once, and
        every other leaf) to `directory/name`. Returns once the file is whole: the next step may
        overwrite or donate the device buffers."""
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if self.plan is None or not self.plan.fits(leaves, treedef):
            self.plan = PartPlan.of(tree)
        header, self.copied_bytes, self.file_bytes, self.file_key = _write(
            directory, name, leaves, self.plan, meta, extra, structure, self.maps)
        return header

    def digest(self, key: tuple[int, int] | None) -> str | None:
        """`digest` of the file a `write` wrote (its `file_key`), through this host's mapping of it;
        None if it has none (its first write here went by `pwrite`)."""
        return None if key is None else self.maps.digest(key)

    def release_deleted(self) -> None:
        """Lets go of the files the keeper deleted since (`FileMaps`): their pages are free again."""
        self.maps.release_deleted()

    def close(self) -> None:
        self.maps.close()


def _write(directory: pathlib.Path, name: str, leaves: list[Any], plan: PartPlan, meta: dict[str, Any],
           extra: dict[str, Any], structure: bytes | None,
           maps: FileMaps) -> tuple[PartHeader, int, int, tuple[int, int] | None]:
    """The part written; the bytes of its shards copied on the way (the file's, and a host copy for
    each shard whose bytes the write could not read in place, told by the buffers' addresses); the
    file's size; its (device, inode)."""
    import jax

    plain = {plan.keys[i]: leaf for i, leaf in enumerate(leaves) if plan.leaves[i] is None}
    live = []
    for position, which, typed in plan.takes:
        leaf = leaves[position]
        data = (jax.random.key_data(leaf) if typed else leaf).addressable_data(which)
        if plan.on_accelerator:
            data.copy_to_host_async()  # every transfer started before the first is waited for
        live.append(data)
    header = PartHeader(plan.arrays, plan.shards, plain, meta, extra, structure)
    blob = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    start = _aligned(_PREAMBLE.size + len(blob))
    total = file_size(start + plan.nbytes)
    temporary = directory / f".{name}.tmp"
    copied = 0
    maps.release_deleted()  # before a file is claimed: pages the keeper freed are free again
    try:
        claim_spare(directory, temporary, prefer=maps.inodes())
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT, 0o666)  # the spare claimed, or a new file
        try:
            target = maps.writable(fd, total)
            _put(fd, target, 0, np.frombuffer(_PREAMBLE.pack(MAGIC, len(blob)) + blob, np.uint8))
            for entry, value in zip(plan.shards, live, strict=True):
                # A view of the buffer on CPU (a host copy on an accelerator): this copy is the one.
                host = np.ascontiguousarray(np.asarray(value))
                copied += _put(fd, target, start + entry.offset, host)
                if not _in_place(value, host):
                    copied += host.nbytes
        finally:
            try:
                key = maps.written()
            finally:
                os.close(fd)
        os.rename(temporary, directory / name)
    except BaseException:
        # A full tmpfs or a shard that would not convert: no part-sized leftover under a new name each step.
        temporary.unlink(missing_ok=True)
        maps.release_deleted()
        raise
    return header, copied, total, key


def _put(fd: int, target: mmap.mmap | None, offset: int, host: np.ndarray) -> int:
    """Copies `host` (contiguous) into the file at `offset`: through its mapping when there is one
    (no view of it outlives the call: a mapping with views cannot be closed), else by `pwrite`."""
    data = host.reshape(-1).view(np.uint8)
    if target is not None:
        if data.nbytes:
            np.copyto(np.frombuffer(target, np.uint8, data.nbytes, offset), data)
        return data.nbytes
    done, view = 0, data.data
    while done < data.nbytes:  # a write moves at most about 2 GiB
        done += os.pwrite(fd, view[done:], offset + done)
    return data.nbytes


def _in_place(shard: Any, host: np.ndarray) -> bool:
    """Whether `host` is the shard's own buffer (a CPU array read in place), not a copy of it."""
    try:
        return bool(shard.unsafe_buffer_pointer() == host.__array_interface__["data"][0])
    except Exception:  # noqa: BLE001 - a buffer without a host address (an accelerator's): a copy
        return False


class PartFile:
    """A part file mapped read-only: its shards are views of the mapping, read only where sliced."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = pathlib.Path(path)
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic, length = _PREAMBLE.unpack_from(self.map, 0)
        if magic != MAGIC:
            raise ValueError(f"{path} is not a memory-tier part file")
        self.header: PartHeader = pickle.loads(self.map[_PREAMBLE.size:_PREAMBLE.size + length])
        self.start = _aligned(_PREAMBLE.size + length)

    def shard(self, entry: ShardEntry) -> np.ndarray:
        dtype = np.dtype(self.header.array(entry.path).dtype)
        count = entry.nbytes // dtype.itemsize
        return np.frombuffer(self.map, dtype, count, self.start + entry.offset).reshape(entry.shape)

    def box(self, entry: ShardEntry, box: Index) -> np.ndarray:
        """The sub-box `box` (global coordinates, inside the shard) of a shard: a view."""
        inside = tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(box, entry.index, strict=True))
        return self.shard(entry)[inside + (...,)]  # the ellipsis keeps a 0-d shard an array, not a scalar

    def contiguous_box(self, entry: ShardEntry, box: Index) -> np.ndarray:
        """The sub-box as one contiguous array, as it is sent to another node: a copy only when the
        box cuts the shard's rows."""
        return np.require(self.box(entry, box), requirements="C")


def overlap(a: Index, b: Index) -> Index | None:
    """The box two global indices share, or None."""
    box = tuple((max(x, y), min(u, v)) for (x, u), (y, v) in zip(a, b, strict=True))
    return None if any(hi <= lo for lo, hi in box) else box
