"""The small helpers every benchmark shares: ``scripts/bench`` and the quick checks
``bench_append.py`` and ``bench_compaction.py`` (a percentile, PASS/FAIL, a reply field as
text, INFO commandstats calls, and the summary line and JSON document a quick check ends with).

It imports nothing from the package: the package's modules (``bench.core``, ``bench.report``...)
import the quick checks, which import this module, so an import of ``bench.core`` here would be
a cycle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` from 0 to 1) of ``values``, in their unit; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def as_text(value: object) -> str:
    """A reply field as text (bytes decoded)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def cmdstats(info: Mapping[str, Any]) -> dict[str, int]:
    """Calls per command from an INFO ``commandstats`` (or ``all``) reply, by command name."""
    return {
        key[len("cmdstat_") :]: int(value["calls"])
        for key, value in info.items()
        if key.startswith("cmdstat_") and isinstance(value, dict)
    }


def finish(
    *,
    env: dict[str, Any],
    settings: dict[str, Any],
    results: dict[str, Any],
    passed: dict[str, bool],
    elapsed: float,
    as_json: bool,
    strict: bool,
) -> int:
    """The end of a quick check: the summary line, the JSON document (``--json``), and the exit
    status (1 if ``--strict`` and a target failed, else 0)."""
    failed = [name for name, ok in passed.items() if not ok]
    print(
        f"\nsummary: {len(passed) - len(failed)}/{len(passed)} targets met"
        f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}; {elapsed:.1f} s"
    )
    if as_json:
        doc = {
            "environment": env,
            "settings": settings,
            **results,
            "passed": passed,
            "all_passed": not failed,
            "elapsed_s": round(elapsed, 2),
        }
        print(json.dumps(doc, indent=2))
    return 1 if (strict and failed) else 0
