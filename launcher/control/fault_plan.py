"""The faults a launch injects (`--inject`, chaos) and when each went off: the one collaborator the
driver asks which faults an attempt carries and when its fault fired, so that detection latency is
measured from the fault and a fault that went off is spent, whatever the driver saw of the steps.

Injected faults fire inside the hosts, which write the moment to `hosts/injections.jsonl` before
firing (a killed process cannot tell the driver itself); chaos kills from the driver and tells the plan."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jaxlaunch.contract.protocol import Injection, InjectionKind

Fired = Callable[[int], list[tuple[Injection, float]]]
"""The injections that went off in an attempt (by number), each with its time on the driver's clock."""


class FaultPlan:
    def __init__(self, injections: Sequence[Injection] = (), fired: Fired = lambda attempt: []):
        self._left = {injection: injection.times for injection in injections}
        self._fired = fired
        self._carried: dict[int, tuple[Injection, ...]] = {}
        self._killed: dict[int, float] = {}

    def for_attempt(self, attempt: int, num_hosts: int, committed_step: int | None) -> tuple[Injection, ...]:
        """The injections an attempt's hosts carry: those not spent, on a host it has, at a step it
        will train (after the checkpoint it restores)."""
        carried = tuple(i for i, left in self._left.items()
                        if left > 0 and i.step > (committed_step or 0) and i.host < num_hosts)
        self._carried[attempt] = carried
        return carried

    def killed(self, attempt: int, at: float) -> None:
        """Chaos killed a host of `attempt` at `at` (driver clock)."""
        self._killed.setdefault(attempt, at)

    def fired_at(self, attempt: int) -> float | None:
        """When the attempt's first fault went off (driver clock), or None if none did."""
        times = [at for _, at in self._went_off(attempt)]
        if attempt in self._killed:
            times.append(self._killed[attempt])
        return min(times, default=None)

    def spend(self, attempt: int) -> None:
        """At the end of an attempt: each injection that went off in it has one firing fewer left."""
        for injection, _ in self._went_off(attempt):
            if injection in self._left:
                self._left[injection] -= 1

    def not_fired(self, spans: dict[int, tuple[int | None, int | None]]) -> list[tuple[Injection, str]]:
        """At the end of a launch: each injection with firings left, and why, from the attempts that
        ran (by number, each with its first and last step). A fault drill that never happened is said,
        not passed over as a fault survived."""
        out = []
        for injection, left in self._left.items():
            if left <= 0:
                continue
            step, host = injection.step, injection.host
            carried = [a for a, injections in self._carried.items()
                       if injection in injections and all(i != injection for i, _ in self._went_off(a))]
            why = []
            for a in carried:
                first, last = spans.get(a, (None, None))
                if first is not None and first > step:
                    why.append(f"attempt {a} began at step {first}, past it")
                elif last is None or last < step:
                    why.append(f"attempt {a} ended at step {last or 0}, before it")
                elif injection.kind == InjectionKind.KILL_IN_HANDOFF:
                    why.append(f"attempt {a} made no memory hand-off at step {step} on host {host}")
                else:
                    why.append(f"attempt {a} trained step {step} on host {host} and it did not go off")
            fired_in = [a for a in self._carried if any(i == injection for i, _ in self._went_off(a))]
            if not why and fired_in and max(fired_in) == max(self._carried):
                why.append(f"the launch ended after attempt {max(fired_in)}")
            elif not why:
                why.append(f"no attempt trained step {step} with a host {host} (each began past that step, or had "
                           "fewer hosts)")
            went = injection.times - left
            times = f"it went off {went} of {injection.times} times; " if went else ""
            out.append((injection, times + "; ".join(why)))
        return out

    def _went_off(self, attempt: int) -> list[tuple[Injection, float]]:
        return self._fired(attempt) if self._carried.get(attempt) else []


def injection_log(read: Callable[[], list[dict[str, Any]]], injections: Sequence[Injection],
                  clock: Callable[[], float], wall_clock: Callable[[], float]) -> Fired:
    """The hosts' record of the injections that went off (written before each fires), with their
    times moved onto the driver's clock."""
    def fired(attempt: int) -> list[tuple[Injection, float]]:
        out = []
        for line in read():
            if line.get("attempt") != attempt:
                continue
            for injection in injections:
                if (injection.kind, injection.step, injection.host) == (line["kind"], line["step"], line["rank"]):
                    out.append((injection, clock() - (wall_clock() - line["time"])))
        return out
    return fired
