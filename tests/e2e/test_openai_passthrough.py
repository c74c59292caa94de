"""OpenAI-compatible connections end to end: the official SDK -> gateway -> fake upstream.

Everything runs over real loopback HTTP: Hypercorn serves the gateway, the fake upstream is a
real h11 server speaking OpenAI's JSON and SSE.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import orjson
import pytest
import trio

from tests.conftest import RunningGateway, run_gateway
from tests.fakes.openai_upstream import (
    SSE_DONE,
    FakeOpenAI,
    Reply,
    open_fake_openai,
    openai_error,
    sse_event,
)

KEY = "sk-virtual-1"
PROVIDER_KEY = "sk-provider-secret"


async def post_chat(
    http: httpx2.AsyncClient,
    gateway: RunningGateway,
    model: str,
    *,
    content: str = "x",
    stream: bool = False,
) -> httpx2.Response:
    """POST a one-message chat request with the test key, as a raw HTTP client would."""
    return await http.post(
        f"{gateway.base_url}/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json={"model": model, "messages": [{"role": "user", "content": content}],
              "stream": stream},
    )


def gateway_config(fake: FakeOpenAI, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "connections": {
            "up": {
                "api_type": "openai",
                "api_base": fake.base_url,
                "api_key": PROVIDER_KEY,
                "http_headers": {"X-Org": "acme"},
                "read_timeout_seconds": 5,
            }
        },
        "routing": {
            "fast": "up.gpt-4o-mini",
            "gpt*": "up.*",
            "o3": "up.*",
        },
        "groups": {"default": {"api_keys": [KEY]}},
    }
    config.update(overrides)
    return config


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai() as upstream:
        yield upstream


@pytest.fixture
async def gateway(fake: FakeOpenAI) -> AsyncIterator[RunningGateway]:
    async with run_gateway(gateway_config(fake)) as running:
        yield running


@pytest.fixture
async def client(gateway: RunningGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key=KEY, max_retries=0
    ) as sdk:
        yield sdk


async def test_non_streaming_returns_the_whole_upstream_object(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    completion = await client.chat.completions.create(
        model="fast",
        messages=[{"role": "user", "content": "hello there"}],
        temperature=0.2,
        extra_body={"custom_vendor_field": {"a": 1}},
    )
    assert completion.model == "fast"  # the name the client asked for
    assert completion.id.startswith("chatcmpl-fake")
    assert completion.system_fingerprint == "fp_fake"
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0

    sent = fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json["model"] == "gpt-4o-mini"  # routed upstream name
    assert sent.json["temperature"] == 0.2
    assert sent.json["custom_vendor_field"] == {"a": 1}  # unknown fields are forwarded
    # The provider key goes upstream, never the client's virtual key.
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert KEY not in str(sent.headers)
    assert sent.headers["x-org"] == "acme"


async def test_passthrough_rule_keeps_the_clients_model_name(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4.1-nano", messages=[{"role": "user", "content": "x"}]
    )
    assert completion.model == "gpt-4.1-nano"
    assert fake.requests[-1].json["model"] == "gpt-4.1-nano"


async def test_tools_and_n_are_relayed(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "search",
                "description": "search the web",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    completion = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "find cats"}], tools=tools,
        tool_choice="auto",
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "search"  # type: ignore[union-attr]
    assert orjson.loads(call.function.arguments) == {"q": "find cats"}  # type: ignore[union-attr]
    assert fake.requests[-1].json["tool_choice"] == "auto"

    many = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "two"}], n=2
    )
    assert [c.index for c in many.choices] == [0, 1]


async def test_sync_client_in_a_thread(gateway: RunningGateway) -> None:
    def call() -> str | None:
        with openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0) as sdk:
            completion = sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "sync works"}]
            )
            return completion.choices[0].message.content

    assert await trio.to_thread.run_sync(call) == "echo: sync works"


async def test_streaming_relays_every_chunk(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="fast",
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three four"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.model == "fast" for c in chunks)
    # The client did not ask for usage: no usage chunk, although the gateway asked upstream.
    assert all(c.usage is None for c in chunks)
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}


async def test_streaming_usage_chunk_when_the_client_asks(
    gateway: RunningGateway, client: openai.AsyncOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "count me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    record = await gateway.records.wait_for(lambda r: r.stream and r.outcome == "ok")
    assert record.usage is not None and record.usage["completion_tokens"] == 3


async def test_gateway_usage_accounting_without_client_usage(
    gateway: RunningGateway, client: openai.AsyncOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "a b c d"}], stream=True
    )
    async for _ in stream:
        pass
    record = await gateway.records.wait_for(lambda r: r.stream and r.outcome == "ok")
    assert record.usage is not None and record.usage["prompt_tokens"] == 4
    assert record.finish_reasons == ["stop"]


async def test_streaming_tool_call_arguments_survive(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "weather in Paris"}],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": {}}}],
        stream=True,
    )
    arguments = ""
    names = []
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names.append(call.function.name)
                if call.function and call.function.arguments:
                    arguments += call.function.arguments
            finish = choice.finish_reason or finish
    assert names == ["weather"]
    assert orjson.loads(arguments) == {"q": "weather in Paris"}
    assert finish == "tool_calls"


async def test_streaming_n_2_keeps_choices_apart(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x y"}], n=2, stream=True
    )
    texts = {0: "", 1: ""}
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: "echo: x y", 1: "echo: x y"}


async def test_raw_sse_framing_and_headers(gateway: RunningGateway) -> None:
    async with httpx2.AsyncClient() as http:
        response = await post_chat(http, gateway, "gpt-4o", content="hi", stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-request-id"]
    assert response.content.endswith(b"data: [DONE]\n\n")
    assert response.content.startswith(b"data: {")


# -- upstream errors -------------------------------------------------------------------------


async def test_upstream_400_keeps_status_message_and_param(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.push(
        Reply.json(
            openai_error("max_tokens is too large", param="max_tokens", code="invalid_value"),
            status=400,
        )
    )
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=10**9
        )
    assert info.value.status_code == 400
    body: Any = info.value.body
    assert body["message"] == "max_tokens is too large"
    assert body["param"] == "max_tokens"
    assert body["code"] == "invalid_value"


async def test_upstream_429_keeps_status_and_retry_after(
    fake: FakeOpenAI, gateway: RunningGateway
) -> None:
    fake.push(
        Reply.json(
            openai_error("Rate limit reached", type="requests", code="rate_limit_exceeded"),
            status=429,
            headers={"Retry-After": "7", "x-ratelimit-remaining-requests": "0"},
        )
    )
    async with httpx2.AsyncClient() as http:
        response = await post_chat(http, gateway, "gpt-4o")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    record = await gateway.records.wait_for(lambda r: r.status == 429)
    assert record.outcome == "error"


async def test_upstream_429_reaches_the_sdk_as_rate_limit_error(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.push(Reply.json(openai_error("slow down", type="requests"), status=429,
                         headers={"Retry-After": "1"}))
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )


async def test_upstream_500_hides_details_unless_debug(fake: FakeOpenAI) -> None:
    for debug in (False, True):
        async with run_gateway(gateway_config(fake), debug=debug) as gateway:
            fake.push(Reply.json(openai_error("db shard 7 exploded", type="server_error"),
                                 status=500))
            async with httpx2.AsyncClient() as http:
                response = await post_chat(http, gateway, "gpt-4o")
            assert response.status_code == 500
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert ("db shard 7 exploded" in error["message"]) is debug


async def test_upstream_401_is_not_confused_with_the_clients_key(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.push(Reply.json(openai_error("Incorrect API key provided: sk-prov***cret"), status=401))
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
    body: Any = info.value.body
    assert "gateway's credentials" in body["message"]
    assert "sk-prov" not in body["message"]
    assert body["code"] == "upstream_authentication_failed"


async def test_upstream_unreachable_is_502() -> None:
    # A port nothing listens on: bind, note the port, close.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    config = {
        "connections": {"up": {"api_base": f"http://127.0.0.1:{port}/v1", "api_key": "k"}},
        "routing": {"*": "up.*"},
        "groups": {"default": {"api_keys": [KEY]}},
    }
    async with run_gateway(config) as gateway, httpx2.AsyncClient() as http:
        for stream in (False, True):
            response = await post_chat(http, gateway, "m", stream=stream)
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "upstream_unreachable"


async def test_upstream_timeout_is_504(fake: FakeOpenAI) -> None:
    config = gateway_config(fake)
    config["connections"]["up"]["read_timeout_seconds"] = 0.3
    async with run_gateway(config) as gateway, httpx2.AsyncClient() as http:
        for stream in (False, True):
            fake.push(Reply.stall())
            response = await post_chat(http, gateway, "gpt-4o", stream=stream)
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "upstream_timeout"


async def test_request_deadline_is_504(fake: FakeOpenAI) -> None:
    config = gateway_config(fake, request_timeout_seconds=0.3)
    async with run_gateway(config) as gateway, httpx2.AsyncClient() as http:
        fake.push(Reply.stall())
        response = await post_chat(http, gateway, "gpt-4o")
    assert response.status_code == 504


async def test_upstream_malformed_json_is_502(fake: FakeOpenAI, gateway: RunningGateway) -> None:
    fake.push(Reply.raw(b'{"choices": [', status=200))
    async with httpx2.AsyncClient() as http:
        response = await post_chat(http, gateway, "gpt-4o")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_invalid_response"


async def test_stream_refused_before_first_chunk_keeps_the_real_status(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.push(Reply.json(openai_error("overloaded", type="server_error"), status=503,
                         headers={"Retry-After": "2"}))
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
        )
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "2"


def _chunk(content: str, finish: str | None = None) -> bytes:
    return sse_event(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
        }
    )


async def test_stream_cut_midway_ends_with_an_error_event(
    fake: FakeOpenAI, gateway: RunningGateway, client: openai.AsyncOpenAI
) -> None:
    fake.push(Reply.stream_then_cut([_chunk("partial "), _chunk("answer")]))
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["partial ", "answer"]
    assert "upstream" in info.value.message.lower()
    record = await gateway.records.wait_for(lambda r: r.stream and r.outcome == "error")
    assert record.error_code == "upstream_unreachable"


async def test_malformed_chunk_midstream_ends_with_an_error_event(
    fake: FakeOpenAI, gateway: RunningGateway
) -> None:
    fake.push(Reply.sse([_chunk("ok "), b"data: {not json\n\n", _chunk("never", "stop"),
                         SSE_DONE]))
    async with httpx2.AsyncClient() as http:
        response = await post_chat(http, gateway, "gpt-4o", stream=True)
    assert response.status_code == 200
    events = [e for e in response.content.split(b"\n\n") if e]
    assert orjson.loads(events[0][6:])["choices"][0]["delta"]["content"] == "ok "
    last = orjson.loads(events[-1][6:])
    assert last["error"]["code"] == "upstream_invalid_response"
    assert b"[DONE]" not in response.content


async def test_upstream_error_event_in_a_stream_is_relayed_as_an_error(
    fake: FakeOpenAI, gateway: RunningGateway
) -> None:
    fake.push(Reply.sse([_chunk("a"), sse_event({"error": {"message": "provider fell over",
                                                           "code": 502}})]))
    async with httpx2.AsyncClient() as http:
        response = await post_chat(http, gateway, "gpt-4o", stream=True)
    last = orjson.loads([e for e in response.content.split(b"\n\n") if e][-1][6:])
    assert "error" in last
    assert b"[DONE]" not in response.content


async def test_sse_comments_and_crlf_from_upstream_are_handled(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    crlf = _chunk("a").replace(b"\n", b"\r\n")
    fake.push(Reply.sse([b": OPENROUTER PROCESSING\n\n", crlf, _chunk("b", "stop"), SSE_DONE]))
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
    )
    assert [c.choices[0].delta.content async for c in stream] == ["a", "b"]


async def test_stream_ending_without_done_after_finish_is_clean(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.push(Reply.sse([_chunk("a"), _chunk("b", "stop")]))
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
    )
    assert [c.choices[0].delta.content async for c in stream] == ["a", "b"]


async def test_default_args_fill_in_missing_fields(fake: FakeOpenAI) -> None:
    config = gateway_config(fake)
    config["connections"]["up"]["default_args"] = {"temperature": 0.0, "max_tokens": 99}
    async with run_gateway(config) as gateway, openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key=KEY, max_retries=0
    ) as sdk:
        await sdk.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], temperature=0.9
        )
    sent = fake.requests[-1].json
    assert sent["temperature"] == 0.9  # the client's value wins
    assert sent["max_tokens"] == 99


async def test_keep_alive_to_the_upstream_is_reused(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    for stream in (False, True, False):
        if stream:
            s = await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
            )
            async for _ in s:
                pass
        else:
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
    assert [r.connection_id for r in fake.requests] == [1, 1, 1]


async def test_upstream_error_fields_beyond_the_four_are_kept(
    fake: FakeOpenAI, gateway: RunningGateway
) -> None:
    body = openai_error("This model's maximum context length is 128000 tokens.",
                        code="context_length_exceeded", param="messages")
    body["error"]["limit"] = 128000
    fake.push(Reply.json(body, status=400))
    async with httpx2.AsyncClient() as http:
        response = await post_chat(http, gateway, "gpt-4o")
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "context_length_exceeded"
    assert error["limit"] == 128000


async def test_custom_api_prefix(fake: FakeOpenAI) -> None:
    async with run_gateway(gateway_config(fake, api_prefix="/api/v2/")) as gateway, \
            httpx2.AsyncClient() as http:
        headers = {"authorization": f"Bearer {KEY}"}
        chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "prefixed"}]}
        ok = await http.post(f"{gateway.url}/api/v2/chat/completions", headers=headers, json=chat)
        old = await http.post(f"{gateway.url}/v1/chat/completions", headers=headers, json=chat)
        models = await http.get(f"{gateway.url}/api/v2/models", headers=headers)
    assert ok.json()["choices"][0]["message"]["content"] == "echo: prefixed"
    assert old.status_code == 404
    assert models.status_code == 200


async def test_more_than_a_hundred_streams_reach_the_upstream_at_once(
    fake: FakeOpenAI, gateway: RunningGateway
) -> None:
    """The default upstream pool (1,000 connections, as the OpenAI SDK's) lets 150 streams
    run at once. With the earlier default of 100, the 101st waited for a pooled connection:
    a hidden cap of 100 concurrent streams per connection (1,000 streams/s of 100 ms each)."""
    streams = 150
    fake.push(*[Reply.stream_then_stall([_chunk("first")]) for _ in range(streams)])
    first_chunks = 0

    async def stream_one(http: httpx2.AsyncClient) -> None:
        nonlocal first_chunks
        async with http.stream(
            "POST",
            f"{gateway.base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]},  # noqa: E501
        ) as response:
            assert response.status_code == 200
            async for _ in response.aiter_bytes():
                first_chunks += 1
                await trio.sleep_forever()  # hold the stream open

    limits = httpx2.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with (
        httpx2.AsyncClient(limits=limits, timeout=30) as http,
        trio.open_nursery() as nursery,
    ):
        for _ in range(streams):
            nursery.start_soon(stream_one, http)
        with trio.fail_after(20):
            await fake.wait_for_request(streams)
            while first_chunks < streams:
                await trio.sleep(0.01)
        # All at once: none reached the upstream only after another gave up its connection
        # (here, a stalled stream's read timeout would have freed one after 5 s).
        assert not fake.closed_by_client
        nursery.cancel_scope.cancel()
    assert len(fake.requests) == streams
