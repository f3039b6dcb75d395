"""The defaults: the memory tier on, each tier's cadence chosen from measured cost, the progress line
fed by the hosts' reports (never by listing the run directory)."""

from __future__ import annotations

import math
import uuid

import pytest
from jaxlaunch.launcher.records.runs import RunDir

from jaxlaunch.contract import events as ev
from tests.integration.helpers import MINIMAL, events, launch, read_jsonl, trajectory
from tests.integration.object_stores import s3

pytestmark = pytest.mark.standby  # a killed host restores from memory onto the warm standby


def test_the_defaults_choose_a_cadence_from_measurements_and_a_killed_host_restores_from_memory(
        minimal_reference, tmp_path):
    """No --save-every, no --memory-tier, no --no-warm-standby: rank 0 measures its steps and a first
    memory save, chooses each tier's interval (printed, and a `cadence_chosen` event), every host saves
    at those steps, and a host killed at step 180 comes back from host memory, on the warm standby's
    processes, with the uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    result = launch("--hosts", "2", *MINIMAL, "--steps", "200", "--inject", "kill@step=180,host=1",
                    "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    chosen = [e for e in events(run_dir, "cadence_chosen") if e["attempt"] == 1]
    assert chosen, "the first attempt chose a cadence"
    first = chosen[0]
    assert first["step"] == 4 and first["step_time_s"] > 0 and first["memory_blocking_s"] > 0, first
    every = first["memory_every"]
    assert first["memory_slowdown_s"] == 0.0, "the step after a memory save is not measured yet at step 4"
    cost = first["memory_blocking_s"] + first["memory_slowdown_s"]
    assert every == max(1, math.ceil(cost / (0.01 * first["step_time_s"]) - 1e-9)), \
        "as often as keeps a memory save's cost at or below 1 % of a step"
    assert first["durable_every"] <= 600 / first["step_time_s"], "durable saves at most 600 s apart"
    assert f"checkpoint cadence from step 4: memory every {every}" in result.stdout
    (restored,) = events(run_dir, "restored")
    assert restored["tier"] == "memory" and restored["durable_bytes_read"] == 0, restored
    # The spares are made once both hosts were heard past their first step; 180 steps leave them
    # time to be placed on a loaded machine (at 120, about a second after, they were).
    started = [e["on_standby"] for e in events(run_dir, "attempt_started")]
    assert started == [False, True], f"the warm standby took the restart over: {started}"
    # The first attempt's memory saves, from its cadence (which a moved step time may have changed on
    # the way): the restore reads the newest before the kill, or the one before when the kill landed
    # while the newest's part was in flight. The step records that reached the driver say the same;
    # on a loaded machine the newest ones may not have (they come back with the restored part, without
    # the save's own fields, which are added once it returned).
    schedule = saves_of(chosen, until=180)
    recorded = sorted(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")
                      if r["attempt"] == 1 and r.get("checkpoint_tier") == "memory")
    assert recorded[:2] == [3, 4] and set(recorded) <= set(schedule), (recorded, schedule)
    assert restored["step"] in schedule[-2:], (restored, schedule)
    assert trajectory(run_dir) == trajectory(minimal_reference), "the uninterrupted run's losses"
    assert "mem ·" in result.stdout and "disk" in result.stdout, "the progress line shows both tiers"


def saves_of(chosen: list[dict], until: int) -> list[int]:
    """The memory saves of an attempt that measured at steps 3 and 4: each later one `memory_every`
    steps after the previous save, by the cadence chosen before it."""
    saves = [3, 4]
    for step in range(5, until + 1):
        every = [e["memory_every"] for e in chosen if e["step"] < step][-1]
        if step - saves[-1] == every:
            saves.append(step)
    return saves


def test_a_run_with_the_memory_tier_lists_its_checkpoints_no_more_than_once_per_durable_save(monkeypatch):
    """On an object store every listing is a paid request: between its first step and its end, the
    run lists the checkpoint folder at most once per durable save (the progress line hears the
    commits from the hosts), counted at the S3 emulator."""
    with s3() as emulator:
        bucket = f"jaxlaunch-{uuid.uuid4().hex[:12]}"
        emulator.create_bucket(bucket)
        for key, value in emulator.env.items():
            monkeypatch.setenv(key, value)  # for this process's readers of the run (RunDir)
        run_url = f"s3://{bucket}/runs/lm"
        result = launch("--hosts", "2", *MINIMAL, "--steps", "400", "--persist-every", "100",
                        "--run-dir", run_url, env=emulator.env)
        assert result.returncode == 0, result.stdout + result.stderr
        run = RunDir(run_url)
        timeline = [e for e in run.events() if isinstance(e, ev.StartupTimeline)]
        trained_from = min(e.first_step_done for e in timeline if e.first_step_done is not None)
        trained_until = max(e.time for e in run.events() if isinstance(e, ev.FinalSave))
        lists = [r for r in emulator.requests if r.lists("runs/lm/checkpoints")
                 and trained_from <= r.time <= trained_until]
        durable = [r["step"] for r in run.metric_records() if r.get("checkpoint_tier") == "durable"]
        assert durable == [100, 200, 300, 400], durable
        assert len(lists) <= len(durable), [(r.time - trained_from, r.query) for r in lists]
