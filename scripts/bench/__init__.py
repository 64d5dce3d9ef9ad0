"""convstate benchmarks, side by side on one private server, written up as a report.

Seven measurements, each taken in one process against one private Redis/Valkey (a free
loopback port, never 127.0.0.1:6379), the variants of a measurement interleaved in small
chunks inside every run (their order rotating) so that a busy machine's noise hits them alike;
figures are medians over ``--runs`` runs:

1. append: convstate sync and async against a bare RPUSH (sync and async) and the minimal Lua
   baseline (RPUSH + HINCRBY + compare, tiktoken counted client-side); sequential and with 32
   appends in flight (async); p50 and p99 at 10 to 10,000 stored messages;
2. one chat turn against the peers: openai-agents ``RedisSession`` (add_items + get_items) and
   LlamaIndex ``RedisChatStore`` + ``ChatMemoryBuffer(token_limit=3000)`` (put + get), against
   convstate's append + ``get_context(budget=3000)``; ratios to a bare RPUSH. Every cell is
   capped in time (``--cell-cap``); a cell predicted to exceed the cap in one turn is
   extrapolated instead (full mode also runs one bounded turn in a child process);
3. ``get_context`` latency against history length and budget;
4. server-side cost: INFO commandstats ``usec_per_call`` of each script, run in isolation
   between CONFIG RESETSTAT calls, against RPUSH;
5. memory per stored message (MEMORY USAGE) against the JSON payload, for convstate and peers;
6. compaction: daemon throughput against concurrency (200 ms summarizer), and the tokens sent
   to the model per turn over a 500-turn conversation: convstate with a daemon compacting,
   against the full history and against plain truncation;
7. token counting throughput (cl100k) and its share of an append.

The package holds one module per measurement (its timing and its report section), the
shared parts (``core``, ``timing``, ``data``, ``peers``, ``report``, ``environment``) and
``fake_summarizer`` (the fixed-latency summarizer ``scripts/bench_compaction.py`` uses too).
``common`` and ``environment`` hold the one copy of the helpers the quick checks
``scripts/bench_append.py`` and ``scripts/bench_compaction.py`` share with it (percentile,
PASS/FAIL, versions, the server's name, the summary and ``--json`` a check ends with).

It writes ``--out`` (default docs/benchmarks.md) and its plots (``img/*.png`` beside it).

    pip install -e '.[bench]'
    python scripts/bench                 # full run (a few minutes)
    python scripts/bench --quick         # under 2 minutes
    python scripts/bench --runs 7 --out docs/benchmarks.md
"""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = SCRIPTS_DIR.parent
# scripts/ for bench_append and bench_compaction; pyclient/ to measure this checkout's convstate.
for _path in (str(SCRIPTS_DIR), str(REPO_ROOT / "pyclient")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
