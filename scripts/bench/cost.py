"""[4] server-side cost: INFO commandstats ``usec_per_call`` of each script, in isolation,
against RPUSH."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bench_append as ba
from bench.common import cmdstats
from bench.core import NO_FLAG_LIMIT, SYSTEM, TEXT, TURN_BUDGET
from bench.data import conv_pairs, prefill
from bench.report import n, table, x
from bench.timing import Refill, med, tolerance
from convstate.scripts import script_source


class CostMeasure:
    """Measures cost (a mixin of :class:`bench.main.Bench`)."""

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

        grow_t10k = Refill(admin, conv_pairs(store, "c-10000", "t-10000"), tolerance(10_000))

        def turn(sid: str, refill: Refill) -> object:
            refill.ensure()
            return store.append_and_get_context(
                sid, {"role": "user", "content": TEXT}, budget=TURN_BUDGET
            )

        def lua() -> object:
            tokens = self.counter.count_message({"role": "user", "content": TEXT})
            return anchor(keys=["lua:msgs", "lua:meta"], args=[body, tokens, NO_FLAG_LIMIT])

        ops: list[tuple[str, str, Callable[[], object]]] = [
            ("RPUSH (bare)", "rpush", lambda: raw.rpush("raw", body)),
            ("Lua baseline: RPUSH + HINCRBY + compare", "evalsha", lua),
            ("append (history 1,000)", "evalsha", lambda: append("a-1000", grow_1k)),
            ("append (history 10,000)", "evalsha", lambda: append("a-10000", grow_10k)),
            (
                "read: get_context(budget=3000), history 1,000 (MULTI)",
                "exec",
                lambda: store.get_context("c-1000", budget=TURN_BUDGET),
            ),
            (
                "read: get_context(budget=3000), history 10,000 (MULTI)",
                "exec",
                lambda: store.get_context("c-10000", budget=TURN_BUDGET),
            ),
            (
                "read: get_context(budget=8000), history 10,000 (MULTI)",
                "exec",
                lambda: store.get_context("c-10000", budget=8_000),
            ),
            (
                "read.lua (the fallback), budget=3000, history 10,000",
                "evalsha",
                lambda: store._run(store.ops.context_window("c-10000", TURN_BUDGET)),
            ),
            (
                "turn: append_and_get_context(budget=3000), history 10,000",
                "exec",
                lambda: turn("t-10000", grow_t10k),
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
            warm = label.startswith(("RPUSH", "Lua", "peek", "read", "turn"))
            for _ in range(20 if warm else 0):
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
                for name, calls in cmdstats(stats).items():
                    if name not in (command, "info", "config", "copy"):
                        inside[label].setdefault(name, []).append(calls / n)
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


class CostReport:
    """The report's cost section (a mixin of :class:`bench.main.Report`)."""

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
            "hence the isolation). *Inside*: commands the script ran per call. A read is one "
            "MULTI of plain commands (its EXEC's time includes them), read.lua only its "
            "fallback; at budget 3,000 a read returns 37 messages.\n\n"
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
