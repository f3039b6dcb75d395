"""How a user tests their own training function with jaxlaunch, in their own pytest: run it on 2
hosts with a host killed mid-run, and check that the result equals an uninterrupted run's.

    pytest examples/test_user_job.py
"""

from minimal import main  # the user's training function, beside this test

import jaxlaunch


def test_a_killed_host_does_not_change_my_training(tmp_path):
    clean = jaxlaunch.launch(main, hosts=2, steps=12, save_every=4, run_dir=str(tmp_path / "clean"), quiet=True)
    killed = jaxlaunch.launch(main, hosts=2, steps=12, save_every=4, run_dir=str(tmp_path / "killed"), quiet=True,
                              inject=["kill@step=6,host=1"])

    assert clean.ok and killed.ok
    assert [a.cause for a in killed.attempts] == ["crashed", "finished"]
    assert {s: m["loss"] for s, m in killed.metrics.items()} == {s: m["loss"] for s, m in clean.metrics.items()}
