"""Functions no host can import by name (defined in `__main__`, a notebook, `python -`, or nested)
travel by value: what they use is checked before anything starts, their fingerprint ignores where
their code sits, and a resume runs the same code or is refused."""

import pathlib
import threading

import numpy as np
import pytest
from jaxlaunch.launcher.configuration.job import prepare

from jaxlaunch.contract import entry as entry_lib
from jaxlaunch.contract import events
from jaxlaunch.contract.entry import LaunchInsideHostError
from jaxlaunch.contract.protocol import ConfigError

CELL = '''
import numpy as np
from flax import nnx

SCALE = 3


class MLP(nnx.Module):
    def __init__(self, rngs):
        super().__init__()
        self.linear = nnx.Linear(2, 1, rngs=rngs)


@nnx.jit
def forward(model, x):
    return model.linear(x) * SCALE


def main(ctx):
    model = MLP(nnx.Rngs(0))
    if ctx in {"a", "b"}:
        return None
    return float(forward(model, np.ones((1, 2), np.float32))[0, 0])
'''


def prepared(entry: entry_lib.Entry, **given):
    """What `jaxlaunch.launch(function, **given)` prepares."""
    return prepare({"entry": str(entry.ref), **given}, found=entry)


def defined(source: str, filename: str = "/tmp/ipykernel_1234/1.py"):
    """`main` as a notebook cell defines it: in `__main__`, in a file of the kernel's naming."""
    namespace = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["main"]


def test_a_function_of_main_travels_by_value_and_runs_without_its_script():
    entry = entry_lib.from_callable(defined(CELL))
    assert entry.ref.payload is not None and str(entry.ref).startswith("main (by value, code ")
    # What a host does: unpickle it with nothing of the cell's namespace around.
    function = entry_lib.load_entry(entry.ref)
    assert function(None) == entry.function(None)


def test_the_fingerprint_ignores_where_the_code_sits_and_sees_what_it_does():
    base = entry_lib.from_callable(defined(CELL)).ref.fingerprint
    elsewhere = entry_lib.from_callable(defined("\n\n# a comment\n" + CELL, "/tmp/ipykernel_99/7.py")).ref.fingerprint
    assert elsewhere == base, "another cell, kernel or line number is the same code"
    for old, new in (("SCALE = 3", "SCALE = 4"), ("* SCALE", "* SCALE + 1"), ("nnx.Linear(2, 1,", "nnx.Linear(2, 2,")):
        changed = entry_lib.from_callable(defined(CELL.replace(old, new))).ref.fingerprint
        assert changed != base, f"{old} -> {new} is other code"


def test_nested_functions_and_lambdas_travel_by_value():
    def make(scale):
        def main(ctx):
            return scale * 2
        return main

    entry = entry_lib.from_callable(make(21))
    assert entry_lib.load_entry(entry.ref)(None) == 42
    assert entry_lib.load_entry(entry_lib.from_callable(lambda ctx: "hi").ref)(None) == "hi"


def test_a_value_that_cannot_travel_is_named_before_anything_starts(tmp_path):
    import jax.numpy as jnp

    lock = threading.Lock()
    weights = jnp.ones(3)
    log = open(tmp_path / "log.txt", "w")  # noqa: SIM115 - the unpicklable value under test

    def with_lock(ctx):
        with lock:
            return 1

    def helper(x):
        return weights + x

    def with_array(ctx):
        return helper(1)

    def with_file(ctx):
        log.write("x")

    cases = [(with_lock, "uses 'lock', a lock: cannot pickle"),
             (with_array, "uses 'weights', through 'helper', a JAX array on the driver; make it inside the function"),
             (with_file, "uses 'log', a TextIOWrapper")]
    try:
        for function, message in cases:
            with pytest.raises(ConfigError, match=message):
                prepared(entry_lib.from_callable(function), run_dir=str(tmp_path / "run"))
    finally:
        log.close()


def test_resume_runs_the_same_code_or_is_refused(tmp_path):
    from jaxlaunch.launcher.records.runs import RunDir

    run_dir = str(tmp_path / "run")
    first = prepared(entry_lib.from_callable(defined(CELL)), run_dir=run_dir, hosts=2)
    run = RunDir(run_dir)
    run.create()
    run.save_config(first.job.to_dict())
    run.event(events.Launch(fingerprint=None))
    again = prepared(entry_lib.from_callable(defined(CELL, "/tmp/other.py")), run_dir=run_dir, resume=True)
    assert again.job.entry == first.job.entry and again.entry.ref.payload is not None
    edited = entry_lib.from_callable(defined(CELL.replace("SCALE = 3", "SCALE = 5")))
    with pytest.raises(ConfigError, match=r"would change the run: entry 'main \(by value, code [0-9a-f]+\)' -> "
                                          r"'main \(by value, code [0-9a-f]+\)'; pass --allow-change entry"):
        prepared(edited, run_dir=run_dir, resume=True)
    accepted = prepared(edited, run_dir=run_dir, resume=True, allow_change=["entry"])
    assert accepted.entry.ref.fingerprint == edited.ref.fingerprint
    with pytest.raises(ConfigError, match=r"was sent from Python .*jaxlaunch.launch\(main, resume=True"):
        prepare({"run_dir": run_dir, "resume": True})  # the command line has no function to send


def test_launch_inside_a_host_is_refused(monkeypatch):
    monkeypatch.setattr(entry_lib, "_host_rank", entry_lib._host_rank)  # restored after the test
    entry_lib.mark_host_process(1)  # what a host process does as it takes its rank
    with pytest.raises(LaunchInsideHostError, match="inside host 1 of a running job.*if __name__ == "):
        entry_lib.refuse_nested_launch()  # what jaxlaunch.launch does first


def test_a_file_that_launches_when_imported_is_refused_as_an_entry(tmp_path):
    script = tmp_path / "guardless.py"
    script.write_text("import jaxlaunch\n\ndef main(ctx):\n    pass\n\njaxlaunch.launch(main, hosts=2)\n")
    with pytest.raises(ConfigError, match=r"guardless.py calls jaxlaunch.launch when it is imported .*__main__"):
        prepare({"entry": f"{script}:main", "run_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()


def test_a_script_s_function_ships_the_script_s_folder_to_a_cluster(tmp_path, monkeypatch):
    import sys
    import types

    script = tmp_path / "train.py"
    script.write_text("")
    main_module = types.ModuleType("__main__")
    main_module.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", main_module)
    ref = entry_lib.from_callable(defined(CELL)).ref
    assert ref.path == str(script)
    (tmp_path / "staging").mkdir()
    shipped, folders = entry_lib.shipped(ref, tmp_path / "staging")
    assert shipped.payload == ref.payload and shipped.package.startswith("jaxlaunch_entry_")
    assert pathlib.Path(folders[0]).resolve() == tmp_path
    assert np.isfinite(entry_lib.load_entry(ref)(None))
