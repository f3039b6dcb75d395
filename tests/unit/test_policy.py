"""The pure decisions: what a host's ending is, whom to blame, whether to restart, on how many hosts,
and whether a host hangs."""

import jax
import pytest
from jaxlaunch.launcher.control.policy import (
    Action,
    Diagnosis,
    FailureKind,
    FaultConfig,
    RestartPolicy,
    ScalingPolicy,
    Watchdog,
    WatchdogConfig,
    blame,
    classify,
    keep_listening,
    primary_failure,
)
from jaxlaunch.workers.runtime import error_kind

from jaxlaunch.contract.protocol import ErrorKind, ExitHow, HostError, HostExit, HostStatus, NodeLiveness, Phase

NODE_WAIT_S = 30.0


def failure(kind=FailureKind.CRASHED, step=10, message="boom", rank=0, at=0.0, secondary=False):
    return Diagnosis(kind, rank, message, step, at, secondary=secondary)


def raised(kind: ErrorKind, message="ValueError: bad", rank=1, step=7) -> HostExit:
    error = HostError(rank, step, kind, message.split(":")[0], message.split(": ", 1)[-1], f"Traceback\n{message}")
    return HostExit(rank, ExitHow.RAISED, 5.0, step, error=error)


# ---- classification -------------------------------------------------------------------------------

def test_a_user_exception_is_a_primary_exception_with_its_step_and_traceback():
    f = classify(raised(ErrorKind.USER), now=5.0, node_wait_s=NODE_WAIT_S)
    assert (f.kind, f.rank, f.step, f.secondary) == (FailureKind.EXCEPTION, 1, 7, False)
    assert f.message == "ValueError: bad" and "rank 1" in f.traceback and "after step 7" in f.traceback


def test_a_collective_error_is_secondary():
    f = classify(raised(ErrorKind.COLLECTIVE, "JaxRuntimeError: UNKNOWN: Gloo AllGather failed"), 5.0, NODE_WAIT_S)
    assert f.kind == FailureKind.EXCEPTION and f.secondary


def test_storage_and_unreadable_checkpoints_are_fatal():
    assert classify(raised(ErrorKind.STORAGE), 5.0, NODE_WAIT_S).kind.is_fatal
    assert classify(raised(ErrorKind.NO_CHECKPOINT), 5.0, NODE_WAIT_S).kind.is_fatal
    assert not classify(raised(ErrorKind.TRANSIENT), 5.0, NODE_WAIT_S).kind.is_fatal


def test_a_dead_process_on_a_live_node_crashed():
    exit = HostExit(0, ExitHow.PROCESS_DIED, 5.0, 3, "worker died", node=NodeLiveness.ALIVE)
    assert classify(exit, 5.0, NODE_WAIT_S).kind == FailureKind.CRASHED


def test_a_lost_node_is_blamed_over_the_crash_it_caused_on_a_survivor():
    """gloo aborts a survivor whose peer vanished: Ray reports that death first, the node after."""
    survivor = classify(HostExit(0, ExitHow.PROCESS_DIED, 5.0, 3, "died", node=NodeLiveness.ALIVE), 5.0, NODE_WAIT_S)
    lost = classify(HostExit(1, ExitHow.UNREACHABLE, 5.4, 3, "socket closed", node=NodeLiveness.DEAD), 5.4,
                    NODE_WAIT_S)
    assert primary_failure([survivor, lost]) is lost


def test_a_death_followed_by_its_nodes_death_is_a_lost_node_not_a_crash():
    """Ray may report "its worker process has died" before it declares the node dead."""
    exit = HostExit(0, ExitHow.PROCESS_DIED, 5.0, 3, "the actor is dead because its worker process has died")
    assert classify(exit, 6.0, NODE_WAIT_S) is None, "the node's health is not known yet: wait"
    later = HostExit(0, ExitHow.PROCESS_DIED, 5.0, 3, exit.detail, node=NodeLiveness.DEAD)
    assert classify(later, 12.0, NODE_WAIT_S).kind == FailureKind.NODE_LOST
    assert classify(exit, 5.0 + NODE_WAIT_S + 1, NODE_WAIT_S).kind == FailureKind.NODE_LOST, \
        "a node that stays silent is lost"


def test_ray_s_own_word_on_the_node():
    died = HostExit(0, ExitHow.NODE_DIED, 5.0, 3, "because its node has died")
    assert classify(died, 5.0, NODE_WAIT_S).kind == FailureKind.NODE_LOST
    preempted = HostExit(0, ExitHow.NODE_PREEMPTED, 5.0, 3, "drained")
    assert classify(preempted, 5.0, NODE_WAIT_S).kind == FailureKind.PREEMPTED


def test_a_user_exception_that_mentions_timeouts_is_not_a_collective_error():
    assert error_kind(RuntimeError("the data loader timed out: UNAVAILABLE, connection reset")) == ErrorKind.USER
    assert error_kind(TimeoutError("deadline_exceeded")) == ErrorKind.USER


def test_jax_runtime_errors_from_a_lost_peer_are_collective():
    gloo = jax.errors.JaxRuntimeError("UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer")
    assert error_kind(gloo) == ErrorKind.COLLECTIVE
    barrier = jax.errors.JaxRuntimeError("DEADLINE_EXCEEDED: Barrier timed out")
    assert error_kind(barrier) == ErrorKind.COLLECTIVE
    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 GB")
    assert error_kind(oom) == ErrorKind.USER, "a host's own runtime error is its own"


# ---- blame -----------------------------------------------------------------------------------------

def test_primary_failure_prefers_a_root_cause_over_collective_errors():
    collective = failure(FailureKind.EXCEPTION, rank=0, at=1.0, secondary=True)
    dead = failure(FailureKind.CRASHED, rank=1, at=2.0)
    assert primary_failure([collective, dead]) is dead
    user = failure(FailureKind.EXCEPTION, rank=0, at=3.0, message="ValueError: timed out")
    assert primary_failure([collective, user]) is user


def test_keep_listening_long_for_collective_errors_briefly_for_a_root_cause():
    collective = failure(FailureKind.EXCEPTION, at=1.0, secondary=True)
    assert keep_listening([collective], num_ended=1, num_hosts=2, now=2.0, grace_s=8.0, hear_out_s=1.0)
    assert not keep_listening([collective], 2, 2, now=2.0, grace_s=8.0, hear_out_s=1.0), "everyone reported"
    assert not keep_listening([collective], 1, 2, now=9.5, grace_s=8.0, hear_out_s=1.0), "grace over"
    crash = failure(at=1.5)
    assert keep_listening([collective, crash], 1, 2, now=1.8, grace_s=8.0, hear_out_s=1.0), "hear the group out"
    assert not keep_listening([collective, crash], 1, 2, now=2.6, grace_s=8.0, hear_out_s=1.0)


def test_blame_falls_on_a_host_that_went_silent_before_the_others_failed():
    hosts = [HostStatus(0, last_heard=99.0), HostStatus(1, last_heard=90.0)]
    collective = failure(FailureKind.EXCEPTION, rank=0, at=99.0, secondary=True)
    blamed = blame([collective], hosts, now=100.0, silent_after_s=3.0)
    assert (blamed.kind, blamed.rank) == (FailureKind.HUNG, 1)
    hosts[1].last_heard = 99.5
    assert blame([collective], hosts, now=100.0, silent_after_s=3.0) is collective


def test_a_host_quiet_only_since_the_root_cause_or_one_that_returned_is_never_blamed_as_hung():
    # Host 1's node was lost at t=90; the driver decides at t=120 (after the node wait). Host 0 stopped
    # answering at t=91, after the loss and because of it: the lost node is the cause.
    lost = Diagnosis(FailureKind.NODE_LOST, 1, "the host's node is gone", 10, detected_at=120.0, failed_at=90.0)
    hosts = [HostStatus(0, last_heard=91.0), HostStatus(1, last_heard=89.5)]
    assert blame([lost], hosts, now=120.0, silent_after_s=2.0) is lost
    # Host 0 returned at t=100 (its last word); host 1 raised at t=103.
    crash = failure(FailureKind.EXCEPTION, rank=1, at=103.0, message="ValueError: bad")
    hosts = [HostStatus(0, last_heard=100.0), HostStatus(1, last_heard=103.0)]
    assert blame([crash], hosts, now=104.0, silent_after_s=2.0, returned={0}) is crash
    # Host 0 returned; host 1 is stuck in its final save past the limit: host 1 is the hung one.
    dog = Watchdog(WatchdogConfig(hang_timeout_s=5, save_timeout_s=50))
    done = HostStatus(0, Phase.TRAINING, step=9, last_heard=100, last_progress=100)
    saving = HostStatus(1, Phase.SAVING, step=9, last_heard=700, last_progress=100)
    host, limit = dog.hung([done, saving], now=701, silent_after_s=2, returned={0})
    assert (host.rank, limit) == (1, 50)


# ---- restarts --------------------------------------------------------------------------------------

def test_restart_within_budget_then_stop():
    policy = RestartPolicy(FaultConfig(max_restarts=2, backoff_s=1, max_backoff_s=30))
    history = [failure(step=1)]
    assert policy.decide(history).action == Action.RESTART
    history.append(failure(step=2))
    assert policy.decide(history).action == Action.RESTART
    history.append(failure(step=3))
    decision = policy.decide(history)
    assert decision.action == Action.STOP and "budget spent" in decision.reason


def test_preemptions_spend_their_own_budget():
    policy = RestartPolicy(FaultConfig(max_restarts=0, max_preemptions=2))
    history = [failure(FailureKind.PREEMPTED), failure(FailureKind.NODE_LOST)]
    assert policy.decide(history).action == Action.RESTART
    history.append(failure(FailureKind.CRASHED))
    assert policy.decide(history).action == Action.STOP  # the crash budget is 0


def test_fatal_failures_stop_at_once_whatever_the_budget():
    policy = RestartPolicy(FaultConfig(max_restarts=100))
    decision = policy.decide([failure(FailureKind.STORAGE, message="the filesystem is full")])
    assert decision.action == Action.STOP and decision.reason == "the filesystem is full"


def test_a_failure_after_new_committed_progress_restarts_at_once():
    """A crash loop (no new checkpoint between failures) backs off; a failure of an attempt that
    committed new steps starts a new count, so failures hours apart never wait."""
    policy = RestartPolicy(FaultConfig(max_restarts=10, backoff_s=1, max_backoff_s=30))
    history = []
    backoffs = []
    for progressed in (True, False, False, True, False, True, True):
        history.append(Diagnosis(FailureKind.CRASHED, 1, "died", progressed=progressed))
        backoffs.append(policy.decide(history).backoff_s)
    assert backoffs == [0.0, 1.0, 2.0, 0.0, 1.0, 0.0, 0.0]


def test_backoff_doubles_and_is_capped():
    policy = RestartPolicy(FaultConfig(max_restarts=10, backoff_s=1, max_backoff_s=5))
    history, backoffs = [], []
    for i in range(5):
        history.append(failure(step=i))
        backoffs.append(policy.decide(history).backoff_s)
    assert backoffs == [0.0, 1.0, 2.0, 4.0, 5.0]


def test_same_exception_at_same_step_twice_is_deterministic():
    policy = RestartPolicy(FaultConfig(max_restarts=10))
    exc = dict(kind=FailureKind.EXCEPTION, message="ValueError: bad batch", step=42)
    history = [failure(**exc), failure(**exc)]
    decision = policy.decide(history)
    assert decision.action == Action.STOP and "deterministic" in decision.reason
    assert policy.decide([failure(**exc), failure(**{**exc, "step": 43})]).action == Action.RESTART


def test_transient_failures_are_retried_even_when_they_repeat():
    policy = RestartPolicy(FaultConfig(max_restarts=10))
    same = dict(kind=FailureKind.TRANSIENT, message="TimeoutError: storage", step=5)
    assert policy.decide([failure(**same), failure(**same)]).action == Action.RESTART


def early(rank, message="ModuleNotFoundError: No module named 'helpers_typo'", phase=Phase.INITIALIZING, at=1.0):
    """An exception a host raised before its first step, as classified from its HostError."""
    error = HostError(rank, None, ErrorKind.USER, message.split(":")[0], message.split(": ", 1)[-1],
                      f"Traceback\n{message}", phase)
    return classify(HostExit(rank, ExitHow.RAISED, at, None, error=error), now=at, node_wait_s=NODE_WAIT_S)


def test_an_exception_every_host_raises_before_its_first_step_stops_at_once_without_spending_budget():
    hosts = [HostStatus(0, last_heard=1.0), HostStatus(1, last_heard=1.0)]
    failures = [early(1, at=1.0), early(0, at=1.2)]
    blamed = blame(failures, hosts, now=1.3, silent_after_s=3.0)
    assert blamed.on_every_host and blamed.rank == 0, "the first host's traceback is shown"
    decision = RestartPolicy(FaultConfig(max_restarts=5)).decide([blamed])
    assert decision.action == Action.STOP
    assert decision.reason.startswith("entry error: every host raised ModuleNotFoundError before its first step")
    assert "fix: make that module importable where the hosts run" in decision.reason


@pytest.mark.parametrize(("message", "phase", "fix"), [
    ("LaunchInsideHostError: jaxlaunch.launch was called inside host 0", Phase.INITIALIZING, "if __name__ =="),
    ("ValueError: Incompatible shapes for broadcasting", Phase.RESTORING, "check init()"),
    ("TypeError: dot_general requires contracting dimensions to have the same shape", Phase.COMPILING,
     "check the first step"),
])
def test_an_entry_error_names_its_likely_fix(message, phase, fix):
    hosts = [HostStatus(0), HostStatus(1)]
    blamed = blame([early(0, message, phase), early(1, message, phase)], hosts, now=1.0, silent_after_s=3.0)
    assert fix in RestartPolicy(FaultConfig()).decide([blamed]).reason


def test_an_exception_on_one_host_or_after_the_first_step_is_retried():
    hosts = [HostStatus(0, last_heard=1.0), HostStatus(1, last_heard=1.0)]
    one = blame([early(1)], hosts, now=1.0, silent_after_s=3.0)
    assert not one.on_every_host and RestartPolicy(FaultConfig()).decide([one]).action == Action.RESTART
    training = [early(0, phase=Phase.TRAINING), early(1, phase=Phase.TRAINING)]
    assert not blame(training, hosts, now=1.0, silent_after_s=3.0).on_every_host
    mixed = [early(0), early(1, "ValueError: other")]
    assert not blame(mixed, hosts, now=1.0, silent_after_s=3.0).on_every_host


def test_the_driver_listens_for_every_host_after_an_early_exception():
    first = early(1, at=1.0)
    assert keep_listening([first], 1, 2, now=4.0, grace_s=8.0, hear_out_s=0.3), "the others may raise it too"
    assert not keep_listening([first], 1, 2, now=6.5, grace_s=8.0, hear_out_s=0.3)
    assert not keep_listening([first, early(0)], 2, 2, now=1.1, grace_s=8.0, hear_out_s=0.3), "all heard"


# ---- scaling and hangs -----------------------------------------------------------------------------

def test_scaling_picks_the_largest_count_that_fits():
    policy = ScalingPolicy(min_hosts=2, max_hosts=8, fits=lambda n: n % 2 == 0)
    assert policy.choose(8) == 8
    assert policy.choose(7) == 6
    assert policy.choose(1) is None
    assert policy.choose(8, at_most=5) == 4, "below a count whose placement timed out"


def test_watchdog_limits_depend_on_the_phase():
    dog = Watchdog(WatchdogConfig(startup_timeout_s=100, hang_timeout_s=10, save_timeout_s=50))
    training = HostStatus(0, Phase.TRAINING, step=5, last_heard=100, last_progress=85)
    saving = HostStatus(1, Phase.SAVING, step=5, last_heard=100, last_progress=60)
    assert dog.hung([saving], now=100, silent_after_s=2) is None, "a long save is progress"
    host, limit = dog.hung([training, saving], now=100, silent_after_s=2)
    assert (host.rank, limit) == (0, 10)
    stuck = HostStatus(1, Phase.SAVING, step=5, last_heard=100, last_progress=40)
    assert dog.hung([stuck], now=100, silent_after_s=2)[1] == 50, "a stuck save has its own limit"
    compiling = HostStatus(0, Phase.COMPILING, last_heard=100, last_progress=50)
    assert dog.hung([compiling], now=100, silent_after_s=2) is None


@pytest.mark.parametrize("phase", [Phase.TRAINING, Phase.SAVING])
def test_the_silent_host_is_blamed_before_the_stalled_ones(phase):
    dog = Watchdog(WatchdogConfig(hang_timeout_s=5, save_timeout_s=5))
    stalled = HostStatus(0, phase, step=5, last_heard=100, last_progress=90)
    silent = HostStatus(1, phase, step=5, last_heard=91, last_progress=90)
    assert dog.hung([stalled, silent], now=100, silent_after_s=2)[0].rank == 1


def test_the_stopped_host_is_blamed_even_when_another_host_runs_out_of_time_first():
    """Host 1 was stopped just after host 0 reported its last step; host 0 then waits for it in a
    collective and is the first past the limit, but host 1 is the one that stopped answering."""
    dog = Watchdog(WatchdogConfig(hang_timeout_s=5))
    waiting = HostStatus(0, Phase.TRAINING, step=14, last_heard=100, last_progress=94.9)
    stopped = HostStatus(1, Phase.TRAINING, step=14, last_heard=95.1, last_progress=95.05)
    host, limit = dog.hung([waiting, stopped], now=100, silent_after_s=2)
    assert (host.rank, limit) == (1, 5)


def test_a_stop_step_is_past_every_step_known():
    from jaxlaunch.launcher.control.policy import stop_step

    assert stop_step([10, 12, None], None, 2) == 14, "past the furthest host reported"
    assert stop_step([10, 12], 30, 4) == 34, "past a step a host said it had passed"
    assert stop_step([None, None], None, 2) == 2


def test_a_host_is_past_its_first_step_once_it_reports_the_next_one():
    """A host reports a step when it dispatches it and reads its result before it reports the next:
    a restart's first step (a new process's longest) is over only then, and the warm standby's imports
    wait for it on every host (`RayWorkerGroup.poll`)."""
    host = HostStatus(0)
    host.heard(None, Phase.RESTORING, 1.0)
    host.heard(41, Phase.COMPILING, 2.0)  # polled between the first step's dispatch and its phase
    assert not host.past_first_step
    host.heard(41, Phase.TRAINING, 3.0)
    assert not host.past_first_step, "dispatched, not done: training since step 41 is not past it"
    host.heard(42, Phase.TRAINING, 4.0)
    assert host.past_first_step and host.first_reported == 41 and host.last_progress == 4.0
    host.heard(42, Phase.TRAINING, 5.0)
    assert host.last_progress == 4.0, "no progress without a new step or phase"
