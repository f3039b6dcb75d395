"""The built-in model's data: a byte corpus, and the rows of any step's global batch.

Row `i` of step `s` is the window of `seq_len + 1` bytes at an offset drawn from a generator seeded
with (seed, s): a pure function of (seed, s, i), so the global batch is the same on any number of
hosts, and each host builds only its own rows."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig

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


def check_data_path(path: str, seq_len: int) -> None:
    """ValueError naming the fix when a --data path cannot feed sequences of `seq_len`."""
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"--data {path}: no such file or folder")
    files = corpus_files(path)
    if not files:
        raise ValueError(f"--data {path}: the folder holds no files")
    size = 0
    for f in files:
        try:
            with f.open("rb") as handle:
                handle.read(1)
        except OSError as err:
            raise ValueError(f"--data {path}: cannot read {f} ({err.strerror}); check its permissions") from None
        size += f.stat().st_size
    if size <= seq_len:
        raise ValueError(f"--data {path}: holds {size} bytes, fewer than a sequence of {seq_len + 1}; "
                         f"give more text or a smaller --seq-len")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A byte corpus held as one uint8 array."""

    tokens: np.ndarray
    fingerprint: str
    """sha256 of the bytes, so that a resume can tell whether it trains on the same data."""

    @classmethod
    def load(cls, path: str | None = None) -> Corpus:
        data = b"".join(f.read_bytes() for f in corpus_files(path))
        return cls(np.frombuffer(data, dtype=np.uint8), fingerprint_of(data))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, seed: int, step: int, rows: np.ndarray, global_batch_size: int,
             seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and next-byte targets, each (len(rows), seq_len) int32, for some rows of a step."""
        num_windows = len(self) - seq_len
        if num_windows < 1:
            raise ValueError(f"the corpus has {len(self)} bytes, fewer than seq_len + 1 = {seq_len + 1}")
        offsets = batch_offsets(seed, step, global_batch_size, num_windows)[rows]
        windows = self.tokens[offsets[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
        return windows[:, :-1], windows[:, 1:]


def fingerprint_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def batch_offsets(seed: int, step: int, global_batch_size: int, num_windows: int) -> np.ndarray:
    """Start offsets of every row of the global batch of `step`."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, step]))
    return rng.integers(0, num_windows, size=global_batch_size)
