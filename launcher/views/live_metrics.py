"""The run as it goes: Prometheus text at http://HOST:PORT/metrics while the job runs (--metrics-port),
and the run's goodput in TensorBoard, beside its training curves.

`LiveMetrics` is a listener of the driver: the step, the hosts and each step's timings come from the
polls; goodput, its badput split and the restarts by cause are derived from the run's records so far
by `jaxlaunch.launcher.records.history`, the same numbers the report shows at the end. The endpoint is
prometheus-client's own HTTP server on a registry of this launch alone."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from jaxlaunch.launcher.control.driver import Driver, Listener
from jaxlaunch.launcher.control.states import Attempt, AttemptStartNotice, Draining, ResolvingFailure, Running, State
from jaxlaunch.launcher.records import history
from jaxlaunch.launcher.records.history import restarts_by_cause
from jaxlaunch.launcher.records.recorder import summary_writer
from jaxlaunch.launcher.records.runs import RunDir

from jaxlaunch.contract.protocol import ConfigError, GroupPoll

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

GOODPUT_REFRESH_S = 5.0
"""How often goodput is derived again from the records while the job runs (it reads them all)..."""
MAX_REFRESH_SHARE = 0.05
"""...or less often, so that deriving it takes at most this share of the driver's time (0.6 s for
100,000 records)."""
METRICS_ADDR = "0.0.0.0"
"""The endpoint listens on every interface, for a Prometheus server on another machine."""
_ACTIVE = (Running, Draining, ResolvingFailure)


class Exporter:
    """The Prometheus endpoint: prometheus-client's HTTP server on a private registry."""

    def __init__(self, port: int, addr: str = METRICS_ADDR):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = registry = CollectorRegistry()
        self.step = Gauge("jaxlaunch_step", "Newest step the hosts reported", registry=registry)
        self.last_committed_step = Gauge("jaxlaunch_last_committed_step", "Newest committed checkpoint's step",
                                         registry=registry)
        self.hosts = Gauge("jaxlaunch_hosts", "Hosts training now (0 between attempts)", registry=registry)
        self.attempt = Gauge("jaxlaunch_attempt", "Number of the current attempt, across launches of the run",
                             registry=registry)
        self.goodput_ratio = Gauge("jaxlaunch_goodput_ratio", "Productive share of the run's wall time so far",
                                   registry=registry)
        self.productive_seconds = Gauge("jaxlaunch_productive_seconds", "Seconds of steps the run kept",
                                        registry=registry)
        self.badput_seconds = Gauge("jaxlaunch_badput_seconds", "Seconds of the run's wall time lost, by kind "
                                    "(the report's split)", ["kind"], registry=registry)
        self.restarts = Counter("jaxlaunch_restarts", "Restarts of the group by cause", ["cause"], registry=registry)
        self.step_time_seconds = Gauge("jaxlaunch_step_time_seconds", "Time of the newest step",
                                       registry=registry)
        self.checkpoint_blocking_seconds = Gauge("jaxlaunch_checkpoint_blocking_seconds",
                                                 "Time the newest checkpoint save blocked training",
                                                 registry=registry)
        self.host_busy_seconds = Gauge("jaxlaunch_host_busy_seconds", "Each host's own work in its newest timed "
                                       "step (between a step's readback and the next dispatch)", ["host"],
                                       registry=registry)
        self._restarts_counted: dict[str, int] = {}
        try:
            self.server, self.thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as err:
            raise ConfigError(f"--metrics-port {port}: {err.strerror or err}; choose a free port") from None
        self.port = self.server.server_port

    def count_restarts(self, restarts: Mapping[str, int]) -> None:
        for cause, count in restarts.items():
            counted = self._restarts_counted.get(cause, 0)
            if count > counted:
                self.restarts.labels(cause=cause).inc(count - counted)
                self._restarts_counted[cause] = count

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class LiveMetrics(Listener):
    """A listener of the driver that keeps the endpoint (if any) and TensorBoard's goodput current."""

    def __init__(self, run: RunDir, committed: Callable[[], int | None], exporter: Exporter | None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        self.run, self.committed, self.exporter = run, committed, exporter
        self.clock, self.wall_clock = clock, wall_clock
        self.refreshed_at: float | None = None
        self.refresh_every_s = GOODPUT_REFRESH_S
        self.high_step = max((r["step"] for r in run.metric_records() if isinstance(r.get("step"), int)), default=0)
        """The newest step the run ever reached: TensorBoard's goodput is drawn against it, which
        never goes back, so a recomputed step does not fold the curve."""
        self.written_step = self.high_step
        self.writer: SummaryWriter | None = None
        self.tensorboard_off = False

    # -- the driver's listener ------------------------------------------------------------------------
    def on_poll(self, driver: Driver, attempt: Attempt, poll: GroupPoll) -> None:
        if self.exporter is not None:
            self.exporter.hosts.set(attempt.num_hosts)
            self.exporter.attempt.set(attempt.number)
            if attempt.last_step is not None:
                self.exporter.step.set(attempt.last_step)
            for record in poll.records:
                if isinstance(record.get("step_time_s"), int | float):
                    self.exporter.step_time_seconds.set(record["step_time_s"])
                if isinstance(record.get("checkpoint_blocking_s"), int | float):
                    self.exporter.checkpoint_blocking_seconds.set(record["checkpoint_blocking_s"])
            for rank, timed in poll.busy.items():
                if timed:
                    self.exporter.host_busy_seconds.labels(host=str(rank)).set(timed[-1][1])
        if attempt.last_step is not None:
            self.high_step = max(self.high_step, attempt.last_step)
        if self.refreshed_at is None or self.clock() - self.refreshed_at >= self.refresh_every_s:
            self.refresh()

    def on_attempt_started(self, driver: Driver, started: AttemptStartNotice) -> None:
        if self.exporter is not None:  # a host of an earlier attempt (more hosts before a shrink) is gone
            self.exporter.host_busy_seconds.clear()

    def on_transition(self, driver: Driver, old: State, new: State) -> None:
        if self.exporter is not None:
            self.exporter.hosts.set(new.attempt.num_hosts if isinstance(new, _ACTIVE) else 0)
        self.refresh()  # an attempt that ends or starts changes the split and the restarts at once

    # -- deriving ----------------------------------------------------------------------------------
    def refresh(self, final: bool = False) -> None:
        started = time.perf_counter()
        past = history.load_history(self.run, until=None if final else self.wall_clock())
        cost = time.perf_counter() - started
        self.refresh_every_s = max(GOODPUT_REFRESH_S, cost / MAX_REFRESH_SHARE)
        self.refreshed_at = self.clock()
        if self.exporter is not None:
            committed = self.committed()
            if committed is not None:
                self.exporter.last_committed_step.set(committed)
            if past.goodput is not None:
                self.exporter.goodput_ratio.set(past.goodput)
            self.exporter.productive_seconds.set(past.productive_s)
            for kind, seconds in past.badput_s.items():
                self.exporter.badput_seconds.labels(kind=kind).set(seconds)
            self.exporter.count_restarts(restarts_by_cause(past.events))
        if past.goodput is not None and (self.high_step > self.written_step or final):
            self._tensorboard(past.goodput, past.badput_s)

    def _tensorboard(self, goodput: float, badput: dict[str, float]) -> None:
        if self.writer is None:
            if self.tensorboard_off:
                return
            # A run of its own: the training curves' writer purges steps on a restart, and its
            # purge would take these points with it.
            self.writer = summary_writer(f"{self.run.tensorboard_dir}/goodput", flush_secs=10)
            if self.writer is None:
                self.tensorboard_off = True
                return
        self.writer.add_scalar("goodput/ratio", goodput, self.high_step)
        for kind, seconds in badput.items():
            self.writer.add_scalar(f"badput_seconds/{kind}", seconds, self.high_step)
        self.written_step = self.high_step

    def abandon(self) -> None:
        """Another launch holds the run now: no final numbers; TensorBoard's file closed now."""
        self.tensorboard_off = True
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> None:
        """The final numbers (from the finished records), then TensorBoard's file closed."""
        try:
            self.refresh(final=True)
        finally:
            if self.writer is not None:
                self.writer.close()
