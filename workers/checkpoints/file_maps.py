"""The part files one host wrote, kept open and mapped (`FileMaps`), and the keeper's spare files a
host writes its next part into (`claim_spare`): what makes a memory save's one copy go into pages
the host has mapped already (`jaxlaunch.workers.checkpoints.part_file` writes the part)."""

from __future__ import annotations

import contextlib
import mmap
import os
import pathlib
import threading

from jaxlaunch.workers.checkpoints.keeper_files import SPARE_PREFIX


class FileMaps:
    """The part files this host wrote, kept open while they live, and mapped once written again. The
    keeper turns a dropped part's file into a spare (a rename), and a host takes the spares it wrote
    before first (`claim_spare`), so that in the steady state a save copies into pages this process
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

    def written(self) -> tuple[int, int] | None:
        """The file `writable` gave is written (or its write failed): its (device, inode)."""
        with self._lock:
            key, self._writing = self._writing, None
        return key

    def digest(self, key: tuple[int, int]) -> str | None:
        """`part_file.digest` of the kept file `key` through its mapping, or None if it has none. Under the lock,
        so that no thread lets go of the mapping meanwhile (2.4-3.0 ms for 60 MB; xxhash lets go of the
        GIL)."""
        import xxhash

        with self._lock:
            kept = self._maps.get(key)
            if kept is None or kept[2] is None:
                return None
            return xxhash.xxh3_64_hexdigest(kept[2])

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


def claim_spare(directory: pathlib.Path, temporary: pathlib.Path, prefer: set[tuple[int, int]]) -> None:
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
