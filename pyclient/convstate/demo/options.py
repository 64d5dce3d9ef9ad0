"""What ``convstate demo`` runs (:class:`DemoOptions`) and the share of ``--duration`` each
phase gets."""

from __future__ import annotations

from dataclasses import dataclass

from convstate.daemon import DaemonSettings
from convstate.errors import ConfigurationError, ConvstateError
from convstate.tokens import default_encoding

#: Shards of the demo's key prefix (few: the demo has a handful of sessions).
DEMO_SHARDS = 16
#: Writers aim to finish their exchanges within this share of ``--duration`` ...
WRITE_SHARE = 0.5
#: ... and stop appending at this share, done or not.
WRITE_STOP_SHARE = 0.8
#: The daemon gets until this share to work off the queue; then everything stops.
SETTLE_SHARE = 0.95
#: Seconds the daemon may take to finish in-flight compactions when stopped.
DAEMON_GRACE = 5.0
POLL_INTERVAL = 0.2
TICK = 0.05
LOG_LIMIT = 10_000


class DemoError(ConvstateError):
    """The demo could not run (the daemon or the writers did not start)."""


@dataclass(frozen=True)
class DemoOptions:
    """What ``convstate demo`` runs. ``turns`` are user/assistant exchanges per session."""

    sessions: int = 6
    writers: int = 2
    turns: int = 40
    duration: float = 30.0
    token_limit: int = 1500
    encoding: str | None = None
    summarizer: str = "extractive"
    openai_base_url: str | None = None
    model: str | None = None
    redis_url: str | None = None

    def __post_init__(self) -> None:
        for name, low in (("sessions", 1), ("writers", 1), ("turns", 1), ("token_limit", 200)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(f"{name} must be an integer >= {low}, not {value!r}")
        if not self.duration >= 3:  # also refuses NaN
            raise ConfigurationError(f"duration must be at least 3 seconds, not {self.duration!r}")
        if self.summarizer not in ("extractive", "openai"):
            raise ConfigurationError("summarizer must be 'extractive' or 'openai'")

    @property
    def writer_count(self) -> int:
        """Writer processes actually started: never more than there are sessions."""
        return min(self.writers, self.sessions)

    def resolved_encoding(self) -> str:
        return self.encoding or default_encoding()

    def daemon_settings(self, redis_url: str, prefix: str) -> DaemonSettings:
        """The daemon's settings, its policy scaled to the token limit."""
        limit = self.token_limit
        return DaemonSettings(
            redis_url=redis_url,
            prefix=prefix,
            shards=DEMO_SHARDS,
            concurrency=4,
            lease=30.0,
            grace=DAEMON_GRACE,
            sweep_interval=1.0,
            max_attempts=3,
            backoff=0.5,
            http_port=-1,
            summarizer=self.summarizer,
            openai_base_url=self.openai_base_url,
            summary_timeout=20.0,
            encoding=self.resolved_encoding(),
            keep_recent_tokens=limit // 5,
            min_recent_messages=4,
            target_ratio=0.5,
            max_summary_tokens=max(32, limit // 5),
            archive=True,
            log_level="WARNING",
            summary_model=self.model or DaemonSettings.summary_model,
        )
