"""Drivers forked from a process that has already imported what a driver imports.

A launch's driver is `python launch.py ARGS`; about 2.3 s of the CPU of each is importing Ray, JAX,
Flax, Optax, the launcher, TensorBoard's writer and matplotlib, before it does anything of its own. The
suite runs about 150 of them on 2 cores. A test needs a fresh driver, not freshly imported libraries:
this module's server (`python -m tests.integration.forked`, one per environment) imports them once and
forks a child per launch, which then runs `launch.py` exactly as the interpreter would (`runpy`, with
its argv, working directory, standard streams, its own session when asked), and exits through the
interpreter's own exit (atexit handlers included). Nothing of the launch itself is imported before the
fork, and a child is started only with the environment the server was started with: a module that
reads the environment when imported reads the same values either way. What the imports write into it
(RAY_CLIENT_MODE, TF_CPP_MIN_LOG_LEVEL and TPU_SKIP_MDS_QUERY, as in any driver at its start;
CRC32C_SW_MODE, which tensorboardX sets in a fresh driver at its first TensorBoard write) the children
have from their start. A child's traceback shows runpy's and this module's frames above launch.py's.

`ForkedLaunch` is what `subprocess.Popen` is to the tests (pid, poll, wait, communicate, signals,
returncode); exit statuses come from the server, the child's parent, over the server's socket.
`JAXLAUNCH_TESTS_FRESH_DRIVER=1` starts every driver as a plain subprocess instead."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import pathlib
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch.py"
PRELOAD = ("jaxlaunch.launcher.cli", "jaxlaunch.launcher.runner", "ray", "jax", "jax.numpy", "flax.nnx", "optax",
           "tensorboardX", "matplotlib.figure", "matplotlib.cm")
"""What a driver of the examples imports before and while it runs (measured with `python -X importtime`)."""
READY_TIMEOUT_S = 120
KILLED_TIMEOUT_S = 30


# -- the server: one process, a child per launch ----------------------------------------------------
def serve(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """Answer requests until the test process closes the socket and every child has exited. In a forked
    child it returns the child's request and streams, to be run outside every frame of this loop."""
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, request id)
    listening = True
    while listening or children:
        readable, _, _ = select.select(([sock] if listening else []) + list(children), [], [])
        for fd in readable:
            if fd in children:
                pid, number = children.pop(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                if listening:
                    _send(sock, {"exited": number, "code": os.waitstatus_to_exitcode(status)})
                continue
            message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
            if not message:
                listening = False
                continue
            request = json.loads(message)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                sock.close()  # through its object, which would otherwise close the number again at exit
                for own in children:
                    os.close(own)
                return request, fds
            for received in fds:
                os.close(received)
            children[os.pidfd_open(pid)] = (pid, request["id"])
            _send(sock, {"id": request["id"], "pid": pid})
    return None


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(json.dumps(message).encode())


def run_child(request: dict[str, Any], fds: list[int]) -> None:
    """Become `python launch.py ARGS` in the request's directory, with its streams."""
    if request["new_session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    sys.argv = [str(LAUNCH), *request["args"]]
    sys.path[0] = str(LAUNCH.parent)  # as `python launch.py` puts the script's folder first
    runpy.run_path(str(LAUNCH), run_name="__main__")
    sys.exit(0)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the imported objects stay out of the children's collections: their pages stay shared
    _send(sock, {"ready": os.getpid()})
    child = serve(sock)
    if child is not None:
        run_child(*child)


# -- the test's side ---------------------------------------------------------------------------------
class Server:
    """One server and the socket to it; its children's pids and exit statuses, by request, as they come."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.forked", str(theirs.fileno())],
                                     cwd=ROOT, env=env, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL)
        theirs.close()
        self.lock = threading.Lock()
        self.ready = False
        self.statuses: dict[int, int] = {}
        self.spawned: dict[int, int] = {}
        self.requests = 0
        if not self._until(lambda: self.ready, READY_TIMEOUT_S):
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the driver server {self.proc.pid} did not import within {READY_TIMEOUT_S} s")

    def _pump(self, timeout: float) -> None:
        """Read every message the server sent, waiting up to `timeout` for the first (0: only what is there)."""
        with self.lock:
            while select.select([self.sock], [], [], timeout)[0]:
                timeout = 0
                data = self.sock.recv(1 << 16)
                if not data:
                    raise RuntimeError(f"the driver server {self.proc.pid} is gone (exit {self.proc.wait()})")
                message = json.loads(data)
                if "ready" in message:
                    self.ready = True
                elif "exited" in message:
                    self.statuses[message["exited"]] = message["code"]
                else:
                    self.spawned[message["id"]] = message["pid"]

    def _until(self, done, timeout: float | None) -> bool:
        """Whether `done()` came true within `timeout` (None: no limit); reads the socket at least once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                self._pump(0)
                return done()
            self._pump(min(remaining, 1.0))
        return True

    def fork(self, args: list[str], cwd: pathlib.Path, new_session: bool,
             streams: tuple[int, int, int]) -> tuple[int, int]:
        """The request's number and the child's pid."""
        with self.lock:
            self.requests += 1
            number = self.requests
            request = {"id": number, "args": args, "cwd": str(cwd), "new_session": new_session}
            socket.send_fds(self.sock, [json.dumps(request).encode()], list(streams))
        if not self._until(lambda: number in self.spawned, READY_TIMEOUT_S):
            raise RuntimeError(f"the driver server {self.proc.pid} did not fork within {READY_TIMEOUT_S} s")
        return number, self.spawned.pop(number)

    def status(self, number: int, timeout: float | None) -> int | None:
        """Request `number`'s exit code once it exited (-N for signal N), else None after `timeout`."""
        self._until(lambda: number in self.statuses, timeout)
        return self.statuses.pop(number, None)

    def stop(self) -> None:
        """The server exits once its last child has (a launch still running is the test's to stop)."""
        self.sock.close()


class ForkedLaunch:
    """A forked driver as the tests use a `subprocess.Popen` of `launch.py` (text streams)."""

    def __init__(self, server: Server, args: list[str], cwd: pathlib.Path, new_session: bool):
        self.server, self.args = server, [sys.executable, str(LAUNCH), *args]
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            stdin = os.dup(0)  # as subprocess.run inherits it
        except OSError:
            stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            self.number, self.pid = server.fork(args, cwd, new_session, (stdin, out_w, err_w))
        finally:
            for fd in (stdin, out_w, err_w):
                os.close(fd)
        try:  # signals go through it: once the server has reaped the child, its pid may be another's
            self.pidfd: int | None = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.pidfd = None  # exited and reaped already
        self.stdout = os.fdopen(out_r, "r")
        self.stderr = os.fdopen(err_r, "r")
        self.returncode: int | None = None
        self._read: dict[str, list[str]] = {}
        self._readers: list[threading.Thread] = []

    def poll(self) -> int | None:
        if self.returncode is None:
            self._exited(self.server.status(self.number, 0))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._exited(self.server.status(self.number, timeout))
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode

    def _exited(self, code: int | None) -> None:
        if code is not None:
            self.returncode = code
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        if not self._readers:
            for name, stream in (("stdout", self.stdout), ("stderr", self.stderr)):
                chunks = self._read.setdefault(name, [])
                reader = threading.Thread(target=lambda s=stream, c=chunks: c.append(s.read()), daemon=True)
                reader.start()
                self._readers.append(reader)
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in self._readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return "".join(self._read["stdout"]), "".join(self._read["stderr"])

    def send_signal(self, signum: int) -> None:
        if self.poll() is None and self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):  # exited since: as Popen does
                signal.pidfd_send_signal(self.pidfd, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Drivers:
    """The session's servers, one for each environment launches were started with (at most
    `MAX_SERVERS`; a launch with yet another environment is a plain subprocess)."""

    MAX_SERVERS = 3

    def __init__(self) -> None:
        self.fresh = bool(os.environ.get("JAXLAUNCH_TESTS_FRESH_DRIVER"))
        self.servers: list[Server] = []

    def start(self, args: list[str], cwd: pathlib.Path, env: dict[str, str], new_session: bool = False,
              fork: bool = True) -> ForkedLaunch | subprocess.Popen:
        """A launch; `fork=False` (an environment of the test's own, for one launch) a plain subprocess."""
        server = next((s for s in self.servers if s.env == env), None) if fork else None
        if server is None and fork and not self.fresh and len(self.servers) < self.MAX_SERVERS:
            server = Server(env)
            self.servers.append(server)
        if server is None:
            return subprocess.Popen([sys.executable, str(LAUNCH), *args], cwd=cwd, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, start_new_session=new_session)
        return ForkedLaunch(server, args, cwd, new_session)

    def run(self, args: list[str], cwd: pathlib.Path, env: dict[str, str], timeout: float,
            fork: bool = True) -> subprocess.CompletedProcess:
        """As `subprocess.run(..., capture_output=True, text=True, timeout=...)`: killed at the timeout."""
        proc = self.start(args, cwd, env, fork=fork)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as late:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # a grandchild may hold the pipes
                late.output, late.stderr = proc.communicate(timeout=KILLED_TIMEOUT_S)
            raise
        assert proc.returncode is not None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()


if __name__ == "__main__":
    main()
