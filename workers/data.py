"""Deterministic, topology-invariant byte-level batches.

The global batch of step `s` is a pure function of (seed, s), the seed being a few integers: row `i` is the window of
`seq_len + 1` bytes starting at an offset drawn from a generator seeded with (seed, s). Whatever the
host count, every host computes the same offsets and builds only the rows its own devices hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig
from collections.abc import Sequence

import numpy as np


def default_corpus_files() -> list[pathlib.Path]:
    """The Python standard library's top-level sources: real text on every machine, offline."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))


def corpus_files(path: str | None) -> list[pathlib.Path]:
    if path is None:
        return default_corpus_files()
    p = pathlib.Path(path)
    return [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A byte corpus held as one uint8 array."""

    tokens: np.ndarray
    fingerprint: str
    """sha256 of the bytes, so a resume can tell whether it trains on the same data."""

    @classmethod
    def load(cls, path: str | None = None) -> Corpus:
        data = b"".join(f.read_bytes() for f in corpus_files(path))
        return cls(np.frombuffer(data, dtype=np.uint8), hashlib.sha256(data).hexdigest()[:16])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def batch_offsets(seed: Sequence[int], step: int, global_batch_size: int, num_windows: int) -> np.ndarray:
    """Start offsets of every row of the global batch of `step`."""
    rng = np.random.default_rng(np.random.SeedSequence([*seed, step]))
    return rng.integers(0, num_windows, size=global_batch_size)


def batch_rows(
    corpus: Corpus, *, seed: Sequence[int], step: int, global_batch_size: int, seq_len: int, rows: slice
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-byte targets, each (len(rows), seq_len) int32, for some rows of a step."""
    num_windows = len(corpus) - seq_len
    if num_windows < 1:
        raise ValueError(f"the corpus has {len(corpus)} bytes, fewer than seq_len + 1 = {seq_len + 1}")
    offsets = batch_offsets(seed, step, global_batch_size, num_windows)[rows]
    windows = corpus.tokens[offsets[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def global_batch(corpus: Corpus, *, seed: Sequence[int], step: int, global_batch_size: int, seq_len: int, sharding):
    """The step's (inputs, targets) as global jax.Arrays in `sharding`; this process builds only the
    rows of its addressable shards."""
    import jax

    shape = (global_batch_size, seq_len)
    cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def rows_for(index) -> tuple[np.ndarray, np.ndarray]:
        rows = index[0]
        key = rows.indices(global_batch_size)[:2]
        if key not in cache:
            cache[key] = batch_rows(
                corpus, seed=seed, step=step, global_batch_size=global_batch_size,
                seq_len=seq_len, rows=rows,
            )
        return cache[key]

    inputs = jax.make_array_from_callback(shape, sharding, lambda index: rows_for(index)[0][:, index[1]])
    targets = jax.make_array_from_callback(shape, sharding, lambda index: rows_for(index)[1][:, index[1]])
    return inputs, targets
