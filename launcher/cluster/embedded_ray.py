"""A local Ray head node that belongs to the launcher and to nothing else.

Why not `ray.init(address="local")`: that starts Ray's daemons (GCS, raylet, agents) as children of the
driver, in the driver's process group. Then

* a signal to the launcher's process group (Slurm's scancel, systemd, a container runtime) kills Ray at
  once, before the driver, which catches SIGTERM/SIGINT, can have the hosts save a checkpoint;
* after a SIGKILL of the driver, `ray::DashboardAgent` and `ray::RuntimeEnvAgent` live on forever;
* nothing tells the driver quickly that the node died.

So this module runs `ray start --head` (not `--block`) in a session of its own, under a small supervisor
(this file run as a script). The supervisor is a child subreaper, so every Ray process orphaned by the
exit of `ray start` or of the raylet becomes its child: its process tree is the whole instance. It holds
the read end of a pipe whose write end only the driver holds; end of file on it means the driver is gone,
even after a SIGKILL, and then it kills the whole instance and exits. It does the same when the GCS
exits (the node is dead); when the raylet exits (the node is dead too), it kills every process but the
GCS, which stays until the driver stops the instance: a call the driver made to the GCS just then
(creating a placement group or an actor) returns, where with the GCS gone it would block for 60 s
before Ray ended the driver. The driver's `alive()` checks the raylet and the GCS itself, so it turns
False as soon as either is gone (a SIGKILL of the node's `ray::DashboardAgent` takes the raylet down
within about 0.05 s). `EmbeddedRay.stop()` closes the pipe on purpose, and kills whatever is left by the instance's own
handles (its process tree and its session), never machine-wide: `ray stop` would stop every Ray on the
machine.

Token authentication: Ray 2.60 turns it on for `ray.init(address="local")`, but `ray.init(address=...)`
only uses it when RAY_AUTH_MODE=token was in the environment when Ray read its configuration (at import),
so `start()` sets it in this process, refreshes Ray's configuration and makes the token if there is none,
as `ray.init(address="local")` does. The head gets the same environment, so driver and head share the
user's token (~/.ray/auth_token). A RAY_AUTH_MODE the user set is respected on both sides.

Side effects on other Ray use of the machine: none known. The instance lives in its own temporary
directory (so `ray start` writes its `ray_current_cluster` file there, not in /tmp/ray where a later
`ray.init()` would find it), and every port it listens on is chosen free rather than Ray's fixed defaults.

Limits: Linux only (a child subreaper, /proc). Compared with `ray.init(address="local")` the instance has
two more processes, the small supervisor and the Ray client server that `ray start` insists on (about
100 MB). If the supervisor itself is SIGKILLed, the instance runs on until `stop()` (which finds it by its
session); if the driver then dies without `stop()`, nothing is left to clean up. A child the driver forks
without exec holds the pipe's write end, so the instance outlives the driver until that child exits too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pathlib
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

import psutil
from jaxlaunch.launcher.compat import ray as ray_compat

START_TIMEOUT_S = 180.0
"""How long `start()` waits for the node; it takes about 5 s on a 2-core machine, 10 s and more when
other work competes for the cores."""
STOP_GRACE_S = 15.0
"""How long `stop()` lets the supervisor tear the instance down before killing what is left itself."""
KILL_TIMEOUT_S = 10.0
"""How long a teardown keeps killing and reaping before it gives up on a process that will not die."""
HEALTH_POLL_S = 1.0
"""The supervisor learns of a dead raylet or GCS from SIGCHLD at once; this poll is only a safety net
(seconds)."""
KILL_POLL_S = 0.05
STARTUP_POLL_S = 0.2
LOG_TAIL_CHARS = 2000
NODE_DAEMONS = ("raylet", "gcs_server")
"""The processes without which the node is dead (process names, as /proc reports them)."""
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


class EmbeddedRayError(RuntimeError):
    """The embedded node could not be started."""


class EmbeddedRay:
    """A local Ray head node owned by this launcher: started in its own session under a supervisor that
    outlives no driver, stopped by its own handles.

    Connect with `ray.init(address=instance.start())`; `alive()` says whether the node still runs; call
    `stop()` after `ray.shutdown()` (it is idempotent, and also safe when `start()` failed).
    """

    def __init__(self, num_cpus: int, *, temp_dir: str | None = None, env: dict[str, str] | None = None):
        """`temp_dir` holds the node's session directory and logs, and is kept; without it the instance
        makes one and removes it when it stops. `env` is added to the environment of Ray's processes
        (and so of the workers, the actors and the tasks)."""
        self.num_cpus = num_cpus
        self.env = dict(env or {})
        self._given_temp_dir = temp_dir
        self.temp_dir: str | None = None
        self.address: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None
        self._daemons: list[psutil.Process] = []
        self._started_at: float | None = None
        """When the supervisor's process was created: a process with its pid made later is another's."""

    @property
    def supervisor_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> str:
        """Start the node and return its address for `ray.init(address=...)`."""
        if self._proc is not None:
            raise EmbeddedRayError("this EmbeddedRay was already started; make a new one")
        ray_compat.enable_token_auth()
        owns_temp_dir = self._given_temp_dir is None
        # Short and under /tmp: Ray's unix sockets live below it, and their paths may not exceed 107 bytes.
        self.temp_dir = self._given_temp_dir or tempfile.mkdtemp(prefix="jaxlaunch-ray-", dir="/tmp")
        pathlib.Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        read_end, self._lifeline = os.pipe()  # both close on exec, except where pass_fds says otherwise
        env = {**os.environ, **self.env}
        # This instance's processes must never be directed to another cluster.
        env.pop("RAY_ADDRESS", None)
        try:
            with open(os.path.join(self.temp_dir, "supervisor.log"), "ab") as supervisor_log:
                self._proc = subprocess.Popen(
                    # -P: running this file must not put launcher/ first on sys.path, where its modules
                    # would shadow the standard library's; the supervisor needs only it and psutil.
                    [sys.executable, "-P", os.path.abspath(__file__), "--lifeline-fd", str(read_end),
                     "--temp-dir", self.temp_dir, *(["--remove-temp-dir"] if owns_temp_dir else []),
                     "--", *_ray_start_args(self.num_cpus, self.temp_dir)],
                    pass_fds=(read_end,), start_new_session=True, env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=supervisor_log,
                )
        finally:
            os.close(read_end)
        with contextlib.suppress(psutil.Error):
            self._started_at = psutil.Process(self._proc.pid).create_time()
        try:
            ready = self._await_ready()
        except BaseException:
            self.stop()
            raise
        try:
            self._daemons = [psutil.Process(pid) for pid in ready["daemons"]]
        except psutil.NoSuchProcess:
            self.stop()
            raise EmbeddedRayError(f"the Ray node died as it started{self._log_tail()}") from None
        self.address = ready["address"]
        return self.address

    def _await_ready(self) -> dict:
        """The supervisor's one line: the address and the node daemons' pids, or why it failed."""
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        readable, _, _ = select.select([stdout], [], [], START_TIMEOUT_S)
        line = stdout.readline() if readable else b""
        stdout.close()
        if not line:
            if self._proc.poll() is not None:
                raise EmbeddedRayError(f"the supervisor exited with {self._proc.returncode}{self._log_tail()}")
            raise EmbeddedRayError(f"the Ray node did not start within {START_TIMEOUT_S:g} s{self._log_tail()}")
        ready = json.loads(line)
        if "error" in ready:
            raise EmbeddedRayError(ready["error"])
        return ready

    def _log_tail(self) -> str:
        if self.temp_dir is None:
            return ""
        tails = []
        for name in ("supervisor.log", "ray_start.log"):
            try:
                tail = pathlib.Path(self.temp_dir, name).read_text(errors="replace")[-LOG_TAIL_CHARS:]
            except OSError:
                continue
            if tail.strip():
                tails.append(f"\n--- {name}:\n{tail}")
        return "".join(tails)

    def alive(self) -> bool:
        """False once the node is dead: the raylet or the GCS exited, or the supervisor did."""
        if self._proc is None or self.address is None or self._proc.poll() is not None:
            return False
        return all(_running(p) for p in self._daemons)

    def stop(self) -> None:
        """Stop every process of this instance; idempotent."""
        if self._lifeline is not None:
            os.close(self._lifeline)  # the supervisor's signal to tear the instance down
            self._lifeline = None
        if self._proc is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(STOP_GRACE_S)
        # Whatever the supervisor left (it was killed, or is stuck): its session, by our own handle.
        _kill_until_gone(self.pids, KILL_TIMEOUT_S)
        self._proc.wait()
        self.address = None
        self._daemons = []
        if self._given_temp_dir is None and self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def pids(self) -> list[int]:
        """Every live process of this instance: the supervisor's session and its process tree (the tree
        also holds a process that left the session)."""
        if self._proc is None:
            return []
        with contextlib.suppress(psutil.Error):
            now_there = psutil.Process(self._proc.pid).create_time()
            if self._started_at is not None and abs(now_there - self._started_at) > 1:
                # The pid was given to a new process: Linux reuses no pid still some session's id, so
                # none of this instance's processes is left, and that session is another's.
                return []
        found = set(_session_members(self._proc.pid))
        with contextlib.suppress(psutil.Error):
            supervisor = psutil.Process(self._proc.pid)
            if self._proc.returncode is None and _running(supervisor):
                found.add(supervisor.pid)
                found.update(p.pid for p in supervisor.children(recursive=True) if _running(p))
        return sorted(found)

    def __enter__(self) -> EmbeddedRay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ray_start_args(num_cpus: int, temp_dir: str) -> list[str]:
    ports = _free_ports(4)
    return [
        "--head", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
        "--include-dashboard=false", "--disable-usage-stats",
        # Ray's defaults are fixed ports (6379, 8265, 52365, 10001), taken by any other Ray on the machine:
        # a taken dashboard-agent port costs about 4 s of retries. `ray start` refuses to go without a Ray
        # client server, so it gets a port too.
        f"--port={ports[0]}", f"--dashboard-port={ports[1]}", f"--dashboard-agent-listen-port={ports[2]}",
        f"--ray-client-server-port={ports[3]}",
        f"--system-config={json.dumps(ray_compat.HEAD_SYSTEM_CONFIG)}",
    ]


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("", 0))  # all bound at once, so the ports differ
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _session_members(sid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return members


def _kill_until_gone(
    find: Callable[[], list[int]], timeout_s: float, reap: Callable[[], object] = lambda: None
) -> bool:
    """SIGKILL what `find()` returns until it returns nothing (a dying raylet may still fork a worker);
    True when nothing is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        reap()
        pids = [pid for pid in find() if pid != os.getpid()]
        if not pids:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(KILL_POLL_S)


# ---- the supervisor: this file run as a script, a session leader with the instance below it ----


def _reap_children() -> set[int]:
    reaped: set[int] = set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.add(pid)


def _instance_pids() -> list[int]:
    me = psutil.Process()
    found = set(_session_members(os.getpid()))
    found.update(p.pid for p in me.children(recursive=True) if _running(p))
    found.discard(os.getpid())
    return sorted(found)


def _report(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()
    # The driver reads one line; a later write must not fail on a closed pipe.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _supervise(lifeline: int, temp_dir: str, remove_temp_dir: bool, ray_start_args: list[str]) -> int:
    # Orphans (Ray's daemons once `ray start` exits, workers once the raylet dies) become our children
    # rather than init's, so our process tree is the whole instance and we reap what we kill.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}", file=sys.stderr)
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    # Handlers, not SIG_IGN: an ignored signal stays ignored across exec, in every Ray process below us.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, request_stop)
    # SIGCHLD wakes the select below through this pipe, so a dead raylet or GCS is seen at once.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)

    def teardown(reason: str) -> int:
        print(f"{time.strftime('%H:%M:%S')} tearing down: {reason}", file=sys.stderr, flush=True)
        left = not _kill_until_gone(_instance_pids, KILL_TIMEOUT_S, _reap_children)
        _reap_children()
        if remove_temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        return 1 if left else 0

    with open(os.path.join(temp_dir, "ray_start.log"), "ab") as log:
        ray_start = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", *ray_start_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    while ray_start.poll() is None:
        readable, _, _ = select.select([lifeline], [], [], STARTUP_POLL_S)
        if (readable and not os.read(lifeline, 1)) or stop_requested:
            ray_start.kill()
            ray_start.wait()
            return teardown("stopped during startup")
    if ray_start.returncode != 0:
        tail = pathlib.Path(temp_dir, "ray_start.log").read_text(errors="replace")[-LOG_TAIL_CHARS:]
        _report({"error": f"`ray start` exited with {ray_start.returncode}:\n{tail}"})
        return teardown("ray start failed")
    daemons = {}
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.name() in NODE_DAEMONS:
                daemons[child.name()] = child.pid
    if set(daemons) != set(NODE_DAEMONS):
        _report({"error": f"`ray start` succeeded but left only {sorted(daemons)} of {list(NODE_DAEMONS)}"})
        return teardown("node daemons missing")
    address = pathlib.Path(temp_dir, "ray_current_cluster").read_text().strip()
    _report({"address": address, "daemons": sorted(daemons.values())})

    daemon_pids = set(daemons.values())
    gcs = daemons["gcs_server"]
    while True:
        readable, _, _ = select.select([lifeline, wake_r], [], [], HEALTH_POLL_S)
        if lifeline in readable and not os.read(lifeline, 1):
            return teardown("driver gone or stop requested")
        if stop_requested:
            return teardown("signalled to stop")
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        dead = daemon_pids & _reap_children()
        dead |= {pid for pid in daemon_pids - dead if not psutil.pid_exists(pid)}
        if dead and gcs not in dead:
            # The raylet died: the node is dead, but the GCS is kept until the driver stops the instance
            # (or dies). A driver's call to the GCS in flight at that moment (creating a placement group
            # or an actor) then returns, where with the GCS gone it would block for 60 s before Ray
            # ended the driver.
            print(f"{time.strftime('%H:%M:%S')} the raylet exited: the node is dead; stopping all but the GCS",
                  file=sys.stderr, flush=True)
            _kill_until_gone(lambda: [pid for pid in _instance_pids() if pid != gcs], KILL_TIMEOUT_S, _reap_children)
            daemon_pids = {gcs}
            continue
        if dead:
            return teardown(f"node daemon(s) {sorted(dead)} exited: the node is dead")


def _main(argv: Iterable[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Supervise an embedded Ray head.")
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--remove-temp-dir", action="store_true")
    parser.add_argument("ray_start_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(list(argv))
    ray_start_args = args.ray_start_args[1:] if args.ray_start_args[:1] == ["--"] else args.ray_start_args
    return _supervise(args.lifeline_fd, args.temp_dir, args.remove_temp_dir, ray_start_args)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
