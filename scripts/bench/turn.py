"""[2] one chat turn against the peers (openai-agents ``RedisSession``, LlamaIndex
``ChatMemoryBuffer``) and convstate's append + ``get_context``, as ratios to a bare RPUSH."""

from __future__ import annotations

from typing import Any

import bench_append as ba
from bench.core import (
    ANCHOR_LLAMA_S,
    ANCHOR_RATIO,
    ANCHOR_RPUSH_US,
    H_TURN,
    NO_FLAG_LIMIT,
    SYSTEM,
    TEXT,
    TURN_BUDGET,
    Series,
    chat,
)
from bench.data import conv_pairs, prefill, rpush_many
from bench.peers import (
    PEER_NOTES,
    ChatMemoryBuffer,
    ChatMessage,
    RedisChatStore,
    RedisSession,
    llama_child,
)
from bench.report import COLORS, FLOW_LABELS, SHORT_LABELS, n, t, table, tick_time, x
from bench.timing import Refill, Step, med, ops_of, p, run_round, tolerance


class TurnMeasure:
    """Measures turn (a mixin of :class:`bench.main.Bench`)."""

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
        flows = ["rpush", "lua", "conv_sync", "conv_async", "one_sync", "one_async"]
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

            def one_sync() -> object:
                turn = store.append_and_get_context(
                    f"live-one-sync-{h}", {"role": "user", "content": TEXT}, budget=TURN_BUDGET
                )
                returned["one_sync"][h] = len(turn.context)
                return None

            async def one_async() -> object:
                turn = await astore.append_and_get_context(
                    f"live-one-async-{h}", {"role": "user", "content": TEXT}, budget=TURN_BUDGET
                )
                returned["one_async"][h] = len(turn.context)
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
            add(
                "one_sync",
                one_sync,
                conv_pairs(store, f"tmpl-{h}", f"live-one-sync-{h}"),
                is_async=False,
            )
            add(
                "one_async",
                one_async,
                conv_pairs(store, f"tmpl-{h}", f"live-one-async-{h}"),
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


class TurnReport:
    """The report's turn section (a mixin of :class:`bench.main.Report`)."""

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
