"""Test set-up, before anything is imported: 8 forced CPU devices for the in-process unit tests, Ray's
token authentication, and gcsfs's plain class (it picks its class when imported; its experimental one
asks the tests' GCS emulator for an API it lacks, a minute per bucket).

The soak: a fault scenario marked `@pytest.mark.soak` (taking the `soak_round` argument) runs once in
the suite, and N times with `--soak N` (`python -m pytest -m soak --soak 5`), which ends with each
scenario's success rate."""

import collections
import os
import subprocess

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Token authentication, as Ray 2.60 has it by default, for every Ray this session starts or joins (the
# launches' shared instance, test clusters) and every driver it starts, whatever the tests' order.
os.environ.setdefault("RAY_AUTH_MODE", "token")


def pytest_addoption(parser):
    parser.addoption("--soak", type=int, default=1, metavar="N",
                     help="run each fault scenario marked soak N times and report its success rate")


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: a fault scenario that --soak N repeats")
    config.addinivalue_line("markers", "own_ray: its launches start their own embedded Ray, not the session's")
    config.addinivalue_line("markers", "standby: its launches keep the warm standby (users' default); others' run "
                                       "without it (tests/integration/helpers.WarmStandby)")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("soak") and "soak_round" in metafunc.fixturenames:
        metafunc.parametrize("soak_round", range(metafunc.config.getoption("soak")))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.getoption("soak") <= 1:
        return
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for status in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(status, []):
            if report.when == "call" or status == "error":
                outcomes[report.nodeid.split("[")[0]][status] += 1
    terminalreporter.section("soak: success rate per scenario")
    for scenario, counts in sorted(outcomes.items()):
        runs = sum(counts.values())
        terminalreporter.write_line(f"{counts['passed']}/{runs} passed  {scenario}")


@pytest.fixture
def small_filesystem(tmp_path):
    """A tmpfs of a few MB for a run directory, unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = []

    def make(size_bytes: int):
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"mounting a small tmpfs needs privileges this machine lacks: {result.stderr.strip()}")
        mounted.append(mount)
        return mount

    yield make
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], check=False)
