"""Plan a compaction: which records to fold into the rolling summary and which to keep.

Pure: no I/O. The compaction daemon reads a session's records, asks :func:`plan_compaction`
what to do, summarizes :attr:`CompactionPlan.folded` (rolling in
:attr:`CompactionPlan.previous_summary`), and swaps ``records[:fold_end]`` for
``[*system, new summary]`` only if the ids stored there are still exactly
:attr:`CompactionPlan.prefix_ids`. Messages appended meanwhile are after ``fold_end`` and are
never touched.

How the cut is chosen
---------------------
``head = records[:head_count]`` holds the leading system messages and, after a previous
compaction, the summary record (``kind == "summary"``). Every other head record is kept as it
is (:attr:`CompactionPlan.system`); the summary is rolled into the new one. The rest is the
*body*; the plan splits it into ``folded`` (oldest) and the kept *tail* (newest).

A session's own limit wins over policy defaults that cannot fit it (``keep_recent_tokens=1000``
and ``max_summary_tokens=500`` in a session limited to 600 tokens): the summary is bounded by
``summary_max = min(max_summary_tokens, floor(SUMMARY_SHARE * token_limit))`` (at least 1) and
the tail minimums by ``keep_cap = floor(KEEP_SHARE * token_limit)`` (both shares 1/4), so a
compaction leaves about half of the limit or less whatever the defaults.

1. **Minimums.** Walking back from the newest body record, records are always taken into the
   tail while it holds fewer than ``min_recent_messages`` messages or fewer than
   ``min(keep_recent_tokens, keep_cap)`` tokens, as long as taking the next one keeps the tail
   within ``keep_cap`` (the newest record is always taken). These minimums are hard: the tail
   never starts later.
2. **Target.** Older records keep being taken while the tail's tokens stay within the *tail
   budget* ``floor(target_ratio * token_limit) - system_tokens - summary_max`` (which
   may be <= 0: then the tail is just the minimums). This gives the *target cut*.
3. **Turn boundary.** A *valid* cut is a body index ``k >= 1`` (something is folded) whose
   record is not a ``tool`` message and that does not split a tool-call group: a tool
   result's call is the nearest preceding assistant record whose ``tool_calls`` contain its
   ``tool_call_id``, and the call and all its results are folded together or kept together.
   The cut is, in this order of preference:

   a. the nearest valid cut at or before the target cut whose record is a ``user`` message
      (searching backwards: the tail keeps more, never less);
   b. else the nearest valid cut at or before the target cut (any role but ``tool``);
   c. else the nearest valid cut after the target cut that still satisfies the minimums
      (a ``user`` message first, then any), so a tool-heavy stretch at the target does not
      block a compaction the minimums allow.

   A ``user`` message at body index 0 does not count for (a): cutting there folds nothing, so
   the search falls through to (b) -- a long agentic run after a single user request can
   still be compacted (the request goes into the summary rather than being lost from reads).
4. **One step at most.** If the cut would fold more than ``max_fold_tokens``, the cut moves
   back to the last one (by the same preferences, searching from the last record that still
   fits) that folds at most ``max_fold_tokens``, or, when even the first valid cut folds
   more, to that first valid cut: one compaction folds one bounded step
   (:attr:`CompactionPlan.partial`), and the swap queues the session again while it is over
   its limit, so a huge middle is folded in several compactions.

When nothing can be folded the result is :class:`Uncompactable`, with a ``code``:

* ``"too_few_messages"``: the body is empty, or the minimums take all of it;
* ``"fits_target"``: the minimums leave something to fold, but the whole body fits the tail
  budget, so the target keeps everything;
* ``"no_boundary"``: every index the minimums allow splits a tool-call group or starts at a
  tool result.

Each says by how much the session should grow before it is worth planning again
(:attr:`Uncompactable.grow_by`); the compactor stores the total it must pass, and appends do
not flag the session until then.

One giant message
-----------------
A message larger than the whole limit is still planned normally: with
``min_recent_messages=1`` and the giant newest message a ``user`` message, everything before
it is folded and the tail is that message alone (the plan's :attr:`estimated_tokens_after`
then exceeds the limit). If the body is only that message, the result is
``Uncompactable("too_few_messages")``: the daemon leaves the session idle instead of retrying.
Reads still fit their budget, because ``get_context`` walks back from the newest message and
leaves out whatever does not fit (here: the giant message itself).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from convstate.errors import ConfigurationError, ValidationError

__all__ = [
    "DEFAULT_MAX_FOLD_TOKENS",
    "KEEP_SHARE",
    "REFLAG_SHARE",
    "SUMMARY_SHARE",
    "CompactionPlan",
    "CompactionPolicy",
    "Uncompactable",
    "plan_compaction",
    "reflag_margin",
]

#: ``kind`` of the record holding a session's rolling summary.
SUMMARY_KIND = "summary"

#: Default of :attr:`CompactionPolicy.max_fold_tokens`: what one summarizer call reads at most
#: (it fits the context of common summary models and keeps one extractive summary well under
#: a second of CPU).
DEFAULT_MAX_FOLD_TOKENS = 32_000

#: The summary may take at most this share of a session's token limit.
SUMMARY_SHARE = 0.25

#: The tail minimums (``keep_recent_tokens``, ``min_recent_messages``) keep at most this share
#: of a session's token limit (the newest message is kept whatever its size).
KEEP_SHARE = 0.25

#: An uncompactable session (too few turns, no turn boundary) is flagged again only once it
#: has grown by this share of its limit (at least one token).
REFLAG_SHARE = 0.1


def reflag_margin(token_limit: int) -> int:
    """Tokens a session of ``token_limit`` must grow by before a session left uncompactable
    is flagged again: :data:`REFLAG_SHARE` of its limit, at least one."""
    return max(1, math.floor(REFLAG_SHARE * token_limit))


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CompactionPolicy:
    """How much of a session a compaction keeps, and how large the summary may be.

    Attributes:
        keep_recent_tokens: the kept tail holds at least this many tokens (when the history
            after the head has them), up to a quarter of the session's limit
            (:data:`KEEP_SHARE`): a session's own limit wins over a default that cannot fit it.
        min_recent_messages: the kept tail holds at least this many messages (>= 1), within
            the same quarter of the limit (the newest message is always kept).
        target_ratio: aim to leave the session at or under ``target_ratio * token_limit``
            tokens (``0 < target_ratio <= 1``); older messages are kept while they fit.
        max_summary_tokens: bound on the summary's tokens (>= 1); the planner reserves this
            much of the target for it. A session's own limit wins: the bound used is at most
            a quarter of the session's limit (:data:`SUMMARY_SHARE`).
        max_fold_tokens: most tokens one compaction folds (>= 1); a longer middle is folded
            in steps, one compaction each (a single record larger than this is folded alone).

    Raises :class:`~convstate.errors.ConfigurationError` when a value is out of range.
    """

    keep_recent_tokens: int = 1000
    min_recent_messages: int = 4
    target_ratio: float = 0.5
    max_summary_tokens: int = 500
    max_fold_tokens: int = DEFAULT_MAX_FOLD_TOKENS

    def __post_init__(self) -> None:
        for name, low in (
            ("keep_recent_tokens", 0),
            ("min_recent_messages", 1),
            ("max_summary_tokens", 1),
            ("max_fold_tokens", 1),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ConfigurationError(f"{name} must be an integer >= {low}, not {value!r}")
        ratio = self.target_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or not 0 < ratio <= 1  # also refuses NaN
        ):
            raise ConfigurationError(f"target_ratio must be > 0 and <= 1, not {ratio!r}")


@dataclass(frozen=True)
class CompactionPlan:
    """What to fold into the new summary and where the kept tail starts.

    Attributes:
        system: the head's records other than the old summary, in order, kept as they are.
        previous_summary: the head's old summary record (to roll into the new one), or None.
        folded: the body records before the kept tail, oldest first (never empty).
        fold_end: absolute index where the kept tail starts; ``records[:fold_end]`` are
            replaced by ``[*system, new summary]``.
        prefix_ids: the ids of ``records[:fold_end]``, exactly: what the swap verifies.
        tail_tokens: tokens of the kept tail ``records[fold_end:]``.
        system_tokens: tokens of :attr:`system`.
        tokens_before: tokens of all records.
        max_summary_tokens: the bound on the new summary: the policy's, at most
            :data:`SUMMARY_SHARE` of the session's limit (the compactor asks the summarizer
            for no more).
        partial: the fold was cut short by ``max_fold_tokens``: more would have been folded,
            and a later compaction will (the swap queues the session again while it is over
            its limit).
    """

    system: list[dict[str, Any]]
    previous_summary: dict[str, Any] | None
    folded: list[dict[str, Any]]
    fold_end: int
    prefix_ids: list[str]
    tail_tokens: int
    system_tokens: int
    tokens_before: int
    max_summary_tokens: int
    partial: bool = False

    @property
    def folded_tokens(self) -> int:
        """Tokens of the folded records (the old summary not included)."""
        return sum(int(r["tokens"]) for r in self.folded)

    @property
    def previous_summary_tokens(self) -> int:
        """Tokens of the old summary record, 0 when there is none."""
        return 0 if self.previous_summary is None else int(self.previous_summary["tokens"])

    @property
    def estimated_tokens_after(self) -> int:
        """Upper estimate of the session's tokens after the swap (summary at its maximum)."""
        return self.system_tokens + self.max_summary_tokens + self.tail_tokens


@dataclass(frozen=True)
class Uncompactable:
    """Why a session cannot be compacted now.

    Attributes:
        reason: human-readable explanation, naming the numbers involved.
        code: ``"too_few_messages"``, ``"fits_target"`` or ``"no_boundary"`` (the planner's);
            ``"no_gain"`` (the compactor's: a summary not shorter than what it replaces).
        grow_by: tokens the session should grow by before it is worth planning again (>= 1):
            for ``fits_target`` exactly what the body lacks to pass the tail budget, else
            :data:`REFLAG_SHARE` of the limit. The compactor stores it as the session's
            re-flag margin, so appends do not flag a session that cannot shrink yet.
    """

    reason: str
    code: str
    grow_by: int = 1


def _check_inputs(
    records: Sequence[Mapping[str, Any]], head_count: int, token_limit: int, policy: object
) -> None:
    if not isinstance(policy, CompactionPolicy):
        raise ValidationError(f"policy must be a CompactionPolicy, not {type(policy).__name__}")
    if not _is_int(token_limit) or token_limit < 1:
        raise ValidationError(f"token_limit must be a positive integer, not {token_limit!r}")
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
        raise ValidationError("records must be a sequence of message records")
    if not _is_int(head_count) or not 0 <= head_count <= len(records):
        raise ValidationError(
            f"head_count must be an integer in 0..{len(records)} (the number of records), "
            f"not {head_count!r}"
        )
    summaries = 0
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValidationError(f"record {index} is not a mapping: {type(record).__name__}")
        rid = record.get("id")
        if not isinstance(rid, str) or not rid:
            raise ValidationError(f"record {index} needs a non-empty string 'id', not {rid!r}")
        tokens = record.get("tokens")
        if not _is_int(tokens) or tokens < 0:
            raise ValidationError(f"record {index} needs an integer 'tokens' >= 0, not {tokens!r}")
        calls = record.get("tool_calls")
        if calls is not None and (
            not isinstance(calls, list)
            or not all(isinstance(c, Mapping) and isinstance(c.get("id"), str) for c in calls)
        ):
            raise ValidationError(
                f"record {index}: 'tool_calls' must be a list of calls with string ids"
            )
        if record.get("role") == "tool" and not isinstance(record.get("tool_call_id"), str):
            raise ValidationError(f"record {index}: a tool message needs a string 'tool_call_id'")
        if index < head_count and record.get("kind") == SUMMARY_KIND:
            summaries += 1
            if summaries > 1:
                raise ValidationError("the head holds more than one summary record")


def _group_interiors(body: Sequence[Mapping[str, Any]]) -> list[bool]:
    """``inside[k]``: cutting before ``body[k]`` would split a tool call from a result.

    A result at ``i`` answering the call at ``a`` forbids every cut ``k`` with ``a < k <= i``.
    Results whose call is not in the body constrain nothing (they are never a cut themselves).
    """
    depth = [0] * (len(body) + 1)
    last_call: dict[str, int] = {}
    for i, record in enumerate(body):
        role = record.get("role")
        if role == "assistant" and record.get("tool_calls"):
            for call in record["tool_calls"]:
                last_call[call["id"]] = i
        elif role == "tool":
            a = last_call.get(record["tool_call_id"])
            if a is not None:
                depth[a + 1] += 1
                depth[i + 1] -= 1
    inside = []
    running = 0
    for k in range(len(body)):
        running += depth[k]
        inside.append(running > 0)
    return inside


def plan_compaction(
    records: Sequence[Mapping[str, Any]],
    head_count: int,
    token_limit: int,
    policy: CompactionPolicy,
) -> CompactionPlan | Uncompactable:
    """Decide which records a compaction folds into the summary (see the module docstring).

    Args:
        records: the session's stored records, oldest first (``id``, ``role``, ``tokens``,
            ``kind``, ``tool_calls`` / ``tool_call_id``, ...).
        head_count: how many leading records form the head (system messages and summary).
        token_limit: the session's token limit (>= 1).
        policy: the :class:`CompactionPolicy`.

    Returns:
        a :class:`CompactionPlan` folding at least one record, or :class:`Uncompactable`.

    Raises:
        ValidationError: ``head_count`` outside ``0..len(records)``, ``token_limit`` < 1, a
            record without a string id or an integer ``tokens`` >= 0, malformed tool fields,
            or more than one summary in the head.
    """
    _check_inputs(records, head_count, token_limit, policy)
    head = records[:head_count]
    body = records[head_count:]
    n = len(body)
    system = [dict(r) for r in head if r.get("kind") != SUMMARY_KIND]
    summaries = [dict(r) for r in head if r.get("kind") == SUMMARY_KIND]
    previous_summary = summaries[0] if summaries else None
    system_tokens = sum(int(r["tokens"]) for r in system)
    tokens_before = sum(int(r["tokens"]) for r in records)
    body_tokens = [int(r["tokens"]) for r in body]
    m = policy.min_recent_messages
    keep_cap = math.floor(KEEP_SHARE * token_limit)
    keep = min(policy.keep_recent_tokens, keep_cap)
    summary_max = max(1, min(policy.max_summary_tokens, math.floor(SUMMARY_SHARE * token_limit)))
    budget = math.floor(policy.target_ratio * token_limit) - system_tokens - summary_max
    regrow = reflag_margin(token_limit)

    if n == 0:
        return Uncompactable(
            f"too few turns: nothing after the head ({head_count} record(s)) to fold",
            "too_few_messages",
            regrow,
        )

    # 1. The minimums: the tail is body[k_min:]. The limit wins over them: past the newest
    #    message, the tail grows only while it stays within keep_cap.
    k_min, tail_tokens = n, 0
    while k_min > 0 and (n - k_min < m or tail_tokens < keep):
        if k_min < n and tail_tokens + body_tokens[k_min - 1] > keep_cap:
            break
        k_min -= 1
        tail_tokens += body_tokens[k_min]
    if k_min == 0:
        return Uncompactable(
            f"too few turns: all {n} message(s) after the head ({tail_tokens} tokens) are "
            f"needed for the kept tail (min_recent_messages={m}, keep_recent_tokens="
            f"{policy.keep_recent_tokens}, at most {keep_cap} of the limit {token_limit}); "
            f"nothing before the kept tail",
            "too_few_messages",
            regrow,
        )

    # 2. The target: extend the tail while it fits the tail budget.
    target = k_min
    while target > 0 and tail_tokens + body_tokens[target - 1] <= budget:
        target -= 1
        tail_tokens += body_tokens[target]
    if target == 0:
        return Uncompactable(
            f"fits the target: all {n} message(s) after the head ({tail_tokens} tokens) fit "
            f"the tail budget of {budget} tokens (target_ratio={policy.target_ratio} of "
            f"{token_limit}, less {system_tokens} system and {summary_max} "
            f"summary tokens); nothing to fold",
            "fits_target",
            max(1, budget - tail_tokens + 1),
        )

    # 3. A turn boundary.
    inside = _group_interiors(body)

    def valid(k: int) -> bool:
        return body[k].get("role") != "tool" and not inside[k]

    def is_user(k: int) -> bool:
        return body[k].get("role") == "user"

    def nearest(backwards: range, forwards: range) -> int | None:
        return next(
            (
                k
                for candidates, want_user in (
                    (backwards, True),
                    (backwards, False),
                    (forwards, True),
                    (forwards, False),
                )
                for k in candidates
                if valid(k) and (is_user(k) or not want_user)
            ),
            None,
        )

    cut = nearest(range(target, 0, -1), range(target + 1, k_min + 1))
    if cut is None:
        return Uncompactable(
            f"no turn boundary: every cut before the kept tail (body indexes 1..{k_min} of "
            f"{n}) starts at a tool result or splits a tool call from its results",
            "no_boundary",
            regrow,
        )

    # 4. One step at most: fold no more than max_fold_tokens (at least one valid cut's worth).
    partial = False
    if sum(body_tokens[:cut]) > policy.max_fold_tokens:
        within, folded_tokens = 0, 0
        while within < cut and folded_tokens + body_tokens[within] <= policy.max_fold_tokens:
            folded_tokens += body_tokens[within]
            within += 1
        step = nearest(range(within, 0, -1), range(0))
        cut = step or next(k for k in range(within + 1, cut + 1) if valid(k))
        partial = True

    fold_end = head_count + cut
    return CompactionPlan(
        system=system,
        previous_summary=previous_summary,
        folded=[dict(r) for r in body[:cut]],
        fold_end=fold_end,
        prefix_ids=[str(r["id"]) for r in records[:fold_end]],
        tail_tokens=sum(body_tokens[cut:]),
        system_tokens=system_tokens,
        tokens_before=tokens_before,
        max_summary_tokens=summary_max,
        partial=partial,
    )
