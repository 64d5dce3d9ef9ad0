"""[1] append: convstate sync and async against a bare RPUSH and the minimal Lua baseline;
sequential and with 32 appends in flight; p50 and p99 against the stored history."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable

import bench_append as ba
from bench.core import H_APPEND, IN_FLIGHT, NO_FLAG_LIMIT, SYSTEM, TEXT, Series, chat
from bench.data import conv_pairs, prefill, rpush_many
from bench.report import n, t, table, x
from bench.timing import Refill, Step, burst, med, ops_of, p, ratio_rounds, run_round, tolerance


class AppendMeasure:
    """Measures append (a mixin of :class:`bench.main.Bench`)."""

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


class AppendReport:
    """The report's append section (a mixin of :class:`bench.main.Report`)."""

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
