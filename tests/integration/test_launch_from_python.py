"""Launching from where JAX code is first written: `python -` (the function travels by value), a
script without a `__main__` guard run with `python script.py` (nothing of it runs again on the hosts),
and an entry that fails on every host before its first step (one attempt, the fix, exit 1)."""

import subprocess
import sys

import pytest

from tests.integration.helpers import EXAMPLES, ROOT, SHARED_RAY, _env, attempts, events, launch, summary

SCRIPT = '''
import jaxlaunch

{model}

result = jaxlaunch.launch(main, hosts=2, steps=20, save_every=10, run_dir={run_dir!r}, address={address!r})
print("RESULT", result.status, result.final_step)
'''


@pytest.mark.parametrize("how", ["stdin", "script"])
def test_a_function_of_main_runs_on_the_hosts_and_the_script_does_not_run_again(tmp_path, how):
    """The launch call at the script's top level, with no guard: the hosts get `main` by value, so
    the script is never imported there, and the job runs once, in one attempt. The script starts its
    own Ray instance, as a user's does; `python -` runs on the session's (the instance is not what
    differs between the two)."""
    run_dir = tmp_path / "run"
    address = SHARED_RAY.address() if how == "stdin" and SHARED_RAY.enabled else None
    source = SCRIPT.format(model=(EXAMPLES / "minimal.py").read_text(), run_dir=str(run_dir), address=address)
    if how == "stdin":
        command, stdin = [sys.executable, "-"], source
    else:
        (tmp_path / "train.py").write_text(source)
        command, stdin = [sys.executable, "train.py"], None
    result = subprocess.run(command, input=stdin, cwd=tmp_path, capture_output=True, text=True, timeout=420,
                            env=_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT finished 20" in result.stdout
    assert [a["cause"] for a in attempts(run_dir)] == ["finished"]
    assert len(events(run_dir, "launch")) == 1, "no host launched a job of its own"
    assert summary(run_dir)["entry"].startswith("main (by value, code ")


BROKEN = '''
def main(ctx):
    from helpers_typo import batch  # the user's typo: the module is helpers
    return batch
'''


def test_an_entry_that_fails_on_every_host_before_its_first_step_stops_after_one_attempt(tmp_path):
    (tmp_path / "train.py").write_text(BROKEN)
    run_dir = tmp_path / "run"
    result = launch("--entry", f"{tmp_path / 'train.py'}:main", "--hosts", "2", "--max-restarts", "3",
                    "--run-dir", str(run_dir), cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert [(a["cause"], a["failed_host"]) for a in attempts(run_dir)] == [("exception", 0)], "no budget spent"
    assert "entry error: every host raised ModuleNotFoundError before its first step, so it was not retried; " \
           "fix: make that module importable where the hosts run" in result.stderr
    # The first host's traceback, down to the user's line.
    assert "host 0 (rank 0)" in result.stdout and "from helpers_typo import batch" in result.stdout
