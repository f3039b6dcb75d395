"""A host's memory-tier part files as the keeper's spares rotate them: each part maps back to its own
save's values whatever file it was written into, a file the host wrote before is written again
through the mapping it kept (the copy into pages already mapped, `file_maps.FileMaps`), a file the
keeper deleted is let go, and a full tmpfs refuses a save rather than kill the host."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxlaunch.workers.checkpoints.keeper_files import SPARE_PREFIX
from jaxlaunch.workers.checkpoints.part_file import PartFile, PartWriter, digest


def state(scale, rows=64):
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    x = jax.device_put(jnp.arange(rows * 256.0).reshape(rows, 256) * scale, NamedSharding(mesh, PartitionSpec("data")))
    return {"x": x, "n": scale}


def values(path):
    part = PartFile(path)
    rows = [np.asarray(part.shard(e)) for e in part.header.shards]
    return np.concatenate(rows), part.header.plain["['n']"]


def drop(path, directory):
    """What the keeper does with a dropped part: its file becomes a spare."""
    spare = directory / f"{SPARE_PREFIX}{path.stem}.part"
    os.rename(path, spare)
    return spare


def mapped(directory):
    """The files of `directory` this process maps, each with whether it was deleted."""
    found = []
    for line in pathlib.Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(str(directory)):
            found.append(fields[5])
    return found


def test_a_host_writes_the_spares_it_wrote_before_through_its_kept_mapping_each_part_its_own_values(tmp_path):
    writer = PartWriter()
    writer.write(tmp_path, "1.part", state(1), {}, {})
    inode = (tmp_path / "1.part").stat().st_ino
    drop(tmp_path / "1.part", tmp_path)
    (tmp_path / f"{SPARE_PREFIX}other.part").write_bytes(b"\0" * 200_000)  # another host's, larger
    for step in range(2, 6):
        writer.write(tmp_path, f"{step}.part", state(step), {}, {})
        assert (tmp_path / f"{step}.part").stat().st_ino == inode, "the host's own spare is taken first"
        got, n = values(tmp_path / f"{step}.part")
        assert n == step and np.array_equal(got, np.asarray(state(step)["x"])), step
        assert mapped(tmp_path) == [str(tmp_path / f"{step}.part")], "written through the mapping kept"
        assert writer.digest(writer.file_key) == digest(tmp_path / f"{step}.part"), "hashed as the keeper would"
        drop(tmp_path / f"{step}.part", tmp_path)
    writer.close()
    assert mapped(tmp_path) == []


def test_the_host_hashes_a_part_through_its_mapping_as_the_keeper_hashes_the_file_and_never_a_file_let_go(tmp_path):
    """The keeper checks a part against the digest taken when it was handed over (a flipped bit is
    passed over at a restore): the host's hash of what it wrote through its mapping is the whole file's,
    padding included; a file written by `pwrite` (no mapping yet), or
    deleted and let go, has none here, and the keeper hashes it."""
    writer = PartWriter()
    writer.write(tmp_path, "1.part", state(1, rows=1024), {}, {})
    assert writer.digest(writer.file_key) is None, "its first write went by pwrite"
    drop(tmp_path / "1.part", tmp_path)
    writer.write(tmp_path, "2.part", state(2, rows=1024), {}, {})  # into the same file, through its mapping
    part = tmp_path / "2.part"
    host = writer.digest(writer.file_key)
    assert host is not None and host == digest(part)
    start = PartFile(part).start
    with open(part, "r+b") as f:  # a bit flipped after the hand-off: the two digests part
        f.seek(start + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    assert digest(part) != host
    key = writer.file_key
    part.unlink()
    writer.release_deleted()
    assert writer.digest(key) is None
    writer.close()


def test_a_large_part_whose_header_grows_a_little_from_save_to_save_keeps_its_file_s_size_and_mapping(tmp_path):
    """A save's header carries the records since the last save, a few hundred bytes more or less each
    time: a large part's file keeps its size (`part_file.file_size`), so the host keeps writing it
    through the one mapping, and each part reads back as its own save."""
    writer = PartWriter()
    sizes = []
    for step in range(1, 7):
        meta = {"records": [{"step": s, "loss": 1.0 / (s + 1)} for s in range(step * 7)]}  # grows each save
        writer.write(tmp_path, f"{step}.part", state(step, rows=1024), meta, {})  # 1 MiB of arrays
        part = tmp_path / f"{step}.part"
        sizes.append(part.stat().st_size)
        got, n = values(part)
        assert n == step and np.array_equal(got, np.asarray(state(step, rows=1024)["x"]))
        assert PartFile(part).header.meta == meta
        if step >= 2:
            assert mapped(tmp_path) == [str(part)], step
        drop(part, tmp_path)
    assert len(set(sizes)) == 1, sizes
    writer.close()


def test_a_file_of_another_size_or_another_host_s_is_written_whole_and_mapped_only_at_its_own_size(tmp_path):
    """A spare resized by another host's part, or a state of another size: the bytes read back are
    the new save's, never a mapping of the old size (past the file's end, SIGBUS)."""
    writer = PartWriter()
    writer.write(tmp_path, "1.part", state(1), {}, {})
    drop(tmp_path / "1.part", tmp_path)
    writer.write(tmp_path, "2.part", state(2), {}, {})  # mapped now
    spare = drop(tmp_path / "2.part", tmp_path)
    other = PartWriter()  # another host on the node takes it, for a smaller part
    other.write(tmp_path, "3.part", state(3, rows=8), {}, {})
    assert not spare.exists()
    got, n = values(tmp_path / "3.part")
    assert n == 3 and np.array_equal(got, np.asarray(state(3, rows=8)["x"]))
    drop(tmp_path / "3.part", tmp_path)
    for step, rows in ((4, 64), (5, 64), (6, 128), (7, 128)):
        writer.write(tmp_path, f"{step}.part", state(step, rows), {}, {})
        got, n = values(tmp_path / f"{step}.part")
        assert n == step and np.array_equal(got, np.asarray(state(step, rows)["x"])), step
        drop(tmp_path / f"{step}.part", tmp_path)
    writer.close()
    other.close()


def test_a_file_the_keeper_deleted_is_let_go_at_the_host_s_next_write(tmp_path):
    """A file the host keeps open holds its pages after the keeper deleted it for its budget: the
    host's next save lets it go, before it takes any memory of its own."""
    writer = PartWriter()
    for step in (1, 2):
        writer.write(tmp_path, f"{step}.part", state(step), {}, {})
        spare = drop(tmp_path / f"{step}.part", tmp_path)
    assert mapped(tmp_path) == [str(spare)]
    spare.unlink()  # the keeper's budget trims its spares
    assert mapped(tmp_path) == [f"{spare} (deleted)"]
    writer.write(tmp_path, "3.part", state(3), {}, {})
    assert mapped(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["3.part"]
    writer.close()


def test_a_full_tmpfs_refuses_a_save_with_enospc_and_a_spare_already_written_still_takes_one(small_filesystem):
    """The host writes into its kept mapping only pages the tmpfs has given it: a full tmpfs fails a
    save that needs more (the memory tier refuses that step; the durable tier goes on) and kills no
    process; the spares it has keep taking saves of their size."""
    mount = small_filesystem(2_000_000)
    writer = PartWriter()
    for step in (1, 2):
        writer.write(mount, f"{step}.part", state(step), {}, {})  # 64 KB
        drop(mount / f"{step}.part", mount)
    with open(mount / "filler", "wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
        while True:
            f.write(b"\1" * 65536)
    writer.write(mount, "3.part", state(3), {}, {})
    got, n = values(mount / "3.part")
    assert n == 3 and np.array_equal(got, np.asarray(state(3)["x"]))
    drop(mount / "3.part", mount)
    with pytest.raises(OSError, match="No space left"):
        writer.write(mount, "4.part", state(4, rows=256), {}, {})  # larger than any spare
    assert [p.name for p in mount.iterdir()] == ["filler"], "no part-sized leftover"
    held = [os.readlink(f) for f in pathlib.Path("/proc/self/fd").iterdir() if f.is_symlink()]
    assert not [f for f in held if f.startswith(str(mount))], "nothing of the failed save kept open: its pages free"
    writer.close()


HOLES = """
import os, pathlib, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxlaunch.workers.checkpoints.part_file import PartWriter

mount = pathlib.Path(sys.argv[1])
mesh = Mesh(np.array(jax.devices()[:2]), ("data",))


def state(rows):
    x = jax.device_put(jnp.ones((rows, 256)), NamedSharding(mesh, PartitionSpec("data")))
    return {"x": x}


def spare(name):
    os.rename(mount / name, mount / "spare-f.part")


a, b, c = PartWriter(), PartWriter(), PartWriter()
a.write(mount, "1.part", state(1100), {}, {})
spare("1.part")
a.write(mount, "2.part", state(1100), {}, {})  # A maps the file, 1.1 MiB
spare("2.part")
b.write(mount, "3.part", state(8), {}, {})  # B's small part: the file's end freed
spare("3.part")
c.write(mount, "4.part", state(1090), {}, {})  # C's: the same rounded size, its last 60 kB never written
spare("4.part")
with open(mount / "filler", "wb", buffering=0) as f:
    try:
        while True:
            f.write(b"1" * 4096)
    except OSError:
        pass
try:
    a.write(mount, "5.part", state(1100), {}, {})
    print("written")
except OSError as err:
    print("refused", err.errno)
"""


def test_a_kept_mapping_of_a_file_another_host_left_with_holes_on_a_full_tmpfs_refuses_the_save_not_the_process(
        small_filesystem):
    """Host A kept its mapping of a file; host B wrote a smaller part into it (its end freed), host C
    one of the same rounded size that writes less (its end a hole); the tmpfs is full when A writes it
    again: A's save fails with ENOSPC (the tier refuses that step), where touching the hole through
    its mapping would have killed A's process with SIGBUS."""
    import subprocess
    import sys

    mount = small_filesystem(4_000_000)
    done = subprocess.run([sys.executable, "-c", HOLES, str(mount)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["refused", "28"], done.stdout


def test_a_part_file_deleted_under_its_write_fails_the_save_with_an_os_error_not_the_host(tmp_path, monkeypatch):
    """A keeper that empties its folder (one started in place of another) deletes a part file a host is
    writing, and the host's hand-off thread lets go of deleted files meanwhile: the write goes on into
    its mapping, and the save fails with an OSError (the tier refuses that step) rather than an error
    that would end the user's training loop."""
    from jaxlaunch.workers.checkpoints import part_file

    writer = PartWriter()
    for step in (1, 2):
        writer.write(tmp_path, f"{step}.part", state(step), {}, {})
        drop(tmp_path / f"{step}.part", tmp_path)  # the third write goes through the kept mapping
    put, calls = part_file._put, []

    def emptied_meanwhile(fd, target, offset, host):
        if not calls:
            for path in tmp_path.iterdir():
                path.unlink()
            writer.release_deleted()  # as the hand-off thread does
        calls.append(target is not None)
        return put(fd, target, offset, host)

    monkeypatch.setattr(part_file, "_put", emptied_meanwhile)
    with pytest.raises(FileNotFoundError):
        writer.write(tmp_path, "3.part", state(3), {}, {})
    assert calls and all(calls), "written through the mapping"
    assert list(tmp_path.iterdir()) == [] and mapped(tmp_path) == []
    writer.close()


def test_the_training_thread_writes_while_the_hand_off_thread_hashes_drops_and_lets_go_and_no_part_is_wrong(tmp_path):
    """Both threads of a host at once, as `MemoryTier` runs them: the training thread writes each
    save, claiming spares, while the hand-off thread hashes the part before through the mapping, acts
    the keeper (the part two saves back becomes a spare; now and then every spare, and a write's
    temporary file, are deleted, as by a keeper that emptied its folder) and lets go of deleted files.
    Every save either reads back as its own values with the host's digest the file's, or failed
    because its file was deleted under it (the memory tier refuses that step); nothing else is
    raised, and no file is left open at the end."""
    import queue
    import threading

    from jaxlaunch.workers.checkpoints.part_file import PartFile as Part

    writer, handed, finished, problems, refused = PartWriter(), queue.Queue(), queue.Queue(), [], []
    counts = {"hashed": 0, "emptied": 0}

    def keeper():
        while (item := handed.get()) is not None:
            step, key = item
            path = tmp_path / f"{step}.part"
            try:
                host = writer.digest(key)
                counts["hashed"] += host is not None
                if host is not None and host != digest(path):
                    problems.append(f"step {step}: the host's digest is not the file's")
                part = Part(path)
                got = np.concatenate([np.asarray(part.shard(e)) for e in part.header.shards])
                if not np.array_equal(got, np.asarray(state(step, rows=1024)["x"])):
                    problems.append(f"step {step} reads back another save's values")
                part.map.close()
                if (tmp_path / f"{step - 2}.part").exists():
                    drop(tmp_path / f"{step - 2}.part", tmp_path)
                if step % 7 == 0:  # a keeper that emptied its folder: spares, and a write's temporary file
                    counts["emptied"] += 1
                    for p in tmp_path.glob("*"):
                        if p.name.startswith((SPARE_PREFIX, ".")):
                            p.unlink(missing_ok=True)
                writer.release_deleted()
            except Exception as err:  # noqa: BLE001 - reported below, with the step
                problems.append(f"step {step}: {err!r}")
            finished.put(step)

    thread = threading.Thread(target=keeper)
    thread.start()
    in_flight = False
    try:
        for step in range(1, 61):
            try:
                writer.write(tmp_path, f"{step}.part", state(step, rows=1024), {}, {})
            except FileNotFoundError:
                refused.append(step)  # its temporary file was deleted under the write
                continue
            if in_flight:  # as `MemoryTier.save`: written, then the previous hand-off waited for
                finished.get()
            handed.put((step, writer.file_key))
            in_flight = True
    finally:
        handed.put(None)
        thread.join()
    writer.close()
    assert problems == []
    # 29-46 of the 60 saves were hashed through the mapping here (the others went by `pwrite`, into
    # files made new after the folder was emptied, or were refused).
    assert counts["hashed"] >= 15 and counts["emptied"] >= 8, counts
    assert len(refused) <= counts["emptied"], refused
    held = [os.readlink(f) for f in pathlib.Path("/proc/self/fd").iterdir() if f.is_symlink()]
    assert not [f for f in held if f.startswith(str(tmp_path))] and mapped(tmp_path) == []
