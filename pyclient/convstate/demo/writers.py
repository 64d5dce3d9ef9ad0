"""The writer processes: each appends its sessions' scripted exchanges through its own
:class:`ConversationStore`, at a chat-like pace, and reports every acknowledged append."""

from __future__ import annotations

import heapq
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from convstate.client import ConversationStore
from convstate.demo.options import WRITE_SHARE, WRITE_STOP_SHARE
from convstate.demo.scenario import build_conversation

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event


@dataclass(frozen=True)
class WriterSpec:
    """What one writer process does (pickled to the spawned process)."""

    index: int
    redis_url: str
    prefix: str
    shards: int
    token_limit: int
    encoding: str
    sessions: tuple[tuple[int, str], ...]  # (session index, session id)
    turns: int
    duration: float
    started_at: float  # time.time() when the demo started
    seed: int


class WriterEvent(NamedTuple):
    """What a writer reports: ``ready``, ``ack`` (one acknowledged append), ``error``, ``done``."""

    kind: str
    writer: int
    session: str = ""
    message_id: str = ""
    role: str = ""
    tokens: int = 0
    flagged: bool = False
    total: int = 0
    text: str = ""


class _Step(NamedTuple):
    delay: float  # seconds after the session's previous step
    message: dict[str, Any]


#: Share of an exchange's time before each of its messages (typing, thinking, tool latency).
_PLAIN_SHARES = (0.55, 0.45)
_TOOL_SHARES = (0.45, 0.2, 0.1, 0.25)


def _steps(
    exchanges: Sequence[Sequence[dict[str, Any]]], pace: float, rng: random.Random
) -> list[_Step]:
    steps: list[_Step] = []
    for exchange in exchanges:
        shares = _TOOL_SHARES if len(exchange) == len(_TOOL_SHARES) else _PLAIN_SHARES
        for share, message in zip(shares, exchange, strict=True):
            steps.append(_Step(pace * share * rng.uniform(0.6, 1.4), message))
    return steps


def writer_main(spec: WriterSpec, events: Queue[WriterEvent], go: Event, stop: Event) -> None:
    """A writer process: append its sessions' exchanges, interleaved, and report each ack."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which sets `stop`
    sent = 0
    failed = False
    store: ConversationStore | None = None
    try:
        store = ConversationStore.from_url(
            spec.redis_url,
            token_limit=spec.token_limit,
            encoding=spec.encoding,
            prefix=spec.prefix,
            shards=spec.shards,
            socket_timeout=10,
        )
        store.counter.count_message({"role": "user", "content": "load the encoding now"})
        rng = random.Random(spec.seed)
        events.put(WriterEvent("ready", spec.index))
        while not go.wait(0.2):
            if stop.is_set():
                return
        # Pace: finish within WRITE_SHARE of the duration, whatever the start-up took.
        window = spec.duration * WRITE_SHARE - (time.time() - spec.started_at)
        pace = max(0.3, window) / spec.turns
        stop_at = spec.started_at + spec.duration * WRITE_STOP_SHARE
        plans = [
            (sid, _steps(build_conversation(index, spec.turns)[1], pace, rng))
            for index, sid in spec.sessions
        ]
        start = time.monotonic()
        heap = [
            (start + steps[0].delay + rng.uniform(0, pace), slot, 0)
            for slot, (_, steps) in enumerate(plans)
        ]
        heapq.heapify(heap)
        while heap:
            due, slot, step = heapq.heappop(heap)
            wait = due - time.monotonic()
            if (wait > 0 and stop.wait(wait)) or stop.is_set() or time.time() >= stop_at:
                break
            sid, steps = plans[slot]
            message = steps[step].message
            result = store.append(sid, message)
            tokens = store.counter.count_message(message)
            events.put(
                WriterEvent(
                    "ack",
                    spec.index,
                    sid,
                    result.message_ids[0],
                    str(message["role"]),
                    tokens,
                    result.flagged,
                )
            )
            sent += 1
            if step + 1 < len(steps):
                next_due = max(due, time.monotonic()) + steps[step + 1].delay
                heapq.heappush(heap, (next_due, slot, step + 1))
    except Exception as exc:
        failed = True
        events.put(WriterEvent("error", spec.index, text=f"{type(exc).__name__}: {exc}"))
    finally:
        events.put(WriterEvent("done", spec.index, total=sent))
        if store is not None:
            store.close()
    if failed:
        sys.exit(1)
