"""Both checkpoint tiers of one host, owned in one place (`Tiers`): host memory
(`jaxlaunch.workers.checkpoints.memory`, part files that node-local keepers hold and replicate) and Orbax in the
run directory (`jaxlaunch.workers.checkpoints.durable`). The owner decides which tier a step saves to (the
cadence every host agrees on, `jaxlaunch.workers.checkpoints.cadence`), saves, restores the newest complete step
of either tier with its fallbacks, and says which saves committed. The commit rule itself is pure, in
`jaxlaunch.contract.tiers`; the give-up persist (`jaxlaunch.workers.checkpoints.persist`) writes what the memory
tier holds through the same rule and the same durable metadata (`durable_meta`).

Restore: the two tiers' committed steps are tried newest first, memory's first at a step both hold
(`tiers.memory_serves`); any reason a memory step cannot serve is an event, and a step of either
tier that does not read back leaves the next newest of either to serve (durable ones are set aside
once a step served), else a fresh state."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
from jaxlaunch.workers import extras
from jaxlaunch.workers.checkpoints.agree import any_host, host_errors
from jaxlaunch.workers.checkpoints.cadence import CommitWatch, Due, SaveCadence, given
from jaxlaunch.workers.checkpoints.durable import Checkpointer, DurableRestore, NoneNewerReadBack
from jaxlaunch.workers.checkpoints.memory import MemoryTier, part_nbytes
from jaxlaunch.workers.state import StateLayout
from jaxlaunch.workers.supervision.progress import HostProgress

from jaxlaunch.contract import events, tiers
from jaxlaunch.contract.event_base import first_line
from jaxlaunch.contract.layout import RunLayout
from jaxlaunch.contract.protocol import CheckpointConfig, HostSpec
from jaxlaunch.contract.schedule import given_durable
from jaxlaunch.contract.storage import short_of_space

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Saved:
    """What one step's save did: the tiers it wrote, how long it blocked the loop in all and per
    tier, and the fields it adds to the step's metrics record."""

    tiers: Due
    blocked_s: float
    memory_s: float | None
    durable_s: float | None
    record: dict[str, Any]


class Tiers:
    """This host's checkpoint tiers for one attempt. Made by `restore_or_init` once the state's
    layout is known: `restore()` once, then per step `due`, `save` (at a due step) and `after`, and
    `finish()` at the end. The memory tier is on when the job asks for it and every node's keeper can
    hold this host's part (a restore reads what they hold either way); a restore after a replica
    mismatch reads only steps of either tier up to the newest verified one."""

    def __init__(self, spec: HostSpec, run: RunLayout, layout: StateLayout, progress: HostProgress, rank: int,
                 num_hosts: int):
        self._spec, self._layout, self._progress, self.rank = spec, layout, progress, rank
        self.checkpointer = Checkpointer(run.checkpoints, spec.checkpoint, spec.expect_checkpoint,
                                         spec.newest_restorable)
        self.checkpointer.checkpoint_bytes = layout.num_bytes()
        short = short_of_space(self.checkpointer.directory, layout.num_bytes(), spec.checkpoint.max_to_keep + 1)
        if rank == 0 and short is not None:
            progress.event(events.LowDiskSpace(**dataclasses.asdict(short)))
        self._keepers = self._start_memory(num_hosts)
        """The memory tier, also when its keepers cannot hold this attempt's parts: they may hold steps
        of earlier attempts past the one restored, which the restore has them drop."""
        self.memory = self._keepers if self._keepers is not None and self._keepers.active else None
        self._cadence: SaveCadence | None = None
        self._commits = CommitWatch(self.memory, self.checkpointer.is_saving, rank)
        self._refusal_told = False

    def _start_memory(self, num_hosts: int) -> MemoryTier | None:
        """The memory tier when the job asks for it: `active` when every keeper can hold its host's part."""
        spec = self._spec
        if not (spec.checkpoint.memory_tier and spec.keepers):
            return None
        memory = MemoryTier(spec.keepers, self.rank, num_hosts, spec.attempt, spec.lost_keepers)
        refused = memory.reserve(part_nbytes(self._layout.targets()))
        if refused is not None:
            log.warning("memory tier off: %s", refused)
            self._progress.event(events.MemoryTierOff(reason=refused, save_every=_durable_given(spec.checkpoint)))
        return memory

    @property
    def memory_on(self) -> bool:
        return self.memory is not None

    # -- restore ---------------------------------------------------------------------------------
    def restore(self) -> TierRestore | None:
        """The newest committed step of either tier, restored into the layout's shardings (None:
        nothing committed). The cadence starts from the step restored, its durable interval counting
        from the durable tier's newest step."""
        # After a replica mismatch only steps whose replicas agreed serve, from either tier: a newer one may
        # hold the corrupt copy.
        # Read also when the keepers cannot hold this attempt's parts (the tier is off for its saves): the
        # steps they hold from earlier attempts are still this run's newest.
        restored = restore_newest(self.checkpointer, self._keepers, self._layout, self._progress,
                                  at_most=self._spec.newest_restorable)
        step = restored.step if restored is not None else 0
        if self._keepers is not None:  # the tier on or not: the steps past `step` are not this run's
            stuck = self._keepers.forget_after(step)
            if stuck is not None:
                # Its held steps past `step` stay, and would be read as this run's: the driver has the keepers
                # drop them before another attempt reads them. Said before the collective below, which a
                # host that died meanwhile would fail.
                log.warning("memory tier off: %s", stuck)
                self._progress.event(events.MemoryTierOff(reason=stuck, kept_after=step,
                                                          save_every=_durable_given(self._spec.checkpoint)))
            if any_host(stuck is not None):  # no memory saves this attempt
                if self.memory is not None:
                    self.memory.close()
                    self.memory = None
                    self._commits = CommitWatch(None, self.checkpointer.is_saving, self.rank)
        self._cadence = SaveCadence(self._spec.checkpoint, self.memory is not None, self.rank, step,
                                    self._progress.event, durable_step=restored.durable_step if restored else None)
        return restored

    # -- save ------------------------------------------------------------------------------------
    @property
    def cadence(self) -> SaveCadence:
        if self._cadence is None:
            raise RuntimeError("Tiers.restore() first: the cadence counts from the step restored")
        return self._cadence

    def due(self, step: int, final: bool) -> Due:
        """The tiers `step` saves to (`final`: the run's last step or an agreed stop: durable)."""
        wanted = self.cadence.due(step, final)
        return Due(wanted.memory and self.memory is not None, wanted.durable)

    def save(self, step: int, tree: Any, meta: dict[str, Any], mine: dict[str, Any], due: Due,
             fault: Callable[[], None] | None = None, checked_s: float = 0.0, split_s: float = 0.0) -> Saved:
        """Saves `tree` (the state's arrays) with `meta` and this host's non-array state `mine` to the
        tiers in `due`; the durable save also carries every host's `mine` (a collective).
        `checked_s`: the save's replica check, made just before (the checksums of the state it saves):
        part of the save's blocking time, so that the cadence keeps check and save together within
        their share of step time (counted to the memory tier when it saves, else to the durable).
        `split_s`: taking `tree` out of the state's objects (`StateLayout.split`), also the save's
        blocking time and counted as the check is, but not in the record's `replica_check_s`."""
        started = time.perf_counter()
        before = checked_s + split_s
        memory_s = durable_s = None
        if due.memory and self.memory is not None:
            self.memory.save(step, tree, meta, mine, fault=fault)
            memory_s = time.perf_counter() - started + before
        if due.durable:
            durable_s = self.checkpointer.save(step, tree, durable_meta(meta, mine))
            durable_s += 0.0 if memory_s is not None else before
        blocked = time.perf_counter() - started + before
        self._commits.started(step, due)
        if self.memory is not None and self.memory.refused and not self._refusal_told:
            self._refusal_told = True
            refused = self.memory.refused_step
            self._progress.event(events.MemorySaveRefused(step=step if refused is None else refused,
                                                          reason=self.memory.refused))
        record: dict[str, Any] = {"checkpoint_blocking_s": blocked, "replica_check_s": checked_s,
                                  "checkpoint_tier": "durable" if due.durable else "memory"}
        if due.memory and self.memory is not None:
            record.update(self.memory.copies_record())
        return Saved(due, blocked, memory_s, durable_s, record)

    def after(self, step: int, saved: Saved | None, final: bool) -> None:
        """Every host, every step, after its save (None: none): the cadence's measurements and, at an
        agreement step, the cadence every host adopts."""
        if saved is None:
            self.cadence.after_save(step, Due(False, False), None, None, final)
        else:
            self.cadence.after_save(step, saved.tiers, saved.memory_s, saved.durable_s, final)

    def step_time(self, seconds: float, step: int | None = None) -> None:
        self.cadence.step_time(seconds, step)

    def saving(self) -> bool:
        """Whether a save is under way: Orbax's in the background, or a memory part's hand-off."""
        return (self.memory is not None and self.memory.handing_off()) or self.checkpointer.is_saving()

    def committed(self) -> list[tuple[str, int]]:
        """(tier, step) of each save that committed since the previous call."""
        return self._commits.done()

    def reached_preemption(self, step: int) -> bool:
        return bool(self.checkpointer.reached_preemption(step))

    def settle(self, limit_s: float) -> bool:
        """After the entry raised, with a save in flight (`saving`): the memory tier's hand-off and
        Orbax's save, waited for up to `limit_s`, so that a save asked for before the error commits
        rather than dies with the process (True: each ended, committed or failed, as its own log says;
        False: one outlasted the limit, and the host goes on without it)."""
        ended = threading.Event()

        def wait() -> None:
            try:
                if self.memory is not None:
                    self.memory.wait()
                self.checkpointer.wait()
            except Exception as err:  # noqa: BLE001 - the error to report is the entry's
                log.warning("the save in flight when the entry raised failed: %s", first_line(err))
            finally:
                ended.set()

        # A thread, so that the wait has a limit: Orbax's has none, and a peer gone stops its barrier.
        threading.Thread(target=wait, name="jaxlaunch-settle-saves", daemon=True).start()
        if not ended.wait(limit_s):
            log.warning("a save in flight when the entry raised did not end within %g s: left", limit_s)
            return False
        self._progress.committed(self._commits.done())
        return True

    def finish(self) -> None:
        """At the end: the memory tier's last hand-off and Orbax's pending save are waited for."""
        if self.memory is not None:
            self.memory.close()
        self.checkpointer.wait()
        self._progress.committed(self._commits.done())
        self.checkpointer.close()


def durable_meta(meta: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """What a durable save carries: rank 0's metadata and every host's own non-array state (a
    collective when there is any)."""
    return {**meta, "extra": extras.gather(mine) if mine else []}


@dataclasses.dataclass
class TierRestore:
    step: int
    state: Any
    meta: dict[str, Any]
    extra: dict[str, Any]
    """This host's non-array state."""
    tier: str
    """"memory" or "durable"."""
    seconds: float
    durable_bytes: int
    """Bytes of the durable step read (0 from memory)."""
    memory_bytes: int
    """Bytes this host fetched from keepers."""
    replicas: list[int]
    """Ranks whose part came from its replica (their own node's keeper was gone)."""
    durable_step: int = 0
    """The durable tier's newest step at or before the one restored (0: none): the durable cadence
    counts from it."""


def restore_newest(checkpointer: Checkpointer, memory: MemoryTier | None, layout: StateLayout,
                   progress: HostProgress, at_most: int | None = None) -> TierRestore | None:
    """The newest committed step of either tier (`at_most`: after a replica mismatch, the newest step
    whose replicas agreed; durable steps past it are set aside, and with no such step a fresh state
    serves), restored. The two tiers' steps are tried newest first, memory's first at a step both
    hold; a step of either tier that does not read back leaves the next one to serve, and is said
    (the durable ones are set aside once a step served)."""
    # After a replica mismatch nothing past the newest verified step serves: such durable steps are set
    # aside whichever tier serves (a later restore would read them), memory's are not read.
    for aside in checkpointer.set_aside_unverified():
        progress.event(events.CheckpointFallback(**aside))
    if memory is None:
        return _durable(checkpointer.restore_latest(layout.targets(), check_structure=layout.mismatch),
                        checkpointer, progress)
    durable_steps = checkpointer.steps_from_rank_0()
    held = memory.held()
    if at_most is not None:
        held = [h for h in held if h.step <= at_most]
    steps = memory.whole_steps(held, at_most)
    if not steps:
        _say_why_not(held, durable_steps, memory, progress)
    unreadable: list[dict[str, Any]] = []
    """Durable steps of this restore that did not read back: set aside once a step serves."""
    untried = durable_steps
    """The durable steps not tried yet (every one newer than the memory step at hand was)."""
    for i, step in enumerate(steps):
        if untried and not tiers.memory_serves(step, untried):
            # Durable is newer; but if none of its newer steps reads back, this memory step beats the older ones.
            try:
                newer = checkpointer.restore_latest(layout.targets(), layout.mismatch, newer_than=step,
                                                    failed_before=unreadable)
            except NoneNewerReadBack as none:
                for aside in none.set_aside:
                    progress.event(events.CheckpointFallback(**aside))
                unreadable += none.failed
                untried = [s for s in untried if s <= step]
            else:
                assert newer is not None  # with newer_than, a step restored or NoneNewerReadBack
                if i == 0:
                    _say_why_not(held, [newer.step], memory, progress)
                return _durable(newer, checkpointer, progress)
        error, got = None, None
        try:
            got = memory.restore(step, held, layout.targets())
        except Exception as err:  # noqa: BLE001 - every host agrees below; another step serves
            error = f"{type(err).__name__}: {err}"[:400]
            log.warning("memory step %d did not read back: %s", step, error)
        errors = host_errors(error)
        failed = sorted(errors)
        durable_below = untried[0] if untried else 0
        if not failed:
            assert got is not None  # no host failed, this one included
            for aside in checkpointer.set_aside_failed(unreadable):
                progress.event(events.CheckpointFallback(**aside))
            for reason in got.passed_over:
                progress.event(events.MemoryCopyPassedOver(step=step, reason=reason))
            return TierRestore(got.step, got.state, got.meta, got.extra, "memory", got.seconds, 0,
                               got.bytes_fetched, [s.rank for s in got.sources if s.role == tiers.Role.REPLICA],
                               durable_step=durable_below)
        del got  # on the hosts that read it: not held on the device while another step is read
        following = steps[i + 1] if i + 1 < len(steps) else None
        then = f"memory step {following}" if following is not None and following >= durable_below else \
            f"durable step {durable_below}" if durable_below else "a fresh state (no durable step)"
        progress.event(events.MemoryFallback(
            step=step, durable_step=durable_below or None,
            reason=f"memory step {step} did not read back on host(s) {failed}: {errors[failed[0]]}; "
                   f"next: {then}"))
    return _durable(checkpointer.restore_latest(layout.targets(), check_structure=layout.mismatch,
                                                failed_before=unreadable), checkpointer, progress)


def _say_why_not(held: list[tiers.Held], durable_steps: list[int], memory: MemoryTier, progress: HostProgress) -> None:
    """The event of why memory does not serve, when there is more to say than that durable is newer."""
    newest_durable = durable_steps[0] if durable_steps else 0
    why = _why_not_whole(held, newest_durable, memory.lost, memory.lost_alive, memory.replaced)
    if why is not None:
        progress.event(events.MemoryFallback(step=None, durable_step=newest_durable or None, reason=why))


def _durable(restored: DurableRestore | None, checkpointer: Checkpointer, progress: HostProgress) -> TierRestore | None:
    if restored is None:
        return None
    for aside in restored.set_aside:
        progress.event(events.CheckpointFallback(**aside))
    mine = extras.of_rank(restored.meta.get("extra"), jax.process_index())
    read = checkpointer.store.size(str(restored.step))
    return TierRestore(restored.step, restored.state, restored.meta, mine, "durable", restored.seconds, read, 0, [],
                       durable_step=restored.step)


def _why_not_whole(held: list[tiers.Held], newest_durable: int, lost: list[str], alive: list[str],
                   replaced: list[str]) -> str | None:
    """Why the keepers hold no step newer than the durable tier's newest, when they held one (or
    keepers were lost): None when memory simply has nothing newer. `alive`: the lost keepers' nodes
    that Ray still lists (their keeper died and did not come back in time; the others went with their nodes)."""
    newer = sorted({h.step for h in held if h.step > newest_durable}, reverse=True)
    gone = len(set(lost) - set(alive))
    said = [f"the keepers of {gone} node(s) are gone with their nodes"] if gone else []
    if alive:
        said.append(f"the keepers of {len(alive)} node(s) that are up did not answer")
    if replaced:
        said.append(f"the keepers of {len(replaced)} node(s) stopped answering and were replaced, empty")
    lost_keepers = f"; {' and '.join(said)}" if said else ""
    durable = f"restoring durable step {newest_durable}" if newest_durable else \
        "starting from a fresh state (no durable step)"
    if newer:
        step = newer[0]
        parts = [h for h in held if h.step == step]
        have = {h.rank for h in parts if h.role == tiers.Role.REPLICA or h.replicated}
        missing = sorted(set(range(max(h.num_hosts for h in parts))) - have)
        return (f"memory step {step} is not whole: no committed copy of rank(s) {missing} is held{lost_keepers}; "
                f"{durable}")
    if lost or replaced:
        newer_than = f" newer than durable step {newest_durable}" if newest_durable else ""
        return f"no step{newer_than} is held in memory{lost_keepers}; {durable}"
    return None


def _durable_given(cfg: CheckpointConfig) -> int | None:
    """The durable interval of an attempt whose memory tier is off: the user's number, if any."""
    return given_durable(False, given(cfg.save_every), given(cfg.persist_every))
