"""Fault injection: :class:`_Faults` injects each fault kind of the schedule and gives it
its recovery conditions."""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from tests.reliability.soak.config import SoakError
from tests.reliability.soak.daemons import DaemonHandle
from tests.reliability.soak.invariants import _text
from tests.reliability.soak.monitor import _Condition, pubsub_ids
from tests.reliability.soak.result import FaultRecord

if TYPE_CHECKING:  # (the run imports this module)
    from tests.reliability.soak.run import _Soak


#: Seconds a ``memory_full`` fault holds the server at its maxmemory.
MEMORY_FULL_S = 2.0


#: Milliseconds of ``CLIENT PAUSE ... WRITE``.
PAUSE_MS = 300


#: Seconds a ``replica_demote`` fault keeps the server read-only.
DEMOTE_S = 1.5


class _Faults:
    """Injects the faults of a run, each with its recovery conditions."""

    def __init__(self, soak: _Soak) -> None:
        self.soak = soak

    def inject(self, kind: str, offset: float) -> FaultRecord:
        method: Callable[[], tuple[float, float, dict[str, Any], list[_Condition]]] = getattr(
            self, f"_{kind}"
        )
        started, injected, details, conditions = method()
        record = FaultRecord(kind, offset, started, injected, details)
        record.details["conditions"] = [c.name for c in conditions]
        self.soak.fault_conditions.append([self.soak.monitor.add(c) for c in conditions])
        return record

    def _live_leases(self) -> list[tuple[str, str]]:
        """(session, lease token) of every compaction in flight."""
        schema, admin = self.soak.config.schema(), self.soak.admin
        pipe = admin.pipeline(transaction=False)
        for shard in range(self.soak.config.shards):
            pipe.zrange(schema.running(shard), 0, -1)
        sids = [_text(member) for members in pipe.execute() for member in members]
        if not sids:
            return []
        for sid in sids:
            pipe.hget(schema.session(sid).meta, "lease")
        tokens = pipe.execute()
        return [
            (sid, _text(token))
            for sid, token in zip(sids, tokens, strict=True)
            if token is not None
        ]

    def _subscribed(self, old: set[str], new_needed: int) -> _Condition:
        need = len(self.soak.daemons_alive())
        channel = self.soak.config.schema().wake_channel

        def check(client: redis.Redis) -> bool:
            ids = pubsub_ids(client, channel)
            return len(ids) >= need and len(ids - old) >= new_needed

        return _Condition("daemons_subscribed", check)

    def _stuck_leases(self, victim: DaemonHandle) -> tuple[float, list[tuple[str, str]]]:
        """Freeze ``victim`` (SIGSTOP) at a moment it holds a lease, so that the kill lands
        mid-compaction: a lease still held, with the same token, 0.3 s after the freeze
        belongs to the frozen daemon (the other one finishes a compaction in milliseconds).
        Tries for up to 3 s; returns (when the victim was frozen for good, its leases)."""
        deadline = time.monotonic() + 3.0
        while True:
            frozen_at = time.time()
            victim.proc.send_signal(signal.SIGSTOP)
            first = set(self._live_leases())
            if first:
                time.sleep(0.3)
                stuck = sorted(first & set(self._live_leases()))
                if stuck or time.monotonic() > deadline:
                    return frozen_at, stuck
            elif time.monotonic() > deadline:
                return frozen_at, []
            victim.proc.send_signal(signal.SIGCONT)
            time.sleep(random.uniform(0.02, 0.1))

    def _kill_daemon(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        soak = self.soak
        schema = soak.config.schema()
        victim = soak.daemons_alive()[0]
        old_subscribers = pubsub_ids(soak.admin, schema.wake_channel)
        started, orphans = self._stuck_leases(victim)
        epochs = {
            sid: int(_text(soak.admin.hget(schema.session(sid).meta, "epoch") or 0))
            for sid, _ in orphans
        }
        rc = victim.kill9()
        injected = time.time()
        replacement = soak.start_daemon()

        def taken_over(client: redis.Redis) -> bool:
            """Every session the victim held was reaped and compacted by another daemon
            (or, if it could not be compacted any more, left idle)."""
            for sid, token in orphans:
                lease, state, epoch = client.hmget(
                    schema.session(sid).meta, "lease", "state", "epoch"
                )
                if lease is not None and _text(lease) == token:
                    return False
                if _text(state) == "idle":
                    continue
                if int(_text(epoch or 0)) <= epochs[sid]:
                    return False
            return True

        details = {
            "victim": victim.name,
            "victim_pid": victim.pid,
            "exit": rc,
            "replacement": replacement.name,
            "victim_leases": len(orphans),
        }
        conditions = [
            self._subscribed(old_subscribers, 1),
            _Condition("victim_sessions_taken_over", taken_over),
        ]
        return started, injected, details, conditions

    def _script_flush(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        started = time.time()
        self.soak.admin.script_flush()
        return started, time.time(), {}, []

    def _client_kill(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        started = time.time()
        killed = self.soak.admin.client_kill_filter(_type="normal")
        return started, time.time(), {"clients_killed": killed}, []

    def _client_pause(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        started = time.time()
        self.soak.admin.client_pause(PAUSE_MS, all=False)
        return started, started + PAUSE_MS / 1000, {"pause_ms": PAUSE_MS}, []

    def _replica_demote(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        admin = self.soak.admin
        with socket.socket() as sock:  # a port nobody listens on: the "new primary" is gone
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        started = time.time()
        admin.execute_command("REPLICAOF", "127.0.0.1", port)  # type: ignore[no-untyped-call]
        time.sleep(DEMOTE_S)
        admin.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
        return started, time.time(), {"read_only_s": DEMOTE_S}, []

    def _memory_full(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        """Hold the server at its maxmemory (noeviction) for :data:`MEMORY_FULL_S` seconds:
        every append is refused meanwhile, while the daemons must keep compacting."""
        soak, admin = self.soak, self.soak.admin
        configured = admin.config_get("maxmemory")["maxmemory"]
        started = time.time()
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", used)
        try:
            time.sleep(MEMORY_FULL_S)
            still = int(admin.info("memory")["used_memory"])
        finally:
            admin.config_set("maxmemory", configured)
        injected = time.time()
        details = {
            "full_s": MEMORY_FULL_S,
            "maxmemory_while_full": used,
            "used_memory_at_end": still,
            "compactions_while_full": len(soak.monitor.compactions_between(started, injected)),
        }
        return started, injected, details, []

    def _redis_crash(self) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        return self._redis_restart(crash=True)

    def _redis_restart(
        self, *, crash: bool = False
    ) -> tuple[float, float, dict[str, Any], list[_Condition]]:
        soak = self.soak
        server = soak.server
        before = (server.port, str(server.dir), server.pid)
        started = time.time()
        if crash and server.pid is not None:
            os.kill(server.pid, signal.SIGKILL)
            while server.running:  # reaped by RedisServer's Popen.poll()
                time.sleep(0.001)
        server.restart()  # same port, same directory: the AOF is loaded again
        injected = time.time()
        after = (server.port, str(server.dir), server.pid)
        if before[:2] != after[:2]:
            raise SoakError(f"restart moved the server: {before} -> {after}")
        aof = soak.admin.config_get("appendonly")
        details = {
            "downtime_s": round(injected - started, 3),
            "same_port_and_dir": True,
            "old_pid": before[2],
            "new_pid": after[2],
            "appendonly": aof.get("appendonly"),
        }
        return started, injected, details, [self._subscribed(set(), 0)]
