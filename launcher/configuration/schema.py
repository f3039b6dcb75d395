"""The job's configuration: typed dataclasses, YAML loading, command-line overrides, validation.

Each section is a dataclass owned by the code that uses it (`jaxlaunch.launcher.control.policy` owns the fault and
watchdog sections, `jaxlaunch.contract.protocol` the host-side checkpoint and distributed ones); this module
composes them into a `JobConfig`, loads YAML files whose keys mirror the dataclasses, and validates
everything that needs no cluster. A `ConfigError` is the user's mistake: one line, exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import typing
from collections.abc import Mapping
from typing import Any, Literal

import pydantic
import yaml
from jaxlaunch.launcher.control.policy import FaultConfig, WatchdogConfig
from jaxlaunch.launcher.views import trackers

from jaxlaunch.contract.entry import BUILTIN_ENTRY, LEGACY_ENTRIES
from jaxlaunch.contract.flags import flag
from jaxlaunch.contract.mesh import resolve_mesh
from jaxlaunch.contract.protocol import CheckpointConfig, ConfigError, DistributedConfig, Injection, InjectionKind
from jaxlaunch.contract.store import open_store
from jaxlaunch.contract.values import Given, coerce, load_yaml, merge_settings

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
PLATFORMS = ("cpu", "cuda", "tpu")
MAX_STEPS = 2**31 - 1
"""Optimizer step counters are int32."""
MAX_SECONDS = 10**9
"""Any duration's bound (31 years): Ray and JAX take durations as integer milliseconds or seconds."""
MAX_INT = 2**63 - 1
"""Any integer setting's bound: a 64-bit signed integer (a seed above it overflows JAX's)."""
MAX_CONFIG_BYTES = 16 * 2**20
MAX_PORT = 65535

__all__ = ["ConfigError", "ClusterConfig", "TrainConfig", "JobConfig", "LaunchOptions", "load_file", "override",
           "validate"]


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Where the hosts run and what each one reserves."""

    address: str | None = flag(None)
    """An existing Ray cluster to run on ("auto" or HOST:PORT; default: start an embedded one)."""
    platform: str = "cpu"
    """JAX platform of every host process: cpu, cuda or tpu."""
    devices_per_host: int = flag(2)
    """Accelerator devices each host process owns (on cpu: the forced host device count)."""
    resources_per_host: dict[str, float] = dataclasses.field(default_factory=lambda: {"CPU": 1})
    """Ray resources reserved for each host process (one placement-group bundle)."""
    placement_strategy: str = "PACK"
    """Placement-group strategy: PACK on one machine, STRICT_SPREAD for one host per node."""
    embedded_num_cpus: int = 8
    """Logical CPUs of the embedded Ray instance (it bounds how many hosts fit on it)."""
    placement_timeout_s: float = flag(60.0)
    """Seconds one placement may take before the job tries fewer hosts (and waits for capacity)."""
    warm_standby: bool = flag(True)
    """Keep a spare group of host processes started and warmed up (Python, JAX, Flax and Orbax
    imported) while the cluster has room for one, so a restart skips process start and imports
    (--no-warm-standby: a restart starts fresh processes; the spares' imports, about 2 s of CPU per
    spare each time a group is made, at the start and after each restart, no longer run beside the
    training)."""
    ynnpack: bool = False
    """On cpu: let XLA run dots and reductions with YNNPACK (jaxlib's default). Off, because YNNPACK
    builds its kernels' pipelines in a program's first execution, which is a restart's first step:
    measured on the small preset, 2 hosts, a restart's first step 1.41 s with it against 0.75 s
    without, steady steps 0.69 against 0.61 s. It decides a loss's last bits, so a resume keeps the
    run's value (`RUN_SHAPING`)."""
    compilation_cache: bool = True
    """Keep compiled programs in JAX's persistent cache, so a restart (and a new run of a program
    compiled before) loads them instead of compiling again."""
    compilation_cache_dir: str | None = None
    """Where, on each host: None is the job user's own cache, $XDG_CACHE_HOME/jaxlaunch/compile
    (~/.cache/...), shared by all their runs. Used only if the folder is the job user's alone."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run's length and randomness, the same for any entry."""

    steps: int = flag(300)
    """Total steps of the run (`ctx.steps`)."""
    schedule_steps: int | None = flag(None)
    """Length of the learning-rate schedule (`ctx.schedule_steps`), fixed at the run's first launch
    (default: its --steps), so that a resume with more --steps extends training without reshaping it."""
    seed: int = flag(0)
    """Seed of the parameters and the data order (`ctx.seed`)."""


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Where the run is followed while it goes, besides TensorBoard."""

    trackers: tuple[str, ...] = flag((), cli="tracker", repeat=True, metavar="NAME")
    """Log the run to an experiment tracker too, one tracker run across restarts and resumes: mlflow or
    wandb (repeatable, or a list: mlflow,wandb; configured by MLFLOW_TRACKING_URI, WANDB_PROJECT,
    WANDB_MODE, ...; default: none)."""
    metrics_port: int | None = flag(None, metavar="PORT")
    """Serve live Prometheus metrics at http://HOST:PORT/metrics while the job runs (default: off)."""

    def __post_init__(self) -> None:
        # "mlflow,wandb" is two trackers; a config file may name one without a list.
        names = (self.trackers,) if isinstance(self.trackers, str) else self.trackers
        if isinstance(names, list | tuple) and all(isinstance(n, str) for n in names):
            object.__setattr__(self, "trackers", tuple(n for item in names for n in item.split(",") if n))


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Everything one launch needs."""

    entry: str = flag(BUILTIN_ENTRY, metavar="FILE.py:FN|PKG.MODULE:FN")
    """The function every host runs: "path/to/file.py:function" or "package.module:function"."""
    config: dict[str, Any] = flag(default_factory=dict, cli="set", metavar="KEY=VALUE", repeat=True,
                                  parse=lambda text: parse_settings([text]))
    """The entry's own settings (`ctx.config`): the YAML `config:` section, --set KEY=VALUE (as
    written for a text setting, else a YAML scalar; repeatable) and the flags of an entry's declared
    settings (default: the entry's defaults)."""
    num_hosts: int = flag(4, name="hosts", metavar="N")
    """JAX processes, one per Ray host slot."""
    mesh: dict[str, int] = flag(default_factory=lambda: {"data": -1, "model": 2}, metavar="AXIS=SIZE,...",
                                parse=lambda text: parse_mesh(text))
    """Mesh axes and sizes over all devices of all hosts; one size may be -1 (inferred)."""
    run_dir: str | None = flag(None, metavar="DIR")
    """Run directory: checkpoints, metrics, events, host logs, summary (default: a new
    runs/<entry>-<YYYYmmdd-HHMMSS> for every launch; --name NAME: runs/NAME)."""
    resume: bool = False
    """Continue the run in run_dir from its latest committed checkpoint."""
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    watchdog: WatchdogConfig = dataclasses.field(default_factory=WatchdogConfig)
    fault: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    @property
    def min_hosts(self) -> int:
        return self.fault.min_hosts or self.num_hosts

    @property
    def max_hosts(self) -> int:
        return self.fault.max_hosts or self.num_hosts

    @property
    def schedule_steps(self) -> int:
        return self.train.schedule_steps or self.train.steps

    def mesh_for(self, num_hosts: int) -> dict[str, int]:
        return resolve_mesh(self.mesh, num_hosts * self.cluster.devices_per_host)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """What one launch asks beyond the job's saved configuration."""

    config_file: str | None = flag(None, cli="config", metavar="FILE")
    """A cluster config YAML (cluster_configs/), applied over the defaults, or on --resume over the run's
    saved settings; flags override it (default: none, the embedded local Ray)."""
    name: str | None = flag(None)
    """Run the job in runs/NAME (default: a new runs/<entry>-<YYYYmmdd-HHMMSS>)."""
    resume: bool | Literal["auto"] = flag(False, metavar="auto")
    """Continue the run in --run-dir (default: the newest run of the entry under runs/) from its latest
    committed step; `--resume auto` also starts it when there is none (default: off, a new run)."""
    allow_change: tuple[str, ...] = flag((), repeat=True, metavar="KEY")
    """On --resume, accept a change to what the run computes: an entry setting, seed, schedule_steps,
    entry, cluster.ynnpack, the input's fingerprint, or data_order (per-host iterators on another
    host count) (repeatable; default: none)."""
    inject: tuple[Injection, ...] = flag((), repeat=True, parse=Injection.parse, metavar="KIND@step=N,host=I")
    """Inject a failure after a reported step: crash, kill, hang, exception, preempt, slow (,factor=F),
    bitflip or kill_in_handoff (repeatable; ,times=K; default: none)."""
    chaos: float | None = flag(None, metavar="MEAN_SECONDS")
    """SIGKILL a random host at random times, MEAN_SECONDS apart on average (default: off)."""


# ---- validation ---------------------------------------------------------------------------------

MIN_STARTUP_TIMEOUT_S = 10.0
"""A host's start to its first step takes at least this: a process, the imports of JAX, Flax and
Orbax, jax.distributed and a compilation (about 5 s on a warm machine with a cached program)."""
MIN_POLLS_PER_TIMEOUT = 2
"""A watchdog limit spans at least this many of the driver's polls, or a host that is merely between
two polls counts as silent."""
NON_NEGATIVE = {"fault": ("max_restarts", "max_preemptions", "backoff_s", "verify_every"), "train": ("seed",)}
"""Numbers that may be 0; every other number of a section is above 0."""


class CheckedJob(pydantic.BaseModel):
    """A JobConfig checked: every field's type (pydantic, strict), then every rule that needs neither
    a cluster nor the entry's code, in `rules`, each with a one-line message naming the fix."""

    model_config = pydantic.ConfigDict(strict=True, revalidate_instances="always", frozen=True)
    job: JobConfig
    launch: LaunchOptions

    @pydantic.model_validator(mode="after")
    def rules(self) -> CheckedJob:
        job, cluster, checkpoint, watchdog = self.job, self.job.cluster, self.job.checkpoint, self.job.watchdog
        if job.num_hosts < 1:
            raise ConfigError(f"--hosts must be at least 1, got {job.num_hosts}")
        if cluster.platform not in PLATFORMS:
            raise ConfigError(f"cluster.platform {cluster.platform!r} is not one of {', '.join(PLATFORMS)}")
        if cluster.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"cluster.placement_strategy {cluster.placement_strategy!r} is not one of "
                              f"{', '.join(PLACEMENT_STRATEGIES)}")
        if not cluster.resources_per_host or any(
                not math.isfinite(v) or v <= 0 for v in cluster.resources_per_host.values()):
            raise ConfigError(f"cluster.resources_per_host must name positive amounts, got "
                              f"{cluster.resources_per_host}")
        for where in ("cluster", "checkpoint", "distributed", "watchdog", "fault", "train"):
            _positive_numbers(getattr(job, where), where, NON_NEGATIVE.get(where, ()))
        if not 1 <= job.min_hosts <= job.num_hosts <= job.max_hosts:
            raise ConfigError(f"need 1 <= --min-hosts ({job.min_hosts}) <= --hosts ({job.num_hosts}) <= "
                              f"--max-hosts ({job.max_hosts})")
        for name in ("steps", "schedule_steps"):
            value = getattr(job.train, name)
            if value is not None and value > MAX_STEPS:
                raise ConfigError(f"train.{name} must be at most {MAX_STEPS} (a 32-bit step counter), got {value}")
        every, persist = checkpoint.save_every, checkpoint.persist_every
        if checkpoint.memory_tier and isinstance(every, int) and isinstance(persist, int) and persist % every:
            lower = persist // every * every
            fits = " or ".join(str(n) for n in (lower, lower + every) if n >= every)
            raise ConfigError(f"with the memory tier, --persist-every {persist} must be a multiple of --save-every "
                              f"{every} (a durable save is one of the saves): pass --persist-every {fits}")
        if watchdog.startup_timeout_s < MIN_STARTUP_TIMEOUT_S:
            raise ConfigError(f"--startup-timeout {watchdog.startup_timeout_s:g} is too short to start JAX on a "
                              f"host: pass at least {MIN_STARTUP_TIMEOUT_S:g} seconds")
        shortest = MIN_POLLS_PER_TIMEOUT * watchdog.poll_interval_s
        for flag_name, limit in (("--hang-timeout", watchdog.hang_timeout_s),
                                 ("--save-timeout", watchdog.save_timeout_s)):
            if limit < shortest:
                raise ConfigError(f"{flag_name} {limit:g} is shorter than {MIN_POLLS_PER_TIMEOUT} of the driver's "
                                  f"polls (watchdog.poll_interval_s {watchdog.poll_interval_s:g}): pass at least "
                                  f"{shortest:g} seconds")
        if job.fault.max_backoff_s < job.fault.backoff_s:
            raise ConfigError(f"fault.max_backoff_s ({job.fault.max_backoff_s:g}) is below fault.backoff_s "
                              f"({job.fault.backoff_s:g}): raise max_backoff_s or lower backoff_s")
        resolve_mesh(job.mesh, job.num_hosts * cluster.devices_per_host)
        trackers.check_trackers(job.tracking.trackers)
        port = job.tracking.metrics_port
        if port is not None and not 1 <= port <= MAX_PORT:
            raise ConfigError(f"--metrics-port must be a port number from 1 to {MAX_PORT}, got {port}")
        if self.launch.allow_change and not self.launch.resume:
            raise ConfigError("--allow-change accepts a change on --resume, and this launch starts a run: drop it")
        chaos = self.launch.chaos
        if chaos is not None and not (chaos > 0 and math.isfinite(chaos)):
            raise ConfigError(f"--chaos must be a finite number of seconds above 0, got {chaos}")
        for injection in self.launch.inject:
            if injection.step > job.train.steps:
                raise ConfigError(f"--inject {injection}: step {injection.step} is after the run's last step "
                                  f"(--steps {job.train.steps}), so it would never happen")
            if injection.host >= job.max_hosts:
                raise ConfigError(f"--inject {injection}: host {injection.host} does not exist; the job has at most "
                                  f"{job.max_hosts} hosts (0..{job.max_hosts - 1})")
            if injection.kind != InjectionKind.KILL_IN_HANDOFF:
                continue
            every = job.checkpoint.save_every
            if not job.checkpoint.memory_tier:
                raise ConfigError(f"--inject {injection}: a hand-off exists only with the memory tier; "
                                  "drop --no-memory-tier")
            if every == "auto":
                raise ConfigError(f"--inject {injection}: with --save-every auto step {injection.step} may make no "
                                  "memory save; give --save-every a number")
            if injection.step % every:
                raise ConfigError(f"--inject {injection}: step {injection.step} makes no memory save; "
                                  f"use a multiple of --save-every ({every})")
        return self


def _positive_numbers(section: Any, where: str, allow_zero: tuple[str, ...] = ()) -> None:
    """Every int and float field of a section is a finite number above 0 (or at least 0), a duration
    (`*_s`) at most `MAX_SECONDS` and an int at most `MAX_INT` (what JAX, Ray and the seed take)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        low_ok = value >= 0 if f.name in allow_zero else value > 0
        if not math.isfinite(value) or not low_ok:
            bound = "at least 0" if f.name in allow_zero else "above 0"
            raise ConfigError(f"{where}.{f.name} must be a finite number {bound}, got {value}")
        most = MAX_SECONDS if f.name.endswith("_s") else MAX_INT if isinstance(value, int) else None
        if most is not None and value > most:
            unit = " seconds (31 years)" if most == MAX_SECONDS else ""
            raise ConfigError(f"{where}.{f.name} must be at most {most:,}{unit}, got {value:,}")


def validate(job: JobConfig, launch: LaunchOptions | None = None) -> None:
    """Every check that needs neither a cluster nor the entry's code (`CheckedJob`). Raises ConfigError."""
    try:
        CheckedJob(job=job, launch=launch or LaunchOptions())
    except pydantic.ValidationError as err:
        first = err.errors(include_url=False)[0]
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, ConfigError):
            raise ConfigError(str(cause)) from None
        where = ".".join(str(part) for part in first["loc"][1:])
        raise ConfigError(f"{where}: {first['msg'].lower()}, got {first.get('input')!r}") from None


def check_run_path(path: str, resume: bool) -> None:
    """A --run-dir that cannot be used: a file, a folder that cannot be written, a URL whose scheme
    no installed extra serves, a bucket that does not exist or cannot be reached: ConfigError."""
    open_store(path).check()


# ---- loading ------------------------------------------------------------------------------------

def _from_dict(cls: type, data: Mapping[str, Any], where: str, base: Any = None) -> Any:
    """A dataclass from a mapping, each key checked and typed; keys absent keep `base`'s values."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = _from_dict(hint, value, f"{where}.{name}", getattr(base, name) if base is not None else None)
        else:
            value = coerce(value, hint, f"{where}.{name}")
        kwargs[name] = value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a cluster config file (its `launcher:` section if it has one)."""
    p = pathlib.Path(path)
    if not str(path).strip():
        raise ConfigError("--config is empty: name a YAML file of settings (cluster_configs/ has examples)")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # /dev/zero, a pipe: never more than a settings file takes
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"--config {path}: over {MAX_CONFIG_BYTES // 2**20} MiB, not a settings file")
        data = load_yaml(raw.decode()) or {}
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    section = data.get("launcher", data)
    if not isinstance(section, dict):
        raise ConfigError(f"--config {path}: launcher: must be a mapping of settings, got {section!r}")
    return section


def apply(job: JobConfig, data: Mapping[str, Any], where: str) -> JobConfig:
    """`job` with the settings of a (possibly partial) mapping applied over it; the entry's settings
    (`config:`) are merged key by key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    rest = {k: v for k, v in data.items() if k != "config"}
    job = _from_dict(JobConfig, rest, where, base=job)
    if "config" in data:
        if not isinstance(data["config"], Mapping):
            raise ConfigError(f"{where}.config must be a mapping of the entry's settings, got {data['config']!r}")
        job = dataclasses.replace(job, config=merge_settings(job.config, data["config"]))
    return job


def load_file(path: str | os.PathLike, base: JobConfig | None = None) -> JobConfig:
    """A JobConfig from a YAML file of cluster_configs/ over `base` (default: the defaults)."""
    return apply(base or JobConfig(), read_yaml(path), str(path))


REMOVED_KEYS = {"checkpoint": ("save_timeout_s",)}
"""Keys that runs saved by earlier versions hold and this one no longer reads (the watchdog's
save_timeout_s is the one that counts)."""


ADDED_KEYS = {"cluster": {"ynnpack": True}}
"""Keys that runs saved by earlier versions lack, with the value those versions ran with (XLA's
YNNPACK fusions were on before `cluster.ynnpack` existed): a resume goes on as the run began."""


def from_json(data: dict[str, Any]) -> JobConfig:
    """The JobConfig of a run's config.json, also as earlier versions wrote it."""
    data = dict(data)
    for section, defaults in ADDED_KEYS.items():
        saved = data.get(section)
        data[section] = {**defaults, **(saved if isinstance(saved, Mapping) else {})}
    if data.get("entry") in LEGACY_ENTRIES:
        data["entry"] = LEGACY_ENTRIES[data["entry"]]
    for section, keys in REMOVED_KEYS.items():
        if isinstance(data.get(section), Mapping):
            data[section] = {k: v for k, v in data[section].items() if k not in keys}
    return _from_dict(JobConfig, data, "saved job config")


def override(job: JobConfig, **changes: Any) -> JobConfig:
    """A copy with dotted-path changes applied: override(job, **{"train.steps": 10}); None is "not
    given" and changes nothing."""
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in changes.items():
        if value is None:
            continue
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
        else:
            top[key] = value
    for section, values in nested.items():
        top[section] = dataclasses.replace(getattr(job, section), **values)
    return dataclasses.replace(job, **top)


def changed_fields(config: Any, base: Any) -> dict[str, Any]:
    """The dotted paths where a config differs from `base`, with its values: {"train.steps": 10}."""
    out = {}
    for f in dataclasses.fields(config):
        mine, theirs = getattr(config, f.name), getattr(base, f.name)
        if dataclasses.is_dataclass(mine):
            out.update({f"{f.name}.{k}": v for k, v in changed_fields(mine, theirs).items()})
        elif mine != theirs:
            out[f.name] = mine
    return out


def parse_mesh(text: str) -> dict[str, int]:
    """'data=-1,model=2' -> {'data': -1, 'model': 2}."""
    try:
        pairs = [item.split("=") for item in text.split(",") if item]
        mesh = {name.strip(): int(size) for name, size in pairs}
    except ValueError:
        raise ConfigError(f"--mesh {text!r} is not of the form data=-1,model=2") from None
    if len(mesh) < len(pairs):
        raise ConfigError(f"--mesh {text!r} names an axis twice: give each axis once")
    return mesh


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`--set key=value` flags as a mapping; values are the text as given (`Given`: a text setting keeps
    it, any other reads a YAML scalar: 3, 0.1, true), and a dotted key sets a nested value."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set learning_rate=0.001")
        value = Given(text)  # typed by the entry's setting (`jaxlaunch.contract.values.as_setting`)
        *parents, leaf = key.strip().split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


# ---- what a resume may change ------------------------------------------------------------------------

RUN_SHAPING = ("entry", "train.seed", "train.schedule_steps", "cluster.ynnpack")
"""Settings that decide what the run computes; with the entry's own settings, a resume keeps them
unless --allow-change names them (XLA's kernels decide a loss's last bits: a resume with YNNPACK
switched is no longer bit for bit the uninterrupted run)."""


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_changes(saved: JobConfig, new: JobConfig) -> dict[str, tuple[Any, Any]]:
    """Run-shaping settings that differ: name -> (saved, new). Entry settings go by their own name."""
    changes = {}
    for path in RUN_SHAPING:
        section, _, name = path.partition(".")
        old = getattr(getattr(saved, section), name) if name else getattr(saved, section)
        now = getattr(getattr(new, section), name) if name else getattr(new, section)
        if old != now:
            changes[path.removeprefix("train.")] = (old, now)
    old_cfg, new_cfg = _flatten(saved.config), _flatten(new.config)
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            changes[key] = (old_cfg.get(key), new_cfg.get(key))
    return changes
