"""[3] ``get_context`` latency against history length and budget."""

from __future__ import annotations

from bench.core import BUDGETS, H_READ, SYSTEM, Series
from bench.data import prefill
from bench.report import n, t, table, x
from bench.timing import Step, p, ratio_rounds, run_round
from convstate.tokens import count_prompt


class ReadsMeasure:
    """Measures reads (a mixin of :class:`bench.main.Bench`)."""

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


class ReadsReport:
    """The report's reads section (a mixin of :class:`bench.main.Report`)."""

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
            "with the reply priming). The read fetches the session's head and about as many "
            "of its newest records as its last window held (one MULTI) and cuts the window "
            "where the budget is full, so its cost should follow the budget, not H.\n\n"
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
