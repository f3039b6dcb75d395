"""The peers of the side-by-side benchmark (benchmarks/peers.py) run the built-in job and return sane
figures: a plain-JAX pair of processes with checkpoints, and Ray Train's JaxTrainer without a fault."""

from __future__ import annotations

import math
import pathlib

import pytest

from benchmarks import peers

pytestmark = pytest.mark.timeout(240)


def _check_common(r: dict, steps: int) -> None:
    assert set(peers.RESULT_KEYS) <= r.keys()
    assert r["final_step"] == steps
    losses = r["losses"]
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in losses.values())
    # From ln(256) = 5.55 for an untrained byte model, and falling even in the warm-up.
    assert 5.0 < losses[1] < 6.0
    assert losses[steps] < losses[1] - 0.1
    assert 0 < r["cold_start_s"] < 180
    assert r["steps_per_s"] is not None and 0 < r["steps_per_s"] < 1000
    assert r["recovery_s"] is None and r["steps_recomputed"] is None
    assert r["last_reported_checkpoint_survived"] is None


def test_plain_jax(tmp_path):
    r = peers.plain_jax(tmp_path, steps=12, save_every=6)
    _check_common(r, 12)
    assert r["cold_start_with_ray_s"] is None and r["recovered"] is None
    saved = sorted(int(p.name) for p in (pathlib.Path(r["run_dir"]) / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [6, 12]


def test_ray_train(tmp_path):
    try:
        import ray.train  # noqa: F401
        from ray.train.v2.jax import JaxTrainer  # noqa: F401
    except ImportError as err:
        pytest.skip(f'Ray Train is not installed (pip install "ray[train]", the optional peers extra): {err}')
    r = peers.ray_train(tmp_path, steps=8, save_every=4)
    _check_common(r, 8)
    assert r["cold_start_with_ray_s"] > r["cold_start_s"]
    assert r["recovered"] is None and r["notes"] == ""
