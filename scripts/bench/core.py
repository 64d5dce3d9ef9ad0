"""What every measurement shares: the constants, the settings, and :class:`BenchBase` (the
private server, clients and stores a measurement asks for)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

import bench_append as ba
from convstate import AsyncConversationStore, ConversationStore
from convstate.embedded import RedisServer
from convstate.tokens import TiktokenCounter

ENCODING = ba.ENCODING
TEXT = ba.TEXT
SYSTEM = ba.SYSTEM
NO_FLAG_LIMIT = ba.NO_FLAG_LIMIT
SHORT_TEXT = "Sounds good, please book it for Friday."

TURN_BUDGET = 3000  # convstate's get_context budget and ChatMemoryBuffer's token_limit
H_APPEND = (10, 100, 1_000, 10_000)
H_TURN = (10, 100, 1_000, 5_000)
H_READ = (100, 300, 1_000, 3_000, 10_000)
BUDGETS = (500, 2_000, 8_000)
IN_FLIGHT = 32
COMPACTION_CONCURRENCY = (1, 4, 16, 32)
MEMORY_MESSAGES = 1_000
CONVERSATION_TURNS = 500
CONVERSATION_LIMIT = 4_000  # the session's token limit, and the budget of every read
PREFILL_BATCH = 500

#: ../shared/ANCHORS.md: p50 of one turn, as a ratio to bare RPUSH (LlamaIndex at 1,000 and
#: 5,000 in seconds), measured on a machine like this one.
ANCHOR_RPUSH_US = {10: 165, 100: 154, 1_000: 136, 5_000: 131}
ANCHOR_RATIO = {
    "lua": {10: 1.6, 100: 1.9, 1_000: 1.9, 5_000: 1.3},
    "agents": {10: 5.9, 100: 8.6, 1_000: 26, 5_000: 108},
    "llama": {10: 5.0, 100: 377},
}
ANCHOR_LLAMA_S = {1_000: 4.76, 5_000: 134.6}

Series = ba.Series


def chat(i: int, text: str = TEXT) -> dict[str, Any]:
    return {"role": ("user", "assistant")[i % 2], "content": text}


@dataclass
class Settings:
    quick: bool
    runs: int
    seq_ops: int  # [1] sequential appends per variant, history and run
    bursts: int  # [1] bursts of IN_FLIGHT x 10 appends per variant, history and run
    turn_ops: int  # [2] turns per flow, history and run (before the cap)
    cell_cap_s: float  # [2] time cap of one (flow, history) cell over all runs
    read_ops: int  # [3]
    cost_ops: int  # [4]
    compaction_runs: int  # [6]
    sessions_per_worker: int  # [6]
    model_delay_s: float  # [6] the model's latency in the scripted conversation
    count_ops: int  # [7]
    chunk: int = 25
    llama_child: bool = True


class BenchBase:
    """The server, the event loop, the counter and the results (``r``) of a run; each
    measurement is a mixin of :class:`bench.main.Bench` adding one method."""

    def __init__(self, server: RedisServer, settings: Settings) -> None:
        self.server = server
        self.s = settings
        self.admin = server.client()
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.counter = TiktokenCounter(encoding=ENCODING)
        self.r: dict[str, Any] = {}
        self._closers: list[Callable[[], Any]] = []

    # -- clients ---------------------------------------------------------------------------------

    def raw(self) -> redis.Redis:
        client = redis.Redis(host=self.server.host, port=self.server.port)
        self._closers.append(client.close)
        return client

    def araw(self) -> redis.asyncio.Redis:
        client = redis.asyncio.Redis(host=self.server.host, port=self.server.port)
        self._closers.append(lambda: self.loop.run_until_complete(client.aclose()))
        return client

    def store(self, prefix: str = "b", limit: int = NO_FLAG_LIMIT) -> ConversationStore:
        return ConversationStore(self.raw(), token_limit=limit, counter=self.counter, prefix=prefix)

    def astore(self, prefix: str = "b", limit: int = NO_FLAG_LIMIT) -> AsyncConversationStore:
        return AsyncConversationStore(
            self.araw(), token_limit=limit, counter=self.counter, prefix=prefix
        )

    def close(self) -> None:
        for closer in reversed(self._closers):
            closer()
        self.admin.close()
        self.loop.close()

    def body(self, store: ConversationStore) -> str:
        """The stored record of TEXT: what RPUSH and the Lua baseline push."""
        return store.ops.encode_message(chat(0), store.ops.clock()).json


def usage(client: redis.Redis, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)
