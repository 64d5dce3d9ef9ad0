"""One MULTI ... EXEC on a pooled redis-py connection, without redis-py's pipeline layers.

A chat turn (append + in-budget read) is one MULTI of five commands. redis-py's
``pipeline(transaction=True)`` builds command objects, runs response callbacks and its retry
machinery around them: about as long as the round trip itself. Here the block is packed once
into one buffer (hiredis's packer, which redis-py's connection also uses), written with
``Connection.send_packed_command`` and read back with ``Connection.read_response``: redis-py's
public connection API, so AUTH, TLS, RESP3 (push frames are handled inside ``read_response``),
health checks and the pool's limits all stay redis-py's.

Any error of the connection itself (the server restarted mid-call, a timeout, a pool that has
no connection to give) disconnects that connection and raises :class:`FastPathUnavailable`:
the caller then runs the same commands through redis-py's own pipeline, which has its retry
policy. A retried turn is still one write: an append is idempotent by message id. When the
commands had been sent whole and their reply was lost (``FastPathUnavailable.sent``), the
server may have run them: the second attempt then finds an append's messages stored, and the
caller says so (``AppendResult.resent``).

The first reply is read with ``read_response`` (which waits for the socket, with its timeout).
The server answers the whole block at once, so the other replies are then nearly always in the
hiredis reader's buffer already: they are taken from it directly (``gets``, about 0.1 us each
instead of the 3-5 us of redis-py's per-reply layers), errors handled as redis-py's parser does.
A RESP3 push frame found there is handed to the parser's ``handle_push_response``, as
``read_response`` would; a reply not yet complete in the buffer, or a parser without a hiredis
reader: ``read_response`` reads it, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import hiredis
import redis
import redis.asyncio
from redis.exceptions import BusyLoadingError, ExecAbortError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # the sentinel redis-py's hiredis parsers give hiredis for "no complete reply yet"
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # another redis-py layout: every reply goes through read_response
    _NOT_ENOUGH_DATA = None

Command = Sequence[str | int | bytes]

#: Errors after which the fast path gives the call to redis-py's pipeline.
_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class FastPathUnavailable(Exception):
    """The raw command or MULTI could not be sent or read.

    ``sent``: it was sent whole and its reply was lost (a timeout, a connection closed while
    waiting), so the server may have run it; False when it was never sent whole, or the
    server answered that it ran nothing (``LOADING``)."""

    def __init__(self, message: str, *, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


def _lost(sent: bool, exc: BaseException) -> bool:
    """Whether ``exc``, met after the commands were ``sent`` whole, may have lost the reply
    of commands the server ran (a ``LOADING`` reply says it ran nothing)."""
    return sent and not isinstance(exc, BusyLoadingError)


def _single_connection(client: Any) -> bool:
    """A ``single_connection_client``: its one connection is redis-py's to manage."""
    return bool(
        getattr(client, "connection", None) is not None
        or getattr(client, "single_connection_client", False)
        or getattr(client, "_single_connection_client", False)
    )


def _wire(commands: Sequence[Command]) -> list[Command]:
    return [("MULTI",), *commands, ("EXEC",)]


def _pack(conn: Any, wire: list[Command]) -> list[bytes]:
    """The whole block as one buffer, for one ``sendall`` (redis-py's ``pack_commands`` gives
    a list of chunks, each its own syscall, and encodes every argument in Python first).
    hiredis encodes str as UTF-8: a connection with another encoding packs the usual way."""
    if conn.encoder.encoding.lower().replace("-", "") != "utf8":
        return list(conn.pack_commands(wire))
    pack: Any = hiredis.pack_command  # (its stub takes one-element tuples only)
    return [b"".join([pack(tuple(command)) for command in wire])]


class _Buffer(NamedTuple):
    """A connection's parser and its hiredis reader, and the type of RESP3 push frames."""

    parser: Any
    reader: Any
    push: Any


def _buffer(conn: Any) -> _Buffer | None:
    """Where replies may be taken from directly: redis-py's ``_HiredisParser`` or
    ``_AsyncHiredisParser`` of ``conn`` and its reader; None (use ``read_response``) for
    another parser, after a disconnect, or on RESP3 with a hiredis that does not mark push
    frames (redis-py cannot tell them from replies either)."""
    if _NOT_ENOUGH_DATA is None:
        return None
    parser = getattr(conn, "_parser", None)
    if parser is None or not getattr(parser, "_connected", True):  # (async: disconnected)
        return None
    reader = getattr(parser, "_reader", None)
    push = getattr(parser, "_hiredis_PushNotificationType", None)
    if reader is None or (push is None and conn.protocol in (3, "3")):
        return None
    return _Buffer(parser, reader, push)


def _buffered(buffer: _Buffer) -> Any:
    """The next reply or push frame if the reader holds all of it, else
    :data:`_NOT_ENOUGH_DATA`. An error reply is returned as its exception instance; a
    connection error (LOADING, MASTERDOWN) is raised, as redis-py's parser raises it."""
    reply = buffer.reader.gets(False)
    if isinstance(reply, RedisConnectionError):
        raise reply
    if isinstance(reply, list) and reply and isinstance(reply[0], RedisConnectionError):
        raise reply[0]
    return reply


def _is_push(buffer: _Buffer, reply: Any) -> bool:
    return buffer.push is not None and isinstance(reply, buffer.push)


def _exec_reply(replies: list[Any]) -> list[Any]:
    """EXEC's replies; a command refused while queueing (OOM, wrong arity) is raised."""
    exec_reply = replies[-1]
    if isinstance(exec_reply, ExecAbortError) or isinstance(exec_reply, ResponseError):
        for reply in replies[1:-1]:
            if isinstance(reply, ResponseError):
                raise reply
        raise exec_reply
    return list(exec_reply)


def command(client: redis.Redis, cmd: Command) -> Any:
    """One command on a pooled connection, the same way: its reply, or its error reply as an
    exception instance; raises :class:`FastPathUnavailable` (the caller takes redis-py's own
    path) on a connection error or for a single-connection client."""
    if _single_connection(client):
        raise FastPathUnavailable("single_connection_client")
    return _raw_send(client, [cmd])[0]


async def acommand(client: redis.asyncio.Redis, cmd: Command) -> Any:
    """:func:`command` for asyncio clients."""
    if _single_connection(client):
        raise FastPathUnavailable("single_connection_client")
    return (await _araw_send(client, [cmd]))[0]


def transaction(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """Run ``commands`` in one MULTI/EXEC on a pooled connection; EXEC's replies, with a
    command's error reply as an exception instance in its place (not raised)."""
    return transaction_resent(client, commands)[0]


def transaction_resent(client: redis.Redis, commands: Sequence[Command]) -> tuple[list[Any], bool]:
    """:func:`transaction`'s replies, and whether the block was sent again through redis-py's
    pipeline after the raw attempt's reply was lost (the server may have run both)."""
    if _single_connection(client):
        return pipeline_transaction(client, commands), False
    try:
        return _exec_reply(_raw(client, commands)), False
    except FastPathUnavailable as exc:
        return pipeline_transaction(client, commands), exc.sent


def _raw(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    return _raw_send(client, _wire(commands))


def _raw_send(client: redis.Redis, wire: list[Command]) -> list[Any]:
    pool: Any = client.connection_pool  # redis-py's connection API is untyped
    try:
        conn: Any = pool.get_connection()
    except _CONNECTION_ERRORS as exc:
        raise FastPathUnavailable(str(exc)) from exc
    sent = False
    try:
        conn.send_packed_command(_pack(conn, wire))
        sent = True
        replies: list[Any] = []
        buffer = None
        while len(replies) < len(wire):
            if buffer is not None:
                reply = _buffered(buffer)
                if _is_push(buffer, reply):  # routed as read_response routes it
                    buffer.parser.handle_push_response(reply)
                    buffer = _buffer(conn)
                    continue
                if reply is not _NOT_ENOUGH_DATA:
                    replies.append(reply)
                    continue
            try:
                replies.append(conn.read_response(disable_decoding=True))
            except ResponseError as exc:
                replies.append(exc)
            buffer = _buffer(conn)
        return replies
    except _CONNECTION_ERRORS as exc:
        conn.disconnect()
        raise FastPathUnavailable(str(exc), sent=_lost(sent, exc)) from exc
    except BaseException:
        conn.disconnect()  # replies may be left unread on it
        raise
    finally:
        pool.release(conn)


def pipeline_transaction(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """The same MULTI through redis-py's pipeline (its retries, its single connection)."""
    pipe: Any
    with client.pipeline(transaction=True) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))


async def atransaction(client: redis.asyncio.Redis, commands: Sequence[Command]) -> list[Any]:
    """:func:`transaction` for asyncio clients."""
    return (await atransaction_resent(client, commands))[0]


async def atransaction_resent(
    client: redis.asyncio.Redis, commands: Sequence[Command]
) -> tuple[list[Any], bool]:
    """:func:`transaction_resent` for asyncio clients."""
    if _single_connection(client):
        return await apipeline_transaction(client, commands), False
    try:
        return _exec_reply(await _araw(client, commands)), False
    except FastPathUnavailable as exc:
        return await apipeline_transaction(client, commands), exc.sent


async def _araw(client: redis.asyncio.Redis, commands: Sequence[Command]) -> list[Any]:
    return await _araw_send(client, _wire(commands))


async def _araw_send(client: redis.asyncio.Redis, wire: list[Command]) -> list[Any]:
    pool: Any = client.connection_pool  # redis-py's connection API is untyped
    try:
        conn: Any = await pool.get_connection()
    except _CONNECTION_ERRORS as exc:
        raise FastPathUnavailable(str(exc)) from exc
    sent = False
    try:
        await conn.send_packed_command(_pack(conn, wire))
        sent = True
        replies: list[Any] = []
        buffer = None
        while len(replies) < len(wire):
            if buffer is not None:
                reply = _buffered(buffer)
                if _is_push(buffer, reply):  # routed as read_response routes it
                    await buffer.parser.handle_push_response(reply)
                    buffer = _buffer(conn)
                    continue
                if reply is not _NOT_ENOUGH_DATA:
                    replies.append(reply)
                    continue
            try:
                replies.append(await conn.read_response(disable_decoding=True))
            except ResponseError as exc:
                replies.append(exc)
            buffer = _buffer(conn)
        return replies
    except _CONNECTION_ERRORS as exc:
        await conn.disconnect(nowait=True)
        raise FastPathUnavailable(str(exc), sent=_lost(sent, exc)) from exc
    except BaseException:
        await conn.disconnect(nowait=True)  # cancelled mid-read: replies may be left on it
        raise
    finally:
        await pool.release(conn)


async def apipeline_transaction(
    client: redis.asyncio.Redis, commands: Sequence[Command]
) -> list[Any]:
    """:func:`pipeline_transaction` for asyncio clients."""
    pipe: Any
    async with client.pipeline(transaction=True) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))
