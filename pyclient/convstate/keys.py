"""Key schema: every key of a session and of its shard shares one hash tag.

::

    <prefix>:{<shard>}:s:<session_id>:msgs     LIST  message JSON, oldest first
    <prefix>:{<shard>}:s:<session_id>:meta     HASH  totals, limit, state, lease, context
    <prefix>:{<shard>}:s:<session_id>:ids      HASH  message id -> record digest (idempotency)
    <prefix>:{<shard>}:s:<session_id>:idlog    LIST  the ids of :ids, oldest first (its bound)
    <prefix>:{<shard>}:s:<session_id>:deleted  HASH  the token of a delete, for 60 s (retries)
    <prefix>:{<shard>}:s:<session_id>:popped   HASH  the last pop's token and record, for 60 s
                                                     (retries of pop_item)
    <prefix>:{<shard>}:s:<session_id>:archive  LIST  folded originals (optional)
    <prefix>:{<shard>}:q                       ZSET  flagged sessions (score = flagged-at ms)
    <prefix>:{<shard>}:run                     ZSET  sessions being compacted (lease deadline)
    <prefix>:{<shard>}:dead                    ZSET  dead-letter sessions (died-at ms)
    <prefix>:config                            HASH  deployment settings (the shard count)
    <prefix>:wake                              pub/sub channel of compaction wake-ups

``shard = crc32(session_id) mod shards``. Because the hash tag is the shard and not the
session, a script can touch a session and its shard's queue in one slot, also on Redis
Cluster.
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass

from convstate.errors import ConfigurationError, InvalidSessionIdError, short_repr

#: Default number of shards. 1024 hash tags spread within about 2% over 3 cluster masters.
DEFAULT_SHARDS = 1024
#: Longest accepted session id, in characters.
MAX_SESSION_ID_LENGTH = 256

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is usable as part of a key, else raise.

    A session id is a non-empty string of at most :data:`MAX_SESSION_ID_LENGTH` characters
    without control characters, that UTF-8 can encode (no lone surrogates).
    """
    if not isinstance(session_id, str):
        raise InvalidSessionIdError(f"session id must be a str, not {type(session_id).__name__}")
    if not session_id:
        raise InvalidSessionIdError("session id must not be empty")
    if len(session_id) > MAX_SESSION_ID_LENGTH:
        raise InvalidSessionIdError(
            f"session id is {len(session_id)} characters long; the maximum is "
            f"{MAX_SESSION_ID_LENGTH}"
        )
    if _CONTROL_RE.search(session_id):
        raise InvalidSessionIdError(f"session id {session_id!r} contains control characters")
    if not session_id.isascii():
        try:
            session_id.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidSessionIdError(
                f"session id {session_id!r} is not valid Unicode (it holds a lone surrogate)"
            ) from None
    return session_id


@dataclass(frozen=True)
class SessionKeys:
    """The keys of one session and of its shard."""

    session_id: str
    shard: int
    msgs: str
    meta: str
    ids: str
    archive: str
    idlog: str
    deleted: str
    popped: str
    queue: str
    running: str
    dead: str


@dataclass(frozen=True)
class KeySchema:
    """Builds key names for a deployment: a prefix and a fixed number of shards."""

    prefix: str = "cs"
    shards: int = DEFAULT_SHARDS

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _PREFIX_RE.match(self.prefix):
            raise ConfigurationError(
                f"prefix {short_repr(self.prefix)} must be 1-64 characters of letters, digits, "
                f"'_', '.', '-'"
            )
        if (
            isinstance(self.shards, bool)
            or not isinstance(self.shards, int)
            or not (1 <= self.shards <= 16384)
        ):
            raise ConfigurationError(
                f"shards must be an integer in 1..16384, not {short_repr(self.shards)}"
            )

    @property
    def config(self) -> str:
        """Hash recording the deployment's shard count."""
        return f"{self.prefix}:config"

    @property
    def wake_channel(self) -> str:
        """Pub/sub channel the append script publishes flagged session ids on."""
        return f"{self.prefix}:wake"

    def shard_of(self, session_id: str) -> int:
        """The shard a session lives in: ``crc32(utf-8 id) mod shards``."""
        return zlib.crc32(session_id.encode("utf-8")) % self.shards

    def shard_tag(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}"

    def queue(self, shard: int) -> str:
        """ZSET of flagged sessions of a shard."""
        return f"{self.shard_tag(shard)}:q"

    def dead(self, shard: int) -> str:
        """ZSET of a shard's sessions in the dead-letter state, scored by when they died."""
        return f"{self.shard_tag(shard)}:dead"

    def running(self, shard: int) -> str:
        """ZSET of sessions of a shard being compacted, scored by lease deadline."""
        return f"{self.shard_tag(shard)}:run"

    def session(self, session_id: str) -> SessionKeys:
        """All keys of a session (validates the id). Cached: appends ask for them every time."""
        if type(session_id) is not str:
            # Not a plain str: validate before the cache, which would hash it (a list or a
            # dict would raise TypeError there).
            validate_session_id(session_id)
        return _session_keys(self.prefix, self.shards, session_id)


@functools.lru_cache(maxsize=16384)
def _session_keys(prefix: str, shards: int, session_id: str) -> SessionKeys:
    validate_session_id(session_id)
    shard = zlib.crc32(session_id.encode("utf-8")) % shards
    tag = f"{prefix}:{{{shard}}}"
    base = f"{tag}:s:{session_id}"
    return SessionKeys(
        session_id=session_id,
        shard=shard,
        msgs=f"{base}:msgs",
        meta=f"{base}:meta",
        ids=f"{base}:ids",
        archive=f"{base}:archive",
        idlog=f"{base}:idlog",
        deleted=f"{base}:deleted",
        popped=f"{base}:popped",
        queue=f"{tag}:q",
        running=f"{tag}:run",
        dead=f"{tag}:dead",
    )
