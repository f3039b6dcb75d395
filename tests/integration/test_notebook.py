"""A notebook is a place to launch from: a real Jupyter kernel, run headless, whose cells define an NNX
model, its loop and `main`, launch it with a host killed, stop it with the stop button, and resume it
in the next cell; the losses equal, bit for bit, those of the same code launched from a file."""

import asyncio
import json
import pathlib

import nbformat
from nbclient import NotebookClient

from tests.integration.helpers import (
    EXAMPLES,
    _env,
    assert_no_host_left,
    attempts,
    events,
    last_step,
    ray_processes_left,
    summary,
    trajectory,
)

KERNEL_TIMEOUT_S = 600
STOP_AFTER_STEP = 130
STEPS = 1000
RESUMED_STEPS = 70
"""The resumed cell goes this far past the stop (at step 130 or later): to the file's 200 steps at least."""


def _cells(run_dir: pathlib.Path) -> list[str]:
    model = (EXAMPLES / "minimal.py").read_text()  # the same code the file run launches
    definitions, loop = model.split("def main(ctx):")
    return [
        "import jaxlaunch\n" + definitions,
        "def main(ctx):" + loop,
        f"RUN = {str(run_dir)!r}\n"
        "result = jaxlaunch.launch(main, hosts=2, steps=100, save_every=20, run_dir=RUN,\n"
        "                          inject=['kill@step=12,host=1'])\n"
        "assert result.ok and result.final_step == 100, result\n"
        "result",
        # Interrupted with the stop button (the test interrupts the kernel, as Jupyter does). Long
        # enough that the stop, not the end, ends it: the example trains 50 steps a second here.
        f"stopped = jaxlaunch.launch(main, resume=True, steps={STEPS}, save_every=100, run_dir=RUN)\n"
        "print('STOPPED', stopped.status, stopped.exit_code, stopped.final_step)",
        # Resumed to 70 steps past the stop: the rest of the stopped call's 1000 would be more of the same.
        f"final = jaxlaunch.launch(main, resume=True, steps=stopped.final_step + {RESUMED_STEPS}, run_dir=RUN)\n"
        f"assert final.ok and final.final_step == stopped.final_step + {RESUMED_STEPS}, final\n"
        "final",
        # Refused before anything starts: other code for the run, a value that cannot travel.
        "def main(ctx):\n    return None\n"
        "try:\n    jaxlaunch.launch(main, resume=True, run_dir=RUN)\n"
        "except jaxlaunch.ConfigError as err:\n    print('REFUSED', err)\n"
        "import threading\nlock = threading.Lock()\n"
        "def uses_lock(ctx):\n    with lock:\n        return None\n"
        "try:\n    jaxlaunch.launch(uses_lock, hosts=2, run_dir=RUN + '-other')\n"
        "except jaxlaunch.ConfigError as err:\n    print('REFUSED', err)\n",
    ]


async def _run(notebook, cwd: pathlib.Path, run_dir: pathlib.Path, stop_cell: int) -> list[dict]:
    """Runs every cell in one kernel; presses the stop button once `stop_cell` has trained past
    STOP_AFTER_STEP. Returns, after the stop cell, what was left running."""
    client = NotebookClient(notebook, timeout=KERNEL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    left = {}
    async with client.async_setup_kernel(env=_env()):
        for index, cell in enumerate(notebook.cells):
            running = asyncio.create_task(client.async_execute_cell(cell, index))
            if index == stop_cell:
                while last_step(run_dir) < STOP_AFTER_STEP and not running.done():
                    await asyncio.sleep(0.2)
                await client.km.interrupt_kernel()
            await running
            if index == stop_cell:
                left = {"ray": ray_processes_left(run_dir)}
    return left


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_a_notebook_launches_survives_a_kill_stops_with_the_stop_button_and_resumes(minimal_reference, tmp_path):
    run_dir = tmp_path / "run"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in _cells(run_dir)])
    left = asyncio.run(_run(notebook, tmp_path, run_dir, stop_cell=3))
    launched, stop, resumed, refusals = notebook.cells[2], notebook.cells[3], notebook.cells[4], notebook.cells[5]

    # The kill: one restart, from scratch (no checkpoint before step 12).
    table = attempts(run_dir)
    assert [a["cause"] for a in table] == ["crashed", "finished", "stopped", "finished"], table
    assert table[0]["failed_host"] == 1
    # The stop button: every host saved one common step, the call returned a stopped result, and
    # nothing was left running before the next cell.
    status, code, step = _text(stop).split("STOPPED ")[1].split()
    assert (status, code) == ("stopped", "130") and int(step) >= STOP_AFTER_STEP
    assert events(run_dir, "restored")[-1]["step"] == int(step), "resumed from the step every host saved"
    assert left == {"ray": []}
    assert_no_host_left(run_dir)
    # Bit for bit the file's losses (its 200 steps), and every step once.
    ours = trajectory(run_dir)
    assert sorted(ours) == list(range(1, int(step) + RESUMED_STEPS + 1))
    assert {s: loss for s, loss in ours.items() if s <= 200} == trajectory(minimal_reference)
    assert summary(run_dir)["entry"].startswith("main (by value, code ")

    # What the cells show: a table with the report inline, and progress lines, not a redraw per step.
    for cell in (launched, resumed):
        shown = [o for o in cell.outputs if o.output_type == "execute_result"][0]["data"]
        assert "<table>" in shown["text/html"] and "data:image/png;base64," in shown["text/html"]
        assert "| status | finished |" in shown["text/markdown"]
        assert len(cell.outputs) < 40, json.dumps(cell.outputs)[:3000]
    refused = [line for line in _text(refusals).splitlines() if line.startswith("REFUSED")]
    assert "pass --allow-change entry" in refused[0]
    assert "it uses 'lock', a lock: cannot pickle" in refused[1]
