"""Operator views and actions behind ``convstate inspect|stats|compact|requeue|scripts`` (sync)."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis

from convstate.compactor import ShardStatus
from convstate.errors import ConfigurationError, from_script_error
from convstate.keys import KeySchema
from convstate.models import SessionState
from convstate.operations import Operations, StoreConfig
from convstate.scripts import SCRIPT_NAMES, run_script, script_source


class _NoCounter:
    """Operator reads never count tokens."""

    reply_priming = 0

    def count_message(self, message: Mapping[str, Any]) -> int:
        return 0


@dataclass(frozen=True)
class Stats:
    """Totals over every shard, plus the dead-letter sessions."""

    shards: int
    queued: int
    due: int
    running: int
    expired_leases: int
    dead: int
    oldest_flagged_age_s: float | None
    dead_sessions: list[tuple[str, int]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
            raise (from_script_error(str(exc)) or exc) from exc

    def inspect(self, session_id: str) -> SessionState:
        """The whole session, summaries included."""
        op = self._ops.state(session_id)
        return op.decode(self._call(op.script, op.keys, op.args))

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
        dead: list[tuple[str, int]] = []
        for st in statuses:
            if st.dead:
                rows: list[tuple[bytes, float]] = self.redis.zrange(  # type: ignore[assignment]
                    self.schema.dead(st.shard), 0, -1, withscores=True
                )
                dead.extend((sid.decode(), int(score)) for sid, score in rows)
        oldest = [st.oldest_queued_ms for st in statuses if st.queued]
        return Stats(
            shards=len(statuses),
            queued=sum(st.queued for st in statuses),
            due=sum(st.due for st in statuses),
            running=sum(st.running for st in statuses),
            expired_leases=sum(st.expired for st in statuses),
            dead=sum(st.dead for st in statuses),
            oldest_flagged_age_s=round(max(0.0, time.time() - min(oldest) / 1000), 3)
            if oldest
            else None,
            dead_sessions=sorted(dead, key=lambda item: item[1]),
        )

    def requeue(self, session_id: str, *, only_dead: bool) -> bool:
        """Queue a session for compaction now (``only_dead``: only from the dead-letter state).
        False if it is running, already queued, or (``only_dead``) not dead."""
        keys = self.schema.session(session_id)
        reply = self._call(
            "requeue",
            [keys.queue, keys.meta, keys.dead],
            [session_id, self.schema.wake_channel, "dead" if only_dead else "any"],
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
        for name, src in sources.items():
            sha = node.script_load(src)
            if sha != expected[name]:
                raise ConfigurationError(
                    f"{where} answered SCRIPT LOAD of {name}.lua with {sha!r}, expected "
                    f"{expected[name]}: is this a Redis-compatible server?"
                )
        present = node.script_exists(*expected.values())
        missing = [n for n, ok in zip(expected, present, strict=True) if not ok]
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
