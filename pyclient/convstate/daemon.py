"""The compaction daemon: ``convstate daemon``.

asyncio, ``concurrency`` compactions at once. It is woken by the append script's pub/sub
message when a session is flagged; a sweep over every shard (spread evenly over
``sweep_interval``) is the backstop for missed messages, backoff retries and expired leases.

Signals: the first SIGTERM/SIGINT stops claiming and lets in-flight compactions finish within
``grace`` seconds, then gives back (requeues) the leases it could not finish and exits 0; a
second signal stops at once (leases are still given back). Under systemd (NOTIFY_SOCKET set)
it sends READY=1, STOPPING=1 and WATCHDOG=1. HTTP: ``/healthz``, ``/readyz``, ``/metrics``.

**A server that stops answering** (frozen, paused, a half-open connection) never stalls it.
Its connections time out after :func:`~convstate.timeouts.daemon_socket_timeout` (5 s, less
for a lease under 30 s, so that a heartbeat fails, all tries included, a third of the lease
before the lease would run out), with convstate's keepalive and retry
(:mod:`convstate.timeouts`). A heartbeat that fails abandons its compaction, which writes
nothing; the daemon hands the session back as soon as the server answers (else the lease
expires), and it is compacted again (a late swap would be fenced by the lease token anyway).
The pub/sub connection, silent between wake-ups, is checked with a PING after that many
seconds of silence: no answer within as many again and it is given up
and reconnected, and the daemon is not ready (``/readyz`` 503) until it has subscribed again.
``/healthz`` and WATCHDOG=1 never wait for Redis (a restart would not help). Once the server
answers again the daemon resubscribes, sweeps every shard and goes on; a failure that repeats
is logged once at WARNING, then at DEBUG until it is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from convstate.compactor import Claim, Compactor, CompactorConfig, Outcome
from convstate.errors import OOM_REPLY, ConfigurationError, LeaseLostError
from convstate.keys import DEFAULT_SHARDS, KeySchema
from convstate.models import ShardStatus
from convstate.planner import DEFAULT_MAX_FOLD_TOKENS, CompactionPolicy
from convstate.sdnotify import SdNotifier
from convstate.summarizers import ExtractiveSummarizer, OpenAISummarizer, Summarizer
from convstate.timeouts import connection_defaults, daemon_socket_timeout
from convstate.tokens import TiktokenCounter, TokenCounter, default_encoding
from convstate.urls import redact_url

log = logging.getLogger(__name__)


#: What a Redis call can raise that a long-running task must survive: error replies (NOPERM,
#: READONLY during a failover, OOM, NOSCRIPT races), lost connections, cluster reshuffles.
_REDIS_ERRORS = (RedisError, RedisClusterException, OSError)

#: Longest pause between two attempts of the pub/sub listener to subscribe again.
RESUBSCRIBE_MAX_DELAY = 5.0

#: ``--repair-queue``: whether the sweep also scans for sessions left ``queued`` without their
#: queue entry (evicted). ``auto``: when the start-up ``CONFIG GET maxmemory-policy`` shows a
#: policy that evicts (never when it is refused); ``on``: always (``+scan`` is needed, not
#: ``+config|get``); ``off``: never.
REPAIR_QUEUE_MODES = ("auto", "on", "off")


class _Trouble:
    """One kind of recurring Redis failure (the sweep, a claim, the subscription): logged at
    WARNING the first time, at DEBUG while it goes on (a frozen server would otherwise log a
    line every few seconds per task), and once at INFO when it is over."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0

    def failed(self, message: str, *args: Any) -> None:
        self.failures += 1
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        log.log(level, message, *args)

    def ok(self) -> None:
        if self.failures:
            times = "once" if self.failures == 1 else f"{self.failures} times"
            log.info("%s works again (it failed %s)", self.what, times)
            self.failures = 0


class HttpListenError(ConfigurationError):
    """The daemon cannot serve /healthz, /readyz and /metrics on ``host:port`` (``errno``:
    EADDRINUSE when another process holds the port)."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        self.host, self.port, self.errno = host, port, exc.errno
        super().__init__(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}")


@dataclass(frozen=True)
class DaemonSettings:
    """Every daemon option; each is a ``convstate daemon`` flag and a ``CONVSTATE_*`` env var
    (the upper-cased field name). ``repr`` redacts the Redis password."""

    redis_url: str = "redis://localhost:6379/0"
    cluster: bool = False
    prefix: str = "cs"
    shards: int = DEFAULT_SHARDS
    concurrency: int = 8
    lease: float = 60.0
    grace: float = 30.0
    sweep_interval: float = 60.0
    repair_queue: str = "auto"
    max_attempts: int = 5
    backoff: float = 1.0
    http_host: str = "127.0.0.1"
    http_port: int = 9464
    summarizer: str = "extractive"
    openai_base_url: str | None = None
    summary_model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    summary_timeout: float = 60.0
    encoding: str | None = None
    token_model: str | None = None
    keep_recent_tokens: int = 1000
    min_recent_messages: int = 4
    target_ratio: float = 0.5
    max_summary_tokens: int = 500
    max_fold_tokens: int = DEFAULT_MAX_FOLD_TOKENS
    archive: bool = False
    archive_ttl: int | None = None
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be >= 1")
        for name in ("lease", "grace", "sweep_interval", "summary_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigurationError(f"{name} must be a positive number of seconds")
        if self.summarizer not in ("extractive", "openai"):
            raise ConfigurationError("summarizer must be 'extractive' or 'openai'")
        if self.repair_queue not in REPAIR_QUEUE_MODES:
            raise ConfigurationError(
                f"repair_queue must be auto, on or off, not {self.repair_queue!r}"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigurationError(
                f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {self.log_level!r}"
            )
        # Build what the settings describe now, so a bad value fails before anything starts.
        KeySchema(self.prefix, self.shards)
        self.compactor_config()
        if not 0 <= self.http_port <= 65535 and self.http_port != -1:
            raise ConfigurationError("http_port must be 0-65535, or -1 to disable HTTP")

    def __repr__(self) -> str:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["redis_url"] = redact_url(self.redis_url)
        shown = ", ".join(f"{name}={value!r}" for name, value in values.items())
        return f"DaemonSettings({shown})"

    def with_overrides(self, **changes: Any) -> DaemonSettings:
        return replace(self, **changes)

    def policy(self) -> CompactionPolicy:
        return CompactionPolicy(
            keep_recent_tokens=self.keep_recent_tokens,
            min_recent_messages=self.min_recent_messages,
            target_ratio=self.target_ratio,
            max_summary_tokens=self.max_summary_tokens,
            max_fold_tokens=self.max_fold_tokens,
        )

    def compactor_config(self) -> CompactorConfig:
        return CompactorConfig(
            lease_ms=int(self.lease * 1000),
            max_attempts=self.max_attempts,
            backoff_base_ms=int(self.backoff * 1000),
            archive=self.archive,
            archive_ttl=self.archive_ttl,
            policy=self.policy(),
        )

    def counter(self) -> TokenCounter:
        if self.token_model:
            return TiktokenCounter(self.token_model)
        return TiktokenCounter(encoding=self.encoding or default_encoding())

    def make_summarizer(self) -> Summarizer:
        if self.summarizer == "openai":
            return OpenAISummarizer(
                self.summary_model,
                base_url=self.openai_base_url,
                api_key_env=self.api_key_env,
                timeout=self.summary_timeout,
            )
        return ExtractiveSummarizer()


class Metrics:
    """The daemon's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("convstate_queue_depth", "Flagged sessions waiting", registry=r)
        self.oldest_age = Gauge(
            "convstate_oldest_flagged_age_seconds",
            "Age of the oldest flagged session",
            registry=r,
        )
        self.dead_letter = Gauge(
            "convstate_dead_letter_sessions",
            "Sessions in the dead-letter state (convstate requeue brings them back)",
            registry=r,
        )
        self.running = Gauge("convstate_running", "Compactions in flight here", registry=r)
        self.compactions = Counter(
            "convstate_compactions", "Compactions by outcome", ["outcome"], registry=r
        )
        buckets = (100, 300, 1000, 3000, 10_000, 30_000, 100_000, 300_000, 1_000_000)
        self.tokens_before = Histogram(
            "convstate_tokens_before",
            "Session tokens before a compaction",
            buckets=buckets,
            registry=r,
        )
        self.tokens_after = Histogram(
            "convstate_tokens_after",
            "Session tokens after a compaction",
            buckets=buckets,
            registry=r,
        )
        self.summarizer_seconds = Histogram(
            "convstate_summarizer_seconds", "Summarizer latency", registry=r
        )
        self.flag_to_claim = Histogram(
            "convstate_flag_to_claim_seconds",
            "Delay from flag (or due retry) to claim",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.lease_expiries = Counter(
            "convstate_lease_expiries", "Expired leases taken back by this daemon", registry=r
        )

    def record(self, outcome: Outcome) -> None:
        self.compactions.labels(outcome.status).inc()
        if outcome.summary_ms:
            self.summarizer_seconds.observe(outcome.summary_ms / 1000)
        if outcome.status == "compacted":
            self.tokens_before.observe(outcome.tokens_before)
            self.tokens_after.observe(outcome.tokens_after)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class HealthServer:
    """``/healthz`` (alive), ``/readyz`` (connected and listening), ``/metrics`` in a thread."""

    def __init__(self, host: str, port: int, metrics: Metrics, ready: Callable[[], bool]) -> None:
        metrics_app = make_wsgi_app(metrics.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            if path == "/readyz":
                ok = ready()
                start_response(
                    "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
                )
                return [b"ready\n" if ok else b"not ready\n"]
            if path == "/metrics":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]

        self.server: WSGIServer = make_server(
            host, port, app, server_class=ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.port = self.server.server_port
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="convstate-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


def check(settings: DaemonSettings, timeout: float = 3.0) -> bool:
    """``convstate daemon --check``: whether the local daemon answers ``/readyz`` with 200."""
    return probe(settings, timeout) is None


def probe(settings: DaemonSettings, timeout: float = 3.0) -> str | None:
    """Ask the local daemon's ``/readyz``: None if it answers 200, else why not, in one line
    (nothing listening, not ready yet, HTTP turned off...)."""
    if settings.http_port < 0:
        return "HTTP is off (--http-port -1 / CONVSTATE_HTTP_PORT=-1): there is nothing to ask"
    if settings.http_port == 0:
        return "--http-port 0 picks a free port at start: give --check the port the daemon logged"
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "", "::") else settings.http_host
    url = f"http://{host}:{settings.http_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if int(resp.status) == 200:
                return None
            return f"{url} answered {resp.status}"
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            return f"{url} answered 503: the daemon runs but is not ready (connecting to Redis?)"
        return f"{url} answered {exc.code}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            return (
                f"nothing listens on {host}:{settings.http_port} (connection refused): is the "
                f"daemon running, with the same --http-host / --http-port?"
            )
        return f"{url}: {reason}"
    except OSError as exc:  # a timeout, a reset connection
        return f"{url}: {exc or type(exc).__name__}"


@dataclass
class _Worker:
    busy: bool = False  # from the claim request on: a claim may be in flight
    claim: Claim | None = None


@dataclass
class Daemon:
    """The compaction daemon. ``await daemon.serve()`` runs it until :meth:`request_stop`."""

    settings: DaemonSettings
    client: redis.asyncio.Redis | None = None
    summarizer: Summarizer | None = None
    counter: TokenCounter | None = None
    notifier: SdNotifier = field(default_factory=SdNotifier)
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        s = self.settings
        self._owns_client = self.client is None
        #: Seconds any one Redis reply may take (see the module docs); also the pub/sub
        #: listener's silence before a PING, and its wait for the answer.
        self.redis_timeout = daemon_socket_timeout(s.lease)
        kwargs = connection_defaults(
            s.redis_url,
            asyncio=True,
            socket_timeout=self.redis_timeout,
            connect_timeout=self.redis_timeout,
        )
        self.redis: redis.asyncio.Redis = self.client or (
            redis.asyncio.RedisCluster.from_url(s.redis_url, **kwargs)  # type: ignore[assignment]
            if s.cluster
            else redis.asyncio.from_url(s.redis_url, **kwargs)
        )
        self._pubsub_client: redis.asyncio.Redis | None = None
        self._sweep_trouble = _Trouble("the sweep")
        self._claim_trouble = _Trouble("claiming")
        self._listen_trouble = _Trouble("the pub/sub subscription")
        self.schema = KeySchema(s.prefix, s.shards)
        self.compactor = Compactor(
            self.redis,
            self.schema,
            self.counter or s.counter(),
            self.summarizer or s.make_summarizer(),
            s.compactor_config(),
        )
        self._work: asyncio.Queue[int] = asyncio.Queue()
        self._pending: set[int] = set()
        self._stopping = asyncio.Event()
        self._stop_now = asyncio.Event()
        self._signals = 0
        self._subscribed = False
        self._depth: dict[int, ShardStatus] = {}
        #: The server's clock minus this host's (ms), learned from every shard read: flag times
        #: are server times, so the oldest one's age is measured on the server's clock.
        self._server_offset_ms = 0.0
        self._oldest_queued_ms = 0
        self.metrics.oldest_age.set_function(self._oldest_flagged_age)
        self._workers: dict[asyncio.Task[None], _Worker] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._sweep_all = False  # set by the listener once subscribed: nothing flagged is missed
        self._sweep_now = asyncio.Event()  # wakes the sweeper at once for _sweep_all
        # The queue repair's SCAN cursor per node name ("" on a standalone server): None =
        # off (see REPAIR_QUEUE_MODES, decided at start). On a cluster a pass scans every
        # primary; the next one starts once every cursor came back to 0.
        self._repair: dict[str, int] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._handing_back: set[asyncio.Task[None]] = set()  # see _hand_back
        self.http: HealthServer | None = None
        self.started = asyncio.Event()

    # -- control -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Subscribed to wake-ups, not stopping, and no background task has died."""
        return (
            self._subscribed
            and not self._stopping.is_set()
            and not any(task.done() for task in self._background)
        )

    def request_stop(self) -> None:
        """First call: drain within the grace period. Second call: stop now."""
        self._signals += 1
        if self._signals == 1:
            log.info(
                "stopping: no new claims; draining in-flight compactions (grace %.0fs)",
                self.settings.grace,
            )
            self._stopping.set()  # first: /readyz turns 503 before systemd hears STOPPING
            self.notifier.stopping()
        else:
            log.warning("second stop request: stopping now")
            self._stop_now.set()

    def wake(self, shard: int) -> None:
        """Ask a worker to look at ``shard``."""
        if shard not in self._pending and not self._stopping.is_set():
            self._pending.add(shard)
            self._work.put_nowait(shard)

    def _wake_later(self, shard: int, delay: float) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self.wake(shard)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def _hand_back_later(self, claim: Claim, shard: int, reason: str) -> None:
        task = asyncio.create_task(
            self._hand_back(claim, shard, reason), name=f"hand-back-{claim.session_id}"
        )
        self._handing_back.add(task)
        task.add_done_callback(self._handing_back.discard)

    async def _hand_back(self, claim: Claim, shard: int, reason: str) -> None:
        """Hand back a session whose compaction a Redis error abandoned (a frozen or lost
        server), as soon as Redis answers: release ``requeue`` with the claim's token. Else it
        would wait for its lease to run out, and a heartbeat the server runs late (sent before
        the deadline, run once the server is continued) extends that lease a whole lease more.
        Tried every second for one lease at most; then the sweep reaps it anyway. A refusal
        (the lease was reaped or taken over, or the abandoned swap had in fact committed)
        ends it: nothing to hand back."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.compactor.config.lease_ms / 1000
        while not self._stopping.is_set():
            try:
                await self.compactor.release(
                    claim, "requeue", f"handed back after a Redis error: {reason}"
                )
            except LeaseLostError:
                return
            except _REDIS_ERRORS as exc:
                if loop.time() >= give_up_at:
                    log.info(
                        "session %r not handed back (%s): its lease expires", claim.session_id, exc
                    )
                    return
                await asyncio.sleep(1.0)
                continue
            log.info("session %r handed back after a Redis error", claim.session_id)
            self.wake(shard)
            return

    # -- tasks ---------------------------------------------------------------------------------

    async def _worker(self, state: _Worker) -> None:
        while not self._stopping.is_set():
            shard = await self._work.get()
            self._pending.discard(shard)
            if self._stopping.is_set():
                return
            state.busy = True
            try:
                claim = await self.compactor.claim_next(shard)
            except _REDIS_ERRORS as exc:  # READONLY in a failover, NOPERM, a lost connection
                self._claim_trouble.failed(
                    "claim on shard %d failed: %s; will retry in 1s", shard, exc
                )
                self._wake_later(shard, 1.0)
                state.busy = False
                continue
            self._claim_trouble.ok()
            await self._refresh_shard(shard)  # the queue changed: keep the gauges true
            if claim is None:
                state.busy = False
                continue
            self.wake(shard)  # there may be more on this shard for another worker
            self.metrics.flag_to_claim.observe(
                max(0, claim.deadline_ms - self.compactor.config.lease_ms - claim.queued_at_ms)
                / 1000
            )
            state.claim = claim
            self.metrics.running.inc()
            try:
                outcome = await self.compactor.compact(claim)
            except _REDIS_ERRORS as exc:
                log.warning(
                    "compaction of %r hit a Redis error: %s; handing the session back once "
                    "Redis answers (else the lease expires and it is retried)",
                    claim.session_id,
                    exc,
                )
                outcome = Outcome(claim.session_id, "error", note=str(exc))
                self._hand_back_later(claim, shard, str(exc))
            except LeaseLostError as exc:  # a release refused: the lease was taken back, or
                # this is redis-py's retry of a release whose first attempt ran (reply lost)
                log.info("compaction of %r: %s", claim.session_id, exc)
                outcome = Outcome(claim.session_id, "lost", note=str(exc))
            except Exception as exc:  # a bug must not kill the worker; the lease expires
                log.exception("compaction of %r failed unexpectedly", claim.session_id)
                outcome = Outcome(claim.session_id, "error", note=repr(exc))
            finally:
                state.claim = None
                state.busy = False
                self.metrics.running.dec()
            self.metrics.record(outcome)
            await self._refresh_shard(shard)
            if outcome.status == "retry":
                self._wake_later(
                    shard, self.compactor.config.backoff_ms(claim.attempts + 1) / 1000 + 0.05
                )

    async def _listen(self) -> None:
        """Pub/sub wake-ups; reconnects with backoff. The connection is silent between
        wake-ups, so after ``redis_timeout`` seconds of silence it is asked a PING, and given up
        (and reconnected) when nothing answers within as many seconds again: a frozen server
        or a half-open connection makes the daemon not ready instead of deaf."""
        delay = 0.5
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            pubsub = self._listener_client().pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.schema.wake_channel)
                self._subscribed = True
                self._listen_trouble.ok()
                delay = 0.5
                self.sweep_all_soon()  # anything flagged while we were not listening
                heard, pinged = loop.time(), None
                while not self._stopping.is_set():
                    msg = await pubsub.get_message(timeout=1.0)
                    now = loop.time()
                    if msg is not None:  # a wake-up or the PONG: the connection is alive
                        heard, pinged = now, None
                        if msg.get("type") == "message":
                            data = msg["data"]
                            sid = data.decode() if isinstance(data, bytes) else str(data)
                            with contextlib.suppress(ValueError):
                                self.wake(self.schema.shard_of(sid))
                    elif pinged is not None and now - pinged > self.redis_timeout:
                        raise RedisTimeoutError(
                            f"no answer to PING within {self.redis_timeout:g} s"
                        )
                    if pinged is None and now - heard >= self.redis_timeout:
                        await pubsub.ping()
                        pinged = now
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                self._subscribed = False
                self._listen_trouble.failed(
                    "pub/sub connection lost (%s); the daemon is not ready until it subscribes "
                    "again; next try in %.1fs",
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESUBSCRIBE_MAX_DELAY)
            except _REDIS_ERRORS as exc:  # e.g. NOPERM: the ACL user may not SUBSCRIBE
                self._subscribed = False
                log.error(
                    "cannot subscribe to %s: %s; the daemon stays not ready (/readyz 503) "
                    "until it can. Check the ACL user's channel and command rights "
                    "(README: Security). Retrying in %.1fs",
                    self.schema.wake_channel,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                self._subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _listener_client(self) -> redis.asyncio.Redis:
        """The client of the pub/sub connection: the daemon's, without redis-py's retry. A
        retry would reconnect and resubscribe silently, and what was published in between
        would wait for the slow sweep; the listener reconnects itself instead, logs it, is
        not ready meanwhile, and sweeps every shard once subscribed again. (A cluster
        client's pub/sub connection to a node does not retry.)"""
        if isinstance(self.redis, redis.asyncio.RedisCluster):
            return self.redis
        if self._pubsub_client is None:
            pool: Any = self.redis.connection_pool
            kwargs = {**pool.connection_kwargs, "retry": None, "retry_on_error": []}
            self._pubsub_client = redis.asyncio.Redis.from_pool(
                type(pool)(connection_class=pool.connection_class, **kwargs)
            )
        return self._pubsub_client

    def sweep_all_soon(self) -> None:
        """Sweep every shard now (not at the next tick): anything flagged while not listening."""
        self._sweep_all = True
        self._sweep_now.set()

    async def _refresh_shard(self, shard: int) -> None:
        """Read one shard's queue, running and dead sets into the gauges (after every claim
        and compaction, so /metrics never waits for the sweep to come round)."""
        try:
            self._note_status(await self.compactor.peek(shard))
        except _REDIS_ERRORS as exc:  # the gauges stay as they were until the next look
            log.debug("could not refresh the gauges of shard %d: %s", shard, exc)
            return
        self._update_depth()

    async def _sweep_shard(self, shard: int) -> None:
        status = await self.compactor.peek(shard)
        due = status.due
        self._note_status(status)
        if status.expired:
            reaped = await self.compactor.reap(shard)
            self.metrics.lease_expiries.inc(len(reaped))
            if any(state == "queued" for _, state in reaped):
                due += 1
        if due:
            self.wake(shard)

    async def _sweeper(self) -> None:
        """Visit every shard once per ``sweep_interval``, a slice each second."""
        shards = self.schema.shards
        tick = min(1.0, self.settings.sweep_interval)
        per_tick = max(1, math.ceil(shards * tick / self.settings.sweep_interval))
        position = 0
        while not self._stopping.is_set():
            try:
                if self._sweep_all:
                    self._sweep_all = False
                    batch = range(shards)
                else:
                    batch = range(position, min(shards, position + per_tick))
                    position = 0 if position + per_tick >= shards else position + per_tick
                for shard in batch:
                    await self._sweep_shard(shard)
                self._update_depth()
                await self._repair_step()
                self._sweep_trouble.ok()
            except _REDIS_ERRORS as exc:  # keep sweeping: it is the backstop and the reaper
                self._sweep_trouble.failed("sweep failed: %s; retrying at the next tick", exc)
            if self._sweep_all:
                continue
            self._sweep_now.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake_sweeper(), timeout=tick)

    async def _repair_step(self) -> None:
        """One bounded step of the scan that queues again sessions whose queue entry was
        evicted (see :meth:`Compactor.repair_step`), on a standalone server or on each primary
        of a cluster. Runs when ``--repair-queue`` turned it on at start, and stops once SCAN
        is refused (an ACL without ``+scan``: logged once)."""
        repair = self._repair
        if repair is None:
            return
        repaired: list[str] = []
        try:
            if not isinstance(self.redis, redis.asyncio.RedisCluster):
                repair[""], found = await self.compactor.repair_step(repair.get("", 0))
                repaired += found
            else:
                if not repair:  # a new pass, over the primaries of now
                    repair.update((node.name, 0) for node in self.redis.get_primaries())
                for name, cursor in list(repair.items()):
                    node = self.redis.get_node(node_name=name)
                    if node is None:  # gone (a failover): its successor is in the next pass
                        del repair[name]
                        continue
                    cursor, found = await self.compactor.repair_step(cursor, node=node)
                    repaired += found
                    if cursor:
                        repair[name] = cursor
                    else:
                        del repair[name]
        except ResponseError as exc:
            log.warning(
                "the sweep cannot scan for sessions whose queue entry was evicted (%s); grant "
                "+scan to the daemon's user to repair them (under maxmemory-policy "
                "noeviction nothing is evicted, and --repair-queue auto or off needs no SCAN)",
                exc,
            )
            self._repair = None
        for sid in repaired:
            self.wake(self.schema.shard_of(sid))

    async def _wake_sweeper(self) -> None:
        """Return when stopping or when :meth:`sweep_all_soon` asks for a full sweep."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        sweep = asyncio.ensure_future(self._sweep_now.wait())
        try:
            await asyncio.wait({stopping, sweep}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            sweep.cancel()

    def _note_status(self, status: ShardStatus) -> None:
        self._depth[status.shard] = status
        if status.server_ms:
            self._server_offset_ms = status.server_ms - time.time() * 1000

    def _update_depth(self) -> None:
        statuses = self._depth.values()
        self.metrics.queue_depth.set(sum(s.queued for s in statuses))
        self.metrics.dead_letter.set(sum(s.dead for s in statuses))
        oldest = [s.oldest_queued_ms for s in statuses if s.queued and s.oldest_queued_ms]
        self._oldest_queued_ms = min(oldest) if oldest else 0

    def _oldest_flagged_age(self) -> float:
        """The oldest waiting flag's age on the server's clock, at the moment /metrics is read
        (it grows while the session waits; read from the HTTP thread, so one snapshot)."""
        oldest = self._oldest_queued_ms
        if not oldest:
            return 0.0
        return max(0.0, (time.time() * 1000 + self._server_offset_ms - oldest) / 1000)

    async def _watchdog(self, interval: float) -> None:
        while not self._stop_now.is_set():
            self.notifier.watchdog()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop_now.wait(), timeout=interval)

    # -- lifecycle -----------------------------------------------------------------------------

    async def serve(self, *, install_signal_handlers: bool = True) -> None:
        """Run until stopped; always releases what it holds and closes its connections."""
        s = self.settings
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        log.info("starting: %r", s)
        await self.redis.ping()
        await self._check_shards()
        if s.http_port >= 0:
            try:
                self.http = HealthServer(s.http_host, s.http_port, self.metrics, lambda: self.ready)
            except OSError as exc:  # the port is in use, the address not ours: nothing started
                if self._owns_client:
                    await self.redis.aclose()
                self.notifier.close()
                raise HttpListenError(s.http_host, s.http_port, exc) from None
            self.http.start()
            log.info("http on %s:%d (/healthz /readyz /metrics)", s.http_host, self.http.port)
        background = self._background = [
            asyncio.create_task(self._listen(), name="listen"),
            asyncio.create_task(self._sweeper(), name="sweep"),
        ]
        interval = self.notifier.watchdog_interval()
        if interval:
            background.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))
        for i in range(s.concurrency):
            state = _Worker()
            self._workers[asyncio.create_task(self._worker(state), name=f"worker-{i}")] = state
        try:
            while not self._subscribed and not self._stopping.is_set():
                await asyncio.sleep(0.01)
            self.notifier.ready()
            self.started.set()
            await self._stopping.wait()
            await self._drain()
        finally:
            for task in [*background, *self._handing_back]:
                task.cancel()
            await asyncio.gather(*background, *self._handing_back, return_exceptions=True)
            for handle in self._timers:
                handle.cancel()
            if install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            if self.http is not None:
                self.http.close()
            if self._owns_client:
                await self.redis.aclose()
            if self._pubsub_client is not None:
                await self._pubsub_client.aclose()
            self.notifier.close()
            close = getattr(self.compactor.summarizer, "aclose", None)
            if close is not None:
                await close()
            log.info("stopped")

    async def _check_shards(self) -> None:
        """Check the shard count recorded for the prefix: read first, and record it only when
        missing, so a daemon starts when Redis memory is full (then it is recorded later by
        a client). Warn once about a ``maxmemory-policy`` that evicts (nothing is said if
        CONFIG GET is refused, e.g. by ACL or a managed service), and turn the queue repair
        on or off (``--repair-queue``)."""
        from convstate.operations import check_shard_config, eviction_warning

        config = self.schema.config
        recorded = await self.redis.hget(config, "shards")
        if recorded is None:
            try:
                await self.redis.hsetnx(config, "shards", self.schema.shards)
                recorded = await self.redis.hget(config, "shards")
            except ResponseError as exc:
                if OOM_REPLY not in str(exc):
                    raise
                log.warning("Redis memory is full: the shard count is not recorded yet")
        if recorded is not None:
            check_shard_config(recorded, self.schema.shards, self.schema.prefix)
        try:
            warning = eviction_warning(await self.redis.config_get("maxmemory-policy"))
        except RedisError:
            warning = None
        if warning:
            log.warning(warning)
        mode = self.settings.repair_queue
        if mode == "on" or (mode == "auto" and warning):
            self._repair = {}
            where = (
                "every primary"
                if isinstance(self.redis, redis.asyncio.RedisCluster)
                else "the server"
            )
            log.info(
                "queue repair on (--repair-queue %s): the sweep scans %s (SCAN, needs +scan) "
                "for sessions left queued without their queue entry",
                mode,
                where,
            )
        else:
            log.debug("queue repair off (--repair-queue %s)", mode)

    async def _drain(self) -> None:
        busy = {t for t, w in self._workers.items() if w.busy}
        idle = set(self._workers) - busy
        for task in idle:
            task.cancel()
        if busy:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.settings.grace
            stop_now = asyncio.ensure_future(self._stop_now.wait())
            waiting: set[asyncio.Future[Any]] = set(busy)
            while waiting and not self._stop_now.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                _, waiting = await asyncio.wait(
                    waiting | {stop_now}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                waiting.discard(stop_now)
            stop_now.cancel()
            unfinished = [t for t in busy if not t.done()]
            leftovers = [self._workers[t].claim for t in unfinished]
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
            for claim in leftovers:
                if claim is not None:
                    await self._give_back(claim)
        await asyncio.gather(*idle, return_exceptions=True)

    async def _give_back(self, claim: Claim) -> None:
        try:
            await asyncio.wait_for(self.compactor.release(claim, "requeue", "daemon stopped"), 5)
            log.info("gave back the lease of session %r", claim.session_id)
        except LeaseLostError:
            pass  # the swap committed, or the lease expired: nothing to give back
        except (*_REDIS_ERRORS, asyncio.TimeoutError) as exc:
            log.warning("could not give back %r (%s); its lease will expire", claim.session_id, exc)


def run(settings: DaemonSettings) -> int:
    """Run the daemon in its own event loop until SIGTERM/SIGINT; returns the exit code."""

    async def main() -> None:
        await Daemon(settings).serve()

    asyncio.run(main())
    return 0
