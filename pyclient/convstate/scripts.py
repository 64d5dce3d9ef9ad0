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

import functools
from importlib import resources
from pathlib import Path

from convstate.errors import ConfigurationError

#: How many times one call loads its script again after a NOSCRIPT reply before that error
#: reaches the caller. Each NOSCRIPT means the EVALSHA ran nothing, so a retry is still one
#: write; more than one reload covers a cache lost again between the reload and the retry
#: (two failovers or SCRIPT FLUSHes close together).
NOSCRIPT_RELOADS = 3

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
