"""Timing: operations measured in interleaved chunks (:class:`Step`, :func:`run_round`), bursts
of concurrent operations, and the statistics of the series."""

from __future__ import annotations

import asyncio
import gc
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import redis
import redis.asyncio

from bench.common import percentile
from bench.core import Series

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
        percentile(a, q) / percentile(b, q)
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
