"""The type check: mypy over the installed package's modules (`jaxlaunch.contract`, `.launcher`,
`.workers`, `.models`) and the unit tests' fakes, so a fake that drifts from the Protocol it stands in
for fails here rather than in a test that happens to pass. Its settings are `[tool.mypy]` in
pyproject.toml; a cold run takes about 25 s of CPU (JAX and Flax are read once), a warm one a few."""

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
TREE = BUILD / "typecheck"
PACKAGE_FOLDERS = {"contract": ROOT / "jaxlaunch" / "contract", "launcher": ROOT / "launcher",
                   "workers": ROOT / "workers", "models": ROOT / "models"}
FAKES = ROOT / "tests" / "unit" / "fakes.py"


def _link_tree(fakes: str | None = None) -> pathlib.Path:
    """The package as it installs (the repository keeps launcher/, workers/ and models/ at the top, and
    setuptools maps them into jaxlaunch/), made of links so that mypy sees the installed module names;
    and the fakes, as they are or as `fakes` says. One place for both, so mypy's cache serves both."""
    tree = TREE
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "jaxlaunch").mkdir(parents=True)
    for module in (ROOT / "jaxlaunch").glob("*.py"):
        (tree / "jaxlaunch" / module.name).symlink_to(module)
    for name, folder in PACKAGE_FOLDERS.items():
        (tree / "jaxlaunch" / name).symlink_to(folder, target_is_directory=True)
    (tree / "tests" / "unit").mkdir(parents=True)
    for init in (tree / "tests" / "__init__.py", tree / "tests" / "unit" / "__init__.py"):
        init.touch()
    if fakes is None:
        (tree / "tests" / "unit" / "fakes.py").symlink_to(FAKES)
    else:
        (tree / "tests" / "unit" / "fakes.py").write_text(fakes)
    return tree


def _mypy(tree: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(BUILD / "mypy_cache"), "-p", "jaxlaunch", "-m", "tests.unit.fakes"],
        cwd=tree, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "MYPYPATH"})


def test_the_package_and_the_fakes_type_check():
    result = _mypy(_link_tree())
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_a_fake_that_drifts_from_its_protocol_fails_the_check():
    """The fake worker group's `kill` taking a rank of another type than `WorkerGroup.kill` does."""
    good = "    def kill(self, rank: int) -> None:"
    text = FAKES.read_text()
    assert good in text
    result = _mypy(_link_tree(text.replace(good, "    def kill(self, rank: str) -> None:")))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    assert 'got "FakeGroup", expected "WorkerGroup"' in result.stdout, result.stdout[-3000:]


def test_a_launch_keyword_of_the_wrong_type_fails_the_check():
    """`jaxlaunch.launch(hosts="2")` in a user's code: the type checker names the keyword."""
    user_code = ("\n\ndef a_users_launch() -> None:\n    from jaxlaunch.launcher.api import launch\n\n"
                 "    launch(hosts=2, steps=10, mesh='data=-1', inject=['kill@step=3'])\n"
                 "    launch(hosts='2')\n")
    result = _mypy(_link_tree(FAKES.read_text() + user_code))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and 'Argument "hosts" to "launch" has incompatible type "str"' in errors[0], errors
