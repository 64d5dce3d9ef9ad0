"""Test-side name of :mod:`convstate.embedded` (private servers on free loopback ports), and
:func:`frozen`: a server that stops answering (SIGSTOP), for the tests of timeouts and retries.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from convstate.embedded import (
    ENGINE_ENV,
    ENGINES,
    SERVER_ENV,
    EngineNotFoundError,
    RedisServer,
    binary_version,
    default_engine,
    find_server_binary,
)

__all__ = [
    "ENGINES",
    "ENGINE_ENV",
    "SERVER_ENV",
    "EngineNotFoundError",
    "RedisServer",
    "binary_version",
    "default_engine",
    "find_server_binary",
    "frozen",
    "thaw",
]


def thaw(server: RedisServer) -> None:
    """SIGCONT: a frozen server runs again (a no-op for one that runs)."""
    if server.pid is not None:
        os.kill(server.pid, signal.SIGCONT)


@contextlib.contextmanager
def frozen(server: RedisServer, *, thaw_after: float | None = None) -> Iterator[None]:
    """Freeze ``server`` (SIGSTOP) for the block: it keeps its sockets, so the kernel still
    accepts connections and data, but nothing answers, as with a paused VM. ``thaw_after``
    seconds continues it (SIGCONT) from a timer while the block runs; it is always continued
    when the block ends, whatever happened. Only for a server of the test's own (the
    ``private_server`` fixture), never the session's shared one."""
    pid = server.pid
    assert pid is not None, "the server is not running"
    timer = None if thaw_after is None else threading.Timer(thaw_after, thaw, (server,))
    os.kill(pid, signal.SIGSTOP)
    try:
        if timer is not None:
            timer.start()
        yield
    finally:
        if timer is not None:
            timer.cancel()
        thaw(server)
