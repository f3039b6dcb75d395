"""The run directory as the driver keeps it: its records, its settings and its lock (the layout is
`jaxlaunch.contract.layout`, shared with the hosts). Plain Python: the driver checks a run before
any cluster starts."""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from jaxlaunch.contract.events import Event, parse_event
from jaxlaunch.contract.layout import (
    LOCK_NAME,
    UNREADABLE_DIR,
    UNVERIFIED_SUFFIX,
    RunLayout,
    json_bytes,
    read_records,
)
from jaxlaunch.contract.protocol import ConfigError
from jaxlaunch.contract.storage import RunStorageError
from jaxlaunch.contract.store import LocalStore, Store

log = logging.getLogger(__name__)
LOCK_REFRESH_S = 10.0
LOCK_STALE_S = 60.0
"""A lock not refreshed for this long belongs to a launch that died (on any machine)."""
SEGMENT_EVERY_S = 5.0
"""On an object store, metrics wait this long at most before they are written as a segment: a crash
of the driver loses at most this much of them (and the checkpoints carry those records anyway)."""
EVENTS, METRICS = "events", "metrics"


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: a diverged loss is written as null and said so by name."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value


def _lines(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps({k: _json_safe(v) for k, v in r.items()}, sort_keys=True) + "\n"
                   for r in records).encode()


class RecordLog:
    """One stream of records (events or metrics). On POSIX each batch is appended to `NAME.jsonl` at
    once, as always; an object store has no appends, so batches are gathered and written as whole
    numbered segments `NAME/<seq>.jsonl`, at least every `every_s` and on every `flush()`. Sequence
    numbers continue across launches (one launch at a time holds the run's lock)."""

    def __init__(self, store: Store, name: str, every_s: float, clock: Callable[[], float] = time.monotonic):
        self.store, self.name, self.every_s, self.clock = store, name, every_s, clock
        self.pending: list[dict[str, Any]] = []
        self.next_seq: int | None = None
        self.last_flush = clock()

    def add(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        if isinstance(self.store, LocalStore):
            self.store.append(f"{self.name}.jsonl", _lines(records))
            return
        self.pending += records
        if self.clock() - self.last_flush >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self.last_flush = self.clock()
        if not self.pending:
            return
        if self.next_seq is None:
            taken = [int(n.split(".")[0]) for n in self.store.list(self.name) if n.split(".")[0].isdigit()]
            self.next_seq = max(taken, default=-1) + 1
        self.store.write(f"{self.name}/{self.next_seq:08d}.jsonl", _lines(self.pending))
        self.next_seq += 1
        self.pending = []


class RunDir(RunLayout):
    """A run directory as the driver keeps it: its records, its settings and its lock."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._identity: tuple[int, int] | None = None
        self._events = RecordLog(self.store, EVENTS, 0.0)
        self._metrics = RecordLog(self.store, METRICS, SEGMENT_EVERY_S)

    def create(self) -> None:
        if self.is_url:
            return  # an object store has no folders to make, nor a folder's identity to watch
        self.hosts.mkdir(parents=True, exist_ok=True)
        pathlib.Path(self.checkpoints).mkdir(parents=True, exist_ok=True)
        self._identity = self._stat_identity()

    def _stat_identity(self) -> tuple[int, int]:
        info = os.stat(self.path)
        return info.st_dev, info.st_ino

    def check_still_there(self) -> None:
        """FileNotFoundError once the directory this launch created or resumed was deleted (or
        replaced by another one of the same name, as a host's checkpoint save would make)."""
        if self._identity is not None and self._stat_identity() != self._identity:
            raise FileNotFoundError(errno.ENOENT, "the run directory was deleted during the run", str(self.path))

    def exists(self) -> bool:
        return self.store.exists("")

    def is_empty(self) -> bool:
        return not any(name != LOCK_NAME for name in self.store.list())

    def is_run(self) -> bool:
        return self.store.exists("config.json")

    def has_records(self) -> bool:
        return self.store.exists(f"{EVENTS}.jsonl") or bool(self.store.list(EVENTS))

    # -- checkpoints -----------------------------------------------------------------------------
    def has_history(self) -> bool:
        """Whether the run holds a committed step a restore must find: kept, or set aside because it did
        not read back. Steps set aside unread after a replica mismatch are not (their run's newest state
        whose replicas agreed may be a fresh one)."""
        return bool(self.committed_steps()) or any(not name.endswith(UNVERIFIED_SUFFIX)
                                                   for name in self.store.list(UNREADABLE_DIR))

    def checkpoint_meta(self, step: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read(f"checkpoints/{step}/meta/metadata"))
        except (OSError, ValueError):
            return None

    def checkpoint_bytes(self, step: int) -> int:
        return self.store.size(f"checkpoints/{step}")

    # -- records ---------------------------------------------------------------------------------
    def event(self, event: Event) -> None:
        """Records an event; on an object store, with the metrics gathered so far, in one go."""
        self.check_still_there()
        self._metrics.flush()
        self._events.add([event.to_dict()])
        self._events.flush()

    def metrics(self, records: list[dict[str, Any]]) -> None:
        if records:
            self.check_still_there()
        self._metrics.add(records)

    def flush(self) -> None:
        """Writes what is gathered (an attempt's end, the launch's end)."""
        self._metrics.flush()
        self._events.flush()

    def events(self) -> list[Event]:
        """The run's events, of every launch, typed (a kind this version does not know is skipped)."""
        return [e for e in map(parse_event, read_records(self.store, EVENTS)) if e is not None]

    def metric_records(self) -> list[dict[str, Any]]:
        return read_records(self.store, METRICS)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.store.write("summary.json", json_bytes(summary))

    def write_object(self, name: str, data: bytes) -> pathlib.Path | str:
        """A whole file of the run (report.png): where it went, as a path or URL."""
        self.store.write(name, data)
        return self._name(name)

    def save_config(self, job_dict: dict[str, Any]) -> None:
        self.store.write("config.json", json_bytes(job_dict))

    def load_config(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.store.read("config.json"))
        except FileNotFoundError:
            return None
        except (ValueError, IsADirectoryError) as err:
            what = "is not valid JSON" if isinstance(err, ValueError) else "is a folder"
            raise ConfigError(f"{self.store.join('config.json')} {what}; restore it from a backup or "
                              f"start a new --run-dir") from None
        except OSError as err:  # permissions, the store's network: nothing wrong with the run itself
            raise ConfigError(f"{self.store.join('config.json')} cannot be read ({err.strerror or err}); check "
                              f"that this machine may read the run directory, then resume again") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.store.join('config.json')} holds {type(data).__name__}, not a run's settings; "
                              f"restore it from a backup or start a new --run-dir")
        return data

    # -- the lock --------------------------------------------------------------------------------
    def lock(self) -> RunLock:
        return RunLock(self.store)


class RunLockLost(RunStorageError):
    """Another launch took this launch's run directory: its lock's refreshes failed for LOCK_STALE_S."""


class RunLock:
    """Held for the life of a launch, so two launches never share a run directory.

    The lock is an object created only if none exists (a hard link on POSIX, the object store's
    conditional create), naming its holder (host, pid, start time); a thread rewrites it every
    LOCK_REFRESH_S. A second launch is refused with the holder's name, unless the holder is dead: its
    pid gone on this host (a live one keeps its lock however old: a stopped or sleeping launch), or,
    from another host, a lock not refreshed for LOCK_STALE_S (shared storage, where a pid means
    nothing). A stale lock is taken over by one launch only: it must first create a takeover object
    named after that holder (one of several racing launches can), then find the lock still the very one
    it judged dead before it deletes it; a takeover object its maker left (it died mid-takeover) is
    passed over once stale. A launch whose lock another took (its refreshes failed for LOCK_STALE_S)
    finds out at its next refresh, writes nothing over the new holder's, and `check` raises RunLockLost."""

    def __init__(self, store: Store):
        self.store = store
        self.token = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._me: bytes = b""
        self.took_over: dict[str, Any] | None = None
        self.lost: dict[str, Any] | None = None
        """Who holds the lock now, once this launch found it taken ({} when it was deleted; None while held)."""

    def check(self) -> None:
        """RunLockLost once another launch took the lock: this launch must stop at once, writing nothing more."""
        if self.lost is None:
            return
        who = (f"taken by the launch of pid {self.lost.get('pid')} on {self.lost.get('host')}" if self.lost.get("pid")
               else "deleted")
        raise RunLockLost(f"the lock of run directory {self.store.url} was {who} (this launch's refreshes of it failed "
                          f"for {LOCK_STALE_S:.0f} s): this launch stopped at once, saving and writing nothing more")

    def _read(self) -> bytes | None:
        try:
            return self.store.read(LOCK_NAME)
        except FileNotFoundError:
            return None

    def holder(self) -> dict[str, Any] | None:
        raw = self._read()
        return None if raw is None else _parsed(raw)

    def _holder_dead(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname() and holder.get("pid"):
            return not _process_alive(holder["pid"], holder.get("process_started"))
        written = self.store.modified(LOCK_NAME)
        return written is None or time.time() - written > LOCK_STALE_S

    def acquire(self) -> None:
        import psutil

        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "token": self.token,
              "process_started": psutil.Process().create_time()}
        self._me = json.dumps(me).encode()
        for _ in range(3):
            if self.store.create(LOCK_NAME, self._me):
                self._thread = threading.Thread(target=self._refresh, name="run-lock", daemon=True)
                self._thread.start()
                return
            raw = self._read()
            if raw is None:
                continue
            holder = _parsed(raw)
            if not self._holder_dead(holder):
                raise ConfigError(_in_use(self.store.url, holder, self.store.modified(LOCK_NAME)))
            self._take_over(raw, holder)
        raise ConfigError(f"run directory {self.store.url}: could not take its lock {self.store.join(LOCK_NAME)}; "
                          f"another launch keeps taking it")

    def _take_over(self, raw: bytes, holder: dict[str, Any]) -> None:
        """Deletes the dead holder's lock `raw` if this launch wins the right to (then `acquire` creates its own)."""
        prefix = f"{LOCK_NAME}.takeover-{holder.get('token', 'unknown')}"
        for k in range(8):
            takeover = prefix if k == 0 else f"{prefix}-{k}"
            if self.store.create(takeover, self._me):
                break
            made = self.store.modified(takeover)
            if made is not None and time.time() - made <= LOCK_STALE_S:
                return  # another launch is taking it over now: its new lock decides
        else:
            return
        try:
            # Still the lock judged dead, and still dead: no other launch's lock is ever deleted.
            if self._read() == raw and self._holder_dead(holder):
                self.store.delete(LOCK_NAME)
                self.took_over = holder
                for name in self.store.list():
                    if name.startswith(prefix) and name != takeover:
                        self.store.delete(name)  # left by launches that died mid-takeover of this lock
        finally:
            self.store.delete(takeover)

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            try:
                raw = self._read()
                if raw != self._me:  # taken by a launch that judged this one dead, or deleted
                    self.lost = _parsed(raw) if raw is not None else {}
                    log.error("the lock of run directory %s was taken: %s", self.store.url, self.lost)
                    return
                if isinstance(self.store, LocalStore):
                    self.store.touch(LOCK_NAME)
                else:
                    self.store.write(LOCK_NAME, self._me)
            except Exception as err:  # noqa: BLE001 - storage hiccups: the next refresh tries again
                log.warning("refreshing the run directory's lock failed: %s", err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(LOCK_REFRESH_S)  # a refresh in flight must not write the lock back after this
        if self._read() == self._me:
            self.store.delete(LOCK_NAME)


def _parsed(raw: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(raw)
    except ValueError:
        return {}  # torn, or not a lock: judged by its age alone
    return holder if isinstance(holder, dict) else {}


def _in_use(url: str, holder: dict[str, Any], written: float | None) -> str:
    if not holder.get("pid"):
        age = f"{time.time() - written:.0f} s ago" if written is not None else "just now"
        return (f"run directory {url} has a lock that names no launch (written {age}); it counts as a dead "
                f"launch's {LOCK_STALE_S:.0f} s after that: try again then, or choose another --run-dir")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (f"run directory {url} is in use by the launch of pid {holder.get('pid')} on {holder.get('host')} "
            f"since {since}; wait for it to end, or choose another --run-dir")


def _process_alive(pid: int, started: float | None) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
