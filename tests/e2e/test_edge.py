"""lm-gateway's own HTTP/1.1 server (lm_gateway.server.edge), spoken to over raw sockets.

The gateway's behaviour through this server is covered by the whole e2e suite, which CI runs a
second time on it (``LM_GATEWAY_TEST_SERVER=lm-gateway``); these tests cover HTTP itself:
framing, keep-alive, pipelining, refusals, deadlines, shutdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import trio

import lm_gateway
from lm_gateway.server.edge import CANCEL_ON_DISCONNECT, EdgeSettings, serve
from tests.conftest import config_from, serve_app_on_edge

GUARD = 10
CONFIG: dict[str, Any] = {
    "connections": {"echo": {"api_type": "echo"}},
    "routing": {"*": "echo.*"},
    "groups": {"default": {"api_keys": ["sk-test"]}},
}
CHAT = b'{"model":"m","messages":[{"role":"user","content":"hello edge"}]}'


def post(body: bytes = CHAT, extra: bytes = b"", path: bytes = b"/v1/chat/completions") -> bytes:
    return (
        b"POST %b HTTP/1.1\r\nhost: t\r\nauthorization: Bearer sk-test\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n%b\r\n%b"
        % (path, len(body), extra, body)
    )


@contextlib.asynccontextmanager
async def gateway(**settings: Any) -> AsyncIterator[tuple[str, int]]:
    app = lm_gateway.create_app(config_from(CONFIG))
    async with serve_app_on_edge(app, **settings) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


class Client:
    """A raw HTTP/1.1 client that reads answers one at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def answer(self, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        with trio.fail_after(GUARD):
            while b"\r\n\r\n" not in self.buffer:
                assert await self.fill(), f"connection closed; got {self.buffer[:200]!r}"
            raw, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
            if head_only or status == 100:
                return status, headers, b""
            if "content-length" in headers:
                length = int(headers["content-length"])
                while len(self.buffer) < length:
                    assert await self.fill()
                body, self.buffer = self.buffer[:length], self.buffer[length:]
                return status, headers, body
            assert headers.get("transfer-encoding") == "chunked", headers
            body = b""
            while True:
                while b"\r\n" not in self.buffer:
                    assert await self.fill()
                size_line, rest = self.buffer.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(rest) < size + 2:
                    assert await self.fill()
                    rest = self.buffer.split(b"\r\n", 1)[1]
                body += rest[:size]
                self.buffer = rest[size + 2 :]
                if size == 0:
                    return status, headers, body

    async def closed(self) -> bool:
        """True if the server closed the connection (after what is buffered)."""
        with trio.fail_after(GUARD):
            while await self.fill():
                pass
        return True


@contextlib.asynccontextmanager
async def connect(address: tuple[str, int]) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        yield Client(stream)


async def complete_lifespan(receive: Any, send: Any) -> None:
    """A test app's lifespan: every step completes at once."""
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


async def test_keep_alive_and_date() -> None:
    async with gateway() as address, connect(address) as client:
        for _ in range(3):
            await client.stream.send_all(post())
            status, headers, body = await client.answer()
            assert status == 200
            assert orjson.loads(body)["choices"][0]["message"]["content"] == "hello edge"
            assert headers["content-length"] == str(len(body))
            assert headers["date"].endswith(" GMT")
            assert "connection" not in headers


async def test_pipelined_requests_are_answered_in_order() -> None:
    bodies = [CHAT.replace(b"hello edge", b"number %d" % n) for n in range(3)]
    async with gateway() as address, connect(address) as client:
        await client.stream.send_all(b"".join(post(body) for body in bodies))
        for n in range(3):
            status, _, body = await client.answer()
            assert status == 200
            assert orjson.loads(body)["choices"][0]["message"]["content"] == f"number {n}"


async def test_chunked_request_body() -> None:
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in (CHAT[:10], CHAT[10:]))
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer sk-test\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + chunked + b"0\r\nx-trailer: 1\r\n\r\n"
    )
    async with gateway() as address, connect(address) as client:
        await client.stream.send_all(request)
        status, _, body = await client.answer()
        await client.stream.send_all(post())  # the connection is still good
        assert (await client.answer())[0] == 200
    assert status == 200
    assert orjson.loads(body)["choices"][0]["message"]["content"] == "hello edge"


async def test_expect_100_continue() -> None:
    head = post(extra=b"expect: 100-continue\r\n").split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    async with gateway() as address, connect(address) as client:
        await client.stream.send_all(head)
        status, _, _ = await client.answer()
        assert status == 100  # before any body byte was sent
        await client.stream.send_all(CHAT)
        assert (await client.answer())[0] == 200


async def test_streamed_answer_is_chunked() -> None:
    body = CHAT.replace(b'"model":"m"', b'"model":"m","stream":true')
    async with gateway() as address, connect(address) as client:
        await client.stream.send_all(post(body))
        status, headers, data = await client.answer()
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert data.endswith(b"data: [DONE]\n\n")


async def test_head_has_no_body() -> None:
    async with gateway() as address, connect(address) as client:
        await client.stream.send_all(b"HEAD /health HTTP/1.1\r\nhost: t\r\n\r\n")
        status, headers, _ = await client.answer(head_only=True)
        await client.stream.send_all(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        status2, _, body = await client.answer()
    assert status in (200, 405)  # Quart answers HEAD for GET routes
    assert status2 == 200
    assert orjson.loads(body) == {"status": "ok"}
    assert headers.get("content-length") is not None


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (post(extra=b"transfer-encoding: chunked\r\n"), 400),  # smuggling: both framings
        (b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/3.0\r\nhost: t\r\n\r\n", 505),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
        (b"BREW / HTTP/1.1\r\nhost: t\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nhost: t\r\nbad header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nhost: t\r\nx: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ],
)
async def test_malformed_requests_are_refused_and_the_connection_closed(
    request_bytes: bytes, status: int
) -> None:
    async with gateway() as address, connect(address) as client:
        await client.stream.send_all(request_bytes)
        got, headers, body = await client.answer()
        assert await client.closed()
    assert got == status
    assert headers["connection"] == "close"
    assert "error" in orjson.loads(body)


async def test_connection_close_and_http10() -> None:
    async with gateway() as address:
        async with connect(address) as client:
            await client.stream.send_all(post(extra=b"connection: close\r\n"))
            status, headers, _ = await client.answer()
            assert await client.closed()
        assert status == 200
        assert headers["connection"] == "close"
        async with connect(address) as client:
            await client.stream.send_all(post().replace(b"HTTP/1.1", b"HTTP/1.0", 1))
            assert (await client.answer())[0] == 200
            assert await client.closed()
        async with connect(address) as client:
            keep = post(extra=b"connection: keep-alive\r\n").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
            await client.stream.send_all(keep)
            status, headers, _ = await client.answer()
            assert headers["connection"] == "keep-alive"
            await client.stream.send_all(keep)
            assert (await client.answer())[0] == 200


async def test_idle_connection_is_closed_after_keep_alive_timeout() -> None:
    async with gateway(keep_alive_timeout=0.2) as address, connect(address) as client:
        await client.stream.send_all(post())
        assert (await client.answer())[0] == 200
        assert await client.closed()


async def test_slow_head_gets_408() -> None:
    async with gateway(head_timeout=0.2) as address, connect(address) as client:
        await client.stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n")
        status, _, body = await client.answer()
        assert await client.closed()
    assert status == 408
    assert orjson.loads(body)["error"]["code"] == "request_timeout"


async def test_app_crash_is_a_json_500_and_a_missing_answer_too() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        if scope["path"] == "/crash":
            raise ValueError("boom")
        # /silent: returns without answering

    async with serve_app_on_edge(app) as url:
        host, port = url.removeprefix("http://").split(":")
        for path in (b"/crash", b"/silent"):
            async with connect((host, int(port))) as client:
                await client.stream.send_all(b"GET %b HTTP/1.1\r\nhost: t\r\n\r\n" % path)
                status, _, body = await client.answer()
                assert status == 500
                assert orjson.loads(body)["error"]["type"] == "server_error"


async def test_failed_startup_stops_serve() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    with trio.fail_after(GUARD), pytest.raises(RuntimeError, match="no database"):
        await serve(app, [("127.0.0.1", 0)], shutdown_trigger=trio.sleep_forever)


async def test_graceful_shutdown_lets_a_request_in_flight_finish() -> None:
    """Shutdown closes idle connections at once and gives a running request time to end."""
    release = trio.Event()
    stop = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            lambda task_status: serve(
                app,
                [("127.0.0.1", 0)],
                shutdown_trigger=stop.wait,
                settings=EdgeSettings(graceful_timeout=GUARD),
                task_status=task_status,
            )
        )
        host, port = urls[0].removeprefix("http://").split(":")
        async with connect((host, int(port))) as busy, connect((host, int(port))) as idle:
            await busy.stream.send_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            await trio.sleep(0.1)  # the request is in the app
            stop.set()
            assert await idle.closed()  # the idle connection went at once
            release.set()
            status, headers, body = await busy.answer()
            assert await busy.closed()
    assert (status, body) == (200, b"done")
    assert headers["connection"] == "close"


@pytest.mark.parametrize("path", [b"/v1/chat/completions", b"/v1/models/x"])
async def test_malformed_chunked_body_is_a_400(path: bytes) -> None:
    """Found while the app reads the body: answered 400, not 500, and the connection closed.
    (Quart's path may answer a POST to a GET route with 405 before it reads the body.)"""
    request = (
        b"POST %b HTTP/1.1\r\nhost: t\r\nauthorization: Bearer sk-test\r\n"
        b"transfer-encoding: chunked\r\n\r\nzz\r\n" % path
    )
    async with gateway() as address, connect(address) as client:
        await client.stream.send_all(request)
        status, _, body = await client.answer()
        assert await client.closed()
    assert status in ((400,) if path == b"/v1/chat/completions" else (400, 405))
    if status == 400:
        assert "chunk size" in orjson.loads(body)["error"]["message"]


async def test_the_server_cancels_a_registered_scope_when_the_client_leaves() -> None:
    """The CANCEL_ON_DISCONNECT extension: no task of the app waits for http.disconnect, yet
    the app's work stops as soon as the client closes; a scope registered after the client
    left is cancelled at once."""
    registered = trio.Event()
    outcomes: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        register = scope["extensions"][CANCEL_ON_DISCONNECT]["register"]
        await receive()  # the (empty) body
        with trio.CancelScope() as work:
            register(work)
            registered.set()
            await trio.sleep_forever()  # e.g. waiting on an upstream
        outcomes.append("cancelled" if work.cancelled_caught else "ended")
        with trio.CancelScope() as late:
            register(late)  # the client is gone already
            await trio.sleep_forever()
        outcomes.append("cancelled" if late.cancelled_caught else "ended")

    async with serve_app_on_edge(app) as url:
        host, port = url.removeprefix("http://").split(":")
        async with connect((host, int(port))) as client:
            await client.stream.send_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            with trio.fail_after(GUARD):
                await registered.wait()
        with trio.fail_after(GUARD):
            while len(outcomes) < 2:
                await trio.sleep(0.01)
    assert outcomes == ["cancelled", "cancelled"]


async def test_a_body_larger_than_the_read_ahead_arrives_whole() -> None:
    """The read loop stops reading a head's worth ahead of the app and resumes as the app
    consumes: a body of many times that arrives intact, and the answer after it too."""
    received = bytearray()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        while True:
            message = await receive()
            received.extend(message.get("body", b""))
            await trio.sleep(0.001)  # a slow consumer
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % len(received)})

    body = bytes(range(256)) * 4096  # 1 MiB, 16 heads' worth
    async with serve_app_on_edge(app) as url:
        host, port = url.removeprefix("http://").split(":")
        async with connect((host, int(port))) as client, trio.open_nursery() as nursery:
            nursery.start_soon(
                client.stream.send_all,
                b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body),
            )
            status, _, answer = await client.answer()
    assert (status, answer) == (200, b"%d" % len(body))
    assert bytes(received) == body
