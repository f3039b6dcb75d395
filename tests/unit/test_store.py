"""The storage seam, the same contract on every store: a local folder, S3 (moto's server) and GCS
(fake-gcs-server), the emulators started on loopback by these tests. Then what is built on it: record
segments, the run lock and committed steps."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from jaxlaunch.launcher.records import runs
from jaxlaunch.launcher.records.runs import RunDir
from jaxlaunch.launcher.views import notebook

from jaxlaunch.contract import events
from jaxlaunch.contract.layout import committed_steps
from jaxlaunch.contract.protocol import ConfigError
from jaxlaunch.contract.store import (
    LocalStore,
    ObjectStore,
    endpoint_environment,
    host_storage_environment,
    open_store,
)
from tests.integration.object_stores import EMULATORS


@pytest.fixture(scope="module", params=["local", *sorted(EMULATORS)])
def root(request, tmp_path_factory):
    """A fresh run directory on each kind of store: a function that names a new one."""
    if request.param == "local":
        base = tmp_path_factory.mktemp("store")
        yield lambda: str(base / uuid.uuid4().hex[:8])
        return
    with EMULATORS[request.param]() as emulator:
        bucket = f"unit-{uuid.uuid4().hex[:8]}"
        emulator.create_bucket(bucket)
        old = {k: os.environ.get(k) for k in emulator.env}
        os.environ.update(emulator.env)
        try:
            yield lambda: f"{emulator.scheme}://{bucket}/{uuid.uuid4().hex[:8]}"
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def test_objects_are_written_whole_listed_moved_and_deleted(root):
    store = open_store(root())
    assert store.list() == [] and not store.exists("a.json") and store.modified("a.json") is None
    store.write("a.json", b"1")
    store.write("a.json", b"22")
    store.write("dir/x", b"xyz")
    store.write("dir/sub/y", b"y")
    assert store.read("a.json") == b"22" and store.size("a.json") == 2 and store.size("dir") == 4
    assert store.list() == ["a.json", "dir"] and store.list("dir") == ["sub", "x"]
    assert store.modified("a.json") is not None
    store.move("dir", "moved/dir")
    assert store.list("dir") == [] and store.read("moved/dir/sub/y") == b"y"
    store.delete("moved")
    store.delete("nothing-here")
    assert store.list() == ["a.json"]
    with pytest.raises(FileNotFoundError):
        store.read("moved/dir/x")


def test_a_conditional_create_has_one_winner(root):
    store = open_store(root())
    assert store.create(".lock", b"first") is True
    assert store.create(".lock", b"second") is False
    assert store.read(".lock") == b"first", "the loser wrote nothing"


def test_records_on_an_object_store_are_whole_segments_merged_in_order(root, monkeypatch):
    url = root()
    run = RunDir(url)
    run.create()
    run.event(events.Launch(num_hosts=1))
    run.metrics([{"step": 1}, {"step": 2}])
    run.event(events.AttemptEnded(attempt=1))  # an event writes the metrics gathered before it
    later = RunDir(url)  # a second launch of the run continues the numbering
    later.metrics([{"step": 3, "loss": float("nan")}])
    later.flush()
    assert [e.KIND for e in later.events()] == [events.EventKind.LAUNCH, events.EventKind.ATTEMPT_ENDED]
    assert [(r["step"], r.get("loss")) for r in later.metric_records()] == [(1, None), (2, None), (3, None)]
    if isinstance(run.store, LocalStore):
        assert run.store.list("metrics") == [] and (run.path / "metrics.jsonl").is_file(), "local runs append"
    else:
        assert run.store.list("metrics") == ["00000000.jsonl", "00000001.jsonl"]
        assert run.store.list("events") == ["00000000.jsonl", "00000001.jsonl"]


def test_metrics_wait_at_most_the_segment_interval(root):
    store = open_store(root())
    store.makedirs()
    now = [0.0]
    log = runs.RecordLog(store, "metrics", every_s=5.0, clock=lambda: now[0])
    log.add([{"step": 1}])
    now[0] = 4.0
    log.add([{"step": 2}])
    written = store.list("metrics") if not isinstance(store, LocalStore) else ["appended"]
    now[0] = 5.5
    log.add([{"step": 3}])
    if not isinstance(store, LocalStore):
        assert written == [], "gathered, not yet written"
        assert store.list("metrics") == ["00000000.jsonl"]
        assert [json.loads(line)["step"] for line in store.read("metrics/00000000.jsonl").splitlines()] == [1, 2, 3]


def test_the_lock_refuses_a_second_launch_and_a_stale_one_is_taken_over_once(root, monkeypatch):
    url = root()
    first = RunDir(url).lock()
    first.acquire()
    try:
        with pytest.raises(ConfigError, match="is in use by the launch of pid"):
            RunDir(url).lock().acquire()
        # The holder stopped refreshing a minute ago (its machine died): two launches on another
        # machine race for it (on the holder's own machine its live pid keeps it, however old).
        real_time = runs.time.time
        monkeypatch.setattr(runs.socket, "gethostname", lambda: "another-machine")
        monkeypatch.setattr(runs.time, "time", lambda: real_time() + runs.LOCK_STALE_S + 5)
        racer_a, racer_b = RunDir(url).lock(), RunDir(url).lock()
        racer_a.acquire()
        monkeypatch.setattr(runs.time, "time", real_time)
        assert racer_a.took_over["token"] == first.token
        with pytest.raises(ConfigError, match="is in use"):
            racer_b.acquire()
        racer_a.release()
        assert not racer_a.store.exists(".lock")
    finally:
        first._stop.set()


def _a_dead_machine_s_lock(url: str, monkeypatch) -> bytes:
    """A lock left by a launch on a machine that died: this test's launches run on another machine,
    a minute and more after its last refresh."""
    raw = json.dumps({"host": "dead-machine", "pid": 7, "since": 0, "token": "dead"}).encode()
    open_store(url).write(".lock", raw)
    real_time = runs.time.time
    monkeypatch.setattr(runs.socket, "gethostname", lambda: "another-machine")
    monkeypatch.setattr(runs.time, "time", lambda: real_time() + runs.LOCK_STALE_S + 5)
    return raw


def test_a_launch_that_judged_a_lock_dead_before_another_took_it_over_never_deletes_the_new_one(root, monkeypatch):
    """Launches A and B both read the dead machine's lock; A takes it over and holds the run; B's takeover,
    a moment later, must find the lock no longer the one it judged dead (before, B deleted A's lock and
    both launches wrote the same checkpoints)."""
    url = root()
    stale = _a_dead_machine_s_lock(url, monkeypatch)
    a, b = RunDir(url).lock(), RunDir(url).lock()
    assert b._read() == stale  # B looks at the lock first ...
    a.acquire()  # ... A takes it over ...
    try:
        b._take_over(stale, runs._parsed(stale))  # ... then B goes on with what it saw
        assert a.holder()["token"] == a.token and a.took_over["token"] == "dead"
        with pytest.raises(ConfigError, match="is in use by the launch of pid"):
            b.acquire()
        assert a.holder()["token"] == a.token
    finally:
        a.release()


def test_a_takeover_left_by_a_launch_that_died_during_it_does_not_lock_the_run_for_good(root, monkeypatch):
    url = root()
    _a_dead_machine_s_lock(url, monkeypatch)
    store = open_store(url)
    store.write(".lock.takeover-dead", b"{}")  # its maker died before deleting the dead lock
    runs_time = runs.time.time
    monkeypatch.setattr(store, "modified", lambda key: runs_time() - 2 * runs.LOCK_STALE_S)
    lock = RunDir(url).lock()
    lock.store = store
    lock.acquire()
    try:
        assert lock.took_over["token"] == "dead"
        assert not [n for n in store.list() if "takeover" in n], "the leftover is cleared with the dead lock"
    finally:
        lock.release()


def test_committed_steps_need_the_store_s_commit_marker(root):
    store = open_store(root())
    local = isinstance(store, LocalStore)
    marker = "_CHECKPOINT_METADATA" if local else "commit_success.txt"
    for step in (10, 20):
        store.write(f"checkpoints/{step}/{marker}", b"{}")
    store.write("checkpoints/30/_CHECKPOINT_METADATA" if not local else "checkpoints/30/state/x", b"{}")
    store.write("checkpoints/40.orbax-checkpoint-tmp/x", b"{}")
    assert committed_steps(store, "checkpoints") == [20, 10]
    assert RunDir(store.url).committed_steps() == [20, 10]


def test_a_result_in_a_notebook_shows_the_report_picture_of_a_run_on_any_store(root):
    run = RunDir(root())
    run.write_object("report.png", b"\x89PNG fake")
    summary = {"status": "finished", "final_step": 3, "run_dir": str(run.path)}
    assert "data:image/png;base64,iVBORyBmYWtl" in notebook.to_html(summary, None, run.path)
    assert "data:image/png;base64,iVBORyBmYWtl" in notebook.to_markdown(summary, None, run.path)


def test_stores_that_cannot_serve_are_one_line(root, monkeypatch):
    store = open_store(root())
    store.check()
    if isinstance(store, LocalStore):
        return
    scheme = store.url.split("://")[0]
    with pytest.raises(ConfigError, match="bucket no-such-bucket-x does not exist"):
        open_store(f"{scheme}://no-such-bucket-x/run").check()
    with pytest.raises(ConfigError, match="a path, s3:// or gs://"):
        open_store("hdfs://namenode/run").check()


def test_s3_without_credentials_names_the_variables(monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: never reaches AWS
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
        ObjectStore("s3://some-bucket/run").check()


def test_a_cluster_s_hosts_are_told_where_the_store_is_but_not_its_secrets(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    env = endpoint_environment()
    assert env["AWS_ENDPOINT_URL"] == "http://minio.internal:9000" and "AWS_SECRET_ACCESS_KEY" not in env


def test_a_host_is_started_pointed_at_the_gcs_emulator_and_keeps_a_user_s_own_address():
    env = host_storage_environment({"STORAGE_EMULATOR_HOST": "127.0.0.1:1111"})
    assert env == {"TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:1111", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    assert host_storage_environment({}) == {}, "no emulator: nothing derived, no stale address"
    own = {"TENSORSTORE_GCS_HTTP_URL": "http://gcs.internal:8080", "STORAGE_EMULATOR_HOST": "127.0.0.1:3333"}
    assert host_storage_environment(own)["TENSORSTORE_GCS_HTTP_URL"] == "http://gcs.internal:8080", \
        "the user's own setting is never touched"


def test_an_unreachable_store_is_one_line_without_the_client_s_retry_logs(caplog):
    import logging

    from jaxlaunch.contract.protocol import ConfigError
    from jaxlaunch.contract.store import ObjectStore

    class Unreachable:
        def ls(self, path, detail=False):
            logging.getLogger("gcsfs").error("retry 3 of 6: connect call failed\nTraceback ...")
            raise OSError("Cannot connect to host 127.0.0.1:1")

    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError, match="cannot list bucket b .*Cannot connect"):
        ObjectStore("gs://b/run", fs=Unreachable()).check()
    assert not [r for r in caplog.records if r.name == "gcsfs"], caplog.text
    assert logging.getLogger("gcsfs").level == logging.NOTSET, "the client's logging is as it was"


def test_two_urls_that_read_alike_keep_their_host_logs_apart():
    """s3://b/x_y and s3://b/x/y both read `s3___b_x_y`: their runs' host logs, kept on this machine
    (an object store has no appends), went to one folder and overwrote each other."""
    from jaxlaunch.contract.layout import _slug

    assert _slug("s3://b/x_y") != _slug("s3://b/x/y")
    assert _slug("s3://b/x_y").startswith("s3___b_x_y-") and _slug("s3://b/x_y") == _slug("s3://b/x_y")
