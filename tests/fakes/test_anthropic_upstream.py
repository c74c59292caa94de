"""Tests of the fake Anthropic upstream, with the official ``anthropic`` SDK (on trio) as client.

The SDK client runs with ``_strict_response_validation=True``, so every answer is validated
against the SDK's pydantic models (``Message``, the stream event union, ``ModelInfo``...)
instead of being constructed leniently: the fake must speak exactly what the SDK expects.

The second half checks the golden transcripts in ``tests/fixtures/anthropic``: responses and
stream events validate as the SDK's types, the stream accumulates (through the SDK's own
stream helper) to the non-streaming response, and ``expect`` follows from both by the rules
of translation.md (a small reference translation is spelled out below).

Waiting is on events only, under ``trio.fail_after``; no sleeps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import orjson
import pydantic
import pytest
import trio
from anthropic import AsyncAnthropic
from anthropic.types import (
    Message,
    MessageTokensCount,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingConfigEnabledParam,
    ToolParam,
    ToolUseBlock,
)
from anthropic.types.shared import ErrorResponse

from lm_gateway.wire.sse import SSEDecoder

from .anthropic_upstream import (
    ANTHROPIC_VERSION,
    DEFAULT_MODELS,
    ERROR_STATUS,
    LEGACY_ANTHROPIC_VERSION,
    PING,
    TOOL_USE_ID,
    FakeAnthropic,
    anthropic_error,
    anthropic_event,
    error_reply,
    message_stream_events,
    open_fake_anthropic,
    thinking_signature,
)
from .openai_upstream import Reply

GUARD = 5.0
MODEL = "claude-sonnet-4-6"
USER_TEXT = "say hello to the world"
ANSWER = "echo: " + USER_TEXT  # 6 words
MESSAGES: list[Any] = [{"role": "user", "content": USER_TEXT}]
SEARCH_TOOL: ToolParam = {
    "name": "search",
    "description": "Search the web.",
    "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
}
LOOKUP_TOOL: ToolParam = {"name": "lookup", "input_schema": {"type": "object", "properties": {}}}
FIXTURES = Path(__file__).parent.parent / "fixtures" / "anthropic"
STREAM_EVENT: pydantic.TypeAdapter[RawMessageStreamEvent] = pydantic.TypeAdapter(
    RawMessageStreamEvent
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with open_fake_anthropic() as server:
        yield server
    assert server.errors == []


def client_for(fake: FakeAnthropic, **options: Any) -> AsyncAnthropic:
    return AsyncAnthropic(
        base_url=fake.base_url,
        api_key=options.pop("api_key", "x"),
        max_retries=0,
        _strict_response_validation=True,
        **options,
    )


@pytest.fixture
async def sdk(fake: FakeAnthropic) -> AsyncIterator[AsyncAnthropic]:
    client = client_for(fake)
    yield client
    await client.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient() as client:
        yield client


def decode_sse(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) of every event in ``raw``, via the gateway's decoder."""
    decoder = SSEDecoder()
    events = decoder.feed(raw) + decoder.close()
    return [(event.event, orjson.loads(event.data)) for event in events]


def dumps(blocks: list[Any]) -> list[dict[str, Any]]:
    """Content blocks as plain dicts (the stream helper returns Parsed* subclasses)."""
    return [block.model_dump(exclude={"parsed_output"}) for block in blocks]


def split_events(stream: str) -> list[bytes]:
    """An SSE transcript as one chunk per event (for ``Reply.sse``)."""
    return [part.encode() + b"\n\n" for part in stream.split("\n\n") if part]


# -- non-streaming ------------------------------------------------------------------------


async def test_text_answer_parses_as_message(fake: FakeAnthropic, sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        message = await sdk.messages.create(
            model=MODEL, max_tokens=100, system="Be terse.", messages=MESSAGES
        )
    assert isinstance(message, Message)
    assert message.content == [TextBlock(type="text", text=ANSWER)]
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert message.model == MODEL
    assert message.id.startswith("msg_")
    assert message.usage.input_tokens == 2 + 5  # system + user words
    assert message.usage.output_tokens == 6
    assert message.usage.cache_read_input_tokens == 0
    assert message.usage.cache_creation_input_tokens == 0
    assert message._request_id is not None
    assert message._request_id.startswith("req_")

    request = fake.requests[0]
    assert (request.method, request.path) == ("POST", "/v1/messages")
    assert request.headers["authorization"] == "Bearer x"
    assert "x-api-key" not in request.headers
    assert request.headers["anthropic-version"] == ANTHROPIC_VERSION
    assert request.json == {
        "model": MODEL,
        "max_tokens": 100,
        "system": "Be terse.",
        "messages": MESSAGES,
    }


async def test_cache_counts_are_reported(fake: FakeAnthropic, sdk: AsyncAnthropic) -> None:
    fake.cache_read_input_tokens = 2048
    fake.cache_creation_input_tokens = 100
    with trio.fail_after(GUARD):
        message = await sdk.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert message.usage.input_tokens == 5
    assert message.usage.cache_read_input_tokens == 2048
    assert message.usage.cache_creation_input_tokens == 100
    assert message.usage.cache_creation is not None
    assert message.usage.cache_creation.ephemeral_5m_input_tokens == 100


async def test_content_blocks_and_system_blocks_count_as_text(sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        message = await sdk.messages.create(
            model=MODEL,
            max_tokens=100,
            system=[{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
            messages=[
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": [{"type": "text", "text": USER_TEXT}]},
            ],
        )
    assert message.content == [TextBlock(type="text", text=ANSWER)]
    assert message.usage.input_tokens == 2 + 2 + 2 + 5


# -- streaming ----------------------------------------------------------------------------


async def test_stream_helper_accumulates_the_same_message(sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        whole = await sdk.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
        async with sdk.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
            texts = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
    assert "".join(texts) == ANSWER
    assert len(texts) == 6  # one delta per word
    assert final.model_dump(exclude={"id"}) == whole.model_dump(exclude={"id"})


async def test_raw_stream_events_validate(fake: FakeAnthropic, sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        stream = await sdk.messages.create(
            model=MODEL, max_tokens=100, messages=MESSAGES, stream=True
        )
        events = [event async for event in stream]
    assert fake.requests[0].json["stream"] is True
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 6,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start, block_start, *deltas, block_stop, message_delta, message_stop = events
    assert isinstance(start, RawMessageStartEvent)
    assert start.message.content == []
    assert start.message.stop_reason is None
    assert start.message.usage.input_tokens == 5
    assert start.message.usage.output_tokens == 1
    assert isinstance(block_start, RawContentBlockStartEvent)
    assert block_start.content_block == TextBlock(type="text", text="")
    text_deltas = [
        d.delta
        for d in deltas
        if isinstance(d, RawContentBlockDeltaEvent) and isinstance(d.delta, TextDelta)
    ]
    assert len(text_deltas) == len(deltas)
    assert "".join(d.text for d in text_deltas) == ANSWER
    assert isinstance(block_stop, RawContentBlockStopEvent)
    assert isinstance(message_delta, RawMessageDeltaEvent)
    assert message_delta.delta.stop_reason == "end_turn"
    # cumulative, not an increment
    assert message_delta.usage.output_tokens == 6
    assert message_delta.usage.input_tokens == 5
    assert isinstance(message_stop, RawMessageStopEvent)


async def test_stream_wire_framing(fake: FakeAnthropic, http: httpx2.AsyncClient) -> None:
    with trio.fail_after(GUARD):
        response = await http.post(
            fake.base_url + "/v1/messages",
            headers={"x-api-key": "k", "anthropic-version": ANTHROPIC_VERSION},
            json={"model": MODEL, "max_tokens": 100, "messages": MESSAGES, "stream": True},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["request-id"].startswith("req_")
    events = decode_sse(response.content)
    for name, data in events:
        assert name == data["type"]  # every event is named, and the name repeats the type
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert PING in response.content


# -- tools --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        (None, "search"),
        ({"type": "auto"}, "search"),
        ({"type": "any", "disable_parallel_tool_use": True}, "search"),
        ({"type": "tool", "name": "lookup"}, "lookup"),
        ({"type": "none"}, None),
    ],
)
async def test_tool_choice(
    sdk: AsyncAnthropic, tool_choice: dict[str, Any] | None, expected: str | None
) -> None:
    extra: dict[str, Any] = {} if tool_choice is None else {"tool_choice": tool_choice}
    with trio.fail_after(GUARD):
        message = await sdk.messages.create(
            model=MODEL,
            max_tokens=100,
            messages=MESSAGES,
            tools=[SEARCH_TOOL, LOOKUP_TOOL],
            **extra,
        )
    if expected is None:
        assert message.content == [TextBlock(type="text", text=ANSWER)]
        assert message.stop_reason == "end_turn"
        return
    assert message.content == [
        ToolUseBlock(type="tool_use", id=TOOL_USE_ID, name=expected, input={"q": USER_TEXT})
    ]
    assert message.stop_reason == "tool_use"
    assert message.usage.output_tokens == len(json.dumps({"q": USER_TEXT}).split())


async def test_tool_use_streams_as_input_json_deltas(sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        async with sdk.messages.stream(
            model=MODEL, max_tokens=100, messages=MESSAGES, tools=[SEARCH_TOOL]
        ) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert len(starts) == 1
    assert starts[0].content_block == ToolUseBlock(
        type="tool_use", id=TOOL_USE_ID, name="search", input={}
    )
    fragments = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert fragments[0] == ""
    assert len(fragments) > 2
    assert json.loads("".join(fragments)) == {"q": USER_TEXT}
    assert final.content == [
        ToolUseBlock(type="tool_use", id=TOOL_USE_ID, name="search", input={"q": USER_TEXT})
    ]
    assert final.stop_reason == "tool_use"


def tool_turn(result: str = "42 results", **tool_result: Any) -> list[Any]:
    return [
        *MESSAGES,
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Searching."},
                {"type": "tool_use", "id": TOOL_USE_ID, "name": "search", "input": {"q": "x"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": TOOL_USE_ID,
                    "content": result,
                    **tool_result,
                }
            ],
        },
    ]


async def test_tool_loop_ends_with_text(sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        message = await sdk.messages.create(
            model=MODEL, max_tokens=100, messages=tool_turn(is_error=True), tools=[SEARCH_TOOL]
        )
    assert message.content == [TextBlock(type="text", text="echo: 42 results")]
    assert message.stop_reason == "end_turn"


@pytest.mark.parametrize(
    ("messages", "wording"),
    [
        ([*tool_turn()[:2], {"role": "user", "content": "no result"}], "without `tool_result`"),
        (
            [
                *MESSAGES,
                {"role": "assistant", "content": "ok"},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"}],
                },
            ],
            "unexpected `tool_use_id`",
        ),
        (
            [
                *MESSAGES,
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "tool_use",
                            "id": "functions.Bash:0",
                            "name": "search",
                            "input": {},
                        }
                    ],
                },
            ],
            "tool_use.id: String should match pattern",
        ),
    ],
)
async def test_tool_history_is_checked(
    sdk: AsyncAnthropic, messages: list[Any], wording: str
) -> None:
    with trio.fail_after(GUARD), pytest.raises(anthropic.BadRequestError) as caught:
        await sdk.messages.create(model=MODEL, max_tokens=100, messages=messages)
    assert caught.value.type == "invalid_request_error"
    assert wording in str(caught.value.api_message)


# -- thinking -----------------------------------------------------------------------------


THINKING: ThinkingConfigEnabledParam = {"type": "enabled", "budget_tokens": 1024}
THOUGHT = "thinking about: " + USER_TEXT  # 7 words


async def test_thinking_block_comes_first_with_signature(sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        message = await sdk.messages.create(
            model=MODEL, max_tokens=2048, messages=MESSAGES, thinking=THINKING
        )
    assert message.content == [
        ThinkingBlock(type="thinking", thinking=THOUGHT, signature=thinking_signature(THOUGHT)),
        TextBlock(type="text", text=ANSWER),
    ]
    assert message.usage.output_tokens == 7 + 6
    assert message.usage.output_tokens_details is not None
    assert message.usage.output_tokens_details.thinking_tokens == 7


async def test_thinking_streams_deltas_then_signature(sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        whole = await sdk.messages.create(
            model=MODEL, max_tokens=2048, messages=MESSAGES, thinking=THINKING
        )
        async with sdk.messages.stream(
            model=MODEL, max_tokens=2048, messages=MESSAGES, thinking=THINKING
        ) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_message()
    deltas = [e.delta for e in events if e.type == "content_block_delta" and e.index == 0]
    assert [d.type for d in deltas] == ["thinking_delta"] * 7 + ["signature_delta"]
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == THOUGHT
    assert dumps(final.content) == dumps(whole.content)


async def test_signed_thinking_round_trips(sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        first = await sdk.messages.create(
            model=MODEL,
            max_tokens=2048,
            messages=MESSAGES,
            thinking={"type": "adaptive"},
            tools=[SEARCH_TOOL],
        )
        assert [block.type for block in first.content] == ["thinking", "tool_use"]
        follow_up = [
            *MESSAGES,
            first.to_param(),
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": TOOL_USE_ID, "content": "found"}
                ],
            },
        ]
        second = await sdk.messages.create(
            model=MODEL,
            max_tokens=2048,
            messages=follow_up,
            thinking={"type": "adaptive"},
            tools=[SEARCH_TOOL],
        )
    assert [block.type for block in second.content] == ["thinking", "text"]
    assert second.content[1] == TextBlock(type="text", text="echo: found")


@pytest.mark.parametrize("mutation", ["tamper", "drop"])
async def test_thinking_must_come_back_verbatim(sdk: AsyncAnthropic, mutation: str) -> None:
    with trio.fail_after(GUARD):
        first = await sdk.messages.create(
            model=MODEL, max_tokens=2048, messages=MESSAGES, thinking=THINKING, tools=[SEARCH_TOOL]
        )
    blocks: list[Any] = [block.model_dump(exclude_none=True) for block in first.content]
    if mutation == "tamper":
        blocks[0]["thinking"] += " (edited)"
    else:
        del blocks[0]
    follow_up = [
        *MESSAGES,
        {"role": "assistant", "content": blocks},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": TOOL_USE_ID}]},
    ]
    with trio.fail_after(GUARD), pytest.raises(anthropic.BadRequestError) as caught:
        await sdk.messages.create(
            model=MODEL, max_tokens=2048, messages=follow_up, thinking=THINKING, tools=[SEARCH_TOOL]
        )
    wording = "Invalid `signature`" if mutation == "tamper" else "Expected `thinking`"
    assert wording in str(caught.value.api_message)


async def test_omitted_thinking_keeps_its_signature(sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        message = await sdk.messages.create(
            model=MODEL,
            max_tokens=2048,
            messages=MESSAGES,
            thinking={"type": "enabled", "budget_tokens": 1024, "display": "omitted"},
        )
    assert message.content[0] == ThinkingBlock(
        type="thinking", thinking="", signature=thinking_signature("")
    )
    assert message.usage.output_tokens_details is not None
    assert message.usage.output_tokens_details.thinking_tokens == 7


@pytest.mark.parametrize(
    ("extra", "wording"),
    [
        ({"max_tokens": 1024}, "must be greater than `thinking.budget_tokens`"),
        (
            {"max_tokens": 2048, "tools": [SEARCH_TOOL], "tool_choice": {"type": "any"}},
            "tool_choice forces tool use",
        ),
    ],
)
async def test_manual_thinking_constraints(
    sdk: AsyncAnthropic, extra: dict[str, Any], wording: str
) -> None:
    with trio.fail_after(GUARD), pytest.raises(anthropic.BadRequestError) as caught:
        await sdk.messages.create(model=MODEL, messages=MESSAGES, thinking=THINKING, **extra)
    assert wording in str(caught.value.api_message)


async def test_adaptive_thinking_with_forced_tool_skips_thinking(sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        message = await sdk.messages.create(
            model=MODEL,
            max_tokens=100,
            messages=MESSAGES,
            thinking={"type": "adaptive"},
            tools=[SEARCH_TOOL],
            tool_choice={"type": "tool", "name": "search"},
        )
    assert [block.type for block in message.content] == ["tool_use"]


# -- stop conditions ----------------------------------------------------------------------


async def test_max_tokens_truncates(sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        whole = await sdk.messages.create(model=MODEL, max_tokens=3, messages=MESSAGES)
        async with sdk.messages.stream(model=MODEL, max_tokens=3, messages=MESSAGES) as stream:
            final = await stream.get_final_message()
    assert whole.content == [TextBlock(type="text", text="echo: say hello")]
    assert whole.stop_reason == "max_tokens"
    assert whole.usage.output_tokens == 3
    assert final.model_dump(exclude={"id"}) == whole.model_dump(exclude={"id"})


async def test_stop_sequences(sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        message = await sdk.messages.create(
            model=MODEL, max_tokens=100, messages=MESSAGES, stop_sequences=["nothing", "world"]
        )
        async with sdk.messages.stream(
            model=MODEL, max_tokens=100, messages=MESSAGES, stop_sequences=["world"]
        ) as stream:
            final = await stream.get_final_message()
    assert message.content == [TextBlock(type="text", text="echo: say hello to the ")]
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "world"
    assert message.usage.output_tokens == 5
    assert final.stop_reason == "stop_sequence"
    assert final.stop_sequence == "world"
    assert dumps(final.content) == dumps(message.content)


# -- structured output --------------------------------------------------------------------


class Weather(pydantic.BaseModel):
    city: str
    temperature_c: float
    rainy: bool


async def test_output_config_format_answers_json(fake: FakeAnthropic, sdk: AsyncAnthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    with trio.fail_after(GUARD):
        message = await sdk.messages.create(
            model=MODEL,
            max_tokens=100,
            messages=MESSAGES,
            output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
        )
        parsed = await sdk.messages.parse(
            model=MODEL, max_tokens=100, messages=MESSAGES, output_format=Weather
        )
    assert isinstance(message.content[0], TextBlock)
    assert json.loads(message.content[0].text) == {"city": USER_TEXT, "unit": "C"}
    assert parsed.parsed_output == Weather(city=USER_TEXT, temperature_c=0, rainy=False)
    assert fake.requests[1].json["output_config"]["format"]["type"] == "json_schema"


# -- other endpoints ----------------------------------------------------------------------


async def test_count_tokens(fake: FakeAnthropic, sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        count = await sdk.messages.count_tokens(model=MODEL, system="Be terse.", messages=MESSAGES)
    assert count == MessageTokensCount(input_tokens=7)
    assert fake.requests[0].path == "/v1/messages/count_tokens"


async def test_models(sdk: AsyncAnthropic) -> None:
    with trio.fail_after(GUARD):
        models = [model async for model in sdk.models.list()]
        one = await sdk.models.retrieve("claude-opus-4-7")
        with pytest.raises(anthropic.NotFoundError):
            await sdk.models.retrieve("claude-nonexistent")
    assert [model.id for model in models] == list(DEFAULT_MODELS)
    assert one.id == "claude-opus-4-7"
    assert one.type == "model"


# -- request validation -------------------------------------------------------------------


async def post(
    http: httpx2.AsyncClient, fake: FakeAnthropic, body: Any, headers: dict[str, str]
) -> httpx2.Response:
    with trio.fail_after(GUARD):
        return await http.post(fake.base_url + "/v1/messages", headers=headers, json=body)


def assert_error(response: httpx2.Response, status: int, type: str) -> ErrorResponse:
    assert response.status_code == status
    error = ErrorResponse.model_validate(response.json())
    assert error.error.type == type
    assert error.request_id == response.headers["request-id"]
    return error


@pytest.mark.parametrize(
    ("headers", "status", "type"),
    [
        ({"anthropic-version": ANTHROPIC_VERSION}, 401, "authentication_error"),
        (
            {"authorization": "Basic abc", "anthropic-version": ANTHROPIC_VERSION},
            401,
            "authentication_error",
        ),
        ({"x-api-key": "k"}, 400, "invalid_request_error"),
        ({"x-api-key": "k", "anthropic-version": "2024-01-01"}, 400, "invalid_request_error"),
        ({"x-api-key": "k", "anthropic-version": LEGACY_ANTHROPIC_VERSION}, 200, None),
        ({"authorization": "Bearer k", "anthropic-version": ANTHROPIC_VERSION}, 200, None),
    ],
)
async def test_headers_are_required(
    fake: FakeAnthropic,
    http: httpx2.AsyncClient,
    headers: dict[str, str],
    status: int,
    type: str | None,
) -> None:
    body = {"model": MODEL, "max_tokens": 10, "messages": MESSAGES}
    response = await post(http, fake, body, headers)
    if type is None:
        assert response.status_code == status
        Message.model_validate(response.json())
    else:
        assert_error(response, status, type)


async def test_api_keys_are_checked_and_x_api_key_wins(http: httpx2.AsyncClient) -> None:
    body = {"model": MODEL, "max_tokens": 10, "messages": MESSAGES}
    version = {"anthropic-version": ANTHROPIC_VERSION}
    async with open_fake_anthropic(api_keys=["sk-good"]) as fake:
        client = client_for(fake, api_key="sk-bad")
        with trio.fail_after(GUARD), pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
        await client.close()
        good = await post(http, fake, body, {"x-api-key": "sk-good", **version})
        both = await post(
            http, fake, body, {"x-api-key": "sk-bad", "authorization": "Bearer sk-good", **version}
        )
    assert good.status_code == 200
    assert_error(both, 401, "authentication_error")


@pytest.mark.parametrize(
    ("messages", "wording"),
    [
        ([{"role": "assistant", "content": "hi"}], 'first message must use the "user" role'),
        ([*MESSAGES, *MESSAGES], 'found multiple "user" roles in a row'),
        ([{"role": "system", "content": "x"}, *MESSAGES], "role: Input should be"),
        ([{"role": "user", "content": ""}], "must have non-empty content"),
        ([{"role": "user", "content": [{"type": "text", "text": ""}]}], "must be non-empty"),
        ([], "at least one message"),
    ],
)
async def test_message_structure_is_checked(
    sdk: AsyncAnthropic, messages: list[Any], wording: str
) -> None:
    with trio.fail_after(GUARD), pytest.raises(anthropic.BadRequestError) as caught:
        await sdk.messages.create(model=MODEL, max_tokens=10, messages=messages)
    assert caught.value.type == "invalid_request_error"
    assert wording in str(caught.value.api_message)


async def test_lenient_roles() -> None:
    async with open_fake_anthropic(strict_roles=False) as fake:
        client = client_for(fake)
        with trio.fail_after(GUARD):
            message = await client.messages.create(
                model=MODEL,
                max_tokens=10,
                messages=[{"role": "system", "content": "x"}, *MESSAGES, *MESSAGES],
            )
        await client.close()
    assert message.stop_reason == "end_turn"


async def test_missing_fields_and_unknown_fields(
    fake: FakeAnthropic, http: httpx2.AsyncClient
) -> None:
    headers = {"x-api-key": "k", "anthropic-version": ANTHROPIC_VERSION}
    missing = await post(http, fake, {"model": MODEL, "messages": MESSAGES}, headers)
    openai_field = await post(
        http, fake, {"model": MODEL, "max_tokens": 1, "messages": MESSAGES, "n": 2}, headers
    )
    not_json = await http.post(fake.base_url + "/v1/messages", headers=headers, content=b"{")
    assert (
        "max_tokens: Field required"
        in assert_error(missing, 400, "invalid_request_error").error.message
    )
    assert (
        "n: Extra inputs are not permitted"
        in assert_error(openai_field, 400, "invalid_request_error").error.message
    )
    assert_error(not_json, 400, "invalid_request_error")


@pytest.mark.parametrize("param", [{"temperature": 1.0}, {"top_p": 0.5}, {"top_k": 5}])
async def test_sampling_params_depend_on_version(
    fake: FakeAnthropic, param: dict[str, Any]
) -> None:
    current = client_for(fake)
    legacy = client_for(fake, default_headers={"anthropic-version": LEGACY_ANTHROPIC_VERSION})
    with trio.fail_after(GUARD):
        with pytest.raises(anthropic.BadRequestError) as caught:
            await current.messages.create(
                model=MODEL, max_tokens=10, messages=MESSAGES, extra_body=param
            )
        accepted = await legacy.messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES, extra_body=param
        )
        with pytest.raises(anthropic.BadRequestError):
            await legacy.messages.create(
                model=MODEL, max_tokens=10, messages=MESSAGES, extra_body={"temperature": 1.5}
            )
    await current.close()
    await legacy.close()
    name = next(iter(param))
    assert caught.value.api_message == f"{name}: Extra inputs are not permitted"
    assert accepted.stop_reason == "end_turn"
    assert fake.requests[1].headers["anthropic-version"] == LEGACY_ANTHROPIC_VERSION


PNG = (  # a 1x1 transparent PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


@pytest.mark.parametrize(
    ("source", "ok"),
    [
        ({"type": "base64", "media_type": "image/png", "data": PNG}, True),
        ({"type": "url", "url": "https://example.com/cat.jpg"}, True),
        ({"type": "base64", "media_type": "image/bmp", "data": PNG}, False),
        ({"type": "base64", "media_type": "image/png", "data": "not base64!"}, False),
        ({"type": "url", "url": "data:image/png;base64," + PNG}, False),
    ],
)
async def test_image_sources(sdk: AsyncAnthropic, source: dict[str, Any], ok: bool) -> None:
    messages: list[Any] = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "what?"}, {"type": "image", "source": source}],
        }
    ]
    with trio.fail_after(GUARD):
        if ok:
            message = await sdk.messages.create(model=MODEL, max_tokens=10, messages=messages)
            assert message.content == [TextBlock(type="text", text="echo: what?")]
            return
        with pytest.raises(anthropic.BadRequestError):
            await sdk.messages.create(model=MODEL, max_tokens=10, messages=messages)


async def test_document_in_assistant_message_is_rejected(sdk: AsyncAnthropic) -> None:
    document = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "d"},
    }
    messages: list[Any] = [*MESSAGES, {"role": "assistant", "content": [document]}, *MESSAGES]
    with trio.fail_after(GUARD), pytest.raises(anthropic.BadRequestError) as caught:
        await sdk.messages.create(model=MODEL, max_tokens=10, messages=messages)
    assert "document blocks are not allowed" in str(caught.value.api_message)


async def test_tool_definitions_are_checked(sdk: AsyncAnthropic) -> None:
    bad_name: ToolParam = {"name": "my.tool", "input_schema": {"type": "object"}}
    with trio.fail_after(GUARD), pytest.raises(anthropic.BadRequestError) as caught:
        await sdk.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES, tools=[bad_name])
    assert "String should match pattern" in str(caught.value.api_message)


async def test_unknown_path_is_not_found(fake: FakeAnthropic, http: httpx2.AsyncClient) -> None:
    with trio.fail_after(GUARD):
        response = await http.post(fake.base_url + "/v1/chat/completions", json={})
    assert_error(response, 404, "not_found_error")


# -- scripted errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type", "exception"),
    [
        ("overloaded_error", anthropic.OverloadedError),
        ("rate_limit_error", anthropic.RateLimitError),
        ("request_too_large", anthropic.ContentTooLargeError),
        ("api_error", anthropic.InternalServerError),
        ("permission_error", anthropic.PermissionDeniedError),
    ],
)
async def test_scripted_errors_map_to_sdk_exceptions(
    fake: FakeAnthropic, sdk: AsyncAnthropic, type: str, exception: type[Exception]
) -> None:
    headers = {"retry-after": "7", "anthropic-ratelimit-requests-remaining": "0"}
    fake.push(error_reply(type, "Nope", headers=headers))
    with trio.fail_after(GUARD), pytest.raises(exception) as caught:
        await sdk.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    error = caught.value
    assert isinstance(error, anthropic.APIStatusError)
    assert error.status_code == ERROR_STATUS[type]
    assert error.type == type
    assert error.request_id == "req_fake_scripted"
    assert error.response.headers["retry-after"] == "7"
    assert error.response.headers["anthropic-ratelimit-requests-remaining"] == "0"


async def test_midstream_error_event(fake: FakeAnthropic, sdk: AsyncAnthropic) -> None:
    events = message_stream_events(
        {
            "id": "msg_x",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [{"type": "text", "text": "partial answer"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 2},
        }
    )
    cut = [*events[:5], anthropic_event("error", anthropic_error("overloaded_error", "Overloaded"))]
    fake.push(Reply.sse(cut))
    received: list[str] = []
    with trio.fail_after(GUARD), pytest.raises(anthropic.APIStatusError) as caught:
        async with sdk.messages.stream(model=MODEL, max_tokens=10, messages=MESSAGES) as stream:
            async for text in stream.text_stream:
                received.append(text)
    assert "".join(received) == "partial answer"
    assert caught.value.status_code == 200
    assert caught.value.type == "overloaded_error"


# -- golden transcripts -------------------------------------------------------------------

FIXTURE_FILES = sorted(FIXTURES.glob("*.json"))
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def usage_view(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI usage from Anthropic usage (translation.md 14)."""
    prompt = (
        usage.get("input_tokens", 0)
        + (usage.get("cache_read_input_tokens") or 0)
        + (usage.get("cache_creation_input_tokens") or 0)
    )
    completion = usage["output_tokens"]
    view = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": usage.get("cache_read_input_tokens") or 0,
    }
    details = usage.get("output_tokens_details")
    if details is not None:
        view["reasoning_tokens"] = details["thinking_tokens"]
    return view


def openai_view(
    blocks: list[dict[str, Any]],
    stop_reason: str | None,
    usage: dict[str, Any],
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the OpenAI-side answer must say, by translation.md 12-14 and 19."""
    texts = [b["text"] for b in blocks if b["type"] == "text"]
    thoughts = [b["thinking"] for b in blocks if b["type"] == "thinking"]
    return {
        "content": "".join(texts) if texts else None,
        "reasoning_content": "".join(thoughts) if thoughts else None,
        "tool_calls": [
            {"id": b["id"], "name": b["name"], "arguments": b["input"]}
            for b in blocks
            if b["type"] == "tool_use"
        ],
        "finish_reason": "error" if error else FINISH_REASONS[str(stop_reason)],
        "usage": usage_view(usage),
        "error": error,
    }


def accumulate(stream: str) -> dict[str, Any]:
    """Fold a raw event stream into the OpenAI view, independently of the SDK: blocks by
    index, tool input from the JSON fragments, usage *set* (never added) from
    message_start then message_delta."""
    blocks: dict[int, dict[str, Any]] = {}
    fragments: dict[int, str] = {}
    usage: dict[str, Any] = {}
    stop_reason: str | None = None
    error: dict[str, Any] | None = None
    for name, data in decode_sse(stream.encode()):
        if name == "message_start":
            usage = dict(data["message"]["usage"])
        elif name == "content_block_start":
            blocks[data["index"]] = dict(data["content_block"])
        elif name == "content_block_delta":
            block, delta = blocks[data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                fragments[data["index"]] = fragments.get(data["index"], "") + delta["partial_json"]
        elif name == "message_delta":
            stop_reason = data["delta"]["stop_reason"]
            usage.update({k: v for k, v in data["usage"].items() if v is not None})
        elif name == "error":
            kind = data["error"]["type"]
            error = {"status": ERROR_STATUS[kind], "type": kind}
    for index, text in fragments.items():
        blocks[index]["input"] = json.loads(text or "{}")
    ordered = [blocks[i] for i in sorted(blocks)]
    return openai_view(ordered, stop_reason, usage, error)


def test_fixtures_are_all_there() -> None:
    assert {path.stem for path in FIXTURE_FILES} == {
        "text",
        "multi_tool_stream",
        "text_and_tool",
        "empty_args_tool",
        "image_request",
        "json_schema",
        "thinking_with_tool_use",
        "max_tokens_stop",
        "refusal",
        "midstream_error",
    }


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_fixture_validates_as_sdk_types(path: Path) -> None:
    fixture = load(path)
    assert set(fixture) >= {"description", "response", "stream", "expect"}
    if fixture["response"] is not None:
        Message.model_validate(fixture["response"])
    events = decode_sse(fixture["stream"].encode())
    assert fixture["stream"].endswith("\n\n")
    assert events[0][0] == "message_start"
    open_blocks: set[int] = set()
    for name, data in events:
        assert name == data["type"]
        if name == "ping":
            continue
        if name == "error":
            ErrorResponse.model_validate(data)
            assert (name, data) == events[-1]
            continue
        event = STREAM_EVENT.validate_python(data)
        if isinstance(event, RawContentBlockStartEvent):
            assert event.index not in open_blocks
            open_blocks.add(event.index)
        elif isinstance(event, RawContentBlockDeltaEvent):
            assert event.index in open_blocks
        elif isinstance(event, RawContentBlockStopEvent):
            open_blocks.remove(event.index)


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_fixture_expect_follows_from_response_and_stream(path: Path) -> None:
    fixture = load(path)
    expect = {key: value for key, value in fixture["expect"].items() if key != "thinking_blocks"}
    assert accumulate(fixture["stream"]) == expect
    response = fixture["response"]
    if response is not None:
        assert (
            openai_view(response["content"], response["stop_reason"], response["usage"]) == expect
        )
    if "thinking_blocks" in fixture["expect"]:
        assert response is not None
        signed = [b for b in response["content"] if b["type"] in {"thinking", "redacted_thinking"}]
        assert fixture["expect"]["thinking_blocks"] == signed


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
async def test_fixture_stream_accumulates_to_response_in_the_sdk(
    fake: FakeAnthropic, sdk: AsyncAnthropic, path: Path
) -> None:
    fixture = load(path)
    fake.push(Reply.sse(split_events(fixture["stream"])))
    with trio.fail_after(GUARD):
        if fixture["response"] is None:
            with pytest.raises(anthropic.APIStatusError) as caught:
                async with sdk.messages.stream(model=MODEL, max_tokens=10, messages=MESSAGES) as s:
                    await s.until_done()
            assert caught.value.type == fixture["expect"]["error"]["type"]
            return
        async with sdk.messages.stream(model=MODEL, max_tokens=10, messages=MESSAGES) as stream:
            final = await stream.get_final_message()
    assert final.model_dump() == Message.model_validate(fixture["response"]).model_dump()


def fixture_requests() -> list[tuple[str, dict[str, Any]]]:
    requests = []
    for path in FIXTURE_FILES:
        fixture = load(path)
        if "anthropic_request" in fixture:
            requests.append((path.stem, fixture["anthropic_request"]))
        if "followup" in fixture:
            requests.append((path.stem + ".followup", fixture["followup"]["anthropic_request"]))
    return requests


@pytest.mark.parametrize(
    ("name", "request_body"), fixture_requests(), ids=lambda v: v if isinstance(v, str) else ""
)
async def test_fixture_requests_are_accepted(
    sdk: AsyncAnthropic, name: str, request_body: dict[str, Any]
) -> None:
    with trio.fail_after(GUARD):
        message = await sdk.messages.create(**request_body)
    assert message.stop_reason in {"end_turn", "tool_use"}
