"""The README documents every command, flag and environment variable the CLI has."""

from __future__ import annotations

import re
from pathlib import Path

import click

from convstate.cli import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _shown(flag: str) -> bool:
    """Whether ``flag`` appears as a whole token (``--model`` is not ``--model-x``)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", README) is not None


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _commands(command, (*path, name))
        else:
            found.append((" ".join(("convstate", *path, name)), command))
    return found


def test_every_command_is_in_the_readme() -> None:
    missing = [name for name, _ in _commands(main) if f"`{name}" not in README]
    assert missing == []


def test_every_flag_and_env_var_is_in_the_readme() -> None:
    missing = []
    for name, command in _commands(main):
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            flags = [f for f in param.opts if f.startswith("--") and f != "--help"]
            if flags and not any(_shown(f) for f in flags):
                missing.append(f"{name} {flags[0]}")
            envvar = param.envvar if isinstance(param.envvar, str) else None
            if envvar and f"`{envvar}`" not in README:
                missing.append(f"{name} {envvar}")
    assert missing == []
