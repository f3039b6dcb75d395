"""Running the launcher as a user does (a subprocess of `python launch.py`) and reading its records."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil

from tests.integration.forked import Drivers, ForkedLaunch

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
LAUNCH_TIMEOUT_S = 420
SHORT_RUN = ("--steps", "30", "--save-every", "10")
EXAMPLE_RUN = ("--steps", "200", "--save-every", "20")
"""The examples take milliseconds a step: long enough runs to interrupt in the middle."""
DURABLE_ONLY = ("--no-memory-tier",)
"""For a test of the durable tier itself (Orbax's checkpoints in the run directory at every
--save-every step): the memory tier, on by default, would hold those saves in host memory instead."""
MINIMAL = ("--entry", str(EXAMPLES / "minimal.py"))
CLASSIFIER = ("--entry", f"{EXAMPLES / 'classifier.py'}:main")
GATED = ("--entry", f"{ROOT / 'tests' / 'integration' / 'gated.py'}:main")
"""examples/minimal.py's job with gates (`--set gates=N-M`): rank 0 waits after saving step N until the
test writes `go-N` in the run directory (`tests/integration/gated.py`)."""
GATED_GRAIN = ("--entry", f"{ROOT / 'tests' / 'integration' / 'gated_examples.py'}:grain")
"""examples/grain_iter.py's job (per-host Grain iterators) with the same gates."""
GATED_CLASSIFIER = ("--entry", f"{ROOT / 'tests' / 'integration' / 'gated_examples.py'}:classifier")
"""examples/classifier.py's job (a hidden layer split over the mesh's `model` axis) with the same gates."""
GRAIN = ("--entry", f"{EXAMPLES / 'grain_iter.py'}:main")


class SharedRay:
    """One Ray instance for the session's launches, started at the first launch that uses it and
    stopped at the session's end (or, through its lifeline, with the test process).

    A launch starts its own embedded Ray instance by default, about 7 s of a 25-30 s launch on 2 cores
    to start and stop. Most tests are about the job, not that instance: their launches run with
    `--address` on this one, the path of any existing cluster (the driver, the hosts, the keepers,
    the restarts are the same code). A test about the embedded instance itself (its processes, the
    loss of its node, what fits on it) is marked `own_ray`, and its launches start their own, as a
    user's launch without flags does. `JAXLAUNCH_TESTS_OWN_RAY=1` gives every launch its own."""

    NUM_CPUS = 8
    """As the embedded instance of a launch without flags has (`cluster.embedded_num_cpus`)."""

    def __init__(self) -> None:
        self.wanted = not os.environ.get("JAXLAUNCH_TESTS_OWN_RAY")
        self.enabled = self.wanted
        self._instance: Any = None

    @contextlib.contextmanager
    def for_these_launches(self) -> Iterator[None]:
        """The launches inside run on this instance, also in a test marked `own_ray`: for a launch
        that is not the test's subject, such as the resume after its embedded instance was lost."""
        enabled, self.enabled = self.enabled, self.wanted
        try:
            yield
        finally:
            self.enabled = enabled

    def address(self) -> str:
        if self._instance is None or not self._instance.alive():
            from jaxlaunch.launcher.cluster.embedded_ray import EmbeddedRay

            self.stop()
            self._instance = EmbeddedRay(self.NUM_CPUS)
            self._instance.start()
        return self._instance.address

    def stop(self) -> None:
        if self._instance is not None:
            self._instance.stop()
            self._instance = None


SHARED_RAY = SharedRay()


class WarmStandby:
    """Whether the current test's launches keep the warm standby (`--warm-standby`, the users' default).

    A spare group costs every attempt about 2 s of CPU per spare for its imports, beside the group it
    stands by for; on these 2 cores that was a fifth of a short launch's CPU, spent by every test whose
    launches never take the spares over. A test whose subject is a restart as users get it (a host
    killed, hung, lost with its node, replaced; a restore from the memory tier) is marked `standby`;
    the others' launches run with `--no-warm-standby`, the path a restart also takes when the cluster
    has no room for spares. Launches made outside a test (a session's reference runs) have none."""

    def __init__(self) -> None:
        self.wanted = False

    def flags(self, args: tuple[str, ...], config: dict[str, Any] | None) -> list[str]:
        """Nothing when the launch decides itself (the flag, or its --config file's `cluster.warm_standby`);
        else the flag, also `--warm-standby` when marked: a resume keeps the run's saved value, and a
        session's reference run, resumed by a marked test, saved it off."""
        given = any(a.partition("=")[0] in ("--warm-standby", "--no-warm-standby") for a in args)
        if given or "warm_standby" in _cluster_section(config):
            return []
        return ["--warm-standby" if self.wanted else "--no-warm-standby"]


WARM_STANDBY = WarmStandby()
DRIVERS = Drivers()


def _config_file(args: tuple[str, ...]) -> dict[str, Any] | None:
    """The launch's `--config` file, read: {} without one, None for one missing or not a mapping."""
    import yaml

    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name == "--config":
            path = value or (args[i + 1] if i + 1 < len(args) else "")
            loaded = yaml.safe_load(pathlib.Path(path).read_text()) if pathlib.Path(path).is_file() else None
            return loaded if isinstance(loaded, dict) else None
    return {}


def _names_a_cluster(args: tuple[str, ...], config: dict[str, Any] | None) -> bool:
    """Whether the launch names its own cluster: `--address`, or a `--config` file (`config`) whose
    `cluster.address` is set (a config of other settings runs on the session's instance)."""
    if any(arg.partition("=")[0] == "--address" for arg in args):
        return True
    return config is None or _cluster_section(config).get("address") is not None


def _cluster_section(config: dict[str, Any] | None) -> dict[str, Any]:
    """A `--config` file's `cluster:` settings ({} when it has none, or they are not a mapping: the
    launch itself says why and exits 2)."""
    section = (config or {}).get("cluster")
    return section if isinstance(section, dict) else {}


def _command(args: tuple[str, ...], own_env: bool = False) -> tuple[list[str], dict[str, str]]:
    """`launch.py`'s arguments and environment: on the shared Ray instance unless the test has its
    own, the launch names a cluster, is a subcommand (`report`), or has an environment of its own
    (`own_env`: an object store's endpoint and credentials, which reach a launch's hosts through its
    own embedded instance, as on a user's machine; the shared one has the session's)."""
    command = list(args)
    if not args or not args[0].startswith("-"):
        return command, _env()  # a subcommand (`report`)
    config = _config_file(args)
    command += WARM_STANDBY.flags(args, config)
    if SHARED_RAY.enabled and not own_env and not _names_a_cluster(args, config):
        command += ["--address", SHARED_RAY.address()]  # with the session's RAY_AUTH_MODE (tests/conftest.py)
    return command, _env()


def launch(*args: str, timeout: float = LAUNCH_TIMEOUT_S, env: dict[str, str] | None = None,
           cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess:
    """`python launch.py ARGS` to its end (its driver forked from one that imported the libraries:
    `tests/integration/forked.py`; with an `env` of the test's own, a plain subprocess)."""
    command, base = _command(args, own_env=bool(env))
    return DRIVERS.run(command, cwd, {**base, **(env or {})}, timeout, fork=not env)


def start(*args: str, new_session: bool = False) -> ForkedLaunch | subprocess.Popen:
    """A launch in the background; with `new_session`, in a process group of its own, as a shell,
    Slurm or systemd would start it, so that the test can signal the whole group."""
    command, env = _command(args)
    return DRIVERS.start(command, ROOT, env, new_session=new_session)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)  # pytest's, a new value each test: one driver server serves them all
    env.pop("XLA_FLAGS", None)  # the hosts get theirs from the launcher
    env.pop("JAX_PLATFORMS", None)
    env["COLUMNS"] = "200"
    return env


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    """Bad input's answer: exit 2 and one line, `error: ...` holding `message`."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, as the launcher reads them (a torn line is skipped)."""
    from jaxlaunch.contract.layout import read_jsonl as tolerant

    return tolerant(path)


def events(run_dir: pathlib.Path | str, kind: str | None = None) -> list[dict[str, Any]]:
    """The run's events as written (a local folder or a URL), read with the launcher's reader."""
    from jaxlaunch.launcher.records.runs import EVENTS, RunDir

    from jaxlaunch.contract.layout import read_records

    found = read_records(RunDir(run_dir).store, EVENTS)
    return [e for e in found if kind is None or e["event"] == kind]


def trajectory(run_dir: pathlib.Path, metric: str = "loss") -> dict[int, float]:
    """step -> a metric of the run's final trajectory (a recomputed step keeps its last value)."""
    return {r["step"]: r[metric] for r in read_jsonl(run_dir / "metrics.jsonl")}


def summary(run_dir: pathlib.Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def attempts(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    return summary(run_dir)["attempt_table"]


def committed_steps(run_dir: pathlib.Path) -> list[int]:
    from jaxlaunch.launcher.records.runs import RunDir

    return sorted(RunDir(run_dir).committed_steps())


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | ForkedLaunch | None = None) -> None:
    """Waits until `condition()` holds (checked every 0.2 s), failing with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"launcher exited {proc.returncode} while waiting for {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def last_step(run_dir: pathlib.Path) -> int:
    records = read_jsonl(run_dir / "metrics.jsonl")
    return records[-1]["step"] if records else 0


def signal_after(proc: subprocess.Popen | ForkedLaunch, run_dir: pathlib.Path, step: int, signum: int = signal.SIGTERM,
                 group: bool = False) -> tuple[int, str, str]:
    """A signal to the driver (or its whole process group) once the run has passed `step`; returns
    the driver's exit code and output."""
    wait_for(lambda: last_step(run_dir) >= step, 300, f"step {step}", proc)
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def host_pids(run_dir: pathlib.Path, attempt: int | None = None) -> list[int]:
    started = events(run_dir, "attempt_started")
    return [pid for e in started if attempt is None or e["attempt"] == attempt for pid in e["pids"]]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def assert_no_host_left(run_dir: pathlib.Path) -> None:
    """Every host process the run started is gone."""
    for pid in host_pids(run_dir):
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())  # a pid reused by another program is not ours
        except psutil.NoSuchProcess:
            continue
        assert "HostActor" not in cmdline and "ray::" not in cmdline, f"host process {pid} is still running"


def dashboard_agent(pids) -> psutil.Process:
    """The Ray dashboard agent among `pids`; a process that ends while they are read (Ray's workers
    come and go) is passed over."""
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.name() == "ray::DashboardAgent" or "DashboardAgent" in " ".join(proc.cmdline()):
                return proc
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no dashboard agent among {sorted(pids)}")


def ray_processes_left(run_dir: pathlib.Path) -> list[int]:
    """Processes still running of the embedded Ray instances the run's launches started."""
    sessions = {e["ray_supervisor"] for e in events(run_dir, "launch") if e.get("ray_supervisor")}
    left = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in sessions and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return left


def final_arrays(run_dir: pathlib.Path, step: int):
    from jaxlaunch.workers.checkpoints.durable import read_arrays

    return read_arrays(run_dir / "checkpoints" / str(step))


def tree_snapshot(path: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Every file under `path` with its size and modification time, to prove nothing changed."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def wandb_history(run_dir):
    """Every history row of every offline W&B run file under the run directory, read back with
    wandb's own reader of the .wandb transaction log (`wandb leet inspect --json`)."""
    rows, run_ids, runs = [], set(), []
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    for path in files:
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=True)
        for line in out.stdout.splitlines():
            record = json.loads(line)
            if record["type"] == "history":
                rows.append(record["history"]["item"])
            elif record["type"] == "run":
                run_ids.add(record["run"]["run_id"])
                runs.append(record["run"])
    return files, run_ids, rows, runs


SPLIT_TOLERANCE = 0.005
"""The most the goodput split may be off the wall time, as a share of it."""


def assert_split_adds_up(run_dir: pathlib.Path) -> None:
    """The badput split of a run covers its wall time exactly, in the history derived from its records
    and in the summary.json the launcher wrote; and every part is a share of it."""
    from jaxlaunch.launcher.records import history
    from jaxlaunch.launcher.records.runs import RunDir

    split = history.load_history(RunDir(run_dir)).split
    parts = [split.productive_s, *split.badput_s.values()]
    assert min(parts) >= 0, f"{run_dir}: a negative part {split}"
    assert abs(sum(parts) - split.wall_s) <= SPLIT_TOLERANCE * split.wall_s + 1e-9, f"{run_dir}: {split}"
    written = run_dir / "summary.json"
    if written.exists():
        s = json.loads(written.read_text())
        total = (s["goodput"] or 0) * s["wall_time_s"] + sum(s["badput_s"].values())
        assert abs(total - s["wall_time_s"]) <= SPLIT_TOLERANCE * s["wall_time_s"] + 1e-9, f"{written}: {s}"


def open_gate(run_dir: pathlib.Path, step: int, proc: subprocess.Popen | ForkedLaunch) -> None:
    """Waits until rank 0 of the gated job stands at the gate of `step` (it wrote `at-STEP`)."""
    wait_for(lambda: (run_dir / f"at-{step}").exists(), 300, f"the gate at step {step}", proc)
