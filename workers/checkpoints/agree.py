"""What every host of a job learns from every other at once (each is a collective: every host calls
it at the same point): what each host's error was, and whether any host's flag is set."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

ERROR_BYTES = 400
"""How much of each host's error `host_errors` shares."""


def host_errors(error: str | None) -> dict[int, str]:
    """Each host's error, by rank (a host without one is left out), known on every host: the first
    `ERROR_BYTES` of each, so that rank 0's event says what went wrong on another host."""
    if error is not None:
        error = error.encode()[:ERROR_BYTES].decode(errors="ignore")
    if jax.process_count() == 1:
        return {} if error is None else {0: error}
    sent = np.zeros(ERROR_BYTES + 1, dtype=np.uint8)
    if error is not None:
        data = error.encode()
        sent[0] = 1
        sent[1:1 + len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(sent)).reshape(-1, ERROR_BYTES + 1)
    return {rank: bytes(row[1:]).rstrip(b"\0").decode(errors="ignore") for rank, row in enumerate(rows) if row[0]}


def any_host(flag: bool) -> bool:
    """Whether any host's flag is set, known on every host."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
