"""The driver's keeper pool when a keeper's process does not come up: the hosts start beside the
keepers, so a keeper late past its start timeout is found after the hosts' run calls."""

import pytest

from jaxlaunch.contract.events import MemoryTierOff
from jaxlaunch.contract.protocol import CheckpointConfig, NodeLiveness


def test_a_keeper_that_does_not_start_in_time_is_stopped_dropped_and_fails_the_group_start(monkeypatch):
    from jaxlaunch.launcher.cluster import keepers  # imports Ray (this module must import without it)

    pool = keepers.KeeperPool(CheckpointConfig(memory_tier=False), lambda nodes: {})  # no orphan sweep here
    # As `ensure` leaves them: two keepers started, their first pings asked.
    pool.keepers = {"node-a": "keeper A", "node-b": "keeper B"}
    pool.starting = {"node-a": "ping A", "node-b": "ping B"}
    killed = []
    monkeypatch.setattr(keepers.ray, "wait", lambda refs, num_returns, timeout: (["ping A"], ["ping B"]))
    monkeypatch.setattr(keepers.ray, "get", lambda ref: 4242)
    monkeypatch.setattr(keepers.ray, "kill", lambda keeper, no_restart: killed.append(keeper))

    with pytest.raises(RuntimeError, match=r"keeper did not start on node\(s\) node-b \(TimeoutError"):
        pool.wait_started()
    assert killed == ["keeper B"], "a late keeper would come up beside its successor, in the same folder"
    assert pool.keepers == {"node-a": "keeper A"}, "the next ensure starts a keeper on node-b only"
    assert pool.pids == {"node-a": 4242}, "the keeper that answered is watched for restarts"
    pool.wait_started()  # nothing left starting: no wait, no error


NODE_A, NODE_B = "a" * 56, "b" * 56  # as Ray writes node ids (its scheduling strategy checks them)


class Ref:
    def __init__(self, value=None, ready=True):
        self.value, self.ready = value, ready


class Call:
    def __init__(self, answer):
        self.answer = answer

    def remote(self, *args):
        return self.answer(*args)


class FakeKeeper:
    """A keeper that holds `held` (Held records) and drops the steps after a `forget_after` it answers;
    `stuck`: its process is up but does not answer (a forget asked of it waits past any timeout)."""

    def __init__(self, held, stuck=False, restarting=0):
        self.held, self.stuck, self.restarting = list(held), stuck, restarting
        self.asked: list[tuple[int, int]] = []
        self.ping = Call(self._ping)
        self.index = Call(lambda: Ref([h.to_dict() for h in self.held]))
        self.forget_after = Call(self._forget)
        self.closed = False
        self.close = Call(self._close)

    def _close(self):
        self.closed = True
        return Ref()

    def _ping(self):
        """No answer while Ray restarts its process (`restarting` asks), then its process id."""
        self.restarting -= 1
        return Ref(1234, ready=self.restarting < 0)

    def _forget(self, step, attempt):
        self.asked.append((step, attempt))
        if self.stuck:
            return Ref(ready=False)
        self.held = [h for h in self.held if h.step <= step or h.attempt >= attempt]
        return Ref()


def part(step, node):
    from jaxlaunch.contract.tiers import Held, Role

    return Held(step=step, rank=0, num_hosts=1, node=node, role=Role.PRIMARY, nbytes=8, replicated=True)


@pytest.fixture
def fake_ray(monkeypatch):
    from jaxlaunch.launcher.cluster import keepers

    killed, started = [], []

    class Factory:
        def options(self, **_):
            return self

        def remote(self, node, *_):
            started.append((node, FakeKeeper([])))  # holds nothing: it deletes what its node's last keeper held
            return started[-1][1]

    def wait(refs, num_returns, timeout):
        return [r for r in refs if r.ready], [r for r in refs if not r.ready]

    monkeypatch.setattr(keepers.ray, "wait", wait)
    monkeypatch.setattr(keepers.ray, "get", lambda ref, timeout=None: ref.value)
    monkeypatch.setattr(keepers.ray, "kill", lambda keeper, no_restart: killed.append(keeper))
    monkeypatch.setattr(keepers.ray, "remote", lambda **_: lambda cls: Factory())
    monkeypatch.setattr(keepers, "KEEPER_RETRY_S", 0.0)
    liveness = {NODE_A: NodeLiveness.ALIVE, NODE_B: NodeLiveness.DEAD}
    pool = keepers.KeeperPool(CheckpointConfig(memory_tier=False), lambda nodes: {n: liveness[n] for n in nodes})
    pool.cfg = CheckpointConfig(memory_tier=True)  # on, without sweeping this machine's shared memory
    return pool, killed, started


def test_no_attempt_reads_a_keeper_that_holds_steps_the_run_left(fake_ray):
    """Rank 0 could not have a keeper (its node up) drop the steps after the one restored, so that
    attempt saved durably only; the next attempt must not read those steps as this run's: before any
    host is told where the keepers are, the driver has every keeper drop them, and replaces one that
    still does not with an empty one."""
    pool, killed, _ = fake_ray
    stuck = FakeKeeper([part(s, NODE_B) for s in (28, 29, 35)], stuck=True)
    came_back = FakeKeeper([part(s, NODE_A) for s in (29, 33)])
    pool.keepers = {NODE_A: came_back, NODE_B: stuck}
    # Two attempts' rank 0 said so (the earlier step counts); a tier off for want of room says nothing of it.
    pool.heard([MemoryTierOff(reason="stuck", kept_after=35), MemoryTierOff(reason="no room")], attempt=2)
    pool.heard([MemoryTierOff(reason="stuck", kept_after=29)], attempt=3)

    handles = pool.ensure([NODE_A, NODE_B])
    assert killed == [stuck], "replaced"
    assert handles[NODE_A] is came_back and [h.step for h in came_back.held] == [29]
    assert came_back.asked == [(35, 2), (29, 3)], "each drop with the attempt that went on from it"
    assert handles[NODE_B] is not stuck and handles[NODE_B].held == []
    assert pool.left == []
    assert pool.lost == [NODE_B], "the next restore names the keeper replaced empty"
    assert pool.newest_committed() == (29, 1)
    assert pool.newest_committed(at_most=28) is None, "after a replica mismatch, nothing past the verified step"


def test_a_persist_never_reads_a_keeper_that_holds_steps_the_run_left(fake_ray):
    pool, killed, _ = fake_ray
    stuck = FakeKeeper([part(35, NODE_B)], stuck=True)
    pool.keepers = {NODE_A: FakeKeeper([part(29, NODE_A)]), NODE_B: stuck}
    assert pool.newest_committed() == (35, 1), "as it was: the left step 35 read as the newest"
    pool.heard([MemoryTierOff(reason="stuck", kept_after=29)], attempt=2)
    assert pool.newest_committed() == (29, 1), "the keeper that did not drop it is not read"
    assert killed == [stuck] and pool.left == []


def test_a_keeper_that_ray_is_restarting_is_waited_for_and_one_on_a_dead_node_replaced(fake_ray):
    """At an attempt's start a keeper that does not answer at once may be Ray's restart of it (its
    process died, perhaps with a host): its restart takes over the steps it held, where a keeper
    started in its place would start empty, so it is waited for while its node is up. One whose node
    Ray lists dead is replaced at once."""
    pool, killed, _ = fake_ray
    restarting = FakeKeeper([part(s, NODE_A) for s in (29, 30)], restarting=3)
    on_dead_node = FakeKeeper([part(30, NODE_B)], restarting=10**6)
    pool.keepers = {NODE_A: restarting, NODE_B: on_dead_node}

    handles = pool.ensure([NODE_A, NODE_B])
    assert handles[NODE_A] is restarting and killed == [on_dead_node]
    assert pool.lost == [NODE_B]
    assert pool.newest_committed() == (30, 1), "the steps its restart took over are read"


def test_a_killed_keeper_s_folder_goes_by_the_launch_s_end_when_no_keeper_replaced_it(fake_ray):
    """The driver kills a stuck keeper (it never deletes its folder in shared memory) and no host runs
    on its node any more, so no keeper is started there again: at the end a keeper is started on
    that node to empty the folder, and closed with the others. Not on a node Ray lists dead."""
    pool, killed, started = fake_ray
    stuck = FakeKeeper([part(35, NODE_A)], stuck=True)
    pool.keepers = {NODE_A: stuck, NODE_B: FakeKeeper([part(29, NODE_B)])}
    pool.liveness = lambda nodes: {n: NodeLiveness.ALIVE for n in nodes}
    pool.heard([MemoryTierOff(reason="stuck", kept_after=29)], attempt=2)
    pool.ensure([NODE_B])  # the next attempt runs on node B only
    assert killed == [stuck] and NODE_A not in pool.keepers and started == []
    pool.shutdown()
    assert [node for node, _ in started] == [NODE_A] and started[0][1].closed, "its folder is emptied and deleted"

    pool, killed, started = fake_ray  # the same pool, ended; a node Ray lists dead took its memory along
    pool.keepers, pool.stopped = {}, {NODE_B}
    pool.liveness = lambda nodes: {n: NodeLiveness.DEAD for n in nodes}
    started.clear()
    pool.shutdown()
    assert started == []
