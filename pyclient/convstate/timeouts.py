"""How long convstate waits for Redis: the socket timeouts, TCP keepalive and retries of every
connection it opens itself (the stores' ``from_url``, the daemon, the operator commands).

redis-py's own defaults depend on its version: redis-py 5 waits for a reply forever
(``socket_timeout=None``), so a server that stops answering (SIGSTOP, a paused VM, a
half-open TCP connection after its host died) hangs the caller; later versions time out, with
retries that vary from one release to the next (redis-py 8.2's ``from_url`` connections:
5 s, no retry). convstate therefore passes its own values, whatever the version:

* :data:`SOCKET_TIMEOUT` -- 5 s for any one reply. A healthy server answers convstate's
  scripts in well under a millisecond, and a slow moment (a fork for a snapshot, an fsync, a
  long session read) in well under a second; 5 s is far beyond both, short enough for an app
  to give its user an error, and redis-py's own default since version 6.
* :data:`CONNECT_TIMEOUT` -- 5 s to open a connection (TCP, TLS and the HELLO/AUTH
  handshake): a host that is down or unreachable fails instead of hanging in SYN retries.
* TCP keepalive, :data:`KEEPALIVE_IDLE` s idle then :data:`KEEPALIVE_COUNT` probes
  :data:`KEEPALIVE_INTERVAL` s apart: an idle pooled connection (or the daemon's pub/sub
  connection) to a host that died is closed within ~45 s, and keepalive traffic keeps NAT and
  load-balancer state of idle connections from expiring (unix sockets: not applicable).
* :func:`retry_policy` -- :data:`RETRIES` retry of a call that met a timeout or a connection
  error, after a backoff of :data:`BACKOFF_BASE`-:data:`BACKOFF_CAP` s with jitter: a
  pooled connection the server closed (restart, failover, an idle timeout) costs one
  reconnect, not an error.

**The bound.** On a server that accepts connections but never answers (frozen), each try
waits one socket timeout. A call of a store tries at most ``2 * (RETRIES + 1)`` times in all
(its first try goes over convstate's own fast path, and a failure there is handed to
redis-py's client, which retries; a MULTI through redis-py's pipeline may also reconnect once
more per retry), so it raises ``redis.TimeoutError`` (or ``redis.ConnectionError``) within
:func:`worst_case_seconds`: about 20.5 s with the defaults (``get_context``,
``append_and_get_context``); one script call (``append``, ``create_session``...) within 3
timeouts, about 15.2 s, and one plain command (``exists``, the operator commands) within 2,
about 10.2 s. Measured with redis-py 8.2 against a SIGSTOPped Redis 7.0, Redis 6.2 and
Valkey 8.1 (tests/test_frozen_server.py).

**Every convstate call is safe to retry**, so a retry never applies a write twice: appends are
dropped by message id (generated client-side when the message has none, so a retry carries
the same), ``create_session``, ``delete_session`` and the Agents adapter's ``pop_item``
carry a per-call token the server remembers, ``update_context`` sets the same keys to the
same values again (a retry may land after a concurrent update of the same key and win over
it), reads read again, and every step of the daemon is fenced by its lease token (a retried
claim answers the claim it made; a heartbeat, release or swap of a lease that was taken back
does nothing). See the README, "Timeouts: a server that stops answering".

Whatever the caller passes to ``from_url`` wins over these, ``socket_timeout=None`` (wait
forever) included; so do options in the URL's query string (``?socket_timeout=2``), as in
redis-py.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio.retry
import redis.retry
from redis.backoff import EqualJitterBackoff

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "CONNECT_TIMEOUT",
    "KEEPALIVE_COUNT",
    "KEEPALIVE_IDLE",
    "KEEPALIVE_INTERVAL",
    "RETRIES",
    "SOCKET_TIMEOUT",
    "connection_defaults",
    "daemon_socket_timeout",
    "keepalive_options",
    "max_backoff",
    "retry_policy",
    "socket_timeout_of",
    "with_defaults",
    "worst_case_seconds",
]

#: Seconds to wait for any one reply.
SOCKET_TIMEOUT = 5.0
#: Seconds to open a connection (TCP connect and handshake).
CONNECT_TIMEOUT = 5.0
#: Retries of a call after a timeout or a connection error (so at most RETRIES + 1 tries in
#: redis-py's client).
RETRIES = 1
#: Backoff before retry n: between half and all of min(BACKOFF_CAP, BACKOFF_BASE * 2**n) s
#: (redis-py's EqualJitterBackoff, spreading the reconnects of many clients).
BACKOFF_BASE = 0.1
BACKOFF_CAP = 1.0
#: TCP keepalive: seconds idle before the first probe, seconds between probes, probes.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


def keepalive_options() -> dict[int, int]:
    """The TCP keepalive socket options this platform has (Linux: TCP_KEEPIDLE, macOS:
    TCP_KEEPALIVE; TCP_KEEPINTVL, TCP_KEEPCNT)."""
    options: dict[int, int] = {}
    idle = getattr(socket, "TCP_KEEPIDLE", None)
    if idle is None:
        idle = getattr(socket, "TCP_KEEPALIVE", None)
    if idle is not None:
        options[idle] = KEEPALIVE_IDLE
    for name, value in (("TCP_KEEPINTVL", KEEPALIVE_INTERVAL), ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        option = getattr(socket, name, None)
        if option is not None:
            options[option] = value
    return options


def retry_policy(retries: int = RETRIES, *, asyncio: bool = False) -> Any:
    """redis-py's Retry (the asyncio one for ``asyncio=True``) of ``retries`` retries on
    ``ConnectionError`` and ``TimeoutError``, with the backoff above."""
    backoff = EqualJitterBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE)
    if asyncio:
        return redis.asyncio.retry.Retry(backoff, retries)
    return redis.retry.Retry(backoff, retries)


def connection_defaults(
    url: str,
    *,
    asyncio: bool = False,
    socket_timeout: float = SOCKET_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
    retries: int = RETRIES,
) -> dict[str, Any]:
    """The keyword arguments of redis-py's ``from_url`` (standalone or cluster) that give a
    connection to ``url`` convstate's timeouts, keepalive and retries."""
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": retry_policy(retries, asyncio=asyncio),
    }
    if urlsplit(url).scheme != "unix":  # a unix socket's connection takes no TCP options
        kwargs["socket_keepalive"] = True
        kwargs["socket_keepalive_options"] = keepalive_options()
    return kwargs


def with_defaults(
    url: str, redis_kwargs: Mapping[str, Any], *, asyncio: bool = False, **overrides: Any
) -> dict[str, Any]:
    """:func:`connection_defaults` (``overrides`` go to it), then ``redis_kwargs`` over them:
    whatever the caller passed wins, ``socket_timeout=None`` included."""
    return {**connection_defaults(url, asyncio=asyncio, **overrides), **redis_kwargs}


def max_backoff(retries: int = RETRIES) -> float:
    """The longest the backoffs of ``retries`` retries can add up to."""
    return float(sum(min(BACKOFF_CAP, BACKOFF_BASE * 2**n) for n in range(1, retries + 1)))


def worst_case_seconds(
    socket_timeout: float = SOCKET_TIMEOUT, retries: int = RETRIES, *, tries: int | None = None
) -> float:
    """How long a store's call can take to raise when the server accepts connections but does
    not answer: ``tries`` (default ``2 * (retries + 1)``, see the module docs) socket timeouts
    and two rounds of backoff."""
    if tries is None:
        tries = 2 * (retries + 1)
    return tries * socket_timeout + 2 * max_backoff(retries)


def daemon_socket_timeout(lease: float, retries: int = RETRIES) -> float:
    """The daemon's socket timeout for a lease of ``lease`` seconds: :data:`SOCKET_TIMEOUT`,
    or less for a short lease, so that a heartbeat (every third of the lease) that meets a
    frozen server fails, all its tries included, a third of the lease before the lease would
    run out: ``min(SOCKET_TIMEOUT, lease / (3 * (retries + 1)))``."""
    return min(SOCKET_TIMEOUT, lease / (3 * (retries + 1)))


def socket_timeout_of(client: Any) -> float | None:
    """The socket timeout of ``client``'s connections (a redis-py client, sync or asyncio,
    standalone or cluster), or None if it has none or it cannot be told."""
    pool = getattr(client, "connection_pool", None)
    kwargs: Any = getattr(pool, "connection_kwargs", None)
    if kwargs is None:  # a cluster client: its kwargs for every node
        getter = getattr(client, "get_connection_kwargs", None)
        kwargs = getter() if callable(getter) else getattr(client, "connection_kwargs", None)
    if not isinstance(kwargs, Mapping):
        return None
    value = kwargs.get("socket_timeout")
    return float(value) if isinstance(value, (int, float)) else None
