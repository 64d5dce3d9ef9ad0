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

1. **Minimums.** Walking back from the newest body record, records are always taken into the
   tail while it holds fewer than ``min_recent_messages`` messages or fewer than
   ``keep_recent_tokens`` tokens. These minimums are hard: the tail never starts later.
2. **Target.** Older records keep being taken while the tail's tokens stay within the *tail
   budget* ``floor(target_ratio * token_limit) - system_tokens - max_summary_tokens`` (which
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

When nothing can be folded the result is :class:`Uncompactable`, with a ``code``:

* ``"too_few_messages"``: the body is empty, or the minimums take all of it;
* ``"fits_target"``: the minimums leave something to fold, but the whole body fits the tail
  budget, so the target keeps everything;
* ``"no_boundary"``: every index the minimums allow splits a tool-call group or starts at a
  tool result.

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
    "CompactionPlan",
    "CompactionPolicy",
    "Uncompactable",
    "plan_compaction",
]

#: ``kind`` of the record holding a session's rolling summary.
SUMMARY_KIND = "summary"


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CompactionPolicy:
    """How much of a session a compaction keeps, and how large the summary may be.

    Attributes:
        keep_recent_tokens: the kept tail holds at least this many tokens (when the history
            after the head has them).
        min_recent_messages: the kept tail holds at least this many messages (>= 1).
        target_ratio: aim to leave the session at or under ``target_ratio * token_limit``
            tokens (``0 < target_ratio <= 1``); older messages are kept while they fit.
        max_summary_tokens: bound on the summary's tokens (>= 1); the planner reserves this
            much of the target for it.

    Raises :class:`~convstate.errors.ConfigurationError` when a value is out of range.
    """

    keep_recent_tokens: int = 1000
    min_recent_messages: int = 4
    target_ratio: float = 0.5
    max_summary_tokens: int = 500

    def __post_init__(self) -> None:
        for name, low in (
            ("keep_recent_tokens", 0),
            ("min_recent_messages", 1),
            ("max_summary_tokens", 1),
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
        max_summary_tokens: the policy's bound on the new summary (for the estimate).
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
        code: ``"too_few_messages"``, ``"fits_target"`` or ``"no_boundary"``.
    """

    reason: str
    code: str


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
    m, keep = policy.min_recent_messages, policy.keep_recent_tokens
    budget = math.floor(policy.target_ratio * token_limit) - system_tokens
    budget -= policy.max_summary_tokens

    if n == 0:
        return Uncompactable(
            f"too few turns: nothing after the head ({head_count} record(s)) to fold",
            "too_few_messages",
        )

    # 1. The minimums: the tail is body[k_min:].
    k_min, tail_tokens = n, 0
    while k_min > 0 and (n - k_min < m or tail_tokens < keep):
        k_min -= 1
        tail_tokens += body_tokens[k_min]
    if k_min == 0:
        return Uncompactable(
            f"too few turns: all {n} message(s) after the head ({tail_tokens} tokens) are "
            f"needed for the kept tail (min_recent_messages={m}, keep_recent_tokens={keep}); "
            f"nothing before the kept tail",
            "too_few_messages",
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
            f"{token_limit}, less {system_tokens} system and {policy.max_summary_tokens} "
            f"summary tokens); nothing to fold",
            "fits_target",
        )

    # 3. A turn boundary.
    inside = _group_interiors(body)

    def valid(k: int) -> bool:
        return body[k].get("role") != "tool" and not inside[k]

    def is_user(k: int) -> bool:
        return body[k].get("role") == "user"

    backwards = range(target, 0, -1)
    forwards = range(target + 1, k_min + 1)
    cut = next(
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
    if cut is None:
        return Uncompactable(
            f"no turn boundary: every cut before the kept tail (body indexes 1..{k_min} of "
            f"{n}) starts at a tool result or splits a tool call from its results",
            "no_boundary",
        )

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
        max_summary_tokens=policy.max_summary_tokens,
    )
