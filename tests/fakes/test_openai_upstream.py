"""Tests of the fake OpenAI upstream itself, with httpx2 and the official SDK as clients.

Waiting is always on events (``wait_for_request``, ``wait_closed``, stream data), guarded
by ``trio.fail_after``; the only timers are the client-side timeouts under test.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import orjson
import pytest
import trio
import trio.testing
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk, ChatCompletionFunctionToolParam

from .openai_upstream import (
    CREATED,
    SSE_DONE,
    ConnectionClosedByServer,
    FakeOpenAI,
    Reply,
    open_fake_openai,
    openai_error,
    sse_event,
)

pytestmark = pytest.mark.trio

GUARD = 5.0
USER_TEXT = "say hello to the world"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": USER_TEXT},
]
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {"q": {"type": "string"}},
            "required": ["q"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai() as server:
        yield server
    assert server.errors == []


@pytest.fixture
async def sdk(fake: FakeOpenAI) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient() as client:
        yield client


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": MESSAGES, **extra}


async def collect(stream: AsyncIterator[Any], into: list[Any]) -> None:
    async for item in stream:
        into.append(item)


def sse_payloads(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order."""
    assert body.endswith(b"\n\n")
    events = body.split(b"\n\n")[:-1]
    assert all(event.startswith(b"data: ") for event in events)
    return [event.removeprefix(b"data: ") for event in events]


# -- default behaviour ---------------------------------------------------------------------


async def test_models_list(fake: FakeOpenAI, sdk: AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    page = await sdk.models.list()
    assert [model.id for model in page.data] == ["gpt-4o", "gpt-4o-mini", "o3"]
    response = await http.get(f"{fake.base_url}/models")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["data"][0] == {
        "id": "gpt-4o",
        "object": "model",
        "created": CREATED,
        "owned_by": "fake",
    }


async def test_models_are_configurable() -> None:
    async with open_fake_openai(models=["m1"]) as fake, httpx2.AsyncClient() as http:
        response = await http.get(f"{fake.base_url}/models")
        assert [model["id"] for model in response.json()["data"]] == ["m1"]


async def test_default_completion_shape(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    response = await http.post(f"{fake.base_url}/chat/completions", json=chat_body())
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(response.content))
    body = response.json()
    assert body == {
        "id": "chatcmpl-fake-1",
        "object": "chat.completion",
        "created": CREATED,
        "model": "gpt-4o",
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"echo: {USER_TEXT}", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 3 + 5,
            "completion_tokens": 6,
            "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }


async def test_default_completion_through_sdk(fake: FakeOpenAI, sdk: AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content == f"echo: {USER_TEXT}"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 14
    request = fake.requests[0]
    assert request.method == "POST"
    assert request.path == "/v1/chat/completions"
    assert request.json["messages"] == MESSAGES
    assert request.headers["authorization"] == "Bearer x"


async def test_array_content_parts_are_concatenated(fake: FakeOpenAI, sdk: AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="gpt-4o",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look "},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                    {"type": "text", "text": "here"},
                ],
            }
        ],
    )
    assert completion.choices[0].message.content == "echo: look here"


async def test_n_choices(sdk: AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, n=2)
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert {choice.message.content for choice in completion.choices} == {f"echo: {USER_TEXT}"}
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12


async def test_default_stream_through_sdk(sdk: AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk.id for chunk in chunks} == {"chatcmpl-fake-1"}
    first, *middle, last = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert [chunk.choices[0].delta.content for chunk in middle] == [
        "echo: ",
        "say ",
        "hello ",
        "to ",
        "the ",
        "world",
    ]
    assert last.choices[0].finish_reason == "stop"
    assert last.choices[0].delta.content is None
    assert all(chunk.usage is None for chunk in chunks)


async def test_stream_wire_format(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    response = await http.post(f"{fake.base_url}/chat/completions", json=chat_body(stream=True))
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    payloads = sse_payloads(response.content)
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(payload) for payload in payloads[:-1]]
    assert chunks[0] == {
        "id": "chatcmpl-fake-1",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "gpt-4o",
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    assert chunks[-1]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    non_stream = await http.post(f"{fake.base_url}/chat/completions", json=chat_body())
    assert content == non_stream.json()["choices"][0]["message"]["content"]


async def test_stream_with_n_choices(sdk: AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, n=2)
    contents = {0: "", 1: ""}
    finishes = {}
    async for chunk in stream:
        for choice in chunk.choices:
            contents[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finishes[choice.index] = choice.finish_reason
    assert contents == {0: f"echo: {USER_TEXT}", 1: f"echo: {USER_TEXT}"}
    assert finishes == {0: "stop", 1: "stop"}


async def test_stream_include_usage(fake: FakeOpenAI, sdk: AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    *content_chunks, usage_chunk = chunks
    assert all(chunk.usage is None and chunk.choices for chunk in content_chunks)
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == 8
    assert usage_chunk.usage.completion_tokens == 6
    assert usage_chunk.usage.total_tokens == 14
    # On the wire every content chunk says "usage": null explicitly.
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            f"{fake.base_url}/chat/completions",
            json=chat_body(stream=True, stream_options={"include_usage": True}),
        )
    wire = [orjson.loads(p) for p in sse_payloads(response.content)[:-1]]
    assert all("usage" in chunk and chunk["usage"] is None for chunk in wire[:-1])


async def test_tools_non_stream(fake: FakeOpenAI, sdk: AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, tools=[WEATHER_TOOL]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.id == "call_fake_1"
    assert call.type == "function"
    assert call.function.name == "search"
    assert call.function.arguments == f'{{"q": "{USER_TEXT}"}}'


async def test_tool_choice_none_answers_with_text(sdk: AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert completion.choices[0].message.content == f"echo: {USER_TEXT}"


async def test_tools_stream_reassembled_by_sdk(fake: FakeOpenAI, sdk: AsyncOpenAI) -> None:
    async with sdk.chat.completions.stream(
        model="gpt-4o", messages=MESSAGES, tools=[WEATHER_TOOL]
    ) as stream:
        argument_deltas = [
            event async for event in stream if event.type == "tool_calls.function.arguments.delta"
        ]
        completion = await stream.get_final_completion()
    assert len(argument_deltas) >= 2
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.id == "call_fake_1"
    assert call.function.name == "search"
    assert call.function.arguments == f'{{"q": "{USER_TEXT}"}}'
    assert call.function.parsed_arguments == {"q": USER_TEXT}


async def test_unknown_path_is_404(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    response = await http.post(f"{fake.base_url}/embeddingz", json={})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "unknown_url"
    assert error["param"] is None
    assert "POST /v1/embeddingz" in error["message"]


async def test_malformed_request_body_is_400(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    response = await http.post(f"{fake.base_url}/chat/completions", content=b"{nope")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_requests_are_recorded(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    await http.post(
        f"{fake.base_url}/chat/completions?api-version=1",
        json=chat_body(),
        headers={"X-Custom": "A"},
    )
    request = await fake.wait_for_request()
    assert request.path == "/v1/chat/completions?api-version=1"
    assert request.headers["x-custom"] == "A"
    assert request.json == chat_body()
    assert request.received_at <= trio.current_time()
    # The response reached the client just before the server task finished the reply.
    with trio.fail_after(GUARD):
        await fake.wait_idle()


# -- scripted replies ----------------------------------------------------------------------


async def test_scripted_rate_limit_error(fake: FakeOpenAI, sdk: AsyncOpenAI) -> None:
    fake.push(
        Reply.json(
            openai_error("Rate limit reached", type="requests", code="rate_limit_exceeded"),
            status=429,
            headers={"Retry-After": "7"},
        )
    )
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"
    # The queue is empty again: the default behaviour answers.
    completion = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert completion.choices[0].message.content == f"echo: {USER_TEXT}"


async def test_replies_pop_in_order_for_any_path(
    fake: FakeOpenAI, http: httpx2.AsyncClient
) -> None:
    fake.push(Reply.json({"a": 1}), Reply.default(), Reply.raw(b'{"broken', status=502))
    first = await http.get(f"{fake.base_url}/anything")
    second = await http.get(f"{fake.base_url}/models")
    third = await http.get(f"{fake.base_url}/models")
    assert first.json() == {"a": 1}
    assert second.json()["object"] == "list"
    assert third.status_code == 502
    assert third.content == b'{"broken'
    assert third.headers["content-type"] == "application/json"
    assert fake.pending_replies == 0


async def test_scripted_sse_is_one_chunk_per_event(fake: FakeOpenAI) -> None:
    events = [sse_event({"x": 1}), b": comment\n\n", SSE_DONE]
    fake.push(Reply.sse(events, headers={"X-Extra": "yes"}))
    stream = await trio.open_tcp_stream(fake.host, fake.port)
    await stream.send_all(b"GET /v1/whatever HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n")
    received = bytearray()
    with trio.fail_after(GUARD):
        while data := await stream.receive_some():
            received += data
    await stream.aclose()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    head = head.lower()
    assert head.startswith(b"http/1.1 200 ")
    assert b"transfer-encoding: chunked" in head
    assert b"content-type: text/event-stream" in head
    assert b"x-extra: yes" in head
    expected = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events) + b"0\r\n\r\n"
    assert body == expected


async def test_stall_until_client_cancels(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    fake.push(Reply.stall())
    cancel_request = trio.CancelScope()

    async def call() -> None:
        with cancel_request:
            await http.post(f"{fake.base_url}/chat/completions", json=chat_body())
            raise AssertionError("the stalled request was answered")

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            request = await fake.wait_for_request()
            assert fake.active_replies == 1
            await trio.testing.wait_all_tasks_blocked()
            assert request.connection_id not in fake.closed_by_client
            cancel_request.cancel()
        await fake.wait_closed(request)
    assert request.connection_id in fake.closed_by_client
    assert request.connection_id in fake.close_times
    assert fake.active_replies == 0


async def test_stall_until_client_times_out(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    fake.push(Reply.stall())
    with trio.move_on_after(0.25) as timeout:
        await http.post(f"{fake.base_url}/chat/completions", json=chat_body())
    assert timeout.cancelled_caught
    with trio.fail_after(GUARD):
        request = await fake.wait_for_request()
        await fake.wait_closed(request)
    assert fake.closed_by_client == {request.connection_id}
    assert fake.close_times[request.connection_id] >= request.received_at


async def test_client_reset_is_recorded_as_close(fake: FakeOpenAI) -> None:
    fake.push(Reply.stall())
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect((fake.host, fake.port))
    await sock.send(b"GET /v1/models HTTP/1.1\r\nHost: fake\r\n\r\n")
    with trio.fail_after(GUARD):
        request = await fake.wait_for_request()
        # SO_LINGER 0: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        await fake.wait_closed(request)
    assert fake.active_replies == 0


async def test_request_followed_by_eof_is_recorded(fake: FakeOpenAI) -> None:
    stream = await trio.open_tcp_stream(fake.host, fake.port)
    await stream.send_all(b"GET /v1/models HTTP/1.1\r\nHost: fake\r\n\r\n")
    await stream.send_eof()
    with trio.fail_after(GUARD):
        request = await fake.wait_for_request()
        await fake.wait_closed(request)
    await stream.aclose()
    assert request.path == "/v1/models"
    assert fake.active_replies == 0


async def test_partial_request_then_eof_is_a_close_without_request(fake: FakeOpenAI) -> None:
    stream = await trio.open_tcp_stream(fake.host, fake.port)
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
    await stream.send_eof()
    with trio.fail_after(GUARD):
        await fake.wait_until(lambda: bool(fake.closed_by_client))
    await stream.aclose()
    assert fake.requests == []


async def test_finished_response_is_not_a_close(fake: FakeOpenAI) -> None:
    async with httpx2.AsyncClient() as http:
        await http.get(f"{fake.base_url}/models")
        request = await fake.wait_for_request()
        await trio.testing.wait_all_tasks_blocked()
        assert fake.open_connections == {request.connection_id}
        assert fake.closed_by_client == set()
    # Closing the client closes its idle keep-alive connection.
    with trio.fail_after(GUARD):
        await fake.wait_closed(request)


async def test_stream_then_stall_until_client_closes(fake: FakeOpenAI, sdk: AsyncOpenAI) -> None:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}],
    }
    fake.push(Reply.stream_then_stall([sse_event(chunk)]))
    with trio.fail_after(GUARD):
        stream = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        first = await stream.__anext__()
        assert first.choices[0].delta.content == "partial"
        request = await fake.wait_for_request()
        assert fake.active_replies == 1
        await stream.close()
        await fake.wait_closed(request)
    assert fake.active_replies == 0


async def test_stream_then_cut_is_a_client_error(fake: FakeOpenAI, sdk: AsyncOpenAI) -> None:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}],
    }
    fake.push(Reply.stream_then_cut([sse_event(chunk)]))
    received: list[ChatCompletionChunk] = []
    with trio.fail_after(GUARD):
        stream = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIConnectionError):
            await collect(stream, received)
        request = await fake.wait_for_request()
        with pytest.raises(ConnectionClosedByServer):
            await fake.wait_closed(request)
    assert [item.choices[0].delta.content for item in received] == ["partial"]
    assert request.connection_id in fake.closed_by_server


async def test_stream_then_cut_raw(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    fake.push(Reply.stream_then_cut([sse_event({"x": 1})]))
    with pytest.raises(httpx2.RemoteProtocolError):
        await http.post(f"{fake.base_url}/chat/completions", json=chat_body(stream=True))


async def test_close_without_response(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    fake.push(Reply.close_without_response())
    with pytest.raises(httpx2.RemoteProtocolError):
        await http.post(f"{fake.base_url}/chat/completions", json=chat_body())
    request = await fake.wait_for_request()
    with trio.fail_after(GUARD), pytest.raises(ConnectionClosedByServer):
        await fake.wait_closed(request)


async def test_json_delay(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    fake.push(Reply.json({"ok": True}, delay=0.05))
    started = trio.current_time()
    response = await http.get(f"{fake.base_url}/models")
    assert response.json() == {"ok": True}
    assert trio.current_time() - started >= 0.05


async def test_chunk_delay_header_paces_default_stream(
    fake: FakeOpenAI, http: httpx2.AsyncClient
) -> None:
    started = trio.current_time()
    response = await http.post(
        f"{fake.base_url}/chat/completions",
        json=chat_body(stream=True),
        headers={"x-fake-chunk-delay": "0.02"},
    )
    events = sse_payloads(response.content)
    assert trio.current_time() - started >= 0.02 * (len(events) - 1)


async def test_client_close_interrupts_paced_stream(fake: FakeOpenAI, sdk: AsyncOpenAI) -> None:
    with trio.fail_after(GUARD):
        stream = await sdk.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-chunk-delay": "3600"},
        )
        first = await stream.__anext__()
        assert first.choices[0].delta.role == "assistant"
        request = await fake.wait_for_request()
        assert fake.active_replies == 1
        await stream.close()
        await fake.wait_closed(request)
    assert fake.active_replies == 0


# -- connections ---------------------------------------------------------------------------


async def test_keep_alive_reuses_connection(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    await http.post(f"{fake.base_url}/chat/completions", json=chat_body())
    await http.post(f"{fake.base_url}/chat/completions", json=chat_body(stream=True))
    await http.get(f"{fake.base_url}/models")
    ids = {request.connection_id for request in fake.requests}
    assert len(fake.requests) == 3
    assert len(ids) == 1
    assert fake.closed_by_client == set()


async def test_connection_close_header_is_a_server_close(
    fake: FakeOpenAI, http: httpx2.AsyncClient
) -> None:
    await http.get(f"{fake.base_url}/models", headers={"Connection": "close"})
    request = await fake.wait_for_request()
    with trio.fail_after(GUARD), pytest.raises(ConnectionClosedByServer):
        await fake.wait_closed(request)


async def test_malformed_http_gets_400_and_server_survives(
    fake: FakeOpenAI, http: httpx2.AsyncClient
) -> None:
    stream = await trio.open_tcp_stream(fake.host, fake.port)
    await stream.send_all(b"\x00\x01 nonsense\r\n\r\n")
    received = bytearray()
    with trio.fail_after(GUARD):
        while data := await stream.receive_some():
            received += data
    await stream.aclose()
    assert received.startswith(b"HTTP/1.1 400 ")
    assert fake.requests == []
    response = await http.get(f"{fake.base_url}/models")
    assert response.status_code == 200


async def test_wait_for_request_count(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:

        async def two_requests() -> None:
            await http.get(f"{fake.base_url}/models")
            await http.get(f"{fake.base_url}/models?second")

        nursery.start_soon(two_requests)
        with trio.fail_after(GUARD):
            second = await fake.wait_for_request(2)
    assert second.path == "/v1/models?second"


async def test_shutdown_with_stalled_connection() -> None:
    failures: list[Exception] = []

    async def call(http: httpx2.AsyncClient, url: str, json: dict[str, Any]) -> None:
        try:
            await http.post(url, json=json)
        except httpx2.TransportError as exc:
            failures.append(exc)

    with trio.fail_after(GUARD):
        async with httpx2.AsyncClient() as http, trio.open_nursery() as nursery:
            fake_context = open_fake_openai()
            async with fake_context as fake:
                fake.push(Reply.stall(), Reply.stream_then_stall([sse_event({"x": 1})]))
                url = f"{fake.base_url}/chat/completions"
                nursery.start_soon(call, http, url, chat_body())
                nursery.start_soon(call, http, url, chat_body(stream=True))
                await fake.wait_for_request(2)
            # Leaving the context closed both connections from the server side.
    assert len(failures) == 2
    assert all(isinstance(exc, httpx2.RemoteProtocolError) for exc in failures)
    assert fake.closed_by_server == {1, 2}
    assert fake.closed_by_client == set()
    assert fake.active_replies == 0
    assert fake.errors == []
