"""Typed job configuration: dataclasses, YAML loading, CLI overrides and validation.

Plain Python (no JAX): the driver validates everything here before it starts Ray, and the host
processes receive the same frozen objects. A `ConfigError` is the user's mistake; the CLI prints it
on one line and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import types
import typing
from typing import Any

import yaml

from models.config import ModelConfig, preset

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CLUSTER_CONFIG = PROJECT_ROOT / "cluster_configs" / "local.yaml"
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
PLATFORMS = ("cpu", "cuda", "tpu")


class ConfigError(ValueError):
    """A user error in the configuration or the command line."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Where the hosts run and what each one reserves."""

    address: str | None = None
    """Address of an existing Ray cluster ("auto", "HOST:PORT"); None starts an embedded one."""
    platform: str = "cpu"
    """JAX platform of every host process: cpu, cuda or tpu."""
    devices_per_host: int = 2
    """Accelerator devices each host process owns (on cpu: the forced host device count)."""
    resources_per_host: dict[str, float] = dataclasses.field(default_factory=lambda: {"CPU": 1})
    """Ray resources reserved for each host process (one placement-group bundle)."""
    placement_strategy: str = "PACK"
    """Placement-group strategy: PACK on one machine, STRICT_SPREAD for one host per node."""
    embedded_num_cpus: int = 8
    """Logical CPUs of the embedded Ray instance (it bounds how many hosts fit on it)."""
    placement_timeout_s: float = 60.0
    """How long to wait for the cluster to place every host before giving up."""
    compilation_cache: bool = True
    """Keep compiled programs in RUN_DIR/compile_cache (JAX's persistent cache), so a restart
    loads them instead of compiling again."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training job itself."""

    model: str = "tiny"
    """Model size preset: tiny, small or base."""
    steps: int = 300
    """Total optimizer steps of the run."""
    global_batch_size: int = 32
    """Sequences per step over all hosts; fixed whatever the host count."""
    seq_len: int = 128
    """Bytes per training sequence (at most the preset's max_seq_len)."""
    learning_rate: float = 3e-3
    """Peak learning rate of the warm-up + cosine schedule."""
    warmup_steps: int = 30
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    grad_clip_norm: float = 1.0
    """Global gradient norm clip."""
    seed: int = 0
    """Seed of the parameters and of the data order."""
    data: str | None = None
    """Text file or folder to train on; None uses the Python standard library's sources."""

    def model_config(self) -> ModelConfig:
        return preset(self.model)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing."""

    save_every: int = 50
    """Save every this many steps (and always at the end)."""
    max_to_keep: int = 3
    """Committed checkpoints kept; older ones are deleted."""
    async_save: bool = True
    """Write checkpoints in the background while training continues."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Timeouts of `jax.distributed` and of the driver's watchdog."""

    init_timeout_s: int = 120
    """jax.distributed.initialize: how long every process waits for the others."""
    heartbeat_timeout_s: int = 10
    """Coordination-service heartbeat: a silent process is declared dead after this."""
    shutdown_timeout_s: int = 10
    """jax.distributed.shutdown: the barrier's limit."""
    startup_timeout_s: float = 300.0
    """Driver watchdog before the first step: start-up, compilation and restore."""
    hang_timeout_s: float = 60.0
    """Driver watchdog during training: the longest time without a completed step."""
    poll_interval_s: float = 0.25
    """How often the driver polls the hosts."""


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    """Restart budgets and elastic topology."""

    max_restarts: int = 3
    """Restarts after crashes, hangs and exceptions; then the job fails."""
    max_preemptions: int = 20
    """Restarts after preemptions and lost nodes (a separate, larger budget)."""
    backoff_s: float = 1.0
    """Wait before a second consecutive restart, doubling after (the first restart is immediate)."""
    max_backoff_s: float = 30.0
    """Longest wait between attempts."""
    min_hosts: int | None = None
    """Fewest hosts to run on (None: num_hosts)."""
    max_hosts: int | None = None
    """Most hosts to run on (None: num_hosts)."""
    capacity_timeout_s: float = 300.0
    """How long a restart waits for the cluster to have room for min_hosts."""
    grow_check_interval_s: float = 5.0
    """How often a running job checks whether capacity came back to grow on."""


INJECTION_KINDS = ("crash", "kill", "hang", "exception", "preempt")


@dataclasses.dataclass(frozen=True)
class Injection:
    """A failure to inject: `--inject KIND@step=N,host=I[,times=K]`."""

    kind: str
    step: int
    host: int = 0
    times: int = 1
    """On how many attempts it fires (an `exception` with a large count fails every attempt)."""

    @classmethod
    def parse(cls, text: str) -> Injection:
        form = "KIND@step=N,host=I[,times=K] with KIND one of " + ", ".join(INJECTION_KINDS)
        kind, _, rest = text.partition("@")
        if kind not in INJECTION_KINDS or not rest:
            raise ConfigError(f"--inject {text!r}: expected {form}")
        try:
            fields = {k.strip(): int(v) for k, v in (item.split("=") for item in rest.split(","))}
            injection = cls(kind=kind, **fields)
        except (ValueError, TypeError):
            raise ConfigError(f"--inject {text!r}: expected {form}") from None
        if injection.step < 1 or injection.host < 0 or injection.times < 1:
            raise ConfigError(f"--inject {text!r}: step and times must be at least 1, host at least 0")
        return injection


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Everything one launch needs."""

    num_hosts: int = 4
    """JAX processes, one per Ray host slot."""
    mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": -1, "model": 2})
    """Mesh axes and sizes over all devices of all hosts; one size may be -1 (inferred)."""
    run_dir: str = "runs/default"
    """Run directory: checkpoints, metrics, events, host logs, summary."""
    resume: bool = False
    """Continue the run in run_dir from its latest committed checkpoint."""
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    fault: FaultConfig = dataclasses.field(default_factory=FaultConfig)

    @property
    def min_hosts(self) -> int:
        return self.fault.min_hosts or self.num_hosts

    @property
    def max_hosts(self) -> int:
        return self.fault.max_hosts or self.num_hosts

    @property
    def num_devices(self) -> int:
        return self.num_hosts * self.cluster.devices_per_host

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_mesh(axes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Sizes of every mesh axis for `num_devices` devices, with the one -1 inferred."""
    if not axes:
        raise ConfigError("mesh needs at least one axis, e.g. {data: -1, model: 2}")
    inferred = [name for name, size in axes.items() if size == -1]
    bad = [name for name, size in axes.items() if size != -1 and (not isinstance(size, int) or size < 1)]
    if bad or len(inferred) > 1:
        raise ConfigError(f"mesh sizes must be positive integers with at most one -1, got {axes}")
    known = math.prod(size for size in axes.values() if size != -1)
    if inferred and num_devices % known:
        raise ConfigError(
            f"mesh {_mesh_str(axes)} does not divide the {num_devices} devices: "
            f"choose axis sizes whose product divides {num_devices}"
        )
    if not inferred and known != num_devices:
        raise ConfigError(
            f"mesh {_mesh_str(axes)} needs {known} devices but the job has {num_devices}: "
            f"make one axis -1 or change --hosts"
        )
    return {name: (num_devices // known if size == -1 else size) for name, size in axes.items()}


def _mesh_str(axes: dict[str, int]) -> str:
    return ",".join(f"{name}={size}" for name, size in axes.items())


def parse_mesh(text: str) -> dict[str, int]:
    """'data=-1,model=2' -> {'data': -1, 'model': 2}."""
    try:
        pairs = [item.split("=") for item in text.split(",") if item]
        return {name.strip(): int(size) for name, size in pairs}
    except ValueError:
        raise ConfigError(f"--mesh {text!r} is not of the form data=-1,model=2") from None


def data_parallel_size(job: JobConfig) -> int:
    """How many ways the global batch is split: the size of the mesh's `data` axis."""
    return resolve_mesh(job.mesh, job.num_devices).get("data", 1)


def validate(job: JobConfig) -> None:
    """Every check that needs no cluster and no checkpoint. Raises ConfigError."""
    if job.num_hosts < 1:
        raise ConfigError(f"--hosts must be at least 1, got {job.num_hosts}")
    cluster = job.cluster
    if cluster.platform not in PLATFORMS:
        raise ConfigError(f"cluster.platform {cluster.platform!r} is not one of {', '.join(PLATFORMS)}")
    if cluster.devices_per_host < 1:
        raise ConfigError(f"cluster.devices_per_host must be at least 1, got {cluster.devices_per_host}")
    if cluster.placement_strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError(
            f"cluster.placement_strategy {cluster.placement_strategy!r} is not one of "
            f"{', '.join(PLACEMENT_STRATEGIES)}"
        )
    if not cluster.resources_per_host or any(v <= 0 for v in cluster.resources_per_host.values()):
        raise ConfigError(f"cluster.resources_per_host must name positive amounts, got {cluster.resources_per_host}")
    if not 1 <= job.min_hosts <= job.num_hosts <= job.max_hosts:
        raise ConfigError(
            f"need 1 <= --min-hosts ({job.min_hosts}) <= --hosts ({job.num_hosts}) <= --max-hosts ({job.max_hosts})"
        )
    if job.fault.max_restarts < 0 or job.fault.max_preemptions < 0:
        raise ConfigError("--max-restarts and --max-preemptions must be at least 0")
    train = job.train
    try:
        model = train.model_config()
    except ValueError as err:
        raise ConfigError(f"--model: {err}") from None
    for name in ("steps", "global_batch_size", "seq_len"):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1, got {getattr(train, name)}")
    if train.seq_len > model.max_seq_len:
        raise ConfigError(
            f"train.seq_len {train.seq_len} exceeds model {train.model}'s max_seq_len {model.max_seq_len}"
        )
    if job.checkpoint.save_every < 1 or job.checkpoint.max_to_keep < 1:
        raise ConfigError("--save-every and checkpoint.max_to_keep must be at least 1")
    dp = data_parallel_size(job)
    if train.global_batch_size % dp:
        raise ConfigError(
            f"global batch {train.global_batch_size} is not divisible by the data-parallel size {dp} "
            f"(mesh {_mesh_str(resolve_mesh(job.mesh, job.num_devices))}): "
            f"use a global_batch_size that is a multiple of {dp}"
        )
    if train.data is not None:
        check_data_path(train.data, train.seq_len)


def check_data_path(path: str, seq_len: int) -> None:
    p = pathlib.Path(path)
    if not p.exists():
        raise ConfigError(f"--data {path}: no such file or folder")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    if not files:
        raise ConfigError(f"--data {path}: the folder holds no files")
    size = 0
    for f in files:
        try:
            with f.open("rb") as handle:
                handle.read(1)
        except OSError as err:
            raise ConfigError(f"--data {path}: cannot read {f} ({err.strerror}); check its permissions") from None
        size += f.stat().st_size
    if size <= seq_len:
        raise ConfigError(f"--data {path}: holds {size} bytes, fewer than a sequence of {seq_len + 1}; "
                          f"give more text or a smaller --seq-len")


# ---- loading ------------------------------------------------------------------------------------

def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _from_dict(hint, value, f"{where}.{name}")
        else:
            value = _coerce(value, hint, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be a {hint.__name__}, got {value!r}")
    return value


def load_file(path: str | os.PathLike) -> JobConfig:
    """A JobConfig from a YAML file of cluster_configs/ (its keys mirror the dataclasses)."""
    p = pathlib.Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return _from_dict(JobConfig, data.get("launcher", data) if isinstance(data, dict) else data, str(p))


def from_json(data: dict[str, Any]) -> JobConfig:
    return _from_dict(JobConfig, data, "saved job config")


def override(job: JobConfig, **changes: Any) -> JobConfig:
    """A copy with dotted-path changes applied: override(job, **{"train.steps": 10})."""
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


def dumps(job: JobConfig) -> str:
    return json.dumps(job.to_dict(), indent=2, sort_keys=True)
