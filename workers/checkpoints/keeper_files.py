"""What of a keeper outlives its process, on file in its node's shared memory: its folder, marked as
its actor's; a record beside each part it holds; the drops it was asked for (`LeftHistory`); and the
saves that some host's hand-off failed for (`NOT_WHOLE_FILE`).

Ray restarts a keeper whose process died as the same actor, and the new process takes these over
(`claim`, `read_left`, `take_over`). A keeper the driver starts in place of one it stopped is another
actor: it finds no mark of its own and deletes the folder, since the one it replaces may have missed
a drop. Each file is written whole (`write_whole`: a rename), so a process killed mid-write leaves
either the old file or the new one."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import time

from jaxlaunch.contract import tiers
from jaxlaunch.contract.event_base import first_line
from jaxlaunch.contract.tiers import Held, LeftHistory, Role

log = logging.getLogger(__name__)
LEFT_FILE = "left.json"
"""The drops asked of a keeper, in its folder: a restart of it keeps refusing what they left."""

NOT_WHOLE_FILE = "not_whole.json"
"""The (attempt, step) of saves that are not whole though handed over: a restart keeps not counting them."""
SPARE_PREFIX = "spare-"
"""A dropped part's file, kept for a host to write its next part into (`part_file.PartWriter`)."""

Parts = dict[tuple[int, int, Role], tuple[Held, pathlib.Path]]


def claim(folder: pathlib.Path, actor: str | None, subfolders: tuple[pathlib.Path, ...]) -> None:
    """Makes `folder` this keeper's: kept when it holds the mark of `actor` (Ray's restart of it),
    else emptied first. The replicas an earlier process was receiving are deleted either way: their
    streams died with it, and nobody will ask for them."""
    mark = folder / f".keeper-{actor}" if actor is not None else None
    if mark is None or not mark.exists():
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(folder / "received", ignore_errors=True)
    for sub in subfolders:
        sub.mkdir(parents=True, exist_ok=True)
    if mark is not None:
        mark.touch()  # once the folder is this actor's: a restart of it takes over what it holds


def write_whole(path: pathlib.Path, text: str) -> None:
    """`text` as the file `path`, under a temporary name first, then renamed into place."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text)
        os.rename(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def held_name(held: Held) -> str:
    return f"{held.step}-{held.rank}-{held.role}.part"


def record(held: Held, path: pathlib.Path) -> None:
    """The record of a held part, beside its file: what a restarted keeper takes over."""
    write_whole(path.with_suffix(".json"), json.dumps(held.to_dict()))


def save_left(folder: pathlib.Path, left: list[LeftHistory]) -> None:
    write_whole(folder / LEFT_FILE, json.dumps([dataclasses.asdict(x) for x in left]))


def read_left(folder: pathlib.Path, held_dir: pathlib.Path) -> list[LeftHistory]:
    """The drops an earlier process of this actor was asked for (none in a new folder). When their
    record is unreadable, nothing it ruled on is taken over: the held parts are deleted."""
    try:
        return [LeftHistory(**d) for d in json.loads((folder / LEFT_FILE).read_text())]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError) as err:
        log.warning("the record of the drops asked is unreadable (%s): nothing is taken over", first_line(err))
        shutil.rmtree(held_dir, ignore_errors=True)
        held_dir.mkdir(parents=True, exist_ok=True)
        return []


def take_over(held_dir: pathlib.Path, left: list[LeftHistory]) -> Parts:
    """The parts an earlier process of this actor held (none for a new one): each file whose record
    is whole, whose size matches it and that no drop left. A file without a record (its keeper died
    between the two renames), or one that does not match, was never held, and is deleted."""
    parts: Parts = {}
    for path_of_record in held_dir.glob("*.json"):
        path = path_of_record.with_suffix(".part")
        try:
            held = Held.from_dict(json.loads(path_of_record.read_text()))
            if path.stat().st_size == held.nbytes and path.name == held_name(held) and \
                    not any(drop.holds(held) for drop in left):
                parts[(held.step, held.rank, held.role)] = (held, path)
                continue
        except (OSError, ValueError, TypeError, KeyError) as err:
            log.warning("not taken over: %s (%s)", path_of_record.name, first_line(err))
        path_of_record.unlink(missing_ok=True)
    taken = {path for _, path in parts.values()}
    for path in held_dir.iterdir():
        if path.suffix != ".json" and path not in taken:
            path.unlink(missing_ok=True)  # a record being written (a leftover) or a part never held
    if parts:
        log.info("took over %d part(s) of steps %s from this keeper's earlier process", len(parts),
                 sorted({k[0] for k in parts}))
    return parts


def read_not_whole(folder: pathlib.Path) -> set[tuple[int, int]]:
    try:
        return {(int(a), int(s)) for a, s in json.loads((folder / NOT_WHOLE_FILE).read_text())}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, TypeError) as err:
        log.warning("the record of the saves that are not whole is unreadable (%s)", first_line(err))
        return set()


def save_not_whole(folder: pathlib.Path, marks: set[tuple[int, int]]) -> None:
    write_whole(folder / NOT_WHOLE_FILE, json.dumps(sorted(marks)))


def sweep(incoming: pathlib.Path, received: pathlib.Path, stale_s: float) -> None:
    """Deletes the leftovers of writers that died: a host's part file (whole or not) whose process
    is gone, and a received replica its sender never asked to hold within `stale_s`."""
    import psutil

    for path in incoming.iterdir():
        if path.name.startswith(SPARE_PREFIX):
            continue
        try:
            pid = int(path.name.lstrip(".").split(".")[0].split("-")[-1])
        except ValueError:
            pid = -1
        if not psutil.pid_exists(pid):
            path.unlink(missing_ok=True)
    stale = time.time() - stale_s
    for path in received.iterdir():
        if path.name.startswith("."):
            continue  # still being received: a broken stream deletes its own file
        try:
            if path.stat().st_mtime < stale:
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            continue


TOUCH_EVERY_S = 60.0


class Alive:
    """This keeper's mark in its launch's folder, locked for the process's life (`tiers.hold_alive`) and
    touched at most every TOUCH_EVERY_S when the driver pings it. At start, the folders of other
    launches' keepers on this node that are gone (a driver SIGKILLed on another machine left them) are
    deleted (`tiers.sweep_dead_keepers`)."""

    def __init__(self, launch_folder: pathlib.Path, node: str):
        self.launch_folder, self.node = launch_folder, node
        self.fd = tiers.hold_alive(launch_folder, node)
        self.touched = time.monotonic()
        swept = tiers.sweep_dead_keepers(launch_folder)
        if swept:
            log.info("deleted the memory-tier files of other launches' keepers that are gone: %s", swept)

    def release(self) -> None:
        """The mark deleted, the lock dropped, and the launch's folder removed if nothing else is in it."""
        if self.fd < 0:
            return
        tiers.alive_mark(self.launch_folder, self.node).unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1
        try:
            self.launch_folder.rmdir()
        except OSError:
            pass

    def touch(self) -> None:
        if time.monotonic() - self.touched >= TOUCH_EVERY_S:
            self.touched = time.monotonic()
            with contextlib.suppress(OSError):
                os.utime(tiers.alive_mark(self.launch_folder, self.node))
