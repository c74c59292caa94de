"""A lean pooled HTTP/1.1 client over trio streams: the upstream hot path.

Why: the gateway makes one upstream call per request, and through httpx2/httpcore2 that call
cost more CPU than the rest of the request (about 40% of the event loop's samples at
concurrency 64; ``doc/benchmarks.md``). Most of it is generality the gateway does not use:
request and response models, auth and cookie hooks, redirects, a transport stack, trace
hooks, h11's general state machine. This client writes a request as one ``bytes``, reads the
response with the sans-io :class:`~lm_gateway.wire.http1.ResponseReader`, and keeps
connections in a per-origin LIFO pool.

:class:`~lm_gateway.providers.http.HTTPUpstream` uses it unless the connection needs what only
httpx2 does: HTTP/2 (``http2 = true``), a proxy from the environment (``HTTPS_PROXY``...), or
a transport injected by a test or a host app.

Behaviour a user can rely on:

* Keep-alive: at most ``max_connections`` open per origin (callers wait for a free one up to
  the pool timeout), at most ``max_keepalive_connections`` idle, each idle for at most
  ``keepalive_expiry_seconds``. An idle connection the server closed (it is readable) is
  dropped before reuse; a request whose reused connection fails before any byte of the answer
  arrived is sent once more on a new connection (the server closed it while idle, so it never
  saw the request — Go's ``net/http`` does the same).
* Timeouts: connect (TCP and TLS), each write, each read; the caller's deadline on top.
* TLS: the context httpx2 would build for ``verify_ssl`` (certifi or the given bundle, or no
  verification), ALPN ``http/1.1``.
* ``gzip``/``deflate`` answers are decoded; no cookies are kept between requests; redirects are
  not followed (as the gateway's httpx2 clients were configured).

Cancellation: a request cancelled at any point closes its connection (never pools a
connection in an unknown state), and releases its pool slot.
"""

from __future__ import annotations

import math
import ssl
import zlib
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from urllib.parse import urlsplit

import trio

from ..netio import FastSocketStream
from ..wire.http1 import HTTPProtocolError, ResponseHead, ResponseReader, encode_request

try:
    _VERSION = version("lm-gateway")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
    _VERSION = "0"
USER_AGENT = f"lm-gateway/{_VERSION}"
_READ_SIZE = 64 * 1024


class TransportError(Exception):
    """The exchange with the upstream failed below HTTP semantics."""


class ConnectFailed(TransportError):
    """No connection could be made (refused, DNS, TLS handshake)."""


class ConnectTimedOut(TransportError):
    """Connecting took longer than the connect timeout."""


class PoolTimedOut(TransportError):
    """No pooled connection became free within the pool timeout."""


class ReadTimedOut(TransportError):
    """The upstream sent nothing for longer than the read timeout."""


class WriteTimedOut(TransportError):
    """Sending the request took longer than the write timeout."""


class ConnectionLost(TransportError):
    """The connection failed or was closed mid-exchange."""


class ProtocolViolation(TransportError):
    """The upstream broke HTTP/1.1."""


class _Connection:
    """One open connection (TCP, maybe TLS); ``socket`` is the TCP socket under it."""

    __slots__ = ("idle_since", "reused", "socket", "stream")

    def __init__(self, stream: trio.abc.Stream, socket: FastSocketStream) -> None:
        self.stream = stream
        self.socket = socket
        self.idle_since = 0.0
        self.reused = False

    def close(self) -> None:
        # Synchronous and immediate (no TLS close_notify): used for cancelled and broken
        # exchanges, where waiting on the peer is exactly what must not happen.
        self.socket.close()


class _Pool:
    """Connections to one origin."""

    def __init__(self, client: HTTP1Client, scheme: str, host: str, port: int) -> None:
        self._client = client
        self._scheme = scheme
        self._host = host
        self._port = port
        self._idle: list[_Connection] = []
        self._slots = trio.Semaphore(client.max_connections)

    async def acquire(self) -> _Connection:
        """A connection for one exchange; the caller must :meth:`release` it.

        Raises:
            PoolTimedOut, ConnectFailed, ConnectTimedOut.
        """
        client = self._client
        if not self._slots.value:  # only then can waiting happen, and need a deadline
            with trio.move_on_after(client.pool_timeout) as waited:
                await self._slots.acquire()
            if waited.cancelled_caught:
                raise PoolTimedOut(
                    f"no connection to {self._host}:{self._port} became free within "
                    f"{client.pool_timeout} s ({client.max_connections} in use)"
                )
        else:
            self._slots.acquire_nowait()
        try:
            now = trio.current_time()
            idle = self._idle
            while idle:
                conn = idle.pop()
                if (
                    now - conn.idle_since < client.keepalive_expiry
                    and not conn.socket.is_readable()
                ):
                    conn.reused = True
                    return conn
                conn.close()  # expired, or the server closed it (or sent junk) while idle
            return await self._connect()
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: _Connection, *, reusable: bool) -> None:
        """Give back ``conn``: pooled when ``reusable`` and there is room, else closed."""
        client = self._client
        if reusable and not client.closed and len(self._idle) < client.max_keepalive:
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
        else:
            conn.close()
        self._slots.release()

    async def _connect(self) -> _Connection:
        client = self._client
        where = f"{self._host}:{self._port}"
        with trio.move_on_after(client.connect_timeout):
            context = await client.ssl_context() if self._scheme == "https" else None
            try:
                tcp = FastSocketStream.from_trio(await trio.open_tcp_stream(self._host, self._port))
            except OSError as exc:
                raise ConnectFailed(f"cannot connect to {where}: {exc}") from exc
            if context is None:
                return _Connection(tcp, tcp)
            tls = trio.SSLStream(tcp, context, server_hostname=self._host, https_compatible=True)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                tcp.close()
                raise ConnectFailed(f"TLS handshake with {where} failed: {exc}") from exc
            except BaseException:
                tcp.close()
                raise
            return _Connection(tls, tcp)
        raise ConnectTimedOut(f"connecting to {where} took over {client.connect_timeout} s")

    def close_idle(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class HTTP1Response:
    """An answer whose head has arrived; the body is read with :meth:`read_some` or
    :meth:`read`. Owns its connection until the body ends or :meth:`aclose`.
    """

    def __init__(
        self,
        pool: _Pool,
        conn: _Connection,
        *,
        reader: ResponseReader,
        head: ResponseHead,
        first: bytes,
        read_timeout: float,
    ) -> None:
        self._pool: _Pool | None = pool
        self._conn = conn
        self._reader = reader
        self.status_code = head.status
        self.headers = head
        self._pending = first
        self._read_timeout = read_timeout
        self._decoder: zlib._Decompress | None = None
        encoding = (head.get("content-encoding") or "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib or raw, as sent
        elif encoding not in ("", "identity"):
            self._fail()
            raise ProtocolViolation(
                f"the upstream sent an unrequested Content-Encoding {encoding!r}"
            )
        if reader.done:
            self._finish()

    @property
    def is_closed(self) -> bool:
        """True once the connection was given back (body complete) or closed."""
        return self._pool is None

    async def read_some(self, deadline: float = math.inf) -> bytes:
        """The next part of the body; ``b""`` once it is complete.

        ``deadline`` (trio time) bounds this read as ``trio.fail_at`` around it would, but
        shares one cancel scope with the read timeout, and on a plain TCP connection opens it
        only if the read has to wait: a scope costs about 5 µs, and a relayed stream reads
        once per chunk.

        Raises:
            ReadTimedOut, ConnectionLost, ProtocolViolation (the connection is then closed).
            trio.TooSlowError: ``deadline`` passed first (the connection is closed).
        """
        while True:
            if self._pending:
                data, self._pending = self._pending, b""
                return self._decode(data)
            if self._pool is None:
                return self._flush()
            try:
                timeout_at = trio.current_time() + self._read_timeout
                limit = deadline if deadline < timeout_at else timeout_at
                stream = self._conn.stream
                if trio.current_effective_deadline() <= limit:
                    # An enclosing scope fires first: a scope here would never fire.
                    received = await stream.receive_some(_READ_SIZE)
                elif isinstance(stream, FastSocketStream):
                    try:
                        received = await stream.receive_before(limit, _READ_SIZE)
                    except trio.TooSlowError:
                        received = None
                else:
                    received = None
                    with trio.move_on_at(limit):
                        received = await stream.receive_some(_READ_SIZE)
                if received is None:
                    self._fail()
                    if limit < timeout_at:
                        raise trio.TooSlowError
                    raise ReadTimedOut(f"no data for {self._read_timeout} s")
                if received:
                    self._pending = self._reader.feed(bytes(received))
                else:
                    self._reader.feed_eof()
            except HTTPProtocolError as exc:
                self._fail()
                raise ProtocolViolation(str(exc)) from exc
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._fail()
                raise ConnectionLost(f"the connection failed mid-answer: {exc!r}") from exc
            except BaseException:
                self._fail()
                raise
            if self._reader.done:
                self._finish()

    async def read(self, limit: int | None = None) -> bytes:
        """The (rest of the) body, or its first ``limit`` bytes (then the connection is
        closed, not pooled)."""
        parts: list[bytes] = []
        size = 0
        while True:
            part = await self.read_some()
            if not part:
                return b"".join(parts)
            parts.append(part)
            size += len(part)
            if limit is not None and size >= limit:
                await self.aclose()
                return b"".join(parts)

    async def aclose(self) -> None:
        """Release the connection: pooled if the body was complete, else closed."""
        if self._pool is not None:
            self._fail()
        await trio.lowlevel.checkpoint()

    def _decode(self, data: bytes) -> bytes:
        if self._decoder is None:
            return data
        try:
            return self._decoder.decompress(data)
        except zlib.error as exc:
            self._fail()
            raise ProtocolViolation(f"the answer does not decompress: {exc}") from exc

    def _flush(self) -> bytes:
        if self._decoder is None:
            return b""
        decoder, self._decoder = self._decoder, None
        return decoder.flush()

    def _finish(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.release(self._conn, reusable=self._reader.reusable)

    def _fail(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.release(self._conn, reusable=False)


class HTTP1Client:
    """Pooled HTTP/1.1 requests to any number of origins; see the module docstring.

    Args:
        headers: sent with every request (a request's own headers override them by name).
        ssl_context: builds the TLS context; called once, in a worker thread, on the first
            ``https`` connection.
    """

    def __init__(
        self,
        *,
        headers: dict[str, str],
        connect_timeout: float,
        read_timeout: float,
        write_timeout: float,
        pool_timeout: float,
        max_connections: int,
        max_keepalive: int,
        keepalive_expiry: float,
        ssl_context: Callable[[], ssl.SSLContext],
    ) -> None:
        base = {"user-agent": USER_AGENT, "accept": "*/*", "accept-encoding": "gzip, deflate"}
        base.update({name.lower(): value for name, value in headers.items()})
        self._headers = base
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.pool_timeout = pool_timeout
        self.max_connections = max_connections
        self.max_keepalive = max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self._ssl_factory = ssl_context
        self._ssl: ssl.SSLContext | None = None
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        #: url -> (pool key, request target, Host header); URLs repeat, splitting them doesn't.
        self._targets: dict[str, tuple[tuple[str, str, int], str, str]] = {}
        self.closed = False

    async def ssl_context(self) -> ssl.SSLContext:
        """The TLS context, built on first use in a worker thread (loading a CA bundle reads
        files, which must not block the event loop)."""
        if self._ssl is None:
            context = await trio.to_thread.run_sync(self._ssl_factory)
            context.set_alpn_protocols(["http/1.1"])
            self._ssl = context
        return self._ssl

    def _split(self, url: str) -> tuple[tuple[str, str, int], str, str]:
        known = self._targets.get(url)
        if known is not None:
            return known
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default_port = 443 if scheme == "https" else 80
        port = parts.port or default_port
        host = parts.hostname
        host_header = parts.netloc.rpartition("@")[2]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        entry = ((scheme, host, port), target, host_header)
        if len(self._targets) < 1024:  # a bounded cache: URLs with ids in them keep coming
            self._targets[url] = entry
        return entry

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> HTTP1Response:
        """Send a request; return once the answer's head arrived.

        Resource handling: the response owns the connection until its body is read or it is
        closed; on failure nothing stays open.

        Raises:
            TransportError: a subclass saying what failed.
            ValueError: ``url`` is not http(s), or a header holds a line break.
        """
        key, target, host = self._split(url)
        pool = self._pools.get(key)
        if pool is None:
            if self.closed:
                raise ConnectionLost("the client is closed")
            pool = self._pools[key] = _Pool(self, *key)
        merged = self._headers
        if headers:
            merged = {**merged, **{name.lower(): value for name, value in headers.items()}}
        data = encode_request(method, target, [("host", host), *merged.items()], content)
        while True:
            conn = await pool.acquire()
            reader = ResponseReader(method)
            received_any = False
            try:
                first = b""
                writing = True
                # One scope for both phases (its deadline moves from the write timeout to the
                # read timeout): scopes are a measurable share of a request's CPU.
                with trio.CancelScope(deadline=trio.current_time() + self.write_timeout) as timer:
                    await conn.stream.send_all(data)
                    writing = False
                    timer.deadline = trio.current_time() + self.read_timeout
                    while reader.head is None:
                        part = await conn.stream.receive_some(_READ_SIZE)
                        if not part:
                            reader.feed_eof()  # raises: no head yet
                        received_any = True
                        first += reader.feed(bytes(part))
                if timer.cancelled_caught:
                    if writing:
                        raise WriteTimedOut(f"sending took over {self.write_timeout} s")
                    raise ReadTimedOut(f"no answer within {self.read_timeout} s")
            except TransportError:
                pool.release(conn, reusable=False)
                raise
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
                HTTPProtocolError,
            ) as exc:
                pool.release(conn, reusable=False)
                if conn.reused and not received_any:
                    continue  # closed by the server while idle: it never saw this request
                if isinstance(exc, HTTPProtocolError) and received_any:
                    raise ProtocolViolation(str(exc)) from exc
                raise ConnectionLost(f"the connection failed: {exc!r}") from exc
            except BaseException:
                pool.release(conn, reusable=False)
                raise
            assert reader.head is not None
            return HTTP1Response(
                pool,
                conn,
                reader=reader,
                head=reader.head,
                first=first,
                read_timeout=self.read_timeout,
            )

    async def aclose(self) -> None:
        """Close idle connections; connections in use close when their answers are done."""
        self.closed = True
        for pool in self._pools.values():
            pool.close_idle()
        await trio.lowlevel.checkpoint()
