"""benchmarks/gpu_check.sh runs everywhere: on a machine without a GPU it falls back to the CPU."""

import os
import re
import shutil
import subprocess
import sys

from tests.integration.helpers import ROOT


def test_gpu_check_prints_its_measurements():
    gpu = shutil.which("nvidia-smi") is not None
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env={**os.environ, "MODEL": "tiny", "STEPS": "12", "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert ("platform cuda" if gpu else "CPU fallback") in out
    for label in ("step time", "tokens/s", "checkpoint blocks", "cold start"):
        assert re.search(rf"{label}\s+[\d,.]+", out), (label, out)
