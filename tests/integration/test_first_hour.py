"""A new user's first launches, read as they see them: the real command line under a pseudo-terminal
of 80 columns, in a project folder of its own."""

import os
import re
import subprocess
import sys
import termios

import pytest

from tests.integration.helpers import EXAMPLES, LAUNCH_TIMEOUT_S, ROOT, _env, events

COLUMNS = 80
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
RUN = re.compile(r"runs/minimal-\d{8}-\d{6}")


def in_terminal(*args: str, cwd) -> tuple[int, str]:
    """Runs the launcher with its output on a pseudo-terminal of 80 columns; returns the exit code
    and the text the terminal received (escape sequences removed, carriage returns as line ends)."""
    leader, follower = os.openpty()
    termios.tcsetwinsize(follower, (24, COLUMNS))
    env = {**_env(), "TERM": "xterm-256color"}
    env.pop("COLUMNS")
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the follower side closed: the launcher and its children are done
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = proc.wait(timeout=LAUNCH_TIMEOUT_S)
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    text = ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    return code, text.replace("\r\n", "\n").replace("\r", "\n")


@pytest.fixture
def project(tmp_path):
    return tmp_path


def test_a_first_hour_at_80_columns(project):
    minimal = ("--entry", f"{EXAMPLES / 'minimal.py'}:main", "--hosts", "2")
    code, first = in_terminal(*minimal, "--steps", "40", "--save-every", "10", "--inject", "kill@step=25,host=1",
                              cwd=project)
    assert code == 0, first
    lines = first.splitlines()
    started = next(line for line in lines if line.strip())
    assert re.fullmatch(rf"run directory: {RUN.pattern}", started), f"the run's place comes first: {started!r}"
    run_dir = project / RUN.search(started).group()
    assert events(run_dir, "job_ended")[0]["status"] == "finished"

    assert "…" not in first, "no table cell or line is cut short"
    header = next(line for line in lines if line.split()[:1] == ["#"])
    assert header.split() == ["#", "hosts", "data×model", "steps", "from", "ended", "host", "detect", "recover"]
    rows = [line.split() for line in lines[lines.index(header) + 1:lines.index(header) + 3]]
    assert [row[5] for row in rows] == ["crashed", "finished"] and rows[0][6] == "1"
    assert f"report: jaxlaunch report {run_dir.relative_to(project)}" in lines, "the command to copy is one line"
    assert f"picture: {run_dir.relative_to(project)}/report.png" in lines

    # The README's next command, in the same folder: a run of its own rather than "not empty".
    code, second = in_terminal(*minimal, "--steps", "20", "--save-every", "10", cwd=project)
    assert code == 0, second
    other = RUN.search(second).group()
    assert other != str(run_dir.relative_to(project))

    # --resume without --run-dir names the run it continues: the newest of the entry.
    code, resumed = in_terminal(*minimal, "--resume", "--steps", "30", cwd=project)
    assert code == 0, resumed
    assert f"resuming {other} (the newest of 2 runs of minimal; --run-dir to choose)" in resumed.splitlines()
    assert [e["steps"] for e in events(project / other, "launch")] == [20, 30]


def test_resume_without_a_run_of_the_entry_is_refused_with_the_runs_there(project):
    (project / "runs" / "lm-20260101-000000").mkdir(parents=True)
    (project / "runs" / "lm-20260101-000000" / "config.json").write_text("{}")
    result = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--entry", f"{EXAMPLES / 'minimal.py'}:main",
                             "--resume"], cwd=project, capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --resume: no run of minimal under runs/ (runs there: "
                                     "lm-20260101-000000); pass the --run-dir of the run to continue, or --resume "
                                     "auto to start one")
