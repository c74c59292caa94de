"""The API routes ``create_app`` serves straight from ASGI answer exactly as Quart's path does.

Each case goes to two servers built from the same config: ``create_app`` (the fast path) and a
host QuartTrio app with the blueprint mounted at the root (always Quart). Status, headers and
bodies must agree, up to per-request ids and timestamps. (Request ownership on the fast path —
a client leaving closes the upstream — is covered by ``test_cancellation.py``, whose gateway
is a ``create_app``.)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
import trio
from quart import request
from quart_trio import QuartTrio

import lm_gateway
from lm_gateway.server.fast import FastRoutes
from tests.conftest import config_from, serve_app

CONFIG: dict[str, Any] = {
    "connections": {"echo": {"api_type": "echo"}},
    "routing": {"*": "echo.*"},
    "groups": {"default": {"api_keys": ["sk-test"]}},
    "max_request_body_bytes": 4096,
}
AUTH = {"authorization": "Bearer sk-test"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello fast path"}]}
#: Headers that differ between any two answers (the server's clock, per-request ids).
VOLATILE_HEADERS = {"date", "x-request-id"}
VOLATILE_BODY = re.compile(rb'("id":\s*"[^"]*"|"created":\s*\d+|"request_id":\s*"[^"]*")')


@contextlib.asynccontextmanager
async def both_servers() -> AsyncIterator[tuple[str, str]]:
    """(fast URL, Quart URL)."""
    fast_app = lm_gateway.create_app(config_from(CONFIG))
    host = QuartTrio("host")
    host.register_blueprint(lm_gateway.blueprint(config_from(CONFIG)))
    async with serve_app(fast_app) as fast, serve_app(host) as quart:
        yield fast, quart


def normalised(response: httpx2.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {
        name: value for name, value in response.headers.items() if name not in VOLATILE_HEADERS
    }
    return response.status_code, headers, VOLATILE_BODY.sub(b"<volatile>", response.content)


CASES: list[tuple[str, str, dict[str, str], bytes]] = [
    ("chat", "/v1/chat/completions", AUTH, httpx2.Request("POST", "/", json=CHAT).read()),
    (
        "chat stream",
        "/v1/chat/completions",
        AUTH,
        httpx2.Request("POST", "/", json={**CHAT, "stream": True}).read(),
    ),
    ("chat bad JSON", "/v1/chat/completions", AUTH, b"{not json"),
    ("chat no key", "/v1/chat/completions", {}, httpx2.Request("POST", "/", json=CHAT).read()),
    ("chat too large", "/v1/chat/completions", AUTH, b"x" * 5000),
    ("messages invalid", "/v1/messages", AUTH, b'{"model": "m"}'),
    (
        "messages",
        "/v1/messages",
        AUTH,
        httpx2.Request(
            "POST",
            "/",
            json={"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]},
        ).read(),
    ),
    ("embeddings", "/v1/embeddings", AUTH, b'{"model": "m", "input": "x"}'),
    ("completions", "/v1/completions", AUTH, b'{"model": "m", "prompt": "x"}'),
]


@pytest.mark.parametrize(
    ("path", "headers", "body"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_post_routes_answer_like_quart(
    path: str, headers: dict[str, str], body: bytes
) -> None:
    async with both_servers() as (fast, quart), httpx2.AsyncClient() as http:
        answers = [
            normalised(await http.post(f"{url}{path}", content=body, headers=headers))
            for url in (fast, quart)
        ]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("path", ["/v1/models", "/health", "/v1/models/x"])
async def test_get_routes_answer_like_quart(path: str) -> None:
    async with both_servers() as (fast, quart), httpx2.AsyncClient() as http:
        answers = [
            normalised(await http.get(f"{url}{path}", headers=AUTH)) for url in (fast, quart)
        ]
    assert answers[0] == answers[1]


async def test_the_fast_path_is_taken_without_hooks() -> None:
    app = lm_gateway.create_app(config_from(CONFIG))
    async with serve_app(app) as url, httpx2.AsyncClient() as http:
        response = await http.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200
    assert isinstance(app._fast_routes, FastRoutes)


async def test_request_hooks_turn_the_fast_path_off() -> None:
    """An app with a before_request hook gets every request through Quart, which runs it."""
    app = lm_gateway.create_app(config_from(CONFIG))
    seen: list[str] = []

    @app.before_request
    async def remember() -> None:
        seen.append(request.path)

    async with serve_app(app) as url, httpx2.AsyncClient() as http:
        response = await http.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200
    assert seen == ["/v1/chat/completions"]
    assert app._fast_routes is False


async def test_middleware_on_asgi_app_sees_fast_requests() -> None:
    app = lm_gateway.create_app(config_from(CONFIG))
    inner = app.asgi_app
    paths: list[str] = []

    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            paths.append(scope["path"])
        await inner(scope, receive, send)

    app.asgi_app = middleware  # type: ignore[method-assign]
    async with serve_app(app) as url, httpx2.AsyncClient() as http:
        response = await http.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200
    assert paths == ["/v1/chat/completions"]


async def test_slow_body_gets_408() -> None:
    app = lm_gateway.create_app(config_from(CONFIG))
    app.config["BODY_TIMEOUT"] = 0.2
    async with serve_app(app) as url:
        host, port = url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test"
                b'\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"model"'
            )
            data = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in data or b"}" not in data.split(b"\r\n\r\n", 1)[1]:
                    part = await stream.receive_some()
                    if not part:
                        break
                    data += part
    assert data.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in data
