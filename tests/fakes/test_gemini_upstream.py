"""Tests of the fake Gemini upstream, with the official ``google-genai`` SDK as the client,
and of the golden Gemini transcripts in ``tests/fixtures/gemini``.

The SDK runs its *async* client on trio: ``HttpOptions(httpx_async_client=<httpx2.AsyncClient>)``
makes it send through that client instead of its per-event-loop pool (which needs asyncio),
and with no ``retry_options`` it never sleeps. Waiting is on events only.

A fixture holds ``description``; optionally ``openai_request`` (what a client sends the
gateway), ``gemini_request`` / ``gemini_followup_request`` (what the gateway should send
upstream), ``http_status`` + ``error_body`` (an error answer); ``response`` (the
non-streaming ``GenerateContentResponse`` or null), ``stream`` (the exact SSE body or null);
``expect`` (the OpenAI-side outcome: content, reasoning_content, tool_calls, finish_reason,
usage, error) and, where streaming ends differently, ``expect_stream``.
"""

from __future__ import annotations

import base64
import datetime
import json as stdlib_json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import google.oauth2.credentials
import httpx2
import orjson
import pytest
from google import genai
from google.genai import errors, types

from lm_gateway.wire.sse import SSEDecoder

from .gemini_upstream import (
    DUMMY_THOUGHT_SIGNATURES,
    FakeGemini,
    gemini_error,
    gemini_error_reply,
    gemini_json_reply,
    gemini_rate_limit_error,
    gemini_sse,
    open_fake_gemini,
    retry_info,
)
from .openai_upstream import Reply

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "gemini"
FIXTURE_NAMES = sorted(path.stem for path in FIXTURES.glob("*.json"))
MODEL = "gemini-2.5-flash"
MODEL3 = "gemini-3-flash-preview"
USER_TEXT = "say hello to the world"
ECHO = f"echo: {USER_TEXT}"
SEARCH_TOOL = types.Tool(
    function_declarations=[
        types.FunctionDeclaration(
            name="search",
            description="Search the web.",
            parameters_json_schema={
                "type": "object",
                "properties": {"q": {"type": "string"}},
                "required": ["q"],
            },
        ),
        types.FunctionDeclaration(
            name="lookup",
            parameters=types.Schema(
                type=types.Type.OBJECT, properties={"id": types.Schema(type=types.Type.STRING)}
            ),
        ),
    ]
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    async with open_fake_gemini() as server:
        yield server
    assert server.errors == []


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient() as client:
        yield client


def make_client(
    fake: FakeGemini, http: httpx2.AsyncClient, *, api_key: str = "test-key", **options: Any
) -> genai.Client:
    return genai.Client(
        api_key=api_key,
        http_options=types.HttpOptions(base_url=fake.base_url, httpx_async_client=http, **options),
    )


@pytest.fixture
def client(fake: FakeGemini, http: httpx2.AsyncClient) -> genai.Client:
    return make_client(fake, http)


def vertex_client(
    fake: FakeGemini, http: httpx2.AsyncClient, token: str = "ya29.fake"
) -> genai.Client:
    # A token without expiry is never refreshed: the SDK's refresh path uses asyncio.
    credentials = google.oauth2.credentials.Credentials(token=token)  # type: ignore[no-untyped-call]
    return genai.Client(
        vertexai=True,
        project="proj",
        location="us-central1",
        credentials=credentials,
        http_options=types.HttpOptions(base_url=fake.base_url, httpx_async_client=http),
    )


def vertex_url(fake: FakeGemini, model: str = MODEL) -> str:
    vertex = "v1/projects/p/locations/global/publishers/google"
    return f"{fake.base_url}/{vertex}/models/{model}:generateContent"


def config(**fields: Any) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(**fields)


def generate_url(fake: FakeGemini, model: str = MODEL, method: str = "generateContent") -> str:
    return f"{fake.base_url}/v1beta/models/{model}:{method}"


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": text}]}


async def post(
    http: httpx2.AsyncClient, url: str, body: Any, *, key: str | None = "test-key"
) -> httpx2.Response:
    headers = {"x-goog-api-key": key} if key is not None else {}
    return await http.post(url, json=body, headers=headers)


def google_error(response: httpx2.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json; charset=UTF-8"
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == response.status_code
    error: dict[str, Any] = body["error"]
    return error


def sse_chunks(body: bytes) -> list[dict[str, Any]]:
    decoder = SSEDecoder()
    events = decoder.feed(body) + decoder.close()
    return [orjson.loads(event.data) for event in events]


# -- the SDK as client ---------------------------------------------------------------------


async def test_text_through_sdk(fake: FakeGemini, client: genai.Client) -> None:
    response = await client.aio.models.generate_content(
        model=MODEL, contents=USER_TEXT, config=config(system_instruction="Be terse.")
    )
    assert response.text == ECHO
    assert response.candidates is not None
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert response.model_version == MODEL
    assert response.response_id == "resp-fake-1"
    usage = response.usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.candidates_token_count) == (5 + 2, 6)
    assert usage.thoughts_token_count is None
    assert usage.total_token_count == 13
    request = fake.requests[0]
    assert request.path == f"/v1/models/{MODEL}:generateContent"  # google-genai 3.x: v1
    assert request.headers["x-goog-api-key"] == "test-key"
    assert request.headers["x-goog-api-client"].startswith("google-genai-sdk/")
    assert request.json["systemInstruction"] == {"parts": [{"text": "Be terse."}], "role": "user"}


async def test_raw_response_shape(fake: FakeGemini, http: httpx2.AsyncClient) -> None:
    response = await post(http, generate_url(fake), {"contents": [user(USER_TEXT)]})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json; charset=UTF-8"
    assert response.json() == {
        "candidates": [
            {
                "content": {"parts": [{"text": ECHO}], "role": "model"},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 5,
            "candidatesTokenCount": 6,
            "totalTokenCount": 11,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 5}],
        },
        "modelVersion": MODEL,
        "responseId": "resp-fake-1",
    }
    types.GenerateContentResponse.model_validate(response.json())


async def test_candidate_count(client: genai.Client) -> None:
    response = await client.aio.models.generate_content(
        model=MODEL, contents=USER_TEXT, config=config(candidate_count=3)
    )
    assert response.candidates is not None
    assert [candidate.index for candidate in response.candidates] == [0, 1, 2]
    assert {
        candidate.content.parts[0].text
        for candidate in response.candidates
        if candidate.content and candidate.content.parts
    } == {ECHO}
    assert response.usage_metadata is not None
    assert response.usage_metadata.candidates_token_count == 18


async def test_function_call_without_ids_on_gemini_2(
    fake: FakeGemini, client: genai.Client
) -> None:
    response = await client.aio.models.generate_content(
        model=MODEL, contents=USER_TEXT, config=config(tools=[SEARCH_TOOL])
    )
    assert response.function_calls is not None
    (call,) = response.function_calls
    assert (call.id, call.name, call.args) == (None, "search", {"q": USER_TEXT})
    assert response.candidates is not None
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    part = response.candidates[0].content.parts[0]  # type: ignore[union-attr,index]
    assert part.thought_signature is None
    # The SDK sent parametersJsonSchema in snake_case; the fake (like the API) took it.
    declarations = fake.requests[0].json["tools"][0]["functionDeclarations"]
    assert "parameters_json_schema" in declarations[0]


async def test_tool_choice_modes(client: genai.Client) -> None:
    def calling(mode: str, allowed: list[str] | None = None) -> types.GenerateContentConfig:
        return config(
            tools=[SEARCH_TOOL],
            tool_config=types.ToolConfig(
                function_calling_config=types.FunctionCallingConfig(
                    mode=types.FunctionCallingConfigMode(mode), allowed_function_names=allowed
                )
            ),
        )

    none = await client.aio.models.generate_content(
        model=MODEL, contents=USER_TEXT, config=calling("NONE")
    )
    assert none.function_calls is None
    assert none.text == ECHO
    forced = await client.aio.models.generate_content(
        model=MODEL, contents=USER_TEXT, config=calling("ANY", ["lookup"])
    )
    assert [call.name for call in forced.function_calls or []] == ["lookup"]


async def test_gemini3_tool_round_trip_with_ids_and_signature(
    fake: FakeGemini, client: genai.Client
) -> None:
    cfg = config(tools=[SEARCH_TOOL])
    first = await client.aio.models.generate_content(model=MODEL3, contents=USER_TEXT, config=cfg)
    assert first.candidates is not None and first.candidates[0].content is not None
    model_turn = first.candidates[0].content
    (part,) = model_turn.parts or []
    assert part.function_call is not None
    assert part.function_call.id == "fc_fake_1"
    assert part.thought_signature == b"sig:resp-fake-1:0"  # base64 on the wire, bytes in the SDK
    assert first.usage_metadata is not None
    assert first.usage_metadata.thoughts_token_count == 7  # gemini-3 always thinks

    result = types.Part.from_function_response(name="search", response={"result": "ok"})
    assert result.function_response is not None
    result.function_response.id = part.function_call.id
    history = [types.Content(role="user", parts=[types.Part(text=USER_TEXT)]), model_turn]
    second = await client.aio.models.generate_content(
        model=MODEL3, contents=[*history, types.Content(role="user", parts=[result])], config=cfg
    )
    assert second.text == ECHO  # after the function result the model answers in text
    sent = fake.requests[1].json["contents"][1]["parts"][0]
    assert sent["thoughtSignature"] == base64.b64encode(b"sig:resp-fake-1:0").decode()

    # Without the signature the turn is rejected, as Gemini 3 does.
    unsigned = model_turn.model_copy(deep=True)
    assert unsigned.parts is not None
    unsigned.parts[0].thought_signature = None
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(
            model=MODEL3,
            contents=[history[0], unsigned, types.Content(role="user", parts=[result])],
            config=cfg,
        )
    assert caught.value.code == 400
    assert caught.value.status == "INVALID_ARGUMENT"
    assert caught.value.message is not None
    assert caught.value.message.startswith("Function call is missing a thought_signature")


async def test_foreign_signature_is_corrupted_but_dummy_passes(
    fake: FakeGemini, http: httpx2.AsyncClient
) -> None:
    def history(signature: str) -> dict[str, Any]:
        return {
            "contents": [
                user(USER_TEXT),
                {
                    "role": "model",
                    "parts": [
                        {
                            "functionCall": {"name": "search", "args": {}},
                            "thoughtSignature": signature,
                        }
                    ],
                },
                {
                    "role": "user",
                    "parts": [{"functionResponse": {"name": "search", "response": {}}}],
                },
            ]
        }

    bad = await post(
        http, generate_url(fake, MODEL3), history(base64.b64encode(b"forged").decode())
    )
    assert bad.status_code == 400
    assert google_error(bad)["message"] == "Corrupted thought signature."
    for dummy in sorted(DUMMY_THOUGHT_SIGNATURES):
        good = await post(http, generate_url(fake, MODEL3), history(dummy))
        assert good.status_code == 200, good.text


async def test_thinking(fake: FakeGemini, client: genai.Client) -> None:
    response = await client.aio.models.generate_content(
        model=MODEL,
        contents=USER_TEXT,
        config=config(
            thinking_config=types.ThinkingConfig(include_thoughts=True, thinking_budget=512)
        ),
    )
    assert response.candidates is not None and response.candidates[0].content is not None
    thought, answer = response.candidates[0].content.parts or []
    assert (thought.thought, thought.text) == (True, f"thinking about: {USER_TEXT}")
    assert (answer.thought, answer.text) == (None, ECHO)
    assert answer.thought_signature is not None
    assert response.text == ECHO  # the SDK skips thought parts
    usage = response.usage_metadata
    assert usage is not None
    assert (usage.candidates_token_count, usage.thoughts_token_count) == (6, 7)
    assert usage.total_token_count == 5 + 6 + 7
    # google-genai sends thinkingConfig's fields in snake_case.
    assert fake.requests[0].json["generationConfig"]["thinkingConfig"] == {
        "include_thoughts": True,
        "thinking_budget": 512,
    }


async def test_thinking_with_tool_puts_signature_on_the_call(client: genai.Client) -> None:
    response = await client.aio.models.generate_content(
        model=MODEL,
        contents=USER_TEXT,
        config=config(
            tools=[SEARCH_TOOL], thinking_config=types.ThinkingConfig(include_thoughts=True)
        ),
    )
    assert response.candidates is not None and response.candidates[0].content is not None
    thought, call = response.candidates[0].content.parts or []
    assert thought.thought is True
    assert thought.thought_signature is None
    assert call.function_call is not None and call.function_call.id is None
    assert call.thought_signature == b"sig:resp-fake-1:0"


async def test_max_tokens_and_stop_sequences(client: genai.Client) -> None:
    truncated = await client.aio.models.generate_content(
        model=MODEL, contents=USER_TEXT, config=config(max_output_tokens=3)
    )
    assert truncated.text == "echo: say hello"
    assert truncated.candidates is not None
    assert truncated.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert truncated.usage_metadata is not None
    assert truncated.usage_metadata.candidates_token_count == 3
    stopped = await client.aio.models.generate_content(
        model=MODEL, contents=USER_TEXT, config=config(stop_sequences=[" to", "xyz"])
    )
    assert stopped.text == "echo: say hello"
    assert stopped.candidates is not None
    assert stopped.candidates[0].finish_reason == types.FinishReason.STOP


async def test_count_tokens_and_models(fake: FakeGemini, client: genai.Client) -> None:
    counted = await client.aio.models.count_tokens(model=MODEL, contents=USER_TEXT)
    assert counted.total_tokens == 5
    assert fake.requests[-1].path == f"/v1/models/{MODEL}:countTokens"
    names = [model.name async for model in await client.aio.models.list()]
    assert names == [f"models/{name}" for name in fake.models]
    model = await client.aio.models.get(model=MODEL)
    assert model.input_token_limit == 1_048_576


# -- streaming -----------------------------------------------------------------------------


async def test_stream_text_through_sdk(fake: FakeGemini, client: genai.Client) -> None:
    stream = await client.aio.models.generate_content_stream(model=MODEL, contents=USER_TEXT)
    chunks = [chunk async for chunk in stream]
    assert "".join(chunk.text or "" for chunk in chunks) == ECHO
    assert [chunk.text for chunk in chunks] == ["echo: say ", "hello to ", "the world"]
    reasons = [chunk.candidates[0].finish_reason for chunk in chunks if chunk.candidates]
    assert reasons == [None, None, types.FinishReason.STOP]
    # Cumulative usage on every chunk: the last one is the total.
    counts = [
        chunk.usage_metadata.candidates_token_count for chunk in chunks if chunk.usage_metadata
    ]
    assert counts == [2, 4, 6]
    assert fake.requests[0].path == f"/v1/models/{MODEL}:streamGenerateContent?alt=sse"


async def test_stream_framing_and_usage_on_last_chunk(
    fake: FakeGemini, http: httpx2.AsyncClient
) -> None:
    fake.stream_usage = "last"
    response = await post(
        http,
        generate_url(fake, method="streamGenerateContent") + "?alt=sse",
        {"contents": [user(USER_TEXT)]},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    body = response.content
    assert body.startswith(b"data: {") and body.endswith(b"}\r\n\r\n")  # CRLF, no [DONE]
    chunks = sse_chunks(body)
    assert ["usageMetadata" in chunk for chunk in chunks] == [False, False, True]
    assert {chunk["responseId"] for chunk in chunks} == {"resp-fake-1"}
    for chunk in chunks:
        types.GenerateContentResponse.model_validate(chunk)


async def test_stream_without_alt_sse_is_a_json_array(
    fake: FakeGemini, http: httpx2.AsyncClient
) -> None:
    response = await post(
        http, generate_url(fake, method="streamGenerateContent"), {"contents": [user(USER_TEXT)]}
    )
    assert response.status_code == 200
    chunks = response.json()
    assert isinstance(chunks, list)
    assert (
        "".join(chunk["candidates"][0]["content"]["parts"][0]["text"] for chunk in chunks) == ECHO
    )


async def test_stream_tool_call_and_thoughts(client: genai.Client) -> None:
    stream = await client.aio.models.generate_content_stream(
        model=MODEL3,
        contents=USER_TEXT,
        config=config(
            tools=[SEARCH_TOOL], thinking_config=types.ThinkingConfig(include_thoughts=True)
        ),
    )
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == 2
    thought_chunk, call_chunk = chunks
    assert thought_chunk.candidates and thought_chunk.candidates[0].content
    (thought,) = thought_chunk.candidates[0].content.parts or []
    assert thought.thought is True
    assert thought_chunk.usage_metadata is not None
    assert thought_chunk.usage_metadata.thoughts_token_count == 7
    assert thought_chunk.usage_metadata.candidates_token_count is None
    assert call_chunk.candidates and call_chunk.candidates[0].content
    (call,) = call_chunk.candidates[0].content.parts or []
    assert call.function_call is not None
    assert (call.function_call.id, call.function_call.args) == ("fc_fake_1", {"q": USER_TEXT})
    assert call.thought_signature is not None
    assert call_chunk.candidates[0].finish_reason == types.FinishReason.STOP


async def test_stream_gemini3_text_ends_with_signature_only_part(client: genai.Client) -> None:
    stream = await client.aio.models.generate_content_stream(model=MODEL3, contents=USER_TEXT)
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.candidates and last.candidates[0].content
    (part,) = last.candidates[0].content.parts or []
    assert part.text == ""
    assert part.thought_signature is not None
    assert "".join(chunk.text or "" for chunk in chunks) == ECHO


async def test_stream_n_candidates(client: genai.Client) -> None:
    stream = await client.aio.models.generate_content_stream(
        model=MODEL, contents=USER_TEXT, config=config(candidate_count=2)
    )
    chunks = [chunk async for chunk in stream]
    assert all(len(chunk.candidates or []) == 2 for chunk in chunks)
    assert [c.index for c in chunks[0].candidates or []] == [0, 1]


async def test_midstream_error_raises_in_sdk(fake: FakeGemini, client: genai.Client) -> None:
    fake.push(
        Reply.sse(
            [
                gemini_sse(
                    {
                        "candidates": [
                            {
                                "content": {"parts": [{"text": "partial"}], "role": "model"},
                                "index": 0,
                            }
                        ]
                    }
                ),
                gemini_sse(gemini_error(503, "UNAVAILABLE", "The model is overloaded.")),
            ]
        )
    )
    stream = await client.aio.models.generate_content_stream(model=MODEL, contents=USER_TEXT)
    received: list[str] = []
    with pytest.raises(errors.ServerError) as caught:
        async for chunk in stream:
            received.append(chunk.text or "")
    assert received == ["partial"]
    assert (caught.value.code, caught.value.status) == (503, "UNAVAILABLE")


# -- Vertex AI -----------------------------------------------------------------------------


async def test_vertex_through_sdk(fake: FakeGemini, http: httpx2.AsyncClient) -> None:
    client = vertex_client(fake, http)
    response = await client.aio.models.generate_content(
        model=MODEL, contents=USER_TEXT, config=config(tools=[SEARCH_TOOL])
    )
    assert response.create_time == datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.UTC)
    (call,) = response.function_calls or []
    assert call.id is None  # Vertex has no function-call ids
    request = fake.requests[0]
    assert request.path == (
        f"/v1beta1/projects/proj/locations/us-central1/publishers/google/models/{MODEL}:generateContent"
    )
    assert request.headers["authorization"] == "Bearer ya29.fake"
    assert "x-goog-api-key" not in request.headers
    stream = await client.aio.models.generate_content_stream(model=MODEL, contents=USER_TEXT)
    assert "".join([chunk.text or "" async for chunk in stream]) == ECHO


async def test_vertex_auth_and_id_rejection(fake: FakeGemini, http: httpx2.AsyncClient) -> None:
    url = vertex_url(fake)
    anonymous = await http.post(
        url, json={"contents": [user("hi")]}, headers={"x-goog-api-key": "k"}
    )
    assert anonymous.status_code == 401
    error = google_error(anonymous)
    assert error["status"] == "UNAUTHENTICATED"
    assert error["details"][0]["reason"] == "CREDENTIALS_MISSING"
    fake.bearer_tokens = {"good"}
    wrong = await http.post(
        url, json={"contents": [user("hi")]}, headers={"authorization": "Bearer bad"}
    )
    assert wrong.status_code == 401
    body = {
        "contents": [
            user("hi"),
            {"role": "model", "parts": [{"functionCall": {"id": "c1", "name": "f", "args": {}}}]},
            {
                "role": "user",
                "parts": [{"functionResponse": {"id": "c1", "name": "f", "response": {}}}],
            },
        ]
    }
    rejected = await http.post(url, json=body, headers={"authorization": "Bearer good"})
    assert rejected.status_code == 400
    message = google_error(rejected)["message"]
    assert message.splitlines() == [
        'Invalid JSON payload received. Unknown name "id" at '
        "'contents[1].parts[0].function_call': Cannot find field.",
        'Invalid JSON payload received. Unknown name "id" at '
        "'contents[2].parts[0].function_response': Cannot find field.",
    ]


# -- errors --------------------------------------------------------------------------------


async def test_missing_and_invalid_api_key(fake: FakeGemini, http: httpx2.AsyncClient) -> None:
    missing = await post(http, generate_url(fake), {"contents": [user("hi")]}, key=None)
    assert missing.status_code == 403
    assert google_error(missing)["status"] == "PERMISSION_DENIED"
    fake.api_keys = {"good"}
    with_query = await http.post(generate_url(fake) + "?key=good", json={"contents": [user("hi")]})
    assert with_query.status_code == 200
    client = make_client(fake, http, api_key="bad")
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    assert caught.value.message == "API key not valid. Please pass a valid API key."


async def test_request_validation(fake: FakeGemini, http: httpx2.AsyncClient) -> None:
    async def rejected(body: Any) -> str:
        response = await post(http, generate_url(fake), body)
        assert response.status_code == 400, response.text
        error = google_error(response)
        assert error["status"] == "INVALID_ARGUMENT"
        message: str = error["message"]
        return message

    assert await rejected({}) == "* GenerateContentRequest.contents: contents is not specified\n"
    assert await rejected({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}) == (
        "Please use a valid role: user, model."
    )
    assert "parts: contents.parts must not be empty." in await rejected(
        {"contents": [{"role": "user", "parts": []}]}
    )
    assert "required oneof field 'data'" in await rejected(
        {"contents": [{"parts": [{"text": ""}]}]}
    )
    message = await rejected(
        {"contents": [user("hi")], "messages": [], "generationConfig": {"max_tokens": 5}}
    )
    assert message.splitlines() == [
        'Invalid JSON payload received. Unknown name "messages": Cannot find field.',
        "Invalid JSON payload received. Unknown name \"max_tokens\" at 'generation_config': "
        "Cannot find field.",
    ]
    unpaired = {
        "contents": [
            user("hi"),
            {
                "role": "model",
                "parts": [{"functionCall": {"name": "a"}}, {"functionCall": {"name": "b"}}],
            },
            {"role": "user", "parts": [{"functionResponse": {"name": "a", "response": {}}}]},
        ]
    }
    assert (await rejected(unpaired)).startswith(
        "Please ensure that the number of function response parts"
    )
    response_first = {
        "contents": [
            {"role": "user", "parts": [{"functionResponse": {"name": "a", "response": {}}}]}
        ]
    }
    assert (await rejected(response_first)).startswith(
        "Please ensure that function response turn comes immediately after a function call turn"
    )
    bad = await http.post(generate_url(fake), content=b"{not json", headers={"x-goog-api-key": "k"})
    assert bad.status_code == 400


def tool_body(declaration: dict[str, Any]) -> dict[str, Any]:
    return {"contents": [user("hi")], "tools": [{"functionDeclarations": [declaration]}]}


async def test_schema_subset(fake: FakeGemini, http: httpx2.AsyncClient) -> None:
    empty = await post(
        http,
        generate_url(fake),
        tool_body({"name": "t", "parameters": {"type": "object", "properties": {}}}),
    )
    assert empty.status_code == 400
    assert google_error(empty)["message"] == (
        "* GenerateContentRequest.tools[0].function_declarations[0].parameters.properties: "
        "should be non-empty for OBJECT type\n"
    )
    nested = {
        "name": "t",
        "parameters": {"type": "OBJECT", "properties": {"meta": {"type": "OBJECT"}}},
    }
    nested_response = await post(http, generate_url(fake), tool_body(nested))
    assert (
        'parameters.properties["meta"].properties: should be non-empty'
        in google_error(nested_response)["message"]
    )
    # JSON-Schema keywords outside the OpenAPI subset are unknown names.
    refs = {
        "name": "t",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"$ref": "#/$defs/A"},
                "b": {"oneOf": [{"type": "string"}], "const": 1},
            },
            "$defs": {"A": {"type": "string"}},
            "additionalProperties": False,
        },
    }
    refused = await post(http, generate_url(fake), tool_body(refs))
    unknown = re.findall(
        r'Unknown name "([^"]+)" at \'([^\']+)\'', google_error(refused)["message"]
    )
    assert unknown == [
        ("$defs", "tools[0].function_declarations[0].parameters"),
        ("additionalProperties", "tools[0].function_declarations[0].parameters"),
        ("$ref", "tools[0].function_declarations[0].parameters.properties[0].value"),
        ("oneOf", "tools[0].function_declarations[0].parameters.properties[1].value"),
        ("const", "tools[0].function_declarations[0].parameters.properties[1].value"),
    ]
    # parametersJsonSchema takes full JSON Schema, empty objects included; so does no parameters.
    for ok in (
        {
            "name": "t",
            "parametersJsonSchema": {
                "type": "object",
                "properties": {},
                "additionalProperties": False,
            },
        },
        {"name": "t"},
        {
            "name": "ns.t:1",
            "parameters": {
                "type": "OBJECT",
                "properties": {"x": {"type": "STRING", "nullable": True}},
            },
        },
    ):
        accepted = await post(http, generate_url(fake), tool_body(ok))
        assert accepted.status_code == 200, accepted.text
    both = {
        "name": "t",
        "parameters": {"type": "OBJECT", "properties": {"x": {"type": "STRING"}}},
        "parametersJsonSchema": {},
    }
    assert (await post(http, generate_url(fake), tool_body(both))).status_code == 400
    assert (
        await post(http, generate_url(fake), tool_body({"name": "9bad name"}))
    ).status_code == 400


async def test_additional_properties_accepted_on_vertex(
    fake: FakeGemini, http: httpx2.AsyncClient
) -> None:
    url = vertex_url(fake)
    declaration = {
        "name": "t",
        "parameters": {
            "type": "OBJECT",
            "properties": {"x": {"type": "STRING"}},
            "additionalProperties": False,
        },
    }
    response = await http.post(
        url, json=tool_body(declaration), headers={"authorization": "Bearer t"}
    )
    assert response.status_code == 200, response.text


async def test_scripted_rate_limit_through_sdk(fake: FakeGemini, client: genai.Client) -> None:
    fake.push(gemini_json_reply(gemini_rate_limit_error("7s"), status=429))
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert (caught.value.code, caught.value.status) == (429, "RESOURCE_EXHAUSTED")
    details = caught.value.details["error"]["details"]
    assert retry_info("7s") in details
    fake.push(gemini_error_reply(500, "Internal error encountered."))
    with pytest.raises(errors.ServerError) as server_error:
        await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert server_error.value.status == "INTERNAL"


async def test_unknown_models_and_paths(fake: FakeGemini, http: httpx2.AsyncClient) -> None:
    assert (
        await post(http, generate_url(fake, "no-such-model"), {"contents": [user("hi")]})
    ).status_code == 200
    fake.reject_unknown_models = True
    missing = await post(http, generate_url(fake, "no-such-model"), {"contents": [user("hi")]})
    assert missing.status_code == 404
    assert google_error(missing)["status"] == "NOT_FOUND"
    nowhere = await http.get(f"{fake.base_url}/v2/elsewhere", headers={"x-goog-api-key": "k"})
    assert nowhere.status_code == 404


# -- golden transcripts --------------------------------------------------------------------

_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "BLOCKLIST": "content_filter",
    "SPII": "content_filter",
    "RECITATION": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}


def load_fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = stdlib_json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def stream_events(text: str) -> Iterator[dict[str, Any]]:
    decoder = SSEDecoder()
    # Feed in small pieces: the result must not depend on where the bytes split.
    raw = text.encode()
    events = [event for i in range(0, len(raw), 7) for event in decoder.feed(raw[i : i + 7])]
    for event in events + decoder.close():
        assert event.event is None
        yield orjson.loads(event.data)


def fold(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A reference reduction of Gemini chunks (or one response) to the fixtures' ``expect``."""
    content: list[str] = []
    reasoning: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    finish: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    for chunk in chunks:
        if "error" in chunk:
            error = {"status": chunk["error"]["code"]}
            finish = "error"
            continue
        if chunk.get("promptFeedback", {}).get("blockReason"):
            finish = "content_filter"
        for candidate in chunk.get("candidates", []):
            assert candidate.get("index", 0) == 0
            for part in candidate.get("content", {}).get("parts", []):
                if "functionCall" in part:
                    call = part["functionCall"]
                    tool_calls.append({"name": call["name"], "arguments": call.get("args", {})})
                elif part.get("thought"):
                    reasoning.append(part["text"])
                elif "text" in part:
                    content.append(part["text"])
            if "finishReason" in candidate:
                finish = _FINISH[candidate["finishReason"]]
        if "usageMetadata" in chunk:
            meta = chunk["usageMetadata"]
            prompt = meta.get("promptTokenCount", 0)
            completion = meta.get("candidatesTokenCount", 0) + meta.get("thoughtsTokenCount", 0)
            assert meta.get("totalTokenCount") == prompt + completion
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "cached_tokens": meta.get("cachedContentTokenCount", 0),
                "reasoning_tokens": meta.get("thoughtsTokenCount", 0),
            }
    if tool_calls and finish == "stop":
        finish = "tool_calls"
    return {
        "content": "".join(content) or None,
        "reasoning_content": "".join(reasoning) or None,
        "tool_calls": tool_calls,
        "finish_reason": finish,
        "usage": usage,
        "error": error,
    }


def test_fixture_set_is_complete() -> None:
    assert set(FIXTURE_NAMES) >= {
        "text",
        "multi_tool_stream",
        "text_and_tool",
        "empty_args_tool",
        "image_request",
        "json_schema",
        "thinking_with_tool_use",
        "max_tokens_stop",
        "safety_block",
        "midstream_error",
        "rate_limited",
    }


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_validates_as_sdk_types(name: str) -> None:
    data = load_fixture(name)
    assert isinstance(data["description"], str) and data["description"]
    assert set(data["expect"]) == {
        "content",
        "reasoning_content",
        "tool_calls",
        "finish_reason",
        "usage",
        "error",
    }
    if data["response"] is not None:
        # extra="forbid" in the SDK's models: every field must be one the SDK knows.
        types.GenerateContentResponse.model_validate(data["response"])
    if data["stream"] is not None:
        assert data["stream"].startswith("data: ") and data["stream"].endswith("\r\n\r\n")
        for chunk in stream_events(data["stream"]):
            if "error" in chunk:
                assert set(chunk["error"]) >= {"code", "message", "status"}
            else:
                types.GenerateContentResponse.model_validate(chunk)
    if "error_body" in data:
        errors.APIError(data["http_status"], data["error_body"])  # the SDK's own error parsing


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_expectations_agree_with_transcripts(name: str) -> None:
    data = load_fixture(name)
    if data["response"] is not None:
        assert fold([data["response"]]) == data["expect"]
    if data["stream"] is not None:
        assert fold(list(stream_events(data["stream"]))) == data.get(
            "expect_stream", data["expect"]
        )
    if "error_body" in data:
        (delay,) = [
            detail["retryDelay"]
            for detail in data["error_body"]["error"]["details"]
            if detail["@type"] == "type.googleapis.com/google.rpc.RetryInfo"
        ]
        assert data["expect"]["error"] == {
            "status": data["http_status"],
            "retry_after_seconds": int(float(delay.removesuffix("s"))),
        }


@pytest.mark.parametrize(
    "name", [name for name in FIXTURE_NAMES if "gemini_request" in load_fixture(name)]
)
async def test_fixture_requests_are_accepted_by_the_fake(
    name: str, fake: FakeGemini, http: httpx2.AsyncClient
) -> None:
    data = load_fixture(name)
    model = data["response"]["modelVersion"]
    for key in ("gemini_request", "gemini_followup_request"):
        if key not in data:
            continue
        for part in (p for c in data[key]["contents"] for p in c["parts"]):
            if "thoughtSignature" in part:
                fake.issued_signatures.add(part["thoughtSignature"])  # as if the fake had sent it
        response = await post(http, generate_url(fake, model), data[key])
        assert response.status_code == 200, response.text
