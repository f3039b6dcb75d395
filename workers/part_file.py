"""One host's part of one memory-tier save, as one file in node-local shared memory: written once
from the device buffers (on CPU, `np.asarray` of a shard is a view of its buffer, so the write is
the only copy), owned from then on by the node's keeper, read back by mapping it.

The file is a small header (the typed `PartHeader`: arrays, shard entries with their byte offsets,
and the non-array state) and the shards' bytes, each at a 64-byte aligned offset. It is written
under a temporary name and renamed, so a file under its final name is whole: a host killed
mid-write leaves only a temporary file, which its keeper deletes.

JAX is imported only where a host writes a part: the keeper, and the driver that names its class,
read part files without loading it."""

from __future__ import annotations

import dataclasses
import mmap
import os
import pathlib
import pickle
import struct
from typing import Any

import numpy as np

Index = tuple[tuple[int, int], ...]
"""A shard's global index: (start, stop) per dimension."""
MAGIC = b"JLPART1\0"
_PREAMBLE = struct.Struct("<8sQ")
ALIGN = 64

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
    """The state's pytree structure, pickled (`jaxlaunch.workers.persist` rebuilds the tree from it
    without the user's `init`); None when it could not be pickled."""

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def array(self, path: str) -> ArrayEntry:
        return next(a for a in self.arrays if a.path == path)


@dataclasses.dataclass(frozen=True)
class Copies:
    """The copies of one host's part of one save, counted where they happen."""

    nbytes: int
    """The part's bytes."""
    written: int = 0
    """Into the saving node's shared memory (the host's write): the one copy on its own node."""
    sent: int = 0
    """From the saving node to the replica's node (the network)."""
    received: int = 0
    """Into the replica node's shared memory."""

    @property
    def total(self) -> int:
        return self.written + self.sent + self.received

    @property
    def on_own_node(self) -> int:
        """Copies made on the saving node. A send is `sendfile` from the file's pages to the socket
        (no copy in the keeper's memory), counted as the network copy, not here."""
        return self.written

    def to_record(self) -> dict[str, int]:
        return {"memory_copies": self.total, "memory_copies_on_node": self.on_own_node,
                "memory_bytes": self.nbytes * self.total, "memory_part_bytes": self.nbytes}


def normal(index: tuple[slice, ...], shape: tuple[int, ...]) -> Index:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def is_key(x: Any) -> bool:
    import jax

    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def write_part(directory: pathlib.Path, name: str, tree: Any, meta: dict[str, Any],
               extra: dict[str, Any], structure: bytes | None = None) -> PartHeader:
    """Writes this host's part of `tree` (its addressable shards, each global index once, and every
    other leaf) to `directory/name`. Returns once the file is whole: the next step may overwrite or
    donate the device buffers."""
    import jax

    arrays, plain, live = [], {}, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(path)
        if not isinstance(leaf, jax.Array):
            plain[key] = leaf
            continue
        data = jax.random.key_data(leaf) if is_key(leaf) else leaf
        arrays.append(ArrayEntry(key, tuple(data.shape), str(data.dtype),
                                 str(jax.random.key_impl(leaf)) if is_key(leaf) else None))
        seen = set()
        for shard in data.addressable_shards:
            index = normal(shard.index, data.shape)
            if index not in seen:
                seen.add(index)
                shard.data.copy_to_host_async()  # a no-op on CPU; on an accelerator all transfers overlap
                live.append((key, index, shard.data))
    entries, offset = [], 0
    for key, index, value in live:
        entries.append(ShardEntry(key, index, offset, int(value.nbytes)))
        offset += _aligned(int(value.nbytes))
    header = PartHeader(tuple(arrays), tuple(entries), plain, meta, extra, structure)
    blob = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    start = _aligned(_PREAMBLE.size + len(blob))
    temporary = directory / f".{name}.tmp"
    try:
        with open(temporary, "r+b" if _claim_spare(directory, temporary) else "wb") as f:
            f.write(_PREAMBLE.pack(MAGIC, len(blob)) + blob)
            for entry, (_, _, value) in zip(entries, live, strict=True):
                f.seek(start + entry.offset)
                # A view of the buffer on CPU (a host copy on an accelerator): the write is the copy.
                f.write(np.ascontiguousarray(np.asarray(value)).reshape(-1).view(np.uint8).data)
            f.truncate(start + offset)
        os.rename(temporary, directory / name)
    except BaseException:
        # A full tmpfs or a shard that would not convert: no part-sized leftover under a new name each step.
        temporary.unlink(missing_ok=True)
        raise
    return header


def _claim_spare(directory: pathlib.Path, temporary: pathlib.Path) -> bool:
    """Takes one of the keeper's spare files (a dropped part's) as `temporary`: a rename, atomic, so
    two hosts never take the same one."""
    for spare in directory.glob("spare-*"):
        try:
            os.rename(spare, temporary)
            return True
        except FileNotFoundError:
            continue  # another host took it
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
