"""The test server helpers themselves."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio

from convstate.embedded import DEFAULT_REDIS_PORT, RedisServer, find_server_binary


def test_fixture_server_answers_ping(r: redis.Redis, redis_server: RedisServer) -> None:
    assert r.ping() is True
    assert redis_server.running
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"


def test_fixture_server_is_private(redis_server: RedisServer, r: redis.Redis) -> None:
    assert redis_server.port != DEFAULT_REDIS_PORT
    assert int(r.info("server")["process_id"]) == redis_server.pid
    assert r.config_get("save")["save"] == ""
    assert r.config_get("appendonly")["appendonly"] == "no"


def test_debug_command_enabled(redis_server: RedisServer, r: redis.Redis) -> None:
    # Redis < 7.0 has no enable-debug-command flag: DEBUG is always on there.
    has_flag = redis_server.server_kind != "redis" or redis_server.version >= (7, 0)
    assert redis_server.supports_debug_command == has_flag
    assert r.execute_command("DEBUG", "SLEEP", "0") in (b"OK", "OK", True)


def test_version_is_a_tuple_of_ints(redis_server: RedisServer) -> None:
    assert len(redis_server.version) >= 2
    assert all(isinstance(part, int) for part in redis_server.version)
    assert redis_server.version >= (6, 2)


def test_prefix_is_unique(prefix: str) -> None:
    assert prefix.startswith("cst")
    assert len(prefix) == 3 + 8
    int(prefix[3:], 16)


async def test_async_client(ar: redis.asyncio.Redis, prefix: str) -> None:
    key = f"{prefix}:k"
    await ar.set(key, "v", ex=60)
    assert await ar.get(key) == b"v"
    await ar.delete(key)


def test_restart_keeps_port_and_dir() -> None:
    with RedisServer(extra_args=["--maxmemory", "64mb"]) as server:
        port, directory, pid = server.port, server.dir, server.pid
        server.restart()
        assert (server.port, server.dir) == (port, directory)
        assert server.pid != pid
        with server.client() as client:
            assert client.ping() is True
            assert client.config_get("maxmemory")["maxmemory"] == str(64 * 1024 * 1024)
    assert not directory.exists()
    assert not server.running


def test_unknown_engine_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        find_server_binary("memcached")


@pytest.mark.slow
def test_valkey_engine() -> None:
    with RedisServer(engine="valkey") as server:
        assert server.server_kind == "valkey"
        assert server.version >= (8, 0)
        with server.client() as client:
            assert client.execute_command("DEBUG", "SLEEP", "0") in (b"OK", "OK", True)


@pytest.mark.slow
def test_redis6_engine() -> None:
    with RedisServer(engine="redis6") as server:
        assert server.server_kind == "redis"
        assert server.version[:2] == (6, 2)
        assert not server.supports_debug_command
        with server.client() as client:
            assert client.ping() is True
