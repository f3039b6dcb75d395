"""`fault.straggler_action: replace`, the driver stepped against a fake group: a straggler's node is
left at a step every host saved, a replica's dissenter's node after its failure, and a cluster with
no room elsewhere keeps the node and says so."""

import pytest
from jaxlaunch.launcher.configuration.schema import ConfigError, JobConfig, override, validate
from jaxlaunch.launcher.control.policy import FaultConfig
from jaxlaunch.launcher.control.replicas import ReplicaWatch
from jaxlaunch.launcher.control.stragglers import StragglerWatch
from jaxlaunch.launcher.records import history
from jaxlaunch.launcher.records.recorder import Recorder
from jaxlaunch.launcher.records.runs import RunDir

from jaxlaunch.contract import events
from jaxlaunch.contract.events import FailureKind
from jaxlaunch.contract.protocol import ReplicaChecksums
from tests.unit.fakes import Behaviour, FakeCluster, FakeGroup, Record, make_driver, obeys
from tests.unit.test_driver import Transitions

SLOW_HOST = 1
FACTOR, STEPS = 1.3, 5
LAST_STEP = 30
REPLACE = FaultConfig(max_restarts=2, backoff_s=1, straggler_action="replace")


def node_of(rank: int) -> str:
    return f"{rank:056x}"  # the fake group's node ids


def slow(rank: int) -> Behaviour:
    """Obeys stops, or finishes at the last step; host `rank`'s own work takes three times its peers'
    in every step."""
    def behaviour(group: FakeGroup, i: int) -> list[Record]:
        if (group.hosts[0].step or 0) >= LAST_STEP:
            group.finish(LAST_STEP)
            return []
        records = obeys(group, i)
        for record in records:
            group.busy = {r: [(record["step"], 0.15 if r == rank else 0.05)] for r in range(group.num_hosts)}
        return records
    return behaviour


def resumes(cluster: FakeCluster) -> Behaviour:
    """Restores the step the previous group stopped at and trains to the end."""
    def behaviour(group: FakeGroup, i: int) -> list[Record]:
        start = cluster.groups[0].stop_at or 0
        if i == 1:
            group.restored(start)
        if start + i > LAST_STEP:
            group.finish(LAST_STEP)
            return []
        return group.train(start + i)
    return behaviour


class Recorded:
    def __init__(self) -> None:
        self.events: list[events.Event] = []
        self.told: list[str] = []

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


def drive(capacity: int, fault: FaultConfig, tmp_path=None):
    seen = Recorded()
    watch = StragglerWatch(FACTOR, STEPS, seen.events.append, seen.told.append)
    transitions = Transitions()
    listeners = [watch, transitions]
    run = None
    if tmp_path is not None:
        run = RunDir(tmp_path)
        run.create()
        run.event(events.Launch())
        listeners.append(Recorder(run, lambda n: {"data": n}))
    holder: list[FakeCluster] = []
    driver, log, _, cluster = make_driver(
        [slow(SLOW_HOST), lambda g, i: resumes(holder[0])(g, i)], hosts=4, placeable=capacity, fault=fault,
        listeners=listeners, committed=lambda: holder[0].groups[0].stop_at if holder[0].groups else None)
    holder.append(cluster)
    return driver, log, cluster, seen, transitions, run


def test_a_straggler_under_replace_is_left_at_a_step_every_host_saved_and_no_failure_is_counted(tmp_path):
    driver, log, cluster, seen, transitions, run = drive(5, REPLACE, tmp_path)
    assert driver.run() == 0
    [straggler] = seen.of(events.Straggler)
    assert straggler.host == SLOW_HOST
    [replaced] = seen.of(events.HostReplacement)
    assert (replaced.host, replaced.node, replaced.reason, replaced.avoided) == (
        SLOW_HOST, node_of(SLOW_HOST), "straggler", True)
    assert replaced.placeable_elsewhere == 4, "the spare node and the group's 3 other nodes"
    assert cluster.avoided == [node_of(SLOW_HOST)], "the next placement leaves the node out"
    assert any(text.startswith(f"replacing host {SLOW_HOST}: its node {node_of(SLOW_HOST)} is avoided")
               for text in seen.told)
    assert "Draining" in transitions.seen
    first, second = driver.attempts
    stop = cluster.groups[0].stop_at
    assert stop is not None and ("confirm_stop", stop) in log
    assert (first.num_hosts, first.cause, first.last_step) == (4, "replace", stop), "every host saved the agreed step"
    assert (second.num_hosts, second.cause) == (4, "finished")
    assert second.latest_committed == second.restored_step == stop and second.first_step == stop + 1, \
        "the next attempt restores the agreed step: no step is trained twice"
    assert not driver.failures, "a replacement spends no restart budget"
    assert [e for e in log if e[0] == "start"] == [("start", 1, 4), ("start", 2, 4)]
    run.event(replaced)  # the run's own watch records it there (this test's watch records to `seen`)
    run.event(events.JobEnded(status=events.JobStatus.FINISHED))
    past = history.load_history(run)
    assert [(a.cause, a.failed_host) for a in past.attempts] == [("replace", None), ("finished", None)]
    assert past.summary(run)["restarts_by_cause"] == {"replace": 1}, "a restart, and no failure"
    assert [e.kind for e in past.events].count("stop_requested") == 0, "the user asked for no stop"


def test_without_room_elsewhere_the_node_is_kept_and_the_user_is_told():
    driver, log, cluster, seen, _, _ = drive(4, REPLACE)
    assert driver.run() == 0
    [replaced] = seen.of(events.HostReplacement)
    assert (replaced.host, replaced.avoided, replaced.placeable_elsewhere) == (SLOW_HOST, False, 3)
    assert any("is not replaced" in text and "room for 3 of the 4 hosts" in text for text in seen.told)
    assert cluster.avoided == [] and [a.cause for a in driver.attempts] == ["finished"]
    assert not any(entry[0] == "propose_stop" for entry in log), "the job goes on as under warn"


def test_warn_only_warns():
    driver, log, cluster, seen, _, _ = drive(5, FaultConfig(max_restarts=2, backoff_s=1))
    assert driver.run() == 0
    assert len(seen.of(events.Straggler)) == 1 and seen.of(events.HostReplacement) == []
    assert cluster.avoided == [] and [a.cause for a in driver.attempts] == ["finished"]


def test_a_replica_s_dissenter_has_its_node_avoided_under_replace():
    recorded: list[events.Event] = []
    told: list[str] = []
    listeners = [ReplicaWatch(recorded.append, told.append), StragglerWatch(FACTOR, STEPS, recorded.append,
                                                                             told.append)]

    def corrupt_at_step_6(group: FakeGroup, i: int) -> list[Record]:
        if i in (3, 6):  # host 2's copy disagrees at step 6
            group.checksums = {r: [ReplicaChecksums(i, (("w", "[:]", 99 if (r == 2 and i == 6) else 1),))]
                               for r in range(4)}
        return group.train(i)

    def finishes(group: FakeGroup, i: int) -> list[Record]:
        if i > 5:
            group.finish(8)
            return []
        return group.train(3 + i)
    driver, _, _, cluster = make_driver([corrupt_at_step_6, finishes], hosts=4, placeable=5, fault=REPLACE,
                                        listeners=listeners)
    assert driver.run() == 0
    [replaced] = [e for e in recorded if isinstance(e, events.HostReplacement)]
    assert (replaced.host, replaced.node, replaced.reason, replaced.avoided) == (
        2, node_of(2), "replica_mismatch", True)
    assert [a.cause for a in driver.attempts] == [FailureKind.REPLICA_MISMATCH, "finished"]
    assert len(driver.failures) == 1, "a corrupt replica is a failure all the same"
    assert cluster.avoided == [node_of(2)]


@pytest.mark.parametrize("value", ["bogus", "Replace", ""])
def test_straggler_action_is_warn_or_replace(value):
    validate(override(JobConfig(), **{"fault.straggler_action": "replace"}))
    with pytest.raises(ConfigError, match="straggler_action: input should be 'warn' or 'replace'"):
        validate(override(JobConfig(), **{"fault.straggler_action": value}))


def test_a_replacement_the_hosts_do_not_stop_for_still_restarts_elsewhere_without_a_failure():
    def slow_and_deaf(group: FakeGroup, i: int) -> list[Record]:
        records = group.train(i)  # its loop never calls ctx.should_stop
        group.busy = {r: [(i, 0.15 if r == SLOW_HOST else 0.05)] for r in range(group.num_hosts)}
        return records

    def from_scratch(group: FakeGroup, i: int) -> list[Record]:
        if i > LAST_STEP:
            group.finish(LAST_STEP)
            return []
        return group.train(i)
    seen = Recorded()
    driver, _, _, cluster = make_driver([slow_and_deaf, from_scratch], hosts=4, placeable=5, fault=REPLACE,
                                        listeners=[StragglerWatch(FACTOR, STEPS, seen.events.append, seen.told.append)])
    assert driver.run() == 0
    assert [a.cause for a in driver.attempts] == ["replace", "finished"] and not driver.failures
    assert cluster.avoided == [node_of(SLOW_HOST)], "the node is left even without the save at one step"
