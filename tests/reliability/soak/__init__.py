"""Reliability soak harness: writer processes, compaction daemons, injected faults, and an
invariant checker that proves no acknowledged message was lost or duplicated.

The promise under test: *under load, crashes, restarts and bad input, no acknowledged message
is lost or duplicated.*

What :func:`run_soak` does:

1. Starts a private ``redis-server`` with ``--appendonly yes --appendfsync always`` (appended
   after :class:`~convstate.embedded.RedisServer`'s own ``--appendonly no``; the later flag
   wins), so a restart keeps every acknowledged write: the AOF is fsynced before a reply.
2. Creates ``sessions`` sessions with a small token limit, so compactions happen all the time.
3. Starts ``daemons`` ``python -m convstate.cli daemon`` processes (``--archive``, short lease,
   1 s sweep, extractive summarizer, no HTTP) and ``writers`` writer *processes*
   (multiprocessing, spawn). Each writer appends to random sessions, paced, for ``duration``
   seconds: single messages, batches, tool-call groups (assistant ``tool_calls`` + results in
   one atomic ``append_many``), deliberate re-sends of already acknowledged messages, and bad
   input that must be rejected without writing anything (invalid messages, oversized ones,
   appends to a session that does not exist). Every message carries an explicit id
   ``w<writer>-<seq>``. On ``ConnectionError``/``TimeoutError`` (or ``READONLY``) a writer
   retries the *same* message (same id) until it is acknowledged (bounded). Each writer logs
   what it sent and every acknowledgement to its own JSON-lines file, flushed per line, so a
   crash loses no record.
4. Injects faults at fixed offsets (fractions of ``duration``): ``kill -9`` of a daemon (and a
   replacement), ``SCRIPT FLUSH``, ``CLIENT KILL TYPE normal``, ``CLIENT PAUSE 300 WRITE``
   (the writers' 0.1 s socket timeout makes them time out and retry), a server restart
   (``RedisServer.restart()``: same port and directory) and a server crash (``kill -9``,
   then the same restart: only the fsync-always AOF keeps the acknowledged writes).
   Each fault records its kind, time, and recovery time: from the fault until every writer had
   an acknowledged append after it, a compaction completed after it, and (daemon kill,
   restart) the daemons were subscribed again and the leases held at the kill were released.
   While the soak runs, a monitor thread takes a consistent snapshot (MULTI/EXEC) of every
   session's compaction state and the shard sets every 0.2 s and checks them.
5. Stops the writers, lets the daemons drain the queues (bounded), stops them with SIGTERM,
   and checks the invariants (:func:`check_invariants`).

Usage::

    result = run_soak(SoakConfig(duration=45))
    assert result.ok, result.problems()

Modules, each importing only those listed before it (:mod:`~tests.reliability.soak.faults`
names :mod:`~tests.reliability.soak.run`'s ``_Soak`` for its annotations only):

* :mod:`~tests.reliability.soak.config` -- the fault kinds and schedules, :class:`SoakConfig`,
  :class:`WriterSpec`, :class:`SoakError`;
* :mod:`~tests.reliability.soak.writers` -- the writer processes (:class:`Writer`,
  :func:`writer_main`);
* :mod:`~tests.reliability.soak.ledger` -- the writers' logs merged (:func:`read_ledger`);
* :mod:`~tests.reliability.soak.invariants` -- :func:`check_invariants`;
* :mod:`~tests.reliability.soak.daemons` -- the daemon processes (:class:`DaemonHandle`);
* :mod:`~tests.reliability.soak.monitor` -- the monitor thread, :func:`pubsub_ids`;
* :mod:`~tests.reliability.soak.result` -- :class:`FaultRecord`, :class:`SoakResult`;
* :mod:`~tests.reliability.soak.faults` -- fault injection;
* :mod:`~tests.reliability.soak.run` -- the run loop, :func:`run_soak`.
"""

from __future__ import annotations

from tests.reliability.soak.config import (
    DEFAULT_SCHEDULE,
    FAULT_KINDS,
    PRODUCTION_MAXMEMORY,
    PRODUCTION_SCHEDULE,
    SoakConfig,
    SoakError,
    WriterSpec,
)
from tests.reliability.soak.daemons import DaemonHandle, daemon_argv, daemon_env
from tests.reliability.soak.faults import MEMORY_FULL_S
from tests.reliability.soak.invariants import InvariantReport, check_invariants
from tests.reliability.soak.ledger import Ledger, read_ledger
from tests.reliability.soak.monitor import pubsub_ids
from tests.reliability.soak.result import FaultRecord, SoakResult
from tests.reliability.soak.run import run_soak
from tests.reliability.soak.writers import Writer, writer_main

__all__ = [
    "DEFAULT_SCHEDULE",
    "FAULT_KINDS",
    "MEMORY_FULL_S",
    "PRODUCTION_MAXMEMORY",
    "PRODUCTION_SCHEDULE",
    "DaemonHandle",
    "FaultRecord",
    "InvariantReport",
    "Ledger",
    "SoakConfig",
    "SoakError",
    "SoakResult",
    "Writer",
    "WriterSpec",
    "check_invariants",
    "daemon_argv",
    "daemon_env",
    "pubsub_ids",
    "read_ledger",
    "run_soak",
    "writer_main",
]
