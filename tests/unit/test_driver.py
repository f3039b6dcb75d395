"""The driver's state machine, stepped against a fake worker group and a fake clock (no Ray): each
transition, and the records a run leaves."""

import signal

import pytest
from jaxlaunch.launcher.control.driver import Listener
from jaxlaunch.launcher.control.limits import HEAR_OUT_S, NODE_WAIT_S, SECONDARY_GRACE_S, STOP_AGREE_S
from jaxlaunch.launcher.control.persisting import PERSIST_TIMEOUT_S, MemoryPersist
from jaxlaunch.launcher.control.policy import FailureKind, FaultConfig, WatchdogConfig
from jaxlaunch.launcher.control.states import (
    AttemptEndNotice,
    AttemptStartNotice,
    AwaitingCapacity,
    Draining,
    Failed,
    Finished,
    Persisting,
    Relaunching,
    ResolvingFailure,
    Running,
    Scheduling,
    Stopped,
)
from jaxlaunch.launcher.records import history
from jaxlaunch.launcher.records.recorder import Chaos, Recorder
from jaxlaunch.launcher.records.runs import RunDir

from jaxlaunch.contract import events
from jaxlaunch.contract.protocol import Ending, ErrorKind, Injection, NodeLiveness
from tests.unit.fakes import POLL_INTERVAL_S, Clock, FakeGroup, dies_at, make_driver, obeys, trains_to


def run_until(driver, state_type, limit=10_000):
    for _ in range(limit):
        if isinstance(driver.state, state_type):
            return driver.state
        driver.step()
    raise AssertionError(f"never reached {state_type.__name__}; at {driver.state}")


class Transitions(Listener):
    def __init__(self):
        self.seen = []
        self.notices = []

    def on_transition(self, driver, old, new):
        self.seen.append(type(new).__name__)

    def on_attempt_started(self, driver, started):
        self.notices.append(started)

    def on_attempt_ended(self, driver, ended):
        self.notices.append(ended)


def test_a_clean_run_finishes():
    watcher = Transitions()
    driver, log, _, _ = make_driver([trains_to(5)], listeners=[watcher])
    assert driver.run() == 0
    assert isinstance(driver.state, Finished)
    assert log == [("start", 1, 2), ("shutdown", 1)]
    assert watcher.seen == ["Running", "Finished"]
    assert driver.attempts[0].first_step == 1 and driver.attempts[0].last_step == 5


def test_a_crash_restarts_the_whole_group_and_backs_off_when_it_repeats():
    driver, log, clock, _ = make_driver([dies_at(3), dies_at(2), trains_to(5, start=2)])
    restarting = run_until(driver, Relaunching)
    assert restarting.failure.kind == FailureKind.CRASHED and restarting.failure.rank == 1
    assert log[-1] == ("shutdown", 1), "the whole group is torn down before deciding"
    before = clock.now
    assert isinstance(driver.step(), Scheduling)
    assert clock.now == before, "the first restart is immediate"
    driver.step()
    run_until(driver, Relaunching)
    before = clock.now
    driver.step()
    assert clock.now - before == pytest.approx(1.0), "the second one backs off"
    assert driver.run() == 0
    assert [a.cause for a in driver.attempts] == ["crashed", "crashed", "finished"]
    assert driver.attempts[2].recovery_time_s is not None


def memory_commit_at(step: int, behaviour):
    """`behaviour`, with every host reporting a memory-tier save of `step` committed at that step."""
    def reporting(group, i):
        if i == step:
            for host in group.hosts:
                host.heard_committed((("memory", step),))
        return behaviour(group, i)
    return reporting


def test_a_crash_after_the_attempt_committed_memory_steps_restarts_at_once():
    """With the memory tier, durable saves may be minutes apart: an attempt whose hosts committed a
    memory step newer than it started from progressed, so its failure is no crash loop (before, the
    durable listing alone decided, and a chaos soak's restarts backed off up to 30 s)."""
    driver, _, clock, _ = make_driver([memory_commit_at(2, dies_at(3)), memory_commit_at(4, dies_at(5)),
                                       trains_to(6, start=4)])
    run_until(driver, Relaunching)
    driver.step()
    run_until(driver, Running)
    restarting = run_until(driver, Relaunching)
    assert restarting.failure.progressed and restarting.decision.backoff_s == 0.0
    before = clock.now
    driver.step()
    assert clock.now == before, "no backoff after progress in memory"
    assert driver.run() == 0


def test_a_crash_after_the_attempt_committed_new_steps_restarts_at_once():
    """Failures are a crash loop only while no new step is committed between them: here the second
    attempt committed step 4 before dying, so its restart does not back off."""
    committed = {"step": None}
    driver, _, clock, _ = make_driver([dies_at(3), dies_at(5), trains_to(6, start=4)],
                                      committed=lambda: committed["step"])
    run_until(driver, Relaunching)
    driver.step()
    run_until(driver, Running)
    committed["step"] = 4  # the second attempt saves step 4, then dies
    restarting = run_until(driver, Relaunching)
    assert restarting.failure.progressed and restarting.decision.backoff_s == 0.0
    before = clock.now
    driver.step()
    assert clock.now == before, "no backoff after progress"
    assert driver.run() == 0


def test_budget_spent_fails_with_every_attempt_ended():
    driver, _, _, _ = make_driver([dies_at(2) for _ in range(3)])
    assert driver.run() == 1
    assert isinstance(driver.state, Failed) and "budget spent" in driver.state.reason
    assert [a.cause for a in driver.attempts] == ["crashed"] * 3


def with_memory(driver, log, clock, cluster, behaviour, newest, durable):
    """The driver of a memory-tier job whose memory holds `newest` (step, hosts); `durable` is a
    one-item list, the newest durable step, which the persist group's `behaviour` may move."""
    driver.committed_step = lambda: durable[0]
    driver.persist = MemoryPersist(newest=lambda: newest, make_group=lambda: FakeGroup(clock, behaviour, log, cluster),
                                   step_bytes=lambda step: 1000 + step)
    seen = Transitions()
    driver.listeners.append(seen)
    return seen


def test_a_job_that_gives_up_with_a_newer_memory_step_persists_it_as_its_own_state_then_fails():
    durable = [3]

    def writes(group, i):
        durable[0] = 5
        group.finish(5, Ending.STOPPED)

    driver, log, clock, cluster = make_driver([dies_at(2) for _ in range(3)])
    seen = with_memory(driver, log, clock, cluster, writes, (5, 2), durable)
    assert driver.run() == 1
    assert seen.seen[-2:] == ["Persisting", "Failed"]
    assert log[-3:] == [("shutdown", 3), ("start", 3, 2), ("shutdown", 3)], "after the failed group, its own group"
    failed = driver.state
    assert failed.failure.kind == FailureKind.CRASHED and failed.reason.startswith("restart budget")
    done = failed.persisted
    assert (done.step, done.durable_step, done.num_hosts, done.persisted, done.bytes) == (5, 3, 2, True, 1005)
    assert failed.reason.endswith(done.message) and "memory step 5 written to durable storage" in done.message


def test_the_persist_is_recorded_as_its_own_events_between_the_failure_and_the_jobs_end(tmp_path):
    run = RunDir(tmp_path)
    run.create()
    recorder = Recorder(run, lambda n: {"data": n})
    durable = [3]

    def writes(group, i):
        durable[0] = 5
        group.finish(5, Ending.STOPPED)

    driver, log, clock, cluster = make_driver([dies_at(2)], fault=FaultConfig(max_restarts=0), listeners=[recorder])
    with_memory(driver, log, clock, cluster, writes, (5, 2), durable)
    assert driver.run() == 1
    recorder.close()
    kinds = [e.kind for e in run.events()]
    assert kinds[kinds.index("failure"):] == ["failure", "attempt_ended", "persisting_memory", "memory_persisted",
                                              "job_failed"], kinds
    started, done = [e for e in run.events() if e.kind in ("persisting_memory", "memory_persisted")]
    assert (started.attempt, started.step, started.durable_step, started.num_hosts) == (1, 5, 3, 2)
    assert done.persisted and done.bytes == 1005 and done.seconds > 0


def test_a_persist_whose_newest_memory_step_did_not_read_back_records_the_older_step_it_wrote():
    """Memory's newest step 6 failed its check on the persist's hosts, which wrote step 5 instead (the
    host program's own fallback): the job's end names step 5 as persisted, and step 6 with why it was not."""
    durable = [3]
    why = "memory step 6 did not read back on host(s) [1]: RuntimeError: no copy is intact; writing memory step 5"

    def writes_older(group, i):
        if i == 1:
            group.events.append((0, events.MemoryFallback(step=6, durable_step=3, reason=why)))
            return
        durable[0] = 5
        group.finish(5, Ending.STOPPED)

    driver, log, clock, cluster = make_driver([dies_at(2) for _ in range(3)])
    with_memory(driver, log, clock, cluster, writes_older, (6, 2), durable)
    assert driver.run() == 1
    done = driver.state.persisted
    assert (done.step, done.newest_step, done.persisted, done.bytes, done.passed_over) == (5, 6, True, 1005, [why])
    assert "memory step 5 written to durable storage" in done.message
    assert done.message.endswith("(the newest durable step was 3; memory step 6 did not read back)")

    durable[0] = 3
    driver, log, clock, cluster = make_driver([dies_at(2) for _ in range(3)])
    nothing = why.replace("writing memory step 5", "no older memory step newer than durable step 3 to write")
    with_memory(driver, log, clock, cluster, lambda group, i: (
        group.events.append((0, events.MemoryFallback(step=6, durable_step=3, reason=nothing))) if i == 1
        else group.finish(None, Ending.STOPPED)), (6, 2), durable)
    assert driver.run() == 1
    done = driver.state.persisted
    assert (done.step, done.persisted, done.reason) == (6, False, nothing), "the hosts' own account"


def test_a_job_that_gives_up_with_nothing_newer_in_memory_fails_at_once():
    driver, log, clock, cluster = make_driver([dies_at(2) for _ in range(3)])
    seen = with_memory(driver, log, clock, cluster, trains_to(1), (3, 2), [3])
    assert driver.run() == 1
    assert "Persisting" not in seen.seen and driver.state.persisted is None
    assert [entry for entry in log if entry[0] == "start"] == [("start", n, 2) for n in (1, 2, 3)]


def test_a_persist_that_fails_leaves_the_original_failure_the_jobs_reason():
    def dies(group, i):
        group.die(0)

    driver, log, clock, cluster = make_driver([dies_at(2) for _ in range(3)])
    with_memory(driver, log, clock, cluster, dies, (5, 2), [3])
    assert driver.run() == 1
    failed = driver.state
    assert failed.failure.kind == FailureKind.CRASHED and failed.reason.startswith("restart budget")
    assert not failed.persisted.persisted and failed.persisted.reason == "host 0 ended: worker died"
    assert log[-1] == ("shutdown", 3) and cluster.held == 0


def test_a_persist_whose_hosts_end_without_the_step_committed_says_so():
    driver, log, clock, cluster = make_driver([dies_at(2) for _ in range(3)])
    with_memory(driver, log, clock, cluster, lambda group, i: group.finish(5, Ending.STOPPED), (5, 2), [3])
    assert driver.run() == 1
    assert driver.state.persisted.reason == "the hosts ended without a committed save of step 5"


def test_a_persist_interrupted_after_its_step_was_committed_is_recorded_as_written():
    """The hosts committed step 5 durably and are still closing (their shutdown barrier) when a signal
    comes: step 5 is persisted, and said so; a resume restores it."""
    durable = [3]

    def commits(group, i):
        durable[0] = 5  # committed; the hosts have not returned yet

    driver, log, clock, cluster = make_driver([dies_at(2) for _ in range(3)])
    with_memory(driver, log, clock, cluster, commits, (5, 2), durable)
    run_until(driver, Persisting)
    driver.step()  # its hosts start
    driver.step()  # step 5 committed
    driver.request_stop(signal.SIGINT)
    driver.step()
    persisted = driver.state.persisted
    assert (persisted.persisted, persisted.step, persisted.reason) == (True, 5, None), persisted
    assert "memory step 5 written to durable storage" in driver.state.reason, driver.state.reason


def test_a_persist_that_runs_out_of_time_is_ended():
    driver, log, clock, cluster = make_driver([dies_at(2) for _ in range(3)])
    with_memory(driver, log, clock, cluster, lambda group, i: None, (5, 2), [3])
    assert driver.run() == 1
    assert driver.state.persisted.reason == f"not written within {PERSIST_TIMEOUT_S:g} s"
    assert log[-1] == ("shutdown", 3) and cluster.held == 0


def test_a_stop_while_persisting_ends_it_cleanly_and_the_job_fails_for_its_own_reason():
    driver, log, clock, cluster = make_driver([dies_at(2) for _ in range(3)])
    with_memory(driver, log, clock, cluster, lambda group, i: None, (5, 2), [3])
    run_until(driver, Persisting)
    driver.step()  # its hosts start
    assert cluster.held == 2
    driver.request_stop(signal.SIGINT)
    driver.step()
    assert isinstance(driver.state, Failed) and driver.state.reason.startswith("restart budget")
    assert driver.state.persisted.reason == "interrupted by SIGINT"
    assert log[-1] == ("shutdown", 3) and cluster.held == 0, "its processes are stopped"


def test_a_give_up_that_comes_after_a_stop_was_asked_still_persists_the_memory_step():
    """Ctrl-C once; while the hosts drain for it, the last restart's host dies and the job gives up:
    the memory step is written all the same (the stop asked for a save, and a restart would have
    persisted it). Only a signal that comes during the persist ends it."""
    durable = [3]

    def writes(group, i):
        durable[0] = 5
        group.finish(5, Ending.STOPPED)

    driver, log, clock, cluster = make_driver([dies_at(2) for _ in range(3)])
    with_memory(driver, log, clock, cluster, writes, (5, 2), durable)
    for _ in range(10_000):
        if len(driver.attempts) == 3 and isinstance(driver.state, Running):
            break
        driver.step()
    driver.request_stop(signal.SIGINT)
    assert driver.run() == 1
    failed = driver.state
    assert isinstance(failed, Failed) and failed.reason.startswith("restart budget"), failed
    assert failed.persisted.persisted and failed.persisted.step == 5, failed.persisted


def test_a_persist_with_no_room_for_a_host_fails_with_the_reason():
    def dies_and_the_room_goes(group, i):
        group.cluster.capacity = 0  # the room went to another job
        return dies_at(2)(group, i)

    driver, log, clock, cluster = make_driver([dies_at(2), dies_at(2), dies_and_the_room_goes])
    with_memory(driver, log, clock, cluster, lambda group, i: None, (5, 2), [3])
    assert driver.run() == 1
    assert driver.state.persisted.reason == "the cluster has no room for a host"


def test_deterministic_exception_stops_early():
    def raises(group, i):
        if i < 3:
            return group.train(i)
        group.raise_(1, step=2)
        return []
    driver, _, _, _ = make_driver([raises, raises], fault=FaultConfig(max_restarts=10))
    assert driver.run() == 1
    assert "deterministic" in driver.state.reason and len(driver.attempts) == 2


def test_a_user_exception_that_says_timed_out_is_a_root_cause_not_a_collective_error():
    def raises(group, i):
        if i < 2:
            return group.train(i)
        group.raise_(0, message="RuntimeError: reading my data timed out (UNAVAILABLE)", step=1)
        return []
    driver, _, clock, _ = make_driver([raises, trains_to(3)])
    seen = run_until(driver, ResolvingFailure).since
    restarting = run_until(driver, Relaunching)
    assert clock.now - seen <= HEAR_OUT_S + 0.5, "only a brief hearing-out, not the collective errors' grace"
    assert restarting.failure.kind == FailureKind.EXCEPTION and restarting.failure.rank == 0


def test_a_hung_host_is_found_by_the_watchdog_and_its_stacks_are_taken():
    def hangs(group, i):
        if i <= 2:
            return group.train(i)
        group.silent.add(1)  # host 1 stopped; host 0 answers but makes no progress
        return []
    driver, log, _, _ = make_driver([hangs, trains_to(4, start=2)], watchdog=WatchdogConfig(hang_timeout_s=5.0))
    restarting = run_until(driver, Relaunching)
    f = restarting.failure
    assert (f.kind, f.rank) == (FailureKind.HUNG, 1), "the silent one"
    assert f.detected_at - f.failed_at >= 5.0
    assert ("dump_stacks", 1) in log and "user.py:1" in f.traceback
    assert driver.run() == 0


def test_a_long_save_is_not_a_hang():
    from jaxlaunch.contract.protocol import Phase

    def saves_slowly(group, i):
        if i == 1:
            return group.train(1)
        if i < 200:  # 50 s in the final save: longer than the hang limit, shorter than the save limit
            for h in group.hosts:
                h.phase, h.last_heard = Phase.SAVING, group.clock()
            return []
        group.finish(1)
        return []
    driver, _, _, _ = make_driver([saves_slowly], watchdog=WatchdogConfig(hang_timeout_s=5.0, save_timeout_s=120))
    assert driver.run() == 0


def test_a_collective_error_is_blamed_on_the_host_that_died():
    def both(group, i):
        if i == 1:
            return group.train(1)
        if i == 2:  # the survivor's collective fails first ...
            group.raise_(0, kind=ErrorKind.COLLECTIVE, message="JaxRuntimeError: Gloo AllGather failed", step=1)
        if i == 4:  # ... and the dead host is reported a moment later
            group.die(1, step=1)
        return []
    driver, _, _, _ = make_driver([both, trains_to(2, start=1)])
    restarting = run_until(driver, Relaunching)
    assert (restarting.failure.kind, restarting.failure.rank) == (FailureKind.CRASHED, 1)


def test_a_lost_node_is_found_even_before_ray_reports_its_host():
    """gloo aborts the survivors when a peer's node vanishes; Ray reports those deaths first. Before
    blaming one of them, the driver asks which hosts' nodes are gone."""
    def node_vanishes(group, i):
        if i < 3:
            return group.train(i)
        if i == 3:
            group.lost = [1]
            group.die(0, step=2)  # aborted by gloo: a process death on a live node
        return []
    driver, _, _, _ = make_driver([node_vanishes, trains_to(3, start=2)],
                                  fault=FaultConfig(max_restarts=0, max_preemptions=1))
    restarting = run_until(driver, Relaunching)
    assert (restarting.failure.kind, restarting.failure.rank) == (FailureKind.NODE_LOST, 1)
    assert driver.run() == 0


def test_a_process_death_waits_for_its_nodes_health_then_counts_as_a_lost_node():
    def node_goes(group, i):
        if i < 3:
            return group.train(i)
        if i == 3:
            group.die(1, node=NodeLiveness.UNKNOWN, step=2)  # Ray: "its worker process has died"
        if i == 8:
            group.die(1, node=NodeLiveness.DEAD, step=2)  # ... then declares the node dead
        return []
    driver, _, _, _ = make_driver([node_goes, trains_to(3, start=2)],
                                  fault=FaultConfig(max_restarts=0, max_preemptions=1))
    restarting = run_until(driver, Relaunching)
    assert restarting.failure.kind == FailureKind.NODE_LOST, "spends the preemption budget, not the restart one"
    assert driver.run() == 0


def test_stop_signal_saves_on_every_host_then_stops():
    driver, log, _, _ = make_driver([obeys])
    driver.step()
    driver.step()
    driver.request_stop(signal.SIGTERM)
    draining = run_until(driver, Draining)
    assert draining.reason == "stop"
    assert driver.run() == 128 + signal.SIGTERM
    assert ("confirm_stop", draining.proposed) in log and isinstance(driver.state, Stopped)
    assert f"after saving step {draining.proposed}" in driver.state.reason


def test_a_stop_during_a_long_back_off_ends_it_at_once():
    """A crash loop backs off up to 30 s; a Ctrl-C then must not wait it out (a signal handler that
    only sets a flag does not end Python's sleep, so the driver looks for the stop as it waits)."""
    class StopsDuringSleep(Clock):
        def sleep(self, seconds):
            super().sleep(seconds)
            if self.now >= stop_at and driver.stop_signal is None:
                driver.request_stop(signal.SIGINT)

    stop_at = float("inf")
    clock = StopsDuringSleep()
    driver, _, _, _ = make_driver([dies_at(3), dies_at(2), dies_at(2)], clock=clock,
                                  fault=FaultConfig(max_restarts=5, backoff_s=20, max_backoff_s=30))
    run_until(driver, Relaunching)
    driver.step()
    restarting = run_until(driver, Relaunching)
    assert restarting.decision.backoff_s == 20.0, "the second failure in a row backs off"
    stop_at = clock.now + 1.0
    before = clock.now
    assert driver.run() == 128 + signal.SIGINT
    assert clock.now - before <= 1.0 + 0.1 + 1e-9, "the stop ended the back-off within a tenth of a second"
    assert "during a restart's back-off" in driver.state.reason and len(driver.attempts) == 2


def test_a_failure_while_a_stop_is_asked_ends_the_job_and_never_says_it_restarts():
    """A Ctrl-C while a host is failing (its exception, or its wait for a save before reporting it):
    the job stops; before, the driver first entered a restart, and the terminal and events.jsonl said
    "restarting in 0.0 s" for a restart that never came."""
    watcher = Transitions()
    driver, _, _, _ = make_driver([dies_at(3)], listeners=[watcher], fault=FaultConfig(max_restarts=5))
    run_until(driver, Running)
    driver.request_stop(signal.SIGINT)
    assert driver.run() == 128 + signal.SIGINT
    assert "Relaunching" not in watcher.seen, watcher.seen
    assert "after a failure" in driver.state.reason and len(driver.attempts) == 1


def test_stop_before_training_stops_at_once():
    def starting(group, i):
        return []
    driver, _, _, _ = make_driver([starting])
    driver.step()
    driver.request_stop(signal.SIGINT)
    assert driver.run() == 128 + signal.SIGINT
    assert "before training began" in driver.state.reason


def test_a_stop_before_training_began_first_writes_memory_s_newer_step_durably(tmp_path):
    """Ctrl-C while a restarted attempt starts (no step trained, so no save at one step): the keepers
    end with the launch, and the memory steps past the newest durable one with them; `--resume` then
    trained from step 1. The stop first writes memory's newest step durably, and says so."""
    run = RunDir(tmp_path)
    run.create()
    recorder = Recorder(run, lambda n: {"data": n})
    durable = [None]

    def writes(group, i):
        durable[0] = 90
        group.finish(90, Ending.STOPPED)

    def starting(group, i):
        return []

    driver, log, clock, cluster = make_driver([starting], listeners=[recorder])
    seen = with_memory(driver, log, clock, cluster, writes, (90, 2), durable)
    driver.step()
    driver.request_stop(signal.SIGINT)
    assert driver.run() == 128 + signal.SIGINT
    recorder.close()
    assert seen.seen[-2:] == ["Persisting", "Stopped"]
    stopped = driver.state
    assert stopped.reason.startswith("stopped by SIGINT before training began") and stopped.persisted.persisted
    assert (stopped.persisted.step, stopped.persisted.durable_step) == (90, None)
    kinds = [e.kind for e in run.events()]
    assert kinds[-3:] == ["persisting_memory", "memory_persisted", "job_stopped"], kinds


def test_the_signal_that_stopped_the_job_does_not_interrupt_its_persist():
    """A stop's persist runs under the stop that asked for it; the runner turns a second signal into
    an immediate stop (KeyboardInterrupt), as for any stop."""
    def starting(group, i):
        return []

    driver, log, clock, cluster = make_driver([starting])
    with_memory(driver, log, clock, cluster, lambda group, i: None, (90, 2), [80])
    driver.step()
    driver.request_stop(signal.SIGTERM)
    run_until(driver, Persisting)
    driver.step()  # its hosts start
    driver.step()
    assert isinstance(driver.state, Persisting) and cluster.held == 2


def test_preemption_notice_from_outside_restarts_on_the_preemption_budget():
    def preempted(group, i):
        if i == 3:
            group.finish(3, Ending.STOPPED)
            return []
        return group.train(i)
    driver, _, _, _ = make_driver([preempted, trains_to(4, start=3)],
                                  fault=FaultConfig(max_restarts=0, max_preemptions=1))
    assert driver.run() == 0
    assert [f.kind for f in driver.failures] == [FailureKind.PREEMPTED]


def test_restart_shrinks_to_what_fits_and_grows_back():
    driver, log, clock, cluster = make_driver(
        [dies_at(2), obeys, trains_to(50)], hosts=4, min_hosts=2, max_hosts=4,
        fault=FaultConfig(max_restarts=2, grow_check_interval_s=1.0))
    run_until(driver, Relaunching)
    cluster.capacity = 3  # a node was lost: 3 hosts do not fit, 2 do
    driver.step()
    running = run_until(driver, Running)
    assert running.attempt.num_hosts == 2
    cluster.capacity = 4  # the node is back
    draining = run_until(driver, Draining)
    assert (draining.reason, draining.target_hosts) == ("resize", 4)
    assert driver.run() == 0
    assert [(a.num_hosts, a.cause) for a in driver.attempts] == [(4, "crashed"), (2, "resize"), (4, "finished")]
    assert [f.kind for f in driver.failures] == [FailureKind.CRASHED], "growing is not a failure"
    recovered = [a.recovery_time_s for a in driver.attempts]
    assert recovered[0] is None and recovered[1] is not None and recovered[2] is None, \
        "the growth is planned: no recovery time, let alone one from the crash before it"


def test_waits_for_capacity_then_gives_up():
    driver, _, clock, cluster = make_driver([dies_at(2)], fault=FaultConfig(capacity_timeout_s=10.0))
    run_until(driver, Relaunching)
    cluster.capacity = 0
    assert isinstance(run_until(driver, AwaitingCapacity), AwaitingCapacity)
    assert driver.run() == 1
    assert "room for 0 hosts" in driver.state.reason


def test_a_job_that_gives_up_waiting_for_capacity_persists_its_memory_step_on_hosts_its_mesh_fits():
    """4 hosts, at least 4; a node is lost and 3 fit for the whole capacity timeout: the job gives up,
    but first writes memory step 5 (newer than durable 3) durably, on 2 hosts: the 3 placeable ones
    would not divide its mesh."""
    durable = [3]

    def writes(group, i):
        durable[0] = 5
        group.finish(5, Ending.STOPPED)

    driver, log, clock, cluster = make_driver([dies_at(2)], hosts=4, fault=FaultConfig(capacity_timeout_s=10.0))
    driver.committed_step = lambda: durable[0]
    driver.persist = MemoryPersist(newest=lambda: (5, 4), make_group=lambda: FakeGroup(clock, writes, log, cluster),
                                   step_bytes=lambda step: 1000 + step, fits=lambda n: n % 2 == 0)
    run_until(driver, Relaunching)
    cluster.capacity = 3
    assert driver.run() == 1
    failed = driver.state
    assert "room for 3 hosts" in failed.reason
    done = failed.persisted
    assert (done.step, done.num_hosts, done.persisted) == (5, 2, True), done
    assert log[-2:] == [("start", 1, 2), ("shutdown", 1)], log[-3:]


def test_an_embedded_node_that_dies_while_the_job_waits_for_capacity_is_started_again():
    """Waiting for room on the embedded instance, its node dies: the driver starts a new instance at
    once rather than wait out the capacity timeout on a dead one."""
    driver, _, _, cluster = make_driver([dies_at(2), trains_to(5, start=2)],
                                        fault=FaultConfig(capacity_timeout_s=600.0))
    run_until(driver, Relaunching)
    cluster.capacity = 0
    run_until(driver, AwaitingCapacity)
    cluster.is_alive = False
    driver.step()
    driver.step()
    assert cluster.restarts == 1 and cluster.is_alive


def test_a_placement_that_times_out_shrinks_the_job_and_counts_toward_the_capacity_timeout():
    def never_placed(group, i):
        return []
    never_placed.placement_fails = True
    driver, log, _, _ = make_driver([never_placed, trains_to(3)], hosts=4, min_hosts=2)
    driver.step()
    assert isinstance(driver.state, Scheduling) and driver.state.at_most == 3
    assert driver.state.waiting_since is not None
    assert driver.run() == 0
    assert [a.num_hosts for a in driver.attempts] == [2], "3 hosts do not fit the mesh; 2 do"


def test_storage_failure_stops_at_once_and_spends_no_budget():
    def disk_full(group, i):
        if i < 3:
            return group.train(i)
        group.raise_(0, kind=ErrorKind.STORAGE, message="StorageError: the filesystem is full", step=2)
        return []
    driver, _, _, _ = make_driver([disk_full], fault=FaultConfig(max_restarts=100))
    assert driver.run() == 1
    assert isinstance(driver.state, Failed) and "the filesystem is full" in driver.state.reason
    assert len(driver.attempts) == 1


def test_an_embedded_node_that_dies_is_restarted_on_the_preemption_budget():
    def node_dies(group, i):
        if i == 3:
            cluster.is_alive = False
        return group.train(i)
    driver, _, _, cluster = make_driver([node_dies, trains_to(5, start=2)],
                                        fault=FaultConfig(max_restarts=0, max_preemptions=1))
    assert driver.run() == 0
    assert [f.kind for f in driver.failures] == [FailureKind.NODE_LOST] and cluster.restarts == 1


def test_an_embedded_node_that_dies_while_a_host_s_death_is_resolved_is_a_lost_node():
    """Its hosts die with it, and the driver sees their ends first: once the node is dead, no question
    about them is answered by its Ray, so the node's death decides."""
    def node_dies(group, i):
        if i == 3:
            cluster.is_alive = False
            group.die(1, step=i)
            return []
        return group.train(i)
    driver, _, _, cluster = make_driver([node_dies, trains_to(5, start=2)],
                                        fault=FaultConfig(max_restarts=0, max_preemptions=1))
    run_until(driver, ResolvingFailure)
    assert driver.run() == 0
    assert [f.kind for f in driver.failures] == [FailureKind.NODE_LOST] and cluster.restarts == 1


def test_an_injection_is_spent_once_it_went_off_whatever_the_driver_saw_of_the_steps():
    kill = Injection("kill", step=3, host=1)
    watcher = Transitions()
    driver, _, _, _ = make_driver([dies_at(2), trains_to(5, start=2)], injections=[kill], listeners=[watcher],
                                  fired=lambda attempt: [(kill, 1000.5)] if attempt == 1 else [])
    driver.run()
    started = [n for n in watcher.notices if isinstance(n, AttemptStartNotice)]
    assert [n.injections for n in started] == [(kill,), ()]
    assert driver.failures[0].failed_at == 1000.5, "detection is timed from the moment it went off"


def test_an_injection_that_never_went_off_is_named_with_why_when_the_launch_ends():
    """A fault drill that did not happen is no fault survived: the launch ends naming each injection
    with firings left, and what each attempt that carried it did instead."""
    kill, twice = Injection("kill", step=2, host=1), Injection("exception", step=2, host=1, times=2)
    late, absent = Injection("kill", step=9, host=0), Injection("kill", step=4, host=3)
    handoff, skipped = Injection("kill_in_handoff", step=4, host=0), Injection("crash", step=2, host=0)

    def restores_from_memory(group, i):  # a memory step newer than the durable one the driver knew
        if i == 1:
            group.restored(2)
        return trains_to(5, start=2)(group, i)
    driver, _, _, _ = make_driver([dies_at(2), restores_from_memory], injections=[kill, twice, late, absent, handoff,
                                                                                 skipped],
                                  fired=lambda attempt: [(kill, 1000.5), (twice, 1000.5)] if attempt == 1 else [])
    assert driver.run() == 0
    spans = {a.number: (a.first_step, a.last_step) for a in driver.attempts}
    assert spans == {1: (1, 1), 2: (3, 5)}
    assert str(twice) == "exception@step=2,host=1,times=2", "as the user wrote it"
    assert dict(driver.faults.not_fired(spans)) == {
        twice: "it went off 1 of 2 times; attempt 2 began at step 3, past it",
        late: "attempt 1 ended at step 1, before it; attempt 2 ended at step 5, before it",
        absent: "no attempt trained step 4 with a host 3 (each began past that step, or had fewer hosts)",
        handoff: "attempt 1 ended at step 1, before it; attempt 2 made no memory hand-off at step 4 on host 0",
        skipped: "attempt 1 ended at step 1, before it; attempt 2 began at step 3, past it",
    }


def test_chaos_kills_a_random_training_host_and_detection_is_timed_from_the_kill():
    kills = []

    def dies_when_killed(group, i):
        if group.killed is not None:
            group.die(group.killed, step=i)
            return []
        return group.train(i)
    chaos = Chaos(0.5, seed=0, record=kills.append)
    driver, _, _, _ = make_driver([dies_when_killed, trains_to(3)], listeners=[chaos])
    assert driver.run() == 0
    assert len(driver.failures) == 1 and driver.failures[0].rank == kills[0].host
    assert driver.failures[0].failed_at == driver.faults.fired_at(1) is not None


def test_the_records_of_a_run_are_derived_from_its_events(tmp_path):
    run = RunDir(tmp_path)
    run.create()
    run.event(events.Launch())
    recorder = Recorder(run, lambda n: {"data": n})

    def restores(group, i):
        if i == 1:
            group.restored(2)
        return trains_to(5, start=2)(group, i)
    driver, _, _, _ = make_driver([dies_at(3), restores], listeners=[recorder])
    assert driver.run() == 0
    run.event(events.JobEnded(status=events.JobStatus.FINISHED))
    recorder.close()
    past = history.load_history(run)
    assert [(a.num_hosts, a.cause, a.failed_host, a.restored_step) for a in past.attempts] == [
        (2, "crashed", 1, None), (2, "finished", None, 2)]
    kinds = [e.kind for e in past.events]
    assert kinds.count("attempt_started") == 2 and kinds.count("failure") == 1 and "restarting" in kinds
    assert sorted(past.trajectory) == [1, 2, 3, 4, 5]
    summary = past.summary(run)
    assert summary["restarts_by_cause"] == {"crashed": 1} and summary["final_step"] == 5


def test_a_rolled_back_branch_is_no_part_of_the_run_s_result_and_the_true_branch_s_records_are_kept(tmp_path):
    """Attempt 1 trains to step 20 and dies; attempt 2 restores step 10, trains to 15 (the driver hears
    11-13; its rank 0 dies before 14-15 are handed over) and dies; attempt 3 restores 15, whose save
    carried attempt 2's records, and the job ends there. The run's result is attempt 2's branch: its
    records of 14-15 are written although attempt 1 recorded those steps, and attempt 1's 11-20 are
    thrown-away work, not the final step and loss, nor productive time."""
    run, clock = RunDir(tmp_path), Clock()
    run.create()
    run.event(events.Launch(time=clock()))
    recorder = Recorder(run, lambda n: {"data": n}, wall_clock=clock)

    first_records = []

    def first(group, i):
        if i <= 20:
            first_records.extend(group.train(i, loss=100.0 + i))
            return first_records[-1:]
        group.die(1, step=20)
        return []

    saved = []

    def second(group, i):
        if i == 1:
            group.restored(10)
        if i <= 5:
            records = group.train(10 + i, loss=200.0 + 10 + i)
            saved.extend(records)  # step 15's save carries the records since the last save
            return records if i <= 3 else []  # 14-15: rank 0 died before handing them over
        group.die(0, step=15)
        return []

    def third(group, i):
        if i == 1:
            carried = tuple(first_records[5:10] + saved)  # steps 6-10 of attempt 1, 11-15 of attempt 2
            group.events.append((0, events.Restored(time=group.clock(), step=15, seconds=0.1, records=carried)))
            return []
        group.finish(15)
        return []

    driver, _, _, _ = make_driver([first, second, third], listeners=[recorder], clock=clock)
    assert driver.run() == 0
    run.event(events.JobEnded(status=events.JobStatus.FINISHED, time=clock()))
    recorder.close()
    past = history.load_history(run)
    assert sorted(past.trajectory) == list(range(1, 16)), "steps 16-20 were rolled back and never trained again"
    assert {s: past.trajectory[s]["attempt"] for s in range(11, 16)} == dict.fromkeys(range(11, 16), 2)
    assert [past.trajectory[s]["loss"] for s in (10, 14, 15)] == [110.0, 214.0, 215.0]
    summary = past.summary(run)
    assert (summary["final_step"], summary["final_loss"]) == (15, 215.0)
    thrown = sorted((r["attempt"], r["step"]) for r in past.recomputed)
    assert thrown == [(1, s) for s in range(11, 21)], "attempt 1's steps past the rollback, and nothing else"
    assert past.productive_s == pytest.approx(15 * POLL_INTERVAL_S), "each step of the result once"


def test_listeners_are_told_when_each_attempt_starts_and_how_it_ended():
    watcher = Transitions()
    driver, _, _, _ = make_driver([dies_at(3), trains_to(5, start=2)], listeners=[watcher])
    assert driver.run() == 0
    first, failed, second, finished = watcher.notices
    assert isinstance(first, AttemptStartNotice) and isinstance(second, AttemptStartNotice)
    assert isinstance(failed, AttemptEndNotice) and (failed.cause, failed.failure.kind, failed.failure.rank) == (
        "crashed", FailureKind.CRASHED, 1)
    assert isinstance(finished, AttemptEndNotice) and (finished.cause, finished.failure) == ("finished", None)
    assert [n.attempt.number for n in watcher.notices] == [1, 1, 2, 2]


def test_a_host_blamed_as_hung_through_a_peers_failure_has_its_stacks_taken_before_the_teardown():
    """Host 1 stops answering; 6.5 s later host 0's collective fails, before the watchdog's 10 s: the
    driver blames host 1 as hung, and reads its stacks while the group still exists."""
    def deadlock(group, i):
        if i <= 2:
            return group.train(i)
        group.silent.add(1)
        if i == 2 + 26:  # 6.5 s of polls later
            group.raise_(0, kind=ErrorKind.COLLECTIVE, message="JaxRuntimeError: Gloo AllGather timed out", step=2)
        return []
    driver, log, _, _ = make_driver([deadlock, trains_to(4, start=2)], watchdog=WatchdogConfig(hang_timeout_s=10.0))
    failure = run_until(driver, Relaunching).failure
    assert (failure.kind, failure.rank) == (FailureKind.HUNG, 1) and "before host 0 failed" in failure.message
    assert "user.py:1" in failure.traceback
    assert log.index(("dump_stacks", 1)) < log.index(("shutdown", 1)), "read before the group is torn down"


@pytest.mark.parametrize("declared_dead_after_s", [15.0, None])
def test_a_host_gone_silent_with_its_node_is_a_lost_node_not_a_hang(declared_dead_after_s):
    """Host 1's node powers off: the host and its raylet go silent; 10 s later host 0's collective fails
    (JAX's heartbeat). Ray declares the node dead after its health checks (here 15 s), or never
    answers for it: either way the node was lost (the preemption budget, no wait for stacks the node
    cannot send), not a hang of host 1 (before: hung, at 18 s, after a 20 s wait for its stacks)."""
    def powered_off(group, i):
        if i <= 2:
            return group.train(i)
        group.silent.add(1)
        group.unsure.add(1)
        silent_s = (i - 2) * POLL_INTERVAL_S
        if silent_s == 10.0:
            group.raise_(0, kind=ErrorKind.COLLECTIVE, message="JaxRuntimeError: Gloo AllGather timed out", step=2)
        if declared_dead_after_s is not None and silent_s >= declared_dead_after_s:
            group.lost.append(1)
        return []
    driver, log, _, _ = make_driver([powered_off, trains_to(4, start=2)],
                                    fault=FaultConfig(max_restarts=0, max_preemptions=1),
                                    watchdog=WatchdogConfig(hang_timeout_s=60.0))
    failure = run_until(driver, Relaunching).failure
    assert (failure.kind, failure.rank) == (FailureKind.NODE_LOST, 1), failure
    assert ("dump_stacks", 1) not in log
    silent_for = failure.detected_at - failure.failed_at
    # Decided once the peers' errors were heard out, and Ray said the node is dead or 30 s of silence passed.
    assert silent_for == pytest.approx(max(declared_dead_after_s or NODE_WAIT_S, 10.0 + SECONDARY_GRACE_S), abs=0.5)
    assert driver.run() == 0


def test_the_embedded_node_dying_while_a_group_starts_is_a_lost_node_and_said():
    """The embedded instance's node died under a starting group: the preemption budget, and a
    failure that says so (before: a crash of no host, and a silent restart of Ray at the next schedule)."""
    def starting(group, i):
        return []
    starting.node_dies_at_start = True
    driver, _, _, cluster = make_driver([starting, trains_to(3)], fault=FaultConfig(max_restarts=0, max_preemptions=1))
    failure = run_until(driver, Relaunching).failure
    assert (failure.kind, failure.message) == (FailureKind.NODE_LOST, "the embedded Ray node died")
    assert driver.run() == 0 and cluster.restarts == 1


def ahead_by(rank, steps):
    """A host whose loop runs `steps` past the step it last reported (polls are late)."""
    def behaviour(group, i):
        group.ahead[rank] = steps
        return obeys(group, i)
    return behaviour


def test_a_stop_step_that_a_host_had_passed_is_moved_until_every_host_accepts_one():
    driver, log, _, _ = make_driver([ahead_by(1, 5)])
    driver.step()
    driver.step()
    driver.request_stop(signal.SIGINT)
    assert driver.run() == 128 + signal.SIGINT
    proposals = [entry[1] for entry in log if entry[0] == "propose_stop"]
    confirmed = [entry[1] for entry in log if entry[0] == "confirm_stop"]
    assert len(proposals) >= 2 and proposals == sorted(proposals), "a later step after a refusal"
    assert confirmed == [proposals[-1]], "only the step every host accepted is made final"
    assert driver.attempts[0].last_step == confirmed[0], "every host stopped exactly there"
    assert f"after saving step {confirmed[0]}" in driver.state.reason


def test_a_resize_agrees_on_a_step_and_restarts_from_it():
    driver, log, _, cluster = make_driver([obeys, trains_to(30, start=12)], hosts=4, placeable=2, min_hosts=2,
                                          max_hosts=4, fault=FaultConfig(grow_check_interval_s=1.0))
    run_until(driver, Running)
    for _ in range(3):
        driver.step()
    cluster.capacity = 4
    draining = run_until(driver, Draining)
    assert draining.reason == "resize" and draining.confirmed
    assert driver.run() == 0
    assert [(a.num_hosts, a.cause) for a in driver.attempts] == [(2, "resize"), (4, "finished")]
    assert driver.attempts[0].last_step == draining.proposed
    assert not driver.failures


def test_a_stop_that_a_host_does_not_obey_is_resolved_not_forgotten():
    def ignores_stops(group, i):
        return group.train(i)  # its loop never calls ctx.should_stop
    driver, _, _, _ = make_driver([ignores_stops])
    driver.step()
    driver.step()
    driver.request_stop(signal.SIGTERM)
    assert driver.run() == 128 + signal.SIGTERM
    assert "went past step" in driver.state.reason and "latest committed step" in driver.state.reason


def test_a_stop_the_hosts_cannot_agree_on_is_resolved_in_bounded_time():
    def never_answers(group, i):
        if i <= 2:
            return group.train(i)
        group.silent.update({0, 1})  # neither stopped nor answering, but not yet past the hang limit
        return []
    driver, _, clock, _ = make_driver([never_answers], watchdog=WatchdogConfig(hang_timeout_s=1e9))
    driver.step()
    driver.step()
    driver.step()
    driver.request_stop(signal.SIGINT)
    began = clock.now
    assert driver.run() == 128 + signal.SIGINT
    assert "did not agree" in driver.state.reason and clock.now - began <= STOP_AGREE_S + 1


def test_hosts_that_outrun_the_polls_agree_on_a_stop_in_the_round_it_was_asked():
    """Fast steps put a host a poll's worth of steps past what it reported: the next proposal comes
    from the hosts' answers at once, not a poll later, when they would have run on again."""
    driver, log, _, _ = make_driver([ahead_by(1, 25)])
    driver.step()
    driver.step()
    driver.request_stop(signal.SIGINT)
    draining = driver.step()
    assert isinstance(draining, Draining) and draining.confirmed, "agreed in the round the stop was asked"
    proposals = [entry[1] for entry in log if entry[0] == "propose_stop"]
    # The first, 2 past the step polled, is refused by host 1 (25 further on); the second is 4 past its answer.
    assert proposals == [proposals[0], proposals[0] - 2 + 25 + 4], "past the answer, not past the poll"
    assert driver.run() == 128 + signal.SIGINT


def test_what_the_function_returned_is_rank_0_s_whichever_host_ended_first(tmp_path):
    import dataclasses

    run = RunDir(tmp_path)
    run.create()
    recorder = Recorder(run, lambda n: {"data": n})

    def ends_rank_1_first(group, i):
        if i < 3:
            return group.train(i + 1)
        group.finish(3)
        group.results = {r: dataclasses.replace(group.results[r], returned={"rank": r}) for r in (1, 0)}
        return []

    driver, _, _, _ = make_driver([ends_rank_1_first], listeners=[recorder])
    assert driver.run() == 0
    recorder.close()
    [ended] = [e for e in run.events() if isinstance(e, events.AttemptEnded)]
    assert ended.returned == {"rank": 0}
