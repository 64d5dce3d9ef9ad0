"""Typed exceptions raised by convstate.

Every error a caller can provoke has its own class, so an app can react to it without
parsing messages. The Lua scripts report expected failures as error replies that start with a
code (``CS_NOSESSION``, ``CS_EXISTS``, ...); :data:`SCRIPT_ERROR_CODES` maps each code to the
class raised for it, and :func:`from_script_error` does the translation.
"""

from __future__ import annotations

import reprlib

import redis.exceptions

_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80


def short_repr(value: object) -> str:
    """A short ``repr`` of a caller's value for an error message: never huge, and never itself
    an error (deeply nested values, ints too long for ``repr``, a raising ``__repr__``)."""
    try:
        return _REPR.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


class ConvstateError(Exception):
    """Base class of every error convstate raises."""


# -- configuration -----------------------------------------------------------------------------


class ConfigurationError(ConvstateError):
    """The client, the tokenizer or the deployment is configured wrongly."""


class TokenizerUnavailableError(ConfigurationError):
    """A tiktoken encoding could not be loaded (usually: no network to download it).

    ``encoding`` is the encoding that failed, ``model`` the model it was chosen for (if any)
    and ``reason`` the underlying failure in one line, so that a front end (the CLI) can
    phrase the fix in its own terms (``--encoding`` rather than ``encoding=``)."""

    encoding: str | None = None
    model: str | None = None
    reason: str = ""


class UnknownModelError(ConfigurationError):
    """tiktoken does not know which encoding a model name uses (``model``)."""

    model: str | None = None


class ShardCountMismatchError(ConfigurationError):
    """This client's shard count differs from the one recorded in Redis for the prefix."""


class RedisAuthenticationError(ConfigurationError, redis.exceptions.AuthenticationError):
    """The server requires a password (or ACL user) that was not given, or refused the one
    given. The message says where credentials go; the password is never repeated. Also a
    ``redis.AuthenticationError``, so code that caught redis-py's error still catches it."""


class ServerVersionError(ConfigurationError):
    """The Redis server is too old for convstate."""


class ScriptNotLoadedError(ConfigurationError):
    """A convstate script is not in the server's script cache and this user may not load it
    (no ``+script|load``, the least-privilege app role): an administrator must run
    ``convstate scripts load`` (after every deploy, restart, failover or SCRIPT FLUSH)."""


# -- bad input ---------------------------------------------------------------------------------


class ValidationError(ConvstateError, ValueError):
    """An argument is malformed; nothing was written."""


class InvalidSessionIdError(ValidationError):
    """A session id is empty, too long or contains control characters."""


class InvalidMessageError(ValidationError):
    """A message is malformed (role, content, tool fields, JSON)."""


class MessageTooLargeError(InvalidMessageError):
    """A message's JSON is larger than the configured maximum."""


class MessageIdConflictError(InvalidMessageError):
    """A message reuses the id of a different message stored in the session (within the
    idempotency window). Sending the same message again is not an error (it is dropped as a
    retry); a different message needs its own id."""


class InvalidContextError(ValidationError):
    """A session context (``update_context``, ``create_session(context=...)``) is malformed:
    not a mapping, a bad field name, or a value that is not JSON or not valid Unicode."""


class ContextTooLargeError(InvalidContextError):
    """A context value's JSON is larger than the configured maximum (``max_message_bytes``)."""


class InvalidLimitError(ValidationError):
    """A token limit, budget or TTL is not a positive integer, or is too large
    (:data:`convstate.operations.MAX_INTEGER`)."""


class BudgetTooSmallError(ValidationError):
    """The read budget cannot even hold the session's system message(s) and summary."""


# -- state -------------------------------------------------------------------------------------


class SessionError(ConvstateError):
    """An operation does not fit the session's current state."""


class SessionNotFoundError(SessionError, KeyError):
    """The session does not exist (never created, deleted, or expired by its TTL)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "session not found"


class SessionExistsError(SessionError):
    """``create_session`` was called for a session that already exists."""


class SessionFullError(SessionError):
    """The session holds the maximum number of messages allowed."""


class RecordDecodeError(SessionError):
    """A stored record cannot be decoded (e.g. nested deeper than the JSON decoder follows;
    convstate >= 0.2 refuses such messages when they are appended, older versions did not)."""


class SessionCorruptedError(SessionError):
    """Some of a session's keys are missing while others remain (evicted by a
    ``maxmemory-policy`` other than ``noeviction``, or deleted by hand). Nothing was answered
    or written: the message names the missing key. Delete the session (``delete_session``) or
    restore it, and run Redis with ``maxmemory-policy noeviction``."""


class MemoryFullError(ConvstateError):
    """Redis refused a write because it is at ``maxmemory`` (``maxmemory-policy
    noeviction``). Nothing was written; reads and deletes still work, and the compaction
    daemon keeps folding histories, which frees memory. Retry later, delete sessions you no
    longer need, or raise ``maxmemory``."""


class LeaseLostError(SessionError):
    """A compaction lease expired or was taken over; the holder must not write."""


class ScriptError(ConvstateError):
    """A convstate script rejected its arguments (a caller bypassing the client)."""


#: Error-reply code of the Lua scripts -> exception class.
SCRIPT_ERROR_CODES: dict[str, type[ConvstateError]] = {
    "CS_NOSESSION": SessionNotFoundError,
    "CS_EXISTS": SessionExistsError,
    "CS_FULL": SessionFullError,
    "CS_IDCONFLICT": MessageIdConflictError,
    "CS_LEASE": LeaseLostError,
    "CS_BADARG": ScriptError,
    "CS_CORRUPT": SessionCorruptedError,
    "CS_BADRECORD": RecordDecodeError,
}

#: What Redis answers a write refused at maxmemory (``-OOM command not allowed when used
#: memory > 'maxmemory'``; redis-py drops the ``OOM`` code, and Redis 6.2 wraps a script's
#: refused call in its own error text, so it is searched for).
OOM_REPLY = "command not allowed when used memory"


def memory_full(message: str) -> MemoryFullError:
    """The typed error for Redis's OOM reply ``message``."""
    return MemoryFullError(
        "Redis memory is full (used memory > maxmemory, policy noeviction): the write was "
        "refused and nothing was stored. Reads, deletes and compaction keep working; retry "
        "later, delete sessions you no longer need, or raise maxmemory "
        f"(server said: {message.strip()[:200]})"
    )


def from_script_error(message: str) -> ConvstateError | None:
    """Translate a script's error reply into a typed exception, or ``None`` if it is not ours.

    Redis prefixes replies of ``redis.error_reply`` differently across versions (some add
    ``ERR`` or the script location), so the code is searched for, not only matched at the start.
    """
    if OOM_REPLY in message:
        return memory_full(message)
    for code, cls in SCRIPT_ERROR_CODES.items():
        idx = message.find(code)
        if idx != -1:
            detail = message[idx + len(code) :].strip()
            # Redis 7 appends " script: <sha>, on @user_script:<line>." to error replies.
            cut = detail.find(" script: ")
            if cut != -1:
                detail = detail[:cut]
            return cls(detail or code)
    return None
