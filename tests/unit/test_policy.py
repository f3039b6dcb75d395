from launcher.policy import (
    Action,
    Failure,
    FailureKind,
    RestartPolicy,
    ScalingPolicy,
    Watchdog,
    primary_failure,
)
from launcher.worker_group import HostPoll


def failure(kind=FailureKind.CRASHED, step=10, message="boom", rank=0, at=0.0):
    return Failure(kind, rank, message, step, at)


def test_restart_within_budget_then_stop():
    policy = RestartPolicy(max_restarts=2, backoff_s=1, max_backoff_s=30)
    history = [failure(step=1)]
    assert policy.decide(history).action == Action.RESTART
    history.append(failure(step=2))
    assert policy.decide(history).action == Action.RESTART
    history.append(failure(step=3))
    decision = policy.decide(history)
    assert decision.action == Action.STOP and "budget spent" in decision.reason


def test_preemptions_spend_their_own_budget():
    policy = RestartPolicy(max_restarts=0, max_preemptions=2)
    history = [failure(FailureKind.PREEMPTED), failure(FailureKind.NODE_LOST)]
    assert policy.decide(history).action == Action.RESTART
    history.append(failure(FailureKind.CRASHED))
    assert policy.decide(history).action == Action.STOP  # the crash budget is 0


def test_backoff_doubles_and_is_capped():
    policy = RestartPolicy(max_restarts=10, backoff_s=1, max_backoff_s=5)
    history, backoffs = [], []
    for i in range(5):
        history.append(failure(step=i))
        backoffs.append(policy.decide(history).backoff_s)
    assert backoffs == [0, 1, 2, 4, 5]  # the first restart is immediate


def test_same_exception_at_same_step_twice_is_deterministic():
    policy = RestartPolicy(max_restarts=10)
    exc = dict(kind=FailureKind.EXCEPTION, step=3, message="ValueError: bad")
    assert policy.decide([failure(**exc)]).action == Action.RESTART
    decision = policy.decide([failure(**exc), failure(**exc)])
    assert decision.action == Action.STOP and "deterministic" in decision.reason
    # the same exception at another step is not deterministic
    assert policy.decide([failure(**exc), failure(**{**exc, "step": 4})]).action == Action.RESTART


def test_scaling_picks_largest_fitting_count():
    policy = ScalingPolicy(min_hosts=2, max_hosts=4, fits=lambda n: 32 % (n * 2 // 2) == 0 and n != 3)
    assert policy.choose(8) == 4
    assert policy.choose(3) == 2  # 3 hosts do not fit the batch
    assert policy.choose(1) is None  # wait for capacity


def test_collective_errors_are_not_the_root_cause():
    gloo = Failure(FailureKind.EXCEPTION, 0, "JaxRuntimeError: Gloo AllGather failed: Connection closed", 5, 1.0)
    crash = Failure(FailureKind.CRASHED, 1, "host process died", 5, 1.2)
    assert primary_failure([gloo, crash]) is crash
    user = Failure(FailureKind.EXCEPTION, 1, "ValueError: nan loss", 5, 1.5)
    assert primary_failure([gloo, user]) is user


def test_watchdog_separates_startup_and_training_limits():
    dog = Watchdog(startup_timeout_s=100, hang_timeout_s=5)
    starting = HostPoll(0, phase="compiling", last_heard=50, last_progress=0)
    assert dog.hung([starting], now=60) is None
    training = HostPoll(1, phase="training", step=7, last_heard=60, last_progress=54)
    assert dog.hung([starting, training], now=60) == (1, 54)


def test_watchdog_blames_the_silent_host():
    dog = Watchdog(startup_timeout_s=100, hang_timeout_s=5)
    waiting = HostPoll(0, phase="training", step=7, last_heard=20, last_progress=10)
    silent = HostPoll(1, phase="training", step=7, last_heard=10, last_progress=10)
    assert dog.hung([waiting, silent], now=20) == (1, 10)
