import pathlib
import shutil

import pytest

from tests.integration.helpers import SHORT_RUN, launch


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> pathlib.Path:
    """An uninterrupted 2-host run of 30 steps (checkpoints at 10, 20, 30): what every interrupted
    run must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = launch("--hosts", "2", *SHORT_RUN, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


@pytest.fixture
def copy_of(tmp_path):
    def copy(run_dir: pathlib.Path) -> pathlib.Path:
        target = tmp_path / "copy"
        shutil.copytree(run_dir, target)
        return target
    return copy
