"""The verification at the end of the demo: computed from what the writers acknowledged, what
the daemon reported and what Redis holds, not assumed (:func:`verify`). The stored state is
checked by :func:`convstate.verify.check_session`, as ``convstate verify`` checks it (every
record once, totals equal the sum, the summary in place, the id record sound, the state
consistent with the queue); each violation it finds fails the demo check it belongs to
(:data:`VERIFY_KINDS`). This module adds what only the demo knows: what was acknowledged, what
the daemon reported."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from convstate.admin import Stats
from convstate.compactor import Outcome
from convstate.demo.view import SessionRow, plural
from convstate.verify import SessionSnapshot, check_session, occurrences

#: The demo check that reports each kind of :func:`convstate.verify.check_session` violation.
VERIFY_KINDS = {
    "missing": "nothing lost",
    "duplicate": "nothing lost",
    "ids": "nothing lost",
    "token_count": "token totals",
    "message_count": "token totals",
    "summary": "compactions",
    "state": "settled",
}


@dataclass(frozen=True)
class Check:
    """One verification: its name, whether it passed, and the numbers behind it."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class DemoResult:
    """The checks and the totals they were computed from."""

    checks: tuple[Check, ...]
    totals: dict[str, Any]
    sessions: tuple[dict[str, Any], ...]
    info: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            **self.totals,
            "checks": [
                {"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks
            ],
            "sessions": list(self.sessions),
            **self.info,
        }


class Ack(NamedTuple):
    session: str
    message_id: str
    role: str
    tokens: int


def _examples(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def decoded(value: Any) -> str:
    """A reply of redis-py (bytes) as text."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass
class Facts:
    """What the checks compare: the writers' reports, the daemon's outcomes, Redis' contents
    (each session as :func:`convstate.verify.read_snapshot` read it at the end)."""

    rows: dict[str, SessionRow]
    acks: list[Ack]
    writer_counts: dict[int, int]
    writer_exits: dict[int, int | None]
    writer_errors: list[str]
    outcomes: list[Outcome]
    stored: dict[str, SessionSnapshot]
    stats: Stats


class Findings:
    """What :func:`convstate.verify.check_session` found in the stored sessions, by the demo
    check that reports it (:data:`VERIFY_KINDS`; a kind it does not know: "nothing lost")."""

    def __init__(self, stored: dict[str, SessionSnapshot]) -> None:
        self.by_check: dict[str, list[str]] = {}
        for snapshot in stored.values():
            for v in check_session(snapshot):
                check = VERIFY_KINDS.get(v.kind, "nothing lost")
                self.by_check.setdefault(check, []).append(v.detail)

    def problems(self, check: str, limit: int = 3) -> list[str]:
        """``check``'s findings as one problem (``[]`` if none), the first ``limit`` shown."""
        found = self.by_check.get(check, [])
        if not found:
            return []
        more = f" (+{len(found) - limit} more)" if len(found) > limit else ""
        return ["; ".join(found[:limit]) + more]


def _check_appended(f: Facts) -> Check:
    received = len(f.acks)
    reported = sum(f.writer_counts.values())
    server = sum(st.num("appended") - len(f.rows[sid].system_ids) for sid, st in f.stored.items())
    problems: list[str] = []
    for writer, code in sorted(f.writer_exits.items()):
        if code != 0:
            problems.append(f"writer {writer} exited {code}")
        if writer not in f.writer_counts:
            problems.append(f"writer {writer} never reported its total")
    problems += [f"writer error: {e}" for e in f.writer_errors[:3]]
    if received != reported:
        problems.append(f"{received:,} acks received but the writers reported {reported:,}")
    if server != received:
        problems.append(f"the server counted {server:,} appends, the writers {received:,}")
    if received == 0:
        problems.append("nothing was appended")
    if problems:
        return Check("messages appended", False, "; ".join(problems))
    return Check(
        "messages appended",
        True,
        f"{plural(received, 'append')} acknowledged by "
        f"{plural(len(f.writer_exits), 'writer process', 'writer processes')} (all exited 0); "
        f"the server counted {server:,}",
    )


def _check_compactions(f: Facts, verified: Findings) -> Check:
    by_status = Counter(o.status for o in f.outcomes)
    compacted = by_status["compacted"]
    epochs = sum(st.num("epoch") for st in f.stored.values())
    problems: list[str] = []
    if compacted != epochs:
        problems.append(f"the daemon reported {compacted} but the epochs add up to {epochs}")
    problems += verified.problems("compactions")  # one summary, at the head, iff epoch > 0
    flagged = any(row.flagged for row in f.rows.values())
    if flagged and compacted == 0:
        problems.append("sessions passed their limit but none was compacted")
    others = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()) if s != "compacted")
    if problems:
        return Check("compactions", False, "; ".join(problems))
    detail = (
        f"{plural(compacted, 'compaction')}, matching the sessions' epochs ({epochs})"
        if compacted
        else "no session passed its limit: nothing to compact"
    )
    return Check("compactions", True, detail + (f"; other outcomes: {others}" if others else ""))


def _check_tokens_saved(f: Facts, compacted: int) -> Check:
    system = sum(row.system_tokens for row in f.rows.values())
    appended = sum(a.tokens for a in f.acks) + system
    stored = sum(st.num("token_count") for st in f.stored.values())
    saved = appended - stored
    archived = sum(int(r.get("tokens", 0)) for st in f.stored.values() for r in st.archive)
    summaries = sum(
        int(r.get("tokens", 0))
        for st in f.stored.values()
        for r in st.records
        if r.get("kind") == "summary"
    )
    share = f" ({saved / appended:.0%})" if appended else ""
    detail = (
        f"{saved:,} of {appended:,} tokens{share} saved: {archived:,} archived tokens replaced "
        f"by {summaries:,} summary tokens; {stored:,} tokens held now"
    )
    if saved != archived - summaries:
        return Check(
            "tokens saved", False, f"{detail}; expected appended - held = archived - summaries"
        )
    if compacted and saved <= 0:
        return Check("tokens saved", False, f"{detail}; compactions did not shrink anything")
    return Check("tokens saved", True, detail)


def _check_nothing_lost(f: Facts, verified: Findings) -> Check:
    expected: dict[tuple[str, str], tuple[str, int]] = {
        (a.session, a.message_id): (a.role, a.tokens) for a in f.acks
    }
    for sid, row in f.rows.items():
        for mid in row.system_ids:
            expected[(sid, mid)] = ("system", -1)  # tokens checked by the totals check
    found: Counter[tuple[str, str]] = Counter()
    records: dict[tuple[str, str], Mapping[str, Any]] = {}
    in_lists = in_archives = 0
    archived: set[tuple[str, str]] = set()
    for sid, st in f.stored.items():
        for mid, n in occurrences(st).items():  # the list and the archive
            found[(sid, mid)] += n
        for rec in st.records:
            if rec.get("kind") != "summary":
                records[(sid, str(rec.get("id")))] = rec
                in_lists += 1
        for rec in st.archive:
            records[(sid, str(rec.get("id")))] = rec
            archived.add((sid, str(rec.get("id"))))
            in_archives += 1
    missing = [f"{s}/{m}" for (s, m) in expected if found[(s, m)] == 0]
    unknown = [f"{s}/{m}" for (s, m) in found if (s, m) not in expected]
    changed = [
        f"{s}/{m}"
        for (s, m), (role, tokens) in expected.items()
        if (s, m) in records
        and (
            records[(s, m)].get("role") != role
            or (tokens >= 0 and int(records[(s, m)].get("tokens", -1)) != tokens)
        )
    ]
    # The system prompts lead their sessions (the head): a compaction never folds them.
    folded = [f"{s}/{m}" for s, row in f.rows.items() for m in row.system_ids if (s, m) in archived]
    problems = [
        f"{label}: {len(items)} ({_examples(items)})"
        for label, items in (
            ("missing", missing),
            ("never acknowledged", unknown),
            ("role or tokens changed", changed),
            ("system prompt in the archive", folded),
        )
        if items
    ]
    problems += verified.problems("nothing lost")  # stored twice, the id record, missing
    if problems:
        return Check("nothing lost", False, "; ".join(problems))
    return Check(
        "nothing lost",
        True,
        f"all {len(f.acks):,} acknowledged messages (and the system prompts) found exactly "
        f"once: {in_lists:,} in session lists, {in_archives:,} in archives",
    )


def _check_token_totals(f: Facts, verified: Findings) -> Check:
    wrong = verified.problems("token totals")
    if wrong:
        return Check("token totals", False, "; ".join(wrong))
    return Check(
        "token totals",
        True,
        f"{len(f.stored)}/{len(f.stored)} sessions: token_count equals the sum of the stored "
        f"records' tokens, message_count their number",
    )


def _check_settled(f: Facts, verified: Findings) -> Check:
    s = f.stats
    over = [
        f"{sid} {st.num('token_count'):,}/{st.num('token_limit'):,}"
        for sid, st in f.stored.items()
        if st.num("token_count") > st.num("token_limit")
    ]
    problems = [f"{n} {what}" for n, what in ((s.queued, "queued"), (s.running, "running")) if n]
    problems += [f"{s.dead} dead-lettered"] if s.dead else []
    problems += [f"over the limit: {_examples(over)}"] if over else []
    if problems:
        problems[-1] += " when the demo ended"
    problems += verified.problems("settled")  # the state against the queue and the lease
    if problems:
        return Check("settled", False, "; ".join(problems))
    largest = max(
        (st.num("token_count") / max(1, st.num("token_limit")) for st in f.stored.values()),
        default=0.0,
    )
    return Check(
        "settled",
        True,
        f"queue empty, nothing running, every session within its limit (fullest at {largest:.0%})",
    )


def verify(f: Facts) -> tuple[Check, ...]:
    """Every check, computed from the facts gathered at the end of the run."""
    compacted = sum(1 for o in f.outcomes if o.status == "compacted")
    verified = Findings(f.stored)
    return (
        _check_appended(f),
        _check_compactions(f, verified),
        _check_tokens_saved(f, compacted),
        _check_nothing_lost(f, verified),
        _check_token_totals(f, verified),
        _check_settled(f, verified),
    )
