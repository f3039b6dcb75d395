"""The run directory as the driver keeps it: its records, its settings and its lock (the layout is
`jaxlaunch.contract.layout`, shared with the hosts). Plain Python: the driver checks a run before
any cluster starts."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import socket
import threading
import time
from typing import Any

from jaxlaunch.contract.events import Event
from jaxlaunch.contract.events import parse as parse_event
from jaxlaunch.contract.layout import LOCK_NAME, RunLayout, read_jsonl, write_json_atomic
from jaxlaunch.contract.protocol import ConfigError

log = logging.getLogger(__name__)
LOCK_REFRESH_S = 10.0
LOCK_STALE_S = 60.0
"""A lock not refreshed for this long belongs to a launch that died (on any machine)."""


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: a diverged loss is written as null and said so by name."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value


class RunDir(RunLayout):
    """A run directory as the driver keeps it: its records, its settings and its lock."""

    def __init__(self, path: str | pathlib.Path):
        super().__init__(path)
        self._identity: tuple[int, int] | None = None

    def create(self) -> None:
        self.hosts.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self._identity = self._stat_identity()

    def _stat_identity(self) -> tuple[int, int]:
        info = os.stat(self.path)
        return info.st_dev, info.st_ino

    def check_still_there(self) -> None:
        """FileNotFoundError once the directory this launch created or resumed was deleted (or
        replaced by another one of the same name, as a host's checkpoint save would make)."""
        if self._identity is not None and self._stat_identity() != self._identity:
            raise FileNotFoundError(errno.ENOENT, "the run directory was deleted during the run", str(self.path))

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(p.name != LOCK_NAME for p in self.path.iterdir())

    def is_run(self) -> bool:
        return self.config_path.is_file()

    # -- checkpoints -----------------------------------------------------------------------------
    def has_history(self) -> bool:
        """Whether the run ever committed a step (kept, or set aside as unreadable)."""
        return bool(self.committed_steps()) or (self.unreadable.is_dir() and any(self.unreadable.iterdir()))

    def checkpoint_meta(self, step: int) -> dict[str, Any] | None:
        try:
            return json.loads((self.checkpoints / str(step) / "meta" / "metadata").read_text())
        except (OSError, ValueError):
            return None

    def checkpoint_bytes(self, step: int) -> int:
        return sum(p.stat().st_size for p in (self.checkpoints / str(step)).rglob("*") if p.is_file())

    # -- records ---------------------------------------------------------------------------------
    def _append(self, path: pathlib.Path, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.check_still_there()
        lines = "".join(json.dumps({k: _json_safe(v) for k, v in r.items()}, sort_keys=True) + "\n" for r in records)
        with path.open("a+b") as f:
            # A line torn by an earlier writer must not swallow the first record of this one.
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    lines = "\n" + lines
            f.write(lines.encode())

    def event(self, event: Event) -> None:
        self._append(self.events_path, [event.to_dict()])

    def metrics(self, records: list[dict[str, Any]]) -> None:
        self._append(self.metrics_path, records)

    def events(self) -> list[Event]:
        """The run's events, of every launch, typed (a kind this version does not know is skipped)."""
        return [e for e in map(parse_event, read_jsonl(self.events_path)) if e is not None]

    def metric_records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.summary_path, summary)

    def save_config(self, job_dict: dict[str, Any]) -> None:
        write_json_atomic(self.config_path, job_dict)

    def load_config(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            raise ConfigError(f"{self.config_path} is not valid JSON; restore it from a backup or start a new "
                              f"--run-dir") from None
        return data if isinstance(data, dict) else None

    # -- the lock --------------------------------------------------------------------------------
    def lock(self) -> RunLock:
        return RunLock(self.lock_path)


class RunLock:
    """Held for the life of a launch, so two launches never share a run directory.

    The lock file names its holder (host, pid, start time) and is refreshed every LOCK_REFRESH_S by
    a thread. A second launch is refused with the holder's name, unless the holder is dead: a pid
    gone on this host, or a lock not refreshed for LOCK_STALE_S on any host (shared storage, where a
    pid means nothing). A stale lock is taken over by renaming it away first, which only one of
    several racing launches can do."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.token = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict[str, Any] | None = None

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # being written, or torn: judged by its age alone

    def _holder_dead(self, holder: dict[str, Any]) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if age > LOCK_STALE_S:
            return True
        if holder.get("host") == socket.gethostname() and holder.get("pid"):
            return not _process_alive(holder["pid"], holder.get("process_started"))
        return False

    def acquire(self) -> None:
        import psutil

        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "token": self.token,
              "process_started": psutil.Process().create_time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue
                if not self._holder_dead(holder):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
                    raise ConfigError(
                        f"run directory {self.path.parent} is in use by the launch of pid {holder.get('pid')} on "
                        f"{holder.get('host')} since {since}; wait for it to end, or choose another --run-dir"
                    ) from None
                stale = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
                with contextlib.suppress(FileNotFoundError):  # another launch took it over first
                    os.rename(self.path, stale)
                    stale.unlink()
                    self.took_over = holder
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._refresh, name="run-lock", daemon=True)
            self._thread.start()
            return
        raise ConfigError(f"run directory {self.path.parent}: could not take its lock {self.path}; "
                          f"another launch keeps taking it")

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        holder = self.holder()
        if holder and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _process_alive(pid: int, started: float | None) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
