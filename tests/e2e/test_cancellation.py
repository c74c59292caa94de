"""The core promise: when the client leaves, the upstream connection is closed at once.

Each test has a real upstream on loopback record that the gateway closed its TCP connection,
and the gateway record the request as cancelled: before the first token, mid-stream, and
during a non-streaming call. ``fail_after`` guards only keep a broken build from hanging.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
import trio

from lm_gateway.server.fast import FastRoutes
from tests.conftest import RunningGateway, run_gateway
from tests.fakes.openai_upstream import FakeOpenAI, Reply, open_fake_openai, sse_event

KEY = "sk-cancel"
GUARD = 10


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai() as upstream:
        yield upstream


@pytest.fixture
async def gateway(fake: FakeOpenAI) -> AsyncIterator[RunningGateway]:
    config = {
        "connections": {"up": {"api_base": fake.base_url, "api_key": "sk-provider"}},
        "routing": {"*": "up.*"},
        "groups": {"default": {"api_keys": [KEY]}},
    }
    async with run_gateway(config) as running:
        yield running


def body(stream: bool) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def chunk(content: str) -> bytes:
    return sse_event(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        }
    )


async def leave_after_upstream_got_it(
    gateway: RunningGateway, fake: FakeOpenAI, stream: bool
) -> None:
    """Send a request, and drop the client connection once the upstream has received it."""
    async with httpx2.AsyncClient() as http, trio.open_nursery() as nursery:
        client_scope = trio.CancelScope()

        async def send() -> None:
            with client_scope:
                await http.post(
                    f"{gateway.base_url}/chat/completions",
                    headers={"authorization": f"Bearer {KEY}"},
                    json=body(stream),
                )
            assert client_scope.cancelled_caught, "the request should still be waiting"

        nursery.start_soon(send)
        await fake.wait_for_request()
        client_scope.cancel()  # httpx closes the connection of a cancelled request


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "before-first-token"])
async def test_client_leaving_while_upstream_thinks_closes_upstream(
    gateway: RunningGateway, fake: FakeOpenAI, stream: bool
) -> None:
    fake.push(Reply.stall())
    with trio.fail_after(GUARD):
        await leave_after_upstream_got_it(gateway, fake, stream)
        request = fake.requests[0]
        await fake.wait_closed(request)
        record = await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
    assert request.connection_id in fake.closed_by_client
    assert record.stream is stream
    assert record.status == 499
    assert isinstance(gateway.app._fast_routes, FastRoutes)  # create_app's fast path served it
    assert fake.active_replies == 0


async def test_client_leaving_mid_stream_closes_upstream(
    gateway: RunningGateway, fake: FakeOpenAI
) -> None:
    fake.push(Reply.stream_then_stall([chunk("first "), chunk("second ")]))
    with trio.fail_after(GUARD):
        async with httpx2.AsyncClient() as http, http.stream(
            "POST",
            f"{gateway.base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json=body(True),
        ) as response:
            assert response.status_code == 200
            received = b""
            async for data in response.aiter_bytes():
                received += data
                if b"second" in received:
                    break  # leave mid-stream: the upstream is now stalled
        request = fake.requests[0]
        await fake.wait_closed(request)
        record = await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
    assert request.connection_id in fake.closed_by_client
    assert record.chunks == 2  # what was streamed before the client left


async def test_sdk_closing_a_stream_closes_upstream(
    gateway: RunningGateway, fake: FakeOpenAI
) -> None:
    fake.push(Reply.stream_then_stall([chunk("a"), chunk("b")]))
    with trio.fail_after(GUARD):
        async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY) as sdk:
            stream = await sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
            )
            async for _ in stream:
                break
            await stream.close()
        await fake.wait_closed(fake.requests[0])
        await gateway.records.wait_for(lambda r: r.outcome == "cancelled")


async def test_sdk_timeout_closes_upstream(gateway: RunningGateway, fake: FakeOpenAI) -> None:
    fake.push(Reply.stall())
    with trio.fail_after(GUARD):
        async with openai.AsyncOpenAI(
            base_url=gateway.base_url, api_key=KEY, max_retries=0, timeout=0.5
        ) as sdk:
            with pytest.raises(openai.APITimeoutError):
                await sdk.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "x"}]
                )
        await fake.wait_closed(fake.requests[0])
        await gateway.records.wait_for(lambda r: r.outcome == "cancelled")


async def test_leaving_an_echo_stream_is_recorded_as_cancelled() -> None:
    config = {
        "connections": {"echo": {"api_type": "echo", "chunk_delay_seconds": 30}},
        "routing": {"*": "echo.*"},
        "groups": {"default": {"api_keys": [KEY]}},
    }
    async with run_gateway(config) as gateway:
        with trio.fail_after(GUARD):
            async with httpx2.AsyncClient() as http, http.stream(
                "POST",
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer {KEY}"},
                json={"model": "m", "stream": True,
                      "messages": [{"role": "user", "content": "many words here"}]},
            ) as response:
                async for _ in response.aiter_bytes():
                    break
            record = await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
    assert record.connection == "echo"


async def test_leaving_cancels_a_callable_connections_task() -> None:
    """An lm-proxy-style callable streams through a task the request owns; leaving ends it."""
    state: dict[str, Any] = {"started": trio.Event(), "cancelled": trio.Event()}

    async def model(messages: Any, **params: Any) -> str:
        await params["callback"]("thinking...")
        state["started"].set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            state["cancelled"].set()
            raise
        return "never"

    config = {
        "connections": {"fn": model},
        "routing": {"*": "fn.*"},
        "groups": {"default": {"api_keys": [KEY]}},
    }
    async with run_gateway(config) as gateway:
        with trio.fail_after(GUARD):
            async with httpx2.AsyncClient() as http, http.stream(
                "POST",
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer {KEY}"},
                json=body(True),
            ) as response:
                async for data in response.aiter_bytes():
                    if b"thinking" in data:
                        break
            await state["cancelled"].wait()
            await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
    assert state["started"].is_set()


async def test_slow_client_leaving_while_gateway_is_blocked_writing_closes_upstream(
    gateway: RunningGateway, fake: FakeOpenAI
) -> None:
    """The client stops reading; the gateway blocks writing to it (not reading the upstream);
    then the client leaves. The cancellation lands in the write, so it is the response body's
    cleanup, not an interrupted upstream read, that must close the upstream."""
    big = "x" * 4096
    fake.push(Reply.stream_then_stall([chunk(big)] * 4000))  # ~16 MB: far beyond socket buffers
    with trio.fail_after(GUARD):
        async with httpx2.AsyncClient() as http, http.stream(
            "POST",
            f"{gateway.base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json=body(True),
        ) as response:
            async for _ in response.aiter_raw():
                break
            # A slow client: it reads nothing for a while, so buffers fill and the gateway's
            # write blocks. (This sleep is the scenario, not a wait for a condition.)
            await trio.sleep(0.5)
        request = fake.requests[0]
        await fake.wait_closed(request)
        await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
    assert request.connection_id in fake.closed_by_client
