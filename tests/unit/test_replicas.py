"""Replicas that must agree: the pure comparison of the hosts' checksums, and the driver's reaction."""

from jaxlaunch.launcher.control.replicas import ReplicaWatch, find_mismatch, replica_message
from jaxlaunch.launcher.control.states import Attempt, Failed, Finished, Relaunching

from jaxlaunch.contract import events
from jaxlaunch.contract.events import FailureKind
from jaxlaunch.contract.protocol import GroupInfo, GroupPoll, HostStatus, Injection, InjectionKind, ReplicaChecksums
from tests.unit.fakes import FakeGroup, make_driver

KERNEL, BIAS = "['kernel']", "['bias']"


def sums(step: int, kernel: int, bias: int = 7, index: str = "[:, :]") -> ReplicaChecksums:
    return ReplicaChecksums(step, ((KERNEL, index, kernel), (BIAS, "[:]", bias)))


def test_copies_that_agree_are_no_mismatch():
    assert find_mismatch(10, {r: sums(10, 42) for r in range(4)}) is None


def test_with_three_or_more_copies_the_host_against_the_majority_is_named():
    found = find_mismatch(10, {0: sums(10, 42), 1: sums(10, 42), 2: sums(10, 43), 3: sums(10, 42)})
    assert found is not None
    assert (found.step, found.array, found.index, found.culprit) == (10, KERNEL, "[:, :]", 2)
    assert found.hosts == [0, 1, 2, 3] and found.checksums == [42, 42, 43, 42]
    three = find_mismatch(10, {0: sums(10, 1), 1: sums(10, 5), 2: sums(10, 1)})
    assert three is not None and three.culprit == 1


def test_two_copies_that_differ_name_no_culprit_nor_does_a_split_vote():
    found = find_mismatch(10, {0: sums(10, 42), 1: sums(10, 43)})
    assert found is not None and found.culprit is None and found.hosts == [0, 1]
    split = find_mismatch(10, {0: sums(10, 1), 1: sums(10, 1), 2: sums(10, 2), 3: sums(10, 2)})
    assert split is not None and split.culprit is None


def test_copies_on_each_device_of_a_host_are_compared_too():
    """A host holds a copy per device: with 2 hosts of 2 devices, one bad copy is outvoted 3 to 1 and
    its host named; a host whose own copies differ is named whatever the others hold."""
    two_each = {0: ReplicaChecksums(10, ((KERNEL, "[:]", 5), (KERNEL, "[:]", 5))),
                1: ReplicaChecksums(10, ((KERNEL, "[:]", 5), (KERNEL, "[:]", 6)))}
    found = find_mismatch(10, two_each)
    assert found is not None and found.culprit == 1 and found.hosts == [0, 0, 1, 1]
    assert found.checksums == [5, 5, 5, 6]
    no_majority = {0: ReplicaChecksums(10, ((KERNEL, "[:]", 5), (KERNEL, "[:]", 5))),
                   1: ReplicaChecksums(10, ((KERNEL, "[:]", 6), (KERNEL, "[:]", 7)))}
    assert find_mismatch(10, no_majority).culprit == 1
    alone = {0: ReplicaChecksums(10, ((KERNEL, "[:]", 5), (KERNEL, "[:]", 6)))}
    assert find_mismatch(10, alone).culprit == 0, "one host: its own copies differ"
    four_each = {r: ReplicaChecksums(10, ((KERNEL, "[:]", 9 if r == 2 else 5),) * 4) for r in range(3)}
    assert find_mismatch(10, four_each).culprit == 2, "every copy of one host outvoted 8 to 4"


def test_the_message_says_which_step_is_restored_at_most():
    """The newest verified step is often a `--verify-every` step that was never saved: the step
    restored is the newest saved one at or before it. With no step checked before the mismatch in
    this launch (a resumed run), the limit is the step before it, which no check agreed on."""
    event = events.ReplicaMismatch(attempt=1, step=40, array="w", index="[:]", hosts=[0, 1, 2], nodes=["a", "b", "c"],
                                   checksums=[1, 1, 2], culprit=2, restore_from=35)
    assert "restoring the newest saved step at or before step 35, the newest step whose replicas agreed" \
        in replica_message(event)
    unchecked = replica_message(events.ReplicaMismatch(**{**event.__dict__, "restore_from": 39, "checked": False}))
    assert "restoring the newest saved step before step 40 (no earlier step was checked in this launch)" in unchecked
    assert "replicas agreed" not in unchecked


def test_only_copies_of_the_same_global_index_are_compared():
    # Hosts 0-1 hold rows 0:8 and hosts 2-3 rows 8:16 of a kernel sharded over two host pairs.
    held = {0: sums(10, 1, index="[0:8, :]"), 1: sums(10, 1, index="[0:8, :]"),
            2: sums(10, 9, index="[8:16, :]"), 3: sums(10, 9, index="[8:16, :]")}
    assert find_mismatch(10, held) is None
    held[3] = sums(10, 8, index="[8:16, :]")
    found = find_mismatch(10, held)
    assert found is not None and found.index == "[8:16, :]" and found.hosts == [2, 3]


def _attempt(hosts: int = 4) -> Attempt:
    return Attempt(number=1, num_hosts=hosts, mesh={}, started_at=0.0, latest_committed=None,
                   group=GroupInfo("c:1", [f"node-{r}" for r in range(hosts)], list(range(hosts))))


def test_the_watch_compares_a_step_once_every_host_sent_it_and_keeps_the_verified_steps():
    recorded: list[events.Event] = []
    told: list[str] = []
    watch = ReplicaWatch(recorded.append, told.append)
    attempt, hosts = _attempt(), [HostStatus(r) for r in range(4)]
    watch.on_poll(None, attempt, GroupPoll(hosts, [], [], {}, [], checksums={r: [sums(10, 1)] for r in range(3)}))
    assert watch.verified == set() and watch.failure(attempt, 0.0) is None, "host 3 has not sent step 10"
    watch.on_poll(None, attempt, GroupPoll(hosts, [], [], {}, [], checksums={3: [sums(10, 1)]}))
    assert watch.verified == {10}
    late = {r: [sums(20, 1), sums(30, 1 if r != 1 else 2)] for r in range(4)}
    watch.on_poll(None, attempt, GroupPoll(hosts, [], [], {}, [], checksums=late))
    [event] = recorded
    assert isinstance(event, events.ReplicaMismatch)
    assert (event.step, event.culprit, event.nodes[1], event.restore_from) == (30, 1, "node-1", 20)
    assert watch.restore_limit == 20
    assert "host 1 (node node-1) holds the copy that disagrees" in told[0] == replica_message(event)
    failure = watch.failure(attempt, 5.0)
    assert failure is not None and (failure.kind, failure.rank, failure.step) == (FailureKind.REPLICA_MISMATCH, 1, 30)
    assert events.parse_event(event.to_dict()) == event, "the event reads back from events.jsonl"


def test_the_driver_ends_the_attempt_on_a_mismatch_and_restarts_below_it():
    recorded: list[events.Event] = []
    watch = ReplicaWatch(recorded.append, lambda text: None)

    def corrupt_at_step_6(group: FakeGroup, i: int) -> list[dict]:
        if i in (3, 6):  # every host checks steps 3 and 6; host 2's copy is flipped at step 5
            group.checksums = {r: [sums(i, 99 if (r == 2 and i == 6) else 1)] for r in range(4)}
        return group.train(i)

    def finishes(group: FakeGroup, i: int) -> list[dict]:
        if i == 1:
            group.restored(3)
        if i > 5:
            group.finish(8)
            return []
        return group.train(3 + i)

    driver, log, _, _ = make_driver([corrupt_at_step_6, finishes], hosts=4, listeners=[watch])
    seen_limits = []
    while not isinstance(driver.state, Finished | Failed):
        state = driver.step()
        if isinstance(state, Relaunching):
            assert state.failure.kind == FailureKind.REPLICA_MISMATCH and state.failure.rank == 2
            seen_limits.append(watch.restore_limit)
    assert isinstance(driver.state, Finished)
    assert seen_limits == [3], "the next attempt restores the newest verified step (3), never step 6"
    assert [e for e in log if e[0] == "start"] == [("start", 1, 4), ("start", 2, 4)]
    assert watch.restore_limit is None, "once restored under the limit, the new attempt's saves count again"
    assert [type(e).__name__ for e in recorded] == ["ReplicaMismatch"]


def test_the_bitflip_injection_parses_without_a_factor():
    injection = Injection.parse("bitflip@step=40,host=2")
    assert (injection.kind, injection.step, injection.host) == (InjectionKind.BITFLIP, 40, 2)
    assert str(injection) == "bitflip@step=40,host=2"


def test_copies_that_disagree_among_the_checksums_in_when_the_attempt_ended_bar_their_step():
    """Host 3 died before it sent step 30's checksums; hosts 1 and 2 disagree already. The partial
    checksums were dropped with the attempt, and the next one restored step 30 unchecked."""
    from jaxlaunch.launcher.control.states import AttemptEndNotice

    recorded: list[events.Event] = []
    watch = ReplicaWatch(recorded.append, lambda text: None)
    attempt, hosts = _attempt(), [HostStatus(r) for r in range(4)]
    watch.on_poll(None, attempt, GroupPoll(hosts, [], [], {}, [], checksums={r: [sums(20, 1)] for r in range(4)}))
    partial = {0: [sums(30, 1)], 1: [sums(30, 2)], 2: [sums(30, 1)]}
    watch.on_poll(None, attempt, GroupPoll(hosts, [], [], {}, [], checksums=partial))
    assert recorded == [] and watch.restore_limit is None, "host 3's checksums of step 30 not in yet"
    watch.on_attempt_ended(None, AttemptEndNotice(attempt, FailureKind.CRASHED))
    [event] = recorded
    assert (event.step, event.culprit, event.restore_from) == (30, 1, 20) and watch.restore_limit == 20
    agreeing = ReplicaWatch(recorded.append, lambda text: None)
    agreeing.on_poll(None, attempt, GroupPoll(hosts, [], [], {}, [], checksums={0: [sums(40, 1)], 1: [sums(40, 1)]}))
    agreeing.on_attempt_ended(None, AttemptEndNotice(attempt, FailureKind.CRASHED))
    assert agreeing.restore_limit is None and len(recorded) == 1, "copies that agree bar nothing"


def test_a_mismatch_a_launch_ended_on_still_bars_its_unverified_steps_on_resume():
    """The launch ended on a mismatch at step 30 (budget spent) with step 30 committed durably: a
    --resume restores step 20 at most, the newest whose replicas agreed, until an attempt has
    restored under that limit."""
    mismatch = events.ReplicaMismatch(attempt=2, step=30, array="w", index="[0:4]", hosts=[0, 1], nodes=["a", "b"],
                                      checksums=[1, 2], restore_from=20)
    ended = events.AttemptEnded(attempt=2, cause=FailureKind.REPLICA_MISMATCH, first_step=11, last_step=30)
    assert ReplicaWatch(print, print, [mismatch, ended]).restore_limit == 20
    restored = events.Restored(attempt=3, step=20, seconds=0.1)
    assert ReplicaWatch(print, print, [mismatch, ended, restored]).restore_limit is None, "the next launch applied it"
    assert ReplicaWatch(print, print, [ended]).restore_limit is None
