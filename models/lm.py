"""The built-in job: a byte-level transformer language model, trained through the public host context
exactly as a user's function would be (`--entry jaxlaunch.models.lm:main`, the default).

Its settings (`ctx.config`) are the declared defaults below; as any entry's declared settings, each
is a flag (`--model small`, `--seq-len 256`), a key of --set and a keyword of `jaxlaunch.launch`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jaxlaunch.models.config import PRESETS, preset
from jaxlaunch.models.corpus import Corpus, check_data_path, corpus_files, fingerprint_of

import jaxlaunch

if TYPE_CHECKING:
    import numpy as np

DEFAULTS: dict[str, Any] = {
    "model": "tiny",              # size preset: tiny, small or base
    "data": None,                 # text file or folder; None: the Python standard library's sources
    "global_batch_size": 32,      # sequences per step over all hosts, whatever the host count
    "seq_len": 128,               # bytes per sequence
    "learning_rate": 3e-3,        # peak of the warm-up + cosine schedule
    "warmup_steps": 30,
    "weight_decay": 0.01,         # AdamW's decoupled weight decay
    "grad_clip_norm": 1.0,
}

# Logical axis -> mesh axis. `embed` over `data` is FSDP (parameters and optimizer state split across
# the data-parallel hosts); `heads`, `mlp` and `vocab` over `model` is tensor parallelism.
SHARDING_RULES = {"embed": "data", "heads": "model", "mlp": "model", "vocab": "model", "pos": None}


def check(config: dict[str, Any], mesh: dict[str, int]) -> None:
    """Raises ValueError when the settings cannot run on `mesh`."""
    if config["model"] not in PRESETS:
        raise ValueError(f"unknown model preset {config['model']!r}: choose one of {', '.join(PRESETS)}")
    for name in ("global_batch_size", "seq_len", "warmup_steps"):
        if not isinstance(config[name], int) or config[name] < (0 if name == "warmup_steps" else 1):
            raise ValueError(f"{name} must be a positive integer, got {config[name]!r}")
    for name in ("learning_rate", "weight_decay", "grad_clip_norm"):
        if not config[name] == config[name] or config[name] < 0 or config[name] == float("inf"):
            raise ValueError(f"{name} must be a finite number of at least 0, got {config[name]!r}")
    max_len = preset(config["model"]).max_seq_len
    if config["seq_len"] > max_len:
        raise ValueError(f"seq_len {config['seq_len']} exceeds model {config['model']}'s max_seq_len {max_len}")
    data_parallel = mesh.get("data", 1)
    if config["global_batch_size"] % data_parallel:
        raise ValueError(f"global batch {config['global_batch_size']} is not divisible by the data-parallel size "
                         f"{data_parallel}: use a global_batch_size that is a multiple of {data_parallel}")
    if config["data"] is not None:
        check_data_path(config["data"], config["seq_len"])


def fingerprint(config: dict[str, Any]) -> str:
    """The corpus's content hash: a resume on other data is refused."""
    return fingerprint_of(b"".join(f.read_bytes() for f in corpus_files(config["data"])))


@jaxlaunch.entrypoint(defaults=DEFAULTS, check=check, fingerprint=fingerprint)
def main(ctx: jaxlaunch.HostContext) -> dict[str, Any]:
    import jax
    from flax import nnx
    from jaxlaunch.models import training

    cfg = dict(ctx.config)
    corpus = Corpus.load(cfg["data"])
    (model, optimizer), start = ctx.restore_or_init(
        lambda: training.make_model_and_optimizer(cfg, ctx.seed, ctx.schedule_steps), rules=SHARDING_RULES)
    step_fn = nnx.cached_partial(training.train_step, model, optimizer)
    learning_rate = jax.jit(training.schedule(cfg, ctx.schedule_steps))
    batch_size, seq_len = cfg["global_batch_size"], cfg["seq_len"]

    def rows(step: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return corpus.rows(ctx.seed, step, indices, batch_size, seq_len)

    for step in range(start + 1, ctx.steps + 1):
        # The batch of step s is row-for-row the same on any number of hosts (seeded by the step).
        loss = step_fn(*ctx.global_batch(rows, step - 1, batch_size))
        ctx.report(step, loss=loss, learning_rate=learning_rate(step - 1), tokens=batch_size * seq_len)
        ctx.maybe_save(step, (model, optimizer))
        if ctx.should_stop(step):
            break
    return {"model": cfg["model"], "parameters": preset(cfg["model"]).num_params}
