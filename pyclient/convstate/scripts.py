"""The Lua scripts, shipped inside the package.

In a wheel the repository's ``lua/`` directory is installed as ``convstate/lua``; in an
editable checkout it is read from the repository. The clients, the compactor and the operator
commands register them with redis-py's ``register_script`` (which only computes the sha) and
run them with EVALSHA. The script cache is lost on restart, failover and SCRIPT FLUSH: on a
NOSCRIPT reply (the script did not run) they load the script again and retry, up to
:data:`NOSCRIPT_RELOADS` times per call, so a cache lost again between the reload and the
retry still reaches no caller. (A pipeline of scripts, as ``convstate stats`` sends to a
standalone server, is preceded by redis-py's SCRIPT EXISTS / SCRIPT LOAD instead.)

**Least privilege**: an app or daemon user without ``+script|load`` cannot reload a script;
it gets :class:`~convstate.errors.ScriptNotLoadedError` telling to run ``convstate scripts
load`` (the administrator's role, see docs/security.md).

**Script flags**: the scripts that must run when Redis memory is full (the compaction's claim,
heartbeat, release and reap; the Agents adapter's pop, which frees about what it keeps for its
retries) start with ``#!lua flags=allow-oom`` (Redis >= 7.0, Valkey). A server without script
flags (Redis 6.2, fakeredis) cannot compile that line: the script is then run in its flag-less
form (:func:`without_flags`: the shebang becomes a Lua comment), in which Redis refuses only a
script's *first* write that may grow memory. Each of these scripts therefore starts writing
with a command that frees memory (ZREM, HDEL, LTRIM), so it runs at maxmemory there too.
``convstate scripts load`` loads the form the server accepts; on a NOSCRIPT reply a client
tries the other form's SHA before loading anything, so a user without ``+script|load`` finds
either.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.exceptions import (
    ClusterError,
    NoPermissionError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)

from convstate.errors import ConfigurationError, ScriptNotLoadedError

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
    "swap",
    "pop",
)

#: First line of a script that declares Redis 7 script flags.
FLAGS_LINE = "#!lua"

#: What a server without script flags says about that line (Redis 6.2 at SCRIPT LOAD,
#: fakeredis at the first EVALSHA): nothing ran.
_FLAGS_UNSUPPORTED = "near '#'"


def without_flags(source: str) -> str:
    """``source`` for a server without script flags: a ``#!lua ...`` first line becomes the
    Lua comment ``--lua ...`` (line numbers stay). Other scripts are returned unchanged."""
    if source.startswith(FLAGS_LINE):
        return "--" + source[2:]
    return source


def sha1(source: str) -> str:
    """The SHA1 Redis gives a script's text."""
    return hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()


@functools.lru_cache(maxsize=64)
def _flagless(source: str) -> tuple[str, str] | None:
    """A script with flags: its flag-less text and that text's SHA1; else None."""
    if not source.startswith(FLAGS_LINE):
        return None
    text = without_flags(source)
    return text, sha1(text)


def _other_sha(script: Script | AsyncScript) -> str | None:
    """The SHA1 of the form of ``script`` it does not use now (flagged <-> flag-less), or
    None for a script without flags. Only ``script.sha`` ever changes, never its text, so
    concurrent calls sharing a script object can only ever pick a valid form."""
    other = _flagless(str(script.script))
    if other is None:
        return None
    return sha1(str(script.script)) if script.sha == other[1] else other[1]


def script_not_loaded(script: Script | AsyncScript) -> ScriptNotLoadedError:
    """The error for a script missing from the cache that this user may not load."""
    lines = str(script.script).splitlines()[:4]
    name = next(
        (line.strip() for line in lines if line.strip() and not line.startswith(("#!", "--"))),
        "a convstate script",
    )
    return ScriptNotLoadedError(
        f"a convstate script ({name[:80]}) is not loaded in Redis and this user may not load "
        "it (no +script|load): run `convstate scripts load` as the admin user (after every "
        "deploy, restart, failover or SCRIPT FLUSH)"
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

    __slots__ = ("cluster_seconds", "deadline", "delay", "reloads", "tried_other_form")

    def __init__(self, cluster_seconds: float) -> None:
        self.cluster_seconds = cluster_seconds
        self.reloads = 0
        self.tried_other_form = False
        self.deadline: float | None = None
        self.delay = 0.01

    def may_reload(self) -> bool:
        """Whether another reload is allowed after a NOSCRIPT reply."""
        self.reloads += 1
        return self.reloads <= NOSCRIPT_RELOADS

    def try_other_form(self, script: Script | AsyncScript) -> bool:
        """After a NOSCRIPT: once per call, point ``script`` at its other form's SHA (the
        admin may have loaded that one: a server without flags) and return True, so that
        EVALSHA is retried before anything is loaded (a user without ``+script|load`` then
        leaves no refusal in ``ACL LOG``). False for a script without flags, or once tried."""
        other = None if self.tried_other_form else _other_sha(script)
        self.tried_other_form = True
        if other is None:
            return False
        script.sha = other
        return True

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


def _flags_unsupported(script: Script | AsyncScript, exc: ResponseError) -> str | None:
    """After the compile error of a ``#!lua`` line (a server without script flags): the
    script's flag-less text, to load instead; None for any other error."""
    other = _flagless(str(script.script))
    if other is not None and _FLAGS_UNSUPPORTED in str(exc):
        return other[0]
    return None


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
    :data:`NOSCRIPT_RELOADS` times (a user without ``+script|load`` gets
    :class:`~convstate.errors.ScriptNotLoadedError` instead); TRYAGAIN and ClusterError are
    retried with backoff for ``cluster_retry_seconds``. Each of these replies means the script
    ran nothing, so a retry is still one write."""
    retries: Retries | None = None
    while True:
        try:
            return client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            retries = retries or Retries(cluster_retry_seconds)
            if retries.try_other_form(script):
                continue
            if not retries.may_reload():
                raise
            try:
                script.sha = client.script_load(script.script)
            except NoPermissionError as exc:
                raise script_not_loaded(script) from exc
            except ResponseError as exc:
                flagless = _flags_unsupported(script, exc)
                if flagless is None:
                    raise
                script.sha = client.script_load(flagless)
        except _NOT_RUN_ON_CLUSTER:
            retries = retries or Retries(cluster_retry_seconds)
            pause = retries.cluster_pause()
            if pause is None:
                raise
            time.sleep(pause)
        except ResponseError as exc:  # fakeredis compiles a script at its first EVALSHA
            flagless = _flags_unsupported(script, exc)
            if flagless is None or script.sha == sha1(flagless):
                raise
            script.sha = client.script_load(flagless)


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
            if retries.try_other_form(script):
                continue
            if not retries.may_reload():
                raise
            try:
                script.sha = await client.script_load(script.script)
            except NoPermissionError as exc:
                raise script_not_loaded(script) from exc
            except ResponseError as exc:
                flagless = _flags_unsupported(script, exc)
                if flagless is None:
                    raise
                script.sha = await client.script_load(flagless)
        except _NOT_RUN_ON_CLUSTER:
            retries = retries or Retries(cluster_retry_seconds)
            pause = retries.cluster_pause()
            if pause is None:
                raise
            await asyncio.sleep(pause)
        except ResponseError as exc:  # fakeredis compiles a script at its first EVALSHA
            flagless = _flags_unsupported(script, exc)
            if flagless is None or script.sha == sha1(flagless):
                raise
            script.sha = await client.script_load(flagless)
