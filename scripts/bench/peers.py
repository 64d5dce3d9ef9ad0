"""The peer libraries measured against (optional: ``pip install -e '.[bench]'``): openai-agents
``RedisSession`` and LlamaIndex ``RedisChatStore`` + ``ChatMemoryBuffer``; one LlamaIndex turn
in a child process; the table of what each flow does."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from typing import Any

from bench.core import TEXT, TURN_BUDGET
from bench.report import table
from convstate.embedded import RedisServer

__all__ = [
    "LLAMA_CHILD",
    "PEER_NOTES",
    "PEER_ROWS",
    "ChatMemoryBuffer",
    "ChatMessage",
    "RedisChatStore",
    "RedisSession",
    "llama_child",
]

try:  # the peers are optional: `pip install -e '.[bench]'`
    from agents.extensions.memory import RedisSession
except ImportError:  # pragma: no cover - reported in the output
    RedisSession = None
try:
    from llama_index.core.llms import ChatMessage
    from llama_index.core.memory import ChatMemoryBuffer
    from llama_index.storage.chat_store.redis import RedisChatStore
except ImportError:  # pragma: no cover - reported in the output
    ChatMemoryBuffer = None
    ChatMessage = None
    RedisChatStore = None


#: One LlamaIndex turn in a child process, so that a turn longer than the cap can be stopped.
LLAMA_CHILD = r"""
import sys, time
import redis, redis.asyncio
from llama_index.core.llms import ChatMessage
from llama_index.core.memory import ChatMemoryBuffer
from llama_index.storage.chat_store.redis import RedisChatStore
host, port, key, text, limit = sys.argv[1:6]
client = redis.Redis(host=host, port=int(port))
aclient = redis.asyncio.Redis(host=host, port=int(port))
store = RedisChatStore(redis_client=client, aredis_client=aclient)
memory = ChatMemoryBuffer.from_defaults(
    token_limit=int(limit), chat_store=store, chat_store_key=key
)
memory.tokenizer_fn("warm up")
print("ready", flush=True)
start = time.perf_counter()
memory.put(ChatMessage(role="user", content=text))
memory.get()
print(f"done {time.perf_counter() - start:.6f}", flush=True)
"""


def llama_child(server: RedisServer, key: str, cap_s: float) -> dict[str, Any]:
    """Time one LlamaIndex turn in a child process, stopped after ``cap_s`` seconds."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LLAMA_CHILD,
            server.host,
            str(server.port),
            key,
            TEXT,
            str(TURN_BUDGET),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        if not ready or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the LlamaIndex child did not start")
        started = time.perf_counter()
        try:
            proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            return {"finished": False, "seconds": time.perf_counter() - started}
        line = proc.stdout.readline().split()
        return {"finished": True, "seconds": float(line[1])}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


PEER_ROWS = (
    (
        "round trips per turn",
        "2 (one script appends, one reads); 1 with append_and_get_context (one MULTI)",
        "5 (WATCH, TYPE x2, MULTI/EXEC; LRANGE), 7 with a TTL (counted by the server)",
        "2 (RPUSH; LRANGE of the whole list), 3 with a TTL (EXPIRE)",
    ),
    (
        "atomic append with totals",
        "yes: store, exact token and message totals, flag, TTL in one script",
        "a WATCH/MULTI transaction; no token totals",
        "RPUSH; no totals (the buffer re-tokenizes on every read)",
    ),
    (
        "budgeted read",
        "yes: the newest messages that fit, walked back in the server; cost follows the budget",
        "no: `get_items` reads and parses the whole list (`limit` counts items, not tokens)",
        "client-side: reads and validates the whole list, then re-tokenizes what remains for "
        "every message it drops (quadratic)",
    ),
    (
        "compaction",
        "background daemon: rolling summary, lossless swap of the folded prefix",
        "none in RedisSession (the SDK's `OpenAIResponsesCompactionSession` wrapper calls "
        "OpenAI's hosted `responses.compact` in the request path; not measured)",
        "none (`ChatSummaryMemoryBuffer` summarizes inline and rewrites the list message by "
        "message; both buffers are deprecated for `Memory`, which needs a SQL store)",
    ),
    (
        "idempotent retries",
        "yes: every message has an id; a retried append is dropped",
        "no idempotency key",
        "no idempotency key",
    ),
    (
        "token counting",
        "exact, once per message, client-side (tiktoken)",
        "none",
        "on every read, of the whole remaining history",
    ),
)
PEER_NOTES = "What each flow does, and does not do:\n\n" + table(
    ["", "convstate", "openai-agents RedisSession", "LlamaIndex RedisChatStore + ChatMemoryBuffer"],
    PEER_ROWS,
)
