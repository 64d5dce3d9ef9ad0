"""A small chat-completions server of the tests' own, on a free loopback port.

:class:`ChatServer` speaks enough of the OpenAI chat-completions protocol for the official SDK
(and any other OpenAI-compatible client) to talk to it, so summarizers and the compaction
daemon can be tested end to end without network or an LLM:

* ``POST /v1/chat/completions`` answers with a ``ChatCompletion`` JSON object whose content
  comes from a reply function (request JSON -> content string);
* ``GET /v1/models`` lists the server's model;
* anything else is a 404 with an OpenAI-style error body.

Behaviour can be changed at any time, also while requests are in flight:

* ``server.reply = fn`` -- the reply function (``None`` as content is sent as ``null``);
* ``server.delay = 1.5`` -- seconds to wait before answering (interrupted by :meth:`close`);
* ``server.fail_next(2, status=500)`` -- fail the next requests with a status code;
* ``server.pause()`` / ``server.resume()`` -- hold requests until resumed;
* ``server.requests`` -- every request received (headers and parsed JSON body), and
  :meth:`ChatServer.wait_for_requests` to wait for some to arrive.

It is stdlib only (``http.server.ThreadingHTTPServer`` serving from a background thread).
Use it as a context manager; :meth:`ChatServer.close` stops the server, cuts open keep-alive
connections and joins every handler thread, so tests leave no sockets or threads behind.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["ChatServer", "Failure", "RecordedRequest", "default_reply", "word_count"]

#: Reply function: the request's JSON body -> the assistant's content (``None`` sends null).
ReplyFn = Callable[[dict[str, Any]], "str | None"]
#: Usage function: (request JSON body, reply content) -> ``usage`` object of the response.
UsageFn = Callable[[dict[str, Any], "str | None"], dict[str, int]]


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    #: Header names lower-cased (``headers["authorization"]``).
    headers: dict[str, str]
    #: The parsed JSON body, or ``None`` if there was none or it was not JSON.
    body: Any
    raw_body: bytes
    received_at: float

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The ``messages`` of a chat-completions body (empty if absent)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("messages"), list):
            return list(self.body["messages"])
        return []


@dataclass(frozen=True)
class Failure:
    """A scripted failure for the next request (see :meth:`ChatServer.fail_next`)."""

    status: int
    message: str = "injected failure"
    #: ``Retry-After-Ms`` sent with it (``None``: no header, so clients use their own backoff).
    retry_after: float | None = 0.001
    headers: Mapping[str, str] = field(default_factory=dict)


def word_count(text: str | None) -> int:
    """A rough token count: whitespace-separated words."""
    return len(text.split()) if text else 0


def default_reply(body: dict[str, Any]) -> str:
    """The default reply: ``"summary of N messages"``."""
    return f"summary of {len(body.get('messages') or [])} messages"


def _default_usage(body: dict[str, Any], content: str | None) -> dict[str, int]:
    prompt = 0
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            content_in = message.get("content")
            prompt += 3 + word_count(content_in if isinstance(content_in, str) else None)
    completion = word_count(content)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class _HTTPServer(ThreadingHTTPServer):
    """Tracks open connections so :meth:`ChatServer.close` can cut them."""

    daemon_threads = True
    block_on_close = True  # server_close() joins handler threads
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: ChatServer) -> None:
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout) or a connection cut by close(): not a test failure.
        # Anything else is recorded and re-raised by ChatServer.close().
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # ConnectionError, TimeoutError, BrokenPipeError, ...
            return
        if exc is not None:
            self.owner._errors.append(exc)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections end after this

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def _send_json(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _record(self, method: str) -> RecordedRequest:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = RecordedRequest(
            method=method,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            raw_body=raw,
            received_at=time.time(),
        )
        self.server.owner._record(request)
        return request

    def do_GET(self) -> None:
        owner = self.server.owner
        self._record("GET")
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {"id": owner.model, "object": "model", "created": 0, "owned_by": "tests"}
                    ],
                },
            )
        else:
            self._not_found()

    def do_POST(self) -> None:
        owner = self.server.owner
        request = self._record("POST")
        if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
            self._not_found()
            return
        if not owner._wait_before_answer():
            self.close_connection = True  # closing: drop the request unanswered
            return
        failure = owner._take_failure()
        if failure is not None:
            headers = dict(failure.headers)
            if failure.retry_after is not None:
                headers.setdefault("retry-after-ms", str(failure.retry_after * 1000))
            self._send_json(
                failure.status,
                {
                    "error": {
                        "message": failure.message,
                        "type": "server_error" if failure.status >= 500 else "invalid_request",
                        "code": str(failure.status),
                        "param": None,
                    }
                },
                headers,
            )
            return
        if not isinstance(request.body, dict):
            self._send_json(
                400, {"error": {"message": "body must be a JSON object", "type": "invalid"}}
            )
            return
        try:
            completion = owner._completion(request.body)
        except Exception as exc:  # a bug in the test's reply function: fail loudly
            owner._errors.append(exc)
            self._send_json(500, {"error": {"message": f"reply failed: {exc!r}", "type": "bug"}})
            return
        self._send_json(200, completion)

    def _not_found(self) -> None:
        self._send_json(
            404, {"error": {"message": f"no route {self.path}", "type": "invalid_request"}}
        )


class ChatServer:
    """An OpenAI-compatible chat-completions server on ``127.0.0.1`` (see the module docs).

    ``reply`` maps the request JSON to the reply content; ``model`` is reported when the
    request names none; ``usage`` maps (request JSON, content) to the ``usage`` object
    (default: word counts); ``delay`` is waited before every chat answer.
    """

    def __init__(
        self,
        reply: ReplyFn | str = default_reply,
        *,
        model: str = "test-model",
        delay: float = 0.0,
        usage: UsageFn | None = None,
        finish_reason: str = "stop",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.reply: ReplyFn = (lambda _body: reply) if isinstance(reply, str) else reply
        self.model = model
        self.delay = delay
        self.usage: UsageFn = usage or _default_usage
        self.finish_reason = finish_reason
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._requests: list[RecordedRequest] = []
        self._failures: deque[Failure] = deque()
        self._closing = threading.Event()
        self._open_gate = threading.Event()
        self._open_gate.set()
        self._errors: list[BaseException] = []
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ChatServer:
        """Bind a free port and serve from a background thread."""
        if self._server is not None:
            raise RuntimeError("ChatServer already started")
        self._closing.clear()
        self._server = _HTTPServer((self._host, self._port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"chat-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, cut open connections, join handler threads; idempotent.

        Raises the first unexpected handler error, if any (so server bugs fail the test).
        """
        server, thread = self._server, self._thread
        if server is None:
            return
        self._closing.set()
        self._open_gate.set()
        server.shutdown()
        server.cut_connections()
        server.server_close()  # joins handler threads
        if thread is not None:
            thread.join(timeout=10)
        self._server = self._thread = None
        if self._errors:
            error, self._errors = self._errors[0], []
            raise error

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- addresses -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("ChatServer is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self._host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, the ``base_url`` for OpenAI-compatible clients."""
        return f"{self.url}/v1"

    # -- behaviour -----------------------------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        status: int = 500,
        *,
        message: str = "injected failure",
        retry_after: float | None = 0.001,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next ``count`` chat requests with ``status`` and an OpenAI error body.

        ``retry_after`` (seconds) is sent as ``retry-after-ms`` so the SDK's retries are quick;
        ``None`` sends no such header (the client then uses its own backoff).
        """
        failure = Failure(status, message, retry_after, dict(headers or {}))
        with self._lock:
            self._failures.extend([failure] * count)

    def pause(self) -> None:
        """Hold chat requests (after recording them) until :meth:`resume`."""
        self._open_gate.clear()

    def resume(self) -> None:
        """Release held chat requests."""
        self._open_gate.set()

    # -- observation ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """The ``POST .../chat/completions`` requests received so far."""
        return [r for r in self.requests if r.method == "POST" and "chat/completions" in r.path]

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least ``count`` requests arrived; raise ``TimeoutError`` if not."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self._requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{len(self._requests)} of {count} requests arrived in {timeout}s"
                    )
                self._arrived.wait(remaining)
            return list(self._requests)

    def reset(self) -> None:
        """Forget recorded requests and pending failures."""
        with self._lock:
            self._requests.clear()
            self._failures.clear()

    # -- internals (called from handler threads) ---------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._arrived:
            self._requests.append(request)
            self._arrived.notify_all()

    def _take_failure(self) -> Failure | None:
        with self._lock:
            return self._failures.popleft() if self._failures else None

    def _wait_before_answer(self) -> bool:
        """Honour pause() and delay; False if the server is closing meanwhile."""
        while not self._open_gate.wait(0.05):
            if self._closing.is_set():
                return False
        if self.delay > 0 and self._closing.wait(self.delay):
            return False
        return not self._closing.is_set()

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        content = self.reply(body)
        with self._lock:
            self._counter += 1
            number = self._counter
        return {
            "id": f"chatcmpl-test{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model") or self.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage(body, content),
            "system_fingerprint": None,
        }
