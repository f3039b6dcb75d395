"""From what the user asked for (flags of the command line, or arguments of `jaxlaunch.launch`) to a
validated JobConfig and its entry, before anything starts and before anything is written.

On --resume the run's saved configuration is the base, a --config file's keys and the flags given
are applied over it, and a change to what the run computes (the entry, its settings, the seed, the
schedule's length, the input's fingerprint) is refused unless --allow-change names it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxlaunch.launcher.config import (
    BUILTIN_ENTRY,
    JobConfig,
    apply,
    check_run_path,
    from_json,
    merge_settings,
    override,
    parse_mesh,
    read_yaml,
    run_changes,
    validate,
)
from jaxlaunch.launcher.runs import RunDir

from jaxlaunch.contract import entry as entry_lib
from jaxlaunch.contract.protocol import ConfigError, Injection

BUILTIN_SETTINGS = {"model": "model", "data": "data", "global_batch_size": "global-batch-size", "seq_len": "seq-len"}
"""Flags that are shorthand for --set on the built-in model."""


@dataclasses.dataclass
class LaunchOptions:
    """Everything a user can ask of one launch; None means "not given"."""

    entry: str | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """--set key=value."""
    model_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """--model, --data, --global-batch-size, --seq-len: settings of the built-in model."""
    config_file: str | None = None
    run_dir: str | None = None
    name: str = "default"
    resume: bool | str = False
    """False, True, or "auto" (start the run when its directory is empty, continue it otherwise)."""
    allow_change: Sequence[str] = ()
    hosts: int | None = None
    steps: int | None = None
    schedule_steps: int | None = None
    save_every: int | None = None
    seed: int | None = None
    mesh: str | Mapping[str, int] | None = None
    address: str | None = None
    devices_per_host: int | None = None
    placement_timeout: float | None = None
    hang_timeout: float | None = None
    startup_timeout: float | None = None
    save_timeout: float | None = None
    max_restarts: int | None = None
    max_preemptions: int | None = None
    min_hosts: int | None = None
    max_hosts: int | None = None
    capacity_timeout: float | None = None
    inject: Sequence[str | Injection] = ()
    chaos: float | None = None


@dataclasses.dataclass(frozen=True)
class PreparedJob:
    job: JobConfig
    entry: entry_lib.Entry
    fingerprint: Any
    injections: tuple[Injection, ...]
    chaos_mean_s: float | None
    fresh_dir: bool
    """The run directory did not exist before this launch (remove it if the launch is refused)."""


def prepare(options: LaunchOptions) -> PreparedJob:
    """Raises ConfigError for anything wrong; writes nothing."""
    run_dir = options.run_dir or f"runs/{options.name}"
    run = RunDir(run_dir)
    check_run_path(run_dir, bool(options.resume))
    resume = _resume_mode(options.resume, run)
    saved = _saved_job(run) if resume else None
    job = saved or JobConfig()
    if options.config_file is not None:
        job = apply(job, read_yaml(options.config_file), options.config_file)
    job = override(
        job,
        entry=options.entry,
        num_hosts=options.hosts,
        run_dir=run_dir,
        resume=resume,
        mesh=parse_mesh(options.mesh) if isinstance(options.mesh, str) else options.mesh,
        **{
            "cluster.address": options.address,
            "cluster.devices_per_host": options.devices_per_host,
            "cluster.placement_timeout_s": options.placement_timeout,
            "train.steps": options.steps,
            "train.schedule_steps": options.schedule_steps,
            "train.seed": options.seed,
            "checkpoint.save_every": options.save_every,
            "watchdog.hang_timeout_s": options.hang_timeout,
            "watchdog.startup_timeout_s": options.startup_timeout,
            "watchdog.save_timeout_s": options.save_timeout,
            "fault.max_restarts": options.max_restarts,
            "fault.max_preemptions": options.max_preemptions,
            "fault.min_hosts": options.min_hosts,
            "fault.max_hosts": options.max_hosts,
            "fault.capacity_timeout_s": options.capacity_timeout,
        },
    )
    if options.chaos is not None and not (options.chaos > 0 and options.chaos != float("inf")):
        raise ConfigError(f"--chaos must be a finite number of seconds above 0, got {options.chaos}")
    validate(job)
    entry = entry_lib.resolve(job.entry)
    given = {k: v for k, v in options.model_settings.items() if v is not None}
    if given and entry.ref.module != BUILTIN_ENTRY.split(":")[0]:
        flags = ", ".join(f"--{BUILTIN_SETTINGS[k]}" for k in given)
        raise ConfigError(f"{flags} set the built-in model; for {entry.ref} use --set KEY=VALUE")
    settings = entry.settings(merge_settings(merge_settings(job.config, given), options.settings))
    job = dataclasses.replace(job, config=settings)
    if not resume and job.train.schedule_steps is None:
        job = override(job, **{"train.schedule_steps": job.train.steps})
    entry.check(settings, job.mesh_for(job.num_hosts))
    fingerprint = entry.fingerprint(settings)
    if saved is not None:
        _refuse_silent_changes(run, saved, job, fingerprint, options.allow_change)
    injections = tuple(i if isinstance(i, Injection) else Injection.parse(i) for i in options.inject)
    for injection in injections:
        if injection.host >= job.max_hosts:
            raise ConfigError(f"--inject {injection}: host {injection.host} does not exist; the job has at most "
                              f"{job.max_hosts} hosts (0..{job.max_hosts - 1})")
    return PreparedJob(job, entry, fingerprint, injections, options.chaos, not run.path.exists())


def _resume_mode(resume: bool | str, run: RunDir) -> bool:
    if resume == "auto":
        if run.is_run():
            return True
        if run.is_empty():
            return False
        raise ConfigError(f"--resume auto: {run.path} holds files but no run (no config.json); "
                          f"choose an empty or new --run-dir")
    if resume not in (True, False):
        raise ConfigError(f"--resume takes no value or 'auto', got {resume!r}")
    if resume and not run.path.is_dir():
        raise ConfigError(f"--resume: run directory {run.path} does not exist (check --run-dir, or use --resume "
                          f"auto to start it)")
    if not resume and not run.is_empty():
        raise ConfigError(f"run directory {run.path} is not empty: pass --resume to continue it, or choose another "
                          f"--run-dir")
    return bool(resume)


def _saved_job(run: RunDir) -> JobConfig:
    data = run.load_config()
    if data is None:
        raise ConfigError(f"--resume: {run.path} holds no run (no config.json); pass the --run-dir of a launch")
    try:
        return from_json(data)
    except ConfigError as err:
        raise ConfigError(f"--resume: {run.config_path} was written by another version of jaxlaunch ({err}); "
                          f"start a new --run-dir") from None


def _refuse_silent_changes(run: RunDir, saved: JobConfig, job: JobConfig, fingerprint: Any,
                           allowed: Sequence[str]) -> None:
    changes = run_changes(saved, job)
    launches = [e for e in run.events() if e["event"] == "launch"]
    old_print = launches[-1].get("fingerprint") if launches else None
    if launches and fingerprint != old_print and (old_print is not None or fingerprint is not None):
        changes["fingerprint"] = (old_print, fingerprint)
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        first = next(iter(refused))
        old, new = refused[first]
        what = "the entry's input changed" if first == "fingerprint" else f"{first} {old!r} -> {new!r}"
        more = f" (and {', '.join(list(refused)[1:])})" if len(refused) > 1 else ""
        raise ConfigError(f"--resume would change the run: {what}{more}; pass --allow-change {first} to accept "
                          f"it, or leave it out to continue unchanged")
