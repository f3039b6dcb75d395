"""Orbax checkpoints on the hosts: coordinated asynchronous saves of the train state with JSON
metadata, and restores of the newest readable committed step into today's shardings.

What restore does when a step does not read back:
- rank 0 alone lists the committed steps (one reader, `jaxlaunch.contract.layout.committed_steps`) and every host
  tries the same step, so hosts on storage with lagging listings agree;
- an error that storage or memory pressure explains (timeouts, permissions, out of memory) is retried
  and, if it persists, fails the attempt: nothing is set aside because of it;
- an error that repeats the same way is corruption: the step is tried again once, then the previous
  one; a corrupt step is set aside (moved, never deleted) only once an older step restored;
- if the run has committed steps and none reads back, nothing moves and the job stops, rather than
  train over its history from scratch;
- after a replica mismatch, committed steps newer than the newest step whose replicas agreed
  (`newest_restorable`) are set aside unread: they may hold the corrupt copy.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import pathlib
import time
import types
from collections.abc import Callable, Sequence
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jaxlaunch.workers.compat import etils as etils_compat
from jaxlaunch.workers.compat import orbax as orbax_compat

from jaxlaunch.contract.layout import UNREADABLE_DIR, UNVERIFIED_SUFFIX, committed_steps
from jaxlaunch.contract.protocol import CheckpointConfig, ErrorKind
from jaxlaunch.contract.storage import chain, describe_storage_error, storage_errno
from jaxlaunch.contract.store import is_url, open_store

log = logging.getLogger(__name__)
STATE_ITEM, META_ITEM = "state", "meta"
TRANSIENT_RETRIES = 3
TRANSIENT_BACKOFF_S = 1.0
_TRANSIENT_ERRNOS = {errno.ENOMEM, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.EACCES, errno.EPERM, errno.EIO}
_TRANSIENT_CODES = ("DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "ABORTED")


class CheckpointError(RuntimeError):
    """A checkpoint problem of a known kind; the host reports it with that kind."""

    kind = ErrorKind.USER


class StorageError(CheckpointError):
    kind = ErrorKind.STORAGE


class TransientError(CheckpointError):
    kind = ErrorKind.TRANSIENT


class NoCheckpointError(CheckpointError):
    kind = ErrorKind.NO_CHECKPOINT


class NoneNewerReadBack(Exception):
    """`restore_latest(newer_than=...)`: none of the steps newer than that read back. `failed`: each
    with its error, not moved yet (`set_aside_failed` moves them once an older step serves);
    `set_aside`: unverified steps (after a replica mismatch), moved unread as always."""

    def __init__(self, failed: list[dict[str, Any]], set_aside: list[dict[str, Any]]):
        super().__init__(f"{len(failed) + len(set_aside)} newer step(s) did not read back")
        self.failed, self.set_aside = failed, set_aside


def is_transient(err: BaseException) -> bool:
    """Errors that memory or storage pressure explain, which a retry may clear."""
    for e in chain(err):
        if isinstance(e, MemoryError | TimeoutError | PermissionError):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if any(str(e).startswith(code) or f" {code}:" in str(e) for code in _TRANSIENT_CODES):
            return True
    return False


@dataclasses.dataclass
class DurableRestore:
    step: int
    state: Any
    meta: dict[str, Any]
    set_aside: list[dict[str, Any]]
    """Newer committed steps that did not read back, each with its error and where it was moved."""
    seconds: float


class Checkpointer:
    """One CheckpointManager per host process; every call is made by all processes together."""

    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig, expect_checkpoint: bool = False,
                 newest_restorable: int | None = None):
        self.store = open_store(directory)
        self.newest_restorable = newest_restorable
        self.directory: pathlib.Path | str = self.store.url if is_url(directory) else pathlib.Path(self.store.url)
        """A local folder, or the URL of one in an object store."""
        self.expect_checkpoint = expect_checkpoint
        self.checkpoint_bytes: int | None = None
        prepare_tensorstore(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.max_to_keep,
            enable_async_checkpointing=cfg.async_save,
            create=True,
            # A step whose save was interrupted stays a tmp folder: remove it, so that the same
            # step can be saved again and is never mistaken for a committed one.
            cleanup_tmp_directories=True,
            # An object store has no atomic rename of a folder: a step is written in place and
            # committed by its commit file, written last (Orbax's default for gs:// alike).
            temporary_path_class=ocp.path.atomicity.CommitFileTemporaryPath if is_url(directory) else None,
        )
        with self._storage_errors():
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
                # Compressed or not, a step reads back either way: each array's metadata names its codec.
                STATE_ITEM: ocp.PyTreeCheckpointHandler(
                    use_compression=cfg.compress,
                    type_handler_registry=orbax_compat.registry_with_small_arrays_whole()),
                META_ITEM: ocp.JsonCheckpointHandler()})

    # -- saving ----------------------------------------------------------------------------------
    def save(self, step: int, state: Any, meta: dict[str, Any]) -> float:
        """Starts the save of `step` and returns how long the caller was blocked, in seconds."""
        start = time.perf_counter()
        with self._storage_errors():
            self.manager.save(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.PyTreeSave(state), META_ITEM: ocp.args.JsonSave(meta)}), force=True)
        return time.perf_counter() - start

    def is_saving(self) -> bool:
        return self.manager.is_saving_in_progress()

    def reached_preemption(self, step: int) -> bool:
        """True on every host at the same step once any host got a preemption notice (SIGTERM)."""
        try:
            return self.manager.reached_preemption(step)
        except RuntimeError:
            if jax.process_count() > 1:
                raise
            return False  # one process without jax.distributed (a user's own test): no notices

    def wait(self) -> None:
        with self._storage_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._storage_errors():
            self.manager.close()

    class _StorageErrors:
        def __init__(self, owner: Checkpointer):
            self.owner = owner

        def __enter__(self) -> Self:
            return self

        def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                     tb: types.TracebackType | None) -> None:
            if err is None or isinstance(err, CheckpointError):
                return
            code = storage_errno(err)
            if code is None:
                return
            raise StorageError(describe_storage_error(self.owner.directory, code, self.owner.checkpoint_bytes)) from err

    def _storage_errors(self) -> _StorageErrors:
        return Checkpointer._StorageErrors(self)

    # -- restoring -------------------------------------------------------------------------------
    def restore_latest(self, targets: Any, check_structure: Callable[[Any], str | None] | None = None,
                       newer_than: int | None = None, failed_before: Sequence[dict[str, Any]] = ()
                       ) -> DurableRestore | None:
        """The newest committed step that reads back, restored into `targets` (ShapeDtypeStructs
        with today's shardings, so a step written by any number of hosts lands in today's layout).
        None on a fresh run, or when a replica mismatch left no verified step (a fresh state is then
        the newest whose replicas agreed). `check_structure(tree_metadata)` returns why a step's state
        cannot fit the targets (a different model), or None. `newer_than`: only steps after it are
        tried (the memory tier holds it whole); raises `NoneNewerReadBack` when none of them reads back.
        `failed_before`: steps of this restore that did not read back already ({"step", "error"}): not
        tried again, set aside with this call's own once a step serves, listed when none does."""
        unverified = self.set_aside_unverified()
        skip = {f["step"] for f in failed_before}
        steps = [s for s in self.steps_from_rank_0() if s not in skip]
        if newer_than is not None:
            steps = [s for s in steps if s > newer_than]
        failed: list[dict[str, Any]] = []
        for step in steps:
            start = time.perf_counter()
            if check_structure is not None:
                mismatch = self._agree_on(functools.partial(self._structure_problem, step, check_structure))
                if mismatch:
                    raise NoCheckpointError(
                        f"checkpoint step {step} in {self.directory} holds a state that differs from what init() "
                        f"builds ({mismatch}); restore the code that wrote it, or start a new --run-dir")
            outcome, restored, error = self._try_step(step, targets)
            if outcome == "ok":
                set_aside = unverified + self.set_aside_failed([*failed_before, *failed])
                return DurableRestore(step, restored[STATE_ITEM], dict(restored[META_ITEM]), set_aside,
                                      time.perf_counter() - start)
            failed.append({"step": step, "error": error})
        if newer_than is not None:
            raise NoneNewerReadBack(failed, unverified)
        failed = [*failed_before, *failed]
        # A replica mismatch that left no verified step (`newest_restorable` set): a fresh state serves.
        if failed or (self.expect_checkpoint and not steps and self.newest_restorable is None):
            listing = ", ".join(f"{f['step']} ({f['error'][:160]})" for f in failed) or "none is left"
            parent = str(self.directory).rstrip("/").rsplit("/", 1)[0]
            kept = f"Everything is kept in {self.directory}"
            if unverified:  # moved by this very call: the replicas disagreed after the step they read
                moved = ", ".join(str(u["step"]) for u in unverified)
                kept += f", and the steps past the replicas' mismatch ({moved}) in {parent}/{UNREADABLE_DIR}/"
            elif open_store(parent).exists(UNREADABLE_DIR):
                kept += f", and the steps set aside in {parent}/{UNREADABLE_DIR}/"
            raise NoCheckpointError(
                f"this run has committed checkpoints but none can be restored: {listing}. {kept}; repair or copy "
                f"back a step and --resume, or start a new --run-dir")
        return None

    def set_aside_unverified(self) -> list[dict[str, Any]]:
        """After a replica mismatch: the committed steps past the newest verified one (`newest_restorable`),
        moved unread to `unreadable_checkpoints/` (they may hold the corrupt copy), whichever tier serves."""
        limit = self.newest_restorable
        if limit is None:
            return []
        return [{"step": s, "error": f"not verified: the replicas disagreed after step {limit}",
                 "moved_to": str(self._set_aside(s, unverified=True))} for s in self.steps_from_rank_0() if s > limit]

    def set_aside_failed(self, failed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Moves steps that did not read back to `unreadable_checkpoints/` (an older step served)."""
        return [dict(f, moved_to=str(self._set_aside(f["step"]))) for f in failed]

    def _structure_problem(self, step: int, check: Callable[[Any], str | None]) -> str | None:
        try:
            saved = self.manager.item_metadata(step)[STATE_ITEM]
        except Exception as err:  # noqa: BLE001 - unreadable metadata: the restore will say more
            log.warning("cannot read the metadata of step %d: %s", step, err)
            return None
        return check(saved) if saved is not None else None

    def steps_from_rank_0(self) -> list[int]:
        """Rank 0's list of committed steps, newest first, the same on every host."""
        steps = committed_steps(self.store) if jax.process_index() == 0 else []
        if jax.process_count() == 1:
            return steps
        count = int(multihost_utils.broadcast_one_to_all(np.array(len(steps), dtype=np.int64)))
        if count == 0:
            return []
        padded = np.array(steps if steps else [0] * count, dtype=np.int64)
        return [int(s) for s in multihost_utils.broadcast_one_to_all(padded)]

    def _agree_on(self, check: Callable[[], str | None]) -> str | None:
        """A check run on every host; the first host's complaint, if any host complains."""
        complaint = check()
        if jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.array([complaint is not None]))
            if np.any(flags) and complaint is None:
                complaint = "another host found it different"
        return complaint

    def _try_step(self, step: int, targets: Any) -> tuple[str, Any, str | None]:
        """("ok", restored, None) or ("corrupt", None, error), the same on every host; raises
        TransientError when retries did not clear a transient error. Every decision is made from
        outcomes gathered from all hosts, so the hosts never part ways."""
        failures = transients = 0  # each with a budget of its own: retries of one never spend the other's
        # Each array read straight into its target's sharding, shape and dtype.
        restore_args = ocp.checkpoint_utils.construct_restore_args(targets)
        while True:
            restored, error, transient = None, None, False
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**{
                    STATE_ITEM: ocp.args.PyTreeRestore(targets, restore_args=restore_args),
                    META_ITEM: ocp.args.JsonRestore()}))
            except Exception as err:  # noqa: BLE001 - classified below, and re-raised if transient
                error, transient = f"{type(err).__name__}: {err}"[:500], is_transient(err)
                log.warning("restoring step %d failed (%s): %s", step, "transient" if transient else "error", error)
            # Each process reads only its own shards, so one may fail where the others succeed:
            # all must agree before any of them uses the step.
            codes = np.array([0 if error is None else (2 if transient else 1)])
            if jax.process_count() > 1:
                codes = multihost_utils.process_allgather(codes)
            if not np.any(codes):
                return "ok", restored, None
            error = error or "another host could not read it"
            if np.any(codes == 2):
                if transients == TRANSIENT_RETRIES:
                    raise TransientError(f"restoring checkpoint step {step} failed {transients + 1} times with a "
                                         f"transient error: {error}")
                time.sleep(TRANSIENT_BACKOFF_S * 2**transients)
                transients += 1
                continue
            # Corrupt data fails again when read again; anything else gets one more try.
            failures += 1
            if failures == 2:
                return "corrupt", None, error

    def _set_aside(self, step: int, unverified: bool = False) -> str:
        """Moves an unreadable step (or an `unverified` one) beside checkpoints/ (never deletes it), so it
        is not tried again and training can save that step anew."""
        parent, name = str(self.directory).rstrip("/").rsplit("/", 1)
        run = open_store(parent)
        target = f"{UNREADABLE_DIR}/{step}-{int(time.time())}{UNVERIFIED_SUFFIX if unverified else ''}"
        if jax.process_index() == 0:
            run.move(f"{name}/{step}", target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside unreadable step {step}")
        self.manager.reload()
        return run.join(target)


def read_arrays(step_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every array of a saved state as host numpy arrays keyed by path, read in one process whatever
    topology wrote it. For inspection and tests; never used on the training path."""
    prepare_tensorstore(step_dir)
    path = epath.Path(step_dir) / STATE_ITEM
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


def prepare_tensorstore(location: str | pathlib.Path) -> None:
    """Points Orbax's paths and TensorStore's drivers at the run directory's store as it is today.
    TensorStore's GCS driver takes its endpoint from TENSORSTORE_GCS_HTTP_URL alone, which the
    driver gives each host process at its start (`jaxlaunch.contract.store.host_storage_environment`)."""
    if is_url(location):
        scheme = str(location).split("://", 1)[0]
        etils_compat.forget_filesystems(scheme)
        if scheme == "s3":
            orbax_compat.route_s3_to_tensorstore()
