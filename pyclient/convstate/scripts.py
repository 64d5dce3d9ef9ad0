"""The Lua scripts, shipped inside the package.

In a wheel the repository's ``lua/`` directory is installed as ``convstate/lua``; in an
editable checkout it is read from the repository. The clients, the compactor and the operator
commands register them with redis-py's ``register_script`` (which only computes the sha) and
run them with EVALSHA. The script cache is lost on restart, failover and SCRIPT FLUSH: on a
NOSCRIPT reply (the script did not run) they load the script again and retry, up to
:data:`NOSCRIPT_RELOADS` times per call, so a cache lost again between the reload and the
retry still reaches no caller. (A pipeline of scripts, as ``convstate stats`` sends to a
standalone server, is preceded by redis-py's SCRIPT EXISTS / SCRIPT LOAD instead.)
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.exceptions import ClusterError, NoScriptError, TryAgainError

from convstate.errors import ConfigurationError

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    from redis.commands.core import AsyncScript, Script

#: How many times one call loads its script again after a NOSCRIPT reply before that error
#: reaches the caller. Each NOSCRIPT means the EVALSHA ran nothing, so a retry is still one
#: write; more than one reload covers a cache lost again between the reload and the retry
#: (two failovers or SCRIPT FLUSHes close together).
NOSCRIPT_RELOADS = 3

#: Replies a cluster gives when a script did not run because its slot is migrating (TRYAGAIN)
#: or redis-py's own redirect retries ran out (ClusterError: "TTL exhausted.", CLUSTERDOWN).
_NOT_RUN_ON_CLUSTER = (TryAgainError, ClusterError)

#: Every script the package ships, by name (the file is ``<name>.lua``).
SCRIPT_NAMES = (
    "append",
    "create",
    "read",
    "state",
    "update_context",
    "delete",
    "claim",
    "heartbeat",
    "release",
    "reap",
    "requeue",
    "peek",
)


def _lua_dir() -> Path:
    packaged = resources.files("convstate") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parent.parent.parent / "lua"
    if checkout.is_dir():
        return checkout
    raise ConfigurationError(
        "convstate's Lua scripts are missing from the installation; reinstall convstate"
    )


@functools.cache
def script_source(name: str) -> str:
    """The text of a shipped script."""
    if name not in SCRIPT_NAMES:
        raise KeyError(f"no convstate script named {name!r}")
    return (_lua_dir() / f"{name}.lua").read_text(encoding="utf-8")


def all_sources() -> dict[str, str]:
    return {name: script_source(name) for name in SCRIPT_NAMES}


class Retries:
    """What one script call has retried so far: NOSCRIPT reloads, and the deadline and backoff
    of its cluster retries (created only once something failed: appends never pay for it)."""

    __slots__ = ("cluster_seconds", "deadline", "delay", "reloads")

    def __init__(self, cluster_seconds: float) -> None:
        self.cluster_seconds = cluster_seconds
        self.reloads = 0
        self.deadline: float | None = None
        self.delay = 0.01

    def may_reload(self) -> bool:
        """Whether another reload is allowed after a NOSCRIPT reply."""
        self.reloads += 1
        return self.reloads <= NOSCRIPT_RELOADS

    def cluster_pause(self) -> float | None:
        """Seconds to wait before retrying a TRYAGAIN / ClusterError, or None: give up."""
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.cluster_seconds
        if now >= self.deadline:
            return None
        pause = min(self.delay, self.deadline - now)
        self.delay = min(self.delay * 2, 0.2)
        return pause


def run_script(
    client: redis.Redis | redis.RedisCluster,
    script: Script,
    keys: Sequence[Any],
    args: Sequence[Any],
    *,
    cluster_retry_seconds: float = 0.0,
) -> Any:
    """EVALSHA ``script`` (what redis-py's ``Script.__call__`` does, without its copies and
    pipeline check). On NOSCRIPT the script is loaded again and retried, up to
    :data:`NOSCRIPT_RELOADS` times; TRYAGAIN and ClusterError are retried with backoff for
    ``cluster_retry_seconds``. Either reply means the script ran nothing, so a retry is still
    one write."""
    retries: Retries | None = None
    while True:
        try:
            return client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            retries = retries or Retries(cluster_retry_seconds)
            if not retries.may_reload():
                raise
            script.sha = client.script_load(script.script)
        except _NOT_RUN_ON_CLUSTER:
            retries = retries or Retries(cluster_retry_seconds)
            pause = retries.cluster_pause()
            if pause is None:
                raise
            time.sleep(pause)


async def arun_script(
    client: redis.asyncio.Redis | redis.asyncio.RedisCluster,
    script: AsyncScript,
    keys: Sequence[Any],
    args: Sequence[Any],
    *,
    cluster_retry_seconds: float = 0.0,
) -> Any:
    """:func:`run_script` for asyncio clients."""
    retries: Retries | None = None
    while True:
        try:
            return await client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            retries = retries or Retries(cluster_retry_seconds)
            if not retries.may_reload():
                raise
            script.sha = await client.script_load(script.script)
        except _NOT_RUN_ON_CLUSTER:
            retries = retries or Retries(cluster_retry_seconds)
            pause = retries.cluster_pause()
            if pause is None:
                raise
            await asyncio.sleep(pause)
