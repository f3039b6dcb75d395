"""One launch of a prepared job: the run directory's lock, the Ray connection and its capacity, the
driver with its listeners, the signals, and the records at the end, whatever happens.

Nothing is written before the lock is held and the cluster is known to fit the job, so a refused
launch (exit 2) leaves the run directory as it was."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from jaxlaunch.launcher.cluster.keepers import KeeperPool
from jaxlaunch.launcher.cluster.ray_cluster import (
    RayCluster,
    refuse_if_connected,
    refuse_if_nothing_answers,
    runtime_env,
)
from jaxlaunch.launcher.cluster.worker_group import MakeSpec, RayWorkerGroup, StandbyPool
from jaxlaunch.launcher.configuration.job import PreparedJob
from jaxlaunch.launcher.configuration.schema import JobConfig
from jaxlaunch.launcher.control.driver import Driver, Listener
from jaxlaunch.launcher.control.fault_plan import FaultPlan, injection_log
from jaxlaunch.launcher.control.limits import CAPACITY_POLL_S
from jaxlaunch.launcher.control.persisting import MemoryPersist
from jaxlaunch.launcher.control.policy import Policies, RestartPolicy, ScalingPolicy, Watchdog
from jaxlaunch.launcher.control.replicas import ReplicaWatch
from jaxlaunch.launcher.control.signals import stop_signals
from jaxlaunch.launcher.control.states import Attempt, AttemptEndNotice, AttemptStartNotice, ReplacementNotice, State
from jaxlaunch.launcher.control.stragglers import StragglerWatch
from jaxlaunch.launcher.exit_codes import EXIT_FAILED, EXIT_OK
from jaxlaunch.launcher.records import history, report
from jaxlaunch.launcher.records.history import AttemptRecord, History
from jaxlaunch.launcher.records.recorder import Chaos, Recorder
from jaxlaunch.launcher.records.runs import RunDir, RunLock
from jaxlaunch.launcher.views import notebook
from jaxlaunch.launcher.views.display import ConsoleView, Display, error, shown
from jaxlaunch.launcher.views.live_metrics import Exporter, LiveMetrics
from jaxlaunch.launcher.views.trackers import Trackers
from rich.markup import escape

from jaxlaunch.contract import entry as entry_lib
from jaxlaunch.contract import events, storage
from jaxlaunch.contract.events import JobStatus
from jaxlaunch.contract.protocol import ConfigError, EntryRef, GroupPoll, HostSpec, Injection
from jaxlaunch.contract.storage import RunStorageError, storage_errno


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    """The outcome of one launch, as `jaxlaunch.launch` returns it."""

    status: JobStatus
    """finished, failed, stopped (SIGINT, SIGTERM) or interrupted."""
    exit_code: int
    """What the command line would exit with: 0 finished, 1 failed, 130/143 stopped."""
    reason: str | None
    final_step: int | None
    attempts: list[AttemptRecord]
    """The attempt table: hosts, mesh, steps, restored step, cause, failed host, timings."""
    goodput: float | None
    run_dir: pathlib.Path | str
    """The run directory: a local folder, or the URL of one on an object store."""
    metrics: dict[int, dict[str, Any]]
    """The final trajectory: step -> the metrics it reported (a recomputed step keeps its last run)."""
    returned: Any
    """What the function returned on rank 0 in the last attempt (plain data only)."""
    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == JobStatus.FINISHED

    def _repr_html_(self) -> str:
        return notebook.to_html(self.summary, self.reason, self.run_dir)

    def _repr_markdown_(self) -> str:
        return notebook.to_markdown(self.summary, self.reason, self.run_dir)


def wait_for_capacity(cluster: RayCluster, job: JobConfig, waiting: Callable[[], None] = lambda: None) -> None:
    """ConfigError (bad input, nothing written yet) when the cluster cannot place the hosts: at once on
    the embedded cluster, after the placement timeout on an existing one (`waiting` is told once, as
    that wait begins)."""
    deadline = time.monotonic() + (0 if cluster.embedded else job.cluster.placement_timeout_s)
    while True:
        placeable = cluster.placeable_hosts()
        if placeable >= job.min_hosts:
            return
        if time.monotonic() >= deadline:
            raise ConfigError(cluster.placement_message(job.num_hosts, placeable, waited=not cluster.embedded))
        waiting()
        waiting = lambda: None  # noqa: E731 - told once
        time.sleep(CAPACITY_POLL_S)


def _make_spec(job: JobConfig, run: RunDir, entry_ref: EntryRef, replicas: ReplicaWatch,
               entry_code: str | None, entry_imports: Mapping[str, str]) -> MakeSpec:
    expect_checkpoint = run.has_history()
    imports = dict(entry_imports) if entry_code is not None or entry_ref.payload is not None else {}
    if job.cluster.address is not None:  # what travels: the entry's folder, or a local package alone
        top = entry_ref.module.split(".")[0] if entry_ref.path is None and entry_ref.package is None else None
        imports = {name: digest for name, digest in imports.items()
                   if not os.path.isabs(name) and (top is None or name.split("/")[0] == top)}

    def make(*, attempt: int, rank: int, num_hosts: int, coordinator_address: str,
             injections: tuple[Injection, ...], keepers: dict[str, Any] | None = None,
             lost_keepers: tuple[str, ...] = ()) -> HostSpec:
        return HostSpec(
            entry=entry_ref, config=job.config, run_dir=str(run.path), attempt=attempt, rank=rank,
            num_hosts=num_hosts, coordinator_address=coordinator_address, mesh=job.mesh, steps=job.train.steps,
            schedule_steps=job.schedule_steps, seed=job.train.seed, platform=job.cluster.platform,
            checkpoint=job.checkpoint, distributed=job.distributed, compilation_cache=job.cluster.compilation_cache,
            compilation_cache_dir=job.cluster.compilation_cache_dir,
            expect_checkpoint=expect_checkpoint or run.has_history(), injections=tuple(injections),
            keepers=dict(keepers or {}), lost_keepers=tuple(lost_keepers), elastic=job.min_hosts < job.max_hosts,
            verify_every=job.fault.verify_every, newest_restorable=replicas.restore_limit, entry_code=entry_code,
            entry_imports=imports,
            pending_save_wait_s=min(job.watchdog.hang_timeout_s, job.watchdog.save_timeout_s) / 2)

    return make


def run_job(prepared: PreparedJob, display: Display | None = None) -> LaunchResult:
    refuse_if_connected()  # bad input: before anything is written
    refuse_if_nothing_answers(prepared.job.cluster.address)
    port = prepared.job.tracking.metrics_port
    exporter = Exporter(port) if port is not None else None  # a port in use is bad input: before anything
    try:
        return _run_job(prepared, display, exporter)
    finally:
        if exporter is not None:
            exporter.close()


def _run_job(prepared: PreparedJob, display: Display | None, exporter: Exporter | None) -> LaunchResult:
    job, entry = prepared.job, prepared.entry
    assert job.run_dir is not None, "prepare() names the run directory"
    run = RunDir(job.run_dir)
    display = display or Display()

    said: list[str] = []

    def announce() -> None:  # once the launch waits or is not refused (a refusal is one line, of its own)
        if prepared.announce and not said:
            said.append(prepared.announce)
            display.message(prepared.announce, soft_wrap=True)

    made = _first_missing(run.path)  # the folders this launch makes: removed again if it is refused
    try:
        run.store.makedirs()
    except OSError as err:  # a folder that cannot be made here (under /proc, a full disk)
        if prepared.fresh_dir:
            _remove_if_empty(run.path, made)  # the parents it did make
        raise ConfigError(f"--run-dir {job.run_dir}: {err.strerror or err}; choose another --run-dir") from None
    lock = run.lock()
    try:
        lock.acquire()
    except ConfigError:
        if prepared.fresh_dir:
            _remove_if_empty(run.path, made)
        raise
    with contextlib.ExitStack() as cleanup:  # whatever fails from here (a full /tmp, a Ctrl-C), the lock goes
        cleanup.callback(lock.release)
        py_modules: list[str] = []
        # The hosts compare the entry's file with the one hashed here when it is the same file, or a copy
        # shipped with the job; a package installed on a cluster's nodes may be another version of it.
        entry_code = prepared.entry_code
        if job.cluster.address is None:  # the hosts run on this machine, with this Python
            host_ref = entry.ref
        else:
            staging = pathlib.Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="jaxlaunch-ship-")))
            host_ref, shipped = entry_lib.shipped(entry.ref, staging)
            py_modules = [_package_to_ship(staging), *shipped]
            entry_code = entry_code if shipped else None
        cluster = RayCluster(job.cluster, runtime_env(job.cluster.address is None, py_modules))
        try:
            cluster.connect()
            cluster.request_hosts(job.max_hosts)
            wait_for_capacity(cluster, job, waiting=announce)
            announce()
        except BaseException as err:
            # Refused, failed or Ctrl-C: the embedded instance stopped, the autoscaler's request withdrawn.
            cluster.shutdown()
            if isinstance(err, ConfigError) and prepared.fresh_dir:
                lock.release()
                _remove_if_empty(run.path, made)
            raise
        try:
            return _drive(prepared, run, cluster, host_ref, display, lock, exporter, entry_code)
        except OSError as err:
            code = storage_errno(err)
            if code is None:
                raise
            # The file that failed, when the error names one: a full /dev/shm is not a full run directory.
            where = next((e.filename for e in storage.chain(err) if isinstance(e, OSError) and e.filename), None)
            raise RunStorageError(storage.describe_storage_error(where or run.store.url, code, None)) from err
        finally:
            cluster.shutdown()


@dataclasses.dataclass
class Assembly:
    """What one launch is made of: built before its first attempt, finished after its last."""

    prepared: PreparedJob
    run: RunDir
    display: Display
    driver: Driver
    recorder: Recorder
    live: LiveMetrics
    trackers: Trackers | None
    standby: StandbyPool | None
    keepers: KeeperPool


def _drive(prepared: PreparedJob, run: RunDir, cluster: RayCluster, host_ref: EntryRef, display: Display,
           lock: RunLock, exporter: Exporter | None, entry_code: str | None) -> LaunchResult:
    lock.check()  # taken while this launch joined Ray or waited for room: nothing written yet
    parts = _build(prepared, run, cluster, host_ref, display, lock, exporter, entry_code)
    code = None
    finished: list[tuple[History, dict[str, Any], pathlib.Path | str]] = []

    def finish() -> None:
        if lock.lost is None:  # a launch whose lock another took writes nothing more into the run
            finished.append(_finish(parts, code))
        else:
            _abandon(parts)

    # Each step of the teardown runs whatever an earlier one raised (a Ctrl-C in the keepers' close, a
    # lost connection): the records are finished, the display and the trackers' threads stopped.
    with contextlib.ExitStack() as teardown:
        teardown.callback(finish)
        teardown.callback(parts.display.stop)
        teardown.callback(parts.keepers.shutdown)
        if parts.standby is not None:
            teardown.callback(parts.standby.shutdown)
        with stop_signals(parts.driver):
            code = parts.driver.run()
    lock.check()
    past, summary, picture = finished[0]
    return _tell(parts, code, past, summary, picture)


class LockWatch(Listener):
    """Ends the launch at once, with no save, when another launch took the run's lock (RunLockLost from
    the driver's loop: its group is torn down as on a second Ctrl-C). The first listener: it looks
    before every step and before any other listener writes a record."""

    def __init__(self, lock: RunLock) -> None:
        self.lock = lock

    def before_step(self, driver: Driver) -> None:
        self.lock.check()

    def on_transition(self, driver: Driver, old: State, new: State) -> None:
        self.lock.check()

    def on_poll(self, driver: Driver, attempt: Attempt, poll: GroupPoll) -> None:
        self.lock.check()

    def on_attempt_started(self, driver: Driver, started: AttemptStartNotice) -> None:
        self.lock.check()

    def on_attempt_ended(self, driver: Driver, ended: AttemptEndNotice) -> None:
        self.lock.check()

    def on_replacement(self, driver: Driver, notice: ReplacementNotice) -> None:
        self.lock.check()


def _build(prepared: PreparedJob, run: RunDir, cluster: RayCluster, host_ref: EntryRef, display: Display,
           lock: RunLock, exporter: Exporter | None, entry_code: str | None) -> Assembly:
    """The run's first records of this launch, and the driver with its listeners, group and policies.
    `entry_code`: the entry file's hash for the hosts to check the file they import against (None:
    they import a copy of their own)."""
    job, entry = prepared.job, prepared.entry
    run.create()
    run.save_config(job.to_dict())
    _warn_if_disk_is_short(run, job, display)
    if lock.took_over:
        display.message(f"[yellow]took over the lock of a launch that died (pid {lock.took_over.get('pid')} on "
                        f"{lock.took_over.get('host')})[/yellow]")
    past = run.events()  # the run's earlier launches: read once
    attempt_offset = sum(isinstance(e, events.AttemptStarted) for e in past)
    run.event(events.Launch(
        num_hosts=job.num_hosts, resume=job.resume, entry=str(entry.ref), steps=job.train.steps,
        fingerprint=prepared.fingerprint, cluster=cluster.describe(), pid=os.getpid(),
        ray_supervisor=cluster.instance.supervisor_pid if cluster.instance is not None else None,
        requested_hosts=None if cluster.embedded else job.max_hosts, entry_code=prepared.entry_code,
        entry_imports=dict(prepared.entry_imports),
        changes={name: list(pair) for name, pair in prepared.changes.items()}))
    if prepared.changes:
        display.message("this --resume changes the run (--allow-change): " + "; ".join(
            f"{name} {old!r} -> {new!r}" for name, (old, new) in prepared.changes.items()), soft_wrap=True)

    def committed() -> int | None:
        steps = run.committed_steps()
        return steps[0] if steps else None

    standby = StandbyPool(cluster, run) if job.cluster.warm_standby else None
    cluster.standby = standby
    keepers = KeeperPool(job.checkpoint, cluster.nodes_liveness)
    cluster.keepers = keepers
    trackers = Trackers(run, job.tracking.trackers, job.to_dict(),
                        lambda text: display.message(f"[yellow]warning: {escape(text)}[/yellow]")
                        ) if job.tracking.trackers else None
    recorder = Recorder(run, job.mesh_for, sinks=[trackers] if trackers is not None else [])
    live = LiveMetrics(run, committed, exporter)
    listeners: list[Any] = [LockWatch(lock), recorder, live,
                            ConsoleView(display, run, job.train.steps, job.checkpoint.memory_tier)]
    if prepared.chaos_mean_s:
        listeners.append(Chaos(prepared.chaos_mean_s, job.train.seed, recorder.event))
    replicas = ReplicaWatch(recorder.event, lambda text: display.message(f"[red]{escape(text)}[/red]"), past)
    listeners.append(replicas)
    make_spec = _make_spec(job, run, host_ref, replicas, entry_code, prepared.entry_imports)
    listeners.append(StragglerWatch(job.fault.straggler_factor, job.fault.straggler_steps, recorder.event,
                                    lambda text: display.message(f"[yellow]warning: {escape(text)}[/yellow]")))
    policies = Policies(RestartPolicy(job.fault),
                        ScalingPolicy(job.min_hosts, job.max_hosts, lambda n: _fits(job, entry, n)),
                        Watchdog(job.watchdog))
    faults = FaultPlan(prepared.injections,
                       injection_log(run.injections, prepared.injections, time.monotonic, time.time))

    def persist_spec(**kwargs: Any) -> HostSpec:
        return dataclasses.replace(make_spec(**kwargs), persist_only=True)

    persist = MemoryPersist(
        # After a replica mismatch, not a step past the newest whose replicas agreed: it may hold the corrupt copy.
        newest=lambda: keepers.newest_committed(at_most=replicas.restore_limit),
        make_group=lambda: RayWorkerGroup(cluster, run, persist_spec, job.watchdog.poll_interval_s, None, keepers,
                                          logs_as="persist"),
        step_bytes=run.checkpoint_bytes,
        # The job ends: its spare hosts' room serves the persisting run.
        before=standby.shutdown if standby is not None else lambda: None,
        timeout_s=job.watchdog.startup_timeout_s + job.watchdog.save_timeout_s,
        fits=lambda n: _mesh_or_none(job, n) is not None)

    driver = Driver(
        cluster=cluster,
        make_group=lambda: RayWorkerGroup(cluster, run, make_spec, job.watchdog.poll_interval_s, standby,
                                          keepers),
        policies=policies, committed_step=committed, faults=faults, attempt_offset=attempt_offset,
        listeners=listeners, persist=persist if keepers.enabled else None,
    )
    return Assembly(prepared, run, display, driver, recorder, live, trackers, standby, keepers)


def _abandon(parts: Assembly) -> None:
    """Another launch took the run: this one's writers are closed (a launch from Python goes on in its
    process), and nothing more is written into the run."""
    if parts.trackers is not None:
        parts.trackers.abandon()
    parts.recorder.abandon()
    parts.live.abandon()


def _finish(parts: Assembly, code: int | None) -> tuple[History, dict[str, Any], pathlib.Path | str]:
    """Whatever happened (every spare host and keeper stopped): the launch's last records written, and
    what derives from them (summary.json, the report picture, the trackers' final state)."""
    run = parts.run
    status = _status(code)
    spans = {a.number: (a.first_step, a.last_step) for a in parts.driver.attempts}
    for injection, why in parts.driver.faults.not_fired(spans):  # a fault drill that did not happen is said
        run.event(events.InjectionNotFired(injection=str(injection), reason=why))
        parts.display.message(f"[yellow]warning: --inject {injection} did not go off: {escape(why)}[/yellow]")
    run.event(events.JobEnded(status=status, reason=getattr(parts.driver.state, "reason", None)))
    parts.recorder.close()
    parts.live.close()
    run.flush()
    past = history.load_history(run)
    summary = past.summary(run)
    run.write_summary(summary)
    picture = report.save_plot(past, run)
    if parts.trackers is not None:
        parts.trackers.close(status, summary)
    return past, summary, picture


def _tell(parts: Assembly, code: int | None, past: History, summary: dict[str, Any],
          picture: pathlib.Path | str) -> LaunchResult:
    """The end of a launch on the terminal (the report when anything failed, how to go on), and its result."""
    run, display, entry = parts.run, parts.display, parts.prepared.entry
    assert code is not None, "the driver returned"
    if past.failures:
        report.print_report(past, display.console)
    reason = summary.get("stop_reason")
    if code == EXIT_FAILED:
        error(f"the job failed: {reason}; checkpoints are kept in {run.checkpoints}")
    elif code > 1:
        display.message(f"{reason}; continue with: {entry_lib.resume_command(entry.ref, shown(run.path))}",
                        soft_wrap=True)
    display.summary(summary)
    display.closing(run.path, picture)
    return LaunchResult(_status(code), code, reason, summary["final_step"], past.attempts, past.goodput, run.path,
                        past.trajectory, summary.get("returned"), summary)


def _status(code: int | None) -> JobStatus:
    """How a job ended, from the driver's exit code (None: the driver itself was interrupted)."""
    if code is None:
        return JobStatus.INTERRUPTED
    return {EXIT_OK: JobStatus.FINISHED, EXIT_FAILED: JobStatus.FAILED}.get(code, JobStatus.STOPPED)


def _warn_if_disk_is_short(run: RunDir, job: JobConfig, display: Display) -> None:
    """Before the first attempt of a resumed run: can the disk hold max_to_keep + 1 checkpoints?
    (A fresh run's hosts check once they know the state's size.)"""
    steps = run.committed_steps()
    if not steps:
        return
    short = storage.short_of_space(run.checkpoints, run.checkpoint_bytes(steps[0]), job.checkpoint.max_to_keep + 1)
    if short is not None:
        run.event(events.LowDiskSpace(**dataclasses.asdict(short)))
        display.message(f"[yellow]warning: {short.message}[/yellow]")


def _mesh_or_none(job: JobConfig, num_hosts: int) -> dict[str, int] | None:
    """The job's mesh on `num_hosts`, or None when it does not divide their devices."""
    try:
        return job.mesh_for(num_hosts)
    except ConfigError:
        return None


def _fits(job: JobConfig, entry: entry_lib.Entry, num_hosts: int) -> bool:
    """Whether the job can run on `num_hosts`: the mesh divides its devices, and the entry's own check
    accepts it; an entry without a check is run only on host counts that divide --max-hosts, so that
    a batch split evenly over the most hosts splits evenly over fewer too."""
    mesh = _mesh_or_none(job, num_hosts)
    if mesh is None:
        return False
    if entry.spec.check is None:
        return job.max_hosts % num_hosts == 0
    return entry.fits(job.config, mesh)


def _package_to_ship(staging: pathlib.Path) -> str:
    """The folder of the whole `jaxlaunch` package, to ship to a cluster's nodes as one Ray py_module.
    Installed from a wheel, it is one folder already; from a source checkout (an editable install),
    its subpackages live in folders of their own and are gathered into `staging`."""
    root = _package_folder("jaxlaunch")
    subpackages = {name: _package_folder(f"jaxlaunch.{name}") for name in ("contract", "launcher", "workers", "models")}
    if all(folder.parent == root for folder in subpackages.values()):
        return str(root)
    target = staging / "jaxlaunch"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root, target, ignore=ignore, dirs_exist_ok=True)
    for name, folder in subpackages.items():
        shutil.copytree(folder, target / name, ignore=ignore, dirs_exist_ok=True)
    return str(target)


def _package_folder(name: str) -> pathlib.Path:
    """Where an installed package's modules are, found without importing it."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"{name} is part of this installation"
    return pathlib.Path(spec.origin).parent


def _first_missing(path: pathlib.Path | str) -> pathlib.Path | None:
    """The outermost folder of a local `path` that does not exist yet (None: an object store's)."""
    if not isinstance(path, pathlib.Path):
        return None
    missing = [p for p in (path, *path.parents) if not p.exists()]
    return missing[-1] if missing else None


def _remove_if_empty(path: pathlib.Path | str, made: pathlib.Path | None = None) -> None:
    """Removes the run's folder if empty, and the empty folders above it up to `made`, which this launch made."""
    if isinstance(path, pathlib.Path):  # an object store has no folders to leave behind
        last = made if made is not None else path
        for folder in (path, *path.parents):
            with contextlib.suppress(OSError):
                folder.rmdir()
            if folder == last or folder.exists():
                break
