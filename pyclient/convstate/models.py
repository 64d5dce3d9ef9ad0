"""Plain data returned by the clients, the operator views and the compactor."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

#: Compaction states of a session, as stored in its meta hash.
STATE_IDLE = "idle"
STATE_QUEUED = "queued"
STATE_RUNNING = "running"
STATE_DEAD = "dead"


def ms_to_datetime(ms: int) -> datetime:
    """Milliseconds since the epoch -> aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


@dataclass(frozen=True)
class AppendResult:
    """What an append did.

    Attributes:
        token_count: the session's token total after the append (exact, running).
        message_count: messages stored in the session after the append.
        flagged: this append passed the token limit and queued the session for compaction.
        stored: messages stored by this call; fewer than sent when some ids were already
            stored (a retried call, or an id repeated in the batch): those are dropped.
        state: the session's compaction state after the append
            (``idle``, ``queued``, ``running`` or ``dead``).
        message_ids: the ids of the messages sent, in order (generated where absent).
        replicas: with ``wait_replicas``, how many replicas acknowledged the append within
            ``wait_timeout_ms`` (fewer than asked: a failover now could lose it); else None.
        resent: the client sent this call again itself, because the reply of its first
            attempt was lost after the call went out whole (a timeout, a dropped connection):
            the server may have run that attempt too. ``stored`` counts what the attempt that
            answered stored, so when the lost one had stored the messages they count as
            already stored (``stored`` 0), although this call stored them. When False and the
            ``retry`` policy retries nothing, ``stored`` 0 means they were stored before this
            call (redis-py's own retries resend too, and are not seen here).
    """

    token_count: int
    message_count: int
    flagged: bool
    stored: int
    state: str
    message_ids: tuple[str, ...]
    replicas: int | None = None
    resent: bool = False

    @property
    def duplicates(self) -> int:
        """Messages of this call that were dropped because their id was already stored."""
        return len(self.message_ids) - self.stored


@dataclass(frozen=True)
class SessionMeta:
    """A session's counters, limit and compaction state."""

    created_at: datetime
    updated_at: datetime
    token_count: int
    message_count: int
    token_limit: int
    state: str
    head_count: int
    epoch: int
    appended: int
    ttl: int | None
    attempts: int = 0
    last_error: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def over_limit(self) -> bool:
        return self.token_count > self.token_limit


@dataclass(frozen=True)
class SessionState:
    """A session: its messages (oldest first), its app context and its meta."""

    session_id: str
    messages: list[dict[str, Any]]
    context: dict[str, Any]
    meta: SessionMeta


@dataclass(frozen=True)
class ContextWindow:
    """What :meth:`get_context` read: the messages to send and the tokens they cost."""

    messages: list[dict[str, Any]]
    tokens: int
    budget: int
    dropped: int


@dataclass(frozen=True)
class Turn:
    """What :meth:`append_and_get_context` did: the append, then the context that sees it.

    Attributes:
        appended: the append's :class:`AppendResult`.
        context: what to send to the model within the budget, the new message included
            (unless it alone is over the budget), as :meth:`get_context` returns it.
    """

    appended: AppendResult
    context: list[dict[str, Any]]


@dataclass(frozen=True)
class ShardStatus:
    """One shard's queues, as the daemon's sweep and ``convstate stats`` see them."""

    shard: int
    due: int
    queued: int
    oldest_queued_ms: int
    expired: int
    running: int
    dead: int
    #: The server's clock (ms) when the shard was read (0 for an idle shard): ages of flag
    #: times are measured on it, never on the host's clock. Not part of equality.
    server_ms: int = field(default=0, compare=False)
