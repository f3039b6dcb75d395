"""Checkpoints in one process: restore of the newest readable step into today's shardings, corrupt
steps set aside only once an older one reads, transient errors retried, storage errors named."""

import errno
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxlaunch.workers.checkpoints import durable as ckpt
from jaxlaunch.workers.checkpoints.durable import Checkpointer, NoCheckpointError, StorageError, TransientError
from jaxlaunch.workers.sharding import build_mesh

from jaxlaunch.contract.layout import committed_steps
from jaxlaunch.contract.protocol import CheckpointConfig

CFG = CheckpointConfig(save_every=1, max_to_keep=5, async_save=False)


def state(value: float, mesh):
    return {"w": jax.device_put(jnp.full((8, 4), value), NamedSharding(mesh, P("data"))),
            "step": jnp.int32(int(value))}


def targets(mesh, spec=None):
    spec = P("data") if spec is None else spec
    return {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, spec)),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}


@pytest.fixture
def saved(tmp_path):
    """Steps 1, 2, 3 saved on a data=8 mesh."""
    mesh = build_mesh({"data": -1})
    c = Checkpointer(tmp_path / "checkpoints", CFG)
    for step in (1, 2, 3):
        c.save(step, state(step, mesh), {"step": step})
    c.wait()
    c.close()
    return tmp_path / "checkpoints"


def corrupt(directory: pathlib.Path, step: int) -> None:
    for path in (directory / str(step) / "state").glob("**/d/*"):
        path.write_bytes(path.read_bytes()[:7])


def test_the_newest_step_lands_in_the_new_layout(saved):
    mesh = build_mesh({"data": 2, "model": 4})
    restored = Checkpointer(saved, CFG).restore_latest(targets(mesh, P("model")))
    assert restored.step == 3 and restored.meta["step"] == 3 and restored.set_aside == []
    w = restored.state["w"]
    np.testing.assert_array_equal(np.asarray(w), np.full((8, 4), 3.0))
    assert w.sharding.spec == P("model") and w.addressable_shards[0].data.shape == (2, 4)


@pytest.mark.parametrize("written_compressed", [True, False])
def test_compressed_and_plain_checkpoints_read_back_either_way(tmp_path, written_compressed):
    """A run written before compression went off (or with it on) resumes under the other setting."""
    mesh = build_mesh({"data": -1})
    values = jax.device_put(jax.random.normal(jax.random.key(0), (64, 32)), NamedSharding(mesh, P("data")))
    writer = Checkpointer(tmp_path / "c", CheckpointConfig(async_save=False, compress=written_compressed))
    writer.save(1, {"w": values, "step": jnp.int32(1)}, {"step": 1})
    writer.close()
    reader = Checkpointer(tmp_path / "c", CheckpointConfig(async_save=False, compress=not written_compressed))
    restored = reader.restore_latest({"w": jax.ShapeDtypeStruct((64, 32), jnp.float32,
                                                                sharding=NamedSharding(mesh, P("data"))),
                                      "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))})
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.asarray(values))


def test_chunks_are_written_uncompressed_by_default(tmp_path):
    """Random weights barely compress; the default skips zstd, so the data files hold the raw bytes."""
    mesh = build_mesh({"data": -1})
    values = jax.device_put(jax.random.normal(jax.random.key(0), (256, 256)), NamedSharding(mesh, P("data")))
    sizes = {}
    for compress in (False, True):
        c = Checkpointer(tmp_path / str(compress), CheckpointConfig(async_save=False, compress=compress))
        c.save(1, {"w": values}, {"step": 1})
        c.close()
        sizes[compress] = sum(p.stat().st_size for p in (tmp_path / str(compress) / "1" / "state").glob("**/d/*"))
    assert sizes[False] >= values.nbytes > sizes[True]


def test_a_fresh_run_restores_nothing(tmp_path):
    assert Checkpointer(tmp_path / "checkpoints", CFG).restore_latest(targets(build_mesh({"data": -1}))) is None


def test_a_corrupt_step_is_set_aside_once_an_older_one_reads(saved):
    corrupt(saved, 3)
    restored = Checkpointer(saved, CFG).restore_latest(targets(build_mesh({"data": -1})))
    assert restored.step == 2
    [aside] = restored.set_aside
    assert aside["step"] == 3 and pathlib.Path(aside["moved_to"]).is_dir(), "moved, never deleted"
    assert not (saved / "3").exists() and "unreadable_checkpoints/3-" in aside["moved_to"]


def test_only_steps_newer_than_memory_s_are_tried_and_unreadable_ones_set_aside(saved):
    """The memory tier holds step 1 whole: durable steps 2 and 3 serve only if one reads back; when
    neither does, nothing is moved until the memory step served (a durable restore of the older steps
    would try them again), then each is set aside (moved, never deleted); step 1 is not read here."""
    from jaxlaunch.workers.checkpoints.durable import NoneNewerReadBack

    mesh = build_mesh({"data": -1})
    corrupt(saved, 3)
    assert Checkpointer(saved, CFG).restore_latest(targets(mesh), newer_than=1).step == 2
    corrupt(saved, 2)
    checkpointer = Checkpointer(saved, CFG)
    with pytest.raises(NoneNewerReadBack) as none:
        checkpointer.restore_latest(targets(mesh), newer_than=1)
    assert [a["step"] for a in none.value.failed] == [2] and none.value.set_aside == []
    assert sorted(p.name for p in saved.iterdir() if p.name.isdigit()) == ["1", "2"], "nothing moved yet"
    [aside] = checkpointer.set_aside_failed(none.value.failed)
    assert pathlib.Path(aside["moved_to"]).is_dir() and "could not" not in aside["error"]
    assert sorted(p.name for p in saved.iterdir() if p.name.isdigit()) == ["1"]


def test_when_no_step_reads_nothing_moves_and_the_run_stops(saved):
    for step in (1, 2, 3):
        corrupt(saved, step)
    with pytest.raises(NoCheckpointError, match="none can be restored: 3 .*2 .*1 .*Everything is kept"):
        Checkpointer(saved, CFG).restore_latest(targets(build_mesh({"data": -1})))
    assert sorted(p.name for p in saved.iterdir() if p.name.isdigit()) == ["1", "2", "3"]


def test_a_run_with_history_never_starts_from_scratch(tmp_path):
    with pytest.raises(NoCheckpointError, match="none is left"):
        Checkpointer(tmp_path / "checkpoints", CFG, expect_checkpoint=True).restore_latest(
            targets(build_mesh({"data": -1})))


def flaky(saved, monkeypatch, errors):
    """A checkpointer whose reads raise `errors` one after the other, then read; and the steps it read."""
    monkeypatch.setattr(ckpt, "TRANSIENT_BACKOFF_S", 0.0)
    c = Checkpointer(saved, CFG)
    real, calls = c.manager.restore, []

    def restore(step, args):
        calls.append(step)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return real(step, args=args)

    monkeypatch.setattr(c.manager, "restore", restore)
    return c, calls


def test_a_transient_error_is_retried_and_never_sets_anything_aside(saved, monkeypatch):
    c, calls = flaky(saved, monkeypatch, [TimeoutError("storage did not answer")] * 2)
    assert c.restore_latest(targets(build_mesh({"data": -1}))).step == 3 and calls == [3, 3, 3]

    def always(step, args):
        raise MemoryError("out of host memory")

    monkeypatch.setattr(c.manager, "restore", always)
    with pytest.raises(TransientError, match="transient error: MemoryError"):
        c.restore_latest(targets(build_mesh({"data": -1})))
    assert (saved / "3").is_dir() and not (saved.parent / "unreadable_checkpoints").exists()


def test_a_step_is_read_once_more_before_it_is_called_corrupt_after_transient_errors(saved, monkeypatch):
    """Flaky storage: three timeouts, then a short read, then the step reads. The one more read a
    non-transient error gets is its own, not what the timeouts' retries left (before: corrupt after one
    read, set aside, and the steps since trained again)."""
    c, calls = flaky(saved, monkeypatch, [TimeoutError("storage did not answer")] * 3 + [ValueError("short read")])
    assert c.restore_latest(targets(build_mesh({"data": -1}))).step == 3 and calls == [3] * 5
    assert not (saved.parent / "unreadable_checkpoints").exists()


def test_a_full_disk_is_named_with_its_filesystem_free_space_and_checkpoint_size(tmp_path, monkeypatch):
    c = Checkpointer(tmp_path / "checkpoints", CFG)
    c.checkpoint_bytes = 120_000_000

    def full(*args, **kwargs):
        raise ValueError("Error writing: [errno 28] No space left on device")

    monkeypatch.setattr(c.manager, "save", full)
    with pytest.raises(StorageError) as err:
        c.save(1, state(1, build_mesh({"data": -1})), {})
    message = str(err.value)
    assert "the filesystem is full" in message and "MB free of" in message and "about 120 MB" in message
    assert ckpt.storage_errno(OSError(errno.EROFS, "Read-only file system")) == errno.EROFS
    assert ckpt.storage_errno(ValueError("shape mismatch")) is None


def test_after_a_replica_mismatch_steps_newer_than_the_verified_one_are_set_aside_unread(saved):
    c = Checkpointer(saved, CFG, expect_checkpoint=True, newest_restorable=1)
    restored = c.restore_latest(targets(build_mesh({"data": -1})))
    assert restored is not None and restored.step == 1
    assert [(f["step"], "not verified" in f["error"]) for f in restored.set_aside] == [(3, True), (2, True)]
    assert committed_steps(saved) == [1], "a corrupt step can never be restored later, and can be saved anew"


def test_when_no_verified_step_reads_the_message_says_where_every_step_now_is(saved):
    corrupt(saved, 1)
    c = Checkpointer(saved, CFG, expect_checkpoint=True, newest_restorable=1)
    with pytest.raises(NoCheckpointError) as raised:
        c.restore_latest(targets(build_mesh({"data": -1})))
    assert f"Everything is kept in {saved}, and the steps past the replicas' mismatch (3, 2) in " \
           f"{saved.parent}/unreadable_checkpoints/" in str(raised.value)
    with pytest.raises(NoCheckpointError, match="and the steps set aside in .*unreadable_checkpoints/"):
        Checkpointer(saved, CFG, expect_checkpoint=True).restore_latest(targets(build_mesh({"data": -1})))


def test_when_no_step_was_verified_the_run_starts_afresh_rather_than_fail(saved):
    c = Checkpointer(saved, CFG, expect_checkpoint=True, newest_restorable=0)
    assert c.restore_latest(targets(build_mesh({"data": -1}))) is None
    assert committed_steps(saved) == []


class _NoMemoryStep:
    """The memory tier holding nothing at or below the replicas' limit."""

    lost, lost_alive, replaced = [], [], []

    def held(self):
        return []

    def whole_steps(self, held, at_most=None):
        return []


@pytest.mark.parametrize("memory_tier", [False, True], ids=["durable-only", "memory-tier"])
def test_a_mismatch_before_any_verified_step_restarts_afresh_with_every_step_set_aside_and_said(saved,
                                                                                                 memory_tier):
    """The replicas disagreed at the first check, so no step is verified (the limit is below step 1).
    Either tier's restore starts from a fresh state, the newest whose replicas agreed, and says where
    each step went. Before, with the memory tier on the job stopped (no_checkpoint, exit 1), and
    without it the steps moved with no event."""
    from jaxlaunch.workers.checkpoints.tiered import restore_newest
    from jaxlaunch.workers.supervision.progress import HostProgress

    from jaxlaunch.contract.events import CheckpointFallback

    class Layout:
        mismatch = None

        def targets(self):
            return targets(build_mesh({"data": -1}))

    checkpointer = Checkpointer(saved, CFG, expect_checkpoint=True, newest_restorable=0)
    progress = HostProgress()
    assert restore_newest(checkpointer, _NoMemoryStep() if memory_tier else None, Layout(), progress, at_most=0) \
        is None
    moved = [e for e in progress.drain().events if isinstance(e, CheckpointFallback)]
    assert sorted(e.step for e in moved) == [1, 2, 3] and all(pathlib.Path(e.moved_to).is_dir() for e in moved)
    assert committed_steps(saved) == []
    # The fresh attempt trained (the limit is resolved) and was killed before its first save: the next
    # restart starts afresh again. The unverified steps are no history a restore must find.
    from jaxlaunch.launcher.records.runs import RunDir

    again = Checkpointer(saved, CFG, expect_checkpoint=RunDir(saved.parent).has_history())
    assert restore_newest(again, _NoMemoryStep() if memory_tier else None, Layout(), HostProgress()) is None


def test_a_save_slices_only_large_replicated_arrays(tmp_path, caplog):
    """Orbax's replica-parallel saving slices a replicated array with a program JAX compiles at a
    process's first save (`orbax_compat.registry_with_small_arrays_whole`): small arrays are written
    whole (no program compiled for them), a large one is still sliced; the state reads back, its PRNG
    key included."""
    mesh = build_mesh({"data": 4, "model": 2})
    small = {"w": jax.device_put(jnp.arange(48.0).reshape(8, 6), NamedSharding(mesh, P(None, "model"))),
             "b": jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P())), "key": jax.random.key(3)}
    large = {"big": jax.device_put(jnp.ones((4096, 1024)), NamedSharding(mesh, P()))}  # 2 MiB in each of 8 slices

    def compiled_while_saving(tree, step: int) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="jax"), jax.log_compiles():
            Checkpointer(tmp_path / str(step), CheckpointConfig(async_save=False)).save(step, tree, {"step": step})
        return [r.getMessage() for r in caplog.records if "Compiling jit(slice)" in r.getMessage()]

    assert compiled_while_saving(small, 1) == []
    assert compiled_while_saving(large, 2), "a large replicated array is written in slices"
    restored = Checkpointer(tmp_path / "1", CFG).restore_latest(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), small))
    assert restored is not None
    for key in ("w", "b"):
        np.testing.assert_array_equal(restored.state[key], small[key])
    assert jax.random.key_data(restored.state["key"]).tolist() == jax.random.key_data(small["key"]).tolist()
