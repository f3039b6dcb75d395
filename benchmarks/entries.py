"""Entries that only the benchmarks run: the built-in model's loop as it was before a change, so the
change can be measured against it in the same run."""

from __future__ import annotations

from typing import Any

from jaxlaunch.models import lm

from jaxlaunch.contract.entry import entrypoint


@entrypoint(defaults=lm.DEFAULTS, check=lm.check, fingerprint=lm.fingerprint)
def lm_synced(ctx) -> dict[str, Any]:
    """The built-in model, reading each step's loss on the host at once (a sync every step, as the
    launcher's loop did before metrics were read a step late)."""
    from flax import nnx
    from jaxlaunch.models import training
    from jaxlaunch.models.corpus import Corpus

    cfg = dict(ctx.config)
    corpus = Corpus.load(cfg["data"])
    (model, optimizer), start = ctx.restore_or_init(
        lambda: training.make_model_and_optimizer(cfg, ctx.seed, ctx.schedule_steps), rules=lm.SHARDING_RULES)
    step_fn = nnx.cached_partial(training.train_step, model, optimizer)
    batch_size, seq_len = cfg["global_batch_size"], cfg["seq_len"]
    for step in range(start + 1, ctx.steps + 1):
        loss = step_fn(*ctx.global_batch(lambda s, rows: corpus.rows(ctx.seed, s, rows, batch_size, seq_len),
                                         step - 1, batch_size))
        ctx.report(step, loss=float(loss))
        ctx.maybe_save(step, (model, optimizer))
        if ctx.should_stop(step):
            break
    return {}
