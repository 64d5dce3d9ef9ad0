"""convstate: LLM conversation state in Redis.

Atomic Lua appends that keep an exact running token total and flag sessions for compaction in
one round trip; reads that always fit a token budget; a compaction daemon that folds the middle
of long histories into a rolling summary without losing concurrent appends.
"""

from __future__ import annotations

from convstate.client import AsyncConversationStore, ConversationStore
from convstate.errors import ConvstateError
from convstate.keys import DEFAULT_SHARDS, KeySchema
from convstate.models import AppendResult, SessionMeta, SessionState, Turn
from convstate.tokens import TiktokenCounter, TokenCounter

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SHARDS",
    "AppendResult",
    "AsyncConversationStore",
    "ConversationStore",
    "ConvstateError",
    "KeySchema",
    "SessionMeta",
    "SessionState",
    "TiktokenCounter",
    "TokenCounter",
    "Turn",
    "__version__",
]
