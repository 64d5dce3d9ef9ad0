"""The one fixed-latency fake summarizer of the benchmarks (``scripts/bench`` [6] and
``scripts/bench_compaction.py``): it sleeps, then returns a short text, so that a compaction's
time is the model's fixed latency plus only the daemon's own work."""

from __future__ import annotations

import asyncio

from convstate.summarizers import Summary, SummaryRequest

#: Seconds one summary takes.
SLEEP_S = 0.2


class SleepSummarizer:
    """A :class:`~convstate.summarizers.Summarizer` that takes 200 ms and returns a short text,
    so that only the daemon's own work (claim, snapshot, plan, swap) adds to the 200 ms."""

    name = "sleep200"

    def __init__(self, seconds: float = SLEEP_S) -> None:
        self.seconds = seconds
        self.calls = 0

    async def summarize(self, request: SummaryRequest) -> Summary:
        self.calls += 1
        await asyncio.sleep(self.seconds)
        first = request.messages[0] if request.messages else {}
        text = (
            f"The user and the assistant exchanged {len(request.messages)} messages about a "
            f"trip; it began with a {first.get('role', 'user')} message."
        )
        return Summary(text=text, model="sleep200")
