"""OpenAI Agents SDK session backed by convstate: :class:`ConvstateSession`.

Needs ``openai-agents`` (``pip install 'convstate[agents]'``). It implements the SDK's
``Session`` protocol, so apps switch with one line, the ``session=`` argument::

    import asyncio

    from agents import Agent, Runner

    from convstate import AsyncConversationStore
    from convstate.adapters.openai_agents import ConvstateSession

    async def main() -> None:
        store = AsyncConversationStore.from_url("redis://localhost:6379/0",
                                                token_limit=8_000, model="gpt-4o")
        agent = Agent(name="Assistant", instructions="Reply very concisely.")
        result = await Runner.run(agent, "Plan a trip to Kyoto.",
                                  session=ConvstateSession("chat-42", store))  # <- the one line
        print(result.final_output)

    asyncio.run(main())

**How items are stored.** Each Responses-API input item becomes one convstate message: a chat
view of the item, which convstate counts tokens on and which the compaction daemon plans and
summarizes (and ``store.get_context`` returns), plus the original item, unchanged, in the
record's ``item`` field, which :meth:`ConvstateSession.get_items` returns. So items come back
exactly as they were added (the SDK compares them when it recovers interrupted writes). The
chat view of an item:

==============================================  =================================================
item                                            chat view
==============================================  =================================================
``{"role": r, "content": ...}`` (``message``)   role ``r``; text parts as ``{"type": "text"}``
                                                parts, other parts (images, files, audio) as a
                                                ``[input_image]``-style placeholder text
``function_call`` (and other ``*_call`` items   ``assistant`` with one ``tool_calls`` entry
with a ``call_id``)                             (``id`` = ``call_id``, name, arguments)
``function_call_output`` (and other             ``tool`` with ``tool_call_id`` = ``call_id`` and
``*_output`` items with a ``call_id``)          the output as content
``reasoning``                                   ``assistant`` with the reasoning summary's text
anything else (hosted tool calls, MCP items,    ``assistant`` with the item's JSON as content
references, compaction items)                   (strings over 4096 characters elided)
==============================================  =================================================

Token counts are therefore of the text the model sees, not of images or files (counted as
their placeholder) or encrypted reasoning.

**Compaction.** When ``convstate daemon`` compacts the session, the folded items are replaced
by the rolling summary, which :meth:`~ConvstateSession.get_items` returns as
``{"role": "system", "content": <summary>}``; the kept tail never starts with a tool output
whose call was folded. Messages that other convstate clients appended without an item are
converted back (an assistant message with tool calls becomes its text message, if any, and one
``function_call`` item per call; ``limit`` still counts items).

**pop_item** removes the newest record in one atomic script call (``lua/pop.lua``: drop it,
forget its id, lower the token and message totals, and the head count when the record belonged
to the head), with no retries under contention; it also works when Redis memory is full, and
a retry of it (a reply lost to a timeout) pops nothing twice. See
:meth:`ConvstateSession.pop_item`.

**Missing sessions.** With ``create=True`` (the default) a missing session reads as empty and
the first ``add_items`` creates it with the store's defaults. With ``create=False``
``get_items`` and ``add_items`` raise :class:`~convstate.errors.SessionNotFoundError` for a
missing (or expired) session: create it with ``store.create_session(...)`` first.
``pop_item`` of a missing session returns None. ``clear_session`` deletes the session (its
system message(s), context and limit included). A session that lost some of its keys to
eviction (``maxmemory-policy`` other than ``noeviction``) is neither missing nor empty:
``get_items``, ``add_items`` and ``pop_item`` raise
:class:`~convstate.errors.SessionCorruptedError` naming the missing key, with either
``create``.

**Settings.** ``session_settings`` is a ``SessionSettings`` or a dict of its fields
(``{"limit": 20}``), coerced as the SDK's own sessions do; an unknown key, a bad value or another
type raises :class:`InvalidSessionSettingsError` (a ``ConfigurationError`` and a ``TypeError``,
as the SDK raises). It defaults to ``SessionSettings()`` (no limit). Assigning
``session.session_settings`` later coerces the same way (None resets it to
``SessionSettings()``); ``RunConfig(session_settings=...)`` overrides it per run.

**Event loops.** The session works from any event loop (``Runner.run``, ``Runner.run_sync``,
threads): see :class:`~convstate.AsyncConversationStore` for how the store's connections
follow the running loop.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

try:
    from agents.items import TResponseInputItem
    from agents.memory import SessionSettings
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "convstate.adapters.openai_agents needs openai-agents: pip install 'convstate[agents]'"
    ) from exc

from redis.exceptions import OutOfMemoryError

from convstate.client import AsyncConversationStore
from convstate.errors import (
    ConfigurationError,
    InvalidMessageError,
    SessionNotFoundError,
)
from convstate.keys import validate_session_id
from convstate.operations import decode_record
from convstate.planner import SUMMARY_KIND

if TYPE_CHECKING:
    from agents.memory import Session

__all__ = [
    "ConvstateSession",
    "InvalidSessionSettingsError",
    "coerce_session_settings",
    "item_to_message",
    "record_to_items",
]

#: Field of a stored record holding the original Responses-API item.
ITEM_FIELD = "item"
#: Strings longer than this are elided from the JSON chat view of other items.
_MAX_RENDERED_STRING = 4096
_MESSAGE_ROLES = frozenset({"user", "system", "developer", "assistant"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})


# -- items -> chat messages --------------------------------------------------------------------


def _elide(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _MAX_RENDERED_STRING:
        return f"[{len(value)} characters]"
    if isinstance(value, Mapping):
        return {k: _elide(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_elide(v) for v in value]
    return value


def _render(value: Any) -> str:
    """Compact JSON of ``value`` with long strings elided (the chat view of other items)."""
    try:
        return json.dumps(_elide(value), ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidMessageError(f"item is not JSON-serializable: {exc}") from exc


def _part_text(part: Mapping[str, Any]) -> str | None:
    """The text of a text-like content part, else None."""
    ptype = part.get("type")
    if ptype in _TEXT_PARTS and isinstance(part.get("text"), str):
        return cast("str", part["text"])
    if ptype == "refusal" and isinstance(part.get("refusal"), str):
        return cast("str", part["refusal"])
    return None


def _chat_content(content: Any) -> str | list[Any]:
    """Responses content (a string or a list of parts) -> chat content."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        return _render(content)
    parts: list[Any] = []
    for part in content:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
        elif isinstance(part, Mapping):
            text = _part_text(part)
            if text is None:
                text = f"[{part.get('type') or 'part'}]"
            parts.append({"type": "text", "text": text})
        else:
            parts.append({"type": "text", "text": _render(part)})
    return parts


def _chat_view(item: Mapping[str, Any]) -> dict[str, Any]:
    itype = item.get("type")
    role = item.get("role")
    if itype in (None, "message") and role in _MESSAGE_ROLES:
        return {"role": role, "content": _chat_content(item.get("content"))}
    call_id = item.get("call_id")
    if isinstance(itype, str) and isinstance(call_id, str) and call_id:
        if itype.endswith("_output"):
            return {"role": "tool", "tool_call_id": call_id, "content": _output(item)}
        if itype.endswith("_call"):
            name = item.get("name")
            return {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": name if isinstance(name, str) and name else itype,
                            "arguments": _arguments(item),
                        },
                    }
                ],
            }
    if itype == "reasoning":
        summary = item.get("summary")
        texts = [
            text
            for part in (summary if isinstance(summary, list) else [])
            if isinstance(part, Mapping) and (text := _part_text(part)) is not None
        ]
        return {"role": "assistant", "content": "\n".join(texts)}
    return {"role": "assistant", "content": _render(item)}


def _output(item: Mapping[str, Any]) -> str | list[Any]:
    output = item.get("output")
    if isinstance(output, (str, list)):
        return _chat_content(output)
    return _render(output)


def _arguments(item: Mapping[str, Any]) -> str:
    for key in ("arguments", "input"):
        value = item.get(key)
        if isinstance(value, str):
            return value
    return _render({k: v for k, v in item.items() if k not in ("type", "id", "call_id", "status")})


def item_to_message(item: Mapping[str, Any]) -> dict[str, Any]:
    """A Responses-API input item -> the convstate message storing it (chat view + item)."""
    if not isinstance(item, Mapping):
        raise InvalidMessageError(f"a session item must be a dict, not {type(item).__name__}")
    message = _chat_view(item)
    message[ITEM_FIELD] = item
    return message


# -- stored records -> items -------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "".join(texts)
    return "" if content is None else _render(content)


def _input_content(content: Any) -> Any:
    """Chat content -> Responses input content (text and image parts converted)."""
    if not isinstance(content, list):
        return "" if content is None else content
    parts: list[Any] = []
    for part in content:
        if isinstance(part, Mapping) and part.get("type") == "text":
            parts.append({"type": "input_text", "text": part.get("text", "")})
        elif isinstance(part, Mapping) and part.get("type") == "image_url":
            image = part.get("image_url")
            image = image if isinstance(image, Mapping) else {"url": image}
            parts.append(
                {
                    "type": "input_image",
                    "image_url": image.get("url"),
                    "detail": image.get("detail") or "auto",
                }
            )
        elif isinstance(part, str):
            parts.append({"type": "input_text", "text": part})
        else:
            parts.append(part)
    return parts


def record_to_items(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A stored record -> its item(s): the original item when the adapter stored it, a system
    message for a compaction summary, else a conversion of the chat message."""
    if record.get("kind") == SUMMARY_KIND:
        return [{"role": "system", "content": _text(record.get("content"))}]
    item = record.get(ITEM_FIELD)
    if isinstance(item, dict):
        return [item]
    role = record.get("role")
    content = record.get("content")
    if role in ("tool", "function"):
        call_id = record.get("tool_call_id") if role == "tool" else record.get("name")
        return [
            {"type": "function_call_output", "call_id": call_id or "", "output": _text(content)}
        ]
    if role == "assistant":
        items: list[dict[str, Any]] = []
        text = _text(content)
        if text or not record.get("tool_calls"):
            items.append({"role": "assistant", "content": text})
        for call in record.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, Mapping) else None
            function = function if isinstance(function, Mapping) else {}
            arguments = function.get("arguments")
            items.append(
                {
                    "type": "function_call",
                    "call_id": call.get("id", "") if isinstance(call, Mapping) else "",
                    "name": function.get("name") or "",
                    "arguments": arguments if isinstance(arguments, str) else _render(arguments),
                }
            )
        return items
    return [
        {"role": role if role in _MESSAGE_ROLES else "user", "content": _input_content(content)}
    ]


def _items(records: Sequence[Any]) -> list[TResponseInputItem]:
    return [cast("TResponseInputItem", i) for r in records for i in record_to_items(r)]


# -- the session -------------------------------------------------------------------------------


class InvalidSessionSettingsError(ConfigurationError, TypeError):
    """``session_settings`` is not a ``SessionSettings`` or a dict of its fields. Also a
    ``TypeError``, which the SDK's own sessions raise for the same mistake."""


def coerce_session_settings(value: object) -> SessionSettings:
    """``value`` (a ``SessionSettings``, a dict of its fields, or None) -> ``SessionSettings``,
    as the SDK's own sessions coerce it (None -> ``SessionSettings()``).

    Raises :class:`InvalidSessionSettingsError` for an unknown key, a bad value or another
    type; nothing is dropped silently.
    """
    if value is None:
        return SessionSettings()
    if isinstance(value, SessionSettings):
        return value
    known = [f.name for f in dataclasses.fields(SessionSettings) if f.init]
    if not isinstance(value, Mapping):
        raise InvalidSessionSettingsError(
            f"session_settings must be a SessionSettings or a dict with keys from "
            f"{', '.join(known)}, not {type(value).__name__}"
        )
    unknown = sorted(str(key) for key in value if key not in known)
    if unknown:
        raise InvalidSessionSettingsError(
            f"Unknown session settings: {', '.join(unknown)} (SessionSettings accepts "
            f"{', '.join(known)})"
        )
    try:
        return SessionSettings(**value)
    except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise InvalidSessionSettingsError(
            f"invalid session_settings {dict(value)!r}: {exc}"
        ) from exc


class ConvstateSession:
    """An OpenAI Agents SDK ``Session`` kept in a convstate session (see the module docs).

    Args:
        session_id: the convstate session (the SDK's ``session_id``).
        store: the :class:`~convstate.AsyncConversationStore` holding it.
        create: a missing session reads as empty and is created by the first ``add_items``
            (True), or raises :class:`~convstate.errors.SessionNotFoundError` (False).
        session_settings: the SDK's ``SessionSettings`` (or a dict of its fields); its
            ``limit`` is the default of :meth:`get_items`. Default: ``SessionSettings()``.
            Assigning it later (``session.session_settings = {"limit": 20}``) coerces the
            same way; None resets it to ``SessionSettings()``.
    """

    session_id: str

    def __init__(
        self,
        session_id: str,
        store: AsyncConversationStore,
        *,
        create: bool = True,
        session_settings: SessionSettings | Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(store, AsyncConversationStore):
            raise ConfigurationError(
                f"store must be an AsyncConversationStore (the Agents SDK is async), "
                f"not {type(store).__name__}"
            )
        self.session_id = validate_session_id(session_id)
        self.store = store
        self.create = create
        self._session_settings = SessionSettings()
        self.session_settings = session_settings  # coerced by the setter
        self._keys = store.ops.session_keys(session_id)

    @property
    def session_settings(self) -> SessionSettings:
        """The session's ``SessionSettings`` (its ``limit`` is :meth:`get_items`' default).

        Assigning a ``SessionSettings``, a dict of its fields or None (-> ``SessionSettings()``)
        coerces it as the constructor does; anything else raises
        :class:`InvalidSessionSettingsError` and leaves the settings unchanged.
        """
        return self._session_settings

    @session_settings.setter
    def session_settings(self, value: SessionSettings | Mapping[str, Any] | None) -> None:
        self._session_settings = coerce_session_settings(value)

    def _default_limit(self) -> int | None:
        # Resolved at read time, as the SDK's sessions do (``resolve_session_limit``), so a
        # subclass that overrides ``session_settings`` with a dict still reads its limit.
        return coerce_session_settings(self.session_settings).limit

    def __repr__(self) -> str:
        return f"{type(self).__name__}(session_id={self.session_id!r}, create={self.create!r})"

    def _missing(self) -> list[TResponseInputItem]:
        if self.create:
            return []
        raise SessionNotFoundError(f"session {self.session_id} does not exist")

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The session's items, oldest first; with ``limit``, the latest ``limit`` of them.

        ``limit`` defaults to ``session_settings.limit``; ``limit <= 0`` returns ``[]``. One
        round trip; with a limit only the newest ``limit`` records are read (one MULTI: meta's
        existence and message count, the newest records).

        Raises :class:`~convstate.errors.SessionCorruptedError`, naming the missing key, if
        some of the session's keys were evicted (its meta counts messages but its list is
        gone, or its meta is gone but its messages survive), whatever ``create`` is: such a
        session is never read as empty or missing. With a limit, a snapshot showing either
        loss (or a Redis at ``maxmemory``, which refuses every command queued in a MULTI)
        hands over to the store's authoritative read (``lua/state.lua``, a second round
        trip), which tells an eviction from the end of a TTL (messages left with under a
        second to live: the session is gone) exactly as the store's own reads do.
        """
        if limit is None:
            limit = self._default_limit()
        if limit is None:
            return await self._read_all()
        if limit <= 0:
            return []
        keys = self._keys
        try:
            async with self.store.client() as client, client.pipeline(transaction=True) as pipe:
                pipe.exists(keys.meta)
                pipe.hget(keys.meta, "message_count")
                pipe.lrange(keys.msgs, -limit, -1)
                exists, counted, raw = await pipe.execute()
        except OutOfMemoryError:  # a full Redis refuses MULTI's commands, not state.lua's
            return (await self._read_all())[-limit:]
        if exists:
            if raw or not int(counted or 0):
                return _items([decode_record(r) for r in raw])[-limit:]
        elif not raw:
            return self._missing()
        # Messages without their meta, or a meta counting messages with no list: evicted
        # keys (or, for the former, the end of a TTL). state.lua decides, as for every read.
        return (await self._read_all())[-limit:]

    async def _read_all(self) -> list[TResponseInputItem]:
        """Every item, from the store's authoritative read (``lua/state.lua``)."""
        try:
            records = await self.store.get_messages(self.session_id)
        except SessionNotFoundError:
            return self._missing()
        return _items(records)

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append ``items`` atomically, in one round trip (all or none)."""
        if items:
            messages = [item_to_message(cast("Mapping[str, Any]", item)) for item in items]
            await self.store.append_many(self.session_id, messages, create=self.create)

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove the newest item and return it; None if the session is empty or missing.

        One script call (``lua/pop.lua``), atomic against concurrent appends, compactions and
        pops, in one round trip: it reads the newest record and removes it from the message
        list, forgets its id (id hash and id log, so it may be added again), lowers
        ``token_count`` by its tokens and ``message_count`` by one, and ``head_count`` if the
        record was in the head (a system message or the summary with nothing after it), sets
        ``updated_at`` from the server's clock and refreshes the session's TTL. Removing a
        summary removes the compacted history it stands for. A record another client stored
        that reads as several items (an assistant message with tool calls) is removed whole;
        its last item is returned.

        **Retries.** Each call sends a random token, the same in redis-py's retries of it;
        the script keeps the token and the record it popped for a minute
        (:data:`~convstate.operations.POP_RETRY_WINDOW_MS`). A retry of a pop that ran on the
        server but whose reply was lost (a timeout) returns that same item and pops nothing
        more, even if the session changed in between. Only the session's last pop is kept:
        a retry arriving after another client's pop of the same session pops again.

        **Memory full.** The script declares ``allow-oom`` (and on Redis 6.2 writes a freeing
        ``LTRIM`` first), so a pop works when Redis is at ``maxmemory`` with ``noeviction``:
        it frees the record's bytes, which its copy kept for retries takes back for a minute
        (net neutral, plus a few hundred bytes). **Compaction state** is left as it is: a
        session queued or being compacted stays so even if the pop takes it under its token
        limit (the daemon plans from the totals it reads when it claims the session, and gives
        back one that fits its target); an idle session is flagged by the next append that
        passes its limit.

        Raises :class:`~convstate.errors.SessionCorruptedError` if some of the session's keys
        were evicted (its meta counts messages but its list or id hash is gone, or its meta
        is gone but its messages survive), :class:`~convstate.errors.RecordDecodeError` if the
        newest record is not one convstate wrote (nothing is popped in either case), and
        :class:`~convstate.errors.ScriptNotLoadedError` as every script call does.
        """
        # The store's script runner: EVALSHA, NOSCRIPT reloads, typed errors.
        raw = await self.store._run(self.store.ops.pop(self.session_id))
        if raw is None:
            return None
        return _items([decode_record(raw)])[-1]

    async def clear_session(self) -> None:
        """Delete the session (items, system message(s), context and limit)."""
        await self.store.delete_session(self.session_id)


if TYPE_CHECKING:
    # Static proof that ConvstateSession implements the SDK's Session protocol.
    def _conforms(session: ConvstateSession) -> Session:
        return session
