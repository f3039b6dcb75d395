"""Which non-array state of a checkpoint (`extra`) holds each host's own data position, and what a
change of host count does to it. Plain Python: the driver checks a `--resume` with it before anything
starts, and the hosts check every restore with it.

A saved `extra` entry is one of (`jaxlaunch.workers.extras` writes them):
- `{"value": v}`: a JSON value (a counter, a best loss); every host restores rank 0's;
- `{"state": s, "scope": "global"}`: an iterator whose state is the same on every host and valid on
  any host count (Grain's `ElasticIterator`); every host restores rank 0's;
- `{"state": s}` or `{"bytes": b}`: an iterator over this host's own shard (a Grain `IterDataset` or
  `DataLoader` iterator). Its position means nothing to a pipeline over another shard, and positions
  over N shards cannot be split or merged into M: on another host count, host r takes saved host
  `r % N`'s, and the data order changes (examples repeat or are skipped).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GLOBAL_SCOPE = "global"
"""An iterator state that is the same on every host and valid on any host count."""
ALLOW_KEY = "data_order"
"""The `--allow-change` key that accepts a resume whose data order changes."""


def is_iterator_entry(entry: Any) -> bool:
    return isinstance(entry, Mapping) and ("state" in entry or "bytes" in entry)


def per_host_keys(saved: Mapping[str, Any] | None) -> list[str]:
    """The names of a host's saved `extra` whose state is its own shard's position."""
    return sorted(name for name, entry in (saved or {}).items()
                  if is_iterator_entry(entry) and entry.get("scope") != GLOBAL_SCOPE)


def changed_keys(saved: Mapping[str, Any] | None, saved_hosts: int | None, num_hosts: int) -> list[str]:
    """The per-host iterator states whose data order a restore on `num_hosts` hosts changes: none
    on the host count that saved them."""
    if saved_hosts is None or saved_hosts == num_hosts:
        return []
    return per_host_keys(saved)


def resume_refusal(keys: list[str], saved_hosts: int, num_hosts: int, fix: str | None = None) -> str:
    """The one line that refuses a `--resume` on another host count over per-host iterator states;
    `fix`: what to resume with instead (default --hosts with the saved count)."""
    names = ", ".join(repr(k) for k in keys)
    return (f"--resume on {num_hosts} host(s) would change the data order: extra {names} holds each host's own "
            f"position in its shard, saved by {saved_hosts} host(s), which cannot be split or merged; resume with "
            f"{fix or f'--hosts {saved_hosts}'}, or pass --allow-change {ALLOW_KEY} to accept it (an elastic "
            f"pipeline, jaxlaunch.elastic_iterator, resumes exactly on any host count)")


def risk_warning(keys: list[str]) -> str:
    """The warning of an elastic job (its host count may change) that saves per-host iterator states."""
    names = ", ".join(repr(k) for k in keys)
    return (f"extra {names} holds each host's own data position: if this elastic job changes its host count, "
            f"its data order changes (recorded as data_order_changed); for exact data on any host count use "
            f"jaxlaunch.elastic_iterator (Grain's ElasticIterator) or ctx.global_batch")
