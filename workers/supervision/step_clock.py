"""Each step's own time, measured on a host from one readback of a step's result to the next.

JAX dispatches a step and returns before the device ran it, so the time between two `ctx.report`
calls is not a step's time: a step that waited for the device shows the wait of the step before it,
and one dispatched into a full queue shows almost nothing. A step's result is read back (the host
context reads metrics a step late), and the device finished the step when that readback returns, so
a step's time is the time between the readbacks of its result and of the previous step's.

That interval splits in two: **busy**, from the previous readback until the next step's input was
ready (`ctx.global_batch` returned) or, for a loop that makes its own input, until the next step was
dispatched (its `ctx.report`): the host's own Python and input work; and **blocked**, the rest, until
the readback returned (dispatching and waiting on the device, or on peers in a collective; where a
backend runs a step inside its dispatch, as the CPU does with a collective, that wait is in the
dispatch). A host whose busy time stands out makes every other host wait."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class StepTime:
    """One step's time on one host, split into busy and blocked (they add up to the step's time)."""

    step_time_s: float
    busy_s: float
    """From the previous step's readback to the dispatch of the next step: host-side work."""
    blocked_s: float
    """From that dispatch to this step's readback: waiting on the device or on peers."""


class StepClock:
    """Told when a step is dispatched (`dispatched`) and when a step's result was read back (`read`),
    it gives each step's own time. `restart` after a pause that is no step's (a blocking save)."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._last_read: float | None = None
        """When the previous step's result was read back (None: none yet in this attempt, so the
        next step read is the first, which also paid for compilation and has no time of its own)."""
        self._dispatched: float | None = None
        """When the newest step was dispatched (its `ctx.report`)."""
        self._input_ready: float | None = None
        """When the newest step's input was made (`ctx.global_batch` returned)."""

    def dispatched(self) -> None:
        self._dispatched = self._clock()

    def input_ready(self) -> None:
        self._input_ready = self._clock()

    def read(self) -> StepTime | None:
        """A step's result was read back just now: its time, or None for the first step read."""
        now = self._clock()
        last, self._last_read = self._last_read, now
        if last is None:
            return None
        # The host's own work ends with the next step's input, or else with its dispatch; with neither
        # since the previous readback (a readback before a save), all of it was waiting.
        if self._input_ready is not None and self._input_ready >= last:
            worked_until = self._input_ready
        elif self._dispatched is not None and self._dispatched >= last:
            worked_until = self._dispatched
        else:
            worked_until = last
        return StepTime(step_time_s=now - last, busy_s=worked_until - last, blocked_s=now - worked_until)

    def restart(self) -> None:
        """The next step's time starts now (after a blocking save, whose time is reported on its own)."""
        if self._last_read is not None:
            self._last_read = self._clock()
