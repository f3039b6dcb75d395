"""The driver's keeper pool when a keeper's process does not come up: the hosts start beside the
keepers, so a keeper late past its start timeout is found after the hosts' run calls."""

import pytest

from jaxlaunch.contract.protocol import CheckpointConfig


def test_a_keeper_that_does_not_start_in_time_is_stopped_dropped_and_fails_the_group_start(monkeypatch):
    from jaxlaunch.launcher.cluster import keepers  # imports Ray (this module must import without it)

    pool = keepers.KeeperPool(CheckpointConfig(memory_tier=False))  # no orphan sweep of this machine
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
