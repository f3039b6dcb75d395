"""A slow host, in real processes: the driver names it from the hosts' busy time per step."""

from tests.integration.helpers import MINIMAL, events, launch, read_jsonl

SLOW_FROM_STEP = 40
DETECT_WITHIN_STEPS = 30


def test_a_host_three_times_as_busy_is_named_within_30_steps(tmp_path):
    run_dir = tmp_path / "run"
    result = launch("--hosts", "4", *MINIMAL, "--steps", "120", "--save-every", "50", "--run-dir", str(run_dir),
                    "--inject", f"slow@step={SLOW_FROM_STEP},host=1,factor=3")
    assert result.returncode == 0, result.stdout + result.stderr
    stragglers = events(run_dir, "straggler")
    assert [s["host"] for s in stragglers] == [1], stragglers
    [straggler] = stragglers
    # Named once its slow steps are most of the newest 20 (the window may begin before the slowdown).
    assert SLOW_FROM_STEP < straggler["last_step"] <= SLOW_FROM_STEP + DETECT_WITHIN_STEPS, straggler
    [started] = events(run_dir, "attempt_started")
    assert straggler["node"] == started["nodes"][1] and straggler["factor"] >= 1.3
    assert "host 1 (node" in result.stdout and "is slow" in result.stdout, "the user is told on the terminal"
    [per_host] = events(run_dir, "host_busy")
    assert per_host["busy_s"][1] == max(per_host["busy_s"]), per_host
    records = read_jsonl(run_dir / "metrics.jsonl")
    timed = [r for r in records if r.get("step_time_s") is not None]
    assert len(timed) >= 115 and all(abs(r["busy_s"] + r["blocked_s"] - r["step_time_s"]) < 1e-9 for r in timed)
    print(f"straggler named at step {straggler['last_step']} (slow from {SLOW_FROM_STEP}), "
          f"factor {straggler['factor']:.2f}, busy {per_host['busy_s']}")
