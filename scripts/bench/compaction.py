"""[6] compaction: daemon throughput against concurrency (the shared 200 ms fake summarizer)
and the tokens sent to the model over a 500-turn conversation."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import bench_compaction as bc
from bench.core import COMPACTION_CONCURRENCY, CONVERSATION_LIMIT, CONVERSATION_TURNS, SYSTEM, usage
from bench.data import conversation_message
from bench.fake_summarizer import SleepSummarizer
from bench.report import n, table
from bench.timing import med
from convstate import ConversationStore
from convstate.daemon import Daemon, DaemonSettings
from convstate.summarizers import ExtractiveSummarizer
from convstate.tokens import count_prompt


class CompactionMeasure:
    """Measures compaction (a mixin of :class:`bench.main.Bench`)."""

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
        daemon = Daemon(settings, summarizer=SleepSummarizer(), counter=counter)
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
            "ids hash": usage(self.admin, keys.ids),
            "ids log": usage(self.admin, keys.idlog),
            "meta hash": usage(self.admin, keys.meta),
            "records": len(state.messages),
            "ids": int(self.admin.hlen(keys.ids)),
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


class CompactionReport:
    """The report's compaction section (a mixin of :class:`bench.main.Report`)."""

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
            "200 ms (`bench.fake_summarizer.SleepSummarizer`), so the ideal is N / 0.2 s. *Flagged "
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
            f"{mem['msgs list'] / 1024:.1f} KiB, and its id hash held {mem['ids']:,} ids (the "
            "idempotency window: the newest message and summary ids) in "
            f"{(mem['ids hash'] + mem['ids log']) / 1024:.1f} KiB with their log, a bound "
            "that does not grow with the session's life.\n\n"
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
