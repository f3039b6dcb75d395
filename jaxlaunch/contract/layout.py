"""The run directory's layout, shared by the driver and the hosts: where each record and checkpoint
lives, and the one reader of committed steps.

Plain Python (no Ray, no JAX): the driver checks a run before any cluster starts, and the hosts'
rank 0 lists committed steps with the same function.

    RUN_DIR/config.json  events.jsonl  metrics.jsonl  summary.json  report.png  .lock
            checkpoints/<step>/  unreadable_checkpoints/<step>-<time>/  hosts/  tensorboard/
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

log = logging.getLogger(__name__)
CHECKPOINT_COMMIT_MARKER = "_CHECKPOINT_METADATA"
UNREADABLE_DIR = "unreadable_checkpoints"
LOCK_NAME = ".lock"


def committed_steps(checkpoints: pathlib.Path) -> list[int]:
    """Steps whose save committed, newest first. Orbax writes a step into a temporary folder, renames
    it to the bare step number and writes its metadata last; a step without it does not exist."""
    if not checkpoints.is_dir():
        return []
    steps = [int(p.name) for p in checkpoints.iterdir()
             if p.name.isdigit() and (p / CHECKPOINT_COMMIT_MARKER).exists()]
    return sorted(steps, reverse=True)


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A torn line (a writer killed mid-line, a full disk) is
    skipped with a warning rather than losing the whole file."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("%s line %d is torn or not JSON; skipped it", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_json_atomic(path: pathlib.Path, data: Any) -> None:
    """Writes a whole JSON file so that a reader sees the old or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, allow_nan=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLayout:
    """The paths of one run directory. The driver's `RunDir` adds the records and the lock."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path).absolute()
        self.checkpoints = self.path / "checkpoints"
        self.unreadable = self.path / UNREADABLE_DIR
        self.hosts = self.path / "hosts"
        self.metrics_path = self.path / "metrics.jsonl"
        self.events_path = self.path / "events.jsonl"
        self.summary_path = self.path / "summary.json"
        self.config_path = self.path / "config.json"
        self.tensorboard_dir = self.path / "tensorboard"
        self.injections_path = self.hosts / "injections.jsonl"
        self.lock_path = self.path / LOCK_NAME

    def host_log(self, attempt: int, rank: int) -> pathlib.Path:
        return self.hosts / f"attempt-{attempt}-rank-{rank}.log"

    def committed_steps(self) -> list[int]:
        return committed_steps(self.checkpoints)
