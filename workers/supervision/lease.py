"""The bound on a lingering spare's life (`cluster.standby_linger_s`).

A spare that may outlive its launch, to be taken over by the next launch on the same cluster, is a
detached Ray actor in a detached placement group: Ray no longer ends it with its driver. Its lease
does: the process ends its whole group (removes the placement group, which ends every actor in it)
once the lease runs out. A driver that holds the group renews it (`SPARE_HOLD_S`); a launch that ends
shelves it for the linger time; a host that took over is renewed by each of its driver's polls, so a
driver killed without cleaning up leaves its hosts for `SPARE_ORPHAN_AFTER_S` at most."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Lease:
    """Ends this process's group at its deadline: `end_group` (removing its placement group, which ends
    every actor in it), then this process."""

    def __init__(self, end_group: Callable[[], None], seconds: float):
        self._end_group = end_group
        self._deadline = time.monotonic() + seconds
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name="spare-lease", daemon=True)
        self._thread.start()

    def renew(self, seconds: float) -> None:
        with self._changed:
            self._deadline = time.monotonic() + seconds
            self._changed.notify()

    def remaining(self) -> float:
        return self._deadline - time.monotonic()

    def _watch(self) -> None:
        with self._changed:
            while (left := self._deadline - time.monotonic()) > 0:
                self._changed.wait(left)
        log.warning("the lease ran out (no driver renewed it): ending this spare group")
        self.end()

    def end(self) -> None:
        try:
            self._end_group()
        finally:
            os._exit(0)
