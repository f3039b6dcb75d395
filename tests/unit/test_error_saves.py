"""A save the entry asked for just before it raised: the host waits for it to commit before it reports
the error, within a limit, and not after a lost peer's error (whose barrier never ends). Before, the
host reported at once and the driver's teardown killed the save: `N.orbax-checkpoint-tmp` was left
and the restart began from the save before.

Orbax's background write of each save here cannot finish until someone waits for it (`held_saves`):
the save is in flight when the error is handled on any machine, however fast its disk."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jaxlaunch.launcher.records.runs import RunDir
from jaxlaunch.workers import runtime
from jaxlaunch.workers.checkpoints.durable import Checkpointer, read_arrays
from jaxlaunch.workers.context import HostContext
from jaxlaunch.workers.supervision.progress import HostProgress
from jaxlaunch.workers.supervision.stops import DriverStop

from jaxlaunch.contract import entry as entry_lib
from jaxlaunch.contract import events
from jaxlaunch.contract.protocol import ErrorKind, HostError, Phase
from tests.unit.test_context import make_ctx


class Held:
    """An Orbax commit future that completes only once the gate opens."""

    def __init__(self, inner, gate: threading.Event):
        self.inner, self.gate = inner, gate

    def result(self, timeout=None):
        self.gate.wait()
        return self.inner.result(timeout=timeout) if self.inner is not None else None

    def cancel(self):
        return self.inner.cancel() if self.inner is not None else None


@pytest.fixture
def held_saves(monkeypatch):
    """The gate every durable save's background write waits at; `Checkpointer.wait` opens it (a host
    that waits for its save lets it finish; one that does not leaves it in flight)."""
    gate = threading.Event()
    async_save = ocp.PyTreeCheckpointHandler.async_save

    async def held(self, *args, **kwargs):
        futures = await async_save(self, *args, **kwargs)
        return [Held(f, gate) for f in futures or []] or [Held(None, gate)]

    wait = Checkpointer.wait

    def opens(self):
        gate.set()
        wait(self)

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", held)
    monkeypatch.setattr(Checkpointer, "wait", opens)
    yield gate
    gate.set()


def saves_at_3_then_raises(error: Exception):
    def main(ctx):
        state, start = ctx.restore_or_init(lambda: {"w": jnp.zeros((64, 64))})
        for step in range(start + 1, ctx.steps + 1):
            state = {"w": state["w"] + 1.0}
            ctx.report(step)
            ctx.maybe_save(step, state)
            if step == 3:
                raise error
    return main


def run_host(tmp_path, monkeypatch, main, **spec_fields):
    """The host actor's own code without Ray, running `main`: the HostError it raises, its events,
    and the context with the wait it gave `_after_error`."""
    from jaxlaunch.workers import host  # Ray: see test_the_driver_s_decisions_need_no_ray

    spec = dataclasses.replace(make_ctx(tmp_path, 6, save_every=3)[0]._spec, **spec_fields)
    monkeypatch.setattr(runtime, "initialize", lambda **kwargs: None)
    monkeypatch.setattr(runtime, "shutdown", lambda: None)
    monkeypatch.setattr(entry_lib, "load_entry", lambda ref, code=None, imports=None: main)
    asked: list[tuple[HostContext, float]] = []
    after_error = HostContext._after_error

    def recorded(self, save_wait_s=0.0):
        asked.append((self, save_wait_s))
        after_error(self, save_wait_s)

    monkeypatch.setattr(HostContext, "_after_error", recorded)
    actor = object.__new__(host.HostActor)
    actor.progress, actor.driver_stop = HostProgress(), DriverStop()
    with pytest.raises(HostError) as raised:
        actor.run(spec)
    return raised.value, list(actor.progress.drain().events), asked


def closed(ctx, gate):
    """The save let finish and the context's Orbax manager closed, as the host process's end would."""
    gate.set()
    ctx._loop.tiers.checkpointer.manager.wait_until_finished()
    ctx._loop.tiers.checkpointer.manager.close()


def test_a_save_in_flight_when_the_entry_raises_commits_before_the_error_is_reported(tmp_path, monkeypatch,
                                                                                    held_saves):
    error, said, [(ctx, waited)] = run_host(tmp_path, monkeypatch, saves_at_3_then_raises(RuntimeError("my bug")))
    assert waited == ctx._spec.pending_save_wait_s > 0
    # Read as the HostError is raised, before the driver hears of it and tears the host down.
    assert RunDir(tmp_path).committed_steps() == [3], "the save asked for at step 3 committed"
    assert np.all(read_arrays(tmp_path / "checkpoints" / "3")["['w']"] == 3.0)
    [final] = [e for e in said if isinstance(e, events.FinalSave)]
    assert final.after_error and final.ended
    assert error.kind == ErrorKind.USER and error.phase == Phase.TRAINING, \
        "the error is reported from the phase it was raised in (not the wait's)"
    closed(ctx, held_saves)


def test_after_a_lost_peer_s_error_the_host_reports_at_once(tmp_path, monkeypatch, held_saves):
    lost_peer = jax.errors.JaxRuntimeError("UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer")
    error, said, [(ctx, waited)] = run_host(tmp_path, monkeypatch, saves_at_3_then_raises(lost_peer))
    assert error.kind == ErrorKind.COLLECTIVE and waited == 0.0
    assert RunDir(tmp_path).committed_steps() == [], "not waited for"
    assert not [e for e in said if isinstance(e, events.FinalSave)]
    closed(ctx, held_saves)


def test_a_save_that_outlasts_the_limit_is_left_and_said(tmp_path, monkeypatch, held_saves):
    monkeypatch.setattr(Checkpointer, "wait", lambda self: self.manager.wait_until_finished())  # the gate stays shut
    error, said, [(ctx, _)] = run_host(tmp_path, monkeypatch, saves_at_3_then_raises(RuntimeError("my bug")),
                                       pending_save_wait_s=0.5)
    [final] = [e for e in said if isinstance(e, events.FinalSave)]
    assert final.after_error and not final.ended and 0.0 < final.seconds < 0.5 + 0.5
    assert error.kind == ErrorKind.USER and "my bug" in error.message
    assert RunDir(tmp_path).committed_steps() == []
    closed(ctx, held_saves)


def test_the_wait_is_shortened_by_the_time_since_the_host_s_last_step(tmp_path, monkeypatch, held_saves):
    """The other hosts, stalled in a collective since about this host's last step, are judged by the
    hang limit from then: a host that raised 29 s after its last step waits 1 s of its 30 (a save that
    never ends: left after that second, not 30 s), and one that raised 31 s after it waits not at all."""
    stalled = HostProgress.still_for
    monkeypatch.setattr(Checkpointer, "wait", lambda self: self.manager.wait_until_finished())  # the gate stays shut
    monkeypatch.setattr(HostProgress, "still_for", lambda self: stalled(self) + 29.0)
    _, said, [(ctx, _)] = run_host(tmp_path, monkeypatch, saves_at_3_then_raises(RuntimeError("my bug")),
                                   pending_save_wait_s=30.0)
    [final] = [e for e in said if isinstance(e, events.FinalSave)]
    assert not final.ended and 0.5 < final.seconds < 5.0, final
    closed(ctx, held_saves)
    held_saves.clear()  # the next save is held again
    monkeypatch.setattr(HostProgress, "still_for", lambda self: stalled(self) + 31.0)
    _, said, [(ctx, _)] = run_host(tmp_path / "late", monkeypatch, saves_at_3_then_raises(RuntimeError("my bug")),
                                   pending_save_wait_s=30.0)
    assert RunDir(tmp_path / "late").committed_steps() == [] and not [
        e for e in said if isinstance(e, events.FinalSave)], "no time was left: nothing waited for"
    closed(ctx, held_saves)
