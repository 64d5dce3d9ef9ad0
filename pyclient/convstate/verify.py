"""Check that what Redis holds for a session is whole ("nothing lost, nothing twice").

Operators run it as ``convstate verify SESSION...``; the demo's verification and the soak
test's invariant checker are built on it. It reads each session in one ``MULTI`` (its keys and
its shard's queue, running and dead sets share one hash tag), so the snapshot is consistent
even while apps append and daemons compact, and checks, from the stored state alone:

* ``missing``: the session exists (its meta hash);
* ``duplicate``: every stored record -- in the message list or in the archive of folded
  originals -- has its id exactly once;
* ``token_count`` / ``message_count``: the meta's totals equal the sum of the listed records'
  ``tokens`` and their number;
* ``summary``: at most one summary, at the head of the list, present iff ``epoch > 0``;
  none in the archive;
* ``ids``: the idempotency record is sound: the newest listed message's id is in the id hash
  (a retried append of it would otherwise be stored twice), and the id hash and its log (the
  same ids in append order, which bounds the hash to the store's ``id_window``) hold the
  same ids, each once. A session still in convstate 0.1's layout (an id *set*, no log; it is
  taken over on its next append) gets the first check only. The remembered pop (the last
  ``pop_item``'s token and record, kept for its retries), if any, holds both and expires
  within :data:`~convstate.operations.POP_RETRY_WINDOW_MS` (else it would keep a copy of the
  record for ever);
* ``state``: the meta's ``state`` agrees with the shard's sets: ``queued`` iff in the queue,
  ``running`` iff in the running set (holding a lease whose ``lease_deadline`` is its score
  there), ``dead`` iff in the dead set, ``idle`` in none of them.

:func:`check_session` is pure (no I/O) so that callers holding more knowledge -- the writers'
acknowledgements in the demo and the soak -- can run it on their own snapshot and add their
checks.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from convstate.errors import ValidationError
from convstate.keys import KeySchema
from convstate.operations import POP_RETRY_WINDOW_MS

__all__ = [
    "KINDS",
    "SessionSnapshot",
    "SessionVerdict",
    "VerifyReport",
    "Violation",
    "check_ids",
    "check_popped",
    "check_session",
    "check_state",
    "check_totals",
    "occurrences",
    "read_snapshot",
    "verify_sessions",
]

#: Every kind of violation :func:`check_session` reports, in the order it checks them.
KINDS = ("missing", "duplicate", "token_count", "message_count", "summary", "ids", "state")
#: States a session's meta may hold.
STATES = ("idle", "queued", "running", "dead")


@dataclass(frozen=True)
class Violation:
    """One thing wrong with a session: its :data:`KINDS` kind and what was found."""

    session_id: str
    kind: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"session_id": self.session_id, "kind": self.kind, "detail": self.detail}


@dataclass(frozen=True)
class SessionSnapshot:
    """A session as Redis holds it: its meta hash (``{}`` if the session does not exist), its
    message list and archive (decoded records, oldest first), its id set and its scores in
    the shard's queue, running and dead sets, and its remembered pop (its fields, ``{}`` if
    there is none) with its PTTL. ``ids=None`` means the id hash was not read (its check is
    skipped), ``popped=None`` the remembered pop."""

    session_id: str
    meta: Mapping[str, str]
    records: Sequence[Mapping[str, Any]]
    archive: Sequence[Mapping[str, Any]] = ()
    ids: frozenset[str] | None = None
    idlog: Sequence[str] | None = None
    queued: float | None = None
    running: float | None = None
    dead: float | None = None
    popped: Mapping[str, str] | None = None
    popped_ttl_ms: int | None = None

    def num(self, name: str) -> int:
        """An integer field of the meta hash (0 when absent)."""
        return int(self.meta.get(name, 0) or 0)

    @property
    def state(self) -> str:
        return self.meta.get("state", "idle")


@dataclass(frozen=True)
class SessionVerdict:
    """A session's snapshot and what :func:`check_session` found in it."""

    snapshot: SessionSnapshot
    violations: tuple[Violation, ...]

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_dict(self) -> dict[str, Any]:
        s = self.snapshot
        return {
            "session_id": s.session_id,
            "ok": self.ok,
            "exists": bool(s.meta),
            "state": s.state if s.meta else None,
            "epoch": s.num("epoch"),
            "token_count": s.num("token_count"),
            "token_limit": s.num("token_limit"),
            "records": len(s.records),
            "archived": len(s.archive),
            "violations": [v.as_dict() for v in self.violations],
        }


@dataclass(frozen=True)
class VerifyReport:
    """The verdict of every session checked; :attr:`ok` when none has a violation."""

    sessions: tuple[SessionVerdict, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(verdict.ok for verdict in self.sessions)

    @property
    def violations(self) -> list[Violation]:
        return [v for verdict in self.sessions for v in verdict.violations]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "sessions_checked": len(self.sessions),
            "violations": len(self.violations),
            "sessions": [verdict.as_dict() for verdict in self.sessions],
        }


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _decode(raw: Any, where: str) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise ValidationError(
            f"{where} holds a record that is not JSON ({exc}); was it written by something "
            f"other than convstate?"
        ) from exc
    if not isinstance(record, dict):
        raise ValidationError(f"{where} holds a record that is not a JSON object: {raw!r:.80}")
    return record


def read_snapshot(client: redis.Redis, schema: KeySchema, session_id: str) -> SessionSnapshot:
    """Read one session and its shard's set entries in one ``MULTI`` (``client``: a sync
    redis-py ``Redis`` or ``RedisCluster``). Raises :class:`~convstate.errors.ValidationError`
    if a stored record is not a JSON object."""
    keys = schema.session(session_id)
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(keys.meta)
    pipe.lrange(keys.msgs, 0, -1)
    pipe.lrange(keys.archive, 0, -1)
    pipe.hkeys(keys.ids)
    pipe.smembers(keys.ids)  # convstate 0.1's id set, until the session's next append
    pipe.lrange(keys.idlog, 0, -1)
    pipe.zscore(keys.queue, session_id)
    pipe.zscore(keys.running, session_id)
    pipe.zscore(keys.dead, session_id)
    pipe.hgetall(keys.popped)
    pipe.pttl(keys.popped)
    # One of HKEYS / SMEMBERS meets the other type (WRONGTYPE): keep that reply, raise others.
    replies = pipe.execute(raise_on_error=False)
    meta, msgs, archive, in_hash, in_set, idlog, queued, running, dead, popped, ttl = replies
    for reply in (meta, msgs, archive, idlog, queued, running, dead, popped, ttl):
        if isinstance(reply, Exception):
            raise reply
    legacy = isinstance(in_hash, redis.ResponseError) and not isinstance(in_set, Exception)
    ids = in_set if legacy else in_hash
    if isinstance(ids, Exception):
        raise ids
    return SessionSnapshot(
        session_id,
        {_text(k): _text(v) for k, v in meta.items()},
        [_decode(raw, keys.msgs) for raw in msgs],
        [_decode(raw, keys.archive) for raw in archive],
        frozenset(_text(x) for x in ids),
        None if legacy else [_text(x) for x in idlog],
        queued,
        running,
        dead,
        {_text(k): _text(v) for k, v in popped.items()},
        int(ttl),
    )


def occurrences(snapshot: SessionSnapshot) -> Counter[str]:
    """How often each message id is stored: in the list (summaries left out) and in the
    archive. Every count should be 1."""
    found: Counter[str] = Counter()
    for record in snapshot.records:
        if record.get("kind") != "summary":
            found[str(record.get("id"))] += 1
    for record in snapshot.archive:
        found[str(record.get("id"))] += 1
    return found


def _examples(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def check_totals(snapshot: SessionSnapshot) -> list[Violation]:
    """``token_count`` equals the sum of the listed records' tokens, ``message_count`` their
    number."""
    sid, found = snapshot.session_id, []
    summed = sum(int(r.get("tokens", 0)) for r in snapshot.records)
    if snapshot.num("token_count") != summed:
        found.append(
            Violation(
                sid,
                "token_count",
                f"{sid}: token_count {snapshot.num('token_count'):,} != {summed:,} summed",
            )
        )
    if snapshot.num("message_count") != len(snapshot.records):
        found.append(
            Violation(
                sid,
                "message_count",
                f"{sid}: message_count {snapshot.num('message_count')} != {len(snapshot.records)}",
            )
        )
    return found


def _check_summary(snapshot: SessionSnapshot) -> list[Violation]:
    sid, epoch = snapshot.session_id, snapshot.num("epoch")
    head = snapshot.records[: snapshot.num("head_count")]
    at = [i for i, r in enumerate(snapshot.records) if r.get("kind") == "summary"]
    found = []
    if len(at) != (1 if epoch else 0):
        found.append(Violation(sid, "summary", f"{sid}: {len(at)} summaries at epoch {epoch}"))
    outside = [str(snapshot.records[i].get("id")) for i in at if i >= len(head)]
    if outside:
        found.append(
            Violation(sid, "summary", f"{sid}: summary {_examples(outside)} after the head")
        )
    archived = [str(r.get("id")) for r in snapshot.archive if r.get("kind") == "summary"]
    if archived:
        found.append(
            Violation(sid, "summary", f"{sid}: summary {_examples(archived)} in the archive")
        )
    return found


def check_state(snapshot: SessionSnapshot) -> list[Violation]:
    """The ``state`` checks alone: the meta's state against the queue, running and dead sets,
    the lease and its deadline (the running set's score)."""
    sid, state = snapshot.session_id, snapshot.state
    if state not in STATES:
        return [Violation(sid, "state", f"{sid}: unknown state {state!r}")]
    found = []
    for name, score in (
        ("queued", snapshot.queued),
        ("running", snapshot.running),
        ("dead", snapshot.dead),
    ):
        member = score is not None
        if (state == name) != member:
            where = "is" if member else "is not"
            found.append(
                Violation(sid, "state", f"{sid}: state {state} but it {where} in the {name} set")
            )
    if (state == "running") != ("lease" in snapshot.meta):
        holds = "holds" if "lease" in snapshot.meta else "holds no"
        found.append(Violation(sid, "state", f"{sid}: state {state} but it {holds} lease"))
    deadline = snapshot.meta.get("lease_deadline")
    if state == "running" and snapshot.running is not None and deadline != _ms(snapshot.running):
        found.append(
            Violation(
                sid,
                "state",
                f"{sid}: lease_deadline {deadline} but the running set's score is "
                f"{_ms(snapshot.running)}",
            )
        )
    return found


def _ms(score: float) -> str:
    return str(int(score)) if float(score).is_integer() else str(score)


def check_ids(snapshot: SessionSnapshot) -> list[Violation]:
    """The idempotency record: the newest listed message is remembered, and the id hash and
    its log agree (skipped where they were not read: ``ids`` / ``idlog`` None)."""
    sid, found = snapshot.session_id, list[Violation]()
    if snapshot.ids is None:
        return found
    messages = [r for r in snapshot.records if r.get("kind") != "summary"]
    # More pops in a row than the id window forget every id it kept (pop.lua marks it in
    # meta, and the next append clears the mark): nothing to remember until then.
    forgotten = bool(snapshot.meta.get("ids_popped")) and not snapshot.ids
    if messages and not forgotten and str(messages[-1].get("id")) not in snapshot.ids:
        found.append(
            Violation(
                sid,
                "ids",
                f"{sid}: the newest message {messages[-1].get('id')} is not in the id hash; a "
                f"retried append of it would store it twice",
            )
        )
    if snapshot.idlog is not None:
        logged = Counter(snapshot.idlog)
        twice = sorted(mid for mid, n in logged.items() if n > 1)
        unlogged = sorted(snapshot.ids - set(logged))
        unhashed = sorted(set(logged) - snapshot.ids)
        problems = [
            f"{label} {_examples(items)}"
            for label, items in (
                ("logged twice:", twice),
                ("in the hash, not the log:", unlogged),
                ("in the log, not the hash:", unhashed),
            )
            if items
        ]
        if problems:
            found.append(
                Violation(
                    sid,
                    "ids",
                    f"{sid}: the id hash and its log disagree ({'; '.join(problems)}); the "
                    f"window would forget the wrong ids",
                )
            )
    return found


def check_popped(snapshot: SessionSnapshot) -> list[Violation]:
    """The remembered pop, if any (and read): a token and a JSON object record, expiring
    within :data:`~convstate.operations.POP_RETRY_WINDOW_MS`."""
    sid, popped, ttl = snapshot.session_id, snapshot.popped, snapshot.popped_ttl_ms
    if not popped:
        return []
    found = []
    if ttl is not None and not 0 <= ttl <= POP_RETRY_WINDOW_MS:
        expiry = "never expires" if ttl == -1 else f"expires in {ttl} ms"
        found.append(
            Violation(
                sid,
                "ids",
                f"{sid}: the remembered pop {expiry}; it is kept for retries for at most "
                f"{POP_RETRY_WINDOW_MS} ms (else it keeps a copy of the popped record)",
            )
        )
    try:
        record = json.loads(popped.get("record", ""))
    except ValueError:
        record = None
    if set(popped) != {"token", "record"} or not popped["token"] or not isinstance(record, dict):
        found.append(
            Violation(
                sid,
                "ids",
                f"{sid}: the remembered pop holds {', '.join(sorted(popped))}, not a token and "
                f"a JSON object record; was it written by something other than convstate?",
            )
        )
    return found


def check_session(snapshot: SessionSnapshot) -> list[Violation]:
    """Every :data:`KINDS` check of one session (pure: no I/O)."""
    sid = snapshot.session_id
    if not snapshot.meta:
        return [
            Violation(
                sid,
                "missing",
                f"{sid}: no such session (expired, deleted, or another --prefix / --shards)",
            )
        ]
    found = [
        Violation(sid, "duplicate", f"{sid}: {mid} stored {n} times")
        for mid, n in sorted(occurrences(snapshot).items())
        if n > 1
    ]
    found += check_totals(snapshot)
    found += _check_summary(snapshot)
    found += check_ids(snapshot)
    found += check_popped(snapshot)
    found += check_state(snapshot)
    return found


def verify_sessions(
    client: redis.Redis, schema: KeySchema, session_ids: Iterable[str]
) -> VerifyReport:
    """Read (:func:`read_snapshot`) and check (:func:`check_session`) every session."""
    verdicts = []
    for sid in session_ids:
        snapshot = read_snapshot(client, schema, sid)
        verdicts.append(SessionVerdict(snapshot, tuple(check_session(snapshot))))
    return VerifyReport(tuple(verdicts))
