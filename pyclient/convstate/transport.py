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
policy. A retried turn is still one write: an append is idempotent by message id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ExecAbortError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Command = Sequence[str | int | bytes]

#: Errors after which the fast path gives the call to redis-py's pipeline.
_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class FastPathUnavailable(Exception):
    """The raw MULTI could not be sent or read; nothing is known about whether it ran."""


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
    if _single_connection(client):
        return pipeline_transaction(client, commands)
    try:
        return _exec_reply(_raw(client, commands))
    except FastPathUnavailable:
        return pipeline_transaction(client, commands)


def _raw(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    return _raw_send(client, _wire(commands))


def _raw_send(client: redis.Redis, wire: list[Command]) -> list[Any]:
    pool: Any = client.connection_pool  # redis-py's connection API is untyped
    try:
        conn: Any = pool.get_connection()
    except _CONNECTION_ERRORS as exc:
        raise FastPathUnavailable(str(exc)) from exc
    try:
        conn.send_packed_command(_pack(conn, wire))
        replies: list[Any] = []
        for _ in wire:
            try:
                replies.append(conn.read_response(disable_decoding=True))
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except _CONNECTION_ERRORS as exc:
        conn.disconnect()
        raise FastPathUnavailable(str(exc)) from exc
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
    if _single_connection(client):
        return await apipeline_transaction(client, commands)
    try:
        return _exec_reply(await _araw(client, commands))
    except FastPathUnavailable:
        return await apipeline_transaction(client, commands)


async def _araw(client: redis.asyncio.Redis, commands: Sequence[Command]) -> list[Any]:
    return await _araw_send(client, _wire(commands))


async def _araw_send(client: redis.asyncio.Redis, wire: list[Command]) -> list[Any]:
    pool: Any = client.connection_pool  # redis-py's connection API is untyped
    try:
        conn: Any = await pool.get_connection()
    except _CONNECTION_ERRORS as exc:
        raise FastPathUnavailable(str(exc)) from exc
    try:
        await conn.send_packed_command(_pack(conn, wire))
        replies: list[Any] = []
        for _ in wire:
            try:
                replies.append(await conn.read_response(disable_decoding=True))
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except _CONNECTION_ERRORS as exc:
        await conn.disconnect(nowait=True)
        raise FastPathUnavailable(str(exc)) from exc
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
