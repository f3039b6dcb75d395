"""From what the user asked for (flags of the command line, or keywords of `jaxlaunch.launch`) to a
validated JobConfig and its entry, before anything starts and before anything is written.

What may be asked is declared once, on the config's fields (`jaxlaunch.launcher.configuration.options`): the
JobConfig tree, and `LaunchOptions` for what one launch asks beyond it. An entry's declared settings
are flags and keywords too (`--model tiny` for the built-in model).

Without --run-dir a launch gets a run directory of its own, runs/<entry>-<YYYYmmdd-HHMMSS>; a --resume
without one continues the newest run of the entry there. On --resume the run's saved configuration
is the base, a --config file's keys and the flags given are applied over it, and a change to what the
run computes (the entry, its settings, the seed, the schedule's length, the input's fingerprint) is
refused unless --allow-change names it."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import re
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import cyclopts
from jaxlaunch.launcher.configuration import options as options_lib
from jaxlaunch.launcher.configuration.schema import (
    BUILTIN_ENTRY,
    JobConfig,
    LaunchOptions,
    apply,
    changed_fields,
    check_run_path,
    from_json,
    merge_settings,
    override,
    read_yaml,
    run_changes,
    validate,
)
from jaxlaunch.launcher.records.runs import RunDir

from jaxlaunch.contract import data_order, events
from jaxlaunch.contract import entry as entry_lib
from jaxlaunch.contract.protocol import ConfigError, EntryRef, Injection
from jaxlaunch.contract.values import Given

RUNS_ROOT = pathlib.Path("runs")
"""Where runs go without --run-dir (relative to the working directory, as Ray's ~/ray_results)."""
RUN_TIME_FORMAT = "%Y%m%d-%H%M%S"


ROOTS = (JobConfig, LaunchOptions)
"""Where the flags and `jaxlaunch.launch`'s keywords are declared."""


@dataclasses.dataclass(frozen=True)
class PreparedJob:
    job: JobConfig
    entry: entry_lib.Entry
    fingerprint: Any
    injections: tuple[Injection, ...]
    chaos_mean_s: float | None
    fresh_dir: bool
    """The run directory did not exist before this launch (remove it if the launch is refused)."""
    announce: str = ""
    """The line that says, at the start, where the run is."""
    entry_code: str | None = None
    """A hash of the entry's file (`entry.code_digest`)."""
    entry_imports: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """The hashes of the project's files the entry imports (`entry.imports_digest`)."""
    changes: Mapping[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    """What this --resume changes about the run, accepted by --allow-change: name -> (before, after)."""


def prepare(given: Mapping[str, Any], entry_args: Sequence[str] = (), typed: JobConfig | None = None,
            found: entry_lib.Entry | None = None) -> PreparedJob:
    """`given`: what the user asked for, by keyword (flags' names with underscores, as
    `jaxlaunch.launch` takes them; an entry's declared settings too); `entry_args`: command-line
    arguments the launcher does not declare, for the entry's settings; `typed`: a JobConfig whose
    fields that differ from the defaults count as given (under `given`); `found`: the entry given as
    a function (`jaxlaunch.launch(main)`), named in `given` by its entry text. Raises ConfigError for
    anything wrong; writes nothing."""
    by_root, entry_keywords = options_lib.split_by_root(given, ROOTS)
    launch = LaunchOptions(**by_root[LaunchOptions])
    changes = changed_fields(typed, JobConfig()) if typed is not None else {}
    typed_settings = changes.pop("config", {})
    changes.update(by_root[JobConfig])
    set_flags = merge_settings(typed_settings, changes.pop("config", {}))
    file_data = read_yaml(launch.config_file) if launch.config_file is not None else {}
    entry_text = changes.get("entry") or file_data.get("entry") or BUILTIN_ENTRY
    if file_data.get("resume"):
        raise ConfigError(f"--config {launch.config_file}: resume is not a setting of a file; pass --resume")
    from_file = file_data.get("run_dir")
    if from_file is not None and not isinstance(from_file, str):
        raise ConfigError(f"--config {launch.config_file}: run_dir must be a path, got {from_file!r}")
    flag_dir = changes.pop("run_dir", None)
    if flag_dir is not None and launch.name is not None:
        raise ConfigError("--name and --run-dir both name the run's folder: pass one of them")
    given_dir = flag_dir if flag_dir is not None else None if launch.name is not None else from_file
    run_dir, announce = _run_dir(given_dir, launch, str(entry_text))
    run = RunDir(run_dir)
    check_run_path(run_dir, bool(launch.resume))
    resume = _resume_mode(launch.resume, run)
    saved = _saved_job(run) if resume else None
    launches = [e for e in run.events() if isinstance(e, events.Launch)] if saved is not None else []
    job = saved or JobConfig()
    last_entry = entry_lib.canonical(launches[-1].entry) if launches and launches[-1].entry else None
    if last_entry is not None and "entry" not in changes and "entry" not in file_data \
            and entry_lib.sent_by_value(last_entry) is None and entry_lib.found_here(last_entry):
        # The file the run's last launch found, wherever this one starts: a run written before entries
        # were saved resolved kept a relative path, which another working directory would find elsewhere.
        job = dataclasses.replace(job, entry=last_entry)
    if launch.config_file is not None:
        job = apply(job, file_data, launch.config_file)
    job = override(job, run_dir=run_dir, resume=resume, **changes)
    validate(job, launch)
    entry = found if found is not None and str(found.ref) == job.entry else entry_lib.resolve(job.entry)
    if entry.ref.payload is None:
        job = dataclasses.replace(job, entry=str(entry.ref))  # saved resolved: the same file from any folder
    declared = entry_settings(entry, entry_args, entry_keywords)
    kept = job.config
    if saved is not None and entry.spec.defaults is not None:
        # A saved setting the entry no longer has (a nested key too): left out, a change of the run that
        # `_refuse_silent_changes` names. One the --config file gives is checked as any other.
        kept = merge_settings(_without_gone(saved.config, entry.spec.defaults), file_data.get("config") or {})
    settings = entry.settings(merge_settings(merge_settings(kept, declared), set_flags))
    job = dataclasses.replace(job, config=settings)
    if not resume and job.train.schedule_steps is None:
        job = override(job, **{"train.schedule_steps": job.train.steps})
    entry.check(settings, job.mesh_for(job.num_hosts))
    fingerprint = entry.fingerprint(settings)
    code, imports = entry_lib.code_digest(entry.ref), entry_lib.imports_digest(entry.ref)
    accepted: dict[str, tuple[Any, Any]] = {}
    if saved is not None:
        committed = run.committed_steps()
        if "train.steps" in changes or "steps" in (file_data.get("train") or {}):
            _refuse_steps_behind(committed, job)
        accepted = _refuse_silent_changes(launches[-1] if launches else None, saved, job, fingerprint, code,
                                          launch.allow_change, entry.ref)
        if data_order.ALLOW_KEY not in launch.allow_change and committed:
            _refuse_data_order_change(run.checkpoint_meta(committed[0]), saved, job)
    return PreparedJob(job, entry, fingerprint, launch.inject, launch.chaos, not run.exists(), announce,
                       entry_code=code, entry_imports=imports, changes=accepted)


def _without_gone(saved: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The saved settings the entry still declares, nested mappings key by key."""
    return {k: _without_gone(v, defaults[k]) if isinstance(v, Mapping) and isinstance(defaults[k], Mapping)
            and defaults[k] else v for k, v in saved.items() if k in defaults}


# ---- the entry's declared settings as flags and keywords ------------------------------------------------

def settings_parameters(entry: entry_lib.Entry) -> dict[str, inspect.Parameter]:
    """A parameter per declared setting of the entry (`seq_len` is --seq-len), by setting, unless a
    launcher flag or keyword has its name (then only --set KEY=VALUE sets it); values are as written
    for a text setting, else YAML scalars, typed like the defaults. Given twice, the last value wins,
    as for the launcher's flags. A parameter's own name is `setting_<i>` (a setting may be named
    `lambda`)."""
    options = options_lib.table(*ROOTS)
    taken = {*options, *(o.flag for o in options.values()), *options_lib.RESERVED_FLAGS,
             *("--no-" + o.flag.removeprefix("--") for o in options.values() if o.value_type is bool)}
    group = cyclopts.Group(f"settings of {entry.ref} (ctx.config; also --set KEY=VALUE)", sort_key=len(ROOTS) * 99)
    out: dict[str, inspect.Parameter] = {}
    for key, default in (entry.spec.defaults or {}).items():
        name = options_lib.flag_name(key)
        if not key.isidentifier() or key in taken or name in taken:
            continue
        spec = cyclopts.Parameter(name=name, group=group, help=f"(default: {default})", allow_repeating=True,
                                  show_default=False, converter=lambda _, tokens: Given(tokens[0].value),
                                  metavar=type(default).__name__.upper() if default is not None else "VALUE")
        out[key] = inspect.Parameter(f"setting_{len(out)}", inspect.Parameter.KEYWORD_ONLY, default=None,
                                     annotation=Annotated[Any, spec])
    return out


def entry_settings(entry: entry_lib.Entry, args: Sequence[str], keywords: Mapping[str, Any]) -> dict[str, Any]:
    """The entry's settings given as flags (`args`) or keywords; ConfigError for anything else."""
    declared = entry.spec.defaults or {}
    unknown = sorted(set(keywords) - set(declared))
    if unknown:
        known = [*options_lib.table(*ROOTS), *declared]
        raise ConfigError(f"jaxlaunch.launch got unknown option {unknown[0]!r}"
                          f"{options_lib.suggestion(unknown[0], known)}; {_declares(entry)}")
    params = settings_parameters(entry)
    app = options_lib.quiet_app(help_flags=(), default_command=options_lib.command(params.values()))
    _, parsed, extra = options_lib.parse_known(app, args)
    if extra:
        word = next((a.split("=")[0] for a in extra if a.startswith("-")), extra[0])
        known = [o.flag for o in options_lib.table(*ROOTS).values()] + [options_lib.flag_name(k) for k in declared]
        raise ConfigError(f"unknown flag {word}{options_lib.suggestion(word, known)}; {_declares(entry)}")
    key_of = {param.name: key for key, param in params.items()}
    flags = {key_of[name]: value for name, value in parsed.items()}
    for key, value in flags.items():
        try:
            entry.settings({key: value})
        except ConfigError:  # its message names --set; the user typed the setting's flag
            default = declared[key]
            raise ConfigError(f"{options_lib.flag_name(key)} {value!r}: expected {type(default).__name__} like its "
                              f"default {default!r}") from None
    return {**keywords, **flags}


def _declares(entry: entry_lib.Entry) -> str:
    if not entry.spec.defaults:
        return f"{entry.ref} declares no settings (give its settings with --set KEY=VALUE)"
    return f"{entry.ref}'s settings are {', '.join(sorted(entry.spec.defaults))}"


# ---- which run directory -------------------------------------------------------------------------------------

def run_name(entry_text: str) -> str:
    """The entry's part of its runs' names: "lm" for jaxlaunch.models.lm:main, "train.pretrain" for
    train.py:pretrain."""
    sent = entry_lib.sent_by_value(entry_text)
    if sent is not None:
        return sent
    target, _, function = entry_text.rpartition(":") if ":" in entry_text else (entry_text, "", "main")
    stem = pathlib.Path(target).stem if target.endswith(".py") else target.rsplit(".", 1)[-1]
    return stem if function in ("", entry_lib.DEFAULT_FUNCTION) else f"{stem}.{function}"


def runs_of(name: str, root: pathlib.Path = RUNS_ROOT) -> list[pathlib.Path]:
    """The runs named after an entry under `root`, oldest first."""
    pattern = re.compile(rf"{re.escape(name)}-\d{{8}}-\d{{6}}(-\d+)?")
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if pattern.fullmatch(p.name) and RunDir(p).is_run()),
                  key=lambda p: p.name)


def _run_dir(given: str | None, launch: LaunchOptions, entry_text: str) -> tuple[str, str]:
    """The run directory, and the line that says where it is."""
    if given is not None and not given.strip():
        raise ConfigError("--run-dir is empty: name a folder for the run, or leave it out for runs/<entry>-<time>")
    if launch.name is not None and (not launch.name.strip() or launch.name in (".", "..") or "/" in launch.name):
        raise ConfigError(f"--name {launch.name!r}: a run's name is one folder under {RUNS_ROOT}/; for another "
                          f"place pass --run-dir")
    if given is None and launch.name is not None:
        given = str(RUNS_ROOT / launch.name)
    if given is not None:
        return given, f"{'resuming' if launch.resume else 'run directory:'} {given}"
    name = run_name(entry_text)
    if launch.resume:
        found = runs_of(name)
        if found:
            others = f" (the newest of {len(found)} runs of {name}; --run-dir to choose)" if len(found) > 1 else ""
            return str(found[-1]), f"resuming {found[-1]}{others}"
        if launch.resume is True:
            listing = sorted(p.name for p in RUNS_ROOT.iterdir() if p.is_dir()) if RUNS_ROOT.is_dir() else []
            there = f"runs there: {', '.join(listing[-8:])}" if listing else "it holds none"
            raise ConfigError(f"--resume: no run of {name} under {RUNS_ROOT}/ ({there}); pass the --run-dir of the "
                              f"run to continue, or --resume auto to start one")
    stamp = time.strftime(RUN_TIME_FORMAT)
    path, number = RUNS_ROOT / f"{name}-{stamp}", 1
    while path.exists():  # two launches in one second
        number += 1
        path = RUNS_ROOT / f"{name}-{stamp}-{number}"
    return str(path), f"run directory: {path}"


def _resume_mode(resume: bool | str, run: RunDir) -> bool:
    if resume == "auto":
        if run.is_run():
            return True
        if run.is_empty():
            return False
        raise ConfigError(f"--resume auto: {run.path} holds files but no run (no config.json); "
                          f"choose an empty or new --run-dir")
    if resume and not run.exists():
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


def _refuse_silent_changes(last: events.Launch | None, saved: JobConfig, job: JobConfig, fingerprint: Any,
                           code: str | None, allowed: Sequence[str],
                           entry_ref: EntryRef | None = None) -> dict[str, tuple[Any, Any]]:
    """Refuses a change to what the run computes unless `allowed` names it; returns the changes
    accepted. The entry is compared as the file or module it resolved to (the run's last launch
    recorded it), by its file's content, and by the content of the project's files it imports."""
    changes = run_changes(saved, job)
    recorded = entry_lib.canonical(last.entry) if last is not None and last.entry else None
    # A file recorded on another machine or in a checkout since moved: the run's saved text, found here.
    old_entry = recorded if recorded is not None and entry_lib.found_here(recorded) else entry_lib.canonical(
        saved.entry)
    old_code = last.entry_code if last is not None else None
    changes.pop("entry", None)
    if old_entry != job.entry and (old_code is None or old_code != code):  # a moved copy of the file is the same
        changes = {"entry": (old_entry, job.entry), **changes}
    elif old_code is not None and code is not None and old_code != code:
        changes = {"entry": (f"{old_entry} (file {old_code})", f"{job.entry} (file {code}, edited)"),
                   **changes}
    elif last is not None and last.entry_imports and entry_ref is not None and (
            names := entry_lib.edited_imports(entry_ref, last.entry_imports)):
        # As the hosts check them: a file recorded then that differs now or is gone (one the rules find
        # now, not then, is no edit).
        changes = {"entry": (old_entry, f"{job.entry} (the file{'s' if len(names) > 1 else ''} it imports "
                                        f"{', '.join(names)} changed)"), **changes}
    old_print = last.fingerprint if last is not None else None
    if last is not None and fingerprint != old_print and (old_print is not None or fingerprint is not None):
        changes["fingerprint"] = (old_print, fingerprint)
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        first = next(iter(refused))
        old, new = refused[first]
        what = "the entry's input changed" if first == "fingerprint" else f"{first} {old!r} -> {new!r}"
        more = f" (and {', '.join(list(refused)[1:])})" if len(refused) > 1 else ""
        raise ConfigError(f"--resume would change the run: {what}{more}; pass --allow-change {first} to accept "
                          f"it, or leave it out to continue unchanged")
    return changes


def _refuse_steps_behind(steps: Sequence[int], job: JobConfig) -> None:
    """A --resume to fewer steps than the run has committed (`steps`, newest first) would train
    nothing and rewrite the run's length for the next --resume."""
    if steps and job.train.steps < steps[0]:
        raise ConfigError(f"--resume --steps {job.train.steps}: the run has already committed step {steps[0]}; "
                          f"pass --steps {steps[0]} or more, or leave --steps out")


def _first_host_counts(saved: JobConfig, job: JobConfig) -> list[int]:
    """The host counts this launch's first attempt may take that the run's saved range did not offer
    (the largest that fits and is free, up to --max-hosts), and --hosts: a per-host data position
    cannot follow any of them."""
    before = range(saved.min_hosts, saved.max_hosts + 1)
    wider = [n for n in range(job.min_hosts, job.max_hosts + 1)
             if n not in before and n != job.num_hosts and _mesh_fits(job, n)]
    return [job.num_hosts, *wider]


def _mesh_fits(job: JobConfig, num_hosts: int) -> bool:
    """Whether the job's mesh divides `num_hosts` hosts' devices (the scaling policy's rule)."""
    try:
        job.mesh_for(num_hosts)
    except ConfigError:
        return False
    return True


def _refuse_data_order_change(meta: Any, saved: JobConfig, job: JobConfig) -> None:
    """Per-host iterator states of the newest committed step (`meta`, its record) cannot be split or
    merged over another host count: a host count this launch's first attempt may take that differs
    from the step's is refused, naming them (`jaxlaunch.contract.data_order`)."""
    topology = meta.get("topology") if isinstance(meta, dict) else None
    saved_hosts = topology.get("num_hosts") if isinstance(topology, dict) else None
    parts = meta.get("extra") if isinstance(meta, dict) else None
    first = parts[0] if isinstance(parts, list) and parts else parts
    if not isinstance(first, dict) or not isinstance(saved_hosts, int):
        return  # a step whose record is not a launcher's: its restore says what is wrong with it
    for hosts in _first_host_counts(saved, job):
        keys = data_order.changed_keys(first, saved_hosts, hosts)
        if keys:
            fix = None if hosts == job.num_hosts else (
                f"--max-hosts {saved.max_hosts} and --min-hosts {saved.min_hosts} (this launch's range "
                f"{job.min_hosts}-{job.max_hosts} may start on {hosts})")
            raise ConfigError(data_order.resume_refusal(keys, saved_hosts, hosts, fix))
