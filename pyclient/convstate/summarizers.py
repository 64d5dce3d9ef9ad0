"""Summarizers: fold the middle of a long chat history into a rolling summary.

The compaction daemon hands a :class:`Summarizer` a :class:`SummaryRequest` (the previous
rolling summary, the records being folded, a token budget and the store's token counter) and
stores the :class:`Summary` it returns. Two implementations ship:

* :class:`ExtractiveSummarizer` (``"extractive"``) -- offline, deterministic and fast: keeps
  the sentences that carry names, numbers, decisions, questions, preferences and tool calls;
* :class:`OpenAISummarizer` (``"openai:<model>"``) -- asks any OpenAI-compatible
  chat-completions endpoint through the official ``openai`` SDK (``pip install openai``).

Every summary fits its budget: ``request.count_tokens(summary.text) <= request.max_tokens``
(text over the budget is cut with :func:`truncate_to_tokens`). Every failure is raised as
:class:`SummarizerError`.

Bring your own by implementing the :class:`Summarizer` protocol: a ``name`` attribute and an
``async def summarize(request) -> Summary`` method.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from convstate.errors import ConfigurationError, ConvstateError, InvalidLimitError

if TYPE_CHECKING:
    import openai
    from openai.types.chat import ChatCompletionMessageParam

__all__ = [
    "DEFAULT_API_KEY_ENV",
    "SUMMARY_SYSTEM_PROMPT",
    "ExtractiveSummarizer",
    "OpenAISummarizer",
    "Summarizer",
    "SummarizerError",
    "Summary",
    "SummaryRequest",
    "render_transcript",
    "truncate_to_tokens",
]

#: Environment variable :class:`OpenAISummarizer` reads its API key from by default.
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


class SummarizerError(ConvstateError):
    """Summarizing failed (API error, timeout, empty reply, ...); nothing was stored.

    ``retryable`` tells whether trying again later may succeed (timeouts, connection errors,
    rate limits, server errors, empty replies) or needs a configuration fix first (bad key,
    unknown model, rejected request). ``status_code`` is the HTTP status, when there was one.
    """

    def __init__(
        self, message: str, *, retryable: bool = False, status_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code


# -- requests, results, protocol ---------------------------------------------------------------


@dataclass(frozen=True)
class SummaryRequest:
    """What to summarize and how long the summary may be.

    ``messages`` are the stored records being folded, oldest first (chat dicts: ``role``,
    ``content`` and optionally ``name``, ``tool_calls``, ``tool_call_id``; other keys are
    ignored). The summary must satisfy ``count_tokens(text) <= max_tokens``, a positive
    integer (else :class:`~convstate.errors.InvalidLimitError`).
    """

    previous_summary: str | None
    messages: Sequence[Mapping[str, Any]]
    max_tokens: int
    count_tokens: Callable[[str], int] = field(repr=False)
    session_id: str = ""

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise InvalidLimitError(
                f"SummaryRequest.max_tokens must be a positive integer, got {self.max_tokens!r}"
            )


@dataclass(frozen=True)
class Summary:
    """A summary and what made it.

    ``model`` is ``"extractive"`` or the model name the API reported; ``input_tokens`` and
    ``output_tokens`` are the API's usage figures when it reported them.
    """

    text: str
    model: str
    input_tokens: int | None = None
    output_tokens: int | None = None


@runtime_checkable
class Summarizer(Protocol):
    """Anything that turns a :class:`SummaryRequest` into a :class:`Summary`.

    Implementations must return text within ``request.max_tokens`` (by
    ``request.count_tokens``) and raise :class:`SummarizerError` for every failure.
    """

    name: str

    async def summarize(self, request: SummaryRequest) -> Summary:
        """Summarize ``request.previous_summary`` plus ``request.messages``."""
        ...


# -- shared helpers -----------------------------------------------------------------------------


def truncate_to_tokens(text: str, max_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """The longest prefix of ``text`` with ``count_tokens(prefix) <= max_tokens``.

    ``text`` itself if it fits. Otherwise a binary search on the number of characters (about
    ``log2(len(text))`` calls of ``count_tokens``); the cut is moved back to a word boundary
    when that still fits and loses at most a fifth of the kept text. Trailing whitespace is
    dropped. Returns ``""`` if nothing fits.
    """
    if max_tokens <= 0 or not text:
        return ""
    if count_tokens(text) <= max_tokens:
        return text
    lo, hi = 0, len(text)  # invariant: text[:lo] fits (or lo == 0), text[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(text[:mid]) <= max_tokens:
            lo = mid
        else:
            hi = mid
    best = text[:lo]
    space = max(best.rfind(" "), best.rfind("\n"))
    if space >= 0 and space >= lo * 0.8:
        candidate = best[:space].rstrip()
        if candidate and count_tokens(candidate) <= max_tokens:
            return candidate
    stripped = best.rstrip()
    if count_tokens(stripped) <= max_tokens:
        return stripped
    return best if count_tokens(best) <= max_tokens else ""


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def _shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (at a word boundary when close) with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space >= limit * 0.6:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def _content_text(content: Any) -> str:
    """The text of a message's content: strings as-is, text parts joined, others as tags."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        pieces: list[str] = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, Mapping):
                if part.get("type") == "text" or (
                    "text" in part and isinstance(part.get("text"), str)
                ):
                    pieces.append(str(part.get("text") or ""))
                else:
                    pieces.append(f"[{part.get('type') or 'attachment'}]")
            else:
                pieces.append(_compact_json(part))
        return "\n".join(p for p in pieces if p)
    return _compact_json(content)


def _tool_call_parts(call: Any) -> tuple[str, str]:
    """(function name, arguments string) of a tool call in any reasonable shape."""
    if not isinstance(call, Mapping):
        return "tool", _compact_json(call)
    function = call.get("function")
    if isinstance(function, Mapping):
        name = str(function.get("name") or "tool")
        args = function.get("arguments")
    else:
        name = str(call.get("name") or call.get("type") or "tool")
        args = call.get("arguments", call.get("input"))
    if args is None:
        return name, ""
    return name, args if isinstance(args, str) else _compact_json(args)


def _short_args(arguments: str, *, value_limit: int = 40, total_limit: int = 120) -> str:
    """Tool-call arguments as ``k="v", n=3``, each value and the whole capped in length."""
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return _shorten(arguments, total_limit)
    if isinstance(parsed, Mapping):
        rendered = ", ".join(
            f"{key}={_shorten(_compact_json(value), value_limit)}" for key, value in parsed.items()
        )
    else:
        rendered = _shorten(_compact_json(parsed), total_limit)
    return _shorten(rendered, total_limit)


def _tool_names(messages: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """tool_call_id -> function name, from the tool calls among ``messages``."""
    names: dict[str, str] = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            if isinstance(call, Mapping) and isinstance(call.get("id"), str):
                names[call["id"]] = _tool_call_parts(call)[0]
    return names


def _label(message: Mapping[str, Any], tool_names: Mapping[str, str] | None = None) -> str:
    """``role`` or ``role (name)``; a tool result is named after its call's function."""
    role = str(message.get("role") or "unknown")
    name = message.get("name")
    if not (isinstance(name, str) and name) and tool_names:
        name = tool_names.get(str(message.get("tool_call_id")))
    return f"{role} ({name})" if isinstance(name, str) and name else role


def render_transcript(
    messages: Sequence[Mapping[str, Any]],
    *,
    max_tool_result_chars: int = 2000,
    max_arguments_chars: int = 500,
) -> str:
    """Render chat records as a plain-text transcript, one message per block.

    ``role: content`` (``role (name): content`` when the message has a ``name``); continuation
    lines of multi-line content are indented. Tool calls render as
    ``assistant -> tool call get_weather({"city":"Kyoto"})`` (arguments cut to
    ``max_arguments_chars``), tool results as ``tool result [get_weather]: ...`` (cut to
    ``max_tool_result_chars``). Non-text content parts render as ``[image_url]`` and the like.
    """
    lines: list[str] = []
    tool_names = _tool_names(messages)
    for message in messages:
        label = _label(message)
        role = str(message.get("role") or "unknown")
        text = _content_text(message.get("content")).strip()
        if role in ("tool", "function"):
            call_id = message.get("tool_call_id")
            tag = message.get("name") or tool_names.get(str(call_id)) or call_id or ""
            head = f"tool result [{tag}]" if tag else "tool result"
            if len(text) > max_tool_result_chars:
                text = text[: max_tool_result_chars - 1].rstrip() + "…"
            lines.append(_block(head, text))
        elif text:
            lines.append(_block(label, text))
        for call in message.get("tool_calls") or ():
            name, args = _tool_call_parts(call)
            args = " ".join(args.split())
            if len(args) > max_arguments_chars:
                args = args[: max_arguments_chars - 1] + "…"
            lines.append(f"{role} -> tool call {name}({args})")
    return "\n".join(lines)


def _block(head: str, text: str) -> str:
    if not text:
        return f"{head}: (empty)"
    first, *rest = text.splitlines() or [""]
    return "\n".join([f"{head}: {first}", *(f"  {line}" for line in rest)])


# -- extractive ---------------------------------------------------------------------------------

_HEADER = "Conversation summary (extractive):"

# Sentence boundaries: after . ! ? (and closing quotes/brackets) followed by whitespace, and at
# line breaks. A boundary after a known abbreviation or a single initial is not one.
_BOUNDARY = re.compile(r"(?<=[.!?…])([\"'”\u2019)\]]*)\s+|\s*\n\s*")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e eg ie inc ltd co corp approx no dept est "
    "fig jan feb mar apr jun jul aug sep sept oct nov dec mt ave blvd rd".split()
)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•·]|\d{1,3}[.)])\s+")
_WORD = re.compile(r"[^\W\d_][\w'\u2019\-]*")
_NOT_NAMES = frozenset("i i'm i'll i've i'd ok okay hi hello hey thanks yes no".split())
# Features are looked up on the sentence's lower-cased words (apostrophes normalized) and, for
# digits, with small regexes that only run when the sentence has a digit: fast, no backtracking.
_DIGIT = re.compile(r"\d")
_DIGITS = re.compile(r"\d+(?:[.,:/-]\d+)*")
_DIGIT_DATE_TIME_MONEY = re.compile(
    r"[$€£¥₹]\s?\d|\d\s?(?:usd|eur|gbp|dollars?|euros?|pounds?|yen|k)\b"
    r"|\d{4}-\d{2}-\d{2}|\b\d{1,2}/\d{1,2}\b|\b\d{1,2}:\d{2}\b"
    r"|\b\d{1,2}\s?(?:am|pm)\b|\b\d{1,2}(?:st|nd|rd|th)\b"
    r"|\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+\d{1,2}\b"
)
_NUMBER_WORDS = frozenset(
    """one two three four five six seven eight nine ten eleven twelve fifteen twenty thirty
    forty fifty hundred thousand million billion dozen half twice""".split()
)
_DATE_WORDS = frozenset(
    """monday tuesday wednesday thursday friday saturday sunday tomorrow tonight today
    yesterday weekend deadline noon midnight january february march april june july august
    september october november december""".split()
)
_DATE_PHRASES = ("next week", "next month", "next year", "last week", "this week")
_DECISION_WORDS = frozenset(
    """decide decided decision decisions will won't shall let's agree agreed chose choose
    chosen book booked reserve reserved confirm confirmed settled picked schedule scheduled
    committed approve approved cancel cancelled canceled""".split()
)
_DECISION_PHRASES = (
    "let us",
    "going to",
    "plan to",
    "planned to",
    "settle on",
    "go with",
    "going with",
)
_PREFERENCE_WORDS = frozenset(
    """prefer prefers preferred preference preferences like likes love loves hate hates
    dislike dislikes allergic allergy allergies always never favorite favourite vegetarian
    vegan gluten avoid rather instead mustn't""".split()
)
_PREFERENCE_PHRASES = (
    "don't want",
    "do not want",
    "doesn't want",
    "can't stand",
    "must not",
    "only want",
    "would rather",
)
_FILLER_WORDS = frozenset(
    """hi hello hey there thanks thank you so much very ok okay k sure great cool nice awesome
    perfect got it sounds good no problem you're welcome bye goodbye good morning night
    afternoon evening have a day lol haha yes yep yeah nope alright all right hmm ah oh wow
    glad to help happy again anytime of course np ty thx cheers will do fine excellent
    understood noted right i see it's that's that is amazing wonderful fantastic""".split()
)
_FILLER_PHRASES = (
    "how can i help",
    "how can i assist",
    "anything else",
    "let me know if",
    "happy to help",
    "hope this helps",
    "hope that helps",
    "glad i could help",
    "glad to help",
    "feel free to",
    "is there anything",
)
_PREV_LINE = re.compile(
    r"^(?P<label>(?:user|assistant|system|developer|tool|function|summary)"
    r"(?: \([^)\n]{1,80}\))?): (?P<text>.*)$"
)
_TOOL_CALL_TEXT = re.compile(r"^called [\w.\-]+\(")
_SUMMARY_HEADER = re.compile(r"^\s*conversation summary\b[^\n]*:\s*$", re.IGNORECASE)

_MAX_SENTENCE_CHARS = 300
_MAX_TOOL_RESULT_CHARS = 200


@dataclass
class _Unit:
    """One candidate sentence of the summary."""

    position: int  # chronological order
    group: int  # units of one group (a message, a previous-summary line) share a bullet
    label: str
    text: str
    score: float = 0.0
    tokens: int = 0


def _split_sentences(text: str) -> list[str]:
    """Split text into sentences (see ``_BOUNDARY``), dropping list markers and blanks."""
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        end = match.start() + len(match.group(1) or "")  # closing quotes stay
        piece = text[start:end]
        if "\n" not in match.group():
            words = piece.split()
            last = words[-1].rstrip(".").lower() if words else ""
            if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
                continue  # "Dr. Tanaka", "J. Smith": not a boundary
        sentences.append(piece)
        start = match.end()
    sentences.append(text[start:])
    result: list[str] = []
    for sentence in sentences:
        sentence = _LIST_MARKER.sub("", sentence).strip()
        if sentence:
            result.append(sentence)
    return result


def _is_filler(sentence: str) -> bool:
    """Whether every word of the sentence is small talk ("Thanks, that's great!")."""
    words = [w.strip(".,!?;:-—()\"'…").lower().replace("\u2019", "'") for w in sentence.split()]
    return all(w in _FILLER_WORDS for w in words if w)


def _has_phrase(padded: str, phrases: Sequence[str]) -> bool:
    return any(f" {phrase} " in padded for phrase in phrases)


def _score_sentence(sentence: str, *, from_user: bool) -> float:
    """Feature score of one sentence (0 for filler; see :class:`ExtractiveSummarizer`)."""
    if _TOOL_CALL_TEXT.match(sentence):
        return 3.5
    text = sentence.replace("\u2019", "'")
    matches = list(_WORD.finditer(text))
    lowered = [m.group().lower() for m in matches]
    padded = f" {' '.join(lowered)} "
    names = {  # capitalized words but the first (and "I'm" & co), not after ". " or ": "
        low
        for i, (m, low) in enumerate(zip(matches, lowered, strict=True))
        if i > 0
        and m.group()[0].isupper()
        and low not in _NOT_NAMES
        and text[max(0, m.start() - 2) : m.start()].strip() not in (".", "!", "?", ":")
    }
    has_digit = _DIGIT.search(text) is not None
    if not has_digit and (_is_filler(text) or (_has_phrase(padded, _FILLER_PHRASES) and not names)):
        return 0.0
    vocabulary = set(lowered)
    numbers = len(vocabulary & _NUMBER_WORDS)
    special = not vocabulary.isdisjoint(_DATE_WORDS) or _has_phrase(padded, _DATE_PHRASES)
    if has_digit:
        numbers += len(_DIGITS.findall(text))
        special = special or _DIGIT_DATE_TIME_MONEY.search(text.lower()) is not None
    decision = (
        not vocabulary.isdisjoint(_DECISION_WORDS)
        or "'ll " in padded
        or _has_phrase(padded, _DECISION_PHRASES)
    )
    preference = not vocabulary.isdisjoint(_PREFERENCE_WORDS) or _has_phrase(
        padded, _PREFERENCE_PHRASES
    )
    question = text.rstrip("\"')]\u201d ").endswith("?")
    score = 0.2  # any content
    score += 1.5 * min(len(names), 2)
    score += 1.5 * min(numbers, 2) + (1.0 if special else 0.0)
    score += 3.0 if decision else 0.0
    score += 3.5 if preference else 0.0
    score += 2.5 if question else 0.0
    score += 1.0 if from_user else 0.0
    return score


class ExtractiveSummarizer:
    """Offline, deterministic summaries made of the conversation's most informative sentences.

    Algorithm:

    1. **Candidates.** The previous summary's lines are rolled in first: the header is
       dropped, bullets keep their ``role: `` label (other lines, e.g. an LLM's prose, get
       ``summary: ``) and are split into sentences. Then every folded message's content is
       split into sentences (at ``.``/``!``/``?`` + space and at line breaks, not after
       abbreviations such as ``Dr.``), each labelled by its role and ``name``; overlong
       sentences are cut to 300 characters. Each tool call becomes a sentence
       ``called fn(arg="v", n=3)`` (values and argument list shortened); a JSON tool result
       becomes one sentence of compact JSON cut to 200 characters. Repeated sentences keep
       only their latest occurrence.
    2. **Scores.** A sentence scores by its features: capitalized words not at the start of
       the sentence (names, places; +1.5 each, up to 3) and the message's ``name``; numbers
       (money, dates, times, quantities, number words; +1.5 each, up to 3, +1 for a date,
       time or amount); decisions (``decided``, ``will``, ``'ll``, ``let's``, ``agreed``,
       ``chose``, ``booked``, ...; +2.5); questions (ending in ``?``; +2); preferences
       (``prefer``, ``like``, ``love``, ``hate``, ``don't want``, ``allergic``, ``always``,
       ``never``, ...; +2); tool calls score 3.5; user sentences +0.3; any other content 0.2.
       Recency adds up to 1 (linearly, oldest 0, newest 1); rolled-in sentences get +0.5 for
       having survived an earlier summary. Pure filler (greetings, thanks, "ok", "how can I
       help", ...) without names or numbers scores 0 and is never kept.
    3. **Selection.** Sentences are taken greedily by score (ties: the newer first) while the
       estimated token count (header + each kept bullet's label + each sentence, counted
       separately with ``count_tokens``) stays within ``max_tokens``; a sentence that does not
       fit is skipped and smaller ones are still tried.
    4. **Rendering.** The kept sentences are written in chronological order under the header
       ``Conversation summary (extractive):``, one bullet per message, ``- user: ...``. The
       text is then counted exactly; while it is over budget the most recently accepted
       (least valuable) sentence is dropped, and as a last resort the text is cut by tokens
       (:func:`truncate_to_tokens`), so ``count_tokens(text) <= max_tokens`` always holds.

    The same request always yields the same text. Cost: one ``count_tokens`` call per
    sentence plus a few on the result (about 10 ms for 10k tokens of input with tiktoken).
    """

    name: str = "extractive"

    def __init__(self, *, header: str = _HEADER) -> None:
        self.header = header

    def __repr__(self) -> str:
        return "ExtractiveSummarizer()"

    async def summarize(self, request: SummaryRequest) -> Summary:
        """Summarize the request in a worker thread (CPU only; see :meth:`summarize_sync`),
        so a large fold never blocks the event loop. ``request.count_tokens`` is called from
        that thread (tiktoken's counters are thread-safe)."""
        return await asyncio.to_thread(self.summarize_sync, request)

    def summarize_sync(self, request: SummaryRequest) -> Summary:
        """The synchronous implementation of :meth:`summarize`."""
        try:
            text = self._build(request)
        except ConvstateError:
            raise
        except Exception as exc:  # a counter failing, a malformed record, ...
            raise SummarizerError(
                f"extractive summary of session {request.session_id!r} failed: "
                f"{exc.__class__.__name__}: {exc}"
            ) from exc
        return Summary(text=text, model=self.name)

    # -- steps ---------------------------------------------------------------------------------

    def _candidates(self, request: SummaryRequest) -> list[_Unit]:
        units: list[_Unit] = []
        group = 0
        previous_groups = 0
        if request.previous_summary:
            for line in request.previous_summary.splitlines():
                if not line.strip() or line.strip() == self.header or _SUMMARY_HEADER.match(line):
                    continue
                line = _LIST_MARKER.sub("", line).strip()
                match = _PREV_LINE.match(line)
                label, text = (match["label"], match["text"]) if match else ("summary", line)
                group += 1
                for sentence in _split_sentences(text):
                    units.append(_Unit(len(units), group, label, sentence))
            previous_groups = group
        tool_names = _tool_names(request.messages)
        for message in request.messages:
            group += 1
            label = _label(message, tool_names)
            role = str(message.get("role") or "")
            text = _content_text(message.get("content")).strip()
            if role in ("tool", "function") and text[:1] in ("{", "["):
                try:
                    text = _compact_json(json.loads(text))
                except ValueError:
                    pass
                units.append(_Unit(len(units), group, label, _shorten(text, 200)))
            else:
                for sentence in _split_sentences(text):
                    units.append(
                        _Unit(len(units), group, label, _shorten(sentence, _MAX_SENTENCE_CHARS))
                    )
            for call in message.get("tool_calls") or ():
                fn, args = _tool_call_parts(call)
                units.append(_Unit(len(units), group, label, f"called {fn}({_short_args(args)})."))
        # Score; mark rolled-in units by group number.
        last = max(len(units) - 1, 1)
        for unit in units:
            base = _score_sentence(unit.text, from_user=unit.label.startswith("user"))
            if base <= 0.0:
                unit.score = 0.0
                continue
            if "(" in unit.label and not unit.label.startswith("summary"):
                base += 0.5  # a message `name` is a name too
            if unit.label.startswith(("tool", "function")) and not _TOOL_CALL_TEXT.match(unit.text):
                base *= 0.5  # raw tool output: what matters of it is usually restated
            if unit.group <= previous_groups:
                base += 0.5
            unit.score = base + unit.position / last
        # Drop repeats (keep the latest) and filler.
        latest: dict[str, int] = {}
        for unit in units:
            latest[" ".join(unit.text.lower().split())] = unit.position
        return [
            u
            for u in units
            if u.score > 0.0 and latest[" ".join(u.text.lower().split())] == u.position
        ]

    def _render(self, units: Sequence[_Unit]) -> str:
        lines = [self.header]
        current: int | None = None
        for unit in sorted(units, key=lambda u: u.position):
            if unit.group != current:
                lines.append(f"- {unit.label}: {unit.text}")
                current = unit.group
            else:
                lines[-1] += f" {unit.text}"
        return "\n".join(lines)

    def _build(self, request: SummaryRequest) -> str:
        count = request.count_tokens
        budget = request.max_tokens
        header_tokens = count(self.header)
        if header_tokens > budget:
            return truncate_to_tokens(self.header, budget, count)
        candidates = self._candidates(request)
        label_cost: dict[str, int] = {}
        used_groups: set[int] = set()
        accepted: list[_Unit] = []
        estimate = header_tokens
        for unit in sorted(candidates, key=lambda u: (-u.score, -u.position)):
            if estimate >= budget:
                break
            unit.tokens = count(" " + unit.text)
            extra = unit.tokens
            if unit.group not in used_groups:
                if unit.label not in label_cost:
                    label_cost[unit.label] = count(f"\n- {unit.label}:")
                extra += label_cost[unit.label]
            if estimate + extra <= budget:
                accepted.append(unit)
                used_groups.add(unit.group)
                estimate += extra
        text = self._render(accepted)
        for _ in range(32):  # token counts are not exactly additive: verify, trim
            if count(text) <= budget:
                return text
            if not accepted:
                break
            accepted.pop()
            text = self._render(accepted)
        return truncate_to_tokens(text, budget, count)


# -- OpenAI-compatible --------------------------------------------------------------------------

#: System prompt of :class:`OpenAISummarizer`; ``{max_tokens}`` is filled in per request.
SUMMARY_SYSTEM_PROMPT = """\
You maintain the rolling summary of a long conversation between a user and an AI assistant. \
The summary replaces the older part of the conversation in the assistant's context, so \
anything it leaves out is forgotten.

You get the previous summary (or "none") and the messages that came after it. Write the new \
summary: the previous summary updated with the new messages, as one self-contained text.

Keep:
- facts about the user and their situation, names of people, places, products and things;
- numbers exactly as written: amounts, prices, dates, times, quantities, identifiers;
- decisions made and what was agreed, chosen, booked or done (including tool calls and their \
results that matter);
- the user's preferences, constraints and dislikes (e.g. allergies, budgets, "never ...");
- open tasks, promises and unanswered questions.

Drop greetings, thanks, small talk, filler and repetition. When a newer message contradicts \
the previous summary, keep the newer fact. Write in the third person ("The user ...", "The \
assistant ..."), concisely, in short sentences or bullet points, in the conversation's \
language. Do not add anything that is not in the input and do not address the user. Reply \
with the summary only, under {max_tokens} tokens."""

_USER_TEMPLATE = """\
Previous summary:
{previous}

New messages (oldest first):
{transcript}

Write the updated summary (under {max_tokens} tokens)."""


def _import_openai() -> Any:
    try:
        import openai
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            "OpenAISummarizer needs the openai package: pip install 'convstate[openai]' "
            "(or pip install openai)"
        ) from exc
    return openai


class OpenAISummarizer:
    """Summaries from an OpenAI-compatible chat-completions endpoint (official ``openai`` SDK).

    Works with OpenAI and with compatible servers (vLLM, Ollama, LiteLLM, llama.cpp, Azure
    via ``base_url``, ...). The API key comes from ``api_key`` or else the environment
    variable named by ``api_key_env`` (``OPENAI_API_KEY``); if neither is set,
    :class:`~convstate.errors.ConfigurationError` names the variable. For a local server
    that needs no key pass any string, e.g. ``api_key="unused"``. Pass ``client`` to use an
    ``openai.AsyncOpenAI`` you configured yourself (then ``base_url``, ``api_key``,
    ``timeout`` and ``max_retries`` are the client's, no key is looked up and :meth:`aclose`
    leaves that client open).

    Each :meth:`summarize` sends one request: :data:`SUMMARY_SYSTEM_PROMPT` and a user
    message with the previous summary and :func:`render_transcript` of the messages, with
    ``temperature`` and ``max_tokens=request.max_tokens``. The SDK retries timeouts,
    connection errors, 408/409/429 and 5xx up to ``max_retries`` times; ``timeout`` (seconds)
    bounds each attempt. A reply over budget by ``request.count_tokens`` is cut to fit. Any
    failure, and an empty reply, raise :class:`SummarizerError` (never containing the key).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        timeout: float = 60.0,
        max_retries: int = 2,
        temperature: float = 0.0,
        client: openai.AsyncOpenAI | None = None,
        system_prompt: str = SUMMARY_SYSTEM_PROMPT,
    ) -> None:
        if not model:
            raise ConfigurationError("OpenAISummarizer needs a model name")
        if timeout <= 0:
            raise ConfigurationError(f"timeout must be positive, got {timeout!r}")
        if max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0, got {max_retries!r}")
        self._openai = _import_openai()
        self.model = model
        self.name = f"openai:{model}"
        self.temperature = temperature
        self.system_prompt = system_prompt
        self._api_key_env = api_key_env
        if client is not None and (base_url is not None or api_key is not None):
            raise ConfigurationError(
                "pass either client= or base_url=/api_key= to OpenAISummarizer, not both "
                "(configure the client you pass instead)"
            )
        self._owns_client = client is None
        if client is None:
            key = api_key if api_key is not None else os.environ.get(api_key_env)
            if not key:
                raise ConfigurationError(
                    f"OpenAISummarizer has no API key: set the {api_key_env} environment "
                    f"variable or pass api_key= (any string for a server that needs none)"
                )
            self._secret = key
            client = self._openai.AsyncOpenAI(
                base_url=base_url,
                api_key=key,
                timeout=timeout,
                max_retries=max_retries,
            )
        else:
            self._secret = str(getattr(client, "api_key", "") or "")
        self._client: openai.AsyncOpenAI = client
        self.base_url = str(client.base_url)

    def __repr__(self) -> str:
        return f"OpenAISummarizer(model={self.model!r}, base_url={self.base_url!r})"

    async def aclose(self) -> None:
        """Close the HTTP client (unless it was passed in as ``client``)."""
        if self._owns_client:
            await self._client.close()

    async def __aenter__(self) -> OpenAISummarizer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def build_messages(self, request: SummaryRequest) -> list[ChatCompletionMessageParam]:
        """The chat messages sent for ``request`` (system prompt + previous summary and
        transcript)."""
        previous = (request.previous_summary or "").strip() or "none"
        transcript = render_transcript(request.messages) or "(no messages)"
        return [
            {
                "role": "system",
                "content": self.system_prompt.format(max_tokens=request.max_tokens),
            },
            {
                "role": "user",
                "content": _USER_TEMPLATE.format(
                    previous=previous, transcript=transcript, max_tokens=request.max_tokens
                ),
            },
        ]

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _error(self, request: SummaryRequest, exc: BaseException) -> SummarizerError:
        oa = self._openai
        where = f"{self.name} at {self.base_url}"
        status: int | None = getattr(exc, "status_code", None)
        retryable = False
        if isinstance(exc, oa.APITimeoutError):
            hint = "the endpoint did not answer in time; raise timeout= or check the server"
            retryable = True
        elif isinstance(exc, oa.APIConnectionError):
            hint = "could not connect; check base_url and that the server is reachable"
            retryable = True
        elif isinstance(exc, oa.AuthenticationError):
            hint = f"the API key was rejected; check {self._api_key_env} or api_key="
        elif isinstance(exc, oa.PermissionDeniedError):
            hint = "the API key may not use this model or endpoint"
        elif isinstance(exc, oa.NotFoundError):
            hint = "check the model name and base_url (it usually ends in /v1)"
        elif isinstance(exc, oa.RateLimitError):
            hint = "rate limited or out of quota; retry later or raise max_retries="
            retryable = True
        elif isinstance(exc, oa.APIStatusError):
            retryable = status is not None and (status >= 500 or status in (408, 409))
            hint = (
                "the server failed; retry later"
                if retryable
                else "the server rejected the request; check the model and its parameters"
            )
        elif isinstance(exc, oa.OpenAIError):
            hint = "the openai SDK failed; see the cause"
        else:
            hint = "unexpected failure; see the cause"
        session = f" for session {request.session_id!r}" if request.session_id else ""
        detail = self._redact(f"{exc.__class__.__name__}: {exc}")
        return SummarizerError(
            f"summary request to {where}{session} failed ({detail}): {hint}",
            retryable=retryable,
            status_code=status,
        )

    async def summarize(self, request: SummaryRequest) -> Summary:
        """Ask the model for the new rolling summary; see the class docs."""
        try:
            completion = await self._client.chat.completions.create(
                model=self.model,
                messages=self.build_messages(request),
                temperature=self.temperature,
                max_tokens=request.max_tokens,
            )
        except Exception as exc:  # OpenAIError and anything else the SDK lets through
            raise self._error(request, exc) from exc
        choice = completion.choices[0] if completion.choices else None
        content = choice.message.content if choice is not None else None
        text = (content or "").strip()
        if not text:
            reason = choice.finish_reason if choice is not None else "no choices"
            refusal = getattr(choice.message, "refusal", None) if choice is not None else None
            raise SummarizerError(
                f"{self.name} at {self.base_url} returned an empty summary "
                f"(finish_reason={reason!r}{', refusal=' + repr(refusal) if refusal else ''}); "
                "retry, or check that the model follows chat instructions",
                retryable=True,
            )
        if request.count_tokens(text) > request.max_tokens:
            text = truncate_to_tokens(text, request.max_tokens, request.count_tokens)
        usage = completion.usage
        return Summary(
            text=text,
            model=completion.model or self.model,
            input_tokens=usage.prompt_tokens if usage is not None else None,
            output_tokens=usage.completion_tokens if usage is not None else None,
        )
