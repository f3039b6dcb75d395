"""A decoder-only transformer language model in Flax NNX with logical sharding annotations.

Every parameter is annotated with logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``,
``pos``); `jaxlaunch.workers.sharding` maps them to mesh axes (FSDP over ``data``, tensor parallelism over
``model``). Annotations only: eager sharding is switched off while the model is built, so the same
code builds an abstract model for restore targets and a concrete one inside a jitted initialiser.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Initializer
from jaxlaunch.models.config import ModelConfig

_INIT = nnx.initializers.normal(stddev=0.02)


def _annotated(init: Initializer, *logical_axes: str | None) -> Initializer:
    return nnx.with_partitioning(init, logical_axes)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        d = cfg.d_model

        def proj(axes: tuple[str, str]) -> nnx.Linear:
            return nnx.Linear(d, d, use_bias=False, kernel_init=_annotated(_INIT, *axes), rngs=rngs)

        self.query = proj(("embed", "heads"))
        self.key = proj(("embed", "heads"))
        self.value = proj(("embed", "heads"))
        self.out = proj(("heads", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, d = x.shape
        head_dim = d // self.num_heads

        def split_heads(y: jax.Array) -> jax.Array:
            return y.reshape(batch, length, self.num_heads, head_dim)

        q, k, v = split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, d)
        return self.out(attended)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(
            cfg.d_model, cfg.d_ff,
            kernel_init=_annotated(_INIT, "embed", "mlp"),
            bias_init=_annotated(nnx.initializers.zeros_init(), "mlp"),
            rngs=rngs,
        )
        self.down = nnx.Linear(
            cfg.d_ff, cfg.d_model, use_bias=False,
            kernel_init=_annotated(_INIT, "mlp", "embed"),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(
        cfg.d_model, scale_init=_annotated(nnx.initializers.ones_init(), "embed"), rngs=rngs
    )


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attention_norm = _norm(cfg, rngs)
        self.attention = Attention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
    """Maps a batch of byte sequences (batch, length) to next-byte logits (batch, length, vocab)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=_annotated(_INIT, "vocab", "embed"), rngs=rngs
        )
        self.position_embedding = nnx.Embed(
            cfg.max_seq_len, cfg.d_model, embedding_init=_annotated(_INIT, "pos", "embed"), rngs=rngs
        )
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _norm(cfg, rngs)
        self.unembed = nnx.Linear(
            cfg.d_model, cfg.vocab_size, use_bias=False,
            kernel_init=_annotated(_INIT, "embed", "vocab"), rngs=rngs,
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        positions = jnp.arange(tokens.shape[1])
        x = self.token_embedding(tokens) + self.position_embedding(positions)[None]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.final_norm(x))


def build(cfg: ModelConfig, seed: int) -> Transformer:
    """Builds the model with annotations only (no eager sharding): call it under `nnx.eval_shape`
    for an abstract model, or inside `jax.jit` with output shardings for a sharded one."""
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(params=seed))
