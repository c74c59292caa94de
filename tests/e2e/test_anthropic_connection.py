"""The Anthropic connection end to end: the official ``openai`` SDK -> gateway -> fake Anthropic.

Everything runs over real loopback HTTP: Hypercorn serves the gateway, and
:mod:`tests.fakes.anthropic_upstream` is a real h11 server speaking Anthropic's Messages API. The
fake validates what it receives as strictly as the API (roles alternate, tool_use/tool_result
pairing, signed thinking blocks, id and name patterns, known fields only, the x-api-key), so a
translation mistake shows up as a 400 here, not as a silent difference.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
import trio

from tests.conftest import RunningGateway, run_gateway
from tests.fakes.anthropic_upstream import (
    MODEL_CREATED_AT,
    FakeAnthropic,
    error_reply,
    message_stream_events,
    open_fake_anthropic,
    thinking_signature,
)
from tests.fakes.openai_upstream import RecordedRequest, Reply

KEY = "sk-virtual-anthropic-1"
PROVIDER_KEY = "sk-ant-provider-secret"
CONFIG_BETA = "context-1m-2025-08-07"
MODEL = "claude-sonnet-4-6"
DEFAULT_MAX_TOKENS = 321
GUARD = 10
FIXTURES = Path(__file__).parent.parent / "fixtures" / "anthropic"

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"q": {"type": "string"}},
            "required": ["q"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
CLOCK: Any = {"type": "function", "function": {"name": "clock", "description": "The time."}}


def gateway_config(fake: FakeAnthropic, **connection: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "api_type": "anthropic",
        "api_base": fake.base_url,
        "api_key": PROVIDER_KEY,
        "max_tokens": DEFAULT_MAX_TOKENS,
        "anthropic_beta": [CONFIG_BETA],
        "read_timeout_seconds": 5,
    }
    settings.update(connection)
    return {
        "connections": {"claude": settings},
        "routing": {"claude*": "claude.*", "fast": "claude.claude-haiku-4-5"},
        "groups": {"default": {"api_keys": [KEY]}},
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with open_fake_anthropic(api_keys=[PROVIDER_KEY]) as upstream:
        yield upstream
    assert upstream.errors == []


@contextlib.asynccontextmanager
async def serve(
    fake: FakeAnthropic, **connection: Any
) -> AsyncIterator[tuple[RunningGateway, openai.AsyncOpenAI]]:
    async with (
        run_gateway(gateway_config(fake, **connection)) as gateway,
        openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0) as sdk,
    ):
        yield gateway, sdk


@pytest.fixture
async def gateway(fake: FakeAnthropic) -> AsyncIterator[RunningGateway]:
    async with run_gateway(gateway_config(fake)) as running:
        yield running


@pytest.fixture
async def client(gateway: RunningGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0) as sdk:
        yield sdk


def sent(fake: FakeAnthropic) -> list[RecordedRequest]:
    """The Messages requests the upstream received, in order."""
    return [r for r in fake.requests if r.path == "/v1/messages"]


def words(text: str) -> int:
    return len(text.split())


def split_events(stream: str) -> list[bytes]:
    """An SSE transcript as one write per event."""
    return [part.encode() + b"\n\n" for part in stream.split("\n\n") if part]


async def collect(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


def stream_text(chunks: list[Any], index: int = 0) -> str:
    return "".join(
        choice.delta.content or ""
        for chunk in chunks
        for choice in chunk.choices
        if choice.index == index
    )


def stream_tool_calls(chunks: list[Any]) -> dict[int, dict[str, Any]]:
    """Tool-call fragments accumulated by index (the first fragment names the call)."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for fragment in choice.delta.tool_calls or []:
                if fragment.index not in calls:
                    assert fragment.id
                    assert fragment.function is not None
                    assert fragment.function.name
                    calls[fragment.index] = {
                        "id": fragment.id,
                        "name": fragment.function.name,
                        "arguments": "",
                    }
                if fragment.function is not None and fragment.function.arguments:
                    calls[fragment.index]["arguments"] += fragment.function.arguments
    return calls


def delta_extra(chunks: list[Any], key: str) -> list[Any]:
    """Values of a non-standard delta field (``reasoning_content``, ``thinking_blocks``)."""
    return [
        choice.delta.model_extra[key]
        for chunk in chunks
        for choice in chunk.choices
        if choice.delta.model_extra and choice.delta.model_extra.get(key) is not None
    ]


def finish_reasons(chunks: list[Any]) -> list[str]:
    return [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]


# -- plain answers ------------------------------------------------------------------------------


async def test_text_answer(fake: FakeAnthropic, client: openai.AsyncOpenAI) -> None:
    fake.cache_read_input_tokens = 5
    fake.cache_creation_input_tokens = 3
    with trio.fail_after(GUARD):
        completion = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}]
        )
    [choice] = completion.choices
    assert choice.message.content == "echo: hello there"
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert completion.model == MODEL
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == words("hello there") + 5 + 3
    assert usage.completion_tokens == words("echo: hello there")
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 5
    assert usage.prompt_tokens_details.cache_write_tokens == 3

    [request] = sent(fake)
    assert request.json == {
        "model": MODEL,
        "max_tokens": DEFAULT_MAX_TOKENS,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
    }


async def test_routed_model_name_goes_upstream_and_the_clients_comes_back(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    with trio.fail_after(GUARD):
        completion = await client.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "x"}]
        )
    assert completion.model == "fast"
    assert sent(fake)[-1].json["model"] == "claude-haiku-4-5"


async def test_system_and_multi_turn(fake: FakeAnthropic, client: openai.AsyncOpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "developer", "content": "Use English."},
        {"role": "user", "content": "second question"},
    ]
    with trio.fail_after(GUARD):
        completion = await client.chat.completions.create(model=MODEL, messages=messages)
    assert completion.choices[0].message.content == "echo: second question"
    body = sent(fake)[-1].json
    assert body["system"] == [
        {"type": "text", "text": "Be terse."},
        {"type": "text", "text": "Use English."},
    ]
    assert [(m["role"], m["content"][0]["text"]) for m in body["messages"]] == [
        ("user", "first question"),
        ("assistant", "first answer"),
        ("user", "second question"),
    ]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == sum(words(m["content"]) for m in messages)


async def test_streaming_text(fake: FakeAnthropic, client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(GUARD):
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "one two three four"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = await collect(stream)
    assert stream_text(chunks) == "echo: one two three four"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == words("echo: one two three four")
    assert all(chunk.model == MODEL for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert sent(fake)[-1].json["stream"] is True
    assert "stream_options" not in sent(fake)[-1].json


async def test_streaming_without_usage_request_has_no_usage_chunk(
    client: openai.AsyncOpenAI,
) -> None:
    with trio.fail_after(GUARD):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = await collect(stream)
    assert stream_text(chunks) == "echo: hi"
    assert all(chunk.usage is None for chunk in chunks)


# -- tools --------------------------------------------------------------------------------------


async def test_tool_call(fake: FakeAnthropic, client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(GUARD):
        completion = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "weather in Paris"}],
            tools=[WEATHER, CLOCK],
            tool_choice="auto",
            parallel_tool_calls=False,
        )
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"q": "weather in Paris"}  # type: ignore[union-attr]
    body = sent(fake)[-1].json
    assert [t["name"] for t in body["tools"]] == ["get_weather", "clock"]
    assert body["tools"][0]["input_schema"] == WEATHER["function"]["parameters"]
    assert body["tools"][0]["description"] == "Current weather for a city."
    assert body["tools"][1]["input_schema"]["type"] == "object"
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


async def test_named_tool_choice(fake: FakeAnthropic, client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(GUARD):
        completion = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "what time?"}],
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "clock"}},
        )
    [call] = completion.choices[0].message.tool_calls or []
    assert call.function.name == "clock"  # type: ignore[union-attr]
    assert sent(fake)[-1].json["tool_choice"] == {"type": "tool", "name": "clock"}


async def test_tool_call_streamed(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(GUARD):
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "weather in Tokyo"}],
            tools=[WEATHER],
            stream=True,
        )
        chunks = await collect(stream)
    calls = stream_tool_calls(chunks)
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"q": "weather in Tokyo"}
    assert finish_reasons(chunks) == ["tool_calls"]


async def test_tool_call_with_the_sdk_stream_helper(client: openai.AsyncOpenAI) -> None:
    arguments_done: list[Any] = []
    with trio.fail_after(GUARD):
        async with client.chat.completions.stream(
            model=MODEL,
            messages=[{"role": "user", "content": "weather in Lima"}],
            tools=[WEATHER],
        ) as stream:
            async for event in stream:
                if event.type == "tool_calls.function.arguments.done":
                    arguments_done.append(event)
            final = await stream.get_final_completion()
    [choice] = final.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"q": "weather in Lima"}
    assert call.function.parsed_arguments == {"q": "weather in Lima"}
    assert [event.name for event in arguments_done] == ["get_weather"]


async def test_tool_loop(fake: FakeAnthropic, client: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "weather in Oslo"}]
    with trio.fail_after(GUARD):
        first = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER]
        )
        [call] = first.choices[0].message.tool_calls or []
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "minus 3 and snowing"})
        second = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER]
        )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "echo: minus 3 and snowing"
    assert second.choices[0].message.tool_calls is None
    followup = sent(fake)[-1].json["messages"]
    assert [m["role"] for m in followup] == ["user", "assistant", "user"]
    [tool_use] = followup[1]["content"]
    assert tool_use == {
        "type": "tool_use",
        "id": call.id,
        "name": "get_weather",
        "input": {"q": "weather in Oslo"},
    }
    assert followup[2]["content"] == [
        {"type": "tool_result", "tool_use_id": call.id, "content": "minus 3 and snowing"}
    ]


async def test_tool_loop_with_ids_from_another_provider(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    """Ids such as Kimi's ``functions.get_weather:0`` are invalid for Anthropic; rewritten the
    same way in tool_use and tool_result, the fake accepts the pair."""
    messages: Any = [
        {"role": "user", "content": "weather in Paris and Rome"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "functions.get_weather:0", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"q": "Paris"}'}},
                {"id": "call 1/rome", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"q": "Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call 1/rome", "content": "cloudy"},
    ]  # fmt: skip
    with trio.fail_after(GUARD):
        completion = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER]
        )
    assert completion.choices[0].message.content == "echo: sunny cloudy"
    body = sent(fake)[-1].json["messages"]
    use_ids = [b["id"] for b in body[1]["content"]]
    result_ids = [b["tool_use_id"] for b in body[2]["content"]]
    assert use_ids == result_ids
    assert len(set(use_ids)) == 2
    assert all(i not in ("functions.get_weather:0", "call 1/rome") for i in use_ids)


# -- thinking ---------------------------------------------------------------------------------


async def test_thinking_with_tool_use_round_trip(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    messages: list[Any] = [{"role": "user", "content": "weather in Paris"}]
    with trio.fail_after(GUARD):
        first = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], reasoning_effort="medium"
        )
    request = sent(fake)[-1].json
    assert request["thinking"]["type"] == "enabled"
    assert request["max_tokens"] > request["thinking"]["budget_tokens"]
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    extra = message.model_extra or {}
    [block] = extra["thinking_blocks"]
    assert block["type"] == "thinking"
    assert block["thinking"]
    assert block["signature"] == thinking_signature(block["thinking"])
    assert extra["reasoning_content"] == block["thinking"]
    assert first.usage is not None
    assert first.usage.completion_tokens_details is not None
    assert first.usage.completion_tokens_details.reasoning_tokens == words(block["thinking"])

    [call] = message.tool_calls or []
    returned = message.model_dump(exclude_none=True)
    tool = {"role": "tool", "tool_call_id": call.id, "content": "eighteen degrees"}
    with trio.fail_after(GUARD):
        second = await client.chat.completions.create(
            model=MODEL,
            messages=[*messages, returned, tool],
            tools=[WEATHER],
            reasoning_effort="medium",
        )
    assert second.choices[0].message.content == "echo: eighteen degrees"
    assistant_turn = sent(fake)[-1].json["messages"][1]["content"]
    assert assistant_turn[0] == block  # first, verbatim, signature included
    assert [b["type"] for b in assistant_turn] == ["thinking", "tool_use"]


@pytest.mark.parametrize("change", ["drop the blocks", "edit the thinking"])
async def test_thinking_blocks_must_come_back_unchanged(
    fake: FakeAnthropic, client: openai.AsyncOpenAI, change: str
) -> None:
    """The counterpart of the round trip: the fake does check the signed blocks."""
    messages: list[Any] = [{"role": "user", "content": "weather in Paris"}]
    with trio.fail_after(GUARD):
        first = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], reasoning_effort="low"
        )
    returned = first.choices[0].message.model_dump(exclude_none=True)
    if change == "drop the blocks":
        del returned["thinking_blocks"]
    else:
        returned["thinking_blocks"][0]["thinking"] += " (edited)"
    tool = {"role": "tool", "tool_call_id": returned["tool_calls"][0]["id"], "content": "18"}
    with trio.fail_after(GUARD), pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL,
            messages=[*messages, returned, tool],
            tools=[WEATHER],
            reasoning_effort="low",
        )
    assert info.value.status_code == 400
    assert "thinking" in info.value.message


async def test_thinking_streamed_then_sent_back(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    messages: list[Any] = [{"role": "user", "content": "weather in Rome"}]
    with trio.fail_after(GUARD):
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], reasoning_effort="low", stream=True
        )
        chunks = await collect(stream)
    reasoning = "".join(delta_extra(chunks, "reasoning_content"))
    blocks_deltas = delta_extra(chunks, "thinking_blocks")
    assert len(blocks_deltas) == 1  # one delta for the one finished block
    [block] = blocks_deltas[0]
    assert block["thinking"] == reasoning
    assert block["signature"] == thinking_signature(reasoning)
    [call] = stream_tool_calls(chunks).values()
    assistant = {
        "role": "assistant",
        "content": None,
        "reasoning_content": reasoning,
        "thinking_blocks": [block],
        "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}
        ],
    }  # fmt: skip
    tool = {"role": "tool", "tool_call_id": call["id"], "content": "warm"}
    with trio.fail_after(GUARD):
        second = await client.chat.completions.create(
            model=MODEL,
            messages=[*messages, assistant, tool],
            tools=[WEATHER],
            reasoning_effort="low",
        )
    assert second.choices[0].message.content == "echo: warm"


async def test_sdk_stream_helper_with_several_thinking_blocks(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    """Interleaved thinking (or thinking + redacted thinking) gives several blocks, each sent as
    its own ``thinking_blocks`` delta; the SDK's stream helper must still accumulate them."""
    first = {
        "type": "thinking",
        "thinking": "step one",
        "signature": thinking_signature("step one"),
    }
    redacted = {"type": "redacted_thinking", "data": "b3BhcXVlIGRhdGE="}
    answer = {
        "id": "msg_fake_multi", "type": "message", "role": "assistant", "model": MODEL,
        "content": [first, redacted, {"type": "text", "text": "done thinking"}],
        "stop_reason": "end_turn", "stop_sequence": None, "stop_details": None,
        "usage": {"input_tokens": 3, "output_tokens": 6},
    }  # fmt: skip
    fake.push(Reply.sse(message_stream_events(answer)))
    with trio.fail_after(GUARD):
        async with client.chat.completions.stream(
            model=MODEL, messages=[{"role": "user", "content": "think"}]
        ) as stream:
            final = await stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "done thinking"
    blocks = (message.model_extra or {}).get("thinking_blocks") or []
    # Each entry carries its position ("index") for the SDK's merge; the rest is the block.
    assert [b.pop("index") for b in blocks] == [0, 1]
    assert blocks == [first, redacted]


# -- structured output ------------------------------------------------------------------------


async def test_json_schema(fake: FakeAnthropic, client: openai.AsyncOpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "temperature_c": {"type": "number"}},
        "required": ["city", "temperature_c"],
        "additionalProperties": False,
    }
    with trio.fail_after(GUARD):
        completion = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Paris"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "weather", "schema": schema, "strict": True},
            },
        )
    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    answer = json.loads(choice.message.content or "")
    assert set(answer) == set(schema["properties"])  # type: ignore[arg-type]
    assert answer["city"] == "Paris"
    body = sent(fake)[-1].json
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert "tools" not in body


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_json_object(fake: FakeAnthropic, client: openai.AsyncOpenAI, stream: bool) -> None:
    messages: Any = [{"role": "user", "content": "a JSON object about Paris"}]
    with trio.fail_after(GUARD):
        if stream:
            chunks = await collect(
                await client.chat.completions.create(
                    model=MODEL,
                    messages=messages,
                    response_format={"type": "json_object"},
                    stream=True,
                )
            )
            content, finish = stream_text(chunks), finish_reasons(chunks)
            assert stream_tool_calls(chunks) == {}
        else:
            completion = await client.chat.completions.create(
                model=MODEL, messages=messages, response_format={"type": "json_object"}
            )
            content = completion.choices[0].message.content or ""
            finish = [completion.choices[0].finish_reason]
            assert completion.choices[0].message.tool_calls is None
    assert json.loads(content) == {"q": "a JSON object about Paris"}  # the forced tool's input
    assert finish == ["stop"]
    body = sent(fake)[-1].json
    assert body["tool_choice"] == {"type": "tool", "name": body["tools"][0]["name"]}


# -- images -------------------------------------------------------------------------------------


async def test_images(fake: FakeAnthropic, client: openai.AsyncOpenAI) -> None:
    fixture = json.loads((FIXTURES / "image_request.json").read_text())
    request = fixture["openai_request"]
    with trio.fail_after(GUARD):
        completion = await client.chat.completions.create(
            model=request["model"],
            messages=request["messages"],
            max_completion_tokens=request["max_completion_tokens"],
        )
    assert completion.choices[0].message.content == "echo: What is in these two images?"
    body = sent(fake)[-1].json
    expected = fixture["anthropic_request"]
    assert body["messages"] == expected["messages"]
    assert body["max_tokens"] == expected["max_tokens"]
    assert body["system"] == [{"type": "text", "text": expected["system"]}]


async def test_bad_image_is_a_400_without_an_upstream_call(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0="}}
    with trio.fail_after(GUARD), pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [image]}]
        )
    assert info.value.param == "messages[0].content[0].image_url"  # type: ignore[attr-defined]
    assert sent(fake) == []


# -- n > 1 ------------------------------------------------------------------------------------


async def test_n_runs_concurrent_upstream_calls_with_summed_usage(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    messages: Any = [{"role": "user", "content": "pick a number"}]
    with trio.fail_after(GUARD):
        single = await client.chat.completions.create(model=MODEL, messages=messages)
        many = await client.chat.completions.create(model=MODEL, messages=messages, n=2)
    assert [c.index for c in many.choices] == [0, 1]
    assert [c.message.content for c in many.choices] == ["echo: pick a number"] * 2
    calls = sent(fake)[1:]
    assert len(calls) == 2
    assert all("n" not in call.json for call in calls)
    assert calls[0].json == calls[1].json == sent(fake)[0].json
    assert single.usage is not None
    assert many.usage is not None
    assert many.usage.prompt_tokens == 2 * single.usage.prompt_tokens
    assert many.usage.completion_tokens == 2 * single.usage.completion_tokens
    assert many.usage.total_tokens == 2 * single.usage.total_tokens


async def test_n_streamed(fake: FakeAnthropic, client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(GUARD):
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "two answers"}],
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = await collect(stream)
    assert stream_text(chunks, 0) == stream_text(chunks, 1) == "echo: two answers"
    assert sorted(c.index for chunk in chunks for c in chunk.choices if c.finish_reason) == [0, 1]
    assert len(sent(fake)) == 2
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 2 * words("echo: two answers")
    assert usage.prompt_tokens == 2 * words("two answers")


# -- stop sequences and length ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_stop_sequences(
    fake: FakeAnthropic, client: openai.AsyncOpenAI, stream: bool
) -> None:
    messages: Any = [{"role": "user", "content": "one two three four"}]
    with trio.fail_after(GUARD):
        if stream:
            chunks = await collect(
                await client.chat.completions.create(
                    model=MODEL, messages=messages, stop=["three"], stream=True
                )
            )
            content, finish = stream_text(chunks), finish_reasons(chunks)
        else:
            completion = await client.chat.completions.create(
                model=MODEL, messages=messages, stop=["three"]
            )
            content = completion.choices[0].message.content or ""
            finish = [completion.choices[0].finish_reason]
    assert content.startswith("echo: one two")
    assert "three" not in content
    assert finish == ["stop"]
    assert sent(fake)[-1].json["stop_sequences"] == ["three"]


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_max_tokens_gives_finish_reason_length(
    fake: FakeAnthropic, client: openai.AsyncOpenAI, stream: bool
) -> None:
    messages: Any = [{"role": "user", "content": "a b c d e f g h"}]
    with trio.fail_after(GUARD):
        if stream:
            chunks = await collect(
                await client.chat.completions.create(
                    model=MODEL,
                    messages=messages,
                    max_tokens=3,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            content, finish, usage = stream_text(chunks), finish_reasons(chunks), chunks[-1].usage
        else:
            completion = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=3
            )
            content = completion.choices[0].message.content or ""
            finish = [completion.choices[0].finish_reason]
            usage = completion.usage
    assert finish == ["length"]
    assert usage is not None
    assert usage.completion_tokens <= 3
    assert words(content) == usage.completion_tokens
    assert sent(fake)[-1].json["max_tokens"] == 3


# -- parameters -------------------------------------------------------------------------------


async def test_unsupported_parameter_is_a_400_without_an_upstream_call(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    with trio.fail_after(GUARD), pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], seed=42
        )
    assert info.value.param == "seed"  # type: ignore[attr-defined]
    assert info.value.code == "unsupported_parameter"  # type: ignore[attr-defined]
    assert sent(fake) == []


async def test_drop_unsupported_params(fake: FakeAnthropic) -> None:
    async with serve(fake, drop_unsupported_params=True) as (_, client):
        with trio.fail_after(GUARD):
            completion = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                seed=42,
                presence_penalty=0.5,
                logprobs=True,
            )
    assert completion.choices[0].message.content == "echo: x"
    assert not {"seed", "presence_penalty", "logprobs"} & set(sent(fake)[-1].json)


async def test_sampling_depends_on_the_configured_version(fake: FakeAnthropic) -> None:
    # 2023-06-01 (the default): temperature is passed; out of Anthropic's range it is a 400.
    async with serve(fake) as (_, client):
        with trio.fail_after(GUARD):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=0.25
            )
            assert sent(fake)[-1].headers["anthropic-version"] == "2023-06-01"
            assert sent(fake)[-1].json["temperature"] == 0.25
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=1.5
                )
            assert info.value.param == "temperature"  # type: ignore[attr-defined]
    # 2026-10-21 has no sampling parameters: the neutral value is dropped (the fake would
    # refuse the field), any other value is a 400 from the gateway.
    async with serve(fake, anthropic_version="2026-10-21") as (_, client):
        with trio.fail_after(GUARD):
            completion = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "y"}], temperature=1, top_p=1
            )
            assert completion.choices[0].message.content == "echo: y"
            assert sent(fake)[-1].headers["anthropic-version"] == "2026-10-21"
            assert "temperature" not in sent(fake)[-1].json
            calls = len(sent(fake))
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "y"}], temperature=0.5
                )
            assert info.value.param == "temperature"  # type: ignore[attr-defined]
            assert len(sent(fake)) == calls


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_rate_limit_keeps_429_and_retry_after(
    fake: FakeAnthropic, client: openai.AsyncOpenAI, stream: bool
) -> None:
    fake.push(
        error_reply(
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit",
            headers={"retry-after": "17", "anthropic-ratelimit-tokens-remaining": "0"},
        )
    )
    with trio.fail_after(GUARD), pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=stream
        )
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "17"
    assert info.value.response.headers["anthropic-ratelimit-tokens-remaining"] == "0"
    assert "rate limit" in info.value.message


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_overloaded_529_becomes_503(
    fake: FakeAnthropic, gateway: RunningGateway, client: openai.AsyncOpenAI, stream: bool
) -> None:
    fake.push(error_reply("overloaded_error", "Overloaded"))
    with trio.fail_after(GUARD), pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=stream
        )
    assert info.value.status_code == 503
    assert isinstance(info.value.body, dict)
    assert info.value.body["type"] == "overloaded_error"
    with trio.fail_after(GUARD):
        record = await gateway.records.wait_for(lambda r: r.outcome == "error")
    assert record.status == 503


async def test_upstream_credential_errors_keep_status_but_not_message(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    fake.push(error_reply("authentication_error", "invalid x-api-key sk-ant-provider-secret"))
    with trio.fail_after(GUARD), pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.status_code == 401
    assert PROVIDER_KEY not in info.value.message
    assert PROVIDER_KEY not in info.value.response.text


async def test_context_length_error_has_its_code(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    fake.push(error_reply("invalid_request_error", "prompt is too long: 207791 tokens > 200000"))
    with trio.fail_after(GUARD), pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.code == "context_length_exceeded"  # type: ignore[attr-defined]
    assert "prompt is too long" in info.value.message


async def test_upstream_validation_error_is_relayed(client: openai.AsyncOpenAI) -> None:
    """A request the fake refuses (forced tool use with budget thinking) comes back as the
    fake's 400 with its message."""
    with trio.fail_after(GUARD), pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            tools=[WEATHER],
            tool_choice="required",
            reasoning_effort="low",
        )
    assert info.value.status_code == 400
    assert "tool_choice" in info.value.message


MIDSTREAM = json.loads((FIXTURES / "midstream_error.json").read_text())


async def test_midstream_error_raises_in_the_sdk_after_partial_chunks(
    fake: FakeAnthropic, gateway: RunningGateway, client: openai.AsyncOpenAI
) -> None:
    fake.push(Reply.sse(split_events(MIDSTREAM["stream"]), delay=0.02))
    chunks: list[Any] = []
    with trio.fail_after(GUARD):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
        )
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                chunks.append(chunk)
        record = await gateway.records.wait_for(lambda r: r.outcome == "error")
    assert stream_text(chunks) == MIDSTREAM["expect"]["content"]
    assert finish_reasons(chunks) == []
    assert isinstance(info.value.body, dict)
    assert info.value.body["type"] == MIDSTREAM["expect"]["error"]["type"]
    assert record.status == 503
    assert record.stream is True


async def test_midstream_error_is_a_final_error_event_without_done(
    fake: FakeAnthropic, gateway: RunningGateway
) -> None:
    fake.push(Reply.sse(split_events(MIDSTREAM["stream"]), delay=0.02))
    with trio.fail_after(GUARD):
        async with httpx2.AsyncClient() as http:
            response = await http.post(
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer {KEY}"},
                json={
                    "model": MODEL,
                    "stream": True,
                    "messages": [{"role": "user", "content": "x"}],
                },
            )
    assert response.status_code == 200
    events = [e for e in response.content.split(b"\n\n") if e.strip()]
    assert all(e.startswith(b"data: ") for e in events)
    assert b"[DONE]" not in response.content
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert set(last) == {"error"}
    assert last["error"]["type"] == "overloaded_error"
    first = orjson.loads(events[0].removeprefix(b"data: "))
    assert first["object"] == "chat.completion.chunk"


# -- headers ------------------------------------------------------------------------------------


async def test_upstream_headers_and_no_virtual_key_upstream(
    fake: FakeAnthropic, gateway: RunningGateway
) -> None:
    async with httpx2.AsyncClient() as http:
        with trio.fail_after(GUARD):
            for headers in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
                response = await http.post(
                    f"{gateway.base_url}/chat/completions",
                    headers=headers,
                    json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                )
                assert response.status_code == 200, response.text
    for request in sent(fake):
        assert request.headers["x-api-key"] == PROVIDER_KEY
        assert request.headers["anthropic-version"] == "2023-06-01"
        assert request.headers["content-type"] == "application/json"
        assert "authorization" not in request.headers
        assert all(KEY not in value for value in request.headers.values())
        assert KEY.encode() not in request.body


async def test_anthropic_beta_is_merged_and_forwarded(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    client_betas = "interleaved-thinking-2025-05-14, " + CONFIG_BETA
    with trio.fail_after(GUARD):
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"anthropic-beta": client_betas},
        )
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_headers={"anthropic-beta": "fast-mode-2026-02-01"},
        )
        await collect(stream)
    plain, merged, streamed = (
        [b.strip() for b in r.headers["anthropic-beta"].split(",")] for r in sent(fake)
    )
    assert plain == [CONFIG_BETA]
    assert sorted(merged) == sorted([CONFIG_BETA, "interleaved-thinking-2025-05-14"])
    assert sorted(streamed) == sorted([CONFIG_BETA, "fast-mode-2026-02-01"])


async def test_no_beta_header_without_betas(fake: FakeAnthropic) -> None:
    async with serve(fake, anthropic_beta=[]) as (_, client):
        with trio.fail_after(GUARD):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}]
            )
    assert "anthropic-beta" not in sent(fake)[-1].headers


# -- cancellation ---------------------------------------------------------------------------


async def test_client_leaving_mid_stream_closes_the_upstream(
    fake: FakeAnthropic, gateway: RunningGateway, client: openai.AsyncOpenAI
) -> None:
    answer = {
        "id": "msg_fake_long", "type": "message", "role": "assistant", "model": MODEL,
        "content": [{"type": "text", "text": "first second third fourth fifth"}],
        "stop_reason": "end_turn", "stop_sequence": None, "stop_details": None,
        "usage": {"input_tokens": 1, "output_tokens": 5},
    }  # fmt: skip
    events = message_stream_events(answer)
    # Everything up to the middle of the text, then the upstream hangs.
    fake.push(Reply.stream_then_stall(events[:6]))
    received = ""
    with trio.fail_after(GUARD):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
        )
        async for chunk in stream:
            received += "".join(c.delta.content or "" for c in chunk.choices)
            if "second" in received:
                break
        await stream.close()
        request = sent(fake)[0]
        await fake.wait_closed(request)
        record = await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
    assert request.connection_id in fake.closed_by_client
    assert record.status == 499
    assert record.connection == "claude"
    assert record.stream is True
    assert fake.active_replies == 0


# -- models -------------------------------------------------------------------------------------


async def test_expand_wildcards_lists_the_upstreams_models() -> None:
    models = ["claude-sonnet-4-6", "claude-opus-4-7", "other-vendor-model"]
    async with open_fake_anthropic(models=models, api_keys=[PROVIDER_KEY]) as fake:
        config = {
            "connections": {
                "conn": {"api_type": "anthropic", "api_base": fake.base_url,
                         "api_key": PROVIDER_KEY}
            },
            "routing": {"claude*": "conn.*"},
            "groups": {"default": {"api_keys": [KEY]}},
            "model_listing_mode": "expand_wildcards",
        }  # fmt: skip
        async with (
            run_gateway(config) as gateway,
            openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0) as sdk,
        ):
            with trio.fail_after(GUARD):
                listed = [m async for m in sdk.models.list()]
                one = await sdk.models.retrieve("claude-opus-4-7")
    assert [m.id for m in listed] == ["claude-sonnet-4-6", "claude-opus-4-7"]
    created = int(datetime.fromisoformat(MODEL_CREATED_AT.replace("Z", "+00:00")).timestamp())
    assert all(m.created == created for m in listed)
    assert all(m.owned_by == "anthropic" for m in listed)
    assert one.id == "claude-opus-4-7"
    listing = [r for r in fake.requests if r.path.startswith("/v1/models")]
    assert listing
    assert all(r.method == "GET" for r in listing)
    assert all(r.headers["x-api-key"] == PROVIDER_KEY for r in listing)
    assert all("anthropic-version" in r.headers for r in listing)
