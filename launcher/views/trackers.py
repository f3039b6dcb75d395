"""Experiment trackers (MLflow, Weights & Biases) that follow a run across every restart and --resume.

The driver logs, not the hosts: it already receives every metric record of rank 0 and is the one
process that lives through restarts (a host-side tracker would start again with every attempt,
wherever rank 0 lands, and need the tracker's credentials and network on every node), and it alone
knows why an attempt ended. `Trackers` is a sink of the recorder: it gets the same records that go
to metrics.jsonl and TensorBoard, and the events that go to events.jsonl.

One run of jaxlaunch is one run of each tracker. Its id and the newest step the tracker holds (the
high-water mark) are kept in the run directory (`trackers.json`): every launch continues the same
tracker run, and a step is logged only past the mark, so a step recomputed after a restart never
appears twice (MLflow and W&B cannot delete points). A tracker is configured by its own environment
(MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT, WANDB_MODE, ...).

Each tracker is fed from a thread of its own, so a tracker that is slow or down never holds up the
driver: the first failure is warned about once, records wait in memory, and are sent when it
answers again. Whatever is still unsent when the launch ends is in metrics.jsonl, past the mark:
the next launch of the run sends it first. The trackers' own clients: `tracker_backends`."""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxlaunch.launcher.records.goodput import thrown_away
from jaxlaunch.launcher.records.history import restarts_by_cause
from jaxlaunch.launcher.records.runs import RunDir
from jaxlaunch.launcher.views.tracker_backends import Backend, new_backend

from jaxlaunch.contract import events
from jaxlaunch.contract.event_base import first_line
from jaxlaunch.contract.layout import json_bytes
from jaxlaunch.contract.protocol import ConfigError

log = logging.getLogger(__name__)
TRACKERS = {"mlflow": "mlflow", "wandb": "wandb"}
"""Tracker name -> the package it needs (installed by the extra of the same name)."""
STATE_FILE = "trackers.json"
SEND_INTERVAL_S = 1.0
"""How often a tracker's thread sends what has gathered (one batch per interval)."""
RECORDS_PER_CALL = 100
"""Records per call to a tracker; the mark moves after each, so a failure part way re-sends little."""
RETRY_INTERVAL_S = 5.0
"""How long a tracker that failed is left alone before the next try."""
STALL_WARN_S = 20.0
"""A call to a tracker that has not returned for this long counts as the tracker being down (its
client may retry for minutes before it fails)."""
CLOSE_TIMEOUT_S = 20.0
"""At the end of a launch, how long to wait for the trackers to take the last records."""
INTERRUPTED_CLOSE_TIMEOUT_S = 3.0
"""The same after a second Ctrl-C, which asked to stop at once."""
DOWN_CLOSE_TIMEOUT_S = 3.0
"""The same for a tracker that is down, or has answered no call within FIRST_ANSWER_S of its first
(an MLflow server that is not there: its client retries for minutes): waiting longer sends nothing,
and what it has not taken stays in metrics.jsonl for the next --resume. (With CLOSE_TIMEOUT_S, every
launch beside a tracker that was not there ended 20 s after its job.)"""
FIRST_ANSWER_S = 10.0
"""How long a tracker's first call may take before the end of a launch stops waiting for it (a W&B
run's start online takes several seconds)."""
MAX_PENDING_RECORDS = 100_000
"""Records kept in memory while a tracker is down; past that they are read again from metrics.jsonl
when it answers."""
NOTES_MAX_CHARS = 6000
"""MLflow keeps tags of up to 8000 characters; the notes keep their newest lines within this."""
_STATUS_LINE = {"finished": "finished", "failed": "failed", "stopped": "stopped (resumable)",
                "interrupted": "interrupted"}


def check_trackers(names: Sequence[str]) -> None:
    """ConfigError for a tracker that is unknown or whose package is not installed."""
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"tracking.trackers must be a list of names ({', '.join(TRACKERS)}), got {names!r}")
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--tracker {name!r} is not one of {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"--tracker {name} needs the {TRACKERS[name]} package: pip install \"jaxlaunch[{name}]\"")


def flat_settings(job: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The job's settings as flat "section.name" -> text, the shape trackers' params take."""
    out = {}
    for key, value in job.items():
        if isinstance(value, Mapping) and value:
            out.update(flat_settings(value, f"{prefix}{key}."))
        elif key != "resume":  # a fact of one launch, not of the run
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return out


# ---- what the trackers show of the run's history --------------------------------------------------

def note_line(event: events.Event) -> str | None:
    """One line of the run's notes for an event worth a note (None for the others)."""
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.time or 0))
    match event:
        case events.Launch(resume=resume, num_hosts=num_hosts, steps=steps):
            return f"{at} launch {'resumed' if resume else 'started'} on {num_hosts} hosts, to step {steps}"
        case events.Failure(attempt=attempt, cause=cause, host=host, step=step, message=message):
            first = (message or "").strip().split("\n")[0][:200]
            return (f"{at} attempt {attempt} failed: {cause}, host {host if host is not None else '-'}, step {step}"
                    + (f": {first}" if first else ""))
        case events.Restarting(reason=reason):
            return f"{at} restarting: {reason}"
        case events.Grow(attempt=attempt, from_hosts=from_hosts, to_hosts=to_hosts):
            return f"{at} attempt {attempt}: {from_hosts} -> {to_hosts} hosts"
        case events.JobFailed(reason=reason):
            return f"{at} failed: {reason}"
        case events.JobStopped(reason=reason):
            return f"{at} stopped: {reason}"
    return None


def tags_and_notes(history: Sequence[events.Event], status: str = "running") -> tuple[dict[str, str], str]:
    """(tags, notes) of the run's events: a tag per failure with its cause, host and step, the
    restarts by cause, the status; the notes tell the run's launches, failures and restarts."""
    tags: dict[str, str] = {"jaxlaunch.status": status}
    for e in history:
        if isinstance(e, events.Failure):
            tags[f"jaxlaunch.failure.attempt_{e.attempt}"] = f"cause={e.cause} host={e.host} step={e.step}"
    restarts = restarts_by_cause(history)
    tags["jaxlaunch.restarts"] = str(sum(restarts.values()))
    tags.update({f"jaxlaunch.restarts.{c}": str(n) for c, n in sorted(restarts.items())})
    tags["jaxlaunch.launches"] = str(sum(isinstance(e, events.Launch) for e in history))
    lines = [line for e in history if (line := note_line(e)) is not None]
    notes = "\n".join(lines)
    if len(notes) > NOTES_MAX_CHARS:
        notes = "(earlier lines are in events.jsonl)\n" + notes[-NOTES_MAX_CHARS:].split("\n", 1)[-1]
    return tags, notes


def _told(event: events.Event) -> bool:
    """Whether the trackers' tags or notes read the event: a line of the notes, or a restart counted."""
    return note_line(event) is not None or isinstance(event, events.HostReplacement)


# ---- delivery ------------------------------------------------------------------------------------

class Sender:
    """Feeds one tracker from a thread of its own: a batch every SEND_INTERVAL_S, steps only past the
    high-water mark, the mark saved once the tracker took them; a failure leaves the records pending
    and is tried again RETRY_INTERVAL_S later."""

    def __init__(self, backend: Backend, state: dict[str, Any], run_name: str, params: dict[str, str],
                 save: Callable[[str, dict[str, Any]], None], reread: Callable[[int], list[dict[str, Any]]],
                 warn: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self.backend, self.state, self.run_name, self.params = backend, dict(state), run_name, params
        self.save, self.reread, self.warn, self.clock = save, reread, warn, clock
        self.logged_step: int = self.state.get("logged_step", 0)
        self.pending: dict[int, dict[str, Any]] = {}
        self.rollbacks: dict[int, int] = {}
        """Attempt -> the step it went on from: an earlier attempt's records past it were thrown away."""
        self.overflowed = False
        """Pending records were dropped from memory: read them again from metrics.jsonl."""
        self.annotation: tuple[dict[str, str], str] | None = None
        self.status: str | None = None
        """Set at the end of the launch: finish the tracker's run with it."""
        self.started = self.down = self.warned = self.abandoned = False
        self.busy_since: float | None = None
        self.first_call: float | None = None
        """When (clock) this launch first called the tracker."""
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name=f"tracker-{backend.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.backend.name

    def begin(self) -> None:
        self.thread.start()

    def add(self, records: list[dict[str, Any]]) -> None:
        with self.cond:
            for record in records:
                attempt = record.get("attempt") or 0
                if attempt > max(self.rollbacks, default=0):  # a later attempt went on from the step before its first
                    self._roll_back(attempt, record["step"] - 1)
            for record in records:
                if record["step"] > self.logged_step and not self._thrown_away(record):
                    self.pending[record["step"]] = record  # a recomputed step replaces its unsent first run
            if len(self.pending) > MAX_PENDING_RECORDS:
                self.pending.clear()
                self.overflowed = True

    def roll_back(self, attempt: int, step: int) -> None:
        """Attempt `attempt` went on from `step` (restored it): an earlier attempt's unsent records past
        it were thrown away, and are never sent (those already sent stay: a tracker takes a step once)."""
        with self.cond:
            self._roll_back(attempt, step)

    def _roll_back(self, attempt: int, step: int) -> None:
        self.rollbacks[attempt] = min(step, self.rollbacks.get(attempt, step))
        self.pending = {s: r for s, r in self.pending.items() if not self._thrown_away(r)}

    def _thrown_away(self, record: dict[str, Any]) -> bool:
        """A record of an attempt that a later one rolled back past its step (also one arriving late)."""
        attempt = record.get("attempt") or 0
        return any(later > attempt and record["step"] > step for later, step in self.rollbacks.items())

    def annotate(self, tags: dict[str, str], notes: str) -> None:
        with self.cond:
            self.annotation = (tags, notes)

    def stop(self) -> None:
        """Sends nothing more, finishing no run: the thread ends after the call it is in, if any."""
        with self.cond:
            self.abandoned = True
            self.cond.notify()

    def check_stall(self) -> None:
        since = self.busy_since
        if since is not None and self.clock() - since > STALL_WARN_S:
            self._failed(f"no answer for {STALL_WARN_S:g} s")

    def close(self, status: str, deadline: float) -> int:
        """Finishes the tracker's run, waiting until `deadline` (clock), less for a tracker that is
        down or has not answered its first call (DOWN_CLOSE_TIMEOUT_S, FIRST_ANSWER_S); returns the
        steps left unsent."""
        now = self.clock()
        if self.down:
            deadline = min(deadline, now + DOWN_CLOSE_TIMEOUT_S)
        elif not self.started:  # its first call: under way since `first_call`, or about to be made
            first = self.first_call if self.first_call is not None else now
            deadline = min(deadline, max(now + DOWN_CLOSE_TIMEOUT_S, first + FIRST_ANSWER_S))
        with self.cond:
            self.status = status
            self.cond.notify()
        self.thread.join(max(0.0, deadline - self.clock()))
        if self.thread.is_alive():
            self.abandoned = True
            self._failed("no answer at the end of the launch")
        with self.cond:
            return len(self.pending) if not self.overflowed else len(self.reread(self.logged_step))

    # -- the thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.status is not None or self.abandoned, SEND_INTERVAL_S)
                closing = self.status is not None
                if self.abandoned:
                    return
            try:
                self._deliver()
                if closing:
                    self._call(self.backend.finish, self.status)
                    return
            except Exception as err:  # noqa: BLE001 - a tracker's failure must never reach training
                log.debug("tracker %s failed", self.name, exc_info=True)
                self._failed(first_line(err))
                if closing or self.abandoned:
                    return  # what is unsent stays in metrics.jsonl, past the mark: the next launch sends it
                with self.cond:
                    self.cond.wait_for(lambda: self.status is not None or self.abandoned, RETRY_INTERVAL_S)
            if self.abandoned:
                return

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.busy_since = self.clock()
        if self.first_call is None:
            self.first_call = self.busy_since
        try:
            return fn(*args)
        finally:
            self.busy_since = None

    def _deliver(self) -> None:
        if not self.started:
            run_id = self.state.get("run_id") or self.backend.new_id()
            if run_id is not None and self.state.get("run_id") is None:
                self._save(run_id=run_id)  # before the run exists: a launch killed now reuses the id
            self._save(run_id=self._call(self.backend.start, run_id, self.run_name))
            if not self.state.get("params_logged"):
                self._call(self.backend.log_params, self.params)
                self._save(params_logged=True)
            self.started = True
        with self.cond:
            if self.overflowed:
                self.pending = {r["step"]: r for r in self.reread(self.logged_step)}
                self.overflowed = False
            batch = [self.pending[s] for s in sorted(self.pending)]
            annotation, self.annotation = self.annotation, None
        for i in range(0, len(batch), RECORDS_PER_CALL):
            chunk = batch[i:i + RECORDS_PER_CALL]
            self._call(self.backend.log, chunk)
            with self.cond:
                self.logged_step = max(self.logged_step, chunk[-1]["step"])
                self.pending = {s: r for s, r in self.pending.items() if s > self.logged_step}
            self._save(logged_step=self.logged_step)
        if annotation is not None:
            try:
                self._call(self.backend.annotate, *annotation)
            except Exception:
                with self.cond:
                    self.annotation = self.annotation or annotation
                raise
        if self.down:
            self.down = False
            if self.warned:
                self.warn(f"the {self.name} tracker answers again; it has every step up to {self.logged_step}")

    def _save(self, **changes: Any) -> None:
        self.state.update(changes)
        self.save(self.name, dict(self.state))

    def _failed(self, reason: str) -> None:
        with self.cond:
            first = not self.warned
            self.down = self.warned = True
        if first:
            self.warn(f"the {self.name} tracker is not reachable ({reason}); training goes on, and its records "
                      f"are sent when it answers")


class Trackers:
    """The run's trackers, as a sink of the recorder: `on_records` with the metric records,
    `on_event` with every event written, `close` at the end of the launch."""

    def __init__(self, run: RunDir, names: Sequence[str], settings: Mapping[str, Any], warn: Callable[[str], None],
                 backends: Mapping[str, Backend] | None = None, clock: Callable[[], float] = time.monotonic):
        self.run, self.warn, self.clock = run, warn, clock
        self.lock = threading.Lock()
        self.abandoned = False
        self.state: dict[str, dict[str, Any]] = self._load()
        self.events: list[events.Event] = [e for e in run.events() if _told(e)]
        params = flat_settings(settings)
        self.senders = []
        for name in names:
            backend = backends[name] if backends is not None else new_backend(name, run)
            sender = Sender(backend, self.state.get(name, {}), run.name, params, self._save, self._unsent,
                            warn, clock)
            sender.add(self._unsent(sender.logged_step))  # what an earlier launch did not get to send
            sender.annotate(*tags_and_notes(self.events))
            self.senders.append(sender)
        for sender in self.senders:
            sender.begin()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.run.store.read(STATE_FILE))
        except (FileNotFoundError, ValueError):
            return {}

    def abandon(self) -> None:
        """Another launch holds the run now: this one writes nothing more into it, and its senders
        stop (the other launch sends the run's records from the mark it finds)."""
        self.abandoned = True
        for sender in self.senders:
            sender.stop()

    def _save(self, name: str, entry: dict[str, Any]) -> None:
        with self.lock:
            if self.abandoned:
                return
            self.state[name] = entry
            self.run.store.write(STATE_FILE, json_bytes(self.state))

    def _unsent(self, logged_step: int) -> list[dict[str, Any]]:
        """The run's records past `logged_step`: each step's last computation that is the run's result
        (a step a rollback threw away, and no attempt trained again, is not sent)."""
        records = [r for r in self.run.metric_records() if isinstance(r.get("step"), int)]
        lost = thrown_away(self.run.events(), records)
        last = {r["step"]: r for r, gone in zip(records, lost, strict=True) if not gone and r["step"] > logged_step}
        return [last[s] for s in sorted(last)]

    def on_records(self, records: list[dict[str, Any]]) -> None:
        for sender in self.senders:
            sender.add(records)
            sender.check_stall()

    def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Restored) and event.attempt is not None:
            for sender in self.senders:
                sender.roll_back(event.attempt, event.step)
        if not _told(event):
            return
        self.events.append(event)
        for sender in self.senders:
            sender.annotate(*tags_and_notes(self.events))

    def close(self, status: str, summary: Mapping[str, Any]) -> None:
        tags, notes = tags_and_notes(self.events, status)
        goodput = summary.get("goodput")
        tags.update({"jaxlaunch.final_step": str(summary.get("final_step")),
                     "jaxlaunch.goodput": f"{goodput:.4f}" if goodput is not None else "None"})
        at = time.strftime("%Y-%m-%d %H:%M:%S")
        notes += (f"\n{at} {_STATUS_LINE.get(status, status)} at step {summary.get('final_step')}"
                  + (f", goodput {goodput:.1%}" if goodput is not None else ""))
        deadline = self.clock() + (INTERRUPTED_CLOSE_TIMEOUT_S if status == "interrupted" else CLOSE_TIMEOUT_S)
        for sender in self.senders:
            sender.annotate(tags, notes.strip())
        unsent = {s.name: s.close(status, deadline) for s in self.senders}
        for name, count in unsent.items():
            if count:
                self.warn(f"{count} steps were not sent to {name}; the next --resume of this run sends them")

