"""The compaction planner, without Redis: unit cases and properties over generated histories."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convstate.errors import ConfigurationError, ValidationError
from convstate.planner import (
    DEFAULT_MAX_FOLD_TOKENS,
    KEEP_SHARE,
    SUMMARY_SHARE,
    CompactionPlan,
    CompactionPolicy,
    Uncompactable,
    plan_compaction,
)

# -- building histories ------------------------------------------------------------------------


@dataclass
class History:
    """Records plus what the generator knows: where the head ends and the tool-call groups.

    ``groups`` holds ``(call, last_result)`` body indexes of each answered tool call, known
    from construction (not re-derived from ids the way the planner does).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    head_count: int = 0
    groups: list[tuple[int, int]] = field(default_factory=list)
    _next: int = 0

    def _add(self, role: str, tokens: int, **extra: Any) -> dict[str, Any]:
        self._next += 1
        record = {
            "id": f"m{self._next}",
            "role": role,
            "content": f"{role} {self._next}",
            "tokens": tokens,
            "kind": "message",
            **extra,
        }
        self.records.append(record)
        return record

    def system(self, tokens: int = 10) -> History:
        self._add("system", tokens)
        self.head_count = len(self.records)
        return self

    def summary(self, tokens: int = 50) -> History:
        self._add("system", tokens, kind="summary")
        self.head_count = len(self.records)
        return self

    def user(self, tokens: int = 10) -> History:
        self._add("user", tokens)
        return self

    def assistant(self, tokens: int = 10) -> History:
        self._add("assistant", tokens)
        return self

    def body_system(self, tokens: int = 10) -> History:
        self._add("system", tokens)
        return self

    def tools(self, call_tokens: int = 10, result_tokens: list[int] | None = None) -> History:
        """An assistant message with ``len(result_tokens)`` tool calls, then their results."""
        results = [10, 10] if result_tokens is None else result_tokens
        ids = [f"c{self._next + 1}_{i}" for i in range(len(results))]
        call_at = len(self.records) - self.head_count
        self._add("assistant", call_tokens, content=None, tool_calls=[{"id": c} for c in ids])
        for call_id, tokens in zip(ids, results, strict=True):
            self._add("tool", tokens, tool_call_id=call_id)
        if results:
            self.groups.append((call_at, len(self.records) - self.head_count - 1))
        return self

    @property
    def body(self) -> list[dict[str, Any]]:
        return self.records[self.head_count :]

    def plan(self, limit: int, policy: CompactionPolicy) -> CompactionPlan | Uncompactable:
        return plan_compaction(self.records, self.head_count, limit, policy)


#: A limit large enough that no share of it caps the small histories of the unit cases.
TIGHT = 10_000


def tight(min_recent: int = 1, keep: int = 0) -> CompactionPolicy:
    """A policy whose tail budget is <= 0 at the limit :data:`TIGHT` (0.1 * 10,000 - 1,000):
    the tail is just the minimums."""
    return CompactionPolicy(
        keep_recent_tokens=keep,
        min_recent_messages=min_recent,
        target_ratio=0.1,
        max_summary_tokens=1000,
    )


def expect_plan(result: CompactionPlan | Uncompactable) -> CompactionPlan:
    assert isinstance(result, CompactionPlan), result
    return result


def expect_uncompactable(result: CompactionPlan | Uncompactable, code: str) -> Uncompactable:
    assert isinstance(result, Uncompactable), result
    assert result.code == code, result
    assert result.reason
    return result


def cut_of(history: History, plan: CompactionPlan) -> int:
    return plan.fold_end - history.head_count


# -- unit cases --------------------------------------------------------------------------------


def test_system_kept_and_previous_summary_rolled() -> None:
    h = History().system(7).system(5).summary(40)
    h.user().assistant().user().assistant().user().assistant()
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=2)))
    assert plan.system == h.records[:2]
    assert plan.previous_summary == h.records[2]
    assert plan.system_tokens == 12
    assert plan.fold_end == 3 + 4
    assert plan.folded == h.records[3:7]
    assert plan.prefix_ids == [r["id"] for r in h.records[:7]]
    assert plan.tail_tokens == 20
    assert plan.folded_tokens == 40
    assert plan.previous_summary_tokens == 40
    assert plan.tokens_before == 12 + 40 + 60
    assert plan.estimated_tokens_after == 12 + 1000 + 20


def test_system_after_the_summary_is_kept_in_order() -> None:
    h = History().system(3).summary(9).system(4)
    h.user().assistant().user().assistant()
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=2)))
    assert [r["id"] for r in plan.system] == [h.records[0]["id"], h.records[2]["id"]]
    assert plan.previous_summary == h.records[1]
    assert plan.system_tokens == 7


def test_no_previous_summary() -> None:
    h = History().system().user().assistant().user().assistant()
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=2)))
    assert plan.previous_summary is None
    assert plan.previous_summary_tokens == 0
    assert plan.prefix_ids == ["m1", "m2", "m3"]


def test_plan_copies_the_records() -> None:
    h = History().user().assistant().user().assistant()
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=2)))
    plan.folded[0]["content"] = "changed"
    assert h.records[0]["content"] == "user 1"


def test_tail_minimum_by_tokens() -> None:
    h = History()
    for _ in range(3):
        h.user(100).assistant(100)
    # one message would do for the count; 150 tokens need two
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=1, keep=150)))
    assert cut_of(h, plan) == 4
    assert plan.tail_tokens == 200


def test_tail_minimum_by_count() -> None:
    h = History()
    for _ in range(4):
        h.user(10).assistant(10)
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=4, keep=0)))
    assert cut_of(h, plan) == 4
    assert len(plan.folded) == 4


def test_target_budget_extends_the_tail() -> None:
    h = History()
    for _ in range(4):
        h.user(100).assistant(100)
    policy = CompactionPolicy(
        keep_recent_tokens=0, min_recent_messages=1, target_ratio=0.5, max_summary_tokens=100
    )
    # tail budget: floor(0.5 * 1000) - 0 - 100 = 400 tokens: four messages
    plan = expect_plan(h.plan(1000, policy))
    assert cut_of(h, plan) == 4
    assert plan.tail_tokens == 400
    assert plan.estimated_tokens_after == 500


def test_system_tokens_shrink_the_tail_budget() -> None:
    h = History().system(100)
    for _ in range(4):
        h.user(100).assistant(100)
    policy = CompactionPolicy(
        keep_recent_tokens=0, min_recent_messages=1, target_ratio=0.5, max_summary_tokens=100
    )
    # 500 - 100 - 100 = 300 tokens: three messages, then back to the user message
    plan = expect_plan(h.plan(1000, policy))
    assert cut_of(h, plan) == 4
    assert plan.tail_tokens == 400


def test_cut_moves_back_to_a_user_message() -> None:
    h = History().user().assistant().user().assistant().assistant().assistant()
    # minimums end at body[3] (an assistant message): keep back to the user at 2
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=3)))
    assert cut_of(h, plan) == 2
    assert h.records[plan.fold_end]["role"] == "user"


def test_tool_group_with_a_user_message_before_it() -> None:
    h = History().user().assistant().user().tools(result_tokens=[10, 10])
    h.assistant().user().assistant()
    # minimums end between the two tool results (body[5]); keep back to the user at 2
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=4)))
    assert h.body[5]["role"] == "tool"
    assert cut_of(h, plan) == 2


@pytest.mark.parametrize("min_recent", [4, 5])
def test_tool_group_is_never_split(min_recent: int) -> None:
    h = History().user().assistant().tools(result_tokens=[10, 10])
    h.assistant().assistant().assistant()
    # min 5: natural cut at the first result; min 4: between the two results
    assert [r["role"] for r in h.body[2:5]] == ["assistant", "tool", "tool"]
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=min_recent)))
    assert cut_of(h, plan) == 2  # the call and both results stay together in the tail
    assert h.body[2]["tool_calls"]


def test_tool_results_interleaved_with_a_user_message_are_not_split() -> None:
    h = History().user().assistant()
    h._add("assistant", 10, content=None, tool_calls=[{"id": "x"}])
    h.user()
    h._add("tool", 10, tool_call_id="x")
    h.assistant().assistant()
    # the user message at 3 sits inside the call's group: cutting there splits it
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=3)))
    assert cut_of(h, plan) == 2


def test_reused_call_id_binds_to_the_nearest_preceding_call() -> None:
    h = History().user()
    h._add("assistant", 10, content=None, tool_calls=[{"id": "x"}])
    h._add("tool", 10, tool_call_id="x")
    h.assistant()
    h._add("assistant", 10, content=None, tool_calls=[{"id": "x"}])
    h._add("tool", 10, tool_call_id="x")
    h.assistant().assistant()
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=3)))
    assert cut_of(h, plan) == 4  # not 1: the second result answers the second call


def test_no_user_message_falls_back_to_a_non_tool_record() -> None:
    h = History().assistant().assistant().tools(result_tokens=[10]).assistant().assistant()
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=3)))
    assert cut_of(h, plan) == 2
    assert h.body[2]["role"] == "assistant"


def test_single_user_message_then_an_agentic_run_is_still_compacted() -> None:
    h = History().system().user()
    for _ in range(3):
        h.tools(result_tokens=[10, 10])
    h.assistant()
    # the only user message is the first body record: cutting there folds nothing
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=2)))
    assert cut_of(h, plan) == 7
    assert h.body[7].get("tool_calls")
    assert plan.folded[0]["id"] == h.body[0]["id"]


def test_cut_goes_forward_when_the_target_lands_in_a_tool_run() -> None:
    h = History().tools(result_tokens=[10, 10, 10]).assistant().user().assistant()
    policy = CompactionPolicy(
        keep_recent_tokens=0, min_recent_messages=3, target_ratio=0.375, max_summary_tokens=100
    )
    # minimums: body[4:]; target (budget 0.375 * 400 - 100 = 50 tokens): body[2:], inside the group
    plan = expect_plan(h.plan(400, policy))
    assert cut_of(h, plan) == 4
    assert h.body[4]["role"] == "assistant"


def test_forward_cut_prefers_a_user_message() -> None:
    h = History().tools(result_tokens=[10, 10, 10]).assistant().user().assistant().assistant()
    policy = CompactionPolicy(
        keep_recent_tokens=0, min_recent_messages=3, target_ratio=0.375, max_summary_tokens=100
    )
    # minimums: body[5:]; target: body[3:] (a tool result); after it: body[4], then a user
    plan = expect_plan(h.plan(400, policy))
    assert cut_of(h, plan) == 5
    assert h.body[5]["role"] == "user"


def test_no_boundary() -> None:
    h = History().system().tools(result_tokens=[10, 10, 10])
    result = expect_uncompactable(h.plan(TIGHT, tight(min_recent=1)), "no_boundary")
    assert "boundary" in result.reason


def test_too_few_messages_by_count() -> None:
    h = History().system().user().assistant().user()
    result = expect_uncompactable(h.plan(TIGHT, tight(min_recent=4)), "too_few_messages")
    assert "3" in result.reason
    assert "min_recent_messages=4" in result.reason


def test_too_few_messages_by_tokens() -> None:
    h = History().user(100).assistant(100).user(100).assistant(100)
    expect_uncompactable(h.plan(TIGHT, tight(min_recent=1, keep=1000)), "too_few_messages")


def test_first_user_message_alone_can_be_folded() -> None:
    h = History().user(100).assistant(100).user(100).assistant(100)
    # the minimums (300 tokens) end at body[1], an assistant message; the only user message
    # at or before it is body[0], where cutting folds nothing: fall back to body[1]
    plan = expect_plan(h.plan(TIGHT, tight(min_recent=1, keep=300)))
    assert cut_of(h, plan) == 1
    assert plan.folded == [h.records[0]]


def test_whole_history_within_target_is_not_compacted() -> None:
    h = History().system(10).user(10).assistant(10).user(10).assistant(10)
    policy = CompactionPolicy(keep_recent_tokens=0, min_recent_messages=1, max_summary_tokens=10)
    result = expect_uncompactable(h.plan(1000, policy), "fits_target")
    assert "480" in result.reason  # the tail budget: 500 - 10 - 10


def test_giant_newest_message_folds_everything_before_it() -> None:
    h = History().system(10).user().assistant().user().assistant().user(50_000)
    policy = CompactionPolicy(keep_recent_tokens=100, min_recent_messages=1)
    plan = expect_plan(h.plan(1000, policy))
    assert cut_of(h, plan) == 4
    assert plan.tail_tokens == 50_000
    assert plan.estimated_tokens_after > 1000


def test_giant_only_message_is_uncompactable() -> None:
    h = History().system(10).user(50_000)
    policy = CompactionPolicy(keep_recent_tokens=100, min_recent_messages=1)
    expect_uncompactable(h.plan(1000, policy), "too_few_messages")


def test_empty_body() -> None:
    h = History().system().summary()
    expect_uncompactable(h.plan(TIGHT, tight()), "too_few_messages")
    expect_uncompactable(plan_compaction([], 0, TIGHT, tight()), "too_few_messages")


# -- validation --------------------------------------------------------------------------------


def _records() -> list[dict[str, Any]]:
    return History().system().user().assistant().user().assistant().records


@pytest.mark.parametrize("head_count", [-1, 6, True, "1", None, 1.0])
def test_bad_head_count(head_count: Any) -> None:
    with pytest.raises(ValidationError):
        plan_compaction(_records(), head_count, TIGHT, tight())


@pytest.mark.parametrize("limit", [0, -5, True, 1.5, "100", None])
def test_bad_token_limit(limit: Any) -> None:
    with pytest.raises(ValidationError):
        plan_compaction(_records(), 1, limit, tight())


@pytest.mark.parametrize(
    "change",
    [
        {"id": None},
        {"id": 5},
        {"id": ""},
        {"tokens": None},
        {"tokens": -1},
        {"tokens": "3"},
        {"tokens": True},
        {"tokens": 1.5},
        {"tool_calls": "c1"},
        {"tool_calls": [{"id": 1}]},
        {"tool_calls": ["c1"]},
        {"role": "tool"},  # without a tool_call_id
    ],
)
def test_bad_record(change: dict[str, Any]) -> None:
    records = _records()
    records[2] = {**records[2], **change}
    if change.get("id") is None and "id" in change:
        del records[2]["id"]
    if change.get("tokens") is None and "tokens" in change:
        del records[2]["tokens"]
    with pytest.raises(ValidationError):
        plan_compaction(records, 1, TIGHT, tight())


def test_bad_records_container() -> None:
    with pytest.raises(ValidationError):
        plan_compaction([*_records(), "not a record"], 1, TIGHT, tight())  # type: ignore[list-item]
    with pytest.raises(ValidationError):
        plan_compaction({"id": "m1"}, 0, TIGHT, tight())  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        plan_compaction(_records(), 1, 100, None)  # type: ignore[arg-type]


def test_two_summaries_in_the_head() -> None:
    h = History().system().summary().summary().user().assistant()
    with pytest.raises(ValidationError):
        h.plan(TIGHT, tight())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_recent_tokens": -1},
        {"keep_recent_tokens": 1.0},
        {"min_recent_messages": 0},
        {"min_recent_messages": True},
        {"max_summary_tokens": 0},
        {"target_ratio": 0},
        {"target_ratio": 1.01},
        {"target_ratio": -0.5},
        {"target_ratio": math.nan},
        {"target_ratio": True},
        {"target_ratio": "0.5"},
    ],
)
def test_bad_policy(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        CompactionPolicy(**kwargs)


def test_policy_bounds_are_accepted() -> None:
    policy = CompactionPolicy(
        keep_recent_tokens=0, min_recent_messages=1, target_ratio=1, max_summary_tokens=1
    )
    assert policy.target_ratio == 1


# -- properties --------------------------------------------------------------------------------

STYLES = {
    "chat": ("user", "assistant", "user", "assistant", "tools"),
    "agentic": ("user", "tools", "tools", "tools", "assistant"),
    "tools_only": ("tools", "tools", "assistant"),
    "mixed": ("user", "assistant", "tools", "system", "dangling"),
}


@st.composite
def histories(draw: st.DrawFn) -> History:
    tokens = st.integers(0, 500) if draw(st.booleans()) else st.integers(1, 60)
    h = History()
    head = ["system"] * draw(st.integers(0, 3))
    if draw(st.booleans()):
        head.insert(draw(st.integers(0, len(head))), "summary")
    for kind in head:
        if kind == "summary":
            h.summary(draw(tokens))
        else:
            h.system(draw(tokens))
    style = STYLES[draw(st.sampled_from(sorted(STYLES)))]
    if draw(st.integers(0, 3)) == 0:  # a long tool run first: cuts near it are scarce
        h.tools(draw(tokens), [draw(tokens) for _ in range(draw(st.integers(1, 12)))])
    size = draw(st.integers(0, 40))
    for turn in draw(st.lists(st.sampled_from(style), min_size=size, max_size=size)):
        if turn == "user":
            h.user(draw(tokens))
        elif turn == "assistant":
            h.assistant(draw(tokens))
        elif turn == "system":
            h.body_system(draw(tokens))
        elif turn == "dangling":  # a call whose results are not (yet) stored
            h.tools(draw(tokens), [])
        else:
            k = draw(st.integers(1, 5))
            h.tools(draw(tokens), [draw(tokens) for _ in range(k)])
    return h


policies = st.builds(
    CompactionPolicy,
    keep_recent_tokens=st.one_of(st.integers(0, 200), st.integers(0, 3000)),
    min_recent_messages=st.one_of(st.integers(1, 4), st.integers(1, 10)),
    target_ratio=st.floats(min_value=0.01, max_value=1.0),
    max_summary_tokens=st.one_of(st.integers(1, 100), st.integers(1, 2000)),
    max_fold_tokens=st.one_of(st.just(DEFAULT_MAX_FOLD_TOKENS), st.integers(1, 400)),
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[History, int, CompactionPolicy]:
    """A history, a token limit around its size (at times far off), and a policy."""
    h = draw(histories())
    total = sum(r["tokens"] for r in h.records)
    limit = draw(st.one_of(st.integers(1, max(1, 2 * total)), st.integers(1, 20_000)))
    return h, limit, draw(policies)


@dataclass
class Expected:
    """What the rules imply for a history, computed by brute force."""

    code: str | None  # None: a plan
    cut: int | None  # body index where the tail starts
    allowed: list[int]  # valid cuts that keep at least the minimum tail
    k_min: int = 0  # where the minimum tail starts
    partial: bool = False


def summary_max(limit: int, policy: CompactionPolicy) -> int:
    return max(1, min(policy.max_summary_tokens, math.floor(SUMMARY_SHARE * limit)))


def tail_budget(h: History, limit: int, policy: CompactionPolicy) -> int:
    head = h.records[: h.head_count]
    system_tokens = sum(int(r["tokens"]) for r in head if r["kind"] != "summary")
    return math.floor(policy.target_ratio * limit) - system_tokens - summary_max(limit, policy)


def brute_force(h: History, limit: int, policy: CompactionPolicy) -> Expected:
    body = h.body
    n = len(body)
    tok = [r["tokens"] for r in body]
    budget = tail_budget(h, limit, policy)
    keep_cap = math.floor(KEEP_SHARE * limit)
    keep = min(policy.keep_recent_tokens, keep_cap)

    def meets_minimums(k: int) -> bool:
        return n - k >= policy.min_recent_messages and sum(tok[k:]) >= keep

    def valid(k: int) -> bool:
        return (
            1 <= k < n
            and body[k]["role"] != "tool"
            and not any(a < k <= last for a, last in h.groups)
        )

    def user(k: int) -> bool:
        return bool(body[k]["role"] == "user")

    def choose(before: list[int], after: list[int]) -> int | None:
        for chosen in (
            max((k for k in before if user(k)), default=None),
            max(before, default=None),
            min((k for k in after if user(k)), default=None),
            min(after, default=None),
        ):
            if chosen is not None:
                return chosen
        return None

    # The minimum tail starts where the minimums are met, or where the cap stops it (the
    # newest record is always kept), whichever is later.
    k_met = max([k for k in range(0, n) if meets_minimums(k)], default=0)
    k_cap = min([k for k in range(0, n) if sum(tok[k:]) <= keep_cap], default=max(n - 1, 0))
    k_min = max(k_met, k_cap)
    allowed = [k for k in range(1, k_min + 1) if valid(k)]
    if k_min == 0:
        return Expected("too_few_messages", None, allowed, k_min)
    if sum(tok) <= budget:
        return Expected("fits_target", None, allowed, k_min)
    target = min(k for k in range(1, k_min + 1) if k == k_min or sum(tok[k:]) <= budget)
    cut = choose(
        [k for k in range(1, target + 1) if valid(k)],
        [k for k in range(target + 1, k_min + 1) if valid(k)],
    )
    if cut is None:
        return Expected("no_boundary", None, allowed, k_min)
    if sum(tok[:cut]) <= policy.max_fold_tokens:
        return Expected(None, cut, allowed, k_min)
    within = max(w for w in range(0, cut + 1) if sum(tok[:w]) <= policy.max_fold_tokens)
    step = choose([k for k in range(1, within + 1) if valid(k)], [])
    if step is None:  # even the first valid cut folds more: the smallest step there is
        step = min(k for k in range(within + 1, cut + 1) if valid(k))
    return Expected(None, step, allowed, k_min, partial=True)


@settings(max_examples=300, deadline=None)
@given(cases())
def test_plan_properties(case: tuple[History, int, CompactionPolicy]) -> None:
    h, limit, policy = case
    result = h.plan(limit, policy)
    expected = brute_force(h, limit, policy)
    records, head_count, body = h.records, h.head_count, h.body
    if isinstance(result, Uncompactable):
        assert result.code == expected.code
        assert result.reason
        if result.code == "fits_target":
            # the whole body fits the tail budget: the target keeps everything
            assert sum(r["tokens"] for r in body) <= tail_budget(h, limit, policy)
        else:
            # no cut that folds something, keeps the tool groups whole and meets the minimums
            assert expected.allowed == []
        return

    assert expected.code is None
    cut = result.fold_end - head_count
    assert cut == expected.cut
    assert cut in expected.allowed
    assert result.fold_end > head_count
    assert result.prefix_ids == [r["id"] for r in records[: result.fold_end]]
    tail = records[result.fold_end :]
    assert result.folded + tail == body
    assert result.folded
    first = records[result.fold_end]
    assert first["role"] != "tool"
    if first["role"] != "user":  # fallback: no user message to cut at before the target
        assert not any(r["role"] == "user" for r in body[1:cut])
    for a, last in h.groups:  # a call and its results on the same side of the cut
        assert (a < cut) == (last < cut)
    assert result.tail_tokens == sum(r["tokens"] for r in tail)
    assert result.partial == expected.partial
    if result.partial:  # one bounded step, or the smallest step there is
        assert result.folded_tokens <= policy.max_fold_tokens or not [
            k for k in range(1, cut) if k in expected.allowed
        ]
    else:
        assert result.folded_tokens == sum(r["tokens"] for r in body[:cut])
    # The minimums hold, unless the session's limit cannot fit them (then the tail keeps at
    # most KEEP_SHARE of the limit, or the newest message alone).
    minimum_tail = body[expected.k_min :]
    keep_cap = math.floor(KEEP_SHARE * limit)
    assert (
        len(tail) >= policy.min_recent_messages
        and result.tail_tokens >= min(policy.keep_recent_tokens, keep_cap)
    ) or (sum(r["tokens"] for r in minimum_tail) <= keep_cap or len(minimum_tail) == 1)
    head = records[:head_count]
    assert result.system == [r for r in head if r["kind"] != "summary"]
    summaries = [r for r in head if r["kind"] == "summary"]
    assert result.previous_summary == (summaries[0] if summaries else None)
    assert result.system_tokens == sum(r["tokens"] for r in result.system)
    assert result.tokens_before == sum(r["tokens"] for r in records)
    assert (
        result.system_tokens
        + result.previous_summary_tokens
        + result.folded_tokens
        + result.tail_tokens
        == result.tokens_before
    )
    assert result.max_summary_tokens == summary_max(limit, policy)
    assert result.max_summary_tokens <= max(1, limit // 4)
    assert result.estimated_tokens_after == (
        result.system_tokens + result.max_summary_tokens + result.tail_tokens
    )


@settings(max_examples=300, deadline=None)
@given(cases())
def test_plan_is_deterministic_and_leaves_its_input_alone(
    case: tuple[History, int, CompactionPolicy],
) -> None:
    h, limit, policy = case
    snapshot = [dict(r) for r in h.records]
    assert h.plan(limit, policy) == h.plan(limit, policy)
    assert h.records == snapshot


# -- a session's own limit wins; bounded steps; re-flag margins -----------------------------------


def chat(h: History, turns: int, tokens: int) -> History:
    for i in range(turns):
        h.user(tokens) if i % 2 == 0 else h.assistant(tokens)
    return h


def test_small_limit_scales_the_default_policy() -> None:
    """Issue 11: token_limit=600 with the defaults (keep 1000, summary 500) kept almost all of
    the session and never got under 600; now the summary gets at most a quarter of the limit
    and the kept tail at most another quarter."""
    h = chat(History().system(20), 20, 40)  # 820 tokens over a limit of 600
    plan = expect_plan(h.plan(600, CompactionPolicy()))
    assert plan.max_summary_tokens == 150
    assert plan.tail_tokens <= 150 + 40  # back to a user message: one turn more at most
    assert plan.estimated_tokens_after <= 600


@pytest.mark.parametrize("limit", [300, 600, 1000, 4000, 20_000, 100_000])
def test_default_policy_plans_every_limit_under_it(limit: int) -> None:
    """Under the defaults, repeated compactions of a chat with turns of a tenth of the limit
    (at most 400 tokens) end under the limit, the summary taken at its maximum."""
    tokens = min(400, limit // 10)
    h = chat(History().system(20), 2 * limit // tokens, tokens)
    records, head_count = h.records, h.head_count
    for _ in range(20):
        result = plan_compaction(records, head_count, limit, CompactionPolicy())
        assert isinstance(result, CompactionPlan), result
        summary = {"id": f"s{_}", "role": "system", "kind": "summary"}
        summary["tokens"] = result.max_summary_tokens
        records = [*result.system, summary, *records[result.fold_end :]]
        head_count = len(result.system) + 1
        if sum(int(r["tokens"]) for r in records) <= limit:
            break
    assert sum(int(r["tokens"]) for r in records) <= limit


def test_a_huge_middle_is_folded_in_bounded_steps() -> None:
    h = chat(History().system(10), 40, 1000)
    policy = CompactionPolicy(max_fold_tokens=5000)
    plan = expect_plan(h.plan(10_000, policy))
    assert plan.partial
    assert 4000 <= plan.folded_tokens <= 5000  # back to a user message within the step
    assert h.records[plan.fold_end]["role"] == "user"
    unbounded = expect_plan(h.plan(10_000, CompactionPolicy(max_fold_tokens=100_000)))
    assert not unbounded.partial
    assert unbounded.folded_tokens > 5000


def test_a_record_larger_than_a_step_is_folded_alone() -> None:
    h = History().system(10).user(50_000).assistant(10).user(10).assistant(10)
    plan = expect_plan(h.plan(1000, CompactionPolicy(max_fold_tokens=100)))
    assert plan.partial
    assert [r["id"] for r in plan.folded] == [h.body[0]["id"]]


def test_uncompactable_says_how_much_to_grow() -> None:
    fits = History().system(10).summary(900).user(10).assistant(10).user(10)
    policy = CompactionPolicy(keep_recent_tokens=0, min_recent_messages=1)
    result = expect_uncompactable(fits.plan(1000, policy), "fits_target")
    # tail budget 500 - 10 - 250 = 240 tokens; the body holds 30
    assert result.grow_by == 240 - 30 + 1
    few = History().system(10).user(50_000)
    result = expect_uncompactable(few.plan(1000, CompactionPolicy()), "too_few_messages")
    assert result.grow_by == 100
    assert expect_uncompactable(History().plan(5, tight()), "too_few_messages").grow_by == 1


def test_bad_max_fold_tokens() -> None:
    for value in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError):
            CompactionPolicy(max_fold_tokens=value)  # type: ignore[arg-type]
