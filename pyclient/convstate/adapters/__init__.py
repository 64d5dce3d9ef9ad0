"""Adapters that let agent frameworks keep their conversation state in convstate.

Each adapter lives in its own module and imports its framework only when that module is
imported, so ``import convstate`` (and ``import convstate.adapters``) never needs them:

* :mod:`convstate.adapters.langchain`: :class:`ConvstateChatMessageHistory`, a LangChain
  ``BaseChatMessageHistory`` (``pip install 'convstate[langchain]'``).
* :mod:`convstate.adapters.openai_agents`: :class:`ConvstateSession`, an OpenAI Agents SDK
  ``Session`` (``pip install 'convstate[agents]'``).

Both names can also be taken from this package (``from convstate.adapters import
ConvstateSession``); the framework is imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ConvstateChatMessageHistory", "ConvstateSession"]

_EXPORTS = {
    "ConvstateChatMessageHistory": "convstate.adapters.langchain",
    "ConvstateSession": "convstate.adapters.openai_agents",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
