"""The Google connection end to end: the official ``openai`` SDK -> gateway -> fake Gemini.

Everything is real loopback HTTP: Hypercorn serves the gateway, :class:`FakeGemini` speaks
Gemini's REST dialect and validates each request the way the real API does (unknown fields,
the schema subset, call/response pairing, Gemini 3 thought signatures, Vertex's refusal of
function-call ids), so a request the gateway translates wrongly fails here with the API's own
400. Small extra servers (an image host, an OAuth token endpoint) reuse the fake's h11 core.
"""

from __future__ import annotations

import base64
import functools
import re
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from lm_gateway.wire.gemini import SKIP_SIGNATURE
from tests.conftest import RunningGateway, run_gateway
from tests.fakes.gemini_upstream import (
    THOUGHT_PREFIX,
    FakeGemini,
    gemini_error_reply,
    gemini_json_reply,
    gemini_rate_limit_error,
    gemini_sse,
    open_fake_gemini,
)
from tests.fakes.openai_upstream import FakeOpenAI, RecordedRequest, Reply, serve_fake

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "gemini"
PIXEL_PNG = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8Dw"
    "HwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)
KEY = "sk-virtual-gemini"
PROVIDER_KEY = "AIza-provider-secret"
MODEL = "gemini-2.5-flash"
MODEL3 = "gemini-3-flash-preview"
GUARD = 15
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
SEARCH_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {"q": {"type": "string", "description": "query"}},
            "required": ["q"],
            "additionalProperties": False,
        },
    },
}


# -- servers ---------------------------------------------------------------------------------


def connection_config(fake: FakeGemini, **overrides: Any) -> dict[str, Any]:
    return {
        "api_type": "google",
        "api_base": fake.base_url,
        "api_key": PROVIDER_KEY,
        "read_timeout_seconds": 5,
        **overrides,
    }


def gateway_config(connection: dict[str, Any]) -> dict[str, Any]:
    return {
        "connections": {"gem": connection},
        "routing": {"fast": f"gem.{MODEL}", "gemini*": "gem.*"},
        "groups": {"default": {"api_keys": [KEY]}},
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    async with open_fake_gemini(api_keys={PROVIDER_KEY}) as server:
        yield server
    assert server.errors == []


@pytest.fixture
async def gateway(fake: FakeGemini) -> AsyncIterator[RunningGateway]:
    async with run_gateway(gateway_config(connection_config(fake))) as running:
        yield running


def sdk(gateway: RunningGateway) -> openai.AsyncOpenAI:
    # The SDK's own timeout is the guard of every call (a broken build fails, never hangs).
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0, timeout=GUARD)


@pytest.fixture
async def client(gateway: RunningGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk(gateway) as running:
        yield running


class StaticServer(FakeOpenAI):
    """A loopback HTTP server answering every request with one scripted default reply."""

    def __init__(self, *, port: int, reply: Reply) -> None:
        super().__init__(port=port)
        self.reply = reply

    def default_reply(self, request: RecordedRequest) -> Reply:
        return self.reply


def serve_static(reply: Reply) -> Any:
    return serve_fake(lambda port: StaticServer(port=port, reply=reply))


def load(name: str) -> dict[str, Any]:
    """A golden transcript of tests/fixtures/gemini."""
    data: dict[str, Any] = orjson.loads((FIXTURES / f"{name}.json").read_bytes())
    return data


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def sent(fake: FakeGemini, index: int = -1) -> dict[str, Any]:
    body: dict[str, Any] = fake.requests[index].json
    return body


def assistant_message(message: Any) -> dict[str, Any]:
    """The assistant message as a client sends it back (the SDK object, dumped)."""
    data: dict[str, Any] = message.model_dump(exclude_none=True)
    return data


# ============================================================================================
# Developer API


async def test_text_path_and_headers(fake: FakeGemini, client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="fast", messages=[user("hello there")], temperature=0.2
    )
    assert completion.model == "fast"
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 2
    assert completion.usage.completion_tokens == 3
    assert completion.id == f"chatcmpl-resp-fake-{len(fake.requests)}"

    request = fake.requests[-1]
    assert request.method == "POST"
    assert request.path == f"/v1beta/models/{MODEL}:generateContent"
    assert request.headers["x-goog-api-key"] == PROVIDER_KEY
    assert "authorization" not in request.headers
    assert KEY not in str(request.headers) and KEY not in request.path
    assert "key=" not in request.path
    assert request.json == {
        "contents": [{"role": "user", "parts": [{"text": "hello there"}]}],
        "generationConfig": {"temperature": 0.2},
    }


async def test_system_instruction(fake: FakeGemini, client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer in French please."},
            user("bonjour"),
            {"role": "developer", "content": "Be terse."},
        ],
    )
    assert completion.choices[0].message.content == "echo: bonjour"
    assert sent(fake)["systemInstruction"] == {
        "role": "user",
        "parts": [{"text": "Answer in French please."}, {"text": "Be terse."}],
    }
    assert sent(fake)["contents"] == [{"role": "user", "parts": [{"text": "bonjour"}]}]
    assert completion.usage is not None and completion.usage.prompt_tokens == 1 + 4 + 2


async def test_n_is_candidate_count(fake: FakeGemini, client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=MODEL, messages=[user("two please")], n=2
    )
    assert sent(fake)["generationConfig"] == {"candidateCount": 2}
    assert len(fake.requests) == 1  # Gemini answers n choices itself: no fan-out
    assert [(c.index, c.message.content) for c in completion.choices] == [
        (0, "echo: two please"),
        (1, "echo: two please"),
    ]
    assert completion.usage is not None and completion.usage.completion_tokens == 2 * 3

    stream = await client.chat.completions.create(
        model=MODEL, messages=[user("a b c")], n=2, stream=True
    )
    texts = {0: "", 1: ""}
    finishes = {}
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "echo: a b c", 1: "echo: a b c"}
    assert finishes == {0: "stop", 1: "stop"}


async def test_streaming_text_path_and_usage(fake: FakeGemini, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[user("one two three four five")],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three four five"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6  # the last cumulative count, not a sum
    request = fake.requests[-1]
    assert request.path == f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
    assert request.headers["x-goog-api-key"] == PROVIDER_KEY


async def test_tools_non_stream(fake: FakeGemini, client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=MODEL, messages=[user("find cats")], tools=[SEARCH_TOOL], tool_choice="required"
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "search"  # type: ignore[union-attr]
    assert orjson.loads(call.function.arguments) == {"q": "find cats"}  # type: ignore[union-attr]
    assert call.id.startswith("call_")  # Gemini 2.5 sends no id: the gateway makes one
    request = sent(fake)
    assert request["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    (declaration,) = request["tools"][0]["functionDeclarations"]
    assert declaration["parameters"] == {
        "type": "object",
        "properties": {"q": {"type": "string", "description": "query"}},
        "required": ["q"],
    }  # additionalProperties dropped for the Developer API


async def test_tools_stream(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[user("weather in Paris")], tools=[SEARCH_TOOL], stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                slot = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += delta.id or ""
                if delta.function:
                    slot["name"] += delta.function.name or ""
                    slot["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert list(calls) == [0]
    assert calls[0]["name"] == "search"
    assert orjson.loads(calls[0]["arguments"]) == {"q": "weather in Paris"}
    assert calls[0]["id"].startswith("call_")
    assert finish == "tool_calls"


async def test_tools_through_the_stream_helper(client: openai.AsyncOpenAI) -> None:
    tool = {"type": "function", "function": {**SEARCH_TOOL["function"], "strict": True}}
    async with client.chat.completions.stream(
        model=MODEL,
        messages=[user("trio nurseries")],
        tools=[tool],  # type: ignore[list-item]
    ) as stream:
        events = [event.type async for event in stream]
        final = await stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "search"  # type: ignore[union-attr]
    assert call.function.parsed_arguments == {"q": "trio nurseries"}  # type: ignore[union-attr]


async def test_stream_helper_keeps_the_gemini3_signature_for_the_next_turn(
    fake: FakeGemini, client: openai.AsyncOpenAI
) -> None:
    tool = {"type": "function", "function": {**SEARCH_TOOL["function"], "strict": True}}
    messages: list[Any] = [user("otters")]
    async with client.chat.completions.stream(
        model=MODEL3,
        messages=messages,
        tools=[tool],  # type: ignore[list-item]
        reasoning_effort="medium",
    ) as stream:
        final = await stream.get_final_completion()
    message = final.choices[0].message
    assert message.reasoning_content == THOUGHT_PREFIX + "otters"  # type: ignore[attr-defined]
    (call,) = message.tool_calls or []
    signature = call.model_extra["extra_content"]["google"]["thought_signature"]  # type: ignore[index]
    assert signature in fake.issued_signatures
    messages += [
        assistant_message(message),
        {"role": "tool", "tool_call_id": call.id, "content": "many"},
    ]
    answer = await client.chat.completions.create(model=MODEL3, messages=messages, tools=[tool])  # type: ignore[list-item]
    assert answer.choices[0].message.content == "echo: otters"
    (part,) = sent(fake)["contents"][1]["parts"]
    assert part["thoughtSignature"] == signature


async def test_full_tool_loop(fake: FakeGemini, client: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [user("look up otters")]
    first = await client.chat.completions.create(
        model=MODEL, messages=messages, tools=[SEARCH_TOOL]
    )
    message = first.choices[0].message
    (call,) = message.tool_calls or []
    messages += [
        assistant_message(message),
        {"role": "tool", "tool_call_id": call.id, "content": '{"hits": 3}'},
    ]
    second = await client.chat.completions.create(
        model=MODEL, messages=messages, tools=[SEARCH_TOOL]
    )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "echo: look up otters"
    contents = sent(fake)["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    assert contents[1]["parts"] == [
        {"functionCall": {"name": "search", "args": {"q": "look up otters"}, "id": call.id}}
    ]
    assert contents[2]["parts"] == [
        {"functionResponse": {"name": "search", "response": {"hits": 3}, "id": call.id}}
    ]


async def gemini3_first_turn(
    client: openai.AsyncOpenAI, fake: FakeGemini, *, stream: bool
) -> tuple[list[Any], str]:
    """Ask a Gemini 3 model something it answers with a call; return the history as the client
    would send it next (the assistant message as returned, then the tool result), and the
    signature the fake issued."""
    messages: list[Any] = [user("weather in Oslo")]
    if not stream:
        completion = await client.chat.completions.create(
            model=MODEL3, messages=messages, tools=[SEARCH_TOOL], reasoning_effort="low"
        )
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "tool_calls"
        assert message.reasoning_content == THOUGHT_PREFIX + "weather in Oslo"  # type: ignore[attr-defined]
        assert completion.usage is not None
        assert completion.usage.completion_tokens_details is not None
        assert completion.usage.completion_tokens_details.reasoning_tokens == 5
        returned = assistant_message(message)
    else:
        chunks = await client.chat.completions.create(
            model=MODEL3,
            messages=messages,
            tools=[SEARCH_TOOL],
            reasoning_effort="low",
            stream=True,
        )
        reasoning = ""
        calls: list[dict[str, Any]] = []
        async for chunk in chunks:
            for choice in chunk.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                for delta in choice.delta.tool_calls or []:
                    calls.append(delta.model_dump(exclude_none=True))
        assert reasoning == THOUGHT_PREFIX + "weather in Oslo"
        assert len(calls) == 1
        call = {k: v for k, v in calls[0].items() if k != "index"}
        returned = {"role": "assistant", "content": None, "tool_calls": [call]}
    assert sent(fake)["generationConfig"]["thinkingConfig"] == {
        "thinkingLevel": "LOW",
        "includeThoughts": True,
    }
    (call,) = returned["tool_calls"]
    assert re.fullmatch(r"fc_fake_\d+", call["id"])  # Gemini 3's own id, kept
    signature = call["extra_content"]["google"]["thought_signature"]
    assert signature in fake.issued_signatures
    messages += [returned, {"role": "tool", "tool_call_id": call["id"], "content": "snow, -2 C"}]
    return messages, signature


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
async def test_gemini3_signature_round_trip(
    fake: FakeGemini, client: openai.AsyncOpenAI, stream: bool
) -> None:
    messages, signature = await gemini3_first_turn(client, fake, stream=stream)
    answer = await client.chat.completions.create(
        model=MODEL3, messages=messages, tools=[SEARCH_TOOL], reasoning_effort="low"
    )
    assert fake.requests[-1].json  # the fake validated the signature before answering
    assert answer.choices[0].message.content == "echo: weather in Oslo"
    model_turn = sent(fake)["contents"][1]
    assert model_turn["role"] == "model"
    (part,) = model_turn["parts"]
    assert part["thoughtSignature"] == signature  # back on the very part it came on
    assert part["functionCall"]["id"] == messages[1]["tool_calls"][0]["id"]
    (response,) = sent(fake)["contents"][2]["parts"]
    assert response["functionResponse"] == {
        "name": "search",
        "response": {"result": "snow, -2 C"},
        "id": messages[1]["tool_calls"][0]["id"],
    }


async def test_gemini3_dropped_signature_gets_the_placeholder(
    fake: FakeGemini, client: openai.AsyncOpenAI
) -> None:
    messages, _ = await gemini3_first_turn(client, fake, stream=False)
    messages[1] = {k: v for k, v in messages[1].items() if k != "reasoning_content"}
    for call in messages[1]["tool_calls"]:
        call.pop("extra_content")  # a client that keeps only the standard fields
    assert fake.require_thought_signatures is None  # so: required for gemini-3 models
    answer = await client.chat.completions.create(
        model=MODEL3, messages=messages, tools=[SEARCH_TOOL]
    )
    assert answer.choices[0].message.content == "echo: weather in Oslo"
    (part,) = sent(fake)["contents"][1]["parts"]
    assert part["thoughtSignature"] == SKIP_SIGNATURE


async def test_json_schema(fake: FakeGemini, client: openai.AsyncOpenAI) -> None:
    schema = {
        "type": "object",
        "$defs": {"Year": {"type": "integer", "minimum": 0}},
        "properties": {
            "name": {"type": "string"},
            "born": {"$ref": "#/$defs/Year"},
            "died": {"type": ["integer", "null"]},
            "kind": {"const": "person"},
        },
        "required": ["name", "born", "died", "kind"],
        "additionalProperties": False,
    }
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[user("Ada Lovelace")],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "strict": True, "schema": schema},
        },
    )
    assert completion.choices[0].message.content == "echo: Ada Lovelace"
    config = sent(fake)["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"]["properties"] == {
        "name": {"type": "string"},
        "born": {"type": "integer", "minimum": 0},
        "died": {"type": "integer", "nullable": True},
        "kind": {"enum": ["person"]},
    }


async def test_tool_with_a_free_form_object_argument(
    fake: FakeGemini, client: openai.AsyncOpenAI
) -> None:
    """A common tool shape: one argument is a free-form object (``{"type": "object"}``). The
    real API (and the fake) refuse an OBJECT with empty properties at any depth."""
    tool = {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string"}, "filters": {"type": "object"}},
                "required": ["q"],
            },
        },
    }
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[user("cats")],
        tools=[tool],  # type: ignore[list-item]
    )
    assert completion.choices[0].finish_reason == "tool_calls"
    declaration = sent(fake)["tools"][0]["functionDeclarations"][0]
    # The subset cannot say "any object": the schema goes as JSON Schema, unchanged.
    assert declaration["parametersJsonSchema"] == tool["function"]["parameters"]


def schema_case_insensitive(node: Any) -> Any:
    """Schema ``type`` values upper-cased and ``propertyOrdering`` left out: the two ways the
    golden requests (written as the google-genai SDK sends them) may differ from ours
    (tests/wire/test_gemini.py checks the ordering on its own)."""
    if isinstance(node, list):
        return [schema_case_insensitive(n) for n in node]
    if not isinstance(node, dict):
        return node
    return {
        k: v.upper() if k == "type" and isinstance(v, str) else schema_case_insensitive(v)
        for k, v in node.items()
        if k != "propertyOrdering"
    }


@pytest.mark.parametrize("name", ["empty_args_tool", "image_request", "json_schema"])
async def test_golden_requests_through_the_gateway(
    fake: FakeGemini, client: openai.AsyncOpenAI, name: str
) -> None:
    data = load(name)
    completion = await client.chat.completions.create(**data["openai_request"])
    assert completion.choices  # the fake accepted the translated request
    request = fake.requests[-1]
    assert request.path == f"/v1beta/models/{data['openai_request']['model']}:generateContent"
    assert schema_case_insensitive(request.json) == schema_case_insensitive(data["gemini_request"])


async def test_image_as_data_uri(fake: FakeGemini, client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what colour"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{PIXEL_PNG}"},
                    },
                ],
            }
        ],
    )
    assert completion.choices[0].message.content == "echo: what colour"
    assert sent(fake)["contents"][0]["parts"][1] == {
        "inlineData": {"mimeType": "image/png", "data": PIXEL_PNG}
    }


def image_request(url: str) -> list[Any]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "describe"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


async def test_image_url_fetched_when_private_addresses_are_allowed(fake: FakeGemini) -> None:
    image = base64.b64decode(PIXEL_PNG)
    reply = Reply.raw(image, content_type="image/png")
    config = gateway_config(connection_config(fake, image_fetch_allow_private=True))
    async with serve_static(reply) as host, run_gateway(config) as gateway, sdk(gateway) as client:
        url = f"http://{host.host}:{host.port}/img/pixel.png?v=1"
        with trio.fail_after(GUARD):
            completion = await client.chat.completions.create(
                model=MODEL, messages=image_request(url)
            )
    assert completion.choices[0].message.content == "echo: describe"
    (fetch,) = host.requests
    assert (fetch.method, fetch.path) == ("GET", "/img/pixel.png?v=1")
    assert KEY not in str(fetch.headers) and PROVIDER_KEY not in str(fetch.headers)
    part = sent(fake)["contents"][0]["parts"][1]
    assert part == {
        "inlineData": {"mimeType": "image/png", "data": base64.b64encode(image).decode()}
    }


async def test_image_url_on_loopback_is_refused_by_default(
    fake: FakeGemini, client: openai.AsyncOpenAI
) -> None:
    reply = Reply.raw(base64.b64decode(PIXEL_PNG), content_type="image/png")
    async with serve_static(reply) as host:
        url = f"http://{host.host}:{host.port}/pixel.png"
        with trio.fail_after(GUARD), pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=MODEL, messages=image_request(url))
    assert info.value.status_code == 400
    assert info.value.code == "image_url_not_allowed"
    assert host.requests == []  # the guard refused before connecting
    assert fake.requests == []


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (Reply.raw(b"\x89PNG" + b"0" * 4096, content_type="image/png"), "image_too_large"),
        (Reply.raw(b"<html></html>", content_type="text/html"), "image_fetch_failed"),
        (Reply.raw(b"gone", status=404, content_type="text/plain"), "image_fetch_failed"),
    ],
    ids=["too-large", "not-an-image", "404"],
)
async def test_image_url_fetch_failures_are_the_clients(
    fake: FakeGemini, reply: Reply, code: str
) -> None:
    config = gateway_config(
        connection_config(fake, image_fetch_allow_private=True, image_fetch_max_bytes=1024)
    )
    async with serve_static(reply) as host, run_gateway(config) as gateway, sdk(gateway) as client:
        url = f"http://{host.host}:{host.port}/x.png"
        with trio.fail_after(GUARD), pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=MODEL, messages=image_request(url))
    assert info.value.code == code
    assert len(host.requests) == 1
    assert fake.requests == []


async def test_max_tokens_is_finish_length(fake: FakeGemini, client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=MODEL, messages=[user("a long story about dragons")], max_tokens=3
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "echo: a long"
    assert sent(fake)["generationConfig"] == {"maxOutputTokens": 3}


async def test_safety_block_is_content_filter(fake: FakeGemini, client: openai.AsyncOpenAI) -> None:
    data = load("safety_block")
    fake.push(gemini_json_reply(data["response"]), Reply.sse([data["stream"].encode()]))
    completion = await client.chat.completions.create(model=MODEL, messages=[user("bad")])
    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.choices[0].message.content is None
    assert completion.usage is not None and completion.usage.prompt_tokens == 12

    stream = await client.chat.completions.create(model=MODEL, messages=[user("bad")], stream=True)
    finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert finishes[-1] == "content_filter"


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
async def test_rate_limit_with_retry_delay(
    fake: FakeGemini, gateway: RunningGateway, client: openai.AsyncOpenAI, stream: bool
) -> None:
    fake.push(gemini_json_reply(gemini_rate_limit_error("6.2s"), status=429))
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model=MODEL, messages=[user("x")], stream=stream)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "7"
    record = await gateway.records.wait_for(lambda r: r.status == 429)
    assert record.outcome == "error"


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (
            gemini_error_reply(503, "The model is overloaded. Please try again later."),
            503,
            "unavailable",
        ),
        (
            gemini_error_reply(
                400,
                "The input token count (1200293) exceeds the maximum number of "
                "tokens allowed (1048576).",
            ),
            400,
            "context_length_exceeded",
        ),
        (gemini_error_reply(500, "Internal error encountered."), 500, "internal"),
    ],
    ids=["503", "context-overflow", "500"],
)
async def test_upstream_errors_keep_status(
    fake: FakeGemini, client: openai.AsyncOpenAI, reply: Reply, status: int, code: str
) -> None:
    fake.push(reply)
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model=MODEL, messages=[user("x")])
    assert info.value.status_code == status
    assert info.value.code == code


async def test_invalid_provider_key_is_an_upstream_auth_error(fake: FakeGemini) -> None:
    config = gateway_config(connection_config(fake, api_key="AIza-wrong-key"))
    async with run_gateway(config) as gateway, sdk(gateway) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model=MODEL, messages=[user("x")])
    assert info.value.status_code == 401
    assert info.value.code == "upstream_authentication_failed"
    assert "wrong" not in info.value.message
    assert fake.requests[-1].headers["x-goog-api-key"] == "AIza-wrong-key"


async def test_unsupported_parameters(fake: FakeGemini, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=[user("x")], logit_bias={"1": 5})
    assert info.value.param == "logit_bias"
    assert "logit_bias" in info.value.message
    assert fake.requests == []
    # Dropped on purpose (the fake would refuse an unknown field with a 400).
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[user("x")],
        user="u-1",
        parallel_tool_calls=False,
        metadata={"k": "v"},
        store=False,
        tools=[SEARCH_TOOL],
        tool_choice="none",
    )
    assert completion.choices[0].message.content == "echo: x"
    assert set(sent(fake)) == {"contents", "tools", "toolConfig"}
    assert "generationConfig" not in sent(fake)


async def test_drop_unsupported_params(fake: FakeGemini) -> None:
    config = gateway_config(connection_config(fake, drop_unsupported_params=True))
    async with run_gateway(config) as gateway, sdk(gateway) as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=[user("x")], logit_bias={"1": 5}, logprobs=True
        )
    assert completion.choices[0].message.content == "echo: x"
    assert sent(fake) == {"contents": [{"role": "user", "parts": [{"text": "x"}]}]}


async def test_midstream_error(fake: FakeGemini, gateway: RunningGateway) -> None:
    # One event per write, paced: the text goes out (status 200) before the error arrives.
    events = [
        e + b"\r\n\r\n" for e in load("midstream_error")["stream"].encode().split(b"\r\n\r\n") if e
    ]
    assert len(events) == 2 and events[1].startswith(b'data: {"error"')
    fake.push(Reply.sse(events, delay=0.2), Reply.sse(events, delay=0.2))
    received = ""
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[user("x")], stream=True
        )
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                received += "".join(c.delta.content or "" for c in chunk.choices)
    assert received == "The answer is"
    assert "upstream" in info.value.message.lower()
    record = await gateway.records.wait_for(lambda r: r.outcome == "error")
    assert record.status == 503

    # On the wire: the error is the last event, and no [DONE] follows it.
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            f"{gateway.base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": MODEL, "messages": [user("x")], "stream": True},
        )
    events = [e for e in response.content.split(b"\n\n") if e]
    assert response.status_code == 200
    assert b"[DONE]" not in response.content
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert set(last) == {"error"}


async def test_cancellation_mid_stream_closes_upstream(
    fake: FakeGemini, gateway: RunningGateway
) -> None:
    def chunk(text: str) -> bytes:
        return gemini_sse(
            {
                "candidates": [
                    {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
                ],
                "modelVersion": MODEL,
                "responseId": "r-cancel",
            }
        )

    fake.push(Reply.stream_then_stall([chunk("first "), chunk("second ")]))
    with trio.fail_after(GUARD):
        async with (
            httpx2.AsyncClient() as http,
            http.stream(
                "POST",
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer {KEY}"},
                json={"model": MODEL, "messages": [user("x")], "stream": True},
            ) as response,
        ):
            assert response.status_code == 200
            received = b""
            async for data in response.aiter_bytes():
                received += data
                if b"second" in received:
                    break
        request = fake.requests[0]
        await fake.wait_closed(request)
        record = await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
    assert request.connection_id in fake.closed_by_client
    assert record.connection == "gem"
    assert record.stream is True
    assert record.status == 499


# ============================================================================================
# Vertex AI


@functools.cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def service_account(token_uri: str) -> dict[str, Any]:
    pem = rsa_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "type": "service_account",
        "project_id": "proj-x",
        "private_key_id": "kid-1",
        "private_key": pem.decode(),
        "client_email": "gateway@proj-x.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }


def b64url(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def verified_grant(request: RecordedRequest) -> dict[str, Any]:
    """The JWT-bearer grant the token endpoint received, its signature checked."""
    form = urllib.parse.parse_qs(request.body.decode())
    assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    (assertion,) = form["assertion"]
    head, payload, signature = assertion.split(".")
    rsa_key().public_key().verify(
        b64url(signature), f"{head}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    claims: dict[str, Any] = orjson.loads(b64url(payload))
    assert orjson.loads(b64url(head))["kid"] == "kid-1"
    assert claims["iss"] == "gateway@proj-x.iam.gserviceaccount.com"
    # google-auth signs for Google's token endpoint whatever token_uri it posts to.
    assert claims["aud"] == "https://oauth2.googleapis.com/token"
    assert claims["scope"] == SCOPE
    return claims


def vertex_config(fake: FakeGemini, token_uri: str) -> dict[str, Any]:
    return gateway_config(
        {
            "api_type": "google",
            "vertexai": True,
            "project": "proj-x",
            "location": "us-central1",
            "api_base": fake.base_url,
            "service_account_json": orjson.dumps(service_account(token_uri)).decode(),
            "read_timeout_seconds": 5,
        }
    )


async def test_vertex_with_a_service_account(fake: FakeGemini) -> None:
    fake.bearer_tokens = {"tok-1"}
    token_reply = Reply.json({"access_token": "tok-1", "expires_in": 3600, "token_type": "Bearer"})
    async with serve_static(token_reply) as oauth:
        token_uri = f"http://{oauth.host}:{oauth.port}/token"
        async with run_gateway(vertex_config(fake, token_uri)) as gateway, sdk(gateway) as client:
            with trio.fail_after(GUARD):
                results: dict[str, Any] = {}

                async def plain(name: str) -> None:
                    results[name] = await client.chat.completions.create(
                        model=MODEL, messages=[user(name)]
                    )

                async def streamed() -> None:
                    stream = await client.chat.completions.create(
                        model=MODEL, messages=[user("streamed")], stream=True
                    )
                    results["streamed"] = "".join(
                        [c.choices[0].delta.content or "" async for c in stream if c.choices]
                    )

                # Concurrent first requests: one token fetch serves them all.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(plain, "first")
                    nursery.start_soon(plain, "second")
                    nursery.start_soon(streamed)

                # A tool loop: Vertex refuses function-call ids (the fake answers 400).
                messages: list[Any] = [user("find otters")]
                first = await client.chat.completions.create(
                    model=MODEL, messages=messages, tools=[SEARCH_TOOL]
                )
                (call,) = first.choices[0].message.tool_calls or []
                messages += [
                    assistant_message(first.choices[0].message),
                    {"role": "tool", "tool_call_id": call.id, "content": "3 otters"},
                ]
                final = await client.chat.completions.create(
                    model=MODEL, messages=messages, tools=[SEARCH_TOOL]
                )

    assert results["first"].choices[0].message.content == "echo: first"
    assert results["second"].choices[0].message.content == "echo: second"
    assert results["streamed"] == "echo: streamed"
    assert final.choices[0].message.content == "echo: find otters"

    base = f"/v1beta1/projects/proj-x/locations/us-central1/publishers/google/models/{MODEL}"
    assert len(fake.requests) == 5
    for request in fake.requests:
        assert request.headers["authorization"] == "Bearer tok-1"
        assert "x-goog-api-key" not in request.headers
        assert request.path in (f"{base}:generateContent", f"{base}:streamGenerateContent?alt=sse")
    assert sum(r.path.endswith("?alt=sse") for r in fake.requests) == 1
    loop = sent(fake)
    assert loop["contents"][1]["parts"][0]["functionCall"] == {
        "name": "search",
        "args": {"q": "find otters"},
    }
    assert loop["contents"][2]["parts"][0]["functionResponse"] == {
        "name": "search",
        "response": {"result": "3 otters"},
    }
    (grant,) = oauth.requests  # fetched once for five requests
    assert (grant.method, grant.path) == ("POST", "/token")
    verified_grant(grant)


async def test_vertex_with_a_broken_service_account(fake: FakeGemini) -> None:
    refused = Reply.json(
        {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, status=400
    )
    async with serve_static(refused) as oauth:
        token_uri = f"http://{oauth.host}:{oauth.port}/token"
        async with run_gateway(vertex_config(fake, token_uri)) as gateway, sdk(gateway) as client:
            with trio.fail_after(GUARD), pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(model=MODEL, messages=[user("x")])
            record = await gateway.records.wait_for(lambda r: r.outcome == "error")
    assert info.value.status_code == 502
    assert info.value.code == "upstream_credentials_unavailable"
    assert "JWT" not in info.value.message  # the token endpoint's text stays in the logs
    assert len(oauth.requests) >= 1
    assert fake.requests == []  # nothing went to Vertex without a token
    assert record.status == 502


async def test_midstream_error_in_the_same_read_as_text_still_streams_the_text(
    fake: FakeGemini, gateway: RunningGateway
) -> None:
    """Text and the error event arriving in one read: the text goes out (200) and the stream
    ends with the error event, instead of the text being dropped for an HTTP error; the usage
    Gemini reported before failing is recorded."""
    whole = load("midstream_error")["stream"].encode()
    fake.push(Reply.sse([whole]))  # one write: both events in the same read
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            f"{gateway.base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": MODEL, "messages": [user("x")], "stream": True},
        )
    assert response.status_code == 200
    events = [e for e in response.content.split(b"\n\n") if e]
    text = "".join(
        (orjson.loads(e.removeprefix(b"data: ")).get("choices") or [{}])[0]
        .get("delta", {})
        .get("content")
        or ""
        for e in events[:-1]
    )
    assert text == "The answer is"
    assert set(orjson.loads(events[-1].removeprefix(b"data: "))) == {"error"}
    record = await gateway.records.wait_for(lambda r: r.outcome == "error")
    assert record.usage is not None and record.usage["completion_tokens"] > 0


# -- embeddings -------------------------------------------------------------------------------


async def test_embeddings_through_batch_embed_contents(
    fake: FakeGemini, client: openai.AsyncOpenAI
) -> None:
    floats = await client.embeddings.create(
        model="gemini-embedding-001", input=["one two", "three"], dimensions=4,
        encoding_format="float",
    )  # fmt: skip
    decoded = await client.embeddings.create(model="gemini-embedding-001", input="one two")
    sent = fake.requests[0]
    assert sent.path.startswith("/v1beta/models/gemini-embedding-001:batchEmbedContents")
    assert sent.json == {
        "requests": [
            {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "one two"}]},
             "outputDimensionality": 4},
            {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "three"}]},
             "outputDimensionality": 4},
        ]
    }  # fmt: skip
    assert [len(d.embedding) for d in floats.data] == [4, 4]
    # The same text, the same vector (the fake's is deterministic; base64 is float32).
    assert decoded.data[0].embedding[:4] == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert floats.model == "gemini-embedding-001"
    assert floats.usage.prompt_tokens > 0  # estimated: the Developer API reports none


async def test_token_id_inputs_are_a_clear_400_for_gemini(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.embeddings.create(model="gemini-embedding-001", input=[[1, 2, 3]])
    assert refused.value.param == "input"


async def test_vertex_embeddings_through_predict(fake: FakeGemini) -> None:
    config = gateway_config(connection_config(fake, vertexai=True))  # express mode: a key
    async with run_gateway(config) as gateway, sdk(gateway) as client:
        done = await client.embeddings.create(
            model="gemini-embedding-001", input=["a b c"], encoding_format="float"
        )
    sent = fake.requests[0]
    assert sent.path.startswith("/v1beta1/publishers/google/models/gemini-embedding-001:predict")
    assert sent.json == {"instances": [{"content": "a b c"}]}
    assert len(done.data[0].embedding) == 8
    assert done.usage.prompt_tokens == 3  # Vertex counts the tokens
