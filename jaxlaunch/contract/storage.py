"""Storage errors of a run directory (full, over quota, read-only, gone), told apart from others and
described in one line: which filesystem, how much is free, what a checkpoint needs. Plain Python:
the hosts' checkpointer and the driver's records both use it."""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import shutil
from collections.abc import Iterator

from jaxlaunch.contract.store import is_url

STORAGE_ERRNOS = {errno.ENOSPC: "the filesystem is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the filesystem is read-only", errno.ENOENT: "the run directory is gone"}
_STORAGE_TEXT = {"no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
                 "read-only file system": errno.EROFS}


class RunStorageError(RuntimeError):
    """The driver could not write the run directory's records (full, read-only, gone): exit code 1."""


def chain(err: BaseException) -> Iterator[BaseException]:
    """An exception and its causes and contexts."""
    seen = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def storage_errno(err: BaseException) -> int | None:
    """The errno of a storage failure (full, read-only, gone) anywhere in the exception's chain;
    TensorStore reports these as text inside other exception types."""
    for e in chain(err):
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e.errno
        text = str(e).lower()
        for marker, code in _STORAGE_TEXT.items():
            if marker in text:
                return code
    return None


def describe_storage_error(directory: pathlib.Path | str, code: int, checkpoint_bytes: int | None) -> str:
    """One line: what happened, on which filesystem, its free space, and the size of a checkpoint."""
    size = f"; one checkpoint needs about {checkpoint_bytes / 1e6:,.0f} MB" if checkpoint_bytes else ""
    if is_url(directory):
        return f"{STORAGE_ERRNOS[code]} ({os.strerror(code)}): {directory}{size}"
    directory = pathlib.Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), pathlib.Path("/"))
    try:
        usage = shutil.disk_usage(existing)
        space = f"{usage.free / 1e6:,.0f} MB free of {usage.total / 1e6:,.0f} MB"
    except OSError:
        space = "free space unknown"
    mount = mount_point(existing)
    return f"{STORAGE_ERRNOS[code]} ({os.strerror(code)}): {directory} on {mount}, {space}{size}"


def mount_point(path: pathlib.Path) -> str:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


def free_bytes(directory: pathlib.Path | str) -> int | None:
    """Free bytes where a directory is (or would be); None where unknown, as on an object store."""
    if is_url(directory):
        return None
    directory = pathlib.Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    try:
        return shutil.disk_usage(existing).free if existing else None
    except OSError:
        return None




@dataclasses.dataclass(frozen=True)
class ShortOfSpace:
    """The run directory's filesystem cannot hold the checkpoints a run keeps (a warning, recorded
    as a `low_disk_space` event with these fields)."""

    free_bytes: int
    needed_bytes: int
    checkpoints: int
    """How many checkpoints must fit: those kept, and the one being written."""
    message: str


def short_of_space(directory: pathlib.Path | str, checkpoint_bytes: int, checkpoints: int) -> ShortOfSpace | None:
    """Whether `checkpoints` checkpoints of `checkpoint_bytes` fit in what `directory`'s filesystem
    has free (None: they fit, or the free space cannot be known)."""
    free, needed = free_bytes(directory), checkpoint_bytes * checkpoints
    if free is None or free >= needed:
        return None
    return ShortOfSpace(free, needed, checkpoints, f"{directory} has {free / 1e6:,.0f} MB free; {checkpoints} "
                                                   f"checkpoints of about {checkpoint_bytes / 1e6:,.0f} MB need "
                                                   f"{needed / 1e6:,.0f} MB")
