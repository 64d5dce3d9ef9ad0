"""LangChain chat history backed by convstate: :class:`ConvstateChatMessageHistory`.

Needs ``langchain-core`` (``pip install 'convstate[langchain]'``). Apps using
``RunnableWithMessageHistory`` switch with one line, the history factory::

    from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
    from langchain_core.runnables.history import RunnableWithMessageHistory

    from convstate import ConversationStore
    from convstate.adapters.langchain import ConvstateChatMessageHistory

    store = ConversationStore.from_url("redis://localhost:6379/0",
                                       token_limit=8_000, model="gpt-4o")
    prompt = ChatPromptTemplate.from_messages([
        ("system", "You are a helpful assistant."),
        MessagesPlaceholder("history"),
        ("human", "{question}"),
    ])
    chat = RunnableWithMessageHistory(
        prompt | model,
        lambda session_id: ConvstateChatMessageHistory(session_id, store),  # <- the one line
        input_messages_key="question",
        history_messages_key="history",
    )
    chat.invoke({"question": "Plan a trip to Kyoto."},
                config={"configurable": {"session_id": "chat-42"}})

Every instance of every app process then shares the session in Redis: each turn is read in
one round trip and stored in one atomic ``append_many`` (the question and the answer
together), with the session's exact token total kept by convstate and long sessions
compacted by ``convstate daemon``.

**In-budget windows.** By default :attr:`~ConvstateChatMessageHistory.messages` is the whole
stored history (after a compaction: the system message(s), the rolling summary and the turns
kept verbatim). Pass ``budget=`` to read ``store.get_context(session_id, budget)`` instead,
so the chain always sends a window that fits::

    lambda session_id: ConvstateChatMessageHistory(session_id, store, budget=4_000)

The window holds the session's system message(s) and summary and the newest messages that fit
``budget`` tokens (reply priming included), never starting with a tool result cut off from
its call. Windowed messages carry no ``id``. The budget counts only what is stored, not the
prompt template's own messages or the new question: leave room for them.

**Async.** Pass ``async_store=`` (an :class:`~convstate.AsyncConversationStore`) and the async
methods (``aget_messages``, ``aadd_messages``, ``aclear``, used by ``ainvoke`` /
``astream``) run on it natively; without one they run the sync methods in a thread, as
LangChain's default does. An async-only app can pass the async store as ``store``.

**Messages** map to convstate's OpenAI chat dicts: ``SystemMessage`` -> ``system`` (or
``developer`` when ``additional_kwargs["__openai_role__"] == "developer"``, as
``langchain-openai`` marks it), ``HumanMessage`` -> ``user``, ``AIMessage`` -> ``assistant``
with ``tool_calls`` in OpenAI's format (arguments as a JSON string; invalid tool calls keep
their raw arguments and come back as invalid), ``ToolMessage`` -> ``tool`` (with
``tool_call_id``; an ``error`` status is kept), ``FunctionMessage`` -> ``function``,
``ChatMessage`` -> its role (``human``/``ai`` mapped to ``user``/``assistant``). Content
(strings or lists of content blocks), ``name`` and ``additional_kwargs`` (JSON values) are
stored as they are and read back equal. **Ids**: a message read back has the ``id`` it was
added with, and none if it was added without one (``history.messages == what_you_added``).
A message's ``id`` (up to 128 characters) is also convstate's message id, the idempotency
key: adding a message whose id is already stored is a no-op, so a retried ``add_messages``
never stores twice. A message added without one gets convstate's generated id for that
(kept internally, not shown as ``message.id``). The LangChain-only fields live in the record's
``langchain`` field; messages other convstate clients appended (without it) read back with
their stored id. Not stored: ``response_metadata``, ``usage_metadata`` and tool artifacts. A
compaction summary reads back as a ``SystemMessage`` whose
``response_metadata["convstate_kind"]`` is ``"summary"``.

**Missing sessions.** With ``create=True`` (the default) a missing session reads as an empty
history and the first ``add_messages`` creates it with the store's defaults (token limit,
TTL). With ``create=False`` reads and writes of a missing (or expired) session raise
:class:`~convstate.errors.SessionNotFoundError`: create sessions yourself with
``store.create_session(session_id, system=..., token_limit=...)``. ``clear()`` deletes the
whole session (its system message(s), context and limit included); with ``create=True`` the
next ``add_messages`` starts a fresh one. A session that lost some of its keys to eviction
(``maxmemory-policy`` other than ``noeviction``) is neither missing nor empty: reads (whole or
``budget`` window, sync or async) and adds raise
:class:`~convstate.errors.SessionCorruptedError` naming the missing key, with either ``create``.

Note: ``langchain-core`` 1.x marks ``BaseChatMessageHistory`` and
``RunnableWithMessageHistory`` as deprecated in favour of LangGraph persistence; they still
work, and this adapter works on langchain-core 0.3 and 1.x alike.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

try:
    from langchain_core.chat_history import BaseChatMessageHistory
    from langchain_core.messages import (
        AIMessage,
        BaseMessage,
        ChatMessage,
        FunctionMessage,
        HumanMessage,
        InvalidToolCall,
        SystemMessage,
        ToolCall,
        ToolMessage,
    )
    from langchain_core.messages.tool import invalid_tool_call, tool_call
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "convstate.adapters.langchain needs langchain-core: pip install 'convstate[langchain]'"
    ) from exc

from convstate.client import AsyncConversationStore, ConversationStore
from convstate.errors import ConfigurationError, InvalidMessageError, SessionNotFoundError
from convstate.keys import validate_session_id
from convstate.operations import MAX_MESSAGE_ID_LENGTH, check_positive_int
from convstate.planner import SUMMARY_KIND

__all__ = [
    "ConvstateChatMessageHistory",
    "message_to_record",
    "record_to_message",
]

#: ``response_metadata`` key marking a message that is convstate's compaction summary.
KIND_METADATA_KEY = "convstate_kind"
#: Field of a stored record holding what only LangChain has: the message's own ``id`` (absent
#: when it was added without one) and its ``additional_kwargs``.
LANGCHAIN_FIELD = "langchain"
_OPENAI_ROLE_KEY = "__openai_role__"
_CHAT_ROLES = {"human": "user", "ai": "assistant"}


# -- conversion --------------------------------------------------------------------------------


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex}"


def _openai_tool_calls(message: AIMessage) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    for call in message.tool_calls:
        try:
            arguments = json.dumps(call["args"], ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise InvalidMessageError(
                f"the arguments of tool call {call.get('id')!r} are not JSON-serializable: {exc}"
            ) from exc
        calls.append(
            {
                "id": call.get("id") or _new_call_id(),
                "type": "function",
                "function": {"name": call["name"], "arguments": arguments},
            }
        )
    for bad in message.invalid_tool_calls:
        calls.append(
            {
                "id": bad.get("id") or _new_call_id(),
                "type": "function",
                "function": {"name": bad.get("name") or "", "arguments": bad.get("args") or ""},
            }
        )
    return calls


def _langchain_tool_calls(
    calls: Sequence[Mapping[str, Any]],
) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    good: list[ToolCall] = []
    bad: list[InvalidToolCall] = []
    for call in calls:
        function = call.get("function")
        function = function if isinstance(function, Mapping) else {}
        call_id = call.get("id")
        call_id = call_id if isinstance(call_id, str) else None
        name = function.get("name")
        name = name if isinstance(name, str) else ""
        raw = function.get("arguments")
        if raw is None or raw == "":
            good.append(tool_call(name=name, args={}, id=call_id))
            continue
        if not isinstance(raw, str):
            raw = json.dumps(raw, ensure_ascii=False)
        try:
            args = json.loads(raw)
        except ValueError as exc:
            bad.append(
                invalid_tool_call(
                    name=name, args=raw, id=call_id, error=f"arguments are not valid JSON: {exc}"
                )
            )
            continue
        if isinstance(args, dict):
            good.append(tool_call(name=name, args=args, id=call_id))
        else:
            bad.append(
                invalid_tool_call(
                    name=name, args=raw, id=call_id, error="arguments are not a JSON object"
                )
            )
    return good, bad


def message_to_record(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message -> the OpenAI chat dict convstate stores (see the module docs)."""
    if isinstance(message, SystemMessage):
        developer = message.additional_kwargs.get(_OPENAI_ROLE_KEY) == "developer"
        role = "developer" if developer else "system"
    elif isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        role = "assistant"
    elif isinstance(message, ToolMessage):
        role = "tool"
    elif isinstance(message, FunctionMessage):
        role = "function"
    elif isinstance(message, ChatMessage):
        role = _CHAT_ROLES.get(message.role, message.role)
    else:
        raise InvalidMessageError(
            f"cannot store a {type(message).__name__}: use System/Human/AI/Tool/Function/Chat "
            f"messages"
        )
    record: dict[str, Any] = {"role": role, "content": message.content}
    if message.name is not None:
        record["name"] = message.name
    langchain: dict[str, Any] = {}
    if message.id is not None:
        langchain["id"] = message.id
        if isinstance(message.id, str) and 0 < len(message.id) <= MAX_MESSAGE_ID_LENGTH:
            record["id"] = message.id  # convstate's idempotency key
    if message.additional_kwargs:
        langchain["additional_kwargs"] = dict(message.additional_kwargs)
    record[LANGCHAIN_FIELD] = langchain
    if isinstance(message, AIMessage) and (message.tool_calls or message.invalid_tool_calls):
        record["tool_calls"] = _openai_tool_calls(message)
    elif isinstance(message, ToolMessage):
        record["tool_call_id"] = message.tool_call_id
        if message.status != "success":
            record["status"] = message.status
    return record


def record_to_message(record: Mapping[str, Any]) -> BaseMessage:
    """A stored convstate record (or a ``get_context`` message) -> a LangChain message."""
    role = record.get("role")
    content = record.get("content")
    if content is None:
        content = ""
    common: dict[str, Any] = {}
    langchain = record.get(LANGCHAIN_FIELD)
    if isinstance(langchain, Mapping):  # stored by this adapter: its own id, if it had one
        if isinstance(langchain.get("id"), str):
            common["id"] = langchain["id"]
        kwargs = langchain.get("additional_kwargs")
        if isinstance(kwargs, Mapping) and kwargs:
            common["additional_kwargs"] = dict(kwargs)
    elif isinstance(record.get("id"), str):  # appended by another client
        common["id"] = record["id"]
    if isinstance(record.get("name"), str):
        common["name"] = record["name"]
    if record.get("kind") == SUMMARY_KIND:
        return SystemMessage(
            content=content, response_metadata={KIND_METADATA_KEY: SUMMARY_KIND}, **common
        )
    if role == "system":
        return SystemMessage(content=content, **common)
    if role == "developer":
        kwargs = {**common.pop("additional_kwargs", {}), _OPENAI_ROLE_KEY: "developer"}
        return SystemMessage(content=content, additional_kwargs=kwargs, **common)
    if role == "user":
        return HumanMessage(content=content, **common)
    if role == "assistant":
        good, bad = _langchain_tool_calls(record.get("tool_calls") or [])
        return AIMessage(content=content, tool_calls=good, invalid_tool_calls=bad, **common)
    if role == "tool":
        status = "error" if record.get("status") == "error" else "success"
        return ToolMessage(
            content=content, tool_call_id=str(record.get("tool_call_id")), status=status, **common
        )
    if role == "function":
        common.setdefault("name", "")
        return FunctionMessage(content=content, **common)
    return ChatMessage(role=str(role), content=content, **common)


# -- the history -------------------------------------------------------------------------------


class ConvstateChatMessageHistory(BaseChatMessageHistory):
    """A LangChain chat history kept in a convstate session (see the module docs).

    Args:
        session_id: the convstate session.
        store: a :class:`~convstate.ConversationStore` for the sync methods (or an
            :class:`~convstate.AsyncConversationStore` for an async-only history).
        async_store: an :class:`~convstate.AsyncConversationStore` for the async methods;
            without one they run the sync methods in a thread.
        create: a missing session reads as empty and is created by the first add (True), or
            raises :class:`~convstate.errors.SessionNotFoundError` (False).
        budget: if given, :attr:`messages` is ``get_context(session_id, budget)``, the in-budget
            window, instead of the whole history.
    """

    def __init__(
        self,
        session_id: str,
        store: ConversationStore | AsyncConversationStore,
        *,
        async_store: AsyncConversationStore | None = None,
        create: bool = True,
        budget: int | None = None,
    ) -> None:
        super().__init__()
        self.session_id = validate_session_id(session_id)
        self.store: ConversationStore | None
        if isinstance(store, AsyncConversationStore):
            if async_store is not None:
                raise ConfigurationError(
                    "store is an AsyncConversationStore already; pass a ConversationStore as "
                    "store and the AsyncConversationStore as async_store"
                )
            self.store, async_store = None, store
        elif isinstance(store, ConversationStore):
            self.store = store
        else:
            raise ConfigurationError(
                f"store must be a ConversationStore or an AsyncConversationStore, "
                f"not {type(store).__name__}"
            )
        if async_store is not None and not isinstance(async_store, AsyncConversationStore):
            raise ConfigurationError(
                f"async_store must be an AsyncConversationStore, not {type(async_store).__name__}"
            )
        self.async_store = async_store
        self.create = create
        self.budget = None if budget is None else check_positive_int(budget, "budget")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(session_id={self.session_id!r}, budget={self.budget!r}, "
            f"create={self.create!r})"
        )

    def _sync_store(self) -> ConversationStore:
        if self.store is None:
            raise ConfigurationError(
                "this history has only an AsyncConversationStore: use the async methods "
                "(aget_messages, aadd_messages, aclear; ainvoke/astream with "
                "RunnableWithMessageHistory) or pass a ConversationStore as store"
            )
        return self.store

    def _missing(self) -> list[BaseMessage]:
        if self.create:
            return []
        raise SessionNotFoundError(f"session {self.session_id} does not exist")

    # -- sync --------------------------------------------------------------------------------

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The stored history (oldest first), or the in-budget window if ``budget`` is set."""
        store = self._sync_store()
        try:
            if self.budget is None:
                records = store.get_messages(self.session_id)
            else:
                records = store.get_context(self.session_id, self.budget)
        except SessionNotFoundError:
            return self._missing()
        return [record_to_message(r) for r in records]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append ``messages`` atomically, in one round trip."""
        records = [message_to_record(m) for m in messages]
        if records:
            self._sync_store().append_many(self.session_id, records, create=self.create)

    def clear(self) -> None:
        """Delete the session (messages, system message(s), context and limit)."""
        self._sync_store().delete_session(self.session_id)

    # -- async -------------------------------------------------------------------------------

    async def aget_messages(self) -> list[BaseMessage]:
        """Async :attr:`messages`."""
        if self.async_store is None:
            return await super().aget_messages()
        try:
            if self.budget is None:
                records = await self.async_store.get_messages(self.session_id)
            else:
                records = await self.async_store.get_context(self.session_id, self.budget)
        except SessionNotFoundError:
            return self._missing()
        return [record_to_message(r) for r in records]

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Async :meth:`add_messages`."""
        if self.async_store is None:
            await super().aadd_messages(messages)
            return
        records = [message_to_record(m) for m in messages]
        if records:
            await self.async_store.append_many(self.session_id, records, create=self.create)

    async def aclear(self) -> None:
        """Async :meth:`clear`."""
        if self.async_store is None:
            await super().aclear()
            return
        await self.async_store.delete_session(self.session_id)
