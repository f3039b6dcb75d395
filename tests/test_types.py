"""The type check: mypy over the installed package's modules (`jaxlaunch.contract`, `.launcher`,
`.workers`, `.models`) and the unit tests' fakes, so a fake that drifts from the Protocol it stands in
for fails here rather than in a test that happens to pass."""

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"
"""The package as it installs (the repository keeps launcher/, workers/ and models/ at the top, and
setuptools maps them into jaxlaunch/), made of links so that mypy sees the installed module names."""
PACKAGE_FOLDERS = {"contract": ROOT / "jaxlaunch" / "contract", "launcher": ROOT / "launcher",
                   "workers": ROOT / "workers", "models": ROOT / "models"}


def _link_tree() -> None:
    shutil.rmtree(TREE / "jaxlaunch", ignore_errors=True)
    shutil.rmtree(TREE / "tests", ignore_errors=True)
    (TREE / "jaxlaunch").mkdir(parents=True)
    for module in (ROOT / "jaxlaunch").glob("*.py"):
        (TREE / "jaxlaunch" / module.name).symlink_to(module)
    for name, folder in PACKAGE_FOLDERS.items():
        (TREE / "jaxlaunch" / name).symlink_to(folder, target_is_directory=True)
    (TREE / "tests" / "unit").mkdir(parents=True)
    for init in (TREE / "tests" / "__init__.py", TREE / "tests" / "unit" / "__init__.py"):
        init.touch()
    (TREE / "tests" / "unit" / "fakes.py").symlink_to(ROOT / "tests" / "unit" / "fakes.py")


def test_the_package_and_the_fakes_type_check():
    _link_tree()
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(ROOT / "build" / "mypy_cache"), "-p", "jaxlaunch", "-m", "tests.unit.fakes"],
        cwd=TREE, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "MYPYPATH"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
