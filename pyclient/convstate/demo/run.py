"""One run of the demo: the engine, the sessions, the writer processes, the daemon in this
process, the view kept up to date, and the checked result."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import queue
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import redis

from convstate.admin import Admin, Stats
from convstate.client import ConversationStore
from convstate.compactor import Outcome
from convstate.daemon import Daemon, DaemonSettings, Metrics
from convstate.demo.checks import Ack, Check, DemoResult, Facts, decoded, verify
from convstate.demo.options import (
    DAEMON_GRACE,
    DEMO_SHARDS,
    POLL_INTERVAL,
    SETTLE_SHARE,
    TICK,
    DemoError,
    DemoOptions,
)
from convstate.demo.reporters import PlainReporter, Reporter, make_reporter
from convstate.demo.scenario import TOPICS
from convstate.demo.view import DemoView, SessionRow
from convstate.demo.writers import WriterEvent, WriterSpec, writer_main
from convstate.keys import KeySchema
from convstate.summarizers import Summarizer
from convstate.urls import redact_url
from convstate.verify import read_snapshot

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.queues import Queue

log = logging.getLogger(__name__)


class _ObservedMetrics(Metrics):
    """The daemon's metrics, also handing every compaction outcome to the demo."""

    def __init__(self, on_outcome: Callable[[Outcome], None]) -> None:
        super().__init__()
        self._on_outcome = on_outcome

    def record(self, outcome: Outcome) -> None:
        super().record(outcome)
        self._on_outcome(outcome)


class _LogToView(logging.Handler):
    """convstate's warnings go to the view's log instead of scribbling over the live view."""

    def __init__(self, view: DemoView) -> None:
        super().__init__(logging.WARNING)
        self.view = view

    def emit(self, record: logging.LogRecord) -> None:
        style = "bold red" if record.levelno >= logging.ERROR else "yellow"
        self.view.add_log(f"{record.name}: {record.getMessage()}", style)


@contextlib.contextmanager
def _logs_into(view: DemoView) -> Iterator[None]:
    logger = logging.getLogger("convstate")
    handler = _LogToView(view)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@contextlib.contextmanager
def _engine(redis_url: str | None) -> Iterator[tuple[str, str]]:
    """``(url, description)`` of the server to use: the given one, or a private one that is
    stopped (and its directory removed) afterwards."""
    if redis_url:
        yield redis_url, f"server at {redact_url(redis_url)}"
        return
    from convstate.embedded import RedisServer

    server = RedisServer("redis")
    server.start()
    try:
        version = ".".join(map(str, server.version))
        print(
            f"started a private {server.server_kind} {version} at {server.url} in {server.dir}",
            file=sys.stderr,
            flush=True,
        )
        yield server.url, f"private {server.server_kind} {version} at {server.host}:{server.port}"
    finally:
        server.stop()


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix:`` (SCAN + UNLINK); returns how many."""
    deleted = 0
    batch: list[Any] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=500):
        batch.append(key)
        if len(batch) >= 500:
            deleted += int(client.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


class _DemoRun:
    """One run of the demo; :meth:`run` does everything and returns the checked result."""

    def __init__(self, options: DemoOptions, reporter: Reporter) -> None:
        self.options = options
        self.reporter = reporter
        self.encoding = options.resolved_encoding()
        self.prefix = f"csdemo-{secrets.token_hex(4)}"
        self.schema = KeySchema(self.prefix, DEMO_SHARDS)
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.acks: list[Ack] = []
        self.outcomes: list[Outcome] = []
        self.ready: set[int] = set()
        self.writer_counts: dict[int, int] = {}
        self.writer_errors: list[str] = []
        self.writers_done_at: float | None = None
        self.last_poll = 0.0
        self.processes: list[SpawnProcess] = []
        ctx = multiprocessing.get_context("spawn")
        self.ctx = ctx
        self.events: Queue[WriterEvent] = ctx.Queue()
        self.go = ctx.Event()
        self.stop = ctx.Event()
        self.view: DemoView | None = None
        self.client: redis.Redis | None = None
        self.admin: Admin | None = None

    def _deadline(self, share: float) -> float:
        return self.started + self.options.duration * share

    # -- setup ---------------------------------------------------------------------------------

    def _create_sessions(self, client: redis.Redis, engine: str, summarizer: str) -> DemoView:
        o = self.options
        view = DemoView(o, engine, self.prefix, summarizer, started=self.started)
        store = ConversationStore(
            client,
            token_limit=o.token_limit,
            encoding=self.encoding,
            prefix=self.prefix,
            shards=DEMO_SHARDS,
        )
        for i in range(o.sessions):
            sid = f"chat-{i + 1}"
            topic = TOPICS[i % len(TOPICS)]
            state = store.create_session(sid, system=topic.system)
            view.sessions[sid] = SessionRow(
                sid,
                topic.title,
                writer=i % o.writer_count,
                token_limit=o.token_limit,
                system_ids=tuple(str(m["id"]) for m in state.messages),
                system_tokens=state.meta.token_count,
                tokens=state.meta.token_count,
                messages=state.meta.message_count,
            )
        return view

    def _start_writers(self, url: str, view: DemoView) -> None:
        o = self.options
        for w in range(o.writer_count):
            spec = WriterSpec(
                index=w,
                redis_url=url,
                prefix=self.prefix,
                shards=DEMO_SHARDS,
                token_limit=o.token_limit,
                encoding=self.encoding,
                sessions=tuple(
                    (i, row.session_id)
                    for i, row in enumerate(view.sessions.values())
                    if row.writer == w
                ),
                turns=o.turns,
                duration=o.duration,
                started_at=self.started_wall,
                seed=w + 1,
            )
            process = self.ctx.Process(
                target=writer_main,
                args=(spec, self.events, self.go, self.stop),
                name=f"convstate-demo-writer-{w}",
                daemon=True,
            )
            process.start()
            self.processes.append(process)

    def _stop_writers(self) -> None:
        """Stop the writers (they finish the append in flight), reading their last events."""
        self.stop.set()
        self.go.set()
        deadline = time.monotonic() + 10
        while any(p.is_alive() for p in self.processes) and time.monotonic() < deadline:
            self._pump()
            time.sleep(TICK)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
            process.join(5)
        self._pump()

    # -- events from the writers and the daemon --------------------------------------------------

    def _pump(self) -> None:
        """Handle what the writers have reported so far."""
        view = self.view
        assert view is not None
        for _ in range(10_000):
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if event.kind == "ack":
                self.acks.append(Ack(event.session, event.message_id, event.role, event.tokens))
                row = view.sessions[event.session]
                row.acked += 1
                row.flagged += int(event.flagged)
                view.messages += 1
                view.tokens_appended += event.tokens
            elif event.kind == "ready":
                self.ready.add(event.writer)
            elif event.kind == "error":
                self.writer_errors.append(event.text)
                view.add_log(f"writer {event.writer} failed: {event.text}", "bold red")
            elif event.kind == "done":
                self.writer_counts[event.writer] = event.total

    def _on_outcome(self, outcome: Outcome) -> None:
        view = self.view
        assert view is not None
        self.outcomes.append(outcome)
        sid = outcome.session_id
        if outcome.status == "compacted":
            view.compactions += 1
            view.add_log(
                f"{sid} compacted {outcome.tokens_before:,} -> {outcome.tokens_after:,} tokens "
                f"({outcome.folded} messages folded)",
                "green",
            )
        elif outcome.status == "uncompactable":
            view.add_log(f"{sid} left as is: {outcome.note}", "dim")
        else:
            view.failures += 1
            style = "bold red" if outcome.status in ("dead", "error") else "yellow"
            view.add_log(f"{sid} {outcome.status}: {outcome.note}", style)

    def _snapshot(self) -> tuple[list[list[Any]], Stats]:
        assert self.client is not None
        assert self.admin is not None
        assert self.view is not None
        pipe = self.client.pipeline(transaction=False)
        for sid in self.view.sessions:
            pipe.hmget(
                self.schema.session(sid).meta,
                ["token_count", "message_count", "state", "epoch"],
            )
        return pipe.execute(), self.admin.stats()

    async def _poll(self) -> None:
        view = self.view
        assert view is not None
        metas, stats = await asyncio.to_thread(self._snapshot)
        for row, (tokens, count, state, epoch) in zip(view.sessions.values(), metas, strict=True):
            row.tokens = int(tokens or 0)
            row.messages = int(count or 0)
            row.state = decoded(state) if state is not None else "?"
            row.epoch = int(epoch or 0)
        view.queued, view.running, view.dead = stats.queued, stats.running, stats.dead
        self.last_poll = time.monotonic()

    # -- the asyncio part: the daemon, the view ----------------------------------------------------

    def _writers_finished(self) -> bool:
        finished = all(
            w in self.writer_counts or not p.is_alive() for w, p in enumerate(self.processes)
        )
        if finished and self.writers_done_at is None:
            self.writers_done_at = time.monotonic()
        return finished

    def _settled(self) -> bool:
        """The writers are done and a poll since shows nothing queued or running."""
        view = self.view
        assert view is not None
        if not self._writers_finished():
            return False
        view.phase = "compacting the rest"
        assert self.writers_done_at is not None
        return (
            self.last_poll > self.writers_done_at
            and view.queued == 0
            and view.running == 0
            and all(row.state != "running" for row in view.sessions.values())
        )

    async def _run_until(
        self, serve: asyncio.Task[None], done: Callable[[], bool], deadline: float
    ) -> bool:
        next_poll = 0.0
        while True:
            self._pump()
            now = time.monotonic()
            if now >= next_poll:
                await self._poll()
                next_poll = now + POLL_INTERVAL
                assert self.view is not None
                self.reporter.update(self.view)
            if serve.done():
                serve.result()  # raises what stopped it
                raise DemoError("the compaction daemon stopped unexpectedly")
            if done():
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(TICK)

    async def _supervise(self, settings: DaemonSettings, summarizer: Summarizer) -> None:
        view = self.view
        assert view is not None
        daemon = Daemon(settings, summarizer=summarizer, metrics=_ObservedMetrics(self._on_outcome))
        serve = asyncio.create_task(daemon.serve(install_signal_handlers=False), name="daemon")
        try:
            started = asyncio.ensure_future(daemon.started.wait())
            await asyncio.wait({started, serve}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if serve.done():
                serve.result()
            if not daemon.started.is_set():
                raise DemoError("the compaction daemon did not start within 10 s")
            view.phase = "starting writers"
            everyone = set(range(len(self.processes)))
            if not await self._run_until(
                serve, lambda: self.ready == everyone or self._writers_finished(), self._deadline(1)
            ):
                view.add_log("the writers did not start in time", "bold red")
                return
            self.go.set()
            view.phase = "writing"
            if not await self._run_until(serve, self._settled, self._deadline(SETTLE_SHARE)):
                view.add_log("--duration reached: stopping", "yellow")
        finally:
            view.phase = "stopping"
            self.stop.set()
            if not serve.done():
                daemon.request_stop()
                await asyncio.wait({serve}, timeout=DAEMON_GRACE + 5)
            if not serve.done():
                daemon.request_stop()  # the second request stops at once
                await asyncio.wait({serve}, timeout=10)
            if serve.done() and not serve.cancelled() and serve.exception() is not None:
                log.error("the compaction daemon failed: %r", serve.exception())

    # -- the checks ------------------------------------------------------------------------------

    def _gather(self) -> Facts:
        view, client, admin = self.view, self.client, self.admin
        assert view is not None
        assert client is not None
        assert admin is not None
        # One MULTI per session: what convstate.verify checks.
        stored = {sid: read_snapshot(client, self.schema, sid) for sid in view.sessions}
        exits = {i: p.exitcode for i, p in enumerate(self.processes)}
        return Facts(
            rows=view.sessions,
            acks=self.acks,
            writer_counts=self.writer_counts,
            writer_exits=exits,
            writer_errors=self.writer_errors,
            outcomes=self.outcomes,
            stored=stored,
            stats=admin.stats(),
        )

    def _result(self, facts: Facts, checks: tuple[Check, ...]) -> DemoResult:
        view = self.view
        assert view is not None
        system = sum(row.system_tokens for row in view.sessions.values())
        appended = sum(a.tokens for a in facts.acks) + system
        held = sum(st.num("token_count") for st in facts.stored.values())
        lost = next((c for c in checks if c.name == "nothing lost"), None)
        totals = {
            "messages_appended": len(facts.acks),
            "compactions": sum(1 for o in facts.outcomes if o.status == "compacted"),
            "tokens_appended": appended,
            "tokens_held": held,
            "tokens_saved": appended - held,
            "archived_messages": sum(len(st.archive) for st in facts.stored.values()),
            "nothing_lost": bool(lost and lost.passed),
            "elapsed_s": round(view.elapsed, 2),
        }
        sessions = tuple(
            {
                "session_id": sid,
                "topic": view.sessions[sid].topic,
                "writer": view.sessions[sid].writer,
                "acknowledged": view.sessions[sid].acked,
                "token_count": st.num("token_count"),
                "token_limit": st.num("token_limit"),
                "message_count": st.num("message_count"),
                "archived": len(st.archive),
                "epoch": st.num("epoch"),
                "state": st.meta.get("state", "?"),
            }
            for sid, st in facts.stored.items()
        )
        o = self.options
        info = {
            "engine": view.engine,
            "prefix": self.prefix,
            "options": {
                "sessions": o.sessions,
                "writers": o.writer_count,
                "turns": o.turns,
                "duration": o.duration,
                "token_limit": o.token_limit,
                "encoding": self.encoding,
                "summarizer": view.summarizer,
            },
        }
        return DemoResult(checks, totals, sessions, info)

    # -- everything --------------------------------------------------------------------------------

    def run(self) -> DemoResult:
        o = self.options
        with contextlib.ExitStack() as stack:
            stack.callback(self._close_queue)
            # A configuration error (say, no OPENAI_API_KEY) stops us before anything starts.
            summarizer = o.daemon_settings("redis://", self.prefix).make_summarizer()
            url, engine = stack.enter_context(_engine(o.redis_url))
            settings = o.daemon_settings(url, self.prefix)
            self.client = client = redis.Redis.from_url(url, socket_timeout=10)
            stack.callback(client.close)
            client.ping()
            if o.redis_url:  # a shared server: remove exactly our keys afterwards
                stack.callback(delete_prefix, client, self.prefix)
            self.admin = Admin(client, self.schema)
            label = getattr(summarizer, "name", settings.summarizer)
            if o.summarizer == "openai" and o.openai_base_url:
                label += f" at {o.openai_base_url}"
            self.view = view = self._create_sessions(client, engine, label)
            stack.enter_context(_logs_into(view))
            stack.callback(self._stop_writers)
            self._start_writers(url, view)
            self.reporter.start(view)
            try:
                asyncio.run(self._supervise(settings, summarizer))
                view.phase = "verifying"
                self._stop_writers()
                facts = self._gather()
                checks = verify(facts)
                view.phase = "done"
                view.ended = time.monotonic()
            finally:
                self.reporter.stop(view)
            return self._result(facts, checks)

    def _close_queue(self) -> None:
        self.events.close()
        self.events.join_thread()


def run_demo(options: DemoOptions, reporter: Reporter | None = None) -> DemoResult:
    """Run the demo, showing it through ``reporter`` (default: plain lines on stdout), and
    return the verification. Everything it started is stopped, and with ``redis_url`` every
    key it wrote is deleted, before it returns (also on errors and Ctrl-C)."""
    return _DemoRun(options, reporter or PlainReporter(sys.stdout)).run()


def run_cli(options: DemoOptions, *, as_json: bool, live: bool) -> int:
    """``convstate demo``: the live view (or plain progress), then the verification summary
    (as JSON on stdout with ``as_json``; progress then goes to stderr). Returns the exit
    code: 0 if every check passed, else 1."""
    reporter = make_reporter(sys.stderr if as_json else sys.stdout, live=live)
    result = run_demo(options, reporter)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2), flush=True)
    else:
        reporter.summary(result)
    return 0 if result.passed else 1
