"""Every guarantee on user code: the examples and a file outside the project, through --entry and
through `jaxlaunch.launch`."""

import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.integration.helpers import (
    CLASSIFIER,
    DURABLE_ONLY,
    EXAMPLE_RUN,
    EXAMPLES,
    MINIMAL,
    ROOT,
    assert_no_host_left,
    attempts,
    committed_steps,
    events,
    final_arrays,
    host_pids,
    last_step,
    launch,
    read_jsonl,
    signal_after,
    start,
    summary,
    trajectory,
    wait_for,
)


def test_a_host_killed_from_outside_changes_nothing(minimal_reference, tmp_path):
    """SIGKILL, from outside the launcher, to host 1 of examples/minimal.py mid-run: the job finishes,
    and its losses and final parameters equal the uninterrupted run's bit for bit."""
    run_dir = tmp_path / "run"
    proc = start("--hosts", "2", *MINIMAL, *EXAMPLE_RUN, "--run-dir", str(run_dir))
    try:
        wait_for(lambda: last_step(run_dir) >= 40, 300, "step 40", proc)  # past the first saves, whatever their cadence
        os.kill(host_pids(run_dir)[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    first, second = attempts(run_dir)
    assert (first["cause"], first["failed_host"]) == ("crashed", 1)
    assert second["restored_step"] >= 20 and second["restored_step"] % 20 == 0
    assert trajectory(run_dir) == trajectory(minimal_reference)
    ours, reference = final_arrays(run_dir, 200), final_arrays(minimal_reference, 200)
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
    assert_no_host_left(run_dir)


def test_the_classifier_moves_from_4_hosts_to_2_with_its_sharding_rules(classifier_reference, tmp_path):
    """examples/classifier.py (tensor parallelism over `model`, dropout, a Grain pipeline) stopped on
    4 hosts and resumed on 2: the state lands in the new shardings and the run agrees with the
    uninterrupted 2-host run."""
    run_dir = tmp_path / "run"
    proc = start("--hosts", "4", *CLASSIFIER, *EXAMPLE_RUN, "--run-dir", str(run_dir))
    code, out, err = signal_after(proc, run_dir, 12)
    assert code == 143, out + err
    result = launch("--resume", "--run-dir", str(run_dir), "--hosts", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    restored = events(run_dir, "restored")[0]
    assert restored["saved_topology"] == {"num_hosts": 4, "num_devices": 8, "mesh": {"data": 4, "model": 2}}
    assert restored["mesh"] == {"data": 2, "model": 2}
    # The hidden layer's kernel (32, 128) is split over `model` by the example's own rules.
    assert restored["sharding"] == "P(None, 'model')" and restored["shard_shape"] == [32, 64]
    ours, reference = trajectory(run_dir), trajectory(classifier_reference)
    assert ours.keys() == reference.keys()
    assert max(abs(ours[s] - reference[s]) for s in ours) < 1e-3
    accuracy, reference_accuracy = trajectory(run_dir, "accuracy"), trajectory(classifier_reference, "accuracy")
    assert abs(accuracy[200] - reference_accuracy[200]) <= 1 / 64, "at most one example of the batch differs"


def test_a_preemption_notice_saves_one_common_step_and_loses_none(tmp_path):
    run_dir = tmp_path / "run"
    result = launch("--hosts", "4", *MINIMAL, *EXAMPLE_RUN, "--run-dir", str(run_dir),
                    "--inject", "preempt@step=50,host=2", "--max-restarts", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = attempts(run_dir)
    assert first["cause"] == "preempted" and summary(run_dir)["restarts_by_cause"] == {"preempted": 1}
    assert second["restored_step"] == first["last_step"] >= 50, "every host saved the same, last step"
    assert sorted(trajectory(run_dir)) == list(range(1, 201))
    recomputed = len([r for r in (run_dir / "metrics.jsonl").read_text().splitlines()]) - 200
    assert recomputed == 0, "zero steps lost"


OUTSIDE = '''
import jax.numpy as jnp
import optax
from flax import nnx

from helpers import Linear, batch  # a sibling module of this file


def main(ctx):
    def init():
        model = Linear(nnx.Rngs(ctx.seed))
        return model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    (model, optimizer), start = ctx.restore_or_init(init)

    @nnx.jit
    def step_fn(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    for step in range(start + 1, ctx.steps + 1):
        if step == ctx.config.get("fail_at") and ctx.process_index == 1:
            raise RuntimeError("reading my data timed out (UNAVAILABLE)")
        loss = step_fn(model, optimizer, *ctx.global_batch(batch, step, 16))
        ctx.report(step, loss=loss)
        ctx.maybe_save(step, (model, optimizer))
        if ctx.should_stop(step):
            break
    return {"hosts": ctx.process_count}
'''
HELPERS = '''
import numpy as np
import pytest
from flax import nnx


class Linear(nnx.Module):
    def __init__(self, rngs):
        self.layer = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        return self.layer(x)


def batch(step, rows):
    x = np.random.default_rng(step).normal(size=(16, 4)).astype(np.float32)[rows]
    return x, x.sum(axis=1, keepdims=True)
'''


def user_project(tmp_path):
    project = tmp_path / "my-project"
    project.mkdir()
    (project / "train.py").write_text(OUTSIDE)
    (project / "helpers.py").write_text(HELPERS)
    return project


def test_a_user_file_outside_the_project_runs_on_4_hosts(tmp_path):
    project = user_project(tmp_path)
    run_dir = tmp_path / "run"
    result = launch("--entry", f"{project / 'train.py'}:main", "--hosts", "4", "--steps", "12", "--save-every", "6",
                    *DURABLE_ONLY, "--run-dir", str(run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    s = summary(run_dir)
    assert s["process_count"] == 4 and s["final_step"] == 12 and s["returned"] == {"hosts": 4}
    assert committed_steps(run_dir) == [6, 12]


def test_rank_0_s_own_work_after_training_never_fails_the_finished_job(tmp_path):
    """Rank 0 evaluates for a while after the loop; host 1 returns at once. JAX's shutdown barrier
    (`distributed.shutdown_timeout_s`, 1 s here, 10 s by default) aborted host 1 as it left: a
    finished job became a crash and was trained again. The hosts now leave together once all returned."""
    entry = tmp_path / "evaluates.py"
    entry.write_text(
        "import time\n"
        "import jax.numpy as jnp\n"
        "def main(ctx):\n"
        "    state, start = ctx.restore_or_init(lambda: {'w': jnp.zeros((4,))})\n"
        "    for step in range(start + 1, ctx.steps + 1):\n"
        "        ctx.report(step)\n"
        "        ctx.maybe_save(step, state)\n"
        "    if ctx.process_index == 0:\n"
        "        time.sleep(4)  # rank 0's own work after training: an evaluation, an export\n"
        "    return {'rank': ctx.process_index}\n")
    config = tmp_path / "job.yaml"
    config.write_text("distributed:\n  shutdown_timeout_s: 1\n")
    run_dir = tmp_path / "run"
    result = launch("--entry", f"{entry}:main", "--hosts", "2", "--steps", "3", "--config", str(config),
                    *DURABLE_ONLY, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [a["cause"] for a in attempts(run_dir)] == ["finished"] and summary(run_dir)["returned"] == {"rank": 0}
    logs = "".join(path.read_text(errors="replace") for path in (run_dir / "hosts").glob("*.log"))
    assert "Terminating process" not in logs and "Shutdown barrier has failed" not in logs


def test_an_exception_in_user_code_reaches_the_terminal_and_twice_stops_the_job(tmp_path):
    project = user_project(tmp_path)
    run_dir = tmp_path / "run"
    result = launch("--entry", f"{project / 'train.py'}:main", "--hosts", "2", "--steps", "12", "--save-every", "2",
                    "--set", "fail_at=5", "--max-restarts", "5", *DURABLE_ONLY, "--run-dir", str(run_dir))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "deterministic failure: the same exception at step 4 on two attempts" in result.stderr
    assert "checkpoints are kept" in result.stderr
    # The traceback, with the host's rank, the user's own line and the exception.
    assert "host 1 (rank 1), after step 4" in result.stdout and 'raise RuntimeError("reading my data' in result.stdout
    table = attempts(run_dir)
    assert [(a["cause"], a["failed_host"]) for a in table] == [("exception", 1), ("exception", 1)], \
        "an exception whose text says timed out is still the user's"
    assert committed_steps(run_dir) == [2, 4], "checkpoints are kept"
    failure = events(run_dir, "failure")[0]
    assert failure["message"] == "RuntimeError: reading my data timed out (UNAVAILABLE)"
    assert "train.py" in failure["traceback"]


def test_the_records_of_the_steps_before_an_exception_reach_the_run_however_fast_the_steps(tmp_path):
    """Steps of a millisecond raise at step 150, far between two of the driver's polls: the records of
    every step up to it are the run's (a loss that went wrong before the error is seen), and the
    attempt table says where each attempt got. The hosts keep in step (a barrier each step, as a
    training step's all-reduce would): without one, a host far behind the other could be torn down
    before it reached step 150, once the other's error was heard out."""
    entry = tmp_path / "diverges.py"
    entry.write_text(
        "import jax.numpy as jnp\n"
        "from jax.experimental import multihost_utils\n\n\n"
        "def main(ctx):\n"
        "    state, start = ctx.restore_or_init(lambda: {'loss': jnp.zeros(())})\n"
        "    loss = state['loss']\n"
        "    for step in range(start + 1, ctx.steps + 1):\n"
        "        loss = loss + 1.0\n"
        "        ctx.report(step, loss=loss)\n"
        "        multihost_utils.sync_global_devices('step')  # in step, as a gradient's all-reduce keeps hosts\n"
        "        if step == 150:\n"
        "            raise FloatingPointError(f'the loss diverged at step {step}')\n")
    run_dir = tmp_path / "run"
    result = launch("--entry", str(entry), "--hosts", "2", "--steps", "400", "--run-dir", str(run_dir))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the same exception at step 150 on two attempts" in result.stderr, result.stderr
    records = read_jsonl(run_dir / "metrics.jsonl")
    for attempt in (1, 2):
        steps = sorted(r["step"] for r in records if r["attempt"] == attempt)
        assert steps == list(range(1, 151)), (attempt, steps[-3:])
    assert [(a["first_step"], a["last_step"]) for a in attempts(run_dir)] == [(1, 150), (1, 150)]


SELF_EDITING = """
import pathlib
import re

from job_version import VERSION

EDITED = False


def main(ctx):
    def init():
        model = MLP(nnx.Rngs(ctx.seed))
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    (model, optimizer), start = ctx.restore_or_init(init)
    for step in range(start + 1, ctx.steps + 1):
        x, y = ctx.global_batch(rows, step, batch_size=64)
        ctx.report(step, loss=train_step(model, optimizer, x, y))
        ctx.maybe_save(step, (model, optimizer))
        if step == 6 and ctx.attempt == 1 and ctx.process_index == 1:  # every host imported it; before the kill
            path = pathlib.Path(__file__)
            path.write_text(re.sub(r"^EDITED = False$", "EDITED = True", path.read_text(), flags=re.M))
            (path.parent / "job_version.py").write_text("VERSION = 2\\n")  # a file it imports
    return {"version": VERSION}
"""


@pytest.mark.own_ray  # the embedded Ray, as a user runs it: its hosts import the file itself (a cluster's, a copy)
def test_an_entry_file_edited_during_the_run_is_refused_at_the_restart_and_resumed_only_when_allowed(tmp_path):
    """examples/minimal.py's job, its entry file edited while the job runs (here by the job itself,
    before a kill): the restart would import other code, so every host refuses it before its first
    step, and the job stops naming `--allow-change entry`, its newest memory step written durably. A
    plain resume is refused; one that allows the change trains on from that step with the edited
    code, and the change is recorded."""
    entry, run_dir = tmp_path / "train.py", tmp_path / "run"
    entry.write_text((EXAMPLES / "minimal.py").read_text().replace("def main(ctx):", "def example(ctx):")
                     + SELF_EDITING)
    (tmp_path / "job_version.py").write_text("VERSION = 1\n")
    args = ("--entry", str(entry), "--hosts", "2", "--steps", "40", "--save-every", "4", "--run-dir", str(run_dir))
    result = launch(*args, "--inject", "kill@step=10,host=1")
    assert result.returncode == 1, result.stdout + result.stderr
    first, second = attempts(run_dir)
    assert (first["cause"], first["failed_host"]) == ("crashed", 1)
    assert second["cause"] == "exception" and f"its files {entry}, {tmp_path / 'job_version.py'} changed since the " \
        "run was launched" in second["message"], second
    assert "fix: resume with --resume --allow-change entry" in events(run_dir, "job_failed")[-1]["reason"]
    committed = committed_steps(run_dir)
    assert committed and max(committed) == 8, committed

    refused = launch("--resume", "--run-dir", str(run_dir))
    assert refused.returncode == 2 and "--allow-change entry" in refused.stderr, refused.stdout + refused.stderr
    assert committed_steps(run_dir) == committed

    resumed = launch("--resume", "--run-dir", str(run_dir), "--allow-change", "entry")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert events(run_dir, "restored")[-1]["step"] == 8
    assert "entry" in events(run_dir, "launch")[-1]["changes"]
    assert summary(run_dir)["final_step"] == 40 and attempts(run_dir)[-1]["returned"] == {"version": 2}


def test_the_user_s_own_pytest_with_jaxlaunch_launch(tmp_path):
    """examples/test_user_job.py, as a user would run it: `jaxlaunch.launch` in their own pytest, a
    kill injected, the result compared with an uninterrupted run."""
    result = subprocess.run([sys.executable, "-m", "pytest", str(EXAMPLES / "test_user_job.py"), "-q",
                             "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "pytest")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "1 passed" in result.stdout


def test_an_installed_jaxlaunch_never_shadows_the_user_s_own_packages(tmp_path):
    """A non-editable install (into a fresh virtual environment that borrows this one's third-party
    packages, so nothing is downloaded), used from a project that has packages of its own named
    models, workers and launcher: the built-in model and the project's own entry (which imports its
    own `models`) both run, and jaxlaunch installs no top-level name but its own."""
    import site

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(f"{purelib}/borrowed.pth", "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--quiet", str(ROOT)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    installed = {p.name.split(".")[0].split("-")[0] for p in pathlib.Path(purelib).iterdir()} - {"borrowed"}
    assert "jaxlaunch" in installed and not installed & {"launcher", "workers", "models", "launch"}, installed

    project = tmp_path / "project"
    for package in ("models", "workers", "launcher"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f"WHOSE = {'the project s own ' + package!r}\n")
    (project / "models" / "mlp.py").write_text((EXAMPLES / "minimal.py").read_text())
    (project / "train.py").write_text(
        "import launcher, workers\n"
        "from models import WHOSE, mlp\n"
        "assert WHOSE == 'the project s own models' and launcher.WHOSE.endswith('launcher'), WHOSE\n"
        "main = mlp.main\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}
    imported = subprocess.run([str(python), "-c", "import jaxlaunch, jaxlaunch.launcher.cli as c; print(c.__file__)"],
                              cwd=project, capture_output=True, text=True, env=env)
    assert imported.returncode == 0 and "site-packages" in imported.stdout, imported.stdout + imported.stderr
    for run_dir, entry in (("builtin", ["--model", "tiny"]), ("own", ["--entry", "train.py:main"])):
        run = subprocess.run([str(venv / "bin" / "jaxlaunch"), *entry, "--hosts", "2", "--steps", "6",
                              "--run-dir", run_dir], cwd=project, capture_output=True, text=True, env=env, timeout=400)
        assert run.returncode == 0, run.stdout + run.stderr
        assert summary(project / run_dir)["final_step"] == 6
