"""Orbax checkpoints: coordinated asynchronous saves of the train state plus JSON run metadata,
and restores of the newest readable committed step into the current mesh's shardings."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from launcher.config import CheckpointConfig

log = logging.getLogger(__name__)
STATE_ITEM, META_ITEM = "state", "meta"
UNREADABLE_DIR = "unreadable_checkpoints"
"""Beside checkpoints/: steps that could not be restored, kept for inspection."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    meta: dict[str, Any]
    skipped: list[dict[str, Any]]
    """Newer committed steps that could not be read, with the error, newest first."""
    seconds: float


class Checkpointer:
    """One CheckpointManager per host process; every call is made by all processes together."""

    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.max_to_keep,
            enable_async_checkpointing=cfg.async_save,
            create=True,
            # A step whose save was interrupted stays a tmp folder: remove it, so that the same
            # step can be saved again and is never mistaken for a committed one.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            pathlib.Path(directory).absolute(), options=options, item_names=(STATE_ITEM, META_ITEM)
        )

    def committed_steps(self) -> list[int]:
        """Committed steps, newest first, read afresh from storage (never from a cached list that may
        still name a step whose save was interrupted)."""
        self.manager.reload()
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> float:
        """Starts the save of `step` and returns how long training was blocked, in seconds."""
        start = time.perf_counter()
        self.manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardSave(state),
                META_ITEM: ocp.args.JsonSave(meta),
            }),
            force=True,
        )
        return time.perf_counter() - start

    def restore_latest(self, targets: Any) -> Restored | None:
        """Restores the newest committed step that reads back; None when there is none at all.

        `targets` are ShapeDtypeStructs carrying the shardings wanted now, so an array saved on any
        number of hosts lands directly in the current layout."""
        skipped = []
        for step in self.committed_steps():
            start = time.perf_counter()
            error = None
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(**{
                        STATE_ITEM: ocp.args.StandardRestore(targets),
                        META_ITEM: ocp.args.JsonRestore(),
                    }),
                )
            except Exception as err:  # noqa: BLE001 - a truncated or corrupt step: try the one before
                error = f"{type(err).__name__}: {err}"[:500]
                log.warning("checkpoint step %d cannot be restored here (%s)", step, error)
            # Each process reads only its own shards, so one may fail where the others succeed:
            # all must agree before any of them uses the step.
            failed = multihost_utils.process_allgather(np.array([error is not None]))
            if np.any(failed):
                skipped.append({"step": step, "error": error or "another host could not read it",
                                "moved_to": str(self._set_aside(step))})
                continue
            seconds = time.perf_counter() - start
            return Restored(step, restored[STATE_ITEM], dict(restored[META_ITEM]), skipped, seconds)
        if skipped:
            raise RuntimeError(
                f"no committed checkpoint could be restored: {', '.join(str(s['step']) for s in skipped)} "
                f"all failed; refusing to start from scratch"
            )
        return None

    def reached_preemption(self, step: int) -> bool:
        """True on every host at the same step once any host got a preemption notice (SIGTERM)."""
        return self.manager.reached_preemption(step)

    def _set_aside(self, step: int) -> pathlib.Path:
        """Moves an unreadable step out of the way (never deletes it), so it is not tried again
        and training can save that step anew."""
        directory = pathlib.Path(self.manager.directory)
        target = directory.parent / UNREADABLE_DIR / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (directory / str(step)).rename(target)
        multihost_utils.sync_global_devices(f"set aside unreadable step {step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def read_arrays(step_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every array of a saved train state as host numpy arrays keyed by path, read in one process
    whatever topology wrote it. For inspection and tests; never used on the training path."""
    import jax

    path = pathlib.Path(step_dir) / STATE_ITEM
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
