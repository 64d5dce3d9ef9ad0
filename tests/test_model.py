"""A stateful model test: random sequences of every session operation against a plain model.

A hypothesis :class:`RuleBasedStateMachine` drives two sessions (which may share a shard)
through create / append (single and batch, with retried ids, generated ids, tool-call groups,
late system messages) / get_context (random budgets) / get_state / update_context / delete,
and the compaction path driven directly with :class:`~convstate.compactor.Compactor`: claim,
heartbeat, compact (plan + deterministic summary + swap), give back (release "requeue"),
daemon crash (the lease deadline forced into the past), reap (back to the queue, or dead after
``max_attempts``: 1 or 2) and the operator's requeue. Claims are kept after a crash or
a delete, so a daemon that comes back late is exercised too: its compaction must be fenced
(``lost``/``gone``) and change nothing.

The model (:class:`SessionModel`) is plain Python: the records in order (ids, roles, tokens),
the head count, every id the session has stored, the totals, the compaction state
(idle/queued/running/dead), the epoch, attempts, reflag threshold, lease and context. What a
compaction folds is decided with the pure planner (:func:`~convstate.planner.plan_compaction`,
unit-tested in ``test_planner.py``) on the model's records, so the test checks that the swap
does exactly what the plan says.

After every step, for every session: the stored list is the model's (ids, roles, tokens, kinds,
in order), meta totals / counters / state / lease agree, the id set agrees, queue / running /
dead membership agrees with the state, and ``get_context`` with the default budget equals the
model's expectation; the read rule does the same for random budgets. The expected context is
computed in the model: the head (system messages + summary), then walking back from the newest
record while it fits, then dropping tool results at the window's start; the result fits the
budget, starts with the head, never starts its window with a tool message, and the next older
record would not have fitted.

Runs on the private real server and on fakeredis[lua] (nothing excluded: every script, the
compactor's WATCH/MULTI swap and TIME-based leases work there; PUBLISH inside scripts works but
nothing subscribes in this test).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fakeredis
import fakeredis.aioredis
import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from convstate import ConversationStore
from convstate.compactor import SUMMARY_PREFIX, Claim, Compactor, CompactorConfig
from convstate.errors import (
    BudgetTooSmallError,
    InvalidLimitError,
    LeaseLostError,
    MessageIdConflictError,
    SessionExistsError,
    SessionFullError,
    SessionNotFoundError,
)
from convstate.operations import DEFAULT_ID_WINDOW
from convstate.planner import CompactionPolicy, Uncompactable, plan_compaction, reflag_margin
from convstate.summarizers import Summary, SummaryRequest
from tests.servers import RedisServer

T = TypeVar("T")

SIDS = ("alpha", "beta")
SHARDS = 2
DEFAULT_LIMIT = 40
MAX_MESSAGES = 30
READ_CHUNK = 3
POLICY = CompactionPolicy(
    keep_recent_tokens=6, min_recent_messages=1, target_ratio=0.5, max_summary_tokens=12
)
API_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")
PRIMING = 3

MODEL_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class WordCounter:
    """A tiny deterministic token counter: 4 per message, 1 per word of content, a little for
    names and tool fields. Fast, and easy to reason about in the model."""

    reply_priming: int = PRIMING

    def count_message(self, message: Mapping[str, Any]) -> int:
        total = 4
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.split())
        elif content is not None:
            total += len(json.dumps(content).split())
        if message.get("name") is not None:
            total += 2
        if message.get("tool_call_id") is not None:
            total += 1
        total += 2 * len(message.get("tool_calls") or [])
        return total


COUNTER = WordCounter()


def summary_text(folded: int, has_previous: bool) -> str:
    return f"{folded} messages folded" + (" after an earlier summary" if has_previous else "")


class DeterministicSummarizer:
    name = "deterministic"

    async def summarize(self, request: SummaryRequest) -> Summary:
        return Summary(
            text=summary_text(len(request.messages), request.previous_summary is not None),
            model="none",
        )


# -- the model ---------------------------------------------------------------------------------


@dataclass
class Rec:
    """One stored record, as the model knows it."""

    id: str
    tokens: int
    role: str
    content: str | None
    kind: str = "message"
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def record(self) -> dict[str, Any]:
        """The fields the planner looks at."""
        out: dict[str, Any] = {
            "id": self.id,
            "tokens": self.tokens,
            "role": self.role,
            "content": self.content,
            "kind": self.kind,
        }
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def api(self) -> dict[str, Any]:
        rec = self.record()
        return {k: rec[k] for k in API_FIELDS if rec.get(k) is not None}


@dataclass
class SessionModel:
    limit: int
    records: list[Rec] = field(default_factory=list)
    head_count: int = 0
    #: The idempotency window: id -> what makes a message "the same" (see :func:`same_key`),
    #: oldest first; a summary's id maps to "summary".
    ids: dict[str, str] = field(default_factory=dict)
    state: str = "idle"
    epoch: int = 0
    attempts: int = 0
    appended: int = 0
    reflag_above: int = 0
    lease: str | None = None
    lease_expired: bool = False
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.records)

    def remember(self, mid: str, key: str) -> None:
        self.ids[mid] = key

    def prune_ids(self, batch: int) -> None:
        """Keep the newest ``max(DEFAULT_ID_WINDOW, batch)`` ids, as an append does."""
        for mid in list(self.ids)[: max(0, len(self.ids) - max(DEFAULT_ID_WINDOW, batch))]:
            del self.ids[mid]


def same_key(message: Mapping[str, Any]) -> str:
    """Two sends are the same message when every field but the id matches."""
    return json.dumps({k: v for k, v in message.items() if k != "id"}, sort_keys=True)


def expected_context(model: SessionModel, budget: int | None) -> list[dict[str, Any]] | None:
    """What get_context must return (None: BudgetTooSmallError)."""
    limit = model.limit if budget is None else budget
    head = model.records[: model.head_count]
    used = PRIMING + sum(r.tokens for r in head)
    if used > limit:
        return None
    picked: list[Rec] = []
    for rec in reversed(model.records[model.head_count :]):
        if used + rec.tokens > limit:
            break
        used += rec.tokens
        picked.append(rec)
    while picked and picked[-1].role == "tool":
        picked.pop()
    return [r.api() for r in head] + [r.api() for r in reversed(picked)]


def check_context(
    model: SessionModel, budget: int | None, got: list[dict[str, Any]] | None
) -> None:
    """``got`` (None: BudgetTooSmallError raised) is what the model expects, and has the
    documented properties (fits, head first, no leading tool result, newest suffix)."""
    want = expected_context(model, budget)
    assert got == want
    if got is None:
        return
    limit = model.limit if budget is None else budget
    head = [r.api() for r in model.records[: model.head_count]]
    assert got[: len(head)] == head
    window = got[len(head) :]
    assert PRIMING + sum(COUNTER.count_message(m) for m in got) <= limit
    if window:
        assert window[0]["role"] != "tool"
        body = [r.api() for r in model.records[model.head_count :]]
        assert body[len(body) - len(window) :] == window  # a suffix of the history


# -- backends ----------------------------------------------------------------------------------


@dataclass
class Backend:
    """How to reach the server a machine runs against (fresh per example for fakeredis)."""

    name: str
    sync_client: Callable[[], redis.Redis]
    async_client: Callable[[], redis.asyncio.Redis]


def real_backend(server: RedisServer) -> Callable[[], Backend]:
    def make() -> Backend:
        return Backend(
            "real",
            lambda: redis.Redis.from_url(server.url),
            lambda: redis.asyncio.Redis.from_url(server.url),
        )

    return make


def fake_backend() -> Backend:
    fake_server = fakeredis.FakeServer()
    return Backend(
        "fake",
        lambda: fakeredis.FakeRedis(server=fake_server),
        lambda: fakeredis.aioredis.FakeRedis(server=fake_server),
    )


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the machine -------------------------------------------------------------------------------


class SessionMachine(RuleBasedStateMachine):
    def __init__(self, backend: Backend, max_attempts: int) -> None:
        super().__init__()
        self.backend = backend
        self.prefix = f"csm{secrets.token_hex(4)}"
        self.r = backend.sync_client()
        self.store = ConversationStore(
            self.r,
            token_limit=DEFAULT_LIMIT,
            counter=COUNTER,
            prefix=self.prefix,
            shards=SHARDS,
            max_messages=MAX_MESSAGES,
            read_chunk=READ_CHUNK,
        )
        self.sessions: dict[str, SessionModel] = {}
        #: messages sent with their ids (what a retry re-sends), per session id
        self.sent: dict[str, list[dict[str, Any]]] = {sid: [] for sid in SIDS}
        #: tool results whose call was appended alone, per session id
        self.pending: dict[str, list[dict[str, Any]]] = {sid: [] for sid in SIDS}
        #: claims of daemons that may still act (current and stale)
        self.claims: list[Claim] = []
        #: a compaction may fail (lease expiry) max_attempts times before dead-letter
        self.config = CompactorConfig(lease_ms=60_000, max_attempts=max_attempts, policy=POLICY)
        self.counter = 0

    def teardown(self) -> None:
        try:
            keys = list(self.r.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                self.r.delete(*keys)
        finally:
            self.r.close()

    # -- helpers -------------------------------------------------------------------------------

    def next_id(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def words(self, data: st.DataObject) -> str:
        n = data.draw(st.integers(0, 12), label="words")
        return " ".join([f"w{self.counter}"] + ["x"] * n)

    def run_async(self, fn: Callable[[Compactor], Awaitable[T]]) -> T:
        async def go() -> T:
            client = self.backend.async_client()
            try:
                compactor = Compactor(
                    client, self.store.schema, COUNTER, DeterministicSummarizer(), self.config
                )
                return await fn(compactor)
            finally:
                await client.aclose()

        return asyncio.run(go())

    def draw_turn(self, data: st.DataObject, sid: str, *, single: bool) -> list[dict[str, Any]]:
        """One turn: a message, or (in a batch) a tool-call group."""
        kinds = ["user", "assistant", "system", "noid", "tools", "tool_result", "orphan"]
        if self.sent[sid]:
            kinds.append("retry")
        kind = data.draw(st.sampled_from(kinds), label="kind")
        if kind == "retry":
            old = data.draw(st.sampled_from(self.sent[sid]), label="retried")
            if data.draw(st.booleans(), label="retry with other content"):
                return [{**old, "content": self.words(data)}]
            return [dict(old)]
        if kind in ("user", "assistant", "system"):
            return [{"role": kind, "content": self.words(data), "id": self.next_id("m")}]
        if kind == "noid":
            return [{"role": "user", "content": self.words(data)}]
        if kind == "orphan":
            return [
                {
                    "role": "tool",
                    "tool_call_id": self.next_id("nocall"),
                    "content": self.words(data),
                    "id": self.next_id("m"),
                }
            ]
        if kind == "tool_result":
            if self.pending[sid]:
                return [self.pending[sid].pop(0)]
            return [{"role": "user", "content": self.words(data), "id": self.next_id("m")}]
        ncalls = data.draw(st.integers(1, 2), label="calls")
        call_ids = [self.next_id("call") for _ in range(ncalls)]
        call = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": c, "type": "function", "function": {"name": "f", "arguments": "{}"}}
                for c in call_ids
            ],
            "id": self.next_id("m"),
        }
        results = [
            {
                "role": "tool",
                "tool_call_id": c,
                "content": self.words(data),
                "id": self.next_id("m"),
            }
            for c in call_ids
        ]
        if single:
            self.pending[sid].extend(results)
            return [call]
        return [call, *results]

    # -- rules ---------------------------------------------------------------------------------

    @initialize(data=st.data())
    def start(self, data: st.DataObject) -> None:
        """Most runs start with both sessions created (a rule may delete and recreate them)."""
        for sid in SIDS:
            if data.draw(st.integers(0, 3), label=f"create {sid}"):
                self.create(sid, 1, None, False, {}, data)

    @rule(
        sid=st.sampled_from(SIDS),
        nsys=st.integers(0, 2),
        limit=st.one_of(st.none(), st.integers(5, 80)),
        exist_ok=st.booleans(),
        context=st.dictionaries(
            st.sampled_from(["k1", "k2"]), st.one_of(st.integers(-3, 3), st.text(max_size=3))
        ),
        data=st.data(),
    )
    def create(
        self,
        sid: str,
        nsys: int,
        limit: int | None,
        exist_ok: bool,
        context: dict[str, Any],
        data: st.DataObject,
    ) -> None:
        systems = [
            {"role": "system", "content": self.words(data), "id": self.next_id("sys")}
            for _ in range(nsys)
        ]
        model = self.sessions.get(sid)
        effective = DEFAULT_LIMIT if limit is None else limit
        sys_tokens = sum(COUNTER.count_message(m) for m in systems)
        kwargs: dict[str, Any] = {
            "system": systems,
            "token_limit": limit,
            "context": context,
            "exist_ok": exist_ok,
        }
        if sys_tokens >= effective:  # validated before Redis is asked
            with pytest.raises(InvalidLimitError):
                self.store.create_session(sid, **kwargs)
            return
        if model is not None and not exist_ok:
            with pytest.raises(SessionExistsError):
                self.store.create_session(sid, **kwargs)
            return
        state = self.store.create_session(sid, **kwargs)
        if model is not None:  # exist_ok: the existing session, unchanged
            assert [m["id"] for m in state.messages] == [r.id for r in model.records]
            return
        model = SessionModel(limit=effective, context=dict(context))
        for m in systems:
            model.records.append(Rec(m["id"], COUNTER.count_message(m), "system", m["content"]))
            model.remember(m["id"], same_key(m))
        model.head_count = model.appended = len(systems)
        self.sessions[sid] = model
        self.sent[sid].extend(systems)
        assert state.meta.token_count == model.tokens
        assert state.context == context

    @rule(sid=st.sampled_from(SIDS), create=st.booleans(), batch=st.booleans(), data=st.data())
    def append(self, sid: str, create: bool, batch: bool, data: st.DataObject) -> None:
        if batch:
            messages = [
                m
                for _ in range(data.draw(st.integers(1, 3), label="turns"))
                for m in self.draw_turn(data, sid, single=False)
            ]
        else:
            messages = self.draw_turn(data, sid, single=True)
        model = self.sessions.get(sid)
        if model is None and not create:
            with pytest.raises(SessionNotFoundError):
                self._do_append(sid, messages, batch, create)
            return
        base = model if model is not None else SessionModel(limit=DEFAULT_LIMIT)
        placeholder = [m.get("id") or f"generated-{i}" for i, m in enumerate(messages)]
        seen = dict(base.ids)
        fresh: list[int] = []
        conflict = False
        for i, mid in enumerate(placeholder):
            key = same_key(messages[i])
            if mid not in seen:
                seen[mid] = key
                fresh.append(i)
            elif seen[mid] != key:
                conflict = True
        if conflict:  # checked before anything else: nothing is written
            with pytest.raises(MessageIdConflictError):
                self._do_append(sid, messages, batch, create)
            event("append: id conflict")
            return
        if len(base.records) + len(fresh) > MAX_MESSAGES:
            with pytest.raises(SessionFullError):
                self._do_append(sid, messages, batch, create)
            event("append: full")
            return
        result = self._do_append(sid, messages, batch, create)
        assert len(result.message_ids) == len(messages)
        for i, m in enumerate(messages):
            if "id" in m:
                assert result.message_ids[i] == m["id"]
            else:
                assert result.message_ids[i] not in base.ids
                self.sent[sid].append({**m, "id": result.message_ids[i]})
        if model is None:
            self.sessions[sid] = model = base
        for i in fresh:
            m = messages[i]
            mid = result.message_ids[i]
            if m["role"] == "system" and model.head_count == len(model.records):
                model.head_count += 1
            model.records.append(
                Rec(
                    mid,
                    COUNTER.count_message(m),
                    m["role"],
                    m.get("content"),
                    tool_calls=m.get("tool_calls"),
                    tool_call_id=m.get("tool_call_id"),
                )
            )
            model.remember(mid, same_key(m))
            if "id" in m:
                self.sent[sid].append(m)
        model.appended += len(fresh)
        model.prune_ids(len(fresh))
        flagged = (
            model.tokens > model.limit
            and model.tokens > model.reflag_above
            and model.state == "idle"
        )
        if flagged:
            model.state = "queued"
        event(f"append: {len(messages) - len(fresh)} duplicate(s), flagged={flagged}")
        assert (result.stored, result.flagged, result.state) == (len(fresh), flagged, model.state)
        assert (result.token_count, result.message_count) == (model.tokens, len(model.records))

    def _do_append(
        self, sid: str, messages: list[dict[str, Any]], batch: bool, create: bool
    ) -> Any:
        if batch:
            return self.store.append_many(sid, messages, create=create)
        return self.store.append(sid, messages[0], create=create)

    @rule(sid=st.sampled_from(SIDS), default=st.booleans(), data=st.data())
    def read(self, sid: str, default: bool, data: st.DataObject) -> None:
        model = self.sessions.get(sid)
        # Budgets around the session's size (from too small for the head to room for all), and
        # budgets at an exact fit of the head and the newest k records, give or take 1.
        top = PRIMING + (model.tokens if model else 0) + 5
        budgets = st.integers(1, top)
        budgets |= budgets.map(lambda b: top + 1 - b)  # hypothesis favours small numbers
        if model is not None:
            fits = [PRIMING + sum(r.tokens for r in model.records[: model.head_count])]
            for rec in reversed(model.records[model.head_count :]):
                fits.append(fits[-1] + rec.tokens)
            edges = st.tuples(st.sampled_from(fits), st.sampled_from([-1, 0, 1]))
            budgets |= edges.map(lambda t: max(1, t[0] + t[1]))
        budget = None if default else data.draw(budgets, label="budget")
        if model is None:
            with pytest.raises(SessionNotFoundError):
                self.store.get_context(sid, budget)
            return
        try:
            got: list[dict[str, Any]] | None = self.store.get_context(sid, budget)
        except BudgetTooSmallError:
            got = None
        event(f"read: {'too small' if got is None else len(got) - model.head_count} in window")
        check_context(model, budget, got)

    @rule(sid=st.sampled_from(SIDS))
    def get_state(self, sid: str) -> None:
        model = self.sessions.get(sid)
        if model is None:
            with pytest.raises(SessionNotFoundError):
                self.store.get_state(sid)
            return
        state = self.store.get_state(sid)
        assert [m["id"] for m in state.messages] == [r.id for r in model.records]
        assert state.context == model.context
        meta = state.meta
        assert (meta.token_count, meta.message_count, meta.head_count) == (
            model.tokens,
            len(model.records),
            model.head_count,
        )
        assert (meta.state, meta.epoch, meta.attempts, meta.token_limit) == (
            model.state,
            model.epoch,
            model.attempts,
            model.limit,
        )
        assert meta.appended == model.appended

    @rule(
        sid=st.sampled_from(SIDS),
        mapping=st.dictionaries(
            st.sampled_from(["k1", "k2", "k3"]), st.one_of(st.none(), st.integers(-3, 3))
        ),
        replace=st.booleans(),
    )
    def update_context(self, sid: str, mapping: dict[str, Any], replace: bool) -> None:
        model = self.sessions.get(sid)
        if model is None:
            with pytest.raises(SessionNotFoundError):
                self.store.update_context(sid, mapping, replace=replace)
            return
        count = self.store.update_context(sid, mapping, replace=replace)
        ctx = {} if replace else dict(model.context)
        for k, v in mapping.items():
            if v is None:
                ctx.pop(k, None)
            else:
                ctx[k] = v
        model.context = ctx
        assert count == len(ctx)

    @rule(sid=st.sampled_from(SIDS))
    def delete(self, sid: str) -> None:
        existed = self.store.delete_session(sid)
        assert existed == (sid in self.sessions)
        self.sessions.pop(sid, None)
        self.pending[sid].clear()

    # -- compaction ----------------------------------------------------------------------------

    @rule(sid=st.sampled_from(SIDS))
    def claim(self, sid: str) -> None:
        claim = self.run_async(lambda c: c.claim(sid))
        model = self.sessions.get(sid)
        if model is None or model.state != "queued":
            assert claim is None
            return
        assert claim is not None
        assert (claim.attempts, claim.epoch, claim.token_limit) == (
            model.attempts,
            model.epoch,
            model.limit,
        )
        model.state = "running"
        model.lease = claim.token
        model.lease_expired = False
        self.claims.append(claim)

    def _pick_claim(self, data: st.DataObject) -> Claim:
        index = data.draw(st.integers(0, len(self.claims) - 1), label="claim")
        return self.claims[index]

    def _holds(self, claim: Claim) -> SessionModel | None:
        model = self.sessions.get(claim.session_id)
        return model if model is not None and model.lease == claim.token else None

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        self._compact(self._pick_claim(data))

    def _compact(self, claim: Claim) -> None:
        self.claims.remove(claim)
        sid = claim.session_id
        outcome = self.run_async(lambda c: c.compact(claim))
        event(f"compact: {outcome.status}")
        model = self._holds(claim)
        if model is None:
            assert outcome.status == ("gone" if sid not in self.sessions else "lost")
            return
        plan = plan_compaction(
            [r.record() for r in model.records], model.head_count, model.limit, POLICY
        )
        model.lease = None
        model.lease_expired = False
        model.attempts = 0
        if isinstance(plan, Uncompactable):
            assert outcome.status == "uncompactable", outcome
            model.state = "idle"
            model.reflag_above = model.tokens + plan.grow_by
            return
        content = SUMMARY_PREFIX + summary_text(len(plan.folded), plan.previous_summary is not None)
        summary_tokens = COUNTER.count_message({"role": "system", "content": content})
        if summary_tokens >= plan.previous_summary_tokens + plan.folded_tokens:
            # A compaction never grows a session: no gain, history kept.
            assert outcome.status == "uncompactable", outcome
            assert outcome.note.startswith("no gain"), outcome
            model.state = "idle"
            model.reflag_above = model.tokens + reflag_margin(model.limit)
            return
        assert outcome.status == "compacted", outcome
        head = model.records[: model.head_count]
        system = [r for r in head if r.kind != "summary"]
        stored = self.r.lindex(claim.keys.msgs, len(system))
        assert stored is not None
        summary_id = json.loads(stored)["id"]
        assert summary_id.startswith("sum-")
        assert summary_id not in model.ids
        summary = Rec(
            summary_id,
            COUNTER.count_message({"role": "system", "content": content}),
            "system",
            content,
            kind="summary",
        )
        model.records = [*system, summary, *model.records[plan.fold_end :]]
        model.head_count = len(system) + 1
        model.remember(summary_id, "summary")
        model.epoch += 1
        model.reflag_above = 0
        model.state = "queued" if model.tokens > model.limit else "idle"
        assert (outcome.tokens_after, outcome.folded) == (model.tokens, len(plan.folded))

    @rule(sid=st.sampled_from(SIDS))
    def daemon_step(self, sid: str) -> None:
        """What a daemon does most: claim a due session and compact it at once."""
        before = len(self.claims)
        self.claim(sid)
        if len(self.claims) > before:
            self._compact(self.claims[-1])

    @rule(sid=st.sampled_from(SIDS), reap=st.booleans())
    def abandon(self, sid: str, reap: bool) -> None:
        """A daemon claims a session and dies before finishing (its claim is kept: it may come
        back late and try to swap, which must be fenced once the lease was reaped); another
        daemon's sweep may reap it at once."""
        before = len(self.claims)
        self.claim(sid)
        if len(self.claims) > before:
            self._crash(sid)
            if reap:
                self.reap()

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def give_back(self, data: st.DataObject) -> None:
        """A daemon shutting down gives its session back (release "requeue")."""
        claim = self._pick_claim(data)
        self.claims.remove(claim)
        model = self._holds(claim)
        if model is None:
            with pytest.raises(LeaseLostError):
                self.run_async(lambda c: c.release(claim, "requeue"))
            return
        assert self.run_async(lambda c: c.release(claim, "requeue")) == "queued"
        model.state = "queued"
        model.lease = None
        model.lease_expired = False

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        claim = self._pick_claim(data)
        alive = self.run_async(lambda c: c.heartbeat(claim))
        model = self._holds(claim)
        # A lease past its deadline takes no heartbeat (heartbeat.lua): it stays expired, and
        # held by its token, until a reap takes it back.
        assert alive == (model is not None and not model.lease_expired)

    @precondition(lambda self: any(m.state == "running" for m in self.sessions.values()))
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """The daemon holding a lease dies: its lease deadline passes (forced into the past)."""
        running = sorted(sid for sid, m in self.sessions.items() if m.state == "running")
        self._crash(data.draw(st.sampled_from(running), label="crashed"))

    def _crash(self, sid: str) -> None:
        keys = self.store.schema.session(sid)
        assert self.r.zadd(keys.running, {sid: 1}, xx=True) == 0  # updated, not added
        self.sessions[sid].lease_expired = True

    @precondition(lambda self: any(m.state == "running" for m in self.sessions.values()))
    @rule()
    def reap(self) -> None:
        shards = sorted({self.store.schema.shard_of(sid) for sid in SIDS})

        async def reap_all(c: Compactor) -> list[tuple[str, str]]:
            return [item for shard in shards for item in await c.reap(shard)]

        reaped = self.run_async(reap_all)
        expected = []
        for sid, model in sorted(self.sessions.items()):
            if model.state == "running" and model.lease_expired:
                model.attempts += 1
                model.state = "dead" if model.attempts >= self.config.max_attempts else "queued"
                model.lease = None
                model.lease_expired = False
                expected.append((sid, model.state))
        event(f"reap: {[state for _, state in expected]}")
        assert sorted(reaped) == expected

    @rule(sid=st.sampled_from(SIDS), only_dead=st.booleans())
    def requeue(self, sid: str, only_dead: bool) -> None:
        model = self.sessions.get(sid)
        if model is None:
            with pytest.raises(SessionNotFoundError):
                self.run_async(lambda c: c.requeue(sid, only_dead=only_dead))
            return
        queued = self.run_async(lambda c: c.requeue(sid, only_dead=only_dead))
        want = model.state not in ("running", "queued") and (not only_dead or model.state == "dead")
        assert queued == want
        if want:
            model.state = "queued"
            model.attempts = 0
            model.reflag_above = 0

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def storage_matches_model(self) -> None:
        for sid in SIDS:
            keys = self.store.schema.session(sid)
            pipe = self.r.pipeline(transaction=True)
            pipe.lrange(keys.msgs, 0, -1)
            pipe.hgetall(keys.meta)
            pipe.hkeys(keys.ids)
            pipe.zscore(keys.queue, sid)
            pipe.zscore(keys.running, sid)
            pipe.zscore(keys.dead, sid)
            raw, flat, ids, queued, running, dead = pipe.execute()
            model = self.sessions.get(sid)
            if model is None:
                assert flat == {}
                assert raw == []
                assert ids == []
                assert (queued, running, dead) == (None, None, None)
                continue
            records = [json.loads(item) for item in raw]
            assert [r["id"] for r in records] == [r.id for r in model.records]
            assert [(r["role"], r["tokens"], r["kind"]) for r in records] == [
                (r.role, r.tokens, r.kind) for r in model.records
            ]
            meta = {text(k): text(v) for k, v in flat.items()}
            assert int(meta["token_count"]) == model.tokens == sum(r["tokens"] for r in records)
            assert int(meta["message_count"]) == len(model.records)
            assert int(meta["head_count"]) == model.head_count
            assert int(meta["token_limit"]) == model.limit
            assert meta["state"] == model.state
            assert int(meta.get("epoch", 0)) == model.epoch
            assert int(meta.get("attempts", 0)) == model.attempts
            assert int(meta.get("appended", 0)) == model.appended
            assert int(meta.get("reflag_above", 0)) == model.reflag_above
            assert meta.get("lease") == model.lease
            assert {text(i) for i in ids} == set(model.ids)
            assert (queued is not None) == (model.state == "queued")
            assert (running is not None) == (model.state == "running")
            assert (dead is not None) == (model.state == "dead")
            if running is not None:
                assert (running == 1) == model.lease_expired

    @invariant()
    def context_matches_model(self) -> None:
        """get_context with the default budget, and at the edge of fitting the head plus the
        newest half of the body (exact fit, one token short), equals the model's."""
        for sid in SIDS:
            model = self.sessions.get(sid)
            if model is None:
                continue
            half = model.records[model.head_count + (len(model.records) - model.head_count) // 2 :]
            fit = PRIMING + sum(r.tokens for r in [*model.records[: model.head_count], *half])
            for budget in (None, fit, fit - 1):
                if budget == 0:
                    continue
                try:
                    got: list[dict[str, Any]] | None = self.store.get_context(sid, budget)
                except BudgetTooSmallError:
                    got = None
                check_context(model, budget, got)


# -- the tests ---------------------------------------------------------------------------------


def machine(make_backend: Callable[[], Backend], max_attempts: int) -> type[SessionMachine]:
    """A machine class for run_state_machine_as_test (each run gets a fresh backend)."""

    class Machine(SessionMachine):
        def __init__(self) -> None:
            super().__init__(make_backend(), max_attempts)

    return Machine


@pytest.mark.slow
@pytest.mark.parametrize("max_attempts", [1, 2])
def test_model_real_server(redis_server: RedisServer, max_attempts: int) -> None:
    run_state_machine_as_test(
        machine(real_backend(redis_server), max_attempts), settings=MODEL_SETTINGS
    )


@pytest.mark.slow
@pytest.mark.parametrize("max_attempts", [1, 2])
def test_model_fakeredis(max_attempts: int) -> None:
    run_state_machine_as_test(machine(fake_backend, max_attempts), settings=MODEL_SETTINGS)
