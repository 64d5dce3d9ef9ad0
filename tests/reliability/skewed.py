"""A host whose wall clock is off: ``python -m tests.reliability.skewed SKEW ARGS...`` runs
``convstate ARGS`` with ``time.time`` (and ``time.time_ns``) ``SKEW`` seconds off, as on an
app or daemon host with a wrong clock. Monotonic clocks are left alone: they are not wall
clocks, and nothing a host's NTP does moves them.

The soak runs its daemons this way and calls :func:`skew_clock` in its writer processes:
convstate must take every time that others compare (queue scores, lease deadlines, requeue
times) from the server's clock, so a skewed host changes nothing.
"""

from __future__ import annotations

import runpy
import sys
import time
from typing import Any

_wall = time.time
_wall_ns = time.time_ns


class SkewedTime:
    """The ``time`` module as a host whose clock is ``skew`` seconds off sees it, to put in
    one module's place (``monkeypatch.setattr(module, "time", SkewedTime(600))``): only
    ``time.time()`` is off (monotonic clocks are not wall clocks)."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def time(self) -> float:
        return _wall() + self.skew

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def skew_clock(skew: float) -> None:
    """Make this process's wall clock ``skew`` seconds off (for every module, as a host's
    clock is)."""
    if not skew:
        return
    skew_ns = int(skew * 1e9)
    time.time = lambda: _wall() + skew
    time.time_ns = lambda: _wall_ns() + skew_ns


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m tests.reliability.skewed SKEW [convstate args...]")
    skew_clock(float(sys.argv[1]))
    sys.argv = ["convstate", *sys.argv[2:]]
    runpy.run_module("convstate.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
