"""Running convstate as a process from the tests, in an environment of the test's choosing.

* :func:`clean_env` -- this process's environment without what would leak the caller's
  configuration into a child: ``CONVSTATE_*``, ``OPENAI_*`` and systemd's notify variables.
* :func:`run_cli` -- ``python -m convstate.cli ARGS`` in that environment (plus ``env``),
  from the repository root, output captured as text, bounded by ``timeout``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Keys of the environment a child must not inherit from whoever runs the tests.
SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without CONVSTATE_*, OPENAI_* and systemd variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONVSTATE_", "OPENAI_")) and k not in SCRUBBED_ENV
    }
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``convstate ARGS`` as a process; ``env`` is added to :func:`clean_env`'s."""
    return subprocess.run(
        [sys.executable, "-m", "convstate.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(**(env or {})),
        cwd=REPO,
        check=False,
    )
