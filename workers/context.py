"""The host context: what the user's function receives on every host, and its whole contract with
the launcher.

    def main(ctx):
        (model, optimizer), start = ctx.restore_or_init(make_model_and_optimizer)
        for step in range(start + 1, ctx.steps + 1):
            loss = train_step(model, optimizer, *batch(step, ctx.mesh))
            ctx.report(step, loss=loss)
            ctx.maybe_save(step, (model, optimizer))
            if ctx.should_stop(step):
                break

Every host runs the same function; the calls that touch checkpoints (`restore_or_init`,
`maybe_save`, `should_stop`) are collective and must be made by every host at the same steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jaxlaunch.workers import extras
from jaxlaunch.workers.checkpoints.memory import part_nbytes
from jaxlaunch.workers.checkpoints.tiered import Saved, TierRestore, Tiers
from jaxlaunch.workers.compat import jax as jax_compat
from jaxlaunch.workers.inputs import batch as batch_lib
from jaxlaunch.workers.sharding import Rules
from jaxlaunch.workers.state import Shardings, StateLayout, largest_array
from jaxlaunch.workers.supervision.faults import FaultHook
from jaxlaunch.workers.supervision.progress import HostProgress
from jaxlaunch.workers.supervision.replica_sums import PendingChecksums, flip_bit
from jaxlaunch.workers.supervision.step_clock import StepClock
from jaxlaunch.workers.supervision.stops import DriverStop

from jaxlaunch.contract import data_order, events
from jaxlaunch.contract.layout import RunLayout
from jaxlaunch.contract.protocol import Ending, HostResult, HostSpec, Phase

log = logging.getLogger(__name__)
CARRIED_RECORDS = 256
"""The newest records a checkpoint carries (only the last seconds' worth can be missing)."""


@dataclasses.dataclass
class _Loop:
    """What `restore_or_init` sets up for the training loop."""

    layout: StateLayout
    tiers: Tiers
    """Both checkpoint tiers: which one a step saves to, the saves, the commits."""
    start_step: int
    """The step the state was restored at (0: a fresh state)."""
    last_step: int
    """The newest step reported (or the start step)."""
    step_clock: StepClock
    """Each step's own time, from the readbacks of its result and the previous step's."""


class HostContext:
    """The launcher, as the user's function on one host sees it.

    Attributes: `mesh` (the global mesh of the job's `mesh` setting), `process_index`,
    `process_count`, `steps` (the run's --steps), `schedule_steps` (the length of a learning-rate
    schedule, fixed when the run started), `seed`, `run_dir`, `attempt`, and `config` (the user's
    own settings: the YAML `config:` section and --set flags, saved with the run)."""

    def __init__(self, spec: HostSpec, mesh: jax.sharding.Mesh, progress: HostProgress,
                 driver_stop: DriverStop | None = None, clock: Callable[[], float] = time.perf_counter,
                 wait_for: Callable[[list[Any]], None] | None = None,
                 ready: Callable[[list[Any]], bool] | None = None):
        self.mesh = mesh
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()
        self.steps = spec.steps
        self.schedule_steps = spec.schedule_steps
        self.seed = spec.seed
        self._run = RunLayout(spec.run_dir)
        self.run_dir = self._run.path
        self.attempt = spec.attempt
        self.config: dict[str, Any] = dict(spec.config)
        self._spec, self._progress = spec, progress
        self._driver_stop = driver_stop or DriverStop()
        self._loop: _Loop | None = None
        self._clock = clock
        self._wall_origin = (time.time(), clock())
        """A wall time and the clock's reading at the same instant: a readback's wall time is the
        clock's advance on it (so a test's fake clock moves the records' times too)."""
        self._wait_for = wait_for or _wait_for_device
        """Returns once the values a step reported are computed (a test's fake device replaces it)."""
        self._ready = ready or jax_compat.ready
        """Whether `_wait_for` of these values would return at once (a test's fake device has its own)."""
        self._pending: list[dict[str, Any]] = []
        """Records of reported steps not handed to the driver yet (every host keeps its own, whose JAX
        values it reads back to time the step; rank 0's go to the driver)."""
        self._unsaved: list[dict[str, Any]] = []
        """Records handed to the driver since the last save."""
        self._carried = 0
        """The newest step whose record a checkpoint carries."""
        self._stop_checked: tuple[int, bool] | None = None
        self._saved_step: int | None = None
        self._stopped_at: int | None = None
        self._armed: int | None = None
        self._extra: dict[str, Any] = {}
        self._risk_told = False
        self._faults = FaultHook(spec.injections, spec.rank, spec.attempt, self._run, self._saving)
        self._checks: list[PendingChecksums] = []
        """Replica checksums dispatched and not read back yet."""

    # -- state -----------------------------------------------------------------------------------
    def restore_or_init(self, init: Callable[[], Any], *, rules: Rules | None = None,
                        shardings: Shardings = None, extra: dict[str, Any] | None = None) -> tuple:
        """`(state, step)`: the latest committed checkpoint restored into today's mesh, whatever
        topology wrote it, or a fresh state from `init()` (step 0). The newest step committed in
        either tier is read: host memory (the memory tier) or Orbax in the run directory.

        `init()` builds NNX objects (a Module, an nnx.Optimizer, or a tuple, list or dict of them) or
        any pytree of arrays. It is evaluated abstractly first; the state is then made or restored
        straight into its shardings, so no host ever holds a full copy of a sharded array. Shardings
        come from NNX annotations (`nnx.with_partitioning`) mapped through `rules` (logical axis ->
        mesh axis; a name that is a mesh axis maps to itself), or, for plain pytrees, from
        `shardings`; anything unannotated is replicated. The state comes back in init()'s form.

        `extra` (name -> value) is state that is not arrays, saved with every checkpoint: an object
        with get_state()/set_state() (a Grain iterator) is set back in place, and any other value
        (JSON: a best loss, a counter) is its initial value. With `extra`, the call returns
        `(state, step, extra)`: the same names with the restored values; pass that dict (updated)
        to `maybe_save`. A per-host iterator comes back from this host's own save; JSON values and
        an ElasticIterator from rank 0's, on every host. On another host count, per-host iterators
        change the data order: a `data_order_changed` event says so (`jaxlaunch.contract.data_order`)."""
        if self._loop is not None:
            raise RuntimeError("ctx.restore_or_init was called twice: call it once, before the training loop")
        self._progress.enter(Phase.RESTORING)
        layout = StateLayout.of(init, self.mesh, rules, shardings)
        tiers = Tiers(self._spec, self._run, layout, self._progress, self.process_index, self.process_count)
        restored = tiers.restore()
        self._extra = dict(extra or {})
        if restored is None:
            state, step = layout.materialize(init), 0
            log.info("no checkpoint: made a fresh state (%.1f MB)", layout.num_bytes() / 1e6)
        else:
            state, step = restored.state, restored.step
            self._extra = extras.restore(self._extra, restored.extra, restored.meta.get("shared_extra"))
            self._note_data_order(restored)
            path, array = largest_array(state)
            sharding = array.sharding.spec if isinstance(array.sharding, NamedSharding) else array.sharding
            self._progress.event(events.Restored(
                step=step, records=tuple(restored.meta.get("records", [])), seconds=restored.seconds,
                tier=restored.tier, durable_bytes_read=restored.durable_bytes,
                memory_bytes_read=restored.memory_bytes, replicas=list(restored.replicas),
                memory_part_bytes=part_nbytes(layout.targets()) if restored.tier == "memory" else None,
                saved_topology=restored.meta.get("topology"),
                mesh=dict(self.mesh.shape),
                # Evidence that the arrays landed in today's layout, not the one they were saved in.
                array=path, sharding=str(sharding),
                shard_shape=list(array.addressable_shards[0].data.shape)))
            log.info("restored step %d from %s in %.2f s", step, restored.tier, restored.seconds)
        self._progress.step_done(step)
        self._progress.enter(Phase.COMPILING)
        self._loop = _Loop(layout, tiers, step, step, StepClock(self._clock))
        if extra is None:
            return layout.merge(state), step
        return layout.merge(state), step, self._extra

    def _note_data_order(self, restored: TierRestore) -> None:
        saved_hosts = (restored.meta.get("topology") or {}).get("num_hosts")
        changed = data_order.changed_keys(restored.extra, saved_hosts, self.process_count)
        if changed:
            log.warning("the data order changes: extra %s was saved by %s host(s), restored on %d",
                        changed, saved_hosts, self.process_count)
            self._progress.event(events.DataOrderChanged(keys=changed, old_hosts=saved_hosts,
                                                         new_hosts=self.process_count, step=restored.step))

    # -- the loop --------------------------------------------------------------------------------
    def report(self, step: int, **metrics: Any) -> None:
        """Step `step` is done, with its metrics (Python numbers or JAX scalars; JAX values are
        fetched a step later, so the device never waits for the host). The watchdog's heartbeat:
        call it every step. Metrics go to the progress bar, metrics.jsonl, TensorBoard and the
        goodput accounting; a `tokens` metric (tokens in the step) also gives `tokens_per_s`."""
        loop = self._require_state("report")
        self._fire_armed()
        if step <= loop.last_step:
            raise ValueError(f"ctx.report({step}) after step {loop.last_step}: steps must increase")
        loop.step_clock.dispatched()
        first = loop.last_step == loop.start_step
        loop.last_step = step
        record: dict[str, Any] = {"step": step, "time": time.time(), "attempt": self.attempt,
                                  "num_hosts": self.process_count}
        for name, value in metrics.items():
            if isinstance(value, jax.Array) and self.process_index == 0:
                value.copy_to_host_async()
            record[name] = value
        # Every earlier step read back already: this one too, if its result is in (a loop that read its
        # loss itself), so that its time ends now, not with the next step. Once a step was left for the
        # next report, every later one is too: read alternately now and a step late, one step would take
        # two steps' time and the next none.
        caught_up = not any(r["step"] < step and "step_time_s" not in r for r in self._pending)
        # The previous step's result, read now that this step is queued behind it: its own time.
        self._read_back(upto=step - 1)
        self._flush_metrics(before=step)
        self._pending.append(record)
        if caught_up and self._ready(list(record.values())):
            self._read_back(upto=step)
        self._progress.step_done(step)
        if first:
            self._progress.enter(Phase.TRAINING)
            self._progress.event(events.StartupTimeline.from_dict({**self._progress.timeline,
                                                                   "first_step_done": time.time()}))
        self._armed = step
        self._progress.committed(loop.tiers.committed())

    def maybe_save(self, step: int, state: Any, extra: dict[str, Any] | None = None) -> bool:
        """Saves `state` (in the form restore_or_init returned it) when a save is due: at the cadence
        (`jaxlaunch.workers.checkpoints.cadence`: --save-every to host memory with the memory tier, --persist-every
        to Orbax; without the tier every save is durable), at ctx.steps, and at the step every host
        agreed on after a preemption notice, a stop request or a resize. `extra`: the dict that
        restore_or_init returned, with today's values. Returns whether it saved. Call it every step
        on every host: the agreements on a stop step and on the cadence happen here."""
        loop = self._require_state("maybe_save")
        if extra is not None:
            self._extra = dict(extra)
        final = self._stop_agreed(step, loop.tiers) or step == self.steps
        due = loop.tiers.due(step, final)
        saving = due.any and self._saved_step != step
        if saving:
            self._read_back(upto=step)  # the save waits for this step anyway: its time is its own
            self._progress.enter(Phase.SAVING)  # the replica check below is the save's work, not a hang
        self._inject_bitflip(step, state)  # an injected fault, not the check's time
        checking = time.perf_counter()
        tree, split_s = self._check_replicas(step, state, due.any)
        checked_s = time.perf_counter() - checking - split_s
        saved: Saved | None = None
        if saving:  # a save step is a check step: `tree` is the state's arrays the check split out
            self._flush_metrics(before=step)
            # The checkpoint carries the records since the last save: if this host dies before the
            # driver hears them, a restore still brings every committed step's metrics back.
            pending = self._pending if self.process_index == 0 else []  # rank 0's records are the run's
            records = self._unsaved + [{k: _to_python(v) for k, v in r.items()} for r in pending]
            mine = extras.snapshot(self._extra)
            meta = {**self._meta(step), "records": records[-CARRIED_RECORDS:], "shared_extra": extras.shared(mine)}
            self._warn_of_data_order_risk()
            saved = loop.tiers.save(step, tree, meta, mine, due, fault=self._faults.in_handoff(step),
                                    checked_s=checked_s, split_s=split_s)
            if due.durable and not loop.tiers.memory_on:
                self._unsaved, self._carried = [], step  # the next checkpoint carries the records after these
            # With the memory tier, its parts carry the newest records whatever the durable tier
            # holds: a restore from memory reads no durable records, and must bring back all a lost
            # rank 0 never handed over (only the last seconds' worth can be missing).
            del self._unsaved[:-CARRIED_RECORDS]
            self._progress.enter(Phase.TRAINING)
            loop.step_clock.restart()  # the save's blocking time is no step's (checkpoint_blocking_s)
            self._saved_step = step
            for record in self._pending:
                if record["step"] == step:
                    record.update(saved.record)
        loop.tiers.after(step, saved, final)
        self._fire_armed()
        return due.any

    def should_stop(self, step: int) -> bool:
        """True on every host at one and the same step after a preemption notice, a stop request or
        a resize, once `maybe_save` saved that step: the function should then return."""
        loop = self._require_state("should_stop")
        self._fire_armed()
        stop = self._stop_agreed(step, loop.tiers)
        if stop:
            if self._saved_step != step:
                log.warning("should_stop(%d) is True but maybe_save(%d, state) was not called first: the state "
                            "of this step is not saved", step, step)
            self._stopped_at = step
        return stop

    def global_batch(self, rows_fn: batch_lib.RowsFn, step: int, batch_size: int,
                     axes: str | Sequence[str] | None = None) -> Any:
        """The batch of `step` as global arrays: `rows_fn(step, rows)` returns a pytree of numpy
        arrays for the given row indices, and each process calls it only for its own rows, so the
        batch is the same whatever the host count. Rows split over `axes` (default "data")."""
        batch = batch_lib.global_batch(rows_fn, step, batch_size, self.mesh, axes)
        if self._loop is not None:
            self._loop.step_clock.input_ready()  # the host's own work for this step ends here
        return batch

    # -- inside the launcher -----------------------------------------------------------------------
    def _check_replicas(self, step: int, state: Any, due: bool) -> tuple[Any, float]:
        """At a save step (before it saves) and every `verify_every` steps: the checksums of the
        state's replicated shards, dispatched now and handed to the driver once read back (a step
        later; at a save step at once, as the save waits for the step anyway). Returns the state's
        arrays when it checked them (`layout.split`: the save takes the same, not a second split)
        and the seconds that split took (0 without one): taking an NNX state's arrays out of its
        objects is the save's work, not the check's (8 ms of a 10 ms check for the small preset)."""
        loop = self._require_state("maybe_save")
        every = self._spec.verify_every
        tree, split_s = None, 0.0
        if due or (every and step % every == 0):
            splitting = time.perf_counter()
            tree = loop.layout.split(state)
            split_s = time.perf_counter() - splitting
            self._checks.append(PendingChecksums(step, tree))
        self._hand_over_checks(upto=step if due else step - 1)
        return tree, split_s

    def _inject_bitflip(self, step: int, state: Any) -> None:
        """`--inject bitflip` at its step: one bit of this host's copy of a replicated array flips."""
        if not self._faults.bitflip_due(step):
            return
        layout = self._require_state("maybe_save").layout
        flipped = flip_bit(layout.split(state))
        if flipped is None or not layout.is_nnx:
            log.warning("bitflip at step %d: no replicated array in an NNX state to flip", step)
        else:
            nnx.update(state, flipped[0])
            log.warning("bitflip at step %d: flipped a bit of this host's copy of %s", step, flipped[1])

    def _hand_over_checks(self, upto: int | None = None) -> None:
        while self._checks and (upto is None or self._checks[0].step <= upto):
            self._progress.checksums(self._checks.pop(0).result())

    def _warn_of_data_order_risk(self) -> None:
        """Once, at the first save of an elastic job whose `extra` holds per-host iterators."""
        keys = extras.per_host_names(self._extra)
        if self._spec.elastic and keys and not self._risk_told:
            self._risk_told = True
            message = data_order.risk_warning(keys)
            log.warning("%s", message)
            self._progress.event(events.DataOrderAtRisk(keys=keys, message=message))

    def _require_state(self, method: str) -> _Loop:
        if self._loop is None:
            raise RuntimeError(f"ctx.{method} before ctx.restore_or_init: build or restore the state first")
        return self._loop

    def _stop_agreed(self, step: int, tiers: Tiers) -> bool:
        """Asked once per step: the step the driver agreed with every host (a resize, a stop the user
        asked for), or JAX's preemption sync point (after a SIGTERM from outside reached any host,
        every host answers True at the same step)."""
        if self._stop_checked is None or self._stop_checked[0] != step:
            stop = self._driver_stop.reached(step) or tiers.reached_preemption(step)
            self._stop_checked = (step, stop)
        return self._stop_checked[1]

    def _saving(self) -> bool:
        """Whether a save is under way: Orbax's in the background, or a memory part's hand-off."""
        return self._loop is not None and self._loop.tiers.saving()

    def _fire_armed(self) -> None:
        if self._armed is not None:
            step, self._armed = self._armed, None
            self._faults.at_step(step)

    def _read_back(self, upto: int | None = None) -> None:
        """Waits for the results of the reported steps up to `upto` (a step late, so they are ready or
        nearly) and stamps each with its own time; every host tells the driver its busy time."""
        if self._loop is None:
            return
        for record in self._pending:
            if (upto is not None and record["step"] > upto) or "step_time_s" in record:
                continue
            self._wait_for(list(record.values()))
            timing = self._loop.step_clock.read()
            # The record's time is when its step ended (its readback), the end of its step_time_s:
            # the goodput split lays each step from its time back by its step time.
            record["time"] = self._wall_now()
            # The first step read in an attempt also paid for compilation: it has no time of its own.
            record["step_time_s"] = None if timing is None else timing.step_time_s
            if timing is None:
                continue
            record["busy_s"], record["blocked_s"] = timing.busy_s, timing.blocked_s
            self._loop.tiers.step_time(timing.step_time_s, record["step"])
            self._progress.busy(record["step"], timing.busy_s)
            self._faults.observe_busy(timing.busy_s)
            if "tokens" in record and timing.step_time_s > 0:
                record["tokens_per_s"] = float(_to_python(record["tokens"])) / timing.step_time_s

    def _wall_now(self) -> float:
        wall, at = self._wall_origin
        return wall + (self._clock() - at)

    def _flush_metrics(self, before: int | None = None) -> None:
        """Hands read-back steps' records to the driver (rank 0's; every host's are the same)."""
        keep = []
        for record in self._pending:
            if before is not None and record["step"] >= before:
                keep.append(record)
                continue
            if self.process_index != 0:
                continue
            done = {k: _to_python(v) for k, v in record.items()}
            self._progress.record(done)
            if done["step"] > self._carried:
                self._unsaved.append(done)
        self._pending = keep

    def _meta(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "saved_at": time.time(),
            "entry": str(self._spec.entry),
            "config": self.config,
            "seed": self.seed,
            "schedule_steps": self.schedule_steps,
            "topology": {"num_hosts": self.process_count, "num_devices": jax.device_count(),
                         "mesh": dict(self.mesh.shape)},
        }

    def _after_error(self, save_wait_s: float = 0.0) -> None:
        """After the user's function raised: the reported steps whose results are in go to the driver
        as after a return (the steps that led to the error); a step still computing is left, as the
        error may have left the device waiting in a collective for good. A save in flight is waited
        for up to `save_wait_s` (`Tiers.settle`; 0 after a lost peer's error, whose barrier never ends),
        less the time since this host's last step: the other hosts, stalled as long, are judged by it."""
        limit = save_wait_s - self._progress.still_for()  # before the read-back below reports a step
        ready = list(itertools.takewhile(lambda r: self._ready(list(r.values())), self._pending))
        if ready:
            self._read_back(upto=ready[-1]["step"])
            self._flush_metrics(before=ready[-1]["step"] + 1)
        if limit > 0 and self._loop is not None and self._loop.tiers.saving():
            self._progress.enter(Phase.SAVING)  # a save's wait, not a hang
            started = time.perf_counter()
            ended = self._loop.tiers.settle(limit)
            self._progress.event(events.FinalSave(seconds=time.perf_counter() - started, after_error=True,
                                                  ended=ended))

    def _finish(self, returned: Any) -> HostResult:
        """After the user's function returned: the last records, the wait for pending saves."""
        self._fire_armed()
        self._read_back()
        self._flush_metrics()
        self._hand_over_checks()
        if self._loop is not None:
            self._progress.enter(Phase.SAVING)
            started = time.perf_counter()
            self._loop.tiers.finish()
            self._progress.event(events.FinalSave(seconds=time.perf_counter() - started))
        # A stop agreed at the last step ends a run that trained every step: completed, not stopped
        # (the driver would restart a preempted one, or start a resized one, for nothing).
        stopped = self._stopped_at is not None and self._stopped_at < self.steps
        return self._done(Ending.STOPPED if stopped else Ending.COMPLETED,
                          self._loop.last_step if self._loop is not None else None, _json_value(returned))

    def _done(self, ending: Ending, final_step: int | None, returned: Any = None) -> HostResult:
        self._progress.enter(Phase.DONE)
        return HostResult(ending=ending, final_step=final_step, process_index=self.process_index,
                          process_count=self.process_count, num_devices=jax.device_count(),
                          mesh=dict(self.mesh.shape), final_snapshot=self._progress.drain(), returned=returned)


def _wait_for_device(values: list[Any]) -> None:
    jax.block_until_ready([v for v in values if isinstance(v, jax.Array)])


def _to_python(value: Any) -> Any:
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        array = np.asarray(value)
        return array.item() if array.size == 1 else array.tolist()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value) if not isinstance(value, int) else value
    return value


def _json_value(value: Any, seen: frozenset[int] = frozenset()) -> Any:
    """What a function returned, as plain data the driver can write: JAX and NumPy scalars as Python
    numbers (not finite: None, as in metrics.jsonl), mappings and sequences item by item, and anything
    else named in its place (never dropped without a word)."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping | list | tuple):
        if id(value) in seen:
            return "<not plain data: it contains itself>"
        inner = seen | {id(value)}
        if isinstance(value, Mapping):
            return {k if isinstance(k, str | int | float | bool) or k is None else repr(k): _json_value(v, inner)
                    for k, v in value.items()}
        return [_json_value(v, inner) for v in value]
    shape = getattr(value, "shape", None)
    if isinstance(value, jax.Array | np.ndarray | np.generic | numbers.Real) and not shape:
        try:
            number = _to_python(value)
        except Exception:  # noqa: BLE001 - e.g. a scalar other processes hold: named instead
            number = None
        if isinstance(number, bool | int | float):
            return _json_value(number)
    kind = "jax.Array" if isinstance(value, jax.Array) else f"{type(value).__module__}.{type(value).__qualname__}"
    dtype = getattr(value, "dtype", None)
    return f"<not plain data: {kind}{f' {dtype}{list(shape)}' if shape is not None and dtype is not None else ''}>"
