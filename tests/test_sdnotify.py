"""``convstate.sdnotify``: real datagrams to a unix socket the test owns, and env parsing."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from convstate.sdnotify import SdNotifier

#: sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="abstract unix sockets are Linux-only"
)


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[str]:
    """A path for a unix socket in tmp_path (or a short temp dir if tmp_path is too long)."""
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="sdn") as short:
        yield os.path.join(short, "n.sock")


@pytest.fixture
def receiver(socket_path: str) -> Iterator[socket.socket]:
    sock = _receiver(socket_path)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_sends_each_state(socket_path: str, receiver: socket.socket) -> None:
    with SdNotifier(socket_path) as notifier:
        assert notifier.enabled
        assert notifier.ready() is True
        assert notifier.watchdog() is True
        assert notifier.status("compacting 3 sessions") is True
        assert notifier.stopping() is True
        assert notifier.notify("READY=1\nSTATUS=multi") is True
    got = [receiver.recv(4096).decode() for _ in range(5)]
    assert got == [
        "READY=1",
        "WATCHDOG=1",
        "STATUS=compacting 3 sessions",
        "STOPPING=1",
        "READY=1\nSTATUS=multi",
    ]


def test_status_is_one_line(socket_path: str, receiver: socket.socket) -> None:
    with SdNotifier(socket_path) as notifier:
        assert notifier.status("draining\n2 in flight\r\n")
    assert receiver.recv(4096) == b"STATUS=draining 2 in flight"


def test_reads_notify_socket_from_env(
    clean_env: pytest.MonkeyPatch, socket_path: str, receiver: socket.socket
) -> None:
    clean_env.setenv("NOTIFY_SOCKET", socket_path)
    with SdNotifier() as notifier:
        assert notifier.enabled
        assert notifier.ready()
    assert receiver.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, ""])
def test_disabled_without_notify_socket(clean_env: pytest.MonkeyPatch, value: str | None) -> None:
    if value is not None:
        clean_env.setenv("NOTIFY_SOCKET", value)
    notifier = SdNotifier()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.status("x") is False
    assert notifier.stopping() is False
    assert notifier.watchdog_interval() is None
    notifier.close()
    assert "disabled" in repr(notifier)


def test_unsupported_address_disables(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="convstate.sdnotify"):
        notifier = SdNotifier("vsock:2:1234")
    assert not notifier.enabled
    assert notifier.ready() is False
    assert "unsupported NOTIFY_SOCKET" in caplog.text


@linux_only
def test_abstract_namespace(clean_env: pytest.MonkeyPatch) -> None:
    name = f"convstate-test-{secrets.token_hex(8)}"
    receiver = _receiver("\0" + name)
    try:
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        with SdNotifier() as notifier:
            assert notifier.enabled
            assert notifier.ready()
            assert notifier.stopping()
        assert receiver.recv(4096) == b"READY=1"
        assert receiver.recv(4096) == b"STOPPING=1"
    finally:
        receiver.close()


def test_send_failure_returns_false_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "nobody-listens.sock")
    with (
        caplog.at_level(logging.DEBUG, logger="convstate.sdnotify"),
        SdNotifier(missing) as notifier,
    ):
        assert notifier.enabled
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "sd_notify" in warnings[0].getMessage()


def test_recovers_when_the_socket_appears(socket_path: str) -> None:
    with SdNotifier(socket_path) as notifier:
        assert notifier.ready() is False
        receiver = _receiver(socket_path)
        try:
            assert notifier.ready() is True
            assert receiver.recv(4096) == b"READY=1"
        finally:
            receiver.close()


def test_close_is_idempotent_and_reopens(socket_path: str, receiver: socket.socket) -> None:
    notifier = SdNotifier(socket_path)
    notifier.close()
    assert notifier.ready()
    notifier.close()
    notifier.close()
    assert notifier.watchdog()
    notifier.close()
    assert receiver.recv(4096) == b"READY=1"
    assert receiver.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),  # WatchdogSec=30 -> ping every 15 s
        ("30000000", "self", 15.0),
        ("5000000", " self\n", 2.5),
        ("30000000", "other", None),  # the watchdog belongs to another process
        ("30000000", "", None),
        (None, None, None),
        (None, "self", None),
        ("", None, None),
        ("0", None, None),
        ("-1", None, None),
        ("thirty", None, None),
        ("1.5", None, None),
    ],
)
def test_watchdog_interval(
    clean_env: pytest.MonkeyPatch,
    socket_path: str,
    usec: str | None,
    pid: str | None,
    expected: float | None,
) -> None:
    clean_env.setenv("NOTIFY_SOCKET", socket_path)
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        own = str(os.getpid())
        clean_env.setenv("WATCHDOG_PID", pid.replace("self", own).replace("other", own + "1"))
    assert SdNotifier().watchdog_interval() == expected


def test_watchdog_interval_needs_a_socket(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "30000000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert SdNotifier().watchdog_interval() is None
    assert SdNotifier("/run/systemd/notify").watchdog_interval() == 15.0
