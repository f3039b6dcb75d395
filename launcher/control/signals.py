"""The signals a launch takes in the main thread: SIGTERM unwinds it as a Ctrl-C does while it starts
and ends (`sigterm_unwinds`); inside the driver's loop SIGINT and SIGTERM ask for a clean stop
(`stop_signals`). Elsewhere (a launch from a user's thread) signals keep their handlers."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from jaxlaunch.launcher.control.driver import Driver
from jaxlaunch.launcher.exit_codes import Terminated


@contextlib.contextmanager
def _handled(signals: tuple[signal.Signals, ...], handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """`handler` for `signals` in the main thread while the block runs, the earlier handlers after it;
    elsewhere nothing changes (only the main thread takes signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def sigterm_unwinds() -> contextlib.AbstractContextManager[None]:
    """SIGTERM raises `Terminated` in the main thread while the launch runs (its default, ending the
    process at once, left the run's lock and the code staged for a cluster). Inside the driver's loop
    `stop_signals` takes it over."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    return _handled((signal.SIGTERM,), handler)


def stop_signals(driver: Driver) -> contextlib.AbstractContextManager[None]:
    """SIGINT and SIGTERM ask the driver for a clean stop (every host saves); a second one stops at
    once (KeyboardInterrupt, and the teardown kills every host)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if driver.stop_signal is not None:
            raise KeyboardInterrupt
        driver.request_stop(signum)

    return _handled((signal.SIGINT, signal.SIGTERM), handler)
