"""A lean HTTP/1.1 server for the ``lm-gateway`` process: ASGI over trio sockets.

Why: with the gateway's own routes served straight from ASGI (:mod:`.fast`) and a lean
upstream client, Hypercorn was over half of the CPU a proxied request costs on one core:
h11's general state machine, and three socket writes per answer (head, body, end). This server
parses requests with the sans-io :class:`~lm_gateway.wire.http1.RequestReader`, writes a whole
answer in one write, and streams with chunked encoding. It serves any ASGI app (Quart's routes
included), so it replaces Hypercorn for ``lm-gateway serve`` with one worker and plain HTTP;
Hypercorn still serves ``--workers N``, TLS (``ssl_certfile``), ``hypercorn lm_gateway:app``,
and ``--server hypercorn``.

What it implements (RFC 9112, the ASGI HTTP spec 2.3 and lifespan):

* keep-alive, ``Connection: close``, HTTP/1.0, pipelined requests (answered in order);
  ``Content-Length`` and chunked request bodies; ``Expect: 100-continue``; ``HEAD``;
* refusals before the app sees anything: malformed heads (400), both ``Transfer-Encoding`` and
  ``Content-Length`` (400: request smuggling), other transfer codings and unknown methods
  (501), a head over 64 KiB (431), HTTP versions other than 1.x (505) — each an OpenAI-shaped
  JSON error, then the connection is closed;
* deadlines: a connection idle between requests is closed after ``keep_alive_timeout``; a
  request head must arrive within ``head_timeout`` of its first byte (slow-loris);
* ``http.disconnect`` as soon as the client closes, also while the app is still working, and
  the ``lm_gateway.cancel_on_disconnect`` extension: cancel scopes the app registered are
  cancelled at that moment (the gateway's routes stop their upstream call so, with no task of
  their own waiting); a failed write counts as a disconnect;
* graceful shutdown: stop accepting, close idle connections, give requests in flight
  ``graceful_timeout`` to finish, then cancel them; the app's lifespan shutdown runs last.

Request-level cancellation is the app's (the gateway's request scope); this server owns two
tasks per connection (its read loop and its request loop, in a nursery of the connection's
own), all connections in one nursery, and no task outlives :func:`serve`.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import unquote

import attrs
import orjson
import trio

from ..errors import HTTPStatusError, InternalError
from ..netio import FastSocketStream
from ..wire.http1 import MAX_HEAD_BYTES, BadRequest, RequestHead, RequestReader

log = logging.getLogger("lm_gateway.server")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

#: ASGI extension offered in every HTTP scope: ``scope["extensions"][CANCEL_ON_DISCONNECT]
#: ["register"](cancel_scope)`` has the server cancel ``cancel_scope`` as soon as the client
#: closes the connection (at once if it has). The gateway's fast routes use it instead of a
#: task per request waiting for ``http.disconnect``.
CANCEL_ON_DISCONNECT = "lm_gateway.cancel_on_disconnect"
_READ_SIZE = 65536
_REASONS = {
    100: "Continue",
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
    529: "Overloaded",
}


@attrs.frozen
class EdgeSettings:
    """Deadlines and limits of the server (seconds, bytes)."""

    keep_alive_timeout: float = 5.0
    head_timeout: float = 10.0
    graceful_timeout: float = 3.0
    max_head_bytes: int = MAX_HEAD_BYTES


class _DateHeader:
    """The ``Date`` header value, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


def _error_answer(status: int, message: str, *, head: bool = False) -> bytes:
    reason = _REASONS.get(status, "Error")
    code = reason.lower().replace(" ", "_")
    error = (
        InternalError(message, code=code)
        if status >= 500
        else HTTPStatusError(message, status=status, code=code)
    )
    error_body = error.to_body(debug=False)
    body = orjson.dumps(error_body)
    start = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    return start if head else start + body


class _Server:
    def __init__(self, app: ASGIApp, settings: EdgeSettings) -> None:
        self.app = app
        self.settings = settings
        self.date = _DateHeader()
        self.shutting_down = False
        #: Connections waiting for their next request; cancelled on shutdown.
        self.idle: set[trio.CancelScope] = set()
        self.active = 0
        self.all_idle = trio.Event()

    def request_started(self) -> None:
        self.active += 1

    def request_finished(self) -> None:
        self.active -= 1
        if self.shutting_down and self.active == 0:
            self.all_idle.set()

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        for scope in list(self.idle):
            scope.cancel()
        if self.active == 0:
            self.all_idle.set()

    async def handle(self, stream: trio.SocketStream) -> None:
        fast = FastSocketStream.from_trio(stream)
        conn = _Connection(self, fast)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.read_loop)
                await conn.run()
                nursery.cancel_scope.cancel()
        finally:
            fast.close()


class _Connection:
    """One client connection: requests one after another, each answered by the app.

    Two tasks share it. :meth:`read_loop` is the only reader of the socket: it feeds the
    request reader as bytes arrive (at most a head's worth ahead of what was consumed) and, at
    end of stream, tells the request in flight at once. :meth:`run` takes heads from the reader
    and runs the app for each. So noticing a client that leaves costs no task per request (a
    watcher task per request was 15% of a request's CPU).
    """

    def __init__(self, server: _Server, stream: FastSocketStream) -> None:
        self.server = server
        self.stream = stream
        self.reader = RequestReader(max_head_bytes=server.settings.max_head_bytes)
        self.eof = False
        #: The request being served, told when the client leaves.
        self.exchange: _Exchange | None = None
        self._arrived = trio.lowlevel.ParkingLot()  # bytes (or the end) arrived
        self._consumed = trio.lowlevel.ParkingLot()  # the buffer may be below the limit
        try:
            self.client: tuple[str, int] | None = stream.socket.getpeername()[:2]
            self.local: tuple[str, int] | None = stream.socket.getsockname()[:2]
        except OSError:
            self.client = self.local = None

    async def read_loop(self) -> None:
        """Read until end of stream (or a failed read), then wake whoever waits and tell the
        request in flight. Never raises but Cancelled."""
        reader = self.reader
        limit = self.server.settings.max_head_bytes
        try:
            while True:
                while reader.buffered > limit:
                    await self._consumed.park()  # read-ahead is bounded: the app is behind
                try:
                    data = await self.stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    break
                reader.feed(data)
                self._arrived.unpark_all()
        finally:
            self.eof = True
            self._arrived.unpark_all()
            if self.exchange is not None:
                self.exchange.client_left()

    def ended(self) -> bool:
        """True once the client's side of the connection has ended (a method, not the
        attribute, where the read loop may change it during an await)."""
        return self.eof

    def consumed(self) -> None:
        """Bytes were taken from the reader: the read loop may read on."""
        self._consumed.unpark_all()

    async def arrival(self) -> None:
        """Wait for more bytes, or the end of the stream."""
        await self._arrived.park()

    async def run(self) -> None:
        while not self.server.shutting_down:
            try:
                head = await self._next_head()
            except BadRequest as exc:
                await self._send_quietly(_error_answer(exc.status, str(exc)))
                return
            if head is None:
                return
            self.consumed()
            self.server.request_started()
            exchange = self.exchange = _Exchange(self, head)
            try:
                keep_alive = await exchange.run()
            finally:
                self.exchange = None
                self.server.request_finished()
            if not keep_alive:
                return

    async def _next_head(self) -> RequestHead | None:
        """The next request head; None when the connection should just close (EOF, idle
        timeout, shutdown)."""
        settings = self.server.settings
        reader = self.reader
        head = reader.next_head()
        if head is not None:
            return head
        if self.eof:
            return None
        if not reader.buffered:
            # Idle between requests: closed after the keep-alive timeout, or on shutdown.
            with trio.move_on_after(settings.keep_alive_timeout) as idle:
                self.server.idle.add(idle)
                try:
                    while not reader.buffered and not self.ended():
                        await self.arrival()
                finally:
                    self.server.idle.discard(idle)
            if idle.cancelled_caught or not self.reader.buffered:
                return None
            head = reader.next_head()
            if head is not None:
                return head  # the usual case: the whole head came in one read
        with trio.move_on_after(settings.head_timeout) as waited:
            while (head := reader.next_head()) is None:
                if self.ended():
                    return None
                await self.arrival()
        if waited.cancelled_caught:
            await self._send_quietly(_error_answer(408, "The request head did not arrive in time."))
            return None
        return head

    async def _send_quietly(self, data: bytes) -> bool:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        return True


class _Exchange:
    """One request and its answer, as an ASGI call."""

    def __init__(self, conn: _Connection, head: RequestHead) -> None:
        self.conn = conn
        self.head = head
        self.started: dict[str, Any] | None = None
        self.head_sent = False
        self.chunked = False
        self.complete = False
        self.disconnected = False
        self.continue_sent = not head.expect_continue
        self.body_delivered = False
        self.bad_body: BadRequest | None = None
        self.close_after = not head.keep_alive
        self.app_scope = trio.CancelScope()
        #: Scopes the app asked to have cancelled when the client leaves (the extension).
        self._on_disconnect: list[trio.CancelScope] = []

    def scope(self) -> dict[str, Any]:
        path, _, query = self.head.target.partition("?")
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.head.http_version,
            "method": self.head.method,
            "scheme": "http",
            "path": unquote(path),
            "raw_path": path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "root_path": "",
            "headers": self.head.headers,
            "client": self.conn.client,
            "server": self.conn.local,
            "extensions": {CANCEL_ON_DISCONNECT: {"register": self.cancel_on_disconnect}},
        }

    def cancel_on_disconnect(self, scope: trio.CancelScope) -> None:
        """The :data:`CANCEL_ON_DISCONNECT` extension: cancel ``scope`` when the client
        leaves (at once if it has left)."""
        if self.disconnected or self.conn.eof:
            scope.cancel()
        else:
            self._on_disconnect.append(scope)

    def client_left(self) -> None:
        """End of stream from the client while this request is served: cancel what the app
        registered; ``receive`` reports ``http.disconnect`` from now on."""
        if self.complete:
            return  # the answer is out; the connection just ends after it
        for scope in self._on_disconnect:
            scope.cancel()

    async def run(self) -> bool:
        """Serve the request; True if the connection may carry another one."""
        conn = self.conn
        with self.app_scope:
            try:
                await conn.server.app(self.scope(), self.receive, self.send)
            except Exception:
                log.exception("the app failed on %s %s", self.head.method, self.head.target)
                if not self.head_sent:
                    await conn._send_quietly(
                        _error_answer(500, "The gateway failed to process the request.")
                    )
                return False
        if self.bad_body is not None:
            if not self.head_sent:
                bad = self.bad_body
                await conn._send_quietly(_error_answer(bad.status, str(bad)))
            return False
        if self.disconnected:
            return False
        if not self.head_sent:
            await conn._send_quietly(_error_answer(500, "The app sent no answer."))
            return False
        if not self.complete:
            return False  # the answer was cut short: the client must see the connection end
        if not conn.reader.body_done:
            return False  # the app did not read the whole body; it cannot be skipped safely
        return not self.close_after and not conn.server.shutting_down

    async def receive(self) -> dict[str, Any]:
        conn = self.conn
        reader = conn.reader
        if self.disconnected:
            return {"type": "http.disconnect"}
        if not self.body_delivered:
            if not self.continue_sent and not reader.body_done:
                self.continue_sent = True
                if not await conn._send_quietly(b"HTTP/1.1 100 Continue\r\n\r\n"):
                    return self._disconnect()
            while True:
                try:
                    body = reader.read_body()
                except BadRequest as exc:
                    # A malformed chunked body: the app sees the client go; run() answers.
                    self.bad_body = exc
                    return self._disconnect()
                if body or reader.body_done:
                    conn.consumed()
                    # ASGI: at least one http.request message, the last with more_body False,
                    # even for a request without a body.
                    self.body_delivered = reader.body_done
                    return {"type": "http.request", "body": body, "more_body": not reader.body_done}
                if conn.eof:
                    return self._disconnect()
                await conn.arrival()
        # The body is read: wait for the client to leave. Bytes it sends meanwhile are the next
        # pipelined request; the read loop keeps them (up to a head's worth) for after this
        # answer, and a pipelining client that fills that is still there.
        while not conn.eof:
            await conn.arrival()
        return self._disconnect()

    def _disconnect(self) -> dict[str, Any]:
        self.disconnected = True
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.started is not None:
                raise RuntimeError("http.response.start sent twice")
            self.started = message
            return
        if kind != "http.response.body":
            return  # extensions (trailers, push, early hints) are not offered
        if self.started is None:
            raise RuntimeError("http.response.body before http.response.start")
        if self.complete or self.disconnected:
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        out = b""
        if not self.head_sent:
            out = self._encode_head(body, more)
            self.head_sent = True
        if self.head.method != "HEAD":
            if self.chunked:
                if body:
                    out += b"%x\r\n%b\r\n" % (len(body), body)
                if not more:
                    out += b"0\r\n\r\n"
            else:
                out += body
        if not more:
            self.complete = True
        if out and not await self.conn._send_quietly(out):
            self.disconnected = True
            self.app_scope.cancel()  # nobody to answer: stop the work at once

    def _encode_head(self, body: bytes, more: bool) -> bytes:
        assert self.started is not None
        status = int(self.started["status"])
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}".encode()]
        has_length = False
        for name, value in self.started.get("headers", ()):
            lname = name.lower()
            if lname == b"content-length":
                has_length = True
            elif lname == b"connection":
                if b"close" in value.lower():
                    self.close_after = True
                continue  # this server decides about the connection
            elif lname == b"transfer-encoding":
                continue
            lines.append(name + b": " + value)
        no_body = status < 200 or status in (204, 304)
        if not has_length and not no_body:
            if not more:
                lines.append(b"content-length: %d" % len(body))
            elif self.head.http_version == "1.1":
                self.chunked = True
                lines.append(b"transfer-encoding: chunked")
            else:
                self.close_after = True  # HTTP/1.0: the body ends with the connection
        lines.append(b"date: " + self.conn.server.date.value())
        if self.close_after or self.conn.server.shutting_down:
            self.close_after = True
            lines.append(b"connection: close")
        elif self.head.http_version == "1.0":
            lines.append(b"connection: keep-alive")
        return b"\r\n".join(lines) + b"\r\n\r\n"


async def _lifespan(
    app: ASGIApp, nursery: trio.Nursery
) -> tuple[trio.abc.SendChannel[dict[str, Any]], trio.abc.ReceiveChannel[dict[str, Any]]]:
    """Start the app's lifespan task; return (to app, from app) channels."""
    to_app_send, to_app_receive = trio.open_memory_channel[dict[str, Any]](1)
    from_app_send, from_app_receive = trio.open_memory_channel[dict[str, Any]](1)

    async def run() -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        try:
            await app(scope, to_app_receive.receive, from_app_send.send)
        finally:
            from_app_send.close()

    nursery.start_soon(run)
    return to_app_send, from_app_receive


async def _lifespan_step(
    to_app: trio.abc.SendChannel[dict[str, Any]],
    from_app: trio.abc.ReceiveChannel[dict[str, Any]],
    step: str,
) -> None:
    await to_app.send({"type": f"lifespan.{step}"})
    try:
        answer = await from_app.receive()
    except trio.EndOfChannel:
        raise RuntimeError(f"the app ended its lifespan before {step} completed") from None
    if answer["type"] == f"lifespan.{step}.failed":
        raise RuntimeError(f"the app's {step} failed: {answer.get('message', '')}")


async def serve(
    app: ASGIApp,
    binds: list[tuple[str, int]],
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    settings: EdgeSettings | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``binds`` until ``shutdown_trigger()`` returns, then shut down
    gracefully. ``task_status.started`` gets the bound URLs (``http://host:port``).

    Raises:
        OSError: a bind failed (nothing is served then).
        RuntimeError: the app's lifespan startup failed.
    """
    settings = settings or EdgeSettings()
    server = _Server(app, settings)
    listeners: list[trio.SocketListener] = []
    try:
        for host, port in binds:
            listeners.extend(await trio.open_tcp_listeners(port, host=host))
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    startup_failure: RuntimeError | None = None
    async with trio.open_nursery() as lifespan_nursery:
        to_app, from_app = await _lifespan(app, lifespan_nursery)
        try:
            await _lifespan_step(to_app, from_app, "startup")
        except RuntimeError as exc:
            # Kept and raised after the nursery, so the caller gets it as such, not in a group.
            startup_failure = exc
            for listener in listeners:
                await listener.aclose()
        else:
            await _serve_started(server, listeners, shutdown_trigger, task_status)
            await _lifespan_step(to_app, from_app, "shutdown")
        lifespan_nursery.cancel_scope.cancel()
    if startup_failure is not None:
        raise startup_failure


async def _serve_started(
    server: _Server,
    listeners: list[trio.SocketListener],
    shutdown_trigger: Callable[[], Awaitable[Any]],
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """Accept and serve until the trigger, then shut down gracefully (see the module doc)."""
    urls = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        urls.append(url)
        log.info("Running on %s (CTRL + C to quit)", url)
    async with trio.open_nursery() as connections:
        # Accepting runs in its own nursery, so it can stop while connections go on.
        async with trio.open_nursery() as accepting:
            accepting.start_soon(
                partial(trio.serve_listeners, server.handle, listeners, handler_nursery=connections)
            )
            task_status.started(urls)
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        server.begin_shutdown()
        with trio.move_on_after(server.settings.graceful_timeout):
            await server.all_idle.wait()
        connections.cancel_scope.cancel()
