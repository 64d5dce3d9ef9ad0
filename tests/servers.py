"""Test-side name of :mod:`convstate.embedded` (private servers on free loopback ports)."""

from __future__ import annotations

from convstate.embedded import (
    ENGINE_ENV,
    ENGINES,
    SERVER_ENV,
    EngineNotFoundError,
    RedisServer,
    binary_version,
    default_engine,
    find_server_binary,
)

__all__ = [
    "ENGINES",
    "ENGINE_ENV",
    "SERVER_ENV",
    "EngineNotFoundError",
    "RedisServer",
    "binary_version",
    "default_engine",
    "find_server_binary",
]
