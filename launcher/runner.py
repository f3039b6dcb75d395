"""One launch from a validated JobConfig: checks, Ray connection, the driver, the records."""

from __future__ import annotations

import contextlib
import signal
import time

from launcher import report
from launcher.config import ConfigError, Injection, JobConfig, resolve_mesh
from launcher.display import Display, error
from launcher.driver import CAPACITY_POLL_S, Driver
from launcher.policy import RestartPolicy, ScalingPolicy
from launcher.runs import RunDir, check_run_dir
from launcher.worker_group import RayCluster, RayWorkerGroup


def fits(job: JobConfig, num_hosts: int) -> bool:
    """Whether `num_hosts` hosts divide the mesh and the global batch."""
    try:
        sizes = resolve_mesh(job.mesh, num_hosts * job.cluster.devices_per_host)
    except ConfigError:
        return False
    return job.train.global_batch_size % sizes.get("data", 1) == 0


def wait_for_capacity(cluster: RayCluster, job: JobConfig) -> None:
    """Fails (ConfigError: bad input, nothing written yet) when the cluster cannot place the hosts:
    at once on the embedded cluster, after the placement timeout on an existing one."""
    cfg = job.cluster
    deadline = time.monotonic() + (0 if cluster.embedded else cfg.placement_timeout_s)
    while True:
        placeable = cluster.placeable_hosts(cfg.resources_per_host, cfg.placement_strategy)
        if placeable >= job.num_hosts:
            return
        if time.monotonic() >= deadline:
            raise ConfigError(cluster.placement_message(job.num_hosts, placeable, waited=not cluster.embedded))
        time.sleep(CAPACITY_POLL_S)


@contextlib.contextmanager
def stop_signals(driver: Driver):
    """SIGINT and SIGTERM ask the driver for a clean stop (every host saves); a second one stops at
    once (KeyboardInterrupt, and the teardown in `finally` kills every host)."""
    def handler(signum, frame):
        if driver.stop_signal is not None:
            raise KeyboardInterrupt
        driver.request_stop(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_job(
    job: JobConfig,
    *,
    injections: tuple[Injection, ...] = (),
    chaos_mean_s: float | None = None,
    display: Display | None = None,
) -> int:
    run = RunDir(job.run_dir)
    check_run_dir(job, run)
    display = display or Display()
    cluster = RayCluster(job.cluster)
    cluster.connect()
    try:
        wait_for_capacity(cluster, job)
        run.create()
        run.save_config(job)
        run.event("launch", num_hosts=job.num_hosts, resume=job.resume, model=job.train.model,
                  steps=job.train.steps, cluster=cluster.describe())
        fault = job.fault
        restart = RestartPolicy(fault.max_restarts, fault.max_preemptions, fault.backoff_s, fault.max_backoff_s)
        scaling = ScalingPolicy(job.min_hosts, job.max_hosts, lambda n: fits(job, n))
        driver = Driver(
            job, run, cluster, lambda: RayWorkerGroup(job, str(run.path), cluster),
            restart_policy=restart, scaling_policy=scaling, injections=injections,
            chaos_mean_s=chaos_mean_s, display=display,
        )
        try:
            with stop_signals(driver):
                code = driver.run()
        finally:
            summary = driver.summary()
            run.write_summary(summary)
            run.event("job_ended", status=summary["status"])
            run.close()
            report.write(run.path, show=False)
        if driver.failures:
            report.print_report(report.build(run), display.console)
        if code == 1:
            error(f"the job failed: {driver.stop_reason}; checkpoints are kept in {run.checkpoints}")
        elif code > 1:
            display.message(f"{driver.stop_reason}; continue with: python launch.py --resume --run-dir {run.path}")
        display.summary(summary)
        display.message(f"report: python launch.py report {run.path}  (picture: {run.path / 'report.png'})")
        return code
    finally:
        cluster.shutdown()
