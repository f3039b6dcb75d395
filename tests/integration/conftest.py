import pathlib
import shutil

import pytest

from tests.integration.helpers import (
    CLASSIFIER,
    DRIVERS,
    DURABLE_ONLY,
    EXAMPLE_RUN,
    GRAIN,
    MINIMAL,
    SHARED_RAY,
    SHORT_RUN,
    WARM_STANDBY,
    assert_split_adds_up,
    launch,
)


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def _reference(tmp_path_factory, name: str, *args: str) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    result = launch("--hosts", "2", *args, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_split_adds_up(run_dir)
    return run_dir


@pytest.fixture(scope="session", autouse=True)
def shared_ray():
    """The Ray instance the session's launches share (`helpers.SharedRay`), stopped at its end."""
    yield SHARED_RAY
    DRIVERS.stop()
    SHARED_RAY.stop()


@pytest.fixture(autouse=True)
def own_ray_when_marked(request):
    """A test marked `own_ray` launches as a user without flags does: each launch its own embedded Ray."""
    shared = SHARED_RAY.enabled
    if request.node.get_closest_marker("own_ray"):
        SHARED_RAY.enabled = False
    yield
    SHARED_RAY.enabled = shared


@pytest.fixture(autouse=True)
def warm_standby_when_marked(request):
    """A test marked `standby` launches with the warm standby, as users do; the others without it
    (`helpers.WarmStandby`)."""
    WARM_STANDBY.wanted = request.node.get_closest_marker("standby") is not None
    yield
    WARM_STANDBY.wanted = False


@pytest.fixture(autouse=True)
def every_split_adds_up(tmp_path):
    """After every integration test (kill, hang, preemption, lost node, resize, chaos, standby on and
    off...): the goodput split of every run it left under its temporary directory adds up to the run's
    wall time."""
    yield
    for events in sorted(tmp_path.rglob("events.jsonl")):
        if (events.parent / "config.json").exists():
            assert_split_adds_up(events.parent)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> pathlib.Path:
    """The built-in model, uninterrupted on 2 hosts for 30 steps (durable checkpoints at 10, 20, 30,
    which tests copy and corrupt): what every interrupted run of it must reproduce."""
    return _reference(tmp_path_factory, "reference", *SHORT_RUN, *DURABLE_ONLY)


@pytest.fixture(scope="session")
def minimal_reference(tmp_path_factory) -> pathlib.Path:
    """examples/minimal.py, uninterrupted on 2 hosts for 200 steps (saves every 20, with the defaults)."""
    return _reference(tmp_path_factory, "minimal", *MINIMAL, *EXAMPLE_RUN)


@pytest.fixture(scope="session")
def classifier_reference(tmp_path_factory) -> pathlib.Path:
    """examples/classifier.py, uninterrupted on 2 hosts for 200 steps (checkpoints every 20)."""
    return _reference(tmp_path_factory, "classifier", *CLASSIFIER, *EXAMPLE_RUN)


@pytest.fixture(scope="session")
def grain_reference(tmp_path_factory) -> pathlib.Path:
    """examples/grain_iter.py (per-host Grain iterators), uninterrupted on 2 hosts for 60 steps."""
    return _reference(tmp_path_factory, "grain", *GRAIN, "--steps", "60")


@pytest.fixture
def two_nodes():
    """A head without CPUs (no host runs there) and two 1-CPU nodes: the elastic scenarios' cluster."""
    import ray

    from tests.integration.test_multinode import nodes

    cluster, workers = nodes(head_cpus=0, workers=2)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def copy_of(tmp_path):
    def copy(run_dir: pathlib.Path) -> pathlib.Path:
        target = tmp_path / "copy"
        shutil.copytree(run_dir, target)
        return target
    return copy
