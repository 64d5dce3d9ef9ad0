"""Operator views and actions behind ``convstate inspect|stats|compact|requeue`` (sync)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis

from convstate.compactor import ShardStatus
from convstate.errors import from_script_error
from convstate.keys import KeySchema
from convstate.models import SessionState
from convstate.operations import Operations, StoreConfig
from convstate.scripts import run_script, script_source


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
