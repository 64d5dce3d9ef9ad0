"""One compaction: claim a flagged session, plan, summarize, swap.

The steps, and why each is safe when many app instances append and several daemons run:

1. **claim** (Lua): move the session from its shard queue to the running set with a lease
   deadline and a random lease token. Only one daemon wins.
2. **snapshot** (one read script) and **plan** (pure, :mod:`convstate.planner`): which
   prefix of the list to fold; appends only ever push to the tail, so they never change it.
   Decoding the records and planning run in a worker thread, never on the event loop.
3. **summarize** (seconds; no Redis watch held): the summarizer folds the previous summary and
   the prefix into a new summary. A failure changes no message: the session goes back to the
   queue with a backoff, or to the dead-letter state (logged once at WARNING, naming the
   session and ``convstate requeue``). From the snapshot to the end of the summary, a
   heartbeat extends the lease every third of the lease.
4. **swap** (one Lua script, ``lua/swap.lua``, milliseconds): check the lease token and that
   the prefix's ids are exactly the snapshot's; if both hold, replace the prefix with system
   message(s) + summary, adjust the totals, release the lease. The check and the writes are
   one atomic script, so no append can land in between, and appends only push to the tail,
   which the swap never touches: nothing is lost, and there is no race to retry (DESIGN's
   WATCH/MULTI did the same optimistically; a script also runs when Redis memory is full,
   where MULTI/EXEC is refused: see the script's header). A daemon whose lease expired is
   fenced: its token no longer matches. A session still over its limit, or one step of a
   longer fold (see :attr:`CompactionPlan.partial`) still over its target, is queued again,
   and the wake-up is published after the script.

Every step is a Lua script over the keys of one hash tag, so on a Redis Cluster each runs on
the slot's owner; TRYAGAIN and redis-py's ClusterError (a slot migrating, CLUSTERDOWN: the
script ran nothing) are retried for :data:`REDIRECT_RETRY_SECONDS`. Every step also runs when
Redis memory is full (``maxmemory``, ``noeviction``), which is when compaction matters most:
the snapshot only reads, claim/heartbeat/release/reap declare ``allow-oom``, and the swap
runs whenever it frees at least what it adds (see ``lua/swap.lua``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import shlex
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio
from redis.exceptions import (
    RedisError,
    ResponseError,
)

from convstate.errors import (
    ConfigurationError,
    LeaseLostError,
    MemoryFullError,
    RecordDecodeError,
    SessionCorruptedError,
    SessionNotFoundError,
    ValidationError,
    from_script_error,
)
from convstate.keys import KeySchema, SessionKeys
from convstate.models import ShardStatus
from convstate.operations import check_nesting, decode_record
from convstate.planner import (
    CompactionPlan,
    CompactionPolicy,
    Uncompactable,
    plan_compaction,
    reflag_margin,
)
from convstate.scripts import arun_script, script_source
from convstate.summarizers import Summarizer, SummaryRequest
from convstate.tokens import TokenCounter

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a Redis call of the compactor keeps retrying a cluster reply that says nothing was
#: done: MOVED/ASK/TRYAGAIN/CLUSTERDOWN in the snapshot and the swap, and TRYAGAIN or
#: redis-py's ClusterError ("TTL exhausted.") in the queue scripts (a slot migration can take
#: longer than redis-py's own retries).
REDIRECT_RETRY_SECONDS = 10.0

#: Text the summary message starts with (stripped again when the summary is rolled).
SUMMARY_PREFIX = "Summary of the conversation so far:\n"

#: Swap results that give the session back for a retry: (meta last_error, outcome note).
_SWAP_RETRY_REASONS = {
    "changed": ("history prefix changed", "history prefix changed"),
}


@dataclass(frozen=True)
class CompactorConfig:
    """How compactions run.

    Attributes:
        lease_ms: lease length; a daemon that stops heartbeating loses the session after it.
        max_attempts: failed attempts (summarizer errors, expired leases) before dead-letter.
        backoff_base_ms / backoff_max_ms: retry delay ``base * 2**(attempt-1)``, capped.
        archive: keep the folded originals in the session's archive list.
        archive_ttl: keep the archive list at least this many seconds after a compaction. An
            archive never expires before its session: it gets the session's TTL (refreshed by
            every write of the session) when that is longer. None: the session's TTL, or none.
        policy: what to fold and what to keep (:class:`~convstate.planner.CompactionPolicy`).
    """

    lease_ms: int = 60_000
    max_attempts: int = 5
    backoff_base_ms: int = 1_000
    backoff_max_ms: int = 300_000
    archive: bool = False
    archive_ttl: int | None = None
    policy: CompactionPolicy = field(default_factory=CompactionPolicy)

    def __post_init__(self) -> None:
        for name in ("lease_ms", "max_attempts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, not {value!r}")
        if self.backoff_base_ms < 0 or self.backoff_max_ms < self.backoff_base_ms:
            raise ConfigurationError("need 0 <= backoff_base_ms <= backoff_max_ms")

    def backoff_ms(self, attempts: int) -> int:
        """Delay before retry number ``attempts`` (1-based)."""
        return int(min(self.backoff_max_ms, self.backoff_base_ms * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Claim:
    """A session this daemon holds the lease of."""

    session_id: str
    keys: SessionKeys
    token: str
    attempts: int
    epoch: int
    deadline_ms: int
    queued_at_ms: int
    token_limit: int = 0


@dataclass(frozen=True)
class Outcome:
    """How one compaction ended.

    ``status`` is one of: ``compacted``, ``uncompactable`` (left idle, see ``note``),
    ``retry`` (summarizer failed; queued again with backoff), ``dead`` (failed too often),
    ``lost`` (the lease expired or was taken over: this daemon wrote nothing), ``requeued``
    (given back, e.g. on shutdown), ``gone`` (the session was deleted before the snapshot; a
    deletion during the summary ends ``lost``: the swap is fenced).
    """

    session_id: str
    status: str
    tokens_before: int = 0
    tokens_after: int = 0
    folded: int = 0
    summary_ms: float = 0.0
    swap_attempts: int = 0
    note: str = ""


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Compactor:
    """Runs compactions against one Redis (standalone or cluster, asyncio)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        schema: KeySchema,
        counter: TokenCounter,
        summarizer: Summarizer,
        config: CompactorConfig | None = None,
    ) -> None:
        self.redis = client
        self.schema = schema
        self.counter = counter
        self.summarizer = summarizer
        self.config = config or CompactorConfig()
        names = ("claim", "heartbeat", "release", "reap", "requeue", "peek", "swap", "state")
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(script_source(name)) for name in names
        }

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await arun_script(
                self.redis,
                self._scripts[name],
                keys,
                args,
                cluster_retry_seconds=REDIRECT_RETRY_SECONDS,
            )
        except ResponseError as exc:
            raise (from_script_error(str(exc)) or exc) from exc

    def count_text(self, text: str) -> int:
        """Tokens ``text`` costs as a system message (what the summary will cost)."""
        return self.counter.count_message({"role": "system", "content": text})

    # -- queue ---------------------------------------------------------------------------------

    async def claim_next(self, shard: int, *, candidates: int = 8) -> Claim | None:
        """Claim the oldest due session of ``shard``, or return None."""
        queue = self.schema.queue(shard)
        for raw in await self.redis.zrange(queue, 0, candidates - 1):
            sid = _text(raw)
            claim = await self.claim(sid)
            if claim is not None:
                return claim
        return None

    async def claim(self, session_id: str) -> Claim | None:
        """Claim one session if it is queued and due."""
        keys = self.schema.session(session_id)
        token = secrets.token_hex(16)
        reply = await self._script(
            "claim",
            [keys.queue, keys.running, keys.meta],
            [session_id, self.config.lease_ms, token],
        )
        if int(reply[0]) != 1:
            return None
        return Claim(session_id, keys, token, *(int(x) for x in reply[1:6]))

    async def heartbeat(self, claim: Claim) -> bool:
        """Extend the lease; False if it was lost."""
        reply = await self._script(
            "heartbeat",
            [claim.keys.running, claim.keys.meta],
            [claim.session_id, claim.token, self.config.lease_ms],
        )
        return int(reply[0]) == 1

    async def release(
        self, claim: Claim, outcome: str, note: str = "", *, grow_by: int | None = None
    ) -> str:
        """Give the session back without a swap (``retry``, ``requeue`` or ``idle``).

        ``idle``: the session is flagged again only once its token total grows by ``grow_by``
        (default: a tenth of its limit, :data:`~convstate.planner.REFLAG_SHARE`), so appends
        do not re-flag a session that cannot shrink yet. A ``retry`` that reaches
        ``max_attempts`` dead-letters the session and logs it once at WARNING."""
        delay = self.config.backoff_ms(claim.attempts + 1) if outcome == "retry" else 0
        margin = 0
        if outcome == "idle":
            margin = max(1, reflag_margin(claim.token_limit) if grow_by is None else grow_by)
        reply = await self._script(
            "release",
            [claim.keys.queue, claim.keys.running, claim.keys.meta, claim.keys.dead],
            [
                claim.session_id,
                claim.token,
                outcome,
                delay,
                self.config.max_attempts,
                note[:1000],
                margin,
            ],
        )
        state = _text(reply)
        if state == "dead":
            self._log_dead_letter(claim.session_id, note)
        return state

    def _log_dead_letter(self, session_id: str, last_error: str) -> None:
        """The one WARNING line of a dead-lettered session: what failed and how to retry."""
        log.warning(
            "session %r is dead-lettered after %d failed attempts (last error: %s); it is not "
            "compacted again until an operator runs: convstate requeue %s",
            session_id,
            self.config.max_attempts,
            last_error[:200] or "unknown",
            shlex.quote(session_id),
        )

    async def reap(self, shard: int, *, limit: int = 100) -> list[tuple[str, str]]:
        """Send sessions of ``shard`` whose lease expired back to the queue (or dead-letter).

        Whether a lease expired is decided by the reap script on the server's clock, never
        this host's: the candidates are the running sessions in deadline order, up to the
        first whose lease has not expired."""
        running = self.schema.running(shard)
        candidates = await self.redis.zrange(running, 0, limit - 1)
        reaped: list[tuple[str, str]] = []
        for raw in candidates:
            sid = _text(raw)
            keys = self.schema.session(sid)
            reply = await self._script(
                "reap",
                [keys.queue, keys.running, keys.meta, keys.dead],
                [sid, self.config.max_attempts],
            )
            if int(reply[0]) == 1:
                state = _text(reply[1])
                if state == "dead":
                    self._log_dead_letter(sid, "lease expired")
                else:
                    log.warning("lease of session %r expired; it is now %s", sid, state)
                reaped.append((sid, state))
            elif int(reply[0]) == 0:
                break  # not expired: neither are the later deadlines
        return reaped

    async def peek(self, shard: int) -> ShardStatus:
        """What is waiting, running and dead in one shard."""
        s = self.schema
        reply = await self._script("peek", [s.queue(shard), s.running(shard), s.dead(shard)], [])
        return ShardStatus(shard, *(int(x) for x in reply))

    async def repair_step(
        self, cursor: int, count: int = 1000, *, node: Any = None
    ) -> tuple[int, list[str]]:
        """One step of the scan that repairs sessions whose queue entry was lost (evicted
        under a ``maxmemory-policy`` that evicts): a session in state ``queued`` with no entry
        in its shard queue would wait forever. SCAN ``count`` keys from ``cursor`` for session
        meta hashes of this prefix and queue those sessions again. Returns the next cursor (0:
        a full pass ended) and the repaired session ids. SCAN is per node: on a cluster,
        ``node`` (a primary of the cluster client) is the one scanned, and a full repair scans
        every primary. Needs ``+scan``."""
        tag = re.compile(rf"^{re.escape(self.schema.prefix)}:\{{\d+\}}:s:(.+):meta$")
        match = f"{self.schema.prefix}:{{*}}:s:*:meta"
        if node is None:
            cursor, found = await self.redis.scan(cursor, match=match, count=count)
        else:  # the cluster client answers {node name: cursor}, keys
            reply: Any = await self.redis.scan(cursor, match=match, count=count, target_nodes=node)
            cursor, found = reply[0][node.name], reply[1]
        sids = [m.group(1) for m in (tag.match(_text(raw)) for raw in found) if m is not None]
        repaired: list[str] = []
        if not sids:
            return int(cursor), repaired
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hget(self.schema.session(sid).meta, "state")
        states = await pipe.execute()
        for sid, state in zip(sids, states, strict=True):
            if state is None or _text(state) != "queued":
                continue
            keys = self.schema.session(sid)
            try:
                reply = await self._script(
                    "requeue",
                    [keys.queue, keys.meta, keys.dead],
                    [sid, self.schema.wake_channel, "lost"],
                )
            except SessionNotFoundError:  # deleted since the scan
                continue
            if int(reply) == 1:
                log.warning(
                    "session %r was queued but its queue entry was missing (evicted?); "
                    "queued it again",
                    sid,
                )
                repaired.append(sid)
        return int(cursor), repaired

    async def requeue(self, session_id: str, *, only_dead: bool) -> bool:
        """Flag a session now (``only_dead``: only one in the dead-letter state)."""
        keys = self.schema.session(session_id)
        reply = await self._script(
            "requeue",
            [keys.queue, keys.meta, keys.dead],
            [session_id, self.schema.wake_channel, "dead" if only_dead else "any"],
        )
        return bool(int(reply))

    # -- one compaction ------------------------------------------------------------------------

    async def _snapshot(self, claim: Claim) -> tuple[dict[str, str], list[Any]]:
        """The session's meta and its raw (undecoded) records, read atomically by the state
        script (a MULTI would be refused when Redis memory is full: Redis refuses every
        command queued in a MULTI then). Empty meta: the session is gone. Raises
        SessionCorruptedError if its list or its meta was evicted."""
        keys = claim.keys
        try:
            flat, raw = await self._script("state", [keys.msgs, keys.meta], [claim.session_id, 1])
        except SessionNotFoundError:
            return {}, []
        return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}, raw

    @staticmethod
    def _decode_and_plan(
        raw: Sequence[Any], head_count: int, limit: int, policy: CompactionPolicy
    ) -> CompactionPlan | Uncompactable:
        """Decode the snapshot's records and plan (CPU only: run in a worker thread). A record
        stored by an older convstate may nest too deeply for the decoder (RecordDecodeError) or
        for what plans, counts and summarizes it (InvalidMessageError): typed, never a
        RecursionError."""
        records = []
        for item in raw:
            record = decode_record(item)
            check_nesting(record, "a stored record")
            records.append(record)
        return plan_compaction(records, head_count, limit, policy)

    async def _prepare(
        self, claim: Claim
    ) -> tuple[
        dict[str, str],
        CompactionPlan | Uncompactable | ValidationError | RecordDecodeError | None,
    ]:
        """Snapshot and plan; the plan is None when the session is gone or no longer ours,
        the error when its stored records cannot be decoded or planned."""
        meta, raw = await self._snapshot(claim)
        if not meta or meta.get("lease") != claim.token:
            return meta, None
        head_count = int(meta.get("head_count", 0))
        limit = int(meta.get("token_limit", 1))
        policy = self.config.policy
        if meta.get("force") == "1":
            # `convstate compact --force`: fold all but the kept recent turns, even if the
            # session fits its target (a ratio under 1/limit leaves a tail budget of 0).
            policy = replace(policy, target_ratio=min(policy.target_ratio, 1 / (limit + 1)))
        try:
            plan = await asyncio.to_thread(self._decode_and_plan, raw, head_count, limit, policy)
        except (ValidationError, RecordDecodeError) as exc:
            return meta, exc
        return meta, plan

    async def compact(self, claim: Claim) -> Outcome:
        """Run one compaction of a claimed session to its end; never raises for the
        session's own problems (they become an :class:`Outcome`)."""
        sid = claim.session_id
        try:
            meta, plan = await self._keep_lease(claim, self._prepare(claim))
        except LeaseLostError:
            return Outcome(sid, "lost", note="lease lost while reading the session")
        except SessionCorruptedError as corrupted:  # evicted keys: retry, then dead-letter
            log.error("session %r cannot be compacted: %s", sid, corrupted)
            try:
                state = await self.release(claim, "retry", f"corrupted: {corrupted}")
            except LeaseLostError:  # its meta (which holds the lease) is what was evicted
                return Outcome(sid, "lost", note=str(corrupted))
            return Outcome(sid, "dead" if state == "dead" else "retry", note=str(corrupted))
        if not meta:
            return Outcome(sid, "gone")
        if plan is None:
            return Outcome(sid, "lost", note="lease taken over before the snapshot")
        tokens_before = int(meta.get("token_count", 0))
        if isinstance(plan, (ValidationError, RecordDecodeError)):  # retry, then dead-letter
            exc = plan
            log.error("session %r cannot be planned: %s", sid, exc)
            state = await self.release(claim, "retry", f"invalid history: {exc}")
            return Outcome(
                sid, "dead" if state == "dead" else "retry", tokens_before, note=str(exc)
            )
        if isinstance(plan, Uncompactable):
            return await self._give_up(claim, plan, tokens_before)

        started = time.perf_counter()
        try:
            summary = await self._keep_lease(claim, self._summarize(claim, plan))
        except LeaseLostError:
            return Outcome(sid, "lost", tokens_before, note="lease lost during summarization")
        except (asyncio.CancelledError, RedisError):
            # A heartbeat that could not reach Redis (frozen, unreachable): not the
            # summarizer's failure. Nothing was written; the caller (the daemon) logs it and
            # the lease expires, after which the session is compacted again.
            raise
        except Exception as exc:  # any summarizer failure: history untouched, retry later
            summary_ms = (time.perf_counter() - started) * 1000
            log.warning("summarizing session %r failed: %s", sid, exc)
            try:
                state = await self.release(claim, "retry", f"{type(exc).__name__}: {exc}")
            except LeaseLostError:
                return Outcome(sid, "lost", tokens_before, summary_ms=summary_ms)
            return Outcome(
                sid,
                "dead" if state == "dead" else "retry",
                tokens_before,
                summary_ms=summary_ms,
                note=str(exc),
            )
        summary_ms = (time.perf_counter() - started) * 1000
        return await self._swap(claim, plan, summary, summary_ms, tokens_before)

    async def _give_up(self, claim: Claim, plan: Uncompactable, tokens: int) -> Outcome:
        note = (
            f"{plan.reason}; flagged again once it passes {tokens + plan.grow_by} tokens "
            f"(grows by {plan.grow_by})"
        )
        log.info("session %r cannot be compacted now: %s", claim.session_id, note)
        try:
            await self.release(claim, "idle", f"uncompactable: {note}", grow_by=plan.grow_by)
        except LeaseLostError:
            return Outcome(claim.session_id, "lost", tokens)
        await self.redis.hdel(claim.keys.meta, "force")  # a forced compaction is one attempt
        return Outcome(claim.session_id, "uncompactable", tokens, tokens, note=note)

    async def _keep_lease(self, claim: Claim, work: Awaitable[T]) -> T:
        """Await ``work`` while a heartbeat extends the lease every third of the lease; if the
        lease is lost, cancel ``work`` and raise :class:`LeaseLostError`."""
        task = asyncio.ensure_future(work)
        loop = asyncio.get_running_loop()
        interval = self.config.lease_ms / 3000
        beat_at = loop.time() + interval
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=max(0.0, beat_at - loop.time()))
                if done:
                    break
                beat_at = loop.time() + interval
                if not await self.heartbeat(claim):
                    raise LeaseLostError(f"lease of session {claim.session_id!r} lost")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        return task.result()

    async def _summarize(self, claim: Claim, plan: CompactionPlan) -> tuple[str, str, str]:
        previous = None
        if plan.previous_summary is not None:
            previous = str(plan.previous_summary.get("content") or "").removeprefix(SUMMARY_PREFIX)
        overhead = self.count_text(SUMMARY_PREFIX)
        request = SummaryRequest(
            previous_summary=previous,
            messages=plan.folded,
            max_tokens=max(1, plan.max_summary_tokens - overhead),
            count_tokens=self.count_text,
            session_id=claim.session_id,
        )
        result = await self.summarizer.summarize(request)
        text = SUMMARY_PREFIX + result.text.strip()
        return text, result.model, getattr(self.summarizer, "name", type(self.summarizer).__name__)

    def _summary_record(
        self,
        plan: CompactionPlan,
        text: str,
        model: str,
        summarizer: str,
        summary_ms: float,
        tokens_before: int,
        epoch: int,
    ) -> dict[str, Any]:
        prev = plan.previous_summary.get("summary", {}) if plan.previous_summary else {}
        folded_total = int(prev.get("folded_total", 0)) + len(plan.folded)
        # "tokens" then "role" first: the read script takes them by pattern (see operations).
        return {
            "tokens": self.count_text(text),
            "role": "system",
            "content": text,
            "id": f"sum-{uuid.uuid4().hex}",
            "kind": "summary",
            "ts": _now_ms(),
            "summary": {
                "covers": {
                    "first_id": plan.folded[0]["id"],
                    "last_id": plan.folded[-1]["id"],
                    "count": len(plan.folded),
                    "previous_summary_id": plan.previous_summary["id"]
                    if plan.previous_summary
                    else None,
                },
                "folded_total": folded_total,
                "summarizer": summarizer,
                "model": model,
                "tokens_before": tokens_before,
                "folded_tokens": plan.folded_tokens,
                "duration_ms": round(summary_ms, 1),
                "epoch": epoch + 1,
            },
        }

    async def _swap(
        self,
        claim: Claim,
        plan: CompactionPlan,
        summary: tuple[str, str, str],
        summary_ms: float,
        tokens_before: int,
    ) -> Outcome:
        text, model, summarizer = summary
        sid = claim.session_id
        record = self._summary_record(
            plan, text, model, summarizer, summary_ms, tokens_before, claim.epoch
        )
        replaced = plan.previous_summary_tokens + plan.folded_tokens
        if record["tokens"] >= replaced:
            # A compaction never grows a session: e.g. a forced fold of a few short turns,
            # or a model that answers longer than what it was given. History kept as it is.
            reason = (
                f"no gain: the summary ({record['tokens']} tokens) is not shorter than what it "
                f"would replace ({len(plan.folded)} message(s) and the previous summary, "
                f"{replaced} tokens); history kept"
            )
            no_gain = Uncompactable(reason, "no_gain", reflag_margin(claim.token_limit))
            return await self._give_up(claim, no_gain, tokens_before)
        new_head = [
            json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in [*plan.system, record]
        ]
        try:
            reply = await self._swap_script(claim, plan, record, new_head)
        except MemoryFullError as exc:
            # Only a swap that would grow the data (an archive, a summary longer than what it
            # folds) is refused when memory is full; it wrote nothing: retry later.
            log.warning("swap of session %r refused: %s", sid, exc)
            state = await self.release(claim, "retry", "memory full (swap would grow the data)")
            return Outcome(
                sid,
                "dead" if state == "dead" else "retry",
                tokens_before,
                summary_ms=summary_ms,
                swap_attempts=1,
                note="memory full",
            )
        result = _text(reply[0])
        new_tokens = int(reply[1]) if len(reply) > 1 else 0
        over = len(reply) > 2 and int(reply[2]) == 1
        attempts = 1
        if result == "lost":
            return Outcome(
                sid,
                "lost",
                tokens_before,
                summary_ms=summary_ms,
                swap_attempts=attempts,
                note="fenced at swap",
            )
        if result in _SWAP_RETRY_REASONS:
            # "changed": only a delete or an outside rewrite can change the prefix.
            last_error, note = _SWAP_RETRY_REASONS[result]
            state = await self.release(claim, "retry", last_error)
            return Outcome(
                sid,
                "dead" if state == "dead" else "retry",
                tokens_before,
                summary_ms=summary_ms,
                swap_attempts=attempts,
                note=note,
            )
        if over:  # e.g. appends during the summary: queued again, wake a daemon promptly
            await self._wake(sid)
        log.info(
            "compacted session %r: %d -> %d tokens, %d messages folded%s",
            sid,
            tokens_before,
            new_tokens,
            len(plan.folded),
            " (one step of a longer fold)" if plan.partial else "",
        )
        return Outcome(
            sid,
            "compacted",
            tokens_before,
            new_tokens,
            len(plan.folded),
            summary_ms,
            attempts,
        )

    async def _swap_script(
        self, claim: Claim, plan: CompactionPlan, record: dict[str, Any], new_head: list[str]
    ) -> Any:
        """Run swap.lua: verify the lease and the prefix's ids and replace the prefix by
        ``new_head``, atomically (see lua/swap.lua for why it is lossless and when a full
        memory refuses it)."""
        keys = claim.keys
        return await self._script(
            "swap",
            [keys.msgs, keys.meta, keys.ids, keys.queue, keys.running, keys.archive, keys.idlog],
            [
                claim.session_id,
                claim.token,
                plan.fold_end,
                plan.tokens_before - plan.tail_tokens,
                len(new_head),
                plan.system_tokens + int(record["tokens"]),
                len(plan.folded) if self.config.archive else 0,
                self.config.archive_ttl or 0,
                # One step of a longer fold: queued again while over the policy's target.
                self.config.policy.target_ratio if plan.partial else 0,
                record["id"],
                *new_head,
                *plan.prefix_ids,
            ],
        )

    async def _wake(self, session_id: str) -> None:
        """Publish a wake-up for a session queued again by its swap, after the swap script.
        Best effort: the swap has committed, and the daemons' sweep finds the queued session
        anyway."""
        try:
            await self.redis.publish(self.schema.wake_channel, session_id)
        except RedisError as exc:
            log.warning("wake-up for session %r not published: %s", session_id, exc)
