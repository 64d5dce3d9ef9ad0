"""Every decision of the clients, as pure functions: validate, encode, decode.

The async and the sync client are thin: each method asks :class:`Operations` for an
:class:`Op` (which script, which keys, which arguments, how to decode the reply), runs it in
one round trip, and returns the decoded value. Nothing here does I/O, so all of it is
unit-tested without Redis and shared by both clients.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

import msgspec

from convstate.errors import (
    BudgetTooSmallError,
    ConfigurationError,
    ContextTooLargeError,
    InvalidContextError,
    InvalidLimitError,
    InvalidMessageError,
    MessageTooLargeError,
    RecordDecodeError,
    SessionFullError,
    SessionNotFoundError,
    ShardCountMismatchError,
    ValidationError,
    short_repr,
)
from convstate.keys import KeySchema, SessionKeys
from convstate.models import AppendResult, SessionMeta, SessionState, ms_to_datetime
from convstate.tokens import TokenCounter
from convstate.window import DEFAULT_HEAD_GUESS, snapshot_commands, tail_size
from convstate.window import cut as cut_window

T = TypeVar("T")

#: Roles accepted in a message (OpenAI chat completions).
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
#: Fields convstate adds to every stored message; not sent to the model.
BOOKKEEPING_FIELDS = frozenset({"id", "tokens", "ts", "kind", "summary"})
#: Fields of a chat-completions message that :meth:`get_context` passes on.
API_FIELDS = (
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "refusal",
    "audio",
    "function_call",
)
#: Longest accepted message id, in characters.
MAX_MESSAGE_ID_LENGTH = 128
#: Longest accepted context field name, in characters.
MAX_CONTEXT_FIELD_LENGTH = 256
#: Largest integer the scripts keep exactly (2**53 - 1): Lua numbers are doubles. Token limits,
#: budgets, token counts and the other numbers a script stores or computes with are refused
#: above it (a larger one would be rounded, or written as "1e+17" that nothing can decode).
MAX_INTEGER = 2**53 - 1
#: Longest accepted TTL, in seconds: its milliseconds must stay within :data:`MAX_INTEGER`.
MAX_TTL = MAX_INTEGER // 1000

#: Deepest nesting of lists and objects accepted in a message (the message object itself is
#: depth 1) or in a context value. Checked without recursion before anything is encoded, so
#: the answer never depends on the caller's stack depth; every reader (Python's JSON decoder,
#: the scripts' cjson, the daemon) follows records this deep with room to spare.
MAX_NESTING_DEPTH = 100

#: Default idempotency window: the ids of a session's last ``id_window`` appended messages
#: (and of the whole current batch) are kept, so a retry of any of them is recognised; older
#: ids are pruned by the append that pushes them out. Bounds the id hash per session.
DEFAULT_ID_WINDOW = 100

#: How long, in milliseconds, a delete remembers its token so that a retry of the same
#: ``delete_session`` call (its reply was lost) still answers True.
DELETE_RETRY_WINDOW_MS = 60_000

#: How long, in milliseconds, a pop (the Agents adapter's ``pop_item``) remembers its token and
#: the record it popped, so that a retry of the same call (its reply was lost) returns that
#: record again instead of popping a second one. One record per session at most (the last
#: pop's), net neutral in memory: the pop freed as many bytes from the message list.
POP_RETRY_WINDOW_MS = 60_000

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
DEFAULT_READ_CHUNK = 32


def now_ms() -> int:
    return int(time.time() * 1000)


def new_message_id() -> str:
    """A random, unique message id (the idempotency key of an append): 128 random bits."""
    return os.urandom(16).hex()


def new_token() -> str:
    """A random token that makes one create, delete or pop call recognisable in its
    retries."""
    return os.urandom(16).hex()


def check_nesting(
    value: object, what: str, error: type[ValidationError] = InvalidMessageError
) -> None:
    """Raise ``error`` if ``value`` nests lists/tuples/dicts deeper than
    :data:`MAX_NESTING_DEPTH` (``value`` itself is depth 1). Iterative: the caller's stack depth
    does not matter, and a self-referencing value ends at the limit too."""
    if not isinstance(value, (dict, list, tuple)):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, (dict, list, tuple)):
                if depth >= MAX_NESTING_DEPTH:
                    raise error(
                        f"{what} nests lists and objects more than {MAX_NESTING_DEPTH} deep; "
                        f"flatten it (e.g. store deep data as a JSON string)"
                    )
                stack.append((child, depth + 1))


def record_too_deep() -> RecordDecodeError:
    """The error of a stored record (or context value) too deeply nested to decode."""
    return RecordDecodeError(
        f"a stored record or context value nests deeper than the JSON decoder can follow "
        f"(convstate refuses more than {MAX_NESTING_DEPTH} levels since 0.2; this one was "
        f"stored before): delete the session, or remove the record with redis-cli"
    )


def check_positive_int(value: object, what: str, maximum: int = MAX_INTEGER) -> int:
    """Return ``value`` if it is an ``int`` (not a bool) in ``1..maximum``, else raise
    :class:`InvalidLimitError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidLimitError(
            f"{what} must be a positive integer of at most {maximum}, not {short_repr(value)}"
        )
    return value


#: The one JSON encoder of stored values. ``json.dumps`` with keyword arguments builds a new
#: ``JSONEncoder`` on every call, which costs about as much as encoding a short message;
#: an encoder holds no state between calls, so one is shared (threads included).
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
#: The encoder of a message's digest: sorted keys, so a message rebuilt in another key order is
#: still "the same message" to the idempotency check.
_CANONICAL_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=True
)


#: Types whose JSON ``sort_keys`` cannot change (no keys inside).
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _already_canonical(msg: dict[str, Any]) -> bool:
    """Whether ``msg``'s JSON as given is already its sorted-keys JSON: its keys in order and
    every value a scalar of an exact JSON type (a container's keys would be sorted, a subclass
    might encode otherwise). Saves encoding a message twice to digest it."""
    previous = ""
    for key, value in msg.items():
        if key < previous or type(value) not in _SCALARS:
            return False
        previous = key
    return True


def _dumps(value: Any, what: str, error: type[ValidationError] = InvalidMessageError) -> str:
    try:
        return _JSON_ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise error(f"{what} is not JSON-serializable: {exc}") from exc
    except RecursionError:
        raise error(f"{what} is nested too deeply to be encoded as JSON") from None


def _utf8_size(text: str, what: str, error: type[ValidationError] = InvalidMessageError) -> int:
    """The UTF-8 size of ``text``; raises ``error`` if it holds a lone surrogate."""
    if text.isascii():  # an ASCII string's length is its UTF-8 size
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise error(f"{what} is not valid Unicode (it holds a lone surrogate)") from None


def _check_content(content: object, role: str) -> None:
    if content is None:
        if role in ("assistant", "function"):
            return
        raise InvalidMessageError(f"a {role!r} message needs 'content'")
    if isinstance(content, str):
        return
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, (Mapping, str)):
                raise InvalidMessageError(
                    f"content parts must be objects or strings, not {type(part).__name__}"
                )
        return
    raise InvalidMessageError(
        f"'content' must be a string, a list of parts or None, not {type(content).__name__}"
    )


def _check_tool_calls(tool_calls: object) -> None:
    if not isinstance(tool_calls, list) or not tool_calls:
        raise InvalidMessageError("'tool_calls' must be a non-empty list")
    for call in tool_calls:
        if not isinstance(call, Mapping):
            raise InvalidMessageError("each tool call must be an object")
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise InvalidMessageError("each tool call needs a non-empty string 'id'")


def validate_message(message: object) -> dict[str, Any]:
    """Check one OpenAI-style message; return a shallow copy. Raises :class:`InvalidMessageError`.

    Rules: ``role`` is one of :data:`ROLES`; ``content`` is a string or a list of parts, and may
    be ``None`` only for assistant messages that carry ``tool_calls`` (or ``function_call``);
    ``tool`` messages need a non-empty ``tool_call_id``; ``tool_calls`` is a list of calls with
    ids; ``name`` is a string; ``id``, when given, is a non-empty string; ``kind`` is reserved.
    """
    # A plain dict (the common case) needs no Mapping ABC check.
    if type(message) is not dict and not isinstance(message, Mapping):
        raise InvalidMessageError(f"a message must be a dict, not {type(message).__name__}")
    msg = dict(message)
    for key in msg:
        if not isinstance(key, str):
            raise InvalidMessageError(f"message keys must be strings, not {short_repr(key)}")
    # Each field is looked up once (a missing field reads as None, as before).
    role = msg.get("role")
    if not isinstance(role, str) or role not in ROLES:  # (an unhashable role cannot be looked up)
        raise InvalidMessageError(f"role must be one of {sorted(ROLES)}, not {short_repr(role)}")
    content = msg.get("content")
    if "content" not in msg and role != "assistant":
        raise InvalidMessageError(f"a {role!r} message needs 'content'")
    _check_content(content, role)
    tool_calls = msg.get("tool_calls")
    if (
        role == "assistant"
        and content is None
        and not (tool_calls or msg.get("function_call") or msg.get("refusal"))
    ):
        raise InvalidMessageError("an assistant message needs 'content' or 'tool_calls'")
    if tool_calls is not None:
        if role != "assistant":
            raise InvalidMessageError("only assistant messages carry 'tool_calls'")
        _check_tool_calls(tool_calls)
    if role == "tool":
        tcid = msg.get("tool_call_id")
        if not isinstance(tcid, str) or not tcid:
            raise InvalidMessageError("a 'tool' message needs a non-empty 'tool_call_id'")
    name = msg.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidMessageError("'name' must be a string")
    if "id" in msg:
        mid = msg["id"]
        if not isinstance(mid, str) or not mid or len(mid) > MAX_MESSAGE_ID_LENGTH:
            raise InvalidMessageError(
                f"'id' must be a non-empty string of at most {MAX_MESSAGE_ID_LENGTH} characters"
            )
    if msg.get("kind", "message") != "message":
        raise InvalidMessageError("'kind' is reserved: only the compaction daemon writes summaries")
    return msg


def to_api_message(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored record -> the message to send to a chat-completions API (known fields only)."""
    return {key: record[key] for key in API_FIELDS if key in record and record[key] is not None}


#: Records are decoded with msgspec: several times faster than ``json.loads`` and exact for
#: integers of any size (orjson turns those over 64 bits into floats).
_DECODER = msgspec.json.Decoder()


def decode_record(raw: bytes | str) -> Any:
    """One stored record -> its object (msgspec; Python's json for what msgspec refuses, e.g.
    a number over 1e308, which Python reads as inf)."""
    try:
        try:
            return _DECODER.decode(raw)
        except msgspec.DecodeError:
            return json.loads(raw)
    except RecursionError:  # never a bare RecursionError out of a read or the daemon
        raise record_too_deep() from None


class _ApiMessage(msgspec.Struct, omit_defaults=True):
    """The chat-completions fields of a record (:data:`API_FIELDS`); msgspec skips the rest
    while decoding, and ``to_builtins`` leaves out the unset ones."""

    role: Any = None
    content: Any = None
    name: Any = None
    tool_calls: Any = None
    tool_call_id: Any = None
    refusal: Any = None
    audio: Any = None
    function_call: Any = None


_API_DECODER = msgspec.json.Decoder(_ApiMessage)


def api_messages(records: Iterable[bytes | str]) -> list[dict[str, Any]]:
    """Stored records -> the messages to send to a chat-completions API (known fields only).

    convstate validated these records on the way in, so they are not checked again: of each,
    only the chat-completions fields that are set (not None) are kept, in :data:`API_FIELDS`
    order. What msgspec refuses (a record that is not an object, a number over 1e308) goes
    through ``json.loads`` and :func:`to_api_message`.
    """
    raws = records if type(records) is list else list(records)
    try:
        try:  # each record on its own: a malformed one raises, as json.loads would
            out: list[dict[str, Any]] = msgspec.to_builtins(list(map(_API_DECODER.decode, raws)))
            return out
        except (msgspec.DecodeError, msgspec.ValidationError):
            return [to_api_message(json.loads(raw)) for raw in raws]
    except RecursionError:  # never a bare RecursionError out of a read
        raise record_too_deep() from None


def budget_too_small(session_id: str, needed: int, budget: int) -> BudgetTooSmallError:
    """The error of a read whose budget cannot hold the session's head and the priming."""
    return BudgetTooSmallError(
        f"a budget of {budget} tokens cannot hold the {needed} tokens of session "
        f"{session_id!r}'s system message(s), summary and reply priming; raise the budget"
    )


def _flat_to_dict(flat: Sequence[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


_META_INTS = (
    "created_at",
    "updated_at",
    "token_count",
    "message_count",
    "token_limit",
    "head_count",
    "epoch",
    "appended",
    "ttl",
    "attempts",
)


def decode_meta(fields: Mapping[str, str]) -> tuple[SessionMeta, dict[str, Any]]:
    """A session's meta hash -> (:class:`SessionMeta`, app context)."""
    context: dict[str, Any] = {}
    extra: dict[str, str] = {}
    for name, value in fields.items():
        if name.startswith("ctx:"):
            if value:  # (an empty value is no field: older create scripts stored None so)
                context[name[4:]] = decode_record(value)
        elif name not in _META_INTS and name not in ("state", "last_error"):
            extra[name] = value
    ints = {name: int(fields.get(name, "0") or 0) for name in _META_INTS}
    meta = SessionMeta(
        created_at=ms_to_datetime(ints["created_at"]),
        updated_at=ms_to_datetime(ints["updated_at"]),
        token_count=ints["token_count"],
        message_count=ints["message_count"],
        token_limit=ints["token_limit"],
        state=fields.get("state", "idle"),
        head_count=ints["head_count"],
        epoch=ints["epoch"],
        appended=ints["appended"],
        ttl=ints["ttl"] // 1000 if ints["ttl"] else None,
        attempts=ints["attempts"],
        last_error=fields.get("last_error") or None,
        extra=extra,
    )
    return meta, context


def decode_records(raw: Iterable[Any]) -> list[dict[str, Any]]:
    """Stored records -> dicts (:func:`decode_record` each)."""
    return [decode_record(item) for item in raw]


@dataclass(frozen=True)
class Op(Generic[T]):
    """One script call: which script, its KEYS and ARGV, and how to decode its reply."""

    script: str
    keys: list[str]
    args: list[str | int]
    decode: Callable[[Any], T]


#: Sessions whose last read :class:`Operations` remembers (to size the next read's fetch).
WINDOW_HINTS = 8192


@dataclass
class SnapshotRead:
    """A context read as plain commands (``commands``, to run inside MULTI), and its decoding.

    :meth:`decode` returns the messages, or None when the snapshot cannot answer as read.lua
    would (see :func:`convstate.window.cut`): the caller then runs :meth:`fallback`, read.lua.
    """

    ops: Operations
    session_id: str
    budget: int | None
    commands: list[tuple[str | int, ...]]

    def decode(self, replies: Sequence[Any]) -> list[dict[str, Any]] | None:
        meta, llen, head_part, tail_part = replies
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        if meta[0] is None:
            if llen:  # messages without meta (evicted, or a TTL's end): read.lua tells which
                return None
            # (from None: as the script's CS_NOSESSION is raised, with no chained traceback)
            raise SessionNotFoundError(f"session {self.session_id} does not exist") from None
        cut = cut_window(
            meta, int(llen), head_part, tail_part, self.budget, self.ops.counter.reply_priming
        )
        if cut is None:
            return None
        self.ops.remember_window(self.session_id, cut.head_count, cut.walked)
        if cut.small:
            raise budget_too_small(self.session_id, cut.used, cut.budget)
        return api_messages(cut.records)

    def fallback(self) -> Op[list[dict[str, Any]]]:
        """read.lua, the authoritative read (its answer also sizes the next snapshot)."""
        op = self.ops.context_window(self.session_id, self.budget)
        ops, session_id = self.ops, self.session_id

        def decode(reply: Any) -> list[dict[str, Any]]:
            messages = op.decode(reply)
            # read.lua does not say how far it walked: assume its window, a little more.
            ops.remember_window(session_id, len(reply[1]), len(reply[2]) + 8)
            return messages

        return Op(op.script, op.keys, op.args, decode)


@dataclass
class TurnOp:
    """An append and the context read that sees it, as one MULTI (see
    :meth:`Operations.turn`)."""

    append: Op[AppendResult]
    read: SnapshotRead

    def commands(self, append_sha: str) -> list[tuple[str | int, ...]]:
        """The commands inside MULTI: EVALSHA of the append script, then the read snapshot."""
        keys = self.append.keys
        return [("EVALSHA", append_sha, len(keys), *keys, *self.append.args), *self.read.commands]

    def decode(self, replies: Sequence[Any]) -> tuple[AppendResult, list[dict[str, Any]] | None]:
        """The append's result and the context (None: run :meth:`SnapshotRead.fallback`).
        An append's error reply is raised (then the read is moot); the client raises it as
        its typed exception, as for :meth:`append`."""
        first = replies[0]
        if isinstance(first, Exception):
            raise first
        return self.append.decode(first), self.read.decode(replies[1:])


@dataclass(frozen=True)
class StoreConfig:
    """Settings shared by every session a store writes.

    Attributes:
        token_limit: default token limit of new sessions; passing it flags for compaction.
            At most :data:`MAX_INTEGER`.
        ttl: sliding time-to-live of a session in seconds (refreshed by every write), or None.
            At most :data:`MAX_TTL`.
        max_message_bytes: largest accepted message JSON, in bytes; also the largest accepted
            JSON of one context value.
        max_messages: most messages a session may hold (0 = no limit), the system messages a
            session is created with included.
        read_chunk: messages fetched per LRANGE when a read walks back from the newest.
        id_window: the idempotency window, in messages: the ids (with a digest of each record)
            of a session's last ``id_window`` appended messages, and of the whole current
            batch, are kept; a retry of one of them is dropped, a different message with one
            of those ids raises :class:`~convstate.errors.MessageIdConflictError`. Older ids
            are forgotten, which bounds the id hash of a session to ``id_window`` entries.
    """

    token_limit: int
    ttl: int | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_messages: int = 0
    read_chunk: int = DEFAULT_READ_CHUNK
    id_window: int = DEFAULT_ID_WINDOW

    def __post_init__(self) -> None:
        check_positive_int(self.token_limit, "token_limit")
        if self.ttl is not None:
            check_positive_int(self.ttl, "ttl", MAX_TTL)
        check_positive_int(self.max_message_bytes, "max_message_bytes")
        if (
            isinstance(self.max_messages, bool)
            or not isinstance(self.max_messages, int)
            or not 0 <= self.max_messages <= MAX_INTEGER
        ):
            raise InvalidLimitError(
                f"max_messages must be an integer in 0..{MAX_INTEGER}, not "
                f"{short_repr(self.max_messages)}"
            )
        check_positive_int(self.read_chunk, "read_chunk")
        check_positive_int(self.id_window, "id_window")

    @property
    def ttl_ms(self) -> int:
        return self.ttl * 1000 if self.ttl else 0


class EncodedMessage(NamedTuple):
    """One validated, counted and serialized message, ready for the append script.

    A NamedTuple rather than a frozen dataclass: it is built once per appended message, and a
    frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``.
    """

    id: str
    tokens: int
    is_system: bool
    json: str
    #: What makes two sends of a message "the same" for the idempotency check: a hash of its
    #: role and fields in canonical form (sorted keys), without id, tokens, ts and kind.
    digest: str


@dataclass
class Operations:
    """Builds every :class:`Op` a client runs. Pure: no I/O."""

    schema: KeySchema
    counter: TokenCounter
    config: StoreConfig
    #: The ``ts`` of new records (the app's clock; it orders nothing: the scripts take every
    #: time they compare or queue by from the server's clock).
    clock: Callable[[], int] = field(default=now_ms)
    #: ARGV[3] and ARGV[5..7] of every append (wake-up channel, token limit, TTL in ms,
    #: maximum messages): the same for every call of a store, so computed once. ``schema``
    #: and ``config`` are frozen.
    _append_settings: tuple[str, int, int, int] = field(init=False, repr=False, compare=False)
    #: Per session: its head count and how many of the newest records its last read walked
    #: (see :meth:`context_snapshot`); at most :data:`WINDOW_HINTS` sessions.
    _window_hints: dict[str, tuple[int, int]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        self._append_settings = (
            self.schema.wake_channel,
            self.config.token_limit,
            self.config.ttl_ms,
            self.config.max_messages,
        )

    # -- encoding ------------------------------------------------------------------------------

    def encode_message(self, message: object, now: int) -> EncodedMessage:
        """Validate, count and serialize one message into its stored record.

        The stored JSON always starts with ``{"tokens":N,"role":"..."`` so that the read script
        can take both with one pattern match instead of decoding every message; convstate's
        other fields (``id``, ``kind``, ``ts``) close the object. The message is serialized
        once, before it is tokenized, so an oversized or non-JSON message costs no tokenizing.
        """
        msg = validate_message(message)
        check_nesting(msg, "message")
        mid = msg.pop("id", None) or new_message_id()
        role = msg.pop("role")
        msg.pop("tokens", None)
        msg.pop("kind", None)
        ts = msg.pop("ts", now)
        rest = _dumps(msg, "message")
        self._check_size(len(rest))
        if _already_canonical(msg):  # (most messages: one key left, "content", a string)
            canonical = rest
        else:
            try:
                canonical = _CANONICAL_ENCODER.encode(msg)
            except TypeError:  # keys of mixed types cannot be sorted: the encoding as given
                canonical = rest
        msg["role"] = role
        try:
            tokens = self.counter.count_message(msg)
        except RecursionError:  # JSON the encoder just managed, counted a few frames deeper
            raise InvalidMessageError("message is nested too deeply to be counted") from None
        if (
            isinstance(tokens, bool)
            or not isinstance(tokens, int)
            or not 0 <= tokens <= MAX_INTEGER
        ):
            raise ConfigurationError(
                f"the token counter returned {short_repr(tokens)}; it must return an int >= 0 "
                f"and <= {MAX_INTEGER} (2**53 - 1)"
            )
        inner = rest[1:-1] + "," if len(rest) > 2 else ""
        # ``ts`` is nearly always the clock's int, whose JSON is its str(); other values (a
        # caller's own ts) go through the encoder. ``type() is int`` keeps bools out; the
        # bound keeps out ints too long for str() (the encoder rejects those).
        ts_json = (
            str(ts) if type(ts) is int and -MAX_INTEGER <= ts <= MAX_INTEGER else _dumps(ts, "ts")
        )
        body = (
            f'{{"tokens":{tokens},"role":"{role}",{inner}"id":{_dumps(mid, "id")},'
            f'"kind":"message","ts":{ts_json}}}'
        )
        # An ASCII string's length is its UTF-8 size; other text is measured by encoding it,
        # which also rejects lone surrogates (in any field) before anything is written.
        self._check_size(len(body) if body.isascii() else _utf8_size(body, "message"))
        digest = hashlib.blake2b(
            f"{role}\n{canonical}".encode(), digest_size=8
        ).hexdigest()  # (valid UTF-8: the size check above refused lone surrogates)
        return EncodedMessage(mid, tokens, role == "system", body, digest)

    def _check_size(self, size: int) -> None:
        if size > self.config.max_message_bytes:
            raise MessageTooLargeError(
                f"message is {size} bytes of JSON; the maximum is "
                f"{self.config.max_message_bytes} (max_message_bytes)"
            )

    def encode_context(self, mapping: object, *, drop_none: bool = False) -> list[str]:
        """A context mapping -> ARGV pairs of field name, value JSON.

        A ``None`` value is encoded as ``""`` (update_context: remove the field), or left out
        with ``drop_none`` (create_session: a new session has no field to remove). Raises
        :class:`InvalidContextError`: not a mapping, a field name that is not a non-empty
        string of at most :data:`MAX_CONTEXT_FIELD_LENGTH` characters, a value that is not JSON
        (or nested too deeply), text that is not valid Unicode; or
        :class:`ContextTooLargeError`: a value's JSON is over ``max_message_bytes``.
        """
        if not isinstance(mapping, Mapping):
            raise InvalidContextError(f"context must be a mapping, not {type(mapping).__name__}")
        limit = self.config.max_message_bytes
        args: list[str] = []
        for key, value in mapping.items():
            if not isinstance(key, str) or not key or len(key) > MAX_CONTEXT_FIELD_LENGTH:
                raise InvalidContextError(
                    f"context keys must be non-empty strings of at most "
                    f"{MAX_CONTEXT_FIELD_LENGTH} characters, not {short_repr(key)}"
                )
            what = f"context[{key!r:.300}]"
            _utf8_size(key, f"context key {key!r}", InvalidContextError)
            if value is None:
                if not drop_none:
                    args += [key, ""]
                continue
            check_nesting(value, what, InvalidContextError)
            encoded = _dumps(value, what, InvalidContextError)
            size = _utf8_size(encoded, what, InvalidContextError)
            if size > limit:
                raise ContextTooLargeError(
                    f"{what} is {size} bytes of JSON; the maximum is {limit} (max_message_bytes)"
                )
            args += [key, encoded]
        return args

    # -- operations ----------------------------------------------------------------------------

    def create(
        self,
        session_id: str,
        *,
        system: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]] | None,
        token_limit: int | None,
        context: Mapping[str, Any] | None,
        exist_ok: bool,
    ) -> Op[SessionState]:
        keys = self.schema.session(session_id)
        limit = check_positive_int(
            self.config.token_limit if token_limit is None else token_limit, "token_limit"
        )
        if system is None:
            systems: list[Any] = []
        elif isinstance(system, (str, Mapping)):
            systems = [system]
        elif isinstance(system, Sequence):
            systems = list(system)
        else:
            raise InvalidMessageError(
                f"system must be a string, a role 'system' dict or a list of them, not "
                f"{type(system).__name__}"
            )
        # The session's first records count against max_messages as appended ones do.
        max_messages = self.config.max_messages
        if max_messages and len(systems) > max_messages:
            raise SessionFullError(
                f"session {session_id!r} would be created with {len(systems)} system messages; "
                f"the maximum is {max_messages} (max_messages)"
            )
        now = self.clock()
        encoded = []
        for item in systems:
            msg = {"role": "system", "content": item} if isinstance(item, str) else item
            if not isinstance(msg, Mapping) or msg.get("role") != "system":
                raise InvalidMessageError("system messages must be strings or role 'system' dicts")
            encoded.append(self.encode_message(msg, now))
        system_tokens = sum(m.tokens for m in encoded)
        if system_tokens >= limit:
            raise InvalidLimitError(
                f"token_limit {limit} must exceed the {system_tokens} tokens of the system "
                f"message(s)"
            )
        args: list[str | int] = [
            new_token(),
            session_id,
            limit,
            self.config.ttl_ms,
            int(exist_ok),
            len(encoded),
        ]
        for m in encoded:
            args += [m.id, m.tokens, m.json, m.digest]
        args += self.encode_context({} if context is None else context, drop_none=True)

        def decode(reply: Any) -> SessionState:
            return self._decode_state(session_id, reply[1], reply[2])

        return Op(
            "create",
            [keys.msgs, keys.meta, keys.ids, keys.idlog, keys.archive, keys.popped],
            args,
            decode,
        )

    def append(
        self, session_id: str, messages: Sequence[object], *, create: bool
    ) -> Op[AppendResult]:
        keys = self.schema.session(session_id)
        # A plain list (what append() passes) needs no ABC checks.
        if type(messages) is not list and (
            isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence)
        ):
            raise InvalidMessageError("append_many takes a list of messages")
        if not messages:
            raise InvalidMessageError("append_many needs at least one message")
        now = self.clock()
        encoded = [self.encode_message(m, now) for m in messages]
        channel, token_limit, ttl_ms, max_messages = self._append_settings
        args: list[str | int] = [
            self.config.id_window,
            session_id,
            channel,
            int(create),
            token_limit,
            ttl_ms,
            max_messages,
            len(encoded),
        ]
        for m in encoded:
            args += [m.id, m.tokens, int(m.is_system), m.json, m.digest]
        ids = tuple(m.id for m in encoded)

        def decode(reply: Any) -> AppendResult:
            return AppendResult(
                token_count=int(reply[0]),
                message_count=int(reply[1]),
                flagged=bool(int(reply[2])),
                stored=int(reply[3]),
                state=_text(reply[4]),
                message_ids=ids,
            )

        return Op(
            "append",
            [keys.msgs, keys.meta, keys.ids, keys.queue, keys.idlog, keys.archive],
            args,
            decode,
        )

    def state(self, session_id: str) -> Op[SessionState]:
        keys = self.schema.session(session_id)

        def decode(reply: Any) -> SessionState:
            return self._decode_state(session_id, reply[0], reply[1])

        return Op("state", [keys.msgs, keys.meta], [session_id, 1], decode)

    def messages(self, session_id: str) -> Op[list[dict[str, Any]]]:
        keys = self.schema.session(session_id)
        return Op(
            "state", [keys.msgs, keys.meta], [session_id, 1], lambda reply: decode_records(reply[1])
        )

    def history(self, session_id: str) -> Op[list[dict[str, Any]]]:
        """The whole history: archive and live records in one read (see
        :func:`merge_history`)."""
        keys = self.schema.session(session_id)
        return Op(
            "state",
            [keys.msgs, keys.meta, keys.archive],
            [session_id, 2],
            lambda reply: merge_history(decode_records(reply[1]), decode_records(reply[2])),
        )

    def context_window(self, session_id: str, budget: int | None) -> Op[list[dict[str, Any]]]:
        keys = self.schema.session(session_id)
        if budget is not None:
            check_positive_int(budget, "budget")
        priming = self.counter.reply_priming

        def decode(reply: Any) -> list[dict[str, Any]]:
            if reply[0] == b"SMALL" or reply[0] == "SMALL":
                raise budget_too_small(session_id, int(reply[3]), int(reply[4]))
            return api_messages([*reply[1], *reply[2]])

        args: list[str | int] = [session_id, budget or 0, priming, self.config.read_chunk]
        return Op("read", [keys.msgs, keys.meta], args, decode)

    def context_snapshot(
        self, session_id: str, budget: int | None, *, appended: int = 0
    ) -> SnapshotRead:
        """The read of :meth:`context_window` as plain commands for one MULTI (after an
        append of ``appended`` messages, if any), cut here by :mod:`convstate.window`."""
        keys = self.schema.session(session_id)
        if budget is not None:
            check_positive_int(budget, "budget")
        hint = self._window_hints.get(session_id)
        head_guess = hint[0] if hint is not None and hint[0] > 0 else DEFAULT_HEAD_GUESS
        tail = tail_size(budget, hint, appended)
        return SnapshotRead(self, session_id, budget, snapshot_commands(keys, head_guess, tail))

    def turn(self, session_id: str, message: object, *, budget: int | None, create: bool) -> TurnOp:
        """An append of ``message`` and the read of its context, both validated before
        anything is sent (a bad budget stores nothing)."""
        append = self.append(session_id, [message], create=create)
        return TurnOp(append, self.context_snapshot(session_id, budget, appended=1))

    def remember_window(self, session_id: str, head_count: int, walked: int) -> None:
        """Keep how far a read of the session walked, to fetch enough next time (bounded)."""
        hints = self._window_hints
        if len(hints) >= WINDOW_HINTS and session_id not in hints:
            hints.clear()
        hints[session_id] = (head_count, walked)

    def update_context(
        self, session_id: str, mapping: Mapping[str, Any], *, replace: bool
    ) -> Op[int]:
        keys = self.schema.session(session_id)
        args: list[str | int] = [session_id, int(replace)]
        args += self.encode_context(mapping)
        return Op(
            "update_context", [keys.msgs, keys.meta, keys.ids, keys.idlog, keys.archive], args, int
        )

    def delete(self, session_id: str) -> Op[bool]:
        keys = self.schema.session(session_id)
        return Op(
            "delete",
            [
                keys.msgs,
                keys.meta,
                keys.ids,
                keys.queue,
                keys.running,
                keys.archive,
                keys.dead,
                keys.idlog,
                keys.deleted,
                keys.popped,
            ],
            [session_id, new_token(), DELETE_RETRY_WINDOW_MS],
            lambda reply: bool(int(reply)),
        )

    def pop(self, session_id: str) -> Op[bytes | str | None]:
        """Remove the session's newest record (pop.lua): its raw JSON, or None when the
        session is empty or missing. Runs when Redis memory is full (``allow-oom``).

        One call: the op carries a random token, the same in every retry of it (redis-py's,
        or the fast path's fallback), which pop.lua remembers with the record it popped for
        :data:`POP_RETRY_WINDOW_MS`; a retry of a pop that ran returns that record and pops
        nothing. Build a new op for each pop."""
        keys = self.schema.session(session_id)
        return Op(
            "pop",
            [keys.msgs, keys.meta, keys.ids, keys.idlog, keys.archive, keys.popped],
            [session_id, new_token(), POP_RETRY_WINDOW_MS],
            lambda reply: reply,
        )

    def session_keys(self, session_id: str) -> SessionKeys:
        return self.schema.session(session_id)

    # -- decoding ------------------------------------------------------------------------------

    @staticmethod
    def _decode_state(session_id: str, flat: Sequence[Any], raw: Iterable[Any]) -> SessionState:
        meta, context = decode_meta(_flat_to_dict(flat))
        return SessionState(session_id, decode_records(raw), context, meta)


def merge_history(
    live: Sequence[Mapping[str, Any]], archive: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """A session's history, oldest first, from its live records and its archive.

    The live list starts with the system message(s), then the running summary (which stands
    for what was folded), then the newest turns; the archive holds the folded originals in the
    order they were folded (never a system message or a summary). So the history is: the
    leading system messages, the archived originals (each marked ``"archived": True``), then
    the rest of the live list, summaries marked by ``kind: "summary"`` as stored."""
    head = 0
    while (
        head < len(live)
        and live[head].get("role") == "system"
        and live[head].get("kind") != "summary"
    ):
        head += 1
    return [
        *(dict(r) for r in live[:head]),
        *({**r, "archived": True} for r in archive),
        *(dict(r) for r in live[head:]),
    ]


def check_shard_config(recorded: Any, shards: int, prefix: str) -> None:
    """Raise if the shard count recorded in Redis for ``prefix`` differs from ``shards``."""
    value = int(_text(recorded))
    if value != shards:
        raise ShardCountMismatchError(
            f"prefix {prefix!r} was set up with {value} shards in this Redis, but this client "
            f"is configured with {shards}; use shards={value} (sessions would otherwise be "
            f"looked up in the wrong shard)"
        )


def eviction_warning(reply: Any) -> str | None:
    """The warning to log for ``CONFIG GET maxmemory-policy``'s reply, or None.

    Any policy other than ``noeviction`` lets Redis evict keys when memory fills: a session
    that loses one of its keys is reported corrupted
    (:class:`~convstate.errors.SessionCorruptedError`), and one whose queue entry is evicted
    waits for the daemon's sweep to queue it again. An empty or odd reply (a managed service
    that hides the setting) gives None."""
    if not isinstance(reply, Mapping):
        return None
    policy = _text(next(iter(reply.values()), b"")) if reply else ""
    if not policy or policy == "noeviction":
        return None
    which = "with a TTL " if policy.startswith("volatile-") else ""
    return (
        f"Redis maxmemory-policy is {policy!r}: when memory fills, Redis evicts keys "
        f"{which}and a session can lose its messages, meta or id hash (convstate then raises "
        "SessionCorruptedError for it) or its compaction queue entry. Set maxmemory-policy "
        "noeviction: appends then fail with MemoryFullError while reads, deletes and "
        "compaction go on."
    )
