"""Bad input: a one-line error naming the fix, exit code 2, nothing written or deleted."""

import os

import pytest

from tests.integration.helpers import SHORT_RUN, launch, tree_snapshot


def assert_refused(result, message: str):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hosts", "0"], "--hosts must be at least 1"),
        (["--hosts", "-2"], "--hosts must be at least 1"),
        (["--mesh", "data=-1,model=3"], "does not divide the 8 devices"),
        (["--global-batch-size", "30"], "not divisible by the data-parallel size 4"),
        (["--model", "huge"], "unknown model preset 'huge'"),
        (["--data", "/nonexistent/corpus.txt"], "no such file or folder"),
        (["--inject", "explode@step=3"], "--inject 'explode@step=3'"),
        (["--min-hosts", "5"], "--min-hosts"),
    ],
)
def test_invalid_arguments_are_refused_before_anything_runs(tmp_path, args, message):
    run_dir = tmp_path / "run"
    assert_refused(launch(*args, "--run-dir", str(run_dir)), message)
    assert not run_dir.exists()


def test_data_too_short_for_one_sequence(tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("only a few bytes")
    run_dir = tmp_path / "run"
    assert_refused(launch("--data", str(data), "--run-dir", str(run_dir)), "fewer than a sequence of 129")
    assert not run_dir.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_data_file(tmp_path):
    data = tmp_path / "secret.txt"
    data.write_text("text " * 100)
    data.chmod(0)
    assert_refused(launch("--data", str(data), "--run-dir", str(tmp_path / "run")), "cannot read")


def test_more_hosts_than_the_cluster_can_place(tmp_path):
    run_dir = tmp_path / "run"
    result = launch("--hosts", "16", "--mesh", "data=-1", "--run-dir", str(run_dir))
    assert_refused(result, "cannot place 16 hosts")
    assert "room for 8" in result.stderr and "--hosts 8" in result.stderr
    assert not run_dir.exists()


def test_resume_with_another_model_keeps_the_checkpoints(reference_run):
    before = tree_snapshot(reference_run)
    result = launch("--resume", "--run-dir", str(reference_run), "--model", "small")
    assert_refused(result, "hold model 'tiny', not 'small'")
    assert "--model tiny" in result.stderr
    assert tree_snapshot(reference_run) == before


def test_a_used_run_directory_is_not_overwritten(reference_run):
    before = tree_snapshot(reference_run)
    result = launch("--hosts", "2", *SHORT_RUN, "--run-dir", str(reference_run))
    assert_refused(result, "is not empty: pass --resume")
    assert tree_snapshot(reference_run) == before


def test_resume_of_a_missing_run(tmp_path):
    assert_refused(launch("--resume", "--run-dir", str(tmp_path / "nothing")), "does not exist")
