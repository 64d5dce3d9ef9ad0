"""systemd's ``sd_notify`` protocol: one datagram per state change on a unix socket.

Under ``Type=notify`` systemd passes the socket's path in ``$NOTIFY_SOCKET``; the service
sends newline-separated ``KEY=VALUE`` assignments to it (``READY=1`` when it serves,
``STOPPING=1`` when it starts draining, ``WATCHDOG=1`` every half ``WatchdogSec``,
``STATUS=...`` free text shown by ``systemctl status``). Without ``$NOTIFY_SOCKET`` (not
under systemd, or in a container) every call is a no-op that returns False, so callers
never need to check.

A path starting with ``@`` names a socket in Linux's abstract namespace (``\\0`` + name).
Sending never raises: a failure (systemd gone, socket unreachable) is logged as one
warning per notifier and reported by the return value, because a service must not die of
its supervisor's notification channel.
"""

from __future__ import annotations

import logging
import os
import socket
from types import TracebackType

__all__ = ["SdNotifier"]

log = logging.getLogger(__name__)

#: Seconds a send may block; systemd drains the socket at once, so this only bounds a wedge.
SEND_TIMEOUT = 1.0


class SdNotifier:
    """Sends ``sd_notify`` messages to systemd (or to ``socket_path``, e.g. in tests).

    Args:
        socket_path: the notification socket; ``None`` reads ``$NOTIFY_SOCKET``. Empty or
            unset disables the notifier. A leading ``@`` means the abstract namespace.
    """

    def __init__(self, socket_path: str | None = None) -> None:
        path = os.environ.get("NOTIFY_SOCKET", "") if socket_path is None else socket_path
        self._address: str | None = None
        if path.startswith("@"):
            self._address = "\0" + path[1:]
        elif path.startswith("/"):
            self._address = path
        elif path:  # e.g. "vsock:..." (systemd >= 254): not supported here
            log.warning("ignoring unsupported NOTIFY_SOCKET %r (want a path or @name)", path)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self._address is not None

    def notify(self, state: str) -> bool:
        """Send ``state`` (e.g. ``"READY=1"``, or several lines); True if it was sent."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(SEND_TIMEOUT)
                self._sock = sock
            self._sock.sendto(state.encode("utf-8"), self._address)
        except OSError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "sd_notify to %r failed: %s", self._address.replace("\0", "@"), exc)
            return False
        return True

    def ready(self) -> bool:
        """``READY=1``: start-up finished; systemd now considers the service started."""
        return self.notify("READY=1")

    def stopping(self) -> bool:
        """``STOPPING=1``: the service is shutting down (draining)."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: keep-alive ping; send every :meth:`watchdog_interval` seconds."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """``STATUS=text`` (one line: newlines become spaces) for ``systemctl status``."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None.

        None when the notifier is disabled, ``$WATCHDOG_USEC`` is unset or not a positive
        integer, or ``$WATCHDOG_PID`` is set to another process (the watchdog is not ours).
        """
        if self._address is None:
            return None
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None and pid.strip() != str(os.getpid()):
            return None
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        """Close the socket (idempotent); a later :meth:`notify` opens a new one."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> SdNotifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "disabled" if self._address is None else repr(self._address.replace("\0", "@"))
        return f"SdNotifier({where})"
