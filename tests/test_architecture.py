"""The layering the code promises: decisions and the state machine need no Ray, and no module grows
into two."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500


def test_the_unit_tests_pass_with_ray_unimportable():
    code = ("import sys; sys.modules['ray'] = None\n"  # `import ray` now raises ImportError
            "import pytest\n"
            "sys.exit(pytest.main(['tests/unit', '-q', '-x', '-p', 'no:cacheprovider']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_no_module_of_the_launcher_is_over_500_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for folder in ("launcher", "workers", "models", "jaxlaunch") for p in (ROOT / folder).glob("*.py")}
    assert {k: v for k, v in sizes.items() if v > MAX_MODULE_LINES} == {}
