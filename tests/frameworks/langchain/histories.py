"""ConvstateChatMessageHistory in place of the histories langchain-core's tests build.

``ConvstateHistory(messages=None)`` is built like ``InMemoryChatMessageHistory(messages=...)``:
a ConvstateChatMessageHistory on a fresh session of the test's stores (the private
redis-server, set by the autouse fixture in ``conftest.py``), holding ``messages``. Two
histories are equal when their messages are, which is what pydantic's equality of
``InMemoryChatMessageHistory`` compares.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage

from convstate import AsyncConversationStore, ConversationStore
from convstate.adapters.langchain import ConvstateChatMessageHistory


@dataclass
class Stores:
    sync: ConversationStore
    asynchronous: AsyncConversationStore


#: The running test's stores (one test at a time per process).
CURRENT: list[Stores] = []
_session_numbers = itertools.count()


class ConvstateHistory(ConvstateChatMessageHistory):
    """A ConvstateChatMessageHistory on a fresh session, sync and async methods native."""

    def __init__(self, messages: Sequence[BaseMessage] | None = None) -> None:
        stores = CURRENT[-1]
        super().__init__(
            f"lc-{next(_session_numbers)}", stores.sync, async_store=stores.asynchronous
        )
        if messages:
            self.add_messages(messages)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BaseChatMessageHistory):
            return self.messages == other.messages
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ConvstateHistory(messages={self.messages!r})"


def messages_view(history: BaseChatMessageHistory) -> Any:
    """A read-only list view of ``history.messages`` (``len``, indexing, equality), standing
    in for the list the upstream tests' in-memory histories append to."""

    class _View:
        def __len__(self) -> int:
            return len(history.messages)

        def __getitem__(self, index: int) -> BaseMessage:
            return history.messages[index]

        def __eq__(self, other: object) -> bool:
            return history.messages == other

    return _View()
