"""The Lua scripts, shipped inside the package.

In a wheel the repository's ``lua/`` directory is installed as ``convstate/lua``; in an
editable checkout it is read from the repository. Scripts are registered with redis-py's
``register_script``, which sends EVALSHA and loads the script again on NOSCRIPT (the script
cache is lost on restart, failover and SCRIPT FLUSH).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from convstate.errors import ConfigurationError

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
