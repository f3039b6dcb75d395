"""The host context in one process, driven the way a user's function drives it."""

import dataclasses
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jaxlaunch.launcher.records.runs import RunDir
from jaxlaunch.workers import context
from jaxlaunch.workers.checkpoints.tiered import Tiers
from jaxlaunch.workers.context import HostContext
from jaxlaunch.workers.sharding import build_mesh
from jaxlaunch.workers.supervision.progress import HostProgress

from examples import minimal
from jaxlaunch.contract import events
from jaxlaunch.contract.events import Restored
from jaxlaunch.contract.protocol import (
    CheckpointConfig,
    DistributedConfig,
    Ending,
    EntryRef,
    HostSpec,
    Injection,
    Phase,
)


def make_ctx(run_dir: pathlib.Path, steps: int, *, save_every=3, attempt=1, injections=()):
    spec = HostSpec(
        entry=EntryRef("examples.minimal", "main"), config={}, run_dir=str(run_dir), attempt=attempt, rank=0,
        num_hosts=1, coordinator_address="127.0.0.1:1", mesh={"data": -1, "model": 2}, steps=steps,
        schedule_steps=steps, seed=0, platform="cpu", distributed=DistributedConfig(),
        checkpoint=CheckpointConfig(save_every=save_every, max_to_keep=5, async_save=True), injections=injections)
    (run_dir / "hosts").mkdir(parents=True, exist_ok=True)
    progress = HostProgress()
    return HostContext(spec, build_mesh(spec.mesh), progress), progress


def run(run_dir, steps, **kw):
    ctx, progress = make_ctx(run_dir, steps, **kw)
    returned = minimal.main(ctx)
    drained = progress.drain()
    result = ctx._finish(returned)
    records = list(drained.records) + list(result.final_snapshot.records)
    return result, records, list(drained.events) + list(result.final_snapshot.events)


def test_the_reference_loop_trains_saves_and_reports(tmp_path):
    result, records, _ = run(tmp_path, 7)
    assert result.ending == Ending.COMPLETED and result.final_step == 7
    assert RunDir(tmp_path).committed_steps() == [7, 6, 3], "every --save-every steps and the last one"
    assert [r["step"] for r in records] == list(range(1, 8))
    assert all(isinstance(r["loss"], float) for r in records), "JAX scalars arrive as numbers"
    assert records[0]["step_time_s"] is None, "the first step also compiled"
    assert all(r["step_time_s"] > 0 for r in records[1:])
    assert [r["step"] for r in records if "checkpoint_blocking_s" in r] == [3, 6, 7]
    assert records[-1]["loss"] < records[0]["loss"]
    meta = json.loads((tmp_path / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert [r["step"] for r in meta["records"]] == [4, 5, 6], "a checkpoint carries its steps' records"
    assert meta["topology"] == {"num_hosts": 1, "num_devices": 8, "mesh": {"data": 4, "model": 2}}


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    _, whole, _ = run(tmp_path / "whole", 9)
    run(tmp_path / "parts", 5)  # saved at 3 and 5
    _, rest, events = run(tmp_path / "parts", 9, attempt=2)
    [restored] = [e for e in events if isinstance(e, Restored)]
    assert restored.step == 5 and [r["step"] for r in restored.records] == [4, 5]
    assert [r["step"] for r in rest] == [6, 7, 8, 9]
    assert [r["loss"] for r in rest] == [r["loss"] for r in whole[5:]]


def test_a_pytree_state_restores_in_its_own_form(tmp_path):
    def main(ctx):
        def init():
            return {"w": jnp.zeros((4,)), "count": jnp.int32(0)}

        state, start = ctx.restore_or_init(init)
        for step in range(start + 1, ctx.steps + 1):
            state = {"w": state["w"] + 1.0, "count": state["count"] + 1}
            ctx.report(step, total=state["w"].sum())
            ctx.maybe_save(step, state)
        return state, start

    ctx, _ = make_ctx(tmp_path, 3)
    main(ctx)
    ctx._finish(None)
    ctx, _ = make_ctx(tmp_path, 5, attempt=2)
    (state, start) = main(ctx)
    ctx._finish(None)
    assert start == 3 and isinstance(state, dict)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full(4, 5.0))
    assert int(state["count"]) == 5


def test_misuse_is_a_clear_error(tmp_path):
    ctx, _ = make_ctx(tmp_path, 3)
    with pytest.raises(RuntimeError, match="before ctx.restore_or_init"):
        ctx.report(1, loss=1.0)
    with pytest.raises(RuntimeError, match="before ctx.restore_or_init"):
        ctx.maybe_save(1, {})

    def init():
        model = minimal.MLP(nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    (model, optimizer), start = ctx.restore_or_init(init)
    with pytest.raises(RuntimeError, match="called twice"):
        ctx.restore_or_init(init)
    ctx.report(1, loss=jnp.float32(2.0), tokens=100)
    with pytest.raises(ValueError, match=r"ctx.report\(1\) after step 1: steps must increase"):
        ctx.report(1, loss=1.0)
    with pytest.raises(TypeError, match="structure differs"):
        ctx.maybe_save(3, (optimizer, model))
    ctx._finish(None)


def test_a_loop_that_reads_its_loss_has_each_step_stamped_at_its_own_end(tmp_path):
    """A loop that reads its loss itself (`float(loss)`, or a print) has each step's result in hand at
    its `report`: the step's record is stamped then. It was stamped at the next step's report, a step
    late, so a run's first step and a recovery's first step seemed to end a whole step later."""
    import jax
    from jaxlaunch.workers.context import HostContext

    spec = dataclasses.replace(make_ctx(tmp_path, 4)[0]._spec)
    now = [100.0]
    ctx = HostContext(spec, build_mesh(spec.mesh), progress := HostProgress(), clock=lambda: now[0])
    wall = ctx._wall_origin[0]
    ctx.restore_or_init(lambda: {"w": jnp.zeros(2)})
    for step in (1, 2, 3, 4):
        now[0] += 1.0  # the step's work
        loss = jax.block_until_ready(jnp.float32(1.0 / step))  # read by the loop itself
        ctx.report(step, loss=loss)
    result = ctx._finish(None)
    records = list(progress.drain().records) + list(result.final_snapshot.records)
    assert [r["time"] - wall for r in records] == pytest.approx([1.0, 2.0, 3.0, 4.0]), "each step's own end"
    assert [r["step_time_s"] for r in records] == [None, 1.0, 1.0, 1.0]


def test_tokens_give_a_throughput_and_nan_is_kept(tmp_path):
    ctx, progress = make_ctx(tmp_path, 3)
    ctx.restore_or_init(lambda: {"w": jnp.zeros(2)})
    for step in (1, 2, 3):
        ctx.report(step, loss=float("nan") if step == 3 else 1.0, tokens=1000)
    result = ctx._finish(None)
    records = list(progress.drain().records) + list(result.final_snapshot.records)
    assert "tokens_per_s" not in records[0] and records[1]["tokens_per_s"] > 0
    assert np.isnan(records[2]["loss"])


def test_an_injected_exception_fires_after_the_step_is_reported_and_saved(tmp_path):
    ctx, progress = make_ctx(tmp_path, 9, injections=(Injection("exception", step=3, host=0),))
    with pytest.raises(RuntimeError, match="injected exception at step 3"):
        minimal.main(ctx)
    ctx._loop.tiers.checkpointer.wait()
    assert RunDir(tmp_path).committed_steps() == [3], "the step's save started before the failure"
    assert progress.phase == Phase.TRAINING and progress.step == 3
    [line] = RunDir(tmp_path).injections()
    assert (line["kind"], line["step"], line["rank"]) == ("exception", 3, 0)
    ctx._loop.tiers.checkpointer.close()


class HeldParts:
    """The memory tier's host side, as the host context uses it, keeping what each part carries."""

    refused, refused_step, lost, lost_alive, replaced, active = None, None, [], [], [], True
    refused_steps: set[int] = set()

    def __init__(self):
        self.records = {}

    def held(self):
        return []

    def whole_steps(self, held, at_most=None):
        return []

    def save(self, step, tree, meta, extra, fault=None):
        self.records[step] = [r["step"] for r in meta["records"]]

    def copies_record(self):
        return {}

    def forget_after(self, step):
        pass

    def handing_off(self):
        return False

    def close(self):
        pass


def test_each_memory_part_carries_every_record_a_durable_save_also_carried(tmp_path, monkeypatch):
    """A restore from memory reads no durable records: a record handed to the durable save of step 3
    (or still pending then) and lost with rank 0 before the driver read it must come back from the
    memory part."""
    memory = HeldParts()
    monkeypatch.setattr(Tiers, "_start_memory", lambda self, num_hosts: memory)
    ctx, progress = make_ctx(tmp_path, 7, save_every=1)
    ctx._spec = dataclasses.replace(ctx._spec, checkpoint=dataclasses.replace(
        ctx._spec.checkpoint, memory_tier=True, persist_every=3))
    ctx._finish(minimal.main(ctx))
    assert RunDir(tmp_path).committed_steps() == [7, 6, 3], "durable every --persist-every steps and the last"
    assert memory.records == {step: list(range(1, step + 1)) for step in range(1, 8)}


def test_a_refused_memory_save_is_told_with_the_step_refused(tmp_path, monkeypatch):
    """A hand-off runs in the background: its refusal is known at a later save, and the event names the
    step whose part was refused, not the step at which it was noticed."""
    memory = HeldParts()
    saves = memory.save

    def save(step, tree, meta, extra, fault=None):
        saves(step, tree, meta, extra, fault)
        if step == 3:  # step 2's hand-off came back refused while step 3 trained: seen at step 3's save
            memory.refused, memory.refused_step, memory.refused_steps = "the part file of step 2 is gone", 2, {2}

    memory.save = save
    monkeypatch.setattr(Tiers, "_start_memory", lambda self, num_hosts: memory)
    result, records, told = run(tmp_path, 4, save_every=1)
    assert [(e.step, e.reason) for e in told if isinstance(e, events.MemorySaveRefused)] == \
        [(2, "the part file of step 2 is gone")]


def test_a_keeper_that_cannot_drop_the_steps_after_the_restored_one_turns_the_tier_off_for_the_attempt(
        tmp_path, monkeypatch):
    """A keeper that did not drop the steps past the restored one (its node up: restarting for a
    minute, or stuck) keeps steps of a history the run left, which a later restore would read as this
    run's: the attempt saves durably only, and says so."""
    memory = HeldParts()
    memory.forget_after = lambda step: f"the keeper(s) of node(s) abc did not drop the steps after {step}"
    monkeypatch.setattr(Tiers, "_start_memory", lambda self, num_hosts: memory)
    result, records, told = run(tmp_path, 7, save_every=1)
    off = [e for e in told if isinstance(e, events.MemoryTierOff)]
    assert len(off) == 1 and "did not drop the steps after 0" in off[0].reason, told
    assert off[0].kept_after == 0, "the driver has the keepers drop them before another attempt reads them"
    assert memory.records == {}, "no memory save"
    assert RunDir(tmp_path).committed_steps() == [7, 6, 5, 4, 3], "durable at every --save-every step"


def test_a_missed_drop_is_told_even_when_a_peer_dies_while_rank_0_waits_for_the_keepers(tmp_path, monkeypatch):
    """Rank 0 waits up to a minute for a stuck keeper to drop the steps it left while the other hosts
    wait in the collective that follows; a host that dies meanwhile fails that collective on rank 0.
    The driver must still hear `kept_after`, or the stuck keeper's steps stay readable."""
    from jaxlaunch.workers.checkpoints import tiered

    memory = HeldParts()
    memory.forget_after = lambda step: f"the keeper(s) of node(s) abc did not drop the steps after {step}"
    monkeypatch.setattr(Tiers, "_start_memory", lambda self, num_hosts: memory)

    def peer_died(flag):
        raise RuntimeError("gloo: connection reset by peer")

    monkeypatch.setattr(tiered, "any_host", peer_died)
    ctx, progress = make_ctx(tmp_path, 7, save_every=1)
    with pytest.raises(RuntimeError, match="reset by peer"):
        minimal.main(ctx)
    off = [e for e in progress.drain().events if isinstance(e, events.MemoryTierOff)]
    assert [e.kept_after for e in off] == [0]


def test_an_attempt_whose_keepers_cannot_hold_its_parts_still_restores_what_they_hold(tmp_path, monkeypatch):
    """/dev/shm filled up before a restart: the keepers cannot hold this attempt's parts, so it saves
    durably only; the steps they hold from the attempt before are still the run's newest, and the
    restart must read them rather than train from step 1."""
    memory = HeldParts()
    memory.active = False
    asked = []
    memory.whole_steps = lambda held, at_most=None: asked.append(at_most) or []
    monkeypatch.setattr(Tiers, "_start_memory", lambda self, num_hosts: memory)
    run(tmp_path, 3, save_every=1)
    assert asked == [None], "the keepers were asked for their committed steps"


@pytest.mark.parametrize("drops", [True, False])
def test_an_attempt_whose_keepers_cannot_hold_its_parts_still_has_them_drop_the_steps_it_left(
        tmp_path, monkeypatch, drops):
    """The keepers refused this attempt's parts (a keeper not answering, no room): the tier is off, but
    the keepers may hold an earlier attempt's steps past the one restored, which a later attempt with
    the tier on would read as this run's. The restore has them dropped, or tells the driver it could
    not (`kept_after`)."""
    memory = HeldParts()
    memory.active = False
    asked = []

    def forget_after(step):
        asked.append(step)
        return None if drops else f"the keeper(s) of node(s) abc did not drop the steps after {step}"

    memory.forget_after = forget_after
    monkeypatch.setattr(Tiers, "_start_memory", lambda self, num_hosts: memory)
    result, records, told = run(tmp_path, 7, save_every=1)
    assert asked == [0], "a fresh start: every held step is another history's"
    off = [e for e in told if isinstance(e, events.MemoryTierOff)]
    assert [e.kept_after for e in off] == ([] if drops else [0]), told
    assert memory.records == {}, "no memory save"


@pytest.mark.parametrize("memory_tier", [True, False])
def test_a_save_s_replica_check_counts_in_its_blocking_time_and_in_the_cadence(tmp_path, monkeypatch, memory_tier):
    """At a save step the replica check reads its checksums back at once, after taking the state's
    arrays out of its objects (`StateLayout.split`): time the loop is blocked for the save, so both are
    in the step record's checkpoint_blocking_s, once, and in the cost the cadence keeps within its share
    (the memory tier's, or Orbax's without it); only the check is in replica_check_s (an NNX state's
    split took 8 of a small preset's 10 ms there)."""
    import time

    from jaxlaunch.workers.checkpoints.cadence import SaveCadence
    from jaxlaunch.workers.state import StateLayout

    split_s = 0.2  # a split's cost, made large enough to tell apart from the check's and the save's
    split = StateLayout.split

    def slow_split(self, obj):
        time.sleep(split_s)
        return split(self, obj)

    memory = HeldParts()
    monkeypatch.setattr(Tiers, "_start_memory", lambda self, num_hosts: memory if memory_tier else None)
    monkeypatch.setattr(StateLayout, "split", slow_split)
    ctx, progress = make_ctx(tmp_path, 7, save_every=1)
    ctx._spec = dataclasses.replace(ctx._spec, checkpoint=dataclasses.replace(
        ctx._spec.checkpoint, memory_tier=memory_tier, persist_every=3))
    costs, given = {}, {}
    after_save, save = SaveCadence.after_save, Tiers.save

    def spy(self, step, saved, memory_s, durable_s, final=False):
        costs[step] = (memory_s, durable_s)
        after_save(self, step, saved, memory_s, durable_s, final)

    def timed_save(self, step, *args, checked_s=0.0, split_s=0.0, **kwargs):
        started = time.perf_counter()
        saved = save(self, step, *args, checked_s=checked_s, split_s=split_s, **kwargs)
        given[step] = (checked_s, split_s, time.perf_counter() - started)
        return saved

    monkeypatch.setattr(SaveCadence, "after_save", spy)
    monkeypatch.setattr(Tiers, "save", timed_save)
    returned = minimal.main(ctx)
    records = list(progress.drain().records) + list(ctx._finish(returned).final_snapshot.records)
    saves = {r["step"]: r for r in records if "checkpoint_blocking_s" in r}
    assert sorted(saves) == list(range(1, 8))
    for step, record in saves.items():
        checked, split_time, in_save = given[step]
        assert split_time >= split_s and record["replica_check_s"] == checked, (step, record)
        assert checked + split_time <= record["checkpoint_blocking_s"] <= checked + split_time + in_save, (step, record)
        memory_s, durable_s = costs[step]
        cost = memory_s if memory_tier else durable_s
        assert cost is not None and checked + split_time <= cost <= record["checkpoint_blocking_s"], (step, costs[step])


@pytest.mark.parametrize("stop_at", [4, 6])
def test_a_stop_agreed_at_the_last_step_ends_the_run_completed(tmp_path, stop_at):
    ctx, progress = make_ctx(tmp_path, 6)
    assert ctx._driver_stop.propose(stop_at).accepted and ctx._driver_stop.confirm(stop_at)
    result = ctx._finish(minimal.main(ctx))
    assert result.final_step == stop_at and stop_at in RunDir(tmp_path).committed_steps()
    assert result.ending == (Ending.COMPLETED if stop_at == 6 else Ending.STOPPED)


def test_sys_exit_in_the_entry_is_the_entry_s_error_not_a_crash(tmp_path, monkeypatch):
    """argparse or absl in `main(ctx)` ends with SystemExit: the driver must get the entry's error
    (it stops the job, with the traceback), not a dead process (restarted until the budget is spent)."""
    from jaxlaunch.workers import host, runtime
    from jaxlaunch.workers.supervision.stops import DriverStop

    from jaxlaunch.contract import entry as entry_lib
    from jaxlaunch.contract.protocol import ErrorKind, HostError

    ctx, _ = make_ctx(tmp_path, 4)
    spec = ctx._spec
    monkeypatch.setattr(runtime, "initialize", lambda **kwargs: None)
    monkeypatch.setattr(runtime, "shutdown", lambda: None)

    def main(ctx):
        raise SystemExit("error: unrecognized arguments: --lr")

    monkeypatch.setattr(entry_lib, "load_entry", lambda ref, code=None, imports=None: main)
    actor = object.__new__(host.HostActor)  # without Ray: the actor's own code only
    actor.progress, actor.driver_stop = HostProgress(), DriverStop()
    with pytest.raises(HostError) as raised:
        actor.run(spec)
    assert raised.value.kind == ErrorKind.USER and raised.value.exception_type == "SystemExit"
    assert "unrecognized arguments: --lr" in raised.value.message


def test_what_the_function_returns_reaches_the_driver_as_plain_data_and_nothing_is_dropped_silently(tmp_path):
    """A final loss as a JAX scalar is a number; what is not plain data is named in its place (it
    came back as None, the whole value lost without a word)."""
    ctx, _ = make_ctx(tmp_path, 1)
    returned = {"loss": jnp.float32(0.5), "steps": np.int64(3), "table": np.ones(3), 7: [jnp.ones((2, 2)), ("a", None)],
                "model": object()}
    assert ctx._finish(returned).returned == {
        "loss": 0.5, "steps": 3, "table": "<not plain data: numpy.ndarray float64[3]>",
        7: ["<not plain data: jax.Array float32[2, 2]>", ["a", None]], "model": "<not plain data: builtins.object>"}
    looped: dict = {"loss": jnp.float32(float("nan")), "z": np.complex64(1j)}
    looped["again"] = looped
    assert json.dumps(context._json_value(looped), allow_nan=False) == json.dumps(
        {"loss": None, "z": "<not plain data: numpy.complex64 complex64[]>",
         "again": "<not plain data: it contains itself>"}), "what the run's records can hold"
