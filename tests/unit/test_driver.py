"""The driver's control loop, stepped against a fake worker group and a fake clock (no Ray)."""

import signal

import pytest

from launcher.config import DEFAULT_CLUSTER_CONFIG, load_file, override
from launcher.display import Display
from launcher.driver import Driver, State
from launcher.policy import Failure, FailureKind, RestartPolicy, ScalingPolicy
from launcher.runs import RunDir
from launcher.worker_group import GroupPoll, HostPoll


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


class FakeCluster:
    embedded = True

    def __init__(self, placeable):
        self.placeable = placeable

    def placeable_hosts(self, resources, strategy):
        return self.placeable

    def describe(self):
        return f"fake cluster with room for {self.placeable}"


class FakeGroup:
    """Plays one attempt: `behaviour(group, poll_index)` says what the hosts report at each poll."""

    def __init__(self, clock, behaviour, log):
        self.clock, self.behaviour, self.log = clock, behaviour, log
        self.polls = 0
        self.preempted = False
        self.killed = None
        self.results = {}

    def start(self, num_hosts, attempt, injections=()):
        self.num_hosts, self.attempt = num_hosts, attempt
        self.hosts = [HostPoll(r, last_heard=self.clock(), last_progress=self.clock()) for r in range(num_hosts)]
        self.log.append(("start", attempt, num_hosts))
        return {"nodes": ["n"] * num_hosts}

    def poll(self):
        self.clock.sleep(0.25)
        self.polls += 1
        records, failures = self.behaviour(self, self.polls)
        return GroupPoll(self.hosts, records, [], self.results, failures)

    def train(self, step, loss=1.0):
        for h in self.hosts:
            h.phase, h.step, h.last_heard, h.last_progress = "training", step, self.clock(), self.clock()
        return [{"step": step, "loss": loss, "step_time_s": 0.1, "tokens_per_s": 1.0, "learning_rate": 0.1}]

    def finish(self, step, stopped="completed"):
        self.results = {r: {"stopped": stopped, "final_step": step, "process_count": self.num_hosts,
                            "num_devices": 2 * self.num_hosts, "mesh": {"data": self.num_hosts}}
                        for r in range(self.num_hosts)}

    def preempt(self):
        self.preempted = True
        self.log.append(("preempt", self.attempt))

    def kill(self, rank):
        self.killed = rank
        self.log.append(("kill", rank))

    def shutdown(self):
        self.log.append(("shutdown", self.attempt))


def trains_to(total, start=0):
    def behaviour(group, i):
        step = start + i
        if step > total:
            group.finish(total)
            return [], []
        return group.train(step), []
    return behaviour


def obeys(group, i):
    """Trains until asked to save and stop (a preemption notice), then stops as every host would."""
    if group.preempted:
        group.finish(i, stopped="preempted")
        return [], []
    return group.train(i), []


def crashes_at(step, rank=1, kind=FailureKind.CRASHED, message="host process died"):
    def behaviour(group, i):
        if i < step:
            return group.train(i), []
        return [], [Failure(kind, rank, message, i, group.clock(), group.clock())]
    return behaviour


def make_driver(tmp_path, behaviours, *, hosts=2, placeable=None, restart=None, min_hosts=None, max_hosts=None,
                **job_changes):
    clock = Clock()
    job = override(load_file(DEFAULT_CLUSTER_CONFIG), num_hosts=hosts, run_dir=str(tmp_path), **job_changes)
    run = RunDir(tmp_path)
    run.create()
    log = []
    queue = list(behaviours)
    cluster = FakeCluster(placeable if placeable is not None else hosts)

    def make_group():
        return FakeGroup(clock, queue.pop(0), log)

    driver = Driver(
        job, run, cluster, make_group,
        restart_policy=restart or RestartPolicy(max_restarts=2, backoff_s=1),
        scaling_policy=ScalingPolicy(min_hosts or hosts, max_hosts or hosts, lambda n: n % 2 == 0 or n == 1),
        display=Display(), clock=clock, wall_clock=clock, sleep=clock.sleep,
    )
    return driver, log, clock, cluster


def test_a_clean_run_finishes_and_records_metrics(tmp_path):
    driver, log, _, _ = make_driver(tmp_path, [trains_to(5)], **{"train.steps": 5})
    assert driver.run() == 0
    assert driver.state == State.FINISHED
    assert [r["step"] for r in driver.run_dir.read_jsonl(driver.run_dir.metrics_path)] == [1, 2, 3, 4, 5]
    summary = driver.summary()
    assert summary["final_step"] == 5 and summary["attempts"] == 1 and summary["process_count"] == 2
    assert log == [("start", 1, 2), ("shutdown", 1)]


def test_a_crash_restarts_the_whole_group_and_backs_off_when_it_repeats(tmp_path):
    driver, log, clock, _ = make_driver(tmp_path, [crashes_at(3), crashes_at(2), trains_to(5, start=2)],
                                        **{"train.steps": 5})
    assert driver.step() == State.RUNNING
    while driver.state == State.RUNNING:
        driver.step()
    assert driver.state == State.RESTARTING
    assert log[-1] == ("shutdown", 1)  # the whole group is torn down before deciding
    before = clock.now
    assert driver.step() == State.SCHEDULING
    assert clock.now == before  # the first restart is immediate
    while driver.state != State.RESTARTING:
        driver.step()
    before = clock.now
    assert driver.step() == State.SCHEDULING
    assert clock.now - before == pytest.approx(1.0)  # the second one backs off
    assert driver.run() == 0
    summary = driver.summary()
    assert summary["attempts"] == 3 and summary["restarts_by_cause"] == {"crashed": 2}
    events = [e["event"] for e in driver.run_dir.read_jsonl(driver.run_dir.events_path)]
    assert "failure" in events and events.count("attempt_started") == 3
    assert summary["attempt_table"][2]["recovery_time_s"] is not None


def test_budget_spent_fails_with_every_attempt_recorded(tmp_path):
    behaviours = [crashes_at(2) for _ in range(3)]
    driver, log, _, _ = make_driver(tmp_path, behaviours)
    assert driver.run() == 1
    assert driver.state == State.FAILED and "budget spent" in driver.stop_reason
    assert [a["cause"] for a in driver.summary()["attempt_table"]] == ["crashed"] * 3


def test_deterministic_exception_stops_early(tmp_path):
    exc = dict(kind=FailureKind.EXCEPTION, message="ValueError: bad batch")
    driver, _, _, _ = make_driver(tmp_path, [crashes_at(2, **exc), crashes_at(2, **exc)],
                                  restart=RestartPolicy(max_restarts=10))
    assert driver.run() == 1
    assert "deterministic" in driver.stop_reason and len(driver.attempts) == 2


def test_a_hung_host_is_caught_by_the_watchdog(tmp_path):
    def hangs(group, i):
        if i <= 2:
            return group.train(i), []
        group.hosts[0].last_heard = group.clock()  # host 0 answers but makes no progress
        return [], []
    driver, log, _, _ = make_driver(tmp_path, [hangs, trains_to(4, start=2)],
                                    **{"train.steps": 4, "distributed.hang_timeout_s": 5.0})
    assert driver.run() == 0
    first = driver.summary()["attempt_table"][0]
    assert first["cause"] == "hung" and first["failed_host"] == 1  # the silent one
    assert first["detection_latency_s"] >= 5.0


def test_collective_error_is_blamed_on_the_host_that_died(tmp_path):
    def both(group, i):
        if i == 1:
            return group.train(1), []
        if i == 2:  # the survivor's collective fails first ...
            return [], [Failure(FailureKind.EXCEPTION, 0, "JaxRuntimeError: Gloo AllGather failed", 1, group.clock())]
        if i == 3:  # ... and the dead host is reported a moment later
            return [], [Failure(FailureKind.CRASHED, 1, "host process died", 1, group.clock())]
        return [], []
    driver, _, _, _ = make_driver(tmp_path, [both, trains_to(2, start=1)], **{"train.steps": 2})
    assert driver.run() == 0
    first = driver.summary()["attempt_table"][0]
    assert (first["cause"], first["failed_host"]) == ("crashed", 1)


def test_stop_signal_saves_on_every_host_then_stops(tmp_path):
    driver, log, _, _ = make_driver(tmp_path, [obeys], **{"train.steps": 100})
    driver.step()
    driver.step()
    driver.request_stop(signal.SIGTERM)
    assert driver.run() == 128 + signal.SIGTERM
    assert ("preempt", 1) in log and driver.state == State.STOPPED
    assert "after saving step" in driver.stop_reason


def test_preemption_notice_from_outside_restarts_on_the_preemption_budget(tmp_path):
    def preempted(group, i):
        if i == 3:
            group.finish(3, stopped="preempted")
            return [], []
        return group.train(i), []
    driver, _, _, _ = make_driver(tmp_path, [preempted, trains_to(4, start=3)],
                                  restart=RestartPolicy(max_restarts=0, max_preemptions=1), **{"train.steps": 4})
    assert driver.run() == 0
    assert driver.summary()["restarts_by_cause"] == {"preempted": 1}


def test_restart_shrinks_to_what_fits_and_grows_back(tmp_path):
    driver, log, clock, cluster = make_driver(
        tmp_path, [crashes_at(2), obeys, trains_to(50)], hosts=4, min_hosts=2, max_hosts=4,
        **{"train.steps": 50, "fault.grow_check_interval_s": 1.0},
    )
    while driver.state != State.RESTARTING:
        driver.step()
    cluster.placeable = 3  # a node was lost: 3 hosts do not fit, 2 do
    while not (driver.state == State.RUNNING and len(driver.attempts) == 2):
        driver.step()
    assert driver.attempts[1]["num_hosts"] == 2
    cluster.placeable = 4  # the node is back
    assert driver.run() == 0
    table = driver.summary()["attempt_table"]
    assert [(a["num_hosts"], a["cause"]) for a in table] == [(4, "crashed"), (2, "resize"), (4, "finished")]
    assert driver.summary()["restarts_by_cause"] == {"crashed": 1}  # growing is not a failure


def test_waits_for_capacity_then_gives_up(tmp_path):
    driver, _, clock, cluster = make_driver(tmp_path, [crashes_at(2)], hosts=2,
                                            **{"fault.capacity_timeout_s": 10.0})
    while driver.state != State.RESTARTING:
        driver.step()
    cluster.placeable = 0
    assert driver.run() == 1
    assert "room for 0 hosts" in driver.stop_reason
    events = [e["event"] for e in driver.run_dir.read_jsonl(driver.run_dir.events_path)]
    assert "waiting_for_capacity" in events


def test_chaos_kills_a_random_training_host_and_the_job_recovers(tmp_path):
    def dies_when_killed(group, i):
        if group.killed is not None:
            return [], [Failure(FailureKind.CRASHED, group.killed, "host process died", i, group.clock())]
        return group.train(i), []
    driver, log, _, _ = make_driver(tmp_path, [dies_when_killed, trains_to(3)], **{"train.steps": 3})
    driver.chaos_mean_s = 0.5
    assert driver.run() == 0
    records = driver.run_dir.read_jsonl(driver.run_dir.events_path)
    kill = next(e for e in records if e["event"] == "chaos_kill")
    failure = next(e for e in records if e["event"] == "failure")
    assert (failure["cause"], failure["host"]) == ("crashed", kill["host"])
    assert driver.summary()["restarts_by_cause"] == {"crashed": 1}
    assert driver.summary()["attempt_table"][0]["detection_latency_s"] is not None
