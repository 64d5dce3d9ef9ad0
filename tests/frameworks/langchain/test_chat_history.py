"""langchain-core's ``tests/unit_tests/chat_history/test_chat_history.py``, run against
ConvstateChatMessageHistory.

Upstream: https://github.com/langchain-ai/langchain, ``libs/core/tests/unit_tests/chat_history/
test_chat_history.py`` at commit 186b4a39939df67931a0bfc381e2a50112e317c3 (the stored version
nearest to the installed langchain-core). MIT License, Copyright (c) LangChain, Inc.

Adapted: upstream builds small BaseChatMessageHistory subclasses over a Python list (one
implementing only ``add_message``, one only ``add_messages``) and checks the list. Here the
history is a ConvstateChatMessageHistory on a private redis-server (``ConvstateHistory``) and
``store`` is a view of its ``messages`` (``messages_view``), so every upstream assertion runs
unchanged against what Redis holds. No test is skipped.
"""

from langchain_core.messages import HumanMessage

from .histories import ConvstateHistory, messages_view


def test_add_message_implementation_only() -> None:
    """Test implementation of add_message only."""

    chat_history = ConvstateHistory()
    store = messages_view(chat_history)
    chat_history.add_message(HumanMessage(content="Hello"))
    assert len(store) == 1
    assert store[0] == HumanMessage(content="Hello")
    chat_history.add_message(HumanMessage(content="World"))
    assert len(store) == 2
    assert store[1] == HumanMessage(content="World")

    chat_history.add_messages(
        [HumanMessage(content="Hello"), HumanMessage(content="World")]
    )
    assert len(store) == 4
    assert store[2] == HumanMessage(content="Hello")
    assert store[3] == HumanMessage(content="World")


def test_bulk_message_implementation_only() -> None:
    """Test that SampleChatHistory works as expected."""
    chat_history = ConvstateHistory()
    store = messages_view(chat_history)
    chat_history.add_message(HumanMessage(content="Hello"))
    assert len(store) == 1
    assert store[0] == HumanMessage(content="Hello")
    chat_history.add_message(HumanMessage(content="World"))
    assert len(store) == 2
    assert store[1] == HumanMessage(content="World")

    chat_history.add_messages(
        [HumanMessage(content="Hello"), HumanMessage(content="World")]
    )
    assert len(store) == 4
    assert store[2] == HumanMessage(content="Hello")
    assert store[3] == HumanMessage(content="World")


async def test_async_interface() -> None:
    """Test async interface for BaseChatMessageHistory."""

    chat_history = ConvstateHistory()
    await chat_history.aadd_messages(
        [HumanMessage(content="Hello"), HumanMessage(content="World")]
    )
    assert await chat_history.aget_messages() == [
        HumanMessage(content="Hello"),
        HumanMessage(content="World"),
    ]
    await chat_history.aadd_messages([HumanMessage(content="!")])
    assert await chat_history.aget_messages() == [
        HumanMessage(content="Hello"),
        HumanMessage(content="World"),
        HumanMessage(content="!"),
    ]
    await chat_history.aclear()
    assert await chat_history.aget_messages() == []
