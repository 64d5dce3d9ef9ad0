"""``convstate demo``: concurrent chat sessions, the compaction daemon, and a checked result.

What runs:

* an engine: a private Redis/Valkey in a temporary directory (:class:`RedisServer`), or the
  server of ``--redis-url`` under a unique key prefix whose keys are deleted afterwards;
* ``writers`` **processes** (multiprocessing, spawn), each with its own synchronous
  :class:`ConversationStore`, appending scripted user/assistant exchanges (some with a tool
  call and its result) to its share of the sessions at a quick but chat-like pace. Every
  acknowledged append is reported back through a multiprocessing queue;
* the compaction :class:`Daemon`, in this process (extractive summarizer by default, or an
  OpenAI-compatible model), with ``archive=True`` so that folded originals are kept;
* a live view (rich) of each session's tokens against its limit, its state and epoch, the
  queue, and a log of compactions; or plain progress lines (``--no-live``, non-terminals).

It ends with a verification that is computed from what the writers acknowledged and what
Redis holds, not assumed: every acknowledged message is stored exactly once (in its session's
list or its archive), every session's ``token_count`` is the sum of its records' tokens, the
daemon's compactions match the sessions' epochs, and so on (:class:`Check`). Any failed check
makes ``convstate demo`` exit 1.

``rich`` draws the live view; without it the demo prints plain progress and says how to
install it. Everything else is convstate's own dependencies.
"""

from __future__ import annotations

from convstate.demo.checks import Ack, Check, DemoResult, verify
from convstate.demo.options import DemoError, DemoOptions
from convstate.demo.reporters import (
    RICH_HINT,
    LiveReporter,
    PlainReporter,
    Reporter,
    make_reporter,
    render_summary,
    render_view,
)
from convstate.demo.run import delete_prefix, run_cli, run_demo
from convstate.demo.scenario import TOPICS, build_conversation
from convstate.demo.view import DemoView, SessionRow

__all__ = [
    "RICH_HINT",
    "TOPICS",
    "Ack",
    "Check",
    "DemoError",
    "DemoOptions",
    "DemoResult",
    "DemoView",
    "LiveReporter",
    "PlainReporter",
    "Reporter",
    "SessionRow",
    "build_conversation",
    "delete_prefix",
    "make_reporter",
    "render_summary",
    "render_view",
    "run_cli",
    "run_demo",
    "verify",
]
