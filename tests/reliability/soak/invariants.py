"""The invariant checker: :func:`check_invariants` checks every session's stored state
against the ledger once the daemons have stopped, into an :class:`InvariantReport`."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from convstate.operations import DEFAULT_ID_WINDOW
from convstate.verify import SessionSnapshot, check_session, read_snapshot
from tests.reliability.soak.config import SoakConfig
from tests.reliability.soak.ledger import Ledger
from tests.reliability.soak.writers import parse_message_id

#: How many samples of each violation kind a report keeps.
MAX_SAMPLES = 10


@dataclass
class InvariantReport:
    """What :func:`check_invariants` found. ``counts[kind]`` of each violation kind, with up
    to :data:`MAX_SAMPLES` examples in ``samples[kind]``; :attr:`ok` when there are none."""

    sessions: int = 0
    acked_messages: int = 0
    stored_messages: int = 0
    in_lists: int = 0
    in_archives: int = 0
    compactions: int = 0
    unacked_stored: int = 0
    lease_expiries: int = 0
    live_snapshots: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, detail: str, n: int = 1) -> None:
        self.counts[kind] += n
        if len(self.samples[kind]) < MAX_SAMPLES:
            self.samples[kind].append(detail)

    @property
    def losses(self) -> int:
        return self.counts["loss"]

    @property
    def duplicates(self) -> int:
        return self.counts["duplicate"]

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "acked_messages": self.acked_messages,
            "stored_messages": self.stored_messages,
            "in_lists": self.in_lists,
            "in_archives": self.in_archives,
            "compactions": self.compactions,
            "unacked_stored": self.unacked_stored,
            "lease_expiries": self.lease_expiries,
            "live_snapshots": self.live_snapshots,
            "counts": dict(self.counts),
            "samples": dict(self.samples),
        }

    def describe(self) -> list[str]:
        return [
            f"{kind}: {n} (e.g. {'; '.join(self.samples[kind][:3])})"
            for kind, n in sorted(self.counts.items())
            if n
        ]


#: The soak's name for each kind of violation :func:`convstate.verify.check_session` reports.
VERIFY_KINDS = {
    "missing": "loss",
    "duplicate": "duplicate",
    "token_count": "token_count",
    "message_count": "message_count",
    "summary": "head",
    "ids": "ids_set",
    "state": "state",
}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _same_message(stored: Mapping[str, Any], sent: Mapping[str, Any]) -> bool:
    fields = ("role", "content", "tool_calls", "tool_call_id")
    return all(stored.get(key) == sent.get(key) for key in fields)


def _split_tool_groups(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Ids of tool results whose call is not earlier in ``records``."""
    calls: set[str] = set()
    split = []
    for record in records:
        if record.get("role") == "assistant" and record.get("tool_calls"):
            calls.update(str(call["id"]) for call in record["tool_calls"])
        elif record.get("role") == "tool" and record.get("tool_call_id") not in calls:
            split.append(str(record.get("id")))
    return split


def check_invariants(
    client: redis.Redis,
    config: SoakConfig,
    ledger: Ledger,
    *,
    drained_at_ms: int,
) -> InvariantReport:
    """Check every session against the ledger, once the daemons have stopped.

    For every session (``list`` = its message list, ``archive`` = the folded originals the
    daemon keeps with ``--archive``, ``body`` = the list after its head):

    * **no loss**: every acknowledged id is stored (in ``archive`` or ``body``);
    * **no duplicate**: no id occurs twice in ``archive + body`` (so none is both folded and
      kept); deliberate re-sends of acknowledged messages stored nothing;
    * **no stranger**: every stored id was sent by a writer to *this* session; no id of a
      rejected call (bad input) is stored anywhere, nor in the id set; sessions that appends
      were rejected for do not exist;
    * **content**: every stored record has the role, content and tool fields that were sent;
    * **atomic appends**: every acknowledged call stored all its messages (or, a retry whose
      failed attempt had landed, none of them: the writer's retry, or the client's own resend
      after a lost reply, ``AppendResult.resent``);
    * **order**: each writer's ids occur in ``archive + body`` in the order it sent them
      (``archive`` is chronological and precedes ``body``);
    * **tool groups** are never split: every tool result follows its call in ``body``, or in
      ``archive``;
    * **head**: ``list`` starts with the system message, then the summary iff
      ``epoch > 0``; there is exactly one summary, and no system/summary record in ``body``;
      the summary's ``folded_total`` equals ``len(archive)`` and its ``epoch`` the meta's;
    * **totals**: ``token_count`` = sum of the stored records' ``tokens``; ``message_count``
      = ``LLEN``; ``appended`` = system messages + distinct stored ids; the id set holds every
      stored and acknowledged id, and ``SCARD ids = appended + epoch`` (one id per summary);
    * **state**, after the writers stopped, the daemons drained the queues and exited:
      nothing is ``running`` (no run-set entry, no ``lease`` field); ``queued`` iff in the
      shard queue, ``dead`` iff in the dead set (and nothing is dead); an ``idle`` session is
      within its limit, or was left idle as uncompactable and has not grown past
      ``reflag_above``; a ``queued`` session is over its limit and its retry was not due when
      the drain ended (a due entry means the queue was not drained).

    The checks of the stored state alone -- no id twice, the totals, one summary at the head,
    the id set holding every stored id, the state agreeing with the sets -- are
    :func:`convstate.verify.check_session`'s (what ``convstate verify`` runs), reported here
    under the soak's kinds (:data:`VERIFY_KINDS`); the rest need the ledger or the drain.
    """
    schema = config.schema()
    report = InvariantReport()
    sessions = config.session_ids()
    report.sessions = len(sessions)
    stored_anywhere: set[str] = set()
    all_id_sets: set[str] = set()
    for sid in sessions:
        snapshot = read_snapshot(client, schema, sid)  # convstate.verify: one MULTI
        all_id_sets |= snapshot.ids or frozenset()
        stored_anywhere |= _check_session(report, ledger, snapshot, drained_at_ms)
    for mid, sid in ledger.rejected.items():
        if mid in stored_anywhere or mid in all_id_sets:
            report.add("rejected_stored", f"{mid} (rejected append to {sid}) is stored")
    for w in range(config.writers):
        missing = schema.session(config.missing_session(w))
        if client.exists(missing.meta, missing.msgs, missing.ids):
            report.add("missing_session_created", config.missing_session(w))
    for shard in range(config.shards):
        for name, key in (
            ("queue", schema.queue(shard)),
            ("running", schema.running(shard)),
            ("dead", schema.dead(shard)),
        ):
            for member in client.zrange(key, 0, -1):
                if _text(member) not in set(sessions):
                    report.add("state", f"{name} of shard {shard} holds unknown {_text(member)!r}")
    for mid in ledger.bad_input_accepted:
        report.add("bad_input_accepted", mid)
    for anomaly in ledger.ack_anomalies:
        report.add("partial_append", anomaly)
    if ledger.resend_stored:
        report.add(
            "resend_stored", f"{ledger.resend_stored} re-sends stored a copy", ledger.resend_stored
        )
    return report


def _check_session(
    report: InvariantReport,
    ledger: Ledger,
    snapshot: SessionSnapshot,
    drained_at_ms: int,
) -> set[str]:
    """:func:`convstate.verify.check_session` (every record once, totals, summary, id set,
    state against the sets), then what only the soak knows: the ledger, the writers' order,
    and that the daemons drained the queues and stopped."""
    sid, meta = snapshot.session_id, snapshot.meta
    records, archive = list(snapshot.records), list(snapshot.archive)
    ids_set = snapshot.ids or frozenset()
    where = f"session {sid}"
    if not meta:
        report.add("loss", f"{where}: the session is gone", len(ledger.acked.get(sid, [])) or 1)
        return set()
    for violation in check_session(snapshot):
        report.add(VERIFY_KINDS[violation.kind], violation.detail)
    epoch = int(meta.get("epoch", 0))
    head_count = int(meta.get("head_count", 0))
    token_count = int(meta.get("token_count", 0))
    limit = int(meta.get("token_limit", 0))
    state = meta.get("state", "?")
    report.compactions += epoch
    report.lease_expiries += int(meta.get("lease_expiries", 0) or 0)

    # -- head and summary --------------------------------------------------------------------
    head, body = records[:head_count], records[head_count:]
    summaries = [r for r in records if r.get("kind") == "summary"]
    expected_head = 2 if epoch > 0 else 1
    if head_count != expected_head or not head or head[0].get("id") != f"sys-{sid}":
        report.add(
            "head",
            f"{where}: head_count {head_count}, epoch {epoch}, head ids "
            f"{[r.get('id') for r in head]}",
        )
    for r in body:  # summaries out of place: convstate.verify's "summary", reported as "head"
        if r.get("role") == "system" and r.get("kind") != "summary":
            report.add("head", f"{where}: system record {r.get('id')} after the head")
    if summaries:
        info = summaries[0].get("summary") or {}
        if info.get("folded_total") != len(archive) or info.get("epoch") != epoch:
            report.add(
                "summary_coverage",
                f"{where}: summary folded_total {info.get('folded_total')} / epoch "
                f"{info.get('epoch')}, archive holds {len(archive)}, meta epoch {epoch}",
            )
    elif archive:
        report.add("summary_coverage", f"{where}: {len(archive)} archived without a summary")

    # -- totals ------------------------------------------------------------------------------
    # token_count, message_count: convstate.verify
    stored_records = archive + body
    stored_ids = [str(r.get("id")) for r in stored_records]
    distinct = set(stored_ids)
    system_count = sum(1 for r in head if r.get("role") == "system" and r.get("kind") != "summary")
    appended = int(meta.get("appended", -1))
    if appended != system_count + len(distinct):
        report.add(
            "appended",
            f"{where}: meta appended {appended}, {system_count} system + {len(distinct)} stored",
        )
    # The id hash is bounded: the ids of the last DEFAULT_ID_WINDOW appended messages and
    # summaries (the soak's batches are smaller than the window), plus the summaries swapped
    # in since the last append (a swap adds its summary's id; the next append trims).
    idlog = list(snapshot.idlog or ())
    swapped = len(idlog) - next(
        (i + 1 for i in range(len(idlog) - 1, -1, -1) if not idlog[i].startswith("sum-")), 0
    )
    bound = min(appended + epoch, DEFAULT_ID_WINDOW + swapped)
    if len(ids_set) != bound:
        report.add(
            "ids_set",
            f"{where}: HLEN ids {len(ids_set)} != min(appended {appended} + epoch {epoch}, "
            f"{DEFAULT_ID_WINDOW} + {swapped} summaries swapped in since the last append)",
        )
    everywhere = distinct | {str(r.get("id")) for r in records}  # the head's too
    for mid in ids_set - everywhere:
        if not mid.startswith("sum-"):
            report.add("ids_set", f"{where}: {mid} is in the id hash but stored nowhere")

    # -- every id ------------------------------------------------------------------------------
    for record in stored_records:
        mid = str(record.get("id"))
        sent = ledger.sent.get(mid)
        if sent is None or sent.session != sid:
            report.add("unknown_id", f"{where}: {mid} was never sent to this session")
        elif sent.message is not None and not _same_message(record, sent.message):
            report.add("content", f"{where}: {mid} stored as {record!r}, sent {sent.message!r}")
    acked = ledger.acked.get(sid, [])
    for mid in acked:
        if mid not in distinct:
            report.add("loss", f"{where}: acknowledged {mid} is not stored")
    report.acked_messages += len(acked)
    report.stored_messages += len(distinct)
    report.unacked_stored += len(distinct - set(acked))
    report.in_lists += len(body)
    report.in_archives += len(archive)

    # -- order and tool groups ---------------------------------------------------------------
    last_seq: dict[int, tuple[int, str]] = {}
    for mid in stored_ids:
        parsed = parse_message_id(mid)
        if parsed is None:
            continue
        writer, seq = parsed
        previous = last_seq.get(writer)
        if previous is not None and seq <= previous[0]:
            report.add("order", f"{where}: writer {writer}'s {mid} after {previous[1]}")
        last_seq[writer] = (seq, mid)
    for mid in _split_tool_groups(body):
        report.add("split_tool_group", f"{where}: kept tool result {mid} without its call")
    for mid in _split_tool_groups(archive):
        report.add("split_tool_group", f"{where}: archived tool result {mid} without its call")

    # -- compaction state --------------------------------------------------------------------
    # state against the queue, running and dead sets: convstate.verify
    q_score = snapshot.queued
    if state == "running":
        report.add(
            "state",
            f"{where}: still running after the daemons stopped (run {snapshot.running}, "
            f"lease {meta.get('lease')})",
        )
    if state == "dead":
        report.add("dead_letter", f"{where}: dead-lettered ({meta.get('last_error')})")
    if state == "idle":
        reflag_above = int(meta.get("reflag_above", 0) or 0)
        if token_count > max(limit, reflag_above):
            report.add(
                "lost_flag",
                f"{where}: idle at {token_count} tokens over its limit {limit} "
                f"(reflag_above {reflag_above}, last_error {meta.get('last_error')})",
            )
    if state == "queued":
        if token_count <= limit:
            report.add("state", f"{where}: queued at {token_count} tokens, limit {limit}")
        if q_score is not None and float(q_score) <= drained_at_ms:
            report.add(
                "undrained",
                f"{where}: still queued and due (score {int(float(q_score))}, attempts "
                f"{meta.get('attempts')}, last_error {meta.get('last_error')})",
            )
    return distinct
