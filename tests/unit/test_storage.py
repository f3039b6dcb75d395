"""The one disk-space check the driver (before a resumed run) and the hosts (once they know the
state's size) share."""

import shutil

from jaxlaunch.contract.storage import short_of_space


def test_checkpoints_that_do_not_fit_are_reported_with_what_is_free_and_needed(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    short = short_of_space(tmp_path / "checkpoints", free // 2, 4)
    assert short is not None and short.checkpoints == 4 and short.needed_bytes == free // 2 * 4
    assert short.free_bytes > 0 and str(tmp_path / "checkpoints") in short.message and "4 checkpoints" in short.message
    assert short_of_space(tmp_path / "checkpoints", 1000, 4) is None
