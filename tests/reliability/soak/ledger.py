"""The ledger: the writers' JSON-lines logs merged (:func:`read_ledger`) into what was
sent, acknowledged, rejected and given up on."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.reliability.soak.writers import parse_message_id


@dataclass(frozen=True)
class SentMessage:
    id: str
    session: str
    writer: int
    seq: int
    message: dict[str, Any] | None


@dataclass
class Ledger:
    """Every writer's JSON-lines log, merged."""

    sent: dict[str, SentMessage] = field(default_factory=dict)
    #: Acknowledged ids per session, in acknowledgement order.
    acked: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    acked_ids: set[str] = field(default_factory=set)
    #: Ids of calls that were rejected (bad input): they must be stored nowhere.
    rejected: dict[str, str] = field(default_factory=dict)
    gave_up: set[str] = field(default_factory=set)
    #: Acknowledgement times per writer (for recovery times).
    ack_times: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    #: (time, writer, error type) of every transient error a writer saw.
    transient_errors: list[tuple[float, int, str]] = field(default_factory=list)
    #: Errors that reached a writer although they should not have.
    unexpected_errors: list[str] = field(default_factory=list)
    #: Ids of calls that had to be rejected but were acknowledged.
    bad_input_accepted: list[str] = field(default_factory=list)
    #: Acknowledgements whose ``stored`` count no atomic, idempotent append can produce.
    ack_anomalies: list[str] = field(default_factory=list)
    #: Deliberate re-sends that stored a second copy (must be 0).
    resend_stored: int = 0
    resends: int = 0
    acked_calls: int = 0
    #: Acknowledged calls that were retried: by the writer, or by the client itself.
    acked_after_retry: int = 0
    #: Acknowledged calls the client sent again itself (``AppendResult.resent``).
    client_resent: int = 0
    retry_deduplicated: int = 0
    stats: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    done: set[int] = field(default_factory=set)


def read_ledger(paths: Sequence[Path]) -> Ledger:
    """Merge the writers' logs (a truncated last line of a crashed writer is ignored)."""
    ledger = Ledger()
    for path in paths:
        writer = int(path.stem.rsplit("-", 1)[-1])
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                _ledger_add(ledger, writer, rec)
    return ledger


def _ledger_add(ledger: Ledger, writer: int, rec: Mapping[str, Any]) -> None:
    kind = rec["k"]
    if kind == "send":
        msgs = rec.get("msgs") or [None] * len(rec["ids"])
        if rec["op"] == "resend":
            return
        for mid, msg in zip(rec["ids"], msgs, strict=True):
            parsed = parse_message_id(mid)
            seq = parsed[1] if parsed else -1
            ledger.sent[mid] = SentMessage(mid, rec["sid"], writer, seq, msg)
    elif kind == "ack":
        ledger.ack_times[writer].append(float(rec["t"]))
        ledger.acked_calls += 1
        stored, sent = int(rec["stored"]), len(rec["ids"])
        # Retried: the writer tried again, or the client sent the call again itself after its
        # first attempt's reply was lost (``resent``; that attempt may have stored the ids).
        resent = bool(rec.get("resent"))
        retried = rec["tries"] > 1 or resent
        if rec["op"] != "resend" and stored != sent and (not retried or stored != 0):
            # A first and only attempt finds its fresh ids already stored, or a retried batch
            # was stored in part: either way not one atomic all-or-nothing append.
            ledger.ack_anomalies.append(
                f"writer {writer} {rec['op']} {rec['ids']}: stored {stored} of {sent} "
                f"at try {rec['tries']}" + (" (resent by the client)" if resent else "")
            )
        if resent:
            ledger.client_resent += 1
        if retried:
            ledger.acked_after_retry += 1
            if rec["stored"] < len(rec["ids"]):
                ledger.retry_deduplicated += 1
        if rec["op"] == "resend":
            ledger.resends += 1
            if rec["stored"] != 0:
                ledger.resend_stored += 1
            return
        if rec["op"] in ("bad", "big", "missing"):
            ledger.bad_input_accepted.extend(rec["ids"])
        ledger.acked[rec["sid"]].extend(rec["ids"])
        ledger.acked_ids.update(rec["ids"])
    elif kind == "reject":
        for mid in rec["ids"]:
            ledger.rejected[mid] = rec["sid"]
    elif kind == "giveup":
        ledger.gave_up.update(rec["ids"])
    elif kind == "err":
        if rec.get("transient"):
            ledger.transient_errors.append((float(rec["t"]), writer, str(rec["type"])))
        else:
            ledger.unexpected_errors.append(
                f"writer {writer} {rec['op']} {rec['ids']}: {rec['type']}: {rec['msg']}"
            )
    elif kind == "crash":
        ledger.crashes.append(f"writer {writer}:\n{rec['tb']}")
    elif kind == "done":
        ledger.done.add(writer)
        ledger.stats.update(rec.get("stats") or {})
