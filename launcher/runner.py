"""One launch from a validated JobConfig: checks, Ray connection, the driver, the records."""

from __future__ import annotations

import time

from launcher.config import ConfigError, JobConfig, resolve_mesh
from launcher.display import Display, error
from launcher.driver import Driver
from launcher.policy import RestartPolicy, ScalingPolicy
from launcher.runs import RunDir, check_run_dir
from launcher.worker_group import PlacementError, RayCluster, RayWorkerGroup

CAPACITY_POLL_S = 1.0


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
            waited = "" if cluster.embedded else f" after waiting {cfg.placement_timeout_s:g} s"
            raise ConfigError(
                f"cannot place {job.num_hosts} hosts of {cfg.resources_per_host} ({cfg.placement_strategy})"
                f"{waited}: the cluster has {cluster.describe()}, room for {placeable}; "
                f"pass --hosts {placeable} or fewer, or add capacity"
            )
        time.sleep(CAPACITY_POLL_S)


def run_job(job: JobConfig, *, max_restarts: int | None = None, display: Display | None = None) -> int:
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
        restart = RestartPolicy() if max_restarts is None else RestartPolicy(max_restarts=max_restarts)
        scaling = ScalingPolicy(job.num_hosts, job.num_hosts, lambda n: fits(job, n))
        driver = Driver(
            job, run, cluster, lambda: RayWorkerGroup(job, str(run.path), cluster),
            restart_policy=restart, scaling_policy=scaling, display=display,
        )
        try:
            code = driver.run()
        except PlacementError as err:
            error(str(err))
            code = 1
        finally:
            summary = driver.summary()
            run.write_summary(summary)
            run.event("job_ended", status=summary["status"])
        if driver.failures:
            display.attempts_table(summary["attempt_table"])
        if code != 0 and driver.stop_reason:
            error(f"the job failed: {driver.stop_reason}; checkpoints are kept in {run.checkpoints}")
        display.summary(summary)
        return code
    finally:
        cluster.shutdown()
