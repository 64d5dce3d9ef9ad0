"""What the live view and the progress lines show (:class:`DemoView`), kept up to date by the
run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from convstate.demo.options import LOG_LIMIT, DemoOptions


def plural(count: int, word: str, many: str | None = None) -> str:
    """``"1 session"``, ``"2 sessions"``; ``many`` for irregular plurals."""
    return f"{count:,} {word if count == 1 else many or word + 's'}"


@dataclass
class SessionRow:
    """One session as the live view shows it (meta polled from Redis, acks from writers)."""

    session_id: str
    topic: str
    writer: int
    token_limit: int
    system_ids: tuple[str, ...] = ()
    system_tokens: int = 0
    tokens: int = 0
    messages: int = 0
    state: str = "idle"
    epoch: int = 0
    acked: int = 0
    flagged: int = 0


@dataclass(frozen=True)
class LogEntry:
    at: float  # seconds since the demo started
    text: str
    style: str = ""


@dataclass
class DemoView:
    """Everything the live view and the progress lines show."""

    options: DemoOptions
    engine: str
    prefix: str
    summarizer: str
    started: float = field(default_factory=time.monotonic)
    sessions: dict[str, SessionRow] = field(default_factory=dict)
    phase: str = "starting"
    queued: int = 0
    running: int = 0
    dead: int = 0
    messages: int = 0
    tokens_appended: int = 0
    compactions: int = 0
    failures: int = 0
    log: list[LogEntry] = field(default_factory=list)
    ended: float | None = None

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def tokens_stored(self) -> int:
        return sum(row.tokens for row in self.sessions.values())

    @property
    def tokens_saved(self) -> int:
        system = sum(row.system_tokens for row in self.sessions.values())
        return max(0, self.tokens_appended + system - self.tokens_stored)

    def add_log(self, text: str, style: str = "") -> None:
        if len(self.log) < LOG_LIMIT:
            self.log.append(LogEntry(self.elapsed, text, style))
