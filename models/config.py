"""Model configuration and size presets (plain Python: the driver imports it without JAX)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer language model over bytes."""

    vocab_size: int = 256
    """Tokens are bytes."""
    num_layers: int = 2
    """Transformer blocks."""
    d_model: int = 64
    """Width of the residual stream."""
    num_heads: int = 4
    """Attention heads; d_model must be divisible by it."""
    d_ff: int = 256
    """Hidden width of each MLP."""
    max_seq_len: int = 128
    """Longest sequence the learned position table covers."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{field.name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads})"
            )

    @property
    def num_params(self) -> int:
        """Parameter count, computed from the shapes (matches the built model)."""
        d, f = self.d_model, self.d_ff
        per_layer = 4 * d * d + 2 * d * f + f + 2 * d  # attention, MLP (one bias), two norms
        embeddings = self.vocab_size * d + self.max_seq_len * d
        head = d * self.vocab_size + d  # final norm and unembedding
        return self.num_layers * per_layer + embeddings + head


PRESETS: dict[str, ModelConfig] = {
    # ~1.4e5 parameters: compiles and steps in well under a second on a CPU.
    "tiny": ModelConfig(num_layers=2, d_model=64, num_heads=4, d_ff=256, max_seq_len=128),
    # ~1e7 parameters.
    "small": ModelConfig(num_layers=8, d_model=320, num_heads=8, d_ff=1280, max_seq_len=256),
    # ~1e8 parameters, for checkpoint benchmarks.
    "base": ModelConfig(num_layers=12, d_model=768, num_heads=12, d_ff=3072, max_seq_len=512),
}


def preset(name: str) -> ModelConfig:
    """The preset called `name`; ValueError naming the choices otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
