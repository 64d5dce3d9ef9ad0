"""Pure parts, without Redis: keys, validation, encoding, decoding, error mapping."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convstate.errors import (
    ConfigurationError,
    InvalidLimitError,
    InvalidMessageError,
    InvalidSessionIdError,
    LeaseLostError,
    MessageTooLargeError,
    ScriptError,
    SessionExistsError,
    SessionFullError,
    SessionNotFoundError,
    ShardCountMismatchError,
    from_script_error,
)
from convstate.keys import KeySchema, validate_session_id
from convstate.operations import (
    POP_RETRY_WINDOW_MS,
    Operations,
    StoreConfig,
    check_shard_config,
    decode_meta,
    to_api_message,
    validate_message,
)


class Chars:
    """A deterministic counter: one token per character of content, 3 per message."""

    reply_priming = 3

    def count_message(self, message: Any) -> int:
        return 3 + len(str(message.get("content") or ""))


def ops(**config: Any) -> Operations:
    return Operations(
        KeySchema("cs", 16), Chars(), StoreConfig(token_limit=100, **config), clock=lambda: 1234
    )


# -- keys --------------------------------------------------------------------------------------


def test_session_keys_share_one_hash_tag_with_their_shard_queues() -> None:
    schema = KeySchema("app", 1024)
    k = schema.session("chat:42")
    shard = zlib.crc32(b"chat:42") % 1024
    assert k.shard == shard
    tag = f"{{{shard}}}"
    for key in (
        k.msgs,
        k.meta,
        k.ids,
        k.idlog,
        k.archive,
        k.deleted,
        k.popped,
        k.queue,
        k.running,
        k.dead,
    ):
        assert key.startswith(f"app:{tag}:")
        assert key.index("{") == key.index(tag)  # the first {...} is the shard tag
    assert k.msgs == f"app:{tag}:s:chat:42:msgs"
    assert schema.config == "app:config"


@given(
    st.text(min_size=1, max_size=50).filter(
        lambda s: not any(ord(c) < 32 or ord(c) == 127 for c in s)
    )
)
def test_shard_is_stable_and_in_range(session_id: str) -> None:
    schema = KeySchema("cs", 7)
    assert 0 <= schema.shard_of(session_id) < 7
    assert schema.shard_of(session_id) == schema.shard_of(session_id)


@pytest.mark.parametrize("bad", ["", "x" * 257, "a\x00b", "tab\there", "del\x7f", 5, None])
def test_bad_session_ids(bad: Any) -> None:
    with pytest.raises(InvalidSessionIdError):
        validate_session_id(bad)


@pytest.mark.parametrize(
    ("prefix", "shards"), [("", 4), ("a b", 4), ("x{y}", 4), ("cs", 0), ("cs", True), ("cs", 20000)]
)
def test_bad_schema(prefix: str, shards: Any) -> None:
    with pytest.raises(ConfigurationError):
        KeySchema(prefix, shards)


# -- validation and encoding -------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        {"role": "user", "content": "hi"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "developer", "content": "x", "name": "n", "extra": {"a": 1}},
    ],
)
def test_valid_messages(msg: dict[str, Any]) -> None:
    assert validate_message(msg) == msg


def test_encode_message_splices_bookkeeping_and_keeps_extras() -> None:
    enc = ops().encode_message(
        {"role": "user", "content": "héllo", "lang": "fr", "tokens": 999, "id": "m1"}, 77
    )
    record = json.loads(enc.json)
    assert record == {
        "role": "user",
        "content": "héllo",
        "lang": "fr",
        "id": "m1",
        "tokens": 8,
        "kind": "message",
        "ts": 77,
    }
    assert (enc.id, enc.tokens, enc.is_system) == ("m1", 8, False)


def test_stored_json_starts_with_tokens_and_role_for_the_read_script() -> None:
    # read.lua takes both with the pattern ^{"tokens":(%d+),"role":"(%a+)"
    o = ops()
    for msg in (
        {"content": "x", "role": "tool", "tool_call_id": "c"},
        {
            "role": "assistant",
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}],
        },
    ):
        enc = o.encode_message(msg, 1)
        role = msg["role"]
        assert enc.json.startswith(f'{{"tokens":{enc.tokens},"role":"{role}",')


def test_encode_message_keeps_a_given_ts_and_generates_ids() -> None:
    o = ops()
    a = o.encode_message({"role": "system", "content": "s", "ts": 5}, 77)
    b = o.encode_message({"role": "system", "content": "s"}, 77)
    assert json.loads(a.json)["ts"] == 5
    assert a.is_system
    assert a.id != b.id
    assert len(a.id) == 32


def test_oversized_message_is_refused_before_counting() -> None:
    class Exploding(Chars):
        def count_message(self, message: Any) -> int:
            raise AssertionError("must not tokenize an oversized message")

    o = Operations(KeySchema(), Exploding(), StoreConfig(token_limit=10, max_message_bytes=50))
    with pytest.raises(MessageTooLargeError, match="maximum is 50"):
        o.encode_message({"role": "user", "content": "x" * 100}, 1)


def test_a_counter_returning_garbage_is_a_configuration_error() -> None:
    class Bad(Chars):
        def count_message(self, message: Any) -> int:
            return -1

    o = Operations(KeySchema(), Bad(), StoreConfig(token_limit=10))
    with pytest.raises(ConfigurationError, match="int >= 0"):
        o.encode_message({"role": "user", "content": "x"}, 1)


def test_append_op_arguments() -> None:
    op = ops(ttl=60, max_messages=5).append(
        "s", [{"role": "user", "content": "ab", "id": "i1"}], create=True
    )
    k = KeySchema("cs", 16).session("s")
    assert op.script == "append"
    assert op.keys == [k.msgs, k.meta, k.ids, k.queue, k.idlog, k.archive]
    assert op.args[:8] == [100, "s", "cs:wake", 1, 100, 60000, 5, 1]  # ARGV[1]: id window
    assert op.args[8:11] == ["i1", 5, 0]
    assert len(op.args) == 13  # then the JSON and the digest
    result = op.decode([5, 1, 1, 1, b"queued"])
    assert (result.token_count, result.flagged, result.state, result.duplicates) == (
        5,
        True,
        "queued",
        0,
    )


def test_pop_op_carries_a_token_per_call_and_the_remembered_pop_key() -> None:
    o = ops()
    k = KeySchema("cs", 16).session("s")
    first, second = o.pop("s"), o.pop("s")
    assert first.script == "pop"
    assert first.keys == [k.msgs, k.meta, k.ids, k.idlog, k.archive, k.popped]
    assert k.popped == f"cs:{{{k.shard}}}:s:s:popped"
    assert first.args[0] == "s"
    assert first.args[2] == POP_RETRY_WINDOW_MS == 60_000
    # A random token per call (its retries resend the same op, so the same token).
    assert isinstance(first.args[1], str)
    assert len(first.args[1]) == 32
    assert first.args[1] != second.args[1]


def test_to_api_message_keeps_only_chat_fields() -> None:
    record = {
        "role": "tool",
        "content": "x",
        "tool_call_id": "c",
        "id": "i",
        "tokens": 3,
        "ts": 1,
        "kind": "message",
        "app": "extra",
        "name": None,
    }
    assert to_api_message(record) == {"role": "tool", "content": "x", "tool_call_id": "c"}


def test_decode_meta() -> None:
    meta, ctx = decode_meta(
        {
            "created_at": "1000",
            "updated_at": "2000",
            "token_count": "5",
            "message_count": "2",
            "token_limit": "10",
            "state": "queued",
            "ttl": "60000",
            "ctx:user": '{"n": 1}',
            "queued_at": "3",
        }
    )
    assert meta.token_count == 5
    assert meta.state == "queued"
    assert meta.ttl == 60
    assert meta.created_at.timestamp() == 1.0
    assert meta.extra == {"queued_at": "3"}
    assert ctx == {"user": {"n": 1}}
    assert not meta.over_limit


@pytest.mark.parametrize("field", ["token_limit", "ttl", "max_message_bytes", "read_chunk"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_store_config_rejects_bad_numbers(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"token_limit": 10, field: value}
    with pytest.raises(InvalidLimitError):
        StoreConfig(**kwargs)


def test_shard_config_check() -> None:
    check_shard_config(b"16", 16, "cs")
    with pytest.raises(ShardCountMismatchError, match="shards=16"):
        check_shard_config(b"16", 32, "cs")


@pytest.mark.parametrize(
    ("reply", "cls"),
    [
        ("CS_NOSESSION session x does not exist", SessionNotFoundError),
        ("CS_EXISTS session x already exists script: abc, on @user_script:1.", SessionExistsError),
        ("ERR CS_FULL session x holds 3", SessionFullError),
        ("CS_LEASE lease lost", LeaseLostError),
        ("CS_BADARG append: malformed", ScriptError),
    ],
)
def test_script_error_codes_map_to_types(reply: str, cls: type[Exception]) -> None:
    err = from_script_error(reply)
    assert isinstance(err, cls)
    assert "script:" not in str(err)
    assert "CS_" not in str(err)


def test_other_errors_are_not_ours() -> None:
    assert from_script_error("WRONGTYPE Operation against a key") is None


def test_invalid_message_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="role"):
        validate_message({"role": "x", "content": "y"})
    assert issubclass(InvalidMessageError, ValueError)


_JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**60), 2**60),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
_JSON = st.recursive(
    _JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    extra=st.dictionaries(
        st.sampled_from(["a", "zeta", "B", "é", "context", "cz"]),
        _JSON,
        max_size=4,
    ),
    content_first=st.booleans(),
)
def test_digest_is_the_sorted_keys_json_whatever_the_shortcut(
    extra: dict[str, Any], content_first: bool
) -> None:
    """A message whose JSON is already canonical (keys in order, scalar values) is digested
    from the encoding it was stored with, not encoded twice: the digest is still exactly the
    blake2b of the role and the sorted-keys JSON, for any key order and nesting."""
    import hashlib

    message = {"role": "user", "content": "hi", **extra}
    if not content_first:
        message["content"] = message.pop("content")  # last: keys out of order
    encoded = ops().encode_message(message, 1)
    rest = {k: v for k, v in message.items() if k != "role"}
    canonical = json.dumps(
        rest, ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=True
    )
    want = hashlib.blake2b(f"user\n{canonical}".encode(), digest_size=8).hexdigest()
    assert encoded.digest == want
