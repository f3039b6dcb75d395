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

import contextlib
import dataclasses
import mmap
import os
import pathlib
import pickle
import struct
import threading
from typing import Any

import numpy as np
from jaxlaunch.workers.checkpoints.keeper_files import SPARE_PREFIX

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
    """xxh3-64 (hex) of a whole part file, header and shards: about 20 GB/s, so a 60 MB part in 3 ms."""
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

    def write(self, directory: pathlib.Path, name: str, tree: Any, meta: dict[str, Any],
              extra: dict[str, Any], structure: bytes | None = None) -> PartHeader:
        """Writes this host's part of `tree` (its addressable shards, each global index once, and
        every other leaf) to `directory/name`. Returns once the file is whole: the next step may
        overwrite or donate the device buffers."""
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if self.plan is None or not self.plan.fits(leaves, treedef):
            self.plan = PartPlan.of(tree)
        header, self.copied_bytes, self.file_bytes = _write(directory, name, leaves, self.plan, meta, extra,
                                                            structure, self.maps)
        return header

    def release_deleted(self) -> None:
        """Lets go of the files the keeper deleted since (`FileMaps`): their pages are free again."""
        self.maps.release_deleted()

    def close(self) -> None:
        self.maps.close()


def _write(directory: pathlib.Path, name: str, leaves: list[Any], plan: PartPlan, meta: dict[str, Any],
           extra: dict[str, Any], structure: bytes | None, maps: FileMaps) -> tuple[PartHeader, int, int]:
    """The part written; the bytes of its shards copied on the way (the file's, and a host copy for
    each shard whose bytes the write could not read in place, told by the buffers' addresses); the
    file's size."""
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
        _claim_spare(directory, temporary, prefer=maps.inodes())
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
                maps.written()
            finally:
                os.close(fd)
        os.rename(temporary, directory / name)
    except BaseException:
        # A full tmpfs or a shard that would not convert: no part-sized leftover under a new name each step.
        temporary.unlink(missing_ok=True)
        maps.release_deleted()
        raise
    return header, copied, total


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


class FileMaps:
    """The part files this host wrote, kept open while they live, and mapped once written again. The
    keeper turns a dropped part's file into a spare (a rename), and a host takes the spares it wrote
    before first (`_claim_spare`), so that in the steady state a save copies into pages this process
    has mapped already: 60 MB in 6.3 ms here, against 15-16 ms through `write` into the same
    allocated pages or through a new mapping of them (setting up 15,000 page table entries is most of
    the cost), and 30 ms into a new file. A file's first write of this host goes by `pwrite`; its
    second makes the mapping (as dear as a `pwrite`), kept for the later ones.

    A file is mapped only with all its pages allocated (`posix_fallocate`, which fails with ENOSPC on
    a full tmpfs, where touching a hole in a mapping would kill the process with SIGBUS), and mapped
    again when its size changed (another host's part, or a header a quantum longer: `file_size`
    rounds large parts' sizes so that this is rare). An open file keeps its pages after the keeper deleted it
    (link count 0): those are let go at the end of each hand-off, at the next write before it claims
    a file, and at `close` (never the file being written); at most `MAX_MAPS` files are kept."""

    MAX_MAPS = 8

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int], tuple[int, int, mmap.mmap | None]] = {}
        """(device, inode) -> (an open descriptor of the file, its size when written, its mapping once made)."""
        self._lock = threading.Lock()
        """The training thread writes; the hand-off thread lets go of what the keeper deleted meanwhile."""
        self._writing: tuple[int, int] | None = None
        """The file being written now: never let go under the write (a keeper that emptied its folder
        deletes it), which would unmap the pages being copied into."""

    def inodes(self) -> set[tuple[int, int]]:
        with self._lock:
            return set(self._maps)

    def writable(self, fd: int, size: int) -> mmap.mmap | None:
        """A writable mapping of the open file `fd`, made `size` bytes long, when this host wrote the
        file before: the mapping kept for it, or a new one when the file has another size now. Else
        None: the file is made `size` bytes long, to be written by `pwrite` (mapping it would cost
        more than that), and kept, to be mapped when this host claims it again. What fails (ENOSPC)
        leaves nothing of the file kept."""
        stat = os.fstat(fd)
        key = (stat.st_dev, stat.st_ino)
        with self._lock:
            kept = self._maps.pop(key, None)
            try:
                if kept is not None and kept[2] is not None and kept[1] == size == stat.st_size:
                    mapping: mmap.mmap | None = kept[2]
                    if stat.st_blocks * 512 < size:  # holes: another host made the file this size, writing less
                        os.posix_fallocate(fd, 0, size)
                elif kept is not None:
                    if kept[2] is not None:
                        _unmap(kept[2])
                        kept = (kept[0], kept[1], None)
                    if stat.st_size != size:
                        os.ftruncate(fd, size)
                    os.posix_fallocate(fd, 0, size)  # every page there, whoever wrote the file last
                    mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
                else:
                    if stat.st_size != size:
                        os.ftruncate(fd, size)
                    mapping = None
                    kept = (os.dup(fd), size, None)
            except BaseException:
                if kept is not None:
                    self._close(kept)
                raise
            self._maps[key] = (kept[0], size, mapping)  # the newest used last
            self._writing = key
            while len(self._maps) > self.MAX_MAPS:
                self._close(self._maps.pop(next(iter(self._maps))))
        return mapping

    def written(self) -> None:
        """The file `writable` gave is written (or its write failed)."""
        with self._lock:
            self._writing = None

    def release_deleted(self) -> None:
        with self._lock:
            for key, (fd, _, _) in list(self._maps.items()):
                if key == self._writing:
                    continue
                try:
                    gone = os.fstat(fd).st_nlink == 0
                except OSError:
                    gone = True
                if gone:
                    self._close(self._maps.pop(key))

    @staticmethod
    def _close(kept: tuple[int, int, mmap.mmap | None]) -> None:
        if kept[2] is not None:
            _unmap(kept[2])
        os.close(kept[0])

    def close(self) -> None:
        with self._lock:
            while self._maps:
                self._close(self._maps.popitem()[1])


def _unmap(mapping: mmap.mmap) -> None:
    with contextlib.suppress(BufferError):  # a view still held: unmapped once it goes
        mapping.close()


def _in_place(shard: Any, host: np.ndarray) -> bool:
    """Whether `host` is the shard's own buffer (a CPU array read in place), not a copy of it."""
    try:
        return bool(shard.unsafe_buffer_pointer() == host.__array_interface__["data"][0])
    except Exception:  # noqa: BLE001 - a buffer without a host address (an accelerator's): a copy
        return False


def _claim_spare(directory: pathlib.Path, temporary: pathlib.Path, prefer: set[tuple[int, int]]) -> None:
    """Takes one of the keeper's spare files (a dropped part's) as `temporary`, one whose (device,
    inode) is in `prefer` first (a file this host has mapped): a rename, atomic, so two hosts never
    take the same one. None left: the write makes a new file."""
    spares = []
    for spare in directory.glob(f"{SPARE_PREFIX}*"):
        try:
            stat = spare.stat()
        except FileNotFoundError:
            continue  # another host took it
        spares.append(((stat.st_dev, stat.st_ino) not in prefer, spare))
    for _, spare in sorted(spares, key=lambda s: s[0]):
        try:
            os.rename(spare, temporary)
            return
        except FileNotFoundError:
            continue  # another host took it


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
