"""Shared fixtures: one private server per session, fresh clients and key prefixes per test.

Fixtures:

* ``redis_server`` (session) -- a started :class:`tests.servers.RedisServer` whose engine is
  chosen by ``$CONVSTATE_TEST_ENGINE`` (default ``"redis"``). Never skips: a missing binary
  is an error naming the package to install.
* ``redis_url`` -- ``redis://127.0.0.1:PORT/0`` of that server.
* ``prefix`` -- a unique key prefix per test, ``cst<8 hex>``.
* ``r`` -- a synchronous ``redis.Redis`` client (closed after the test).
* ``ar`` -- a ``redis.asyncio.Redis`` client (closed with ``aclose()`` after the test).
* ``private_server`` -- a server of the test alone, for what would disturb the others: it may
  be frozen (:func:`tests.servers.frozen`); it is continued and stopped after the test.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import redis
import redis.asyncio

from tests.servers import RedisServer, default_engine, thaw


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(default_engine())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_server() -> Iterator[RedisServer]:
    server = RedisServer(default_engine())
    server.start()
    try:
        yield server
    finally:
        thaw(server)  # never leave it stopped
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    return f"cst{secrets.token_hex(4)}"


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest_asyncio.fixture
async def ar(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()
