"""The run directory's layout, shared by the driver and the hosts: where each record and checkpoint
lives, the records' reader, and the one reader of committed steps.

Plain Python (no Ray, no JAX): the driver checks a run before any cluster starts, and the hosts'
rank 0 lists committed steps with the same function. The directory is a local path or an `s3://` or
`gs://` URL (`jaxlaunch.contract.store`).

    RUN_DIR/config.json  events.jsonl  metrics.jsonl  summary.json  report.png  .lock
            events/<seq>.jsonl  metrics/<seq>.jsonl      (segments: object stores write no appends)
            checkpoints/<step>/  unreadable_checkpoints/<step>-<time>[-unverified]/  hosts/injections/
            tensorboard/
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
from typing import Any

from jaxlaunch.contract.store import LocalStore, Store, is_url, open_store

log = logging.getLogger(__name__)
CHECKPOINT_COMMIT_MARKER = "_CHECKPOINT_METADATA"
OBJECT_STORE_COMMIT_MARKER = "commit_success.txt"
"""Orbax's marker of a step committed in place (no rename on an object store): its COMMIT_SUCCESS_FILE."""
UNREADABLE_DIR = "unreadable_checkpoints"
UNVERIFIED_SUFFIX = "-unverified"
"""Ends the name of a step set aside unread after a replica mismatch (it may hold the corrupt copy):
no history a restore must find, unlike a step that did not read back (the newest state whose
replicas agreed may be a fresh one)."""
LOCK_NAME = ".lock"
INJECTIONS_DIR = "hosts/injections"


def committed_steps(checkpoints: Store | str | os.PathLike, prefix: str = "") -> list[int]:
    """Steps in a checkpoints folder (or under `prefix` of a store) whose save committed, newest
    first. On POSIX, Orbax writes a step into a temporary folder, renames it to the bare step number
    and writes its metadata last; on an object store it writes in place and its commit file last. A
    step without its marker does not exist."""
    store = checkpoints if isinstance(checkpoints, Store) else open_store(checkpoints)
    marker = CHECKPOINT_COMMIT_MARKER if isinstance(store, LocalStore) else OBJECT_STORE_COMMIT_MARKER
    steps = [int(name) for name in store.list(prefix)
             if name.isdigit() and store.exists("/".join(filter(None, (prefix, name, marker))))]
    return sorted(steps, reverse=True)


def parse_jsonl(text: str, where: str) -> list[dict[str, Any]]:
    """The records of JSON lines. A torn line (a writer killed mid-line, a full disk) is skipped
    with a warning rather than losing the whole file."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("%s line %d is torn or not JSON; skipped it", where, number)
            continue
        if not isinstance(record, dict):
            continue
        time = record.get("time", 0.0)
        if isinstance(time, bool) or not isinstance(time, int | float):
            log.warning("%s line %d has a time that is not a number (%r); skipped it", where, number, time)
            continue
        records.append(record)
    return records


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """The records of a local JSON-lines file ([] if there is none)."""
    try:
        return parse_jsonl(path.read_text(errors="replace"), str(path))
    except FileNotFoundError:
        return []


def read_records(store: Store, name: str) -> list[dict[str, Any]]:
    """A record stream in the order written: `NAME.jsonl` (appended on POSIX) and then its segments
    `NAME/<seq>.jsonl` (written whole, on any store), merged."""
    records = []
    for key in [f"{name}.jsonl", *(f"{name}/{s}" for s in store.list(name) if s.endswith(".jsonl"))]:
        try:
            records += parse_jsonl(store.read(key).decode(errors="replace"), store.join(key))
        except FileNotFoundError:
            continue
    return records


def write_json_atomic(path: pathlib.Path, data: Any) -> None:
    """Writes a whole local JSON file so that a reader sees the old or the new one, never half of one."""
    LocalStore(path.parent).write(path.name, json_bytes(data))


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False, default=str) + "\n").encode()


class RunLayout:
    """The names in one run directory. The driver's `RunDir` adds the records and the lock."""

    def __init__(self, path: str | os.PathLike):
        self.store = open_store(path)
        self.is_url = is_url(path)
        self.path: pathlib.Path | str = self.store.url if self.is_url else pathlib.Path(self.store.url)
        """A local run's folder, or a URL."""
        self.checkpoints = self._name("checkpoints")
        """Where Orbax saves: a path or a URL, as Orbax takes it."""
        self.unreadable = self._name(UNREADABLE_DIR)
        self.tensorboard_dir = self._name("tensorboard")
        self.events_path, self.metrics_path, self.summary_path, self.config_path = (
            self._name(n) for n in ("events.jsonl", "metrics.jsonl", "summary.json", "config.json"))
        self.name = self.store.url.rstrip("/").rsplit("/", 1)[-1]
        # What must stay on a local disk (host logs, W&B's files): the run's own folder, or for a
        # URL a folder of this machine named after it (an object store has no appends).
        self.local_dir = (pathlib.Path(tempfile.gettempdir()) / "jaxlaunch-hosts" / _slug(self.store.url)
                          if self.is_url else pathlib.Path(self.store.url))
        self.hosts = self.local_dir / "hosts" if not self.is_url else self.local_dir

    def _name(self, key: str) -> pathlib.Path | str:
        return self.store.join(key) if self.is_url else pathlib.Path(self.store.join(key))

    def host_log(self, attempt: int, rank: int, run: str = "attempt") -> pathlib.Path:
        """A host's log: of an attempt, or of another run of the hosts (`persist`) after attempt N."""
        return self.hosts / f"{run}-{attempt}-rank-{rank}.log"

    def committed_steps(self) -> list[int]:
        return committed_steps(self.store, "checkpoints")

    def record_injection(self, record: dict[str, Any]) -> None:
        """A host's record of a failure it is about to inject: one object each, written whole."""
        key = f"{INJECTIONS_DIR}/attempt-{record['attempt']}-rank-{record['rank']}-step-{record['step']}.json"
        self.store.write(key, json_bytes(record))

    def injections(self) -> list[dict[str, Any]]:
        out = []
        for name in self.store.list(INJECTIONS_DIR):
            try:
                out.append(json.loads(self.store.read(f"{INJECTIONS_DIR}/{name}")))
            except (FileNotFoundError, ValueError):
                continue
        return sorted(out, key=lambda r: r.get("time", 0))


def _slug(url: str) -> str:
    """A folder name for `url`: readable, and with a hash of the whole URL, so that two runs whose URLs
    read alike (s3://b/x_y and s3://b/x/y) never share their host logs."""
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in url)
    return f"{readable}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"
