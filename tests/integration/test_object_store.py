"""Run directories on object stores, against real server emulators that these tests start on
loopback and stop: S3 (moto's server) and GCS (fake-gcs-server). The launcher, its hosts and
TensorStore reach them through the standard variables only, as they would reach MinIO or a bucket."""

from __future__ import annotations

import os
import shutil
import uuid

import numpy as np
import pytest
from jaxlaunch.launcher.records.runs import RunDir
from jaxlaunch.workers.checkpoints.durable import read_arrays

from jaxlaunch.contract import events
from tests.integration.helpers import DURABLE_ONLY, SHORT_RUN, SharedRay, assert_no_host_left, launch
from tests.integration.object_stores import EMULATORS


@pytest.fixture(params=sorted(EMULATORS))
def bucket(request):
    """A fresh bucket on a running emulator: (its URL, the variables that point every part at it)."""
    with EMULATORS[request.param]() as emulator:
        name = f"jaxlaunch-{uuid.uuid4().hex[:12]}"
        emulator.create_bucket(name)
        old = {k: os.environ.get(k) for k in emulator.env}
        os.environ.update(emulator.env)  # for this process's readers of the run (RunDir, Orbax)
        try:
            yield f"{emulator.scheme}://{name}", emulator.env
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def store_cluster(bucket):
    """A Ray instance whose processes have the emulator's variables, as the nodes of a cluster that
    reaches the bucket would: the test's launches share it (`--address`) instead of each starting its
    own (the session's instance does not have them)."""
    from jaxlaunch.launcher.cluster.embedded_ray import EmbeddedRay

    instance = EmbeddedRay(SharedRay.NUM_CPUS, env=bucket[1])
    instance.start()
    try:
        yield instance.address
    finally:
        instance.stop()


def trajectory(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.metric_records()}


def test_a_run_on_the_store_survives_a_kill_resumes_and_equals_a_local_run(bucket, store_cluster, reference_run):
    """Host 1 is killed mid-run, the run restores from the store, stops, and a --resume from the URL
    finishes it: losses and final arrays equal the uninterrupted local run bit for bit; the report
    reads the URL; a second launch on the URL while one holds it is refused."""
    url, env = bucket
    run_url = f"{url}/runs/lm"
    run = RunDir(run_url)
    try:
        first = launch("--hosts", "2", "--steps", "20", "--schedule-steps", "30", "--save-every", "10", *DURABLE_ONLY,
                       "--run-dir", run_url, "--inject", "kill@step=15,host=1", "--address", store_cluster, env=env)
        assert first.returncode == 0, first.stdout + first.stderr
        attempts = [e for e in run.events() if isinstance(e, events.AttemptEnded)]
        assert [(a.cause, a.host) for a in attempts] == [("crashed", 1), ("finished", None)]
        assert [e.step for e in run.events() if isinstance(e, events.Restored)] == [10]
        assert run.committed_steps() == [20, 10], "listed on the store by Orbax's commit file"
        assert [i["step"] for i in run.injections()] == [15]

        holder = run.lock()
        holder.acquire()
        try:
            refused = launch("--resume", "--run-dir", run_url, env=env, timeout=120)
        finally:
            holder.release()
        assert refused.returncode == 2 and "is in use by the launch of pid" in refused.stderr
        assert "resuming" not in refused.stdout, "a refused launch says one line, the refusal"

        second = launch("--resume", "--steps", "30", "--run-dir", run_url, "--address", store_cluster, env=env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert trajectory(run) == {r["step"]: r["loss"] for r in RunDir(reference_run).metric_records()}
        assert run.committed_steps() == [30, 20, 10]
        ours, reference = read_arrays(f"{run_url}/checkpoints/30"), read_arrays(reference_run / "checkpoints" / "30")
        assert ours.keys() == reference.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
        assert not run.store.exists(".lock"), "the lock went with the launch"
        assert run.store.list("tensorboard"), "TensorBoard's event files are on the store"

        printed = launch("report", run_url, env=env, timeout=120)
        assert printed.returncode == 0, printed.stdout + printed.stderr
        assert "goodput" in printed.stdout and "crashed" in printed.stdout
        assert run.store.read("report.png")[:8] == b"\x89PNG\r\n\x1a\n"
        assert_no_host_left(run_url)
    finally:
        shutil.rmtree(run.hosts, ignore_errors=True)


def test_bad_buckets_and_credentials_are_one_line_and_exit_2(bucket):
    url, env = bucket
    scheme = url.split("://")[0]
    missing = launch("--hosts", "2", *SHORT_RUN, "--run-dir", f"{scheme}://no-such-bucket-{uuid.uuid4().hex[:8]}/r",
                     env=env, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stdout + missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "Ray" not in missing.stdout + missing.stderr, "refused before any cluster started"
    resumed = launch("--resume", "--run-dir", f"{url}/never-ran", env=env, timeout=120)
    assert resumed.returncode == 2 and "does not exist" in resumed.stderr, resumed.stdout + resumed.stderr
