"""Each step's time is its own: measured between the readbacks of two steps' results, so the device
time of one step never moves into the next under asynchronous dispatch."""

import pathlib
import threading

import jax.numpy as jnp
import pytest
from jaxlaunch.workers.context import HostContext
from jaxlaunch.workers.sharding import build_mesh
from jaxlaunch.workers.supervision.progress import HostProgress
from jaxlaunch.workers.supervision.step_clock import StepClock, StepTime

from jaxlaunch.contract.protocol import CheckpointConfig, DistributedConfig, EntryRef, HostSpec


class FakeClock:
    """Seconds that pass only when told: the device's work and the host's work advance it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def test_a_step_is_timed_from_the_previous_readback_and_split_into_busy_and_blocked():
    clock = FakeClock()
    steps = StepClock(clock)
    steps.dispatched()            # step 1 (compiles)
    clock.advance(0.5)            # host work for step 2
    steps.dispatched()            # step 2
    clock.advance(5.0)            # waiting for step 1
    assert steps.read() is None, "the first step also compiled: no time of its own"
    clock.advance(0.25)           # host work for step 3
    steps.dispatched()
    clock.advance(0.75)           # waiting for step 2
    assert steps.read() == StepTime(step_time_s=1.0, busy_s=0.25, blocked_s=0.75)
    clock.advance(0.5)            # a readback before a save: no dispatch since the previous one
    assert steps.read() == StepTime(step_time_s=0.5, busy_s=0.0, blocked_s=0.5)
    steps.restart()               # the save's time is no step's
    clock.advance(0.125)
    steps.dispatched()
    clock.advance(0.375)
    assert steps.read() == StepTime(step_time_s=0.5, busy_s=0.125, blocked_s=0.375)
    clock.advance(0.125)          # the next step's input (ctx.global_batch)...
    steps.input_ready()
    clock.advance(0.25)           # ...then a dispatch that runs the step (a collective on the CPU)
    steps.dispatched()
    clock.advance(0.125)
    assert steps.read() == StepTime(step_time_s=0.5, busy_s=0.125, blocked_s=0.375), \
        "the dispatch is no host work when the input's end is known"


DEVICE_SECONDS = {1: 1.0, 2: 1.0, 3: 1.0, 4: 7.0, 5: 1.0, 6: 1.0, 7: 1.0}
"""Each step's time on the fake device: step 4 is the slow one."""
HOST_SECONDS = 0.25
"""The host's own work before each step's dispatch (less than a step's device time, as it should be)."""
TOKENS = 1000


class Result(float):
    """A step's value, computed on the fake device (a float, so it reads back as a number)."""

    step: int


class FakeDevice:
    """An accelerator under asynchronous dispatch: a dispatched step runs once the device is free and
    the step is queued, for its own time; waiting for a step's value moves the clock to its end."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.done_at: dict[int, float] = {}
        self.free_at = 0.0

    def dispatch(self, step: int, seconds: float) -> Result:
        start = max(self.free_at, self.clock())
        self.free_at = self.done_at[step] = start + seconds
        result = Result(seconds)
        result.step = step
        return result

    def ready(self, values: list) -> bool:
        return all(self.clock.now >= self.done_at[v.step] for v in values if isinstance(v, Result))

    def wait_for(self, values: list) -> None:
        for value in values:
            if isinstance(value, Result):
                self.clock.now = max(self.clock.now, self.done_at[value.step])


def context_on(device: FakeDevice, tmp_path: pathlib.Path, steps: int) -> HostContext:
    """A one-host context of `steps` steps whose clock and device are the fake ones."""
    spec = HostSpec(
        entry=EntryRef("examples.minimal", "main"), config={}, run_dir=str(tmp_path), attempt=1, rank=0,
        num_hosts=1, coordinator_address="127.0.0.1:1", mesh={"data": -1}, steps=steps, schedule_steps=steps,
        seed=0, platform="cpu", distributed=DistributedConfig(),
        checkpoint=CheckpointConfig(save_every=100, async_save=True))
    (tmp_path / "hosts").mkdir()
    return HostContext(spec, build_mesh(spec.mesh), HostProgress(), clock=device.clock, wait_for=device.wait_for,
                       ready=device.ready)


def test_each_steps_time_and_throughput_are_its_own_under_asynchronous_dispatch(tmp_path: pathlib.Path):
    """The host queues each step and reports it long before the device finished it. Each record still
    shows its own step's time: the slow step 4 is slow in its own record (not step 5's, as timing
    between reports showed), busy is the host's work and blocked the wait, and tok/s comes from that
    same time."""
    clock = FakeClock()
    device = FakeDevice(clock)
    ctx = context_on(device, tmp_path, len(DEVICE_SECONDS))

    state, start = ctx.restore_or_init(lambda: jnp.zeros(()))
    for step in range(start + 1, ctx.steps + 1):
        clock.advance(HOST_SECONDS)
        loss = device.dispatch(step, DEVICE_SECONDS[step])
        ctx.report(step, loss=loss, tokens=TOKENS)
        ctx.maybe_save(step, state)
    result = ctx._finish(None)
    records = {r["step"]: r for r in result.final_snapshot.records}

    assert records[1]["step_time_s"] is None, "the first step also compiled"
    for step in range(2, ctx.steps + 1):
        record = records[step]
        # The device is the bottleneck: it runs steps back to back, each for its own time.
        assert record["step_time_s"] == DEVICE_SECONDS[step], (step, record)
        assert record["tokens_per_s"] == TOKENS / DEVICE_SECONDS[step], (step, record)
        assert record["busy_s"] + record["blocked_s"] == record["step_time_s"], (step, record)
    # Each record's time is when its step ended, so the steps laid back from their records' times
    # tile the run without gaps or overlaps (what the goodput split counts as steps).
    ends = [records[s]["time"] for s in range(1, ctx.steps + 1)]
    assert [b - a for a, b in zip(ends, ends[1:], strict=False)] == pytest.approx(
        [DEVICE_SECONDS[s] for s in range(2, ctx.steps + 1)], abs=1e-6), ends
    assert records[4]["tokens_per_s"] == TOKENS / 7.0 and records[5]["tokens_per_s"] == TOKENS / 1.0, \
        "the slow step's throughput is its own, and the next step's is not inflated by it"
    # Busy: the host's work of queueing the next step; the last step's save waits at once.
    assert [records[s]["busy_s"] for s in range(2, ctx.steps + 1)] == [HOST_SECONDS] * 5 + [0.0]
    busy = dict(result.final_snapshot.busy)
    assert {s: busy[s] for s in range(2, ctx.steps)} == dict.fromkeys(range(2, ctx.steps), HOST_SECONDS), \
        "every host tells the driver its busy time per step"


def test_steps_read_late_once_stay_read_late_so_that_no_step_takes_another_s_time(tmp_path: pathlib.Path):
    """Steps whose device time alternates between none and a second: the first is in at its report and
    read then; the second is not, so it is read at the next report, and from then on every step is,
    even one already in at its own report. Read now when in and late when not, a step in just after
    the previous one was read would show 0 s, and the previous one both steps' time."""
    clock = FakeClock()
    device = FakeDevice(clock)
    seconds = {1: 0.0, 2: 1.0, 3: 0.0, 4: 1.0, 5: 0.0, 6: 1.0, 7: 0.0}
    ctx = context_on(device, tmp_path, len(seconds))
    state, start = ctx.restore_or_init(lambda: jnp.zeros(()))
    for step in range(start + 1, ctx.steps + 1):
        clock.advance(HOST_SECONDS)
        ctx.report(step, loss=device.dispatch(step, seconds[step]))
        ctx.maybe_save(step, state)
    records = {r["step"]: r for r in ctx._finish(None).final_snapshot.records}
    # From each readback to the next: step 2 also holds its own queueing; a step of no device time, the
    # host's work until the next readback.
    assert [records[s]["step_time_s"] for s in range(2, 7)] == pytest.approx([1.25, 0.25, 1.0, 0.25, 1.0])
