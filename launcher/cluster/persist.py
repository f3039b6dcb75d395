"""Before the launcher gives up on a failed job: the memory tier's newest committed step, when it is
newer than the newest durable one, is written to the run directory. The keepers end with the
launcher, and what they held beyond the last --persist-every step would end with them.

A short run of the hosts does it: each restores the step from the keepers (on as many hosts as the
cluster has room for, up to the number that saved it; the memory tier reassembles it into that
layout), writes it with Orbax as any durable save, trains nothing and ends. Its logs are
`hosts/persist-N-rank-R.log`, N the failed attempt's number."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from jaxlaunch.launcher.cluster.keepers import KeeperPool

from jaxlaunch.contract.events import MemoryPersisted
from jaxlaunch.contract.protocol import Cluster, WorkerGroup

log = logging.getLogger(__name__)
PERSIST_TIMEOUT_S = 300.0
"""How long the hosts get to restore the step and write it."""


def persist_newest(keepers: KeeperPool, cluster: Cluster, make_group: Callable[[], WorkerGroup], attempt: int,
                   durable_step: Callable[[], int | None],
                   clock: Callable[[], float] = time.monotonic) -> MemoryPersisted | None:
    """Writes the memory tier's newest step durably if it is newer than the durable tier's; None when
    there was nothing to write."""
    newest = keepers.newest_committed()
    before = durable_step()
    if newest is None or (before is not None and newest[0] <= before):
        return None
    step, saved_hosts = newest
    num_hosts = min(saved_hosts, cluster.placeable_hosts())
    if num_hosts < 1:
        return MemoryPersisted(step=step, durable_step=before, reason="the cluster has no room for a host")
    started = clock()
    reason = None
    group = make_group()
    try:
        group.start(num_hosts, attempt)
        while True:
            poll = group.poll()
            if poll.exits:
                ended = poll.exits[0]
                why = ended.error.message if ended.error is not None else ended.detail
                reason = f"host {ended.rank} ended: {why}"[:500]
                break
            if len(poll.results) == num_hosts:
                break
            if clock() - started > PERSIST_TIMEOUT_S:
                reason = f"not written within {PERSIST_TIMEOUT_S:g} s"
                break
    except Exception as err:  # noqa: BLE001 - the failure that ended the job stays the job's reason
        reason = f"{type(err).__name__}: {err}"[:500]
    finally:
        group.shutdown()
    persisted = reason is None and durable_step() == step
    if reason is None and not persisted:
        reason = "the hosts ended without a committed save of the step"
    log.info("memory step %d %s", step, "persisted" if persisted else f"not persisted: {reason}")
    return MemoryPersisted(step=step, durable_step=before, num_hosts=num_hosts, seconds=clock() - started,
                           persisted=persisted, reason=reason)
