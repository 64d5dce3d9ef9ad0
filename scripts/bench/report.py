"""The report: formatting helpers, the labels and colours of the flows, and
:class:`ReportBase` (the header, the summary, writing the markdown and the plots); each
measurement adds its section as a mixin of :class:`bench.main.Report`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bench_compaction as bc
from bench.core import (
    COMPACTION_CONCURRENCY,
    CONVERSATION_LIMIT,
    CONVERSATION_TURNS,
    ENCODING,
    H_APPEND,
    H_TURN,
    MEMORY_MESSAGES,
    BenchBase,
    Series,
    chat,
)
from bench.timing import med, p, ratio_rounds
from convstate.tokens import TiktokenCounter

FLOW_LABELS = {
    "rpush": "bare RPUSH (the floor: one round trip)",
    "lua": "Lua RPUSH + HINCRBY + compare, tiktoken client-side",
    "conv_sync": "convstate append + get_context(budget=3000), sync",
    "conv_async": "convstate append + get_context(budget=3000), async",
    "one_sync": "convstate append_and_get_context(budget=3000): one round trip, sync",
    "one_async": "convstate append_and_get_context(budget=3000): one round trip, async",
    "agents": "openai-agents RedisSession add_items + get_items",
    "llama": "LlamaIndex RedisChatStore + ChatMemoryBuffer(3000) put + get",
}
SHORT_LABELS = {
    "rpush": "bare RPUSH",
    "lua": "Lua baseline",
    "conv_sync": "convstate (sync)",
    "conv_async": "convstate (async)",
    "one_sync": "convstate 1 RTT (sync)",
    "one_async": "convstate 1 RTT (async)",
    "agents": "openai-agents RedisSession",
    "llama": "LlamaIndex ChatMemoryBuffer",
}
COLORS = {
    "rpush": "#555555",
    "lua": "#1f77b4",
    "conv_sync": "#d62728",
    "conv_async": "#ff7f0e",
    "one_sync": "#9467bd",
    "one_async": "#8c564b",
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


class ReportBase:
    """Writes ``out`` and ``img/*.png`` beside it from a finished run."""

    def __init__(
        self, bench: BenchBase, env: dict[str, Any], out: Path, command: str, elapsed: float
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
            "`python scripts/bench --quick` runs in under 2 minutes."
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
            if "one_sync" in flows:
                one = [self.turn_ratio("one_sync", h) for h in H_TURN]
                bits.append(
                    f"In one round trip (`append_and_get_context`): "
                    f"{t(self.turn_p50('one_sync', H_TURN[0])[0])} to "
                    f"{t(max(self.turn_p50('one_sync', h)[0] for h in H_TURN))}, {x(min(one))} "
                    f"to {x(max(one))}."
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
