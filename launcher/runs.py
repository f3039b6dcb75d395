"""The run directory: checkpoints, metrics.jsonl, events.jsonl, host logs, config and summary.

Read and written by the driver only (host processes write checkpoints and their own logs); nothing
here imports JAX, so resume checks run before any cluster starts."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

from launcher.config import ConfigError, JobConfig, dumps, from_json

CHECKPOINT_COMMIT_MARKER = "_CHECKPOINT_METADATA"
TENSORBOARD_SCALARS = ("loss", "learning_rate", "step_time_s", "tokens_per_s", "checkpoint_blocking_s")


class RunDir:
    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path).absolute()
        self.checkpoints = self.path / "checkpoints"
        self.hosts = self.path / "hosts"
        self.metrics_path = self.path / "metrics.jsonl"
        self.events_path = self.path / "events.jsonl"
        self.summary_path = self.path / "summary.json"
        self.config_path = self.path / "config.json"
        self.tensorboard_dir = self.path / "tensorboard"
        self._tensorboard = None

    def host_log(self, attempt: int, rank: int) -> pathlib.Path:
        return self.hosts / f"attempt-{attempt}-rank-{rank}.log"

    def create(self) -> None:
        self.hosts.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def is_used(self) -> bool:
        return self.path.exists() and any(self.path.iterdir())

    # -- checkpoints -----------------------------------------------------------------------------
    def committed_steps(self) -> list[int]:
        """Steps whose save committed (Orbax renames a finished step's folder to its bare number and
        writes its metadata last), newest first."""
        if not self.checkpoints.is_dir():
            return []
        steps = [
            int(p.name) for p in self.checkpoints.iterdir()
            if p.is_dir() and p.name.isdigit() and (p / CHECKPOINT_COMMIT_MARKER).exists()
        ]
        return sorted(steps, reverse=True)

    def checkpoint_meta(self, step: int) -> dict[str, Any] | None:
        try:
            return json.loads((self.checkpoints / str(step) / "meta" / "metadata").read_text())
        except (OSError, ValueError):
            return None

    # -- records ---------------------------------------------------------------------------------
    def _append(self, path: pathlib.Path, records: list[dict[str, Any]]) -> None:
        if records:
            with path.open("a") as f:
                for record in records:
                    f.write(json.dumps(record, sort_keys=True) + "\n")

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"event": kind, "time": fields.pop("time", time.time()), **fields}
        self._append(self.events_path, [record])
        return record

    def metrics(self, records: list[dict[str, Any]]) -> None:
        self._append(self.metrics_path, records)
        if records:
            if self._tensorboard is None:
                from tensorboardX import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.tensorboard_dir), flush_secs=10)
            for record in records:
                for key in TENSORBOARD_SCALARS:
                    if key in record:
                        self._tensorboard.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def read_jsonl(self, path: pathlib.Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def save_config(self, job: JobConfig) -> None:
        self.config_path.write_text(dumps(job) + "\n")

    def load_config(self) -> JobConfig | None:
        if not self.config_path.exists():
            return None
        return from_json(json.loads(self.config_path.read_text()))


def check_run_dir(job: JobConfig, run: RunDir) -> None:
    """Refuses a launch that would overwrite a run, or resume checkpoints of another model."""
    if not job.resume:
        if run.is_used():
            raise ConfigError(
                f"run directory {run.path} is not empty: pass --resume to continue it, or choose another --run-dir"
            )
        return
    if not run.path.is_dir():
        raise ConfigError(f"--resume: run directory {run.path} does not exist (check --run-dir)")
    steps = run.committed_steps()
    if not steps:
        return
    meta = run.checkpoint_meta(steps[0])
    if meta is None:
        return  # unreadable metadata: the hosts fall back to an older step or refuse
    wanted = dataclasses.asdict(job.train.model_config())
    if meta.get("model") != wanted:
        saved = meta.get("model_preset", "?")
        diff = sorted(k for k in wanted if meta.get("model", {}).get(k) != wanted[k])
        raise ConfigError(
            f"--resume: the checkpoints in {run.checkpoints} hold model {saved!r}, not {job.train.model!r} "
            f"(differs in {', '.join(diff)}); pass --model {saved} or choose another --run-dir. "
            f"The checkpoints are kept."
        )
