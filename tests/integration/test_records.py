"""A run's records across versions and fault scenarios: a run written before events were typed still
resumes, and the goodput split of a chaos run adds up (the autouse check of conftest.py runs after
every test here too; a run without a warm standby: test_tracking.py's metrics test)."""

import shutil

from tests.integration.helpers import MINIMAL, ROOT, attempts, events, launch, summary

OLD_RUN = ROOT / "tests" / "fixtures" / "run_v0_kill"


def test_a_run_written_before_typed_events_resumes(tmp_path):
    run_dir = shutil.copytree(OLD_RUN, tmp_path / "old")
    result = launch("--resume", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = attempts(run_dir)
    assert [(a["attempt"], a["cause"], a["restored_step"]) for a in table] == [
        (1, "crashed", None), (2, "finished", 50), (3, "finished", 150)], "numbered on from the old attempts"
    assert summary(run_dir)["final_step"] == 200 and len(events(run_dir, "launch")) == 2


def test_chaos_split_adds_up(tmp_path):
    run_dir = tmp_path / "run"
    # Chaos's first gap (seeded by --seed 0) is 1.86 mean gaps: 0.93 s here, so the kill comes at the
    # first poll after both hosts stepped, however fast the machine trains (with a 3 s mean, 5.6 s
    # could outlast a 600-step run). One restart is enough for the split.
    result = launch("--hosts", "2", *MINIMAL, "--steps", "600", "--save-every", "20", "--chaos", "0.5",
                    "--max-restarts", "1", "--run-dir", str(run_dir))
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]
    assert events(run_dir, "chaos_kill"), "chaos killed a host"
    assert len(attempts(run_dir)) == 2, "and the job restarted once"
