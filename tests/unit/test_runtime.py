"""A host's join of `jax.distributed`: it waits for process 0's coordinator to listen, rather than
being refused and waiting out gRPC's reconnect backoff."""

import socket
import threading
import time

import pytest
from jaxlaunch.workers import runtime
from jaxlaunch.workers.runtime import wait_for_coordinator


def _bound() -> socket.socket:
    """A loopback port held by this test and not listening yet: a connection to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def test_a_host_refused_before_the_coordinator_listens_joins_once_it_does(monkeypatch):
    sock = _bound()
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    refused = threading.Event()
    connect = socket.create_connection

    def observed(*args, **kwargs):
        try:
            return connect(*args, **kwargs)
        except OSError:
            refused.set()
            raise

    monkeypatch.setattr(runtime.socket, "create_connection", observed)
    joined: list[bool] = []
    waiter = threading.Thread(target=lambda: joined.append(wait_for_coordinator(address, time.monotonic() + 60)),
                              daemon=True)
    try:
        waiter.start()
        assert refused.wait(timeout=60), "the host never tried the closed port"
        sock.listen()  # process 0 opens its service after the host was refused
        waiter.join(timeout=60)
        assert joined == [True]
    finally:
        sock.close()


def test_a_coordinator_that_never_listens_is_given_up_at_the_deadline():
    sock = _bound()
    try:
        started = time.monotonic()
        assert wait_for_coordinator(f"127.0.0.1:{sock.getsockname()[1]}", started + 0.2) is False
        assert time.monotonic() - started < 5
    finally:
        sock.close()


def test_an_ipv6_coordinator_is_reached_by_its_bracketed_address():
    sock = socket.socket(socket.AF_INET6)
    try:
        sock.bind(("::1", 0))
    except OSError:
        sock.close()
        pytest.skip("no IPv6 loopback here")
    try:
        sock.listen()
        assert wait_for_coordinator(f"[::1]:{sock.getsockname()[1]}", time.monotonic() + 60)
    finally:
        sock.close()
