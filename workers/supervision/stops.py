"""The stop the driver asks for (a resize, the user's Ctrl-C): one step, agreed with every host before
it is final, so that every host saves and stops exactly there.

The driver proposes a step ahead of what the hosts reported. A host accepts it only if it has not
checked that step yet, and then waits at that step until the driver confirms it (every host
accepted) or proposes a later one (some host had passed it). No host can pass an accepted step, so a
confirmed step is one that every host reaches. JAX's preemption service is not involved: it stays for
SIGTERMs that reach a host from outside.

The actor's monitor thread calls `propose` and `confirm`; the training thread calls `reached` once a
step."""

from __future__ import annotations

import threading

from jaxlaunch.contract.protocol import StopAnswer


class DriverStop:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._checked: int | None = None
        self._proposed: int | None = None
        self._confirmed: int | None = None

    def propose(self, step: int) -> StopAnswer:
        with self._changed:
            if self._confirmed is not None or (self._checked is not None and self._checked >= step):
                return StopAnswer(False, self._checked)
            self._proposed = step
            self._changed.notify_all()
            return StopAnswer(True, self._checked)

    def confirm(self, step: int) -> bool:
        """Whether `step` is the accepted proposal (and now final)."""
        with self._changed:
            if self._proposed != step:
                return False
            self._confirmed = step
            self._changed.notify_all()
            return True

    def reached(self, step: int) -> bool:
        """Whether to save and stop at `step`; waits while `step` is proposed but not yet confirmed."""
        with self._changed:
            self._checked = step
            self._changed.wait_for(lambda: self._confirmed is not None or self._proposed != step)
            return self._confirmed == step
