"""The lean pooled HTTP/1.1 client (lm_gateway.providers.http1) against real loopback servers.

Each server here is a few lines of trio speaking raw HTTP/1.1, scripted per test, that records
what it saw: connections accepted, requests read, and whether the client closed a connection.
"""

from __future__ import annotations

import gzip
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trustme

from lm_gateway.providers.http1 import (
    ConnectFailed,
    ConnectionLost,
    HTTP1Client,
    PoolTimedOut,
    ProtocolViolation,
    ReadTimedOut,
)

GUARD = 10  # seconds: a bound on each test's waits, never an assertion


def ok(body: bytes = b"hi", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%b\r\n%b" % (len(body), extra, body)


@attrs.define
class Server:
    url: str
    connections: int = 0
    requests: list[bytes] = attrs.field(factory=list)
    closed_by_client: int = 0
    closed: trio.Event = attrs.field(factory=trio.Event)


Handler = Callable[[Server, trio.SocketStream, bytes], Awaitable[bool]]


async def read_request(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """One request (head + Content-Length body) from ``buffer`` and the stream; None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    head_end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:head_end])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(buffer) < head_end + length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    request = bytes(buffer[: head_end + length])
    del buffer[: head_end + length]
    return request


@asynccontextmanager
async def serve(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    """A loopback server; ``handler(server, stream, request)`` answers each request and says
    whether to keep the connection open."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server = Server(url=f"{'https' if tls else 'http'}://127.0.0.1:{port}")

    async def connection(stream: trio.SocketStream) -> None:
        server.connections += 1
        conn: trio.abc.Stream = stream
        if tls is not None:
            conn = trio.SSLStream(stream, tls, server_side=True)
        buffer = bytearray()
        try:
            while True:
                request = await read_request(conn, buffer)  # type: ignore[arg-type]
                if request is None:
                    server.closed_by_client += 1
                    server.closed.set()
                    return
                server.requests.append(request)
                if not await handler(server, conn, request):  # type: ignore[arg-type]
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            server.closed_by_client += 1
            server.closed.set()
        finally:
            await trio.aclose_forcefully(conn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, connection, listeners)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


def client(**overrides: object) -> HTTP1Client:
    settings: dict[str, object] = {
        "headers": {"authorization": "Bearer k"},
        "connect_timeout": 5.0,
        "read_timeout": 5.0,
        "write_timeout": 5.0,
        "pool_timeout": 5.0,
        "max_connections": 10,
        "max_keepalive": 10,
        "keepalive_expiry": 30.0,
        "ssl_context": ssl.create_default_context,
    }
    settings.update(overrides)
    return HTTP1Client(**settings)  # type: ignore[arg-type]


async def answer_ok(server: Server, stream: trio.SocketStream, request: bytes) -> bool:
    await stream.send_all(ok(b"answer %d" % len(server.requests)))
    return True


async def test_request_and_keep_alive_reuse() -> None:
    async with serve(answer_ok) as server:
        http = client()
        with trio.fail_after(GUARD):
            for n in (1, 2, 3):
                response = await http.send("POST", f"{server.url}/v1/x?q=1", content=b'{"a":1}')
                assert response.status_code == 200
                assert await response.read() == b"answer %d" % n
                assert response.is_closed
        await http.aclose()
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/x?q=1 HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"\r\nauthorization: Bearer k\r\n" in first
    assert b'\r\ncontent-length: 7\r\n\r\n{"a":1}' in first


async def test_request_headers_override_defaults_by_name() -> None:
    async with serve(answer_ok) as server:
        http = client()
        with trio.fail_after(GUARD):
            response = await http.send("GET", f"{server.url}/m", headers={"Authorization": "x"})
            await response.read()
    request = server.requests[0]
    assert b"authorization: x\r\n" in request
    assert b"Bearer k" not in request


async def test_a_connection_the_server_closed_while_idle_is_not_used() -> None:
    async def answer_and_close(server: Server, stream: trio.SocketStream, request: bytes) -> bool:
        await stream.send_all(ok())
        return False  # closes after answering, without saying so

    async with serve(answer_and_close) as server:
        http = client()
        with trio.fail_after(GUARD):
            for _ in range(3):
                response = await http.send("POST", server.url, content=b"x")
                assert await response.read() == b"hi"
                await trio.sleep(0.05)  # let the server's close arrive
    assert server.connections == 3
    assert len(server.requests) == 3  # each request sent once


async def test_a_reused_connection_closed_before_answering_is_retried_once() -> None:
    """The server's idle close can race a new request: the request is sent again on a new
    connection, because the server never got to see it."""
    calls = 0

    async def first_answers_then_drops(
        server: Server, stream: trio.SocketStream, request: bytes
    ) -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:
            return False  # read the request, then close without a byte of answer
        await stream.send_all(ok())
        return True

    async with serve(first_answers_then_drops) as server:
        http = client()
        with trio.fail_after(GUARD):
            assert await (await http.send("POST", server.url, content=b"1")).read() == b"hi"
            assert await (await http.send("POST", server.url, content=b"2")).read() == b"hi"
    assert server.connections == 2


async def test_a_new_connection_closed_before_answering_fails() -> None:
    async def drop(server: Server, stream: trio.SocketStream, request: bytes) -> bool:
        return False

    async with serve(drop) as server:
        http = client()
        with trio.fail_after(GUARD), pytest.raises(ConnectionLost):
            await http.send("POST", server.url, content=b"x")
    assert len(server.requests) == 1  # not retried


async def test_refused_connection() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with trio.fail_after(GUARD), pytest.raises(ConnectFailed):
        await client().send("POST", f"http://127.0.0.1:{port}/", content=b"x")


async def test_read_timeout() -> None:
    async def never(server: Server, stream: trio.SocketStream, request: bytes) -> bool:
        await trio.sleep_forever()
        return False

    async with serve(never) as server:
        with trio.fail_after(GUARD), pytest.raises(ReadTimedOut):
            await client(read_timeout=0.2).send("POST", server.url, content=b"x")


def tls_pair() -> tuple[ssl.SSLContext, Callable[[], ssl.SSLContext]]:
    """(server context, client context factory) for 127.0.0.1, from a throwaway CA."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    def client_context() -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return context

    return server_context, client_context


async def first_part_then_silence(
    server: Server, stream: trio.SocketStream, request: bytes
) -> bool:
    await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
    await trio.sleep_forever()
    return False


@pytest.mark.parametrize("tls", [False, True])
async def test_a_read_mid_body_ends_at_the_read_timeout_or_the_callers_deadline(
    tls: bool,
) -> None:
    """Both bounds share one scope in read_some; which one fired decides the error, and the
    connection is closed either way (plain TCP waits in FastSocketStream.receive_before,
    TLS in a scope around the TLS stream)."""
    server_context, client_context = tls_pair()
    async with serve(first_part_then_silence, tls=server_context if tls else None) as server:
        http = client(read_timeout=0.2, ssl_context=client_context)
        with trio.fail_after(GUARD):
            response = await http.send("POST", server.url, content=b"x")
            assert await response.read_some() == b"first"
            with pytest.raises(ReadTimedOut):
                await response.read_some(trio.current_time() + 60)
            assert response.is_closed

            response = await http.send("POST", server.url, content=b"x")
            assert await response.read_some() == b"first"
            with pytest.raises(trio.TooSlowError):
                await response.read_some(trio.current_time() + 0.05)  # sooner than 0.2 s
            assert response.is_closed
    assert server.connections == 2  # neither broken connection went back to the pool


async def test_pool_limit_and_pool_timeout() -> None:
    release = trio.Event()

    async def slow_body(server: Server, stream: trio.SocketStream, request: bytes) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
        if len(server.requests) == 1:
            await release.wait()
        await stream.send_all(b"body")
        return True

    async with serve(slow_body) as server:
        http = client(max_connections=1, pool_timeout=0.2)
        with trio.fail_after(GUARD):
            held = await http.send("POST", server.url, content=b"x")  # its body is pending
            with pytest.raises(PoolTimedOut):
                await http.send("POST", server.url, content=b"y")
            release.set()
            assert await held.read() == b"body"  # frees the only connection
            assert await (await http.send("POST", server.url, content=b"z")).read() == b"body"
    assert server.connections == 1


@pytest.mark.parametrize(
    ("max_keepalive", "expiry", "connections"), [(0, 30.0, 3), (10, 0.0, 3), (10, 30.0, 1)]
)
async def test_keepalive_limits(max_keepalive: int, expiry: float, connections: int) -> None:
    async with serve(answer_ok) as server:
        http = client(max_keepalive=max_keepalive, keepalive_expiry=expiry)
        with trio.fail_after(GUARD):
            for _ in range(3):
                await (await http.send("POST", server.url, content=b"x")).read()
    assert server.connections == connections


async def test_closing_an_unread_answer_closes_the_connection() -> None:
    async def stream_forever(server: Server, stream: trio.SocketStream, request: bytes) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            await stream.send_all(b"5\r\nhello\r\n")
            await trio.sleep(0.01)

    async with serve(stream_forever) as server:
        http = client()
        with trio.fail_after(GUARD):
            response = await http.send("POST", server.url, content=b"x")
            assert await response.read_some()
            await response.aclose()
            await server.closed.wait()
    assert server.closed_by_client == 1


async def test_cancelling_a_read_closes_the_connection() -> None:
    async def stall(server: Server, stream: trio.SocketStream, request: bytes) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        if len(server.requests) == 1:
            assert await stream.receive_some() == b""  # until the client closes
            server.closed.set()
        return False

    async with serve(stall) as server:
        http = client(max_connections=1)
        with trio.fail_after(GUARD):
            response = await http.send("POST", server.url, content=b"x")
            with trio.move_on_after(0.1):
                await response.read()
            await server.closed.wait()
            assert response.is_closed
            # The slot was released: another request gets a (new) connection.
            response = await http.send("POST", server.url, content=b"y")
            assert await response.read_some() == b"partial"
    assert server.connections == 2


async def test_chunked_answer_arrives_as_it_is_sent() -> None:
    go = trio.Event()

    async def two_parts(server: Server, stream: trio.SocketStream, request: bytes) -> bool:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nfirst \r\n"
        )
        await go.wait()
        await stream.send_all(b"6\r\nsecond\r\n0\r\n\r\n")
        return True

    async with serve(two_parts) as server:
        http = client()
        with trio.fail_after(GUARD):
            response = await http.send("POST", server.url, content=b"x")
            assert await response.read_some() == b"first "
            go.set()
            assert await response.read_some() == b"second"
            assert await response.read_some() == b""
            assert response.is_closed
            await (await http.send("POST", server.url, content=b"x")).aclose()
    assert server.connections == 1  # the completed chunked answer left the connection reusable


async def test_gzip_answer_is_decoded() -> None:
    body = gzip.compress(b'{"compressed": true}' * 50)

    async def gzipped(server: Server, stream: trio.SocketStream, request: bytes) -> bool:
        await stream.send_all(ok(body, b"content-encoding: gzip\r\n"))
        return True

    async with serve(gzipped) as server:
        with trio.fail_after(GUARD):
            response = await client().send("GET", server.url)
            assert await response.read() == b'{"compressed": true}' * 50


async def test_unrequested_encoding_is_refused() -> None:
    async def brotli(server: Server, stream: trio.SocketStream, request: bytes) -> bool:
        await stream.send_all(ok(b"xx", b"content-encoding: br\r\n"))
        return True

    async with serve(brotli) as server:
        with trio.fail_after(GUARD), pytest.raises(ProtocolViolation, match="br"):
            await client().send("GET", server.url)


async def test_https_with_verification() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)

    built_in: list[threading.Thread] = []

    def client_context() -> ssl.SSLContext:
        built_in.append(threading.current_thread())
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return context

    async with serve(answer_ok, tls=server_context) as server:
        with trio.fail_after(GUARD):
            http = client(ssl_context=client_context)
            for _ in range(2):
                assert await (await http.send("POST", server.url, content=b"x")).read()
            untrusting = client()  # the system store does not know this CA
            with pytest.raises(ConnectFailed, match="TLS"):
                await untrusting.send("POST", server.url, content=b"x")
    assert len(server.requests) == 2
    # Loading CA files is blocking I/O: the context was built off the event loop, once.
    assert len(built_in) == 1
    assert built_in[0] is not threading.main_thread()


async def test_not_http() -> None:
    with pytest.raises(ValueError, match="not an http"):
        await client().send("GET", "ftp://example/")


@pytest.mark.parametrize(
    ("settings", "environ", "lean"),
    [
        ({}, {}, True),
        ({}, {"HTTPS_PROXY": "http://proxy:3128"}, False),
        ({}, {"all_proxy": "socks5://proxy:1080"}, False),
        ({"http2": True}, {}, False),
    ],
)
def test_upstreams_use_the_lean_client_unless_they_need_httpx(
    settings: dict[str, object], environ: dict[str, str], lean: bool
) -> None:
    import httpx2

    from lm_gateway.config import build_config
    from lm_gateway.providers.http import HTTPUpstream

    config = build_config(
        {
            "connections": {
                "up": {"api_base": "http://127.0.0.1:9/v1", "api_key": "k", **settings}
            },
            "routing": {"*": "up.*"},
            "groups": {"default": {"api_keys": ["sk-x"]}},
        },
        environ={},
    )
    upstream = HTTPUpstream(config.connections["up"], {}, lambda *a: None, environ=environ)  # type: ignore[arg-type]
    assert isinstance(upstream.client, HTTP1Client if lean else httpx2.AsyncClient)
