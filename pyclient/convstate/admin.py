"""Operator views and actions behind ``convstate inspect|stats|compact|requeue|scripts`` (sync)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import redis

from convstate.errors import ConfigurationError, from_script_error
from convstate.keys import KeySchema
from convstate.models import SessionState, ShardStatus, ms_to_datetime
from convstate.operations import Operations, StoreConfig, decode_record, merge_history
from convstate.scripts import (
    FLAGS_LINE,
    SCRIPT_NAMES,
    run_script,
    script_source,
    sha1,
    without_flags,
)
from convstate.verify import VerifyReport, verify_sessions


class _NoCounter:
    """Operator reads never count tokens."""

    reply_priming = 0

    def count_message(self, message: Mapping[str, Any]) -> int:
        return 0


def iso_ms(ms: int | None) -> str | None:
    """Milliseconds since the epoch -> ISO 8601 UTC (``2026-12-05T07:55:15.123Z``); the one
    timestamp format of the CLI's JSON."""
    if ms is None:
        return None
    return iso(ms_to_datetime(ms))


def iso(when: datetime) -> str:
    """An aware datetime -> ISO 8601 UTC with milliseconds and a ``Z``."""
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class DeadSession:
    """A session in the dead-letter state, and since when (ms since the epoch)."""

    session_id: str
    dead_at_ms: int


@dataclass(frozen=True)
class Stats:
    """Totals over every shard, plus the dead-letter sessions and each shard's status."""

    shards: int
    queued: int
    due: int
    running: int
    expired_leases: int
    dead: int
    oldest_flagged_age_s: float | None
    dead_sessions: list[DeadSession]
    per_shard: list[ShardStatus] = field(default_factory=list)

    def as_dict(self, *, per_shard: bool = False) -> dict[str, Any]:
        """JSON-ready: objects rather than pairs, timestamps in ISO 8601; ``per_shard`` adds
        the shards that hold anything (an idle shard is all zeros)."""
        doc: dict[str, Any] = {
            "shards": self.shards,
            "queued": self.queued,
            "due": self.due,
            "running": self.running,
            "expired_leases": self.expired_leases,
            "dead": self.dead,
            "oldest_flagged_age_s": self.oldest_flagged_age_s,
            "dead_sessions": [
                {"session_id": d.session_id, "dead_at": iso_ms(d.dead_at_ms)}
                for d in self.dead_sessions
            ],
        }
        if per_shard:
            doc["per_shard"] = [
                {
                    "shard": st.shard,
                    "queued": st.queued,
                    "due": st.due,
                    "running": st.running,
                    "expired_leases": st.expired,
                    "dead": st.dead,
                    "oldest_flagged_at": iso_ms(st.oldest_queued_ms) if st.queued else None,
                }
                for st in self.busy_shards()
            ]
        return doc

    def busy_shards(self) -> list[ShardStatus]:
        """The shards with anything queued, running or dead."""
        return [st for st in self.per_shard if st.queued or st.running or st.dead]


@dataclass(frozen=True)
class ScriptsLoaded:
    """What ``convstate scripts load`` put in the script cache: each script's SHA1 and the
    nodes (``host:port``) that now hold every one of them, and the cluster nodes skipped
    because CLUSTER NODES reports them failed or unreachable."""

    scripts: dict[str, str]
    nodes: list[str]
    skipped: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Admin:
    """Read-mostly operator access to a deployment (prefix + shard count)."""

    def __init__(self, client: redis.Redis, schema: KeySchema) -> None:
        self.redis = client
        self.schema = schema
        self._ops = Operations(schema, _NoCounter(), StoreConfig(token_limit=1))
        self._scripts = {
            name: client.register_script(script_source(name))
            for name in ("state", "peek", "requeue")
        }

    def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script again on NOSCRIPT (see :func:`run_script`)."""
        try:
            return run_script(self.redis, self._scripts[name], keys, args)
        except redis.ResponseError as exc:
            typed = from_script_error(str(exc))
            if typed is None:
                raise
            raise typed from None

    def recorded_shards(self) -> int | None:
        """The shard count recorded in Redis for the prefix (by the first client or daemon),
        or None if nothing was recorded yet. Read only: the operator commands never record."""
        value: Any = self.redis.hget(self.schema.config, "shards")
        return None if value is None else int(value)

    def meta(self, session_id: str) -> SessionState:
        """The session's meta and context, without its messages."""
        keys = self.schema.session(session_id)
        reply = self._call("state", [keys.msgs, keys.meta], [session_id, 0])
        return self._ops.state(session_id).decode(reply)

    def inspect(self, session_id: str, *, archive: bool = False) -> SessionState:
        """The whole session, summaries included; with ``archive``, its messages are the
        whole history (:func:`~convstate.operations.merge_history`: archived originals
        marked ``"archived": True``). One round trip."""
        keys = self.schema.session(session_id)
        if not archive:
            op = self._ops.state(session_id)
            return op.decode(self._call(op.script, op.keys, op.args))
        reply = self._call("state", [keys.msgs, keys.meta, keys.archive], [session_id, 2])
        state = self._ops.state(session_id).decode(reply[:2])
        history = merge_history(state.messages, [decode_record(raw) for raw in reply[2]])
        return SessionState(session_id, history, state.context, state.meta)

    def verify(self, session_ids: Iterable[str]) -> VerifyReport:
        """Check that each session is whole (:mod:`convstate.verify`): every stored record
        once, totals equal to the sum of its records, state consistent with the shard's sets."""
        return verify_sessions(self.redis, self.schema, session_ids)

    def shard_statuses(self) -> list[ShardStatus]:
        """Every shard's queue, running and dead-letter counts: one pipelined round trip on a
        standalone server; one peek per shard on a cluster (redis-py refuses EVALSHA in a
        cluster pipeline, and each shard's keys live on the master of its own slot)."""
        s = self.schema
        if isinstance(self.redis, redis.RedisCluster):
            return [self._peek(shard) for shard in range(s.shards)]
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(s.shards):
            self._scripts["peek"](
                keys=[s.queue(shard), s.running(shard), s.dead(shard)], args=[], client=pipe
            )
        return [
            ShardStatus(shard, *(int(x) for x in reply))
            for shard, reply in enumerate(pipe.execute())
        ]

    def _peek(self, shard: int) -> ShardStatus:
        s = self.schema
        reply = self._call("peek", [s.queue(shard), s.running(shard), s.dead(shard)], [])
        return ShardStatus(shard, *(int(x) for x in reply))

    def stats(self) -> Stats:
        statuses = self.shard_statuses()
        dead: list[DeadSession] = []
        for st in statuses:
            if st.dead:
                rows: list[tuple[bytes, float]] = self.redis.zrange(  # type: ignore[assignment]
                    self.schema.dead(st.shard), 0, -1, withscores=True
                )
                dead.extend(DeadSession(sid.decode(), int(score)) for sid, score in rows)
        oldest = [st.oldest_queued_ms for st in statuses if st.queued]
        # Flag times are the server's clock: measure the age on it too (a shard with a queue
        # was read with the server's time).
        now = max(st.server_ms for st in statuses) / 1000 if oldest else 0.0
        return Stats(
            shards=len(statuses),
            queued=sum(st.queued for st in statuses),
            due=sum(st.due for st in statuses),
            running=sum(st.running for st in statuses),
            expired_leases=sum(st.expired for st in statuses),
            dead=sum(st.dead for st in statuses),
            oldest_flagged_age_s=round(max(0.0, now - min(oldest) / 1000), 3) if oldest else None,
            dead_sessions=sorted(dead, key=lambda item: item.dead_at_ms),
            per_shard=statuses,
        )

    def requeue(self, session_id: str, *, only_dead: bool, force: bool = False) -> bool:
        """Queue a session for compaction now (``only_dead``: only from the dead-letter state).
        False if it is running, already queued, or (``only_dead``) not dead. ``force``: the
        daemon folds everything but the kept recent turns, even if the session already fits
        its target."""
        keys = self.schema.session(session_id)
        which = "dead" if only_dead else "force" if force else "any"
        reply = self._call(
            "requeue",
            [keys.queue, keys.meta, keys.dead],
            [session_id, self.schema.wake_channel, which],
        )
        return bool(int(reply))

    def load_scripts(self) -> ScriptsLoaded:
        """SCRIPT LOAD every shipped script, so the first EVALSHA after a deploy, restart or
        SCRIPT FLUSH finds it cached. On a cluster every node that CLUSTER NODES lists as up
        is loaded, replicas included (the script cache is not replicated, and a promoted
        replica serves the next calls); nodes flagged failed are listed in ``skipped``.
        Each node is then asked SCRIPT EXISTS: a node that does not hold every script raises
        :class:`~convstate.errors.ConfigurationError` rather than reporting success."""
        sources = {name: script_source(name) for name in SCRIPT_NAMES}
        expected = {name: self._scripts_sha(src) for name, src in sources.items()}
        loaded: list[str] = []
        skipped: list[str] = []
        with contextlib.ExitStack() as stack:
            if isinstance(self.redis, redis.RedisCluster):
                targets = self._cluster_nodes(stack, skipped)
            else:
                kw = self.redis.get_connection_kwargs()
                where = kw.get("path") or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
                targets = [(str(where), self.redis)]
            for where, node in targets:
                self._load_on(node, where, sources, expected)
                loaded.append(where)
        return ScriptsLoaded(scripts=expected, nodes=loaded, skipped=skipped)

    @staticmethod
    def _load_on(
        node: redis.Redis, where: str, sources: dict[str, str], expected: dict[str, str]
    ) -> None:
        """Load every script on ``node``. A server without script flags (Redis 6.2) cannot
        compile a ``#!lua flags=...`` line: it gets the script's flag-less form
        (:func:`~convstate.scripts.without_flags`), which the clients try next."""
        shas = dict(expected)
        for name, src in sources.items():
            try:
                sha = node.script_load(src)
            except redis.ResponseError as exc:
                if not src.startswith(FLAGS_LINE) or "near '#'" not in str(exc):
                    raise
                src = without_flags(src)
                shas[name] = sha1(src)
                sha = node.script_load(src)
            if sha != shas[name]:
                raise ConfigurationError(
                    f"{where} answered SCRIPT LOAD of {name}.lua with {sha!r}, expected "
                    f"{shas[name]}: is this a Redis-compatible server?"
                )
        present = node.script_exists(*shas.values())
        missing = [n for n, ok in zip(shas, present, strict=True) if not ok]
        if missing:
            raise ConfigurationError(
                f"{where} does not hold {', '.join(missing)} right after SCRIPT LOAD "
                "(a SCRIPT FLUSH ran meanwhile?): run `convstate scripts load` again"
            )

    def _cluster_nodes(
        self, stack: contextlib.ExitStack, skipped: list[str]
    ) -> list[tuple[str, redis.Redis]]:
        """A direct client to every node of the cluster that is up, with the connection
        settings (TLS, ACL user) of the client we were given. redis-py only tracks primaries
        unless it reads from replicas, so the node list comes from CLUSTER NODES."""
        assert isinstance(self.redis, redis.RedisCluster)
        seed = self.redis.get_default_node().redis_connection
        assert seed is not None
        pool = seed.connection_pool
        targets: list[tuple[str, redis.Redis]] = []
        for where, info in sorted(self.redis.cluster_nodes().items()):
            flags = set(str(info.get("flags", "")).split(","))
            if flags & {"fail", "fail?", "handshake", "noaddr"} or not info.get("connected"):
                skipped.append(where)
                continue
            host, _, port = where.rpartition(":")
            node_pool = redis.ConnectionPool(
                connection_class=pool.connection_class,
                **{**pool.connection_kwargs, "host": host, "port": int(port)},
            )
            targets.append((where, stack.enter_context(redis.Redis.from_pool(node_pool))))
        return targets

    @staticmethod
    def _scripts_sha(source: str) -> str:
        return hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
