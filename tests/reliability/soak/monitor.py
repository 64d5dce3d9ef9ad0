"""The monitor: a thread that samples, while the soak runs, every session's compaction
state and the shard sets (live-state invariants, compactions placed in time) and the pending
recovery conditions of the faults."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from convstate.verify import SessionSnapshot, check_state
from tests.reliability.soak.config import SoakConfig
from tests.reliability.soak.invariants import InvariantReport, _text


@dataclass
class _Condition:
    name: str
    check: Callable[[redis.Redis], bool]
    satisfied_at: float | None = None


def pubsub_ids(client: redis.Redis, channel: str) -> set[str]:
    """Ids of the pub/sub clients (the daemons' wake-up listeners)."""
    entries: list[dict[str, Any]] = client.client_list(_type="pubsub")
    return {str(e["id"]) for e in entries if int(e.get("sub", 0)) > 0}


class _Monitor(threading.Thread):
    """Samples, every ``monitor_interval`` seconds, one consistent snapshot: each session's
    ``compacted_at`` (so compactions can be placed in time) and compaction state against the
    queues (live-state invariants), then the pending recovery conditions."""

    def __init__(self, url: str, config: SoakConfig) -> None:
        super().__init__(name="soak-monitor", daemon=True)
        self.client = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        self.config = config
        self.schema = config.schema()
        self.sessions = config.session_ids()
        self.compactions: set[tuple[str, int]] = set()
        self.conditions: list[_Condition] = []
        self.max_queued = 0
        self.max_running = 0
        self.samples = 0
        #: The longest an expired lease was seen in a run set (ms; <= 0: none expired).
        self.max_expired_lease_ms = -(10**9)
        #: How long an expired lease may stay before the daemons' sweep must have reaped it.
        self.stale_lease_ms = int((2 * config.sweep_interval + 5) * 1000)
        #: Violations of the live-state invariants seen in the snapshots.
        self.violations = InvariantReport()
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def add(self, condition: _Condition) -> _Condition:
        with self._lock:
            self.conditions.append(condition)
        return condition

    def run(self) -> None:
        while not self._halt.wait(self.config.monitor_interval):
            try:
                self.tick()
            except redis.RedisError as exc:
                self.errors[type(exc).__name__] += 1

    def tick(self) -> None:
        """One consistent snapshot (MULTI/EXEC) of every session's compaction state and of
        every shard's queue, running and dead sets; then the pending conditions."""
        schema = self.schema
        pipe = self.client.pipeline(transaction=True)
        pipe.time()
        for sid in self.sessions:
            pipe.hmget(schema.session(sid).meta, "compacted_at", "state", "lease", "lease_deadline")
        for shard in range(self.config.shards):
            pipe.zrange(schema.queue(shard), 0, -1)
            pipe.zrange(schema.running(shard), 0, -1, withscores=True)
            pipe.zrange(schema.dead(shard), 0, -1)
        replies = pipe.execute()
        seconds, micros = replies[0]
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        n = len(self.sessions)
        sets = replies[1 + n :]
        queued = {_text(m) for members in sets[0::3] for m in members}
        running = {_text(m): float(score) for members in sets[1::3] for m, score in members}
        dead = {_text(m) for members in sets[2::3] for m in members}
        self.max_queued = max(self.max_queued, len(queued))
        self.max_running = max(self.max_running, len(running))
        self.samples += 1
        for sid, values in zip(self.sessions, replies[1 : 1 + n], strict=True):
            compacted_at, state, lease, deadline = (None if v is None else _text(v) for v in values)
            if compacted_at is not None:
                self.compactions.add((sid, int(compacted_at)))
            self._check_live(sid, state, lease, deadline, queued, running, dead, now_ms)
        with self._lock:
            pending = [c for c in self.conditions if c.satisfied_at is None]
        for condition in pending:
            if condition.check(self.client):
                condition.satisfied_at = time.time()

    def _check_live(
        self,
        sid: str,
        state: str | None,
        lease: str | None,
        deadline: str | None,
        queued: set[str],
        running: dict[str, float],
        dead: set[str],
        now_ms: int,
    ) -> None:
        """While the soak runs, in every snapshot: ``running`` iff in the run set, with a
        lease token and a ``lease_deadline`` equal to its run-set score; ``queued`` iff in the
        queue; ``dead`` iff in the dead set. An expired lease is taken back within
        :attr:`stale_lease_ms` (a daemon's sweep reaps it)."""
        where = f"session {sid}"
        score = running.get(sid)
        meta = {
            name: value
            for name, value in (("state", state), ("lease", lease), ("lease_deadline", deadline))
            if value is not None
        }
        snapshot = SessionSnapshot(
            sid,
            meta,
            (),
            queued=0.0 if sid in queued else None,
            running=score,
            dead=0.0 if sid in dead else None,
        )
        for violation in check_state(snapshot):  # convstate.verify's state checks
            self.violations.add("live_state", f"{where}: {violation.detail}")
        if score is not None and now_ms - score > self.stale_lease_ms:
            self.violations.add(
                "stale_lease",
                f"{where}: lease expired {(now_ms - score) / 1000:.1f} s ago and not taken back",
            )
        if score is not None:
            self.max_expired_lease_ms = max(self.max_expired_lease_ms, int(now_ms - score))

    def compactions_between(self, start: float, end: float) -> list[float]:
        return sorted(at / 1000 for _, at in self.compactions if start * 1000 <= at < end * 1000)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.client.close()
