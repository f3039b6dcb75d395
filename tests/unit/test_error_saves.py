"""A save the entry asked for just before it raised: the host waits for it to commit before it reports
the error, within a limit, and not after a lost peer's error (whose barrier never ends). Before, the
host reported at once and the driver's teardown killed the save: `N.orbax-checkpoint-tmp` was left
and the restart began from the save before."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
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

SIDE = 4096
"""A 64 MB state: Orbax writes it in the background for far longer than the host takes from the save to
the error's handling (a raise and a log line)."""


def saves_at_3_then_raises(error: Exception):
    def main(ctx):
        state, start = ctx.restore_or_init(lambda: {"w": jnp.zeros((SIDE, SIDE))})
        for step in range(start + 1, ctx.steps + 1):
            state = {"w": state["w"] + 1.0}
            ctx.report(step)
            ctx.maybe_save(step, state)
            if step == 3:
                raise error
    return main


def run_host(tmp_path, monkeypatch, main, **spec_fields):
    """The host actor's own code without Ray, running `main`: the HostError it raises, its events,
    and the wait it gave `_after_error` (the context kept, to wait for its save at the end)."""
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


def test_a_save_in_flight_when_the_entry_raises_commits_before_the_error_is_reported(tmp_path, monkeypatch):
    error, said, [(ctx, waited)] = run_host(tmp_path, monkeypatch, saves_at_3_then_raises(RuntimeError("my bug")))
    assert waited == ctx._spec.pending_save_wait_s > 0
    # Read as the HostError is raised, before the driver hears of it and tears the host down.
    assert RunDir(tmp_path).committed_steps() == [3], "the save asked for at step 3 committed"
    assert np.all(read_arrays(tmp_path / "checkpoints" / "3")["['w']"] == 3.0)
    [final] = [e for e in said if isinstance(e, events.FinalSave)]
    assert final.after_error and final.ended, "the save was in flight, and it ended"
    assert error.kind == ErrorKind.USER and error.phase == Phase.TRAINING, \
        "the error is reported from the phase it was raised in (not the wait's)"


def test_after_a_lost_peer_s_error_the_host_reports_at_once(tmp_path, monkeypatch):
    lost_peer = jax.errors.JaxRuntimeError("UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer")
    error, said, [(ctx, waited)] = run_host(tmp_path, monkeypatch, saves_at_3_then_raises(lost_peer))
    assert error.kind == ErrorKind.COLLECTIVE and waited == 0.0
    assert not [e for e in said if isinstance(e, events.FinalSave)]
    ctx._loop.tiers.checkpointer.wait()


def test_a_save_that_outlasts_the_limit_is_left_and_said(tmp_path, monkeypatch):
    stuck = threading.Event()
    wait = Checkpointer.wait

    def never_ends(self):
        stuck.wait()
        wait(self)

    monkeypatch.setattr(Checkpointer, "wait", never_ends)
    try:
        error, said, _ = run_host(tmp_path, monkeypatch, saves_at_3_then_raises(RuntimeError("my bug")),
                                  pending_save_wait_s=0.2)
    finally:
        stuck.set()
    [final] = [e for e in said if isinstance(e, events.FinalSave)]
    assert final.after_error and not final.ended and final.seconds >= 0.2
    assert error.kind == ErrorKind.USER and "my bug" in error.message
