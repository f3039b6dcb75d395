"""The replica's one network copy: a keeper streams a part file straight from its node's shared
memory to a listener the partner node's keeper opened (`socket.sendfile`: no copy in the sender's
memory, nor through Ray's object store, which would copy the part into plasma first), and the
listener receives it into a preallocated file in its own node's shared memory. Ray stays the control
plane: which part goes where, and the replica's adoption once it arrived, are Ray calls.

A connection starts with the launch's secret (given to every keeper at start): a process that does
not know it cannot put a file in a keeper's folder."""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import mmap
import os
import pathlib
import socket
import struct
import threading

log = logging.getLogger(__name__)
STREAM_TIMEOUT_S = 30.0
_LENGTH = struct.Struct("<I")
MAX_HEADER_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class Received:
    name: str
    nbytes: int


class ReplicaListener:
    """Accepts parts from other keepers into `directory`, each under the name its sender chose."""

    def __init__(self, directory: pathlib.Path, secret: str, host: str):
        self.directory, self.secret = directory, secret.encode()
        self.server = socket.create_server((host, 0))
        self.address = (host, self.server.getsockname()[1])
        self.closed = False
        threading.Thread(target=self._serve, name="replica-listener", daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._receive, args=(conn,), name="replica-receive", daemon=True).start()

    def _receive(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(STREAM_TIMEOUT_S)
            try:
                header = _read_message(conn)
                if not hmac.compare_digest(str(header.get("secret", "")).encode(), self.secret):
                    log.warning("a replica stream without the launch's secret was refused")
                    return
                name, nbytes = pathlib.Path(str(header["name"])).name, int(header["nbytes"])
                self._receive_into(conn, name, nbytes)
                conn.sendall(b"\x01")
            except (OSError, ValueError, KeyError) as err:
                log.warning("a replica stream broke off: %s", err)

    def _receive_into(self, conn: socket.socket, name: str, nbytes: int) -> None:
        temporary = self.directory / f".{name}.tmp"
        try:
            with open(temporary, "w+b") as f:
                f.truncate(nbytes)
                if nbytes:
                    # The pages up front: writing into a mapping of a sparse file on a full tmpfs
                    # kills the process with SIGBUS, while this fails with ENOSPC, a refused replica.
                    os.posix_fallocate(f.fileno(), 0, nbytes)
                    with mmap.mmap(f.fileno(), nbytes) as target:
                        view, done = memoryview(target), 0
                        try:
                            while done < nbytes:
                                got = conn.recv_into(view[done:])
                                if not got:
                                    raise ConnectionError(f"the sender stopped after {done} of {nbytes} bytes")
                                done += got
                        finally:
                            view.release()
            os.rename(temporary, self.directory / name)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        self.closed = True
        self.server.close()


def send(address: tuple[str, int], secret: str, path: pathlib.Path, name: str) -> int:
    """Streams the file at `path` to the listener at `address`, to be held there as `name`; returns
    the bytes sent once the listener has the whole file."""
    nbytes = path.stat().st_size
    with socket.create_connection(address, timeout=STREAM_TIMEOUT_S) as conn, open(path, "rb") as f:
        body = json.dumps({"secret": secret, "name": name, "nbytes": nbytes}).encode()
        conn.sendall(_LENGTH.pack(len(body)) + body)
        if nbytes:
            conn.sendfile(f)
        if conn.recv(1) != b"\x01":
            raise ConnectionError("the replica's keeper did not confirm the whole file")
    return nbytes


def _read_message(conn: socket.socket) -> dict:
    (length,) = _LENGTH.unpack(_read_exact(conn, _LENGTH.size))
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"a stream header of {length} bytes")
    return json.loads(_read_exact(conn, length))


def _read_exact(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(left)
        if not chunk:
            raise ConnectionError("the stream ended early")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
