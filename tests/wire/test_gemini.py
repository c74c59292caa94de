"""Unit and property tests of the OpenAI <-> Gemini translation (``lm_gateway.wire.gemini``).

Three sources of truth are used, none of them the code under test: the golden transcripts in
``tests/fixtures/gemini`` (real Gemini answers with the OpenAI outcome they must give), the
``google-genai`` SDK's own pydantic types (every request we build must validate as the SDK's
``Content``/``Tool``/``GenerateContentConfig``/``Schema``, which forbid unknown fields), and
the rules of the module docstring / design notes, written out by hand below.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from google.genai import types
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lm_gateway.errors import (
    GatewayError,
    InvalidRequest,
    NotSupported,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamUnreachable,
)
from lm_gateway.wire.gemini import (
    FINISH_REASONS,
    SKIP_SIGNATURE,
    GeminiOptions,
    GeminiStreamTranslator,
    RequestInfo,
    error_from_status,
    finish_reason,
    from_gemini_response,
    image_urls,
    schema_fields,
    to_gemini_request,
    to_gemini_schema,
    translate_usage,
)
from lm_gateway.wire.sse import SSEDecoder

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "gemini"
FIXTURE_NAMES = sorted(path.stem for path in FIXTURES.glob("*.json"))
STREAM_FIXTURES = [
    n for n in FIXTURE_NAMES if orjson.loads((FIXTURES / f"{n}.json").read_bytes()).get("stream")
]
DEV = GeminiOptions()
VERTEX = GeminiOptions(vertex=True)
MODEL = "gemini-2.5-flash"
MODEL3 = "gemini-3-pro-preview"
PIXEL_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8Dw"
    "HwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)
SIG_A = base64.b64encode(b"signature-a").decode()
SIG_B = base64.b64encode(b"signature-b").decode()
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((FIXTURES / f"{name}.json").read_bytes())
    return data


# -- SDK shape checks ------------------------------------------------------------------------

_REQUEST_FIELDS = {
    "contents",
    "systemInstruction",
    "tools",
    "toolConfig",
    "generationConfig",
    "safetySettings",
    "cachedContent",
    "labels",
}


def assert_sdk_shapes(request: dict[str, Any]) -> None:
    """``request`` validates as the google-genai SDK's types (which forbid unknown fields)."""
    assert set(request) <= _REQUEST_FIELDS, set(request) - _REQUEST_FIELDS
    assert request["contents"], "Gemini needs at least one content"
    for content in request["contents"]:
        types.Content.model_validate(content)
        assert content["role"] in ("user", "model")
        assert content["parts"], "empty parts are a 400"
    config = dict(request.get("generationConfig") or {})
    schema = config.pop("responseSchema", None)
    if schema is not None:
        # GenerateContentConfig accepts any dict here; the Schema type is the strict check.
        types.Schema.model_validate(schema)
    for key in ("systemInstruction", "tools", "toolConfig", "safetySettings"):
        if key in request:
            config[key] = request[key]
    types.GenerateContentConfig.model_validate(config)
    if "systemInstruction" in request:
        types.Content.model_validate(request["systemInstruction"])


def translate(
    body: dict[str, Any],
    options: GeminiOptions = DEV,
    **kwargs: Any,
) -> dict[str, Any]:
    """Translate ``body`` (defaults: model, one user message) and check the SDK shapes."""
    body = {"model": MODEL, **body}
    before = copy.deepcopy(body)
    request, info = to_gemini_request(body, options, **kwargs)
    assert body == before, "the client's body must not be modified"
    assert info.candidates == (body.get("n") or 1)
    assert_sdk_shapes(request)
    return request


def user(text: str = "hi") -> dict[str, Any]:
    return {"role": "user", "content": text}


def rejected(body: dict[str, Any], options: GeminiOptions = DEV, **kwargs: Any) -> GatewayError:
    with pytest.raises((InvalidRequest, NotSupported)) as info:
        to_gemini_request({"model": MODEL, **body}, options, **kwargs)
    assert info.value.http_status == 400
    return info.value


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def parts_of(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [part for content in request["contents"] for part in content["parts"]]


# -- folding answers into the fixtures' "expect" shape ---------------------------------------


def _usage(usage: Any) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
        "reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"],
    }


def fold_completion(completion: dict[str, Any]) -> dict[str, Any]:
    (choice,) = completion["choices"]
    message = choice["message"]
    assert message["role"] == "assistant"
    calls = message.get("tool_calls") or []
    for call in calls:
        assert call["type"] == "function"
        assert isinstance(call["function"]["arguments"], str)  # a JSON *string*, always
    return {
        "content": message["content"],
        "reasoning_content": message.get("reasoning_content"),
        "tool_calls": [
            {"name": c["function"]["name"], "arguments": orjson.loads(c["function"]["arguments"])}
            for c in calls
        ],
        "finish_reason": choice["finish_reason"],
        "usage": _usage(completion.get("usage")),
        "error": None,
    }


def accumulate(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Choices built from stream chunks, as a client accumulates them (by choice index)."""
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        for choice in chunk["choices"]:
            state = choices.setdefault(
                choice["index"],
                {"content": "", "reasoning": "", "calls": {}, "finish": None, "extra": []},
            )
            delta = choice["delta"]
            state["content"] += delta.get("content") or ""
            state["reasoning"] += delta.get("reasoning_content") or ""
            if "extra_content" in delta:
                state["extra"].append(delta["extra_content"])
            for call in delta.get("tool_calls") or []:
                slot = state["calls"].setdefault(
                    call["index"], {"id": None, "name": "", "arguments": "", "extra": None}
                )
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
                slot["extra"] = call.get("extra_content") or slot["extra"]
            if choice["finish_reason"] is not None:
                assert state["finish"] is None, "a choice finishes once"
                state["finish"] = choice["finish_reason"]
    return choices


def fold_chunks(chunks: list[dict[str, Any]], error: UpstreamError | None) -> dict[str, Any]:
    choices = accumulate(chunks)
    state = choices.get(0, {"content": "", "reasoning": "", "calls": {}, "finish": None})
    usage = [c["usage"] for c in chunks if c.get("usage")]
    for chunk in chunks:
        if chunk.get("usage"):
            assert chunk["choices"] == [], "usage comes in its own chunk, as OpenAI sends it"
    return {
        "content": state["content"] or None,
        "reasoning_content": state["reasoning"] or None,
        "tool_calls": [
            {"name": c["name"], "arguments": orjson.loads(c["arguments"])}
            for _, c in sorted(state["calls"].items())
        ],
        "finish_reason": "error" if error is not None else state["finish"],
        "usage": _usage(usage[-1]) if usage else None,
        "error": None if error is None else {"status": error.http_status},
    }


def run_stream(
    pieces: list[bytes], info: RequestInfo | None = None
) -> tuple[list[dict[str, Any]], UpstreamError | None]:
    """Feed byte pieces through the SSE decoder and the translator; return chunks and error."""
    decoder = SSEDecoder()
    translator = GeminiStreamTranslator("gem", info or RequestInfo())
    chunks: list[dict[str, Any]] = []
    try:
        for piece in pieces:
            for event in decoder.feed(piece):
                chunks.extend(translator.feed(event))
        for event in decoder.close():
            chunks.extend(translator.feed(event))
        chunks.extend(translator.finish())
    except UpstreamError as error:
        return chunks, error
    assert translator.done
    return chunks, None


def sse(*objects: Any) -> bytes:
    return b"".join(b"data: " + orjson.dumps(obj) + b"\r\n\r\n" for obj in objects)


# ============================================================================================
# Requests: messages


def test_system_and_developer_messages_are_hoisted_in_order() -> None:
    request = translate(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                user("one"),
                {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
                user("two"),
                {"role": "assistant", "content": "ok"},
                {"role": "system", "content": ""},  # empty: no part
                {"role": "system", "content": "Late rule."},
                user("three"),
            ]
        }
    )
    assert request["systemInstruction"] == {
        "role": "user",
        "parts": [{"text": "Be brief."}, {"text": "Use metric."}, {"text": "Late rule."}],
    }
    # The system messages leave no gap: the user turns around one merge into one content.
    assert request["contents"] == [
        {"role": "user", "parts": [{"text": "one"}, {"text": "two"}]},
        {"role": "model", "parts": [{"text": "ok"}]},
        {"role": "user", "parts": [{"text": "three"}]},
    ]


def test_no_system_instruction_without_system_messages() -> None:
    request = translate({"messages": [user()]})
    assert "systemInstruction" not in request
    assert request == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def test_only_system_messages_is_a_400() -> None:
    error = rejected({"messages": [{"role": "system", "content": "x"}]})
    assert error.param == "messages"


def test_consecutive_same_role_messages_merge() -> None:
    request = translate(
        {
            "messages": [
                user("a"),
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "b"}, {"type": "text", "text": "c"}],
                },
                {"role": "assistant", "content": "x"},
                {"role": "assistant", "content": [{"type": "text", "text": "y"}]},
                user("d"),
            ]
        }
    )
    assert request["contents"] == [
        {"role": "user", "parts": [{"text": "a"}, {"text": "b"}, {"text": "c"}]},
        {"role": "model", "parts": [{"text": "x"}, {"text": "y"}]},
        {"role": "user", "parts": [{"text": "d"}]},
    ]


def test_assistant_refusal_part_is_text_and_unknown_roles_fail() -> None:
    request = translate(
        {
            "messages": [
                user(),
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
                user("again"),
            ]
        }
    )
    assert request["contents"][1] == {"role": "model", "parts": [{"text": "No."}]}
    assert rejected({"messages": [{"role": "robot", "content": "x"}]}).param == "messages[0].role"
    legacy = rejected({"messages": [user(), {"role": "function", "name": "f", "content": "1"}]})
    assert legacy.param == "messages[1].role"


def test_image_in_a_system_message_names_the_part() -> None:
    error = rejected(
        {
            "messages": [
                {
                    "role": "system",
                    "content": [{"type": "image_url", "image_url": {"url": "data:,"}}],
                },
                user(),
            ]
        }
    )
    assert error.param == "messages[0].content[0]"


# -- tool calls and results ------------------------------------------------------------------


def tool_turn(
    *results: tuple[str, Any], calls: list[tuple[str, str, str]] | None = None
) -> list[dict[str, Any]]:
    calls = calls or [("call_a", "get_weather", '{"city": "Oslo"}'), ("call_b", "get_time", "")]
    return [
        user("weather and time?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                for i, n, a in calls
            ],
        },
        *({"role": "tool", "tool_call_id": i, "content": c} for i, c in results),
    ]


def test_tool_results_become_one_user_content_named_from_the_calls() -> None:
    messages = tool_turn(("call_a", '{"forecast": "snow", "high_c": -2}'), ("call_b", "12:00"))
    request = translate({"messages": messages, "tools": [WEATHER_TOOL]})
    assert request["contents"] == [
        {"role": "user", "parts": [{"text": "weather and time?"}]},
        {
            "role": "model",
            "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}, "id": "call_a"}},
                {"functionCall": {"name": "get_time", "args": {}, "id": "call_b"}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {
                    "functionResponse": {
                        "name": "get_weather",
                        "response": {"forecast": "snow", "high_c": -2},
                        "id": "call_a",
                    }
                },
                {
                    "functionResponse": {
                        "name": "get_time",
                        "response": {"result": "12:00"},
                        "id": "call_b",
                    }
                },
            ],
        },
    ]


@pytest.mark.parametrize(
    ("content", "response"),
    [
        ('{"a": 1}', {"a": 1}),
        ("[1, 2]", {"result": "[1, 2]"}),  # JSON, but not an object
        ('"quoted"', {"result": '"quoted"'}),
        ("42", {"result": "42"}),
        ("not json {", {"result": "not json {"}),
        ("", {"result": ""}),
        ([{"type": "text", "text": '{"b":'}, {"type": "text", "text": " 2}"}], {"b": 2}),
    ],
)
def test_tool_result_content_object_or_wrapped(content: Any, response: Any) -> None:
    calls = [("call_a", "get_weather", '{"city": "Oslo"}')]
    request = translate({"messages": tool_turn(("call_a", content), calls=calls)})
    (part,) = request["contents"][-1]["parts"]
    assert part["functionResponse"]["response"] == response


def test_tool_result_for_an_unknown_call_is_a_400() -> None:
    calls = [("call_a", "get_weather", "{}")]
    error = rejected({"messages": tool_turn(("call_zzz", "x"), calls=calls)})
    assert error.param == "messages[2].tool_call_id"
    # A tool message before any assistant call fails the same way.
    early = rejected({"messages": [user(), {"role": "tool", "tool_call_id": "c", "content": "x"}]})
    assert early.param == "messages[1].tool_call_id"


def test_tool_results_of_a_later_turn_resolve_to_their_own_call() -> None:
    first = tool_turn(("call_a", "1"), calls=[("call_a", "f_one", "{}")])
    second = [
        {"role": "assistant", "content": "done"},
        user("again"),
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_c",
                    "type": "function",
                    "function": {"name": "f_two", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_c", "content": "2"},
        {"role": "tool", "tool_call_id": "call_a", "content": "late"},  # an earlier call's id
    ]
    request = translate({"messages": [*first, *second]})
    names = [p["functionResponse"]["name"] for p in parts_of(request) if "functionResponse" in p]
    assert names == ["f_one", "f_two", "f_one"]


def test_vertex_gets_no_function_call_ids() -> None:
    messages = tool_turn(("call_a", "{}"), ("call_b", "x"))
    developer = translate({"messages": messages})
    vertex = translate({"messages": messages}, VERTEX)
    dev_ids = [
        p.get("functionCall", p.get("functionResponse", {})).get("id") for p in parts_of(developer)
    ]
    assert dev_ids == [None, "call_a", "call_b", "call_a", "call_b"]
    for node in walk(vertex["contents"]):
        if isinstance(node, dict) and ("name" in node and ("args" in node or "response" in node)):
            assert "id" not in node
    # Names are still resolved from the ids on Vertex.
    responses = [p["functionResponse"]["name"] for p in parts_of(vertex) if "functionResponse" in p]
    assert responses == ["get_weather", "get_time"]


@pytest.mark.parametrize("arguments", ["not json", "[1]", 5])
def test_bad_tool_call_arguments_name_the_field(arguments: Any) -> None:
    error = rejected({"messages": tool_turn(calls=[("c", "f", arguments)])})
    assert error.param == "messages[1].tool_calls[0].function.arguments"


def test_tool_call_arguments_as_object_are_accepted() -> None:
    messages: list[dict[str, Any]] = tool_turn(("c", "{}"), calls=[("c", "f", "{}")])
    messages[1]["tool_calls"][0]["function"]["arguments"] = {"k": [1, 2]}
    request = translate({"messages": messages})
    assert request["contents"][1]["parts"][0]["functionCall"]["args"] == {"k": [1, 2]}


# -- media -----------------------------------------------------------------------------------


def test_images_data_uri_and_fetched_urls() -> None:
    url = "https://example.com/cat.jpg"
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "compare"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/PNG;base64,{PIXEL_PNG}"},
                    },
                    {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                ],
            }
        ]
    }
    assert image_urls(body) == [url]
    fetched = base64.b64encode(b"\xff\xd8jpeg").decode()
    request = translate(body, images={url: ("image/jpeg", fetched)})
    assert request["contents"][0]["parts"] == [
        {"text": "compare"},
        {"inlineData": {"mimeType": "image/png", "data": PIXEL_PNG}},
        {"inlineData": {"mimeType": "image/jpeg", "data": fetched}},
    ]
    # Not fetched (not in the map): a 400 naming the part, never a URL sent to Gemini.
    error = rejected(body)
    assert error.param == "messages[0].content[2].image_url"


@pytest.mark.parametrize(
    "url", ["data:image/png;base64,***", "data:image/png,rawbytes", "ftp://x/y.png", "file:///etc"]
)
def test_bad_image_urls_are_400(url: str) -> None:
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
        ]
    }
    assert image_urls(body) == []
    assert rejected(body).param is not None


def test_audio_and_inline_files() -> None:
    wav = base64.b64encode(b"RIFF....WAVE").decode()
    pdf = base64.b64encode(b"%PDF-1.7").decode()
    request = translate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
                        {
                            "type": "file",
                            "file": {
                                "filename": "a.pdf",
                                "file_data": f"data:application/pdf;base64,{pdf}",
                            },
                        },
                    ],
                }
            ]
        }
    )
    assert request["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "audio/wav", "data": wav}},
        {"inlineData": {"mimeType": "application/pdf", "data": pdf}},
    ]
    assert (
        rejected(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "file", "file": {"file_id": "f1"}}]}
                ]
            }
        ).param
        == "messages[0].content[0]"
    )
    assert (
        rejected(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
                ]
            }
        ).param
        == "messages[0].content[0]"
    )


# -- tools -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_tool_choice_modes(choice: Any, config: dict[str, Any]) -> None:
    request = translate({"messages": [user()], "tools": [WEATHER_TOOL], "tool_choice": choice})
    assert request["toolConfig"] == {"functionCallingConfig": config}
    assert request["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather forecast for a city.",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                }
            ]
        }
    ]


def test_tools_without_tool_choice_and_tool_choice_without_tools() -> None:
    assert "toolConfig" not in translate({"messages": [user()], "tools": [WEATHER_TOOL]})
    alone = translate({"messages": [user()], "tool_choice": "auto"})
    assert "tools" not in alone and "toolConfig" not in alone
    error = rejected({"messages": [user()], "tools": [WEATHER_TOOL], "tool_choice": "sometimes"})
    assert error.param == "tool_choice"


def test_non_function_tools_and_nameless_functions_are_400() -> None:
    assert rejected({"messages": [user()], "tools": [{"type": "web_search"}]}).param == "tools[0]"
    nameless = {"type": "function", "function": {"parameters": {}}}
    assert rejected({"messages": [user()], "tools": [WEATHER_TOOL, nameless]}).param == "tools[1]"


def test_legacy_functions_and_function_call() -> None:
    request = translate(
        {
            "messages": [user()],
            "functions": [WEATHER_TOOL["function"]],
            "function_call": {"name": "get_weather"},
        }
    )
    assert request["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    assert request["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }


@pytest.mark.parametrize(
    "parameters",
    [
        None,
        {},
        {"type": "object"},
        {"type": "object", "properties": {}},
        {"type": "object", "properties": {}, "additionalProperties": False, "required": []},
    ],
)
def test_a_tool_without_arguments_gets_no_parameters(parameters: Any) -> None:
    function: dict[str, Any] = {"name": "now", "description": "The time."}
    if parameters is not None:
        function["parameters"] = parameters
    for options in (DEV, VERTEX):
        request = translate(
            {"messages": [user()], "tools": [{"type": "function", "function": function}]}, options
        )
        assert request["tools"] == [
            {"functionDeclarations": [{"name": "now", "description": "The time."}]}
        ]


# -- schemas ---------------------------------------------------------------------------------

NASTY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "urn:nasty",
    "title": "Order",
    "type": "object",
    "additionalProperties": False,
    "$defs": {
        "Money": {
            "type": "object",
            "properties": {
                "amount": {"type": "number", "exclusiveMinimum": 0, "multipleOf": 0.01},
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            },
            "required": ["amount", "currency"],
            "additionalProperties": False,
        },
        "Status": {"enum": ["open", "closed", 3]},
    },
    "definitions": {"Legacy": {"type": "integer", "examples": [1]}},
    "properties": {
        "id": {"type": ["string", "null"], "format": "uuid", "description": "Order id"},
        "total": {"$ref": "#/$defs/Money", "description": "Grand total"},
        "status": {"$ref": "#/$defs/Status"},
        "kind": {"const": "order"},
        "legacy": {"$ref": "#/definitions/Legacy"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "payment": {
            "oneOf": [
                {"type": "object", "properties": {"card": {"type": "string"}}},
                {"type": "object", "properties": {"iban": {"type": "string"}}},
            ]
        },
        "tags": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "uniqueItems": True,
            "minItems": 0,
        },
        "extra": {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
            ]
        },
        "either": {"type": ["integer", "string"]},
        "meta": {
            "type": "object",
            "properties": {"k": {"type": "string"}},
            "patternProperties": {"^x-": {"type": "string"}},
        },
    },
    "required": ["id", "total", "kind", "gone"],
    "not": {"required": ["forbidden"]},
    "if": {"properties": {"kind": {"const": "x"}}},
    "then": {"required": ["tags"]},
}
_NOT_IN_SUBSET = {
    "$ref",
    "$defs",
    "definitions",
    "$schema",
    "$id",
    "oneOf",
    "allOf",
    "const",
    "not",
    "if",
    "then",
    "exclusiveMinimum",
    "multipleOf",
    "examples",
    "patternProperties",
    "uniqueItems",
}


def assert_gemini_subset(schema: Any, *, vertex: bool) -> None:
    """No keyword outside Gemini's subset, no list types, no OBJECT with empty properties."""
    types.Schema.model_validate(schema)
    for node in walk(schema):
        if not isinstance(node, dict) or not ("type" in node or "properties" in node):
            continue
        assert not (_NOT_IN_SUBSET & set(node)), node
        if not vertex:
            assert "additionalProperties" not in node, node
        assert not isinstance(node.get("type"), list), node
        if node.get("type") == "object":
            assert node.get("properties"), f"OBJECT with empty properties: {node}"
        if isinstance(node.get("enum"), list):
            assert all(isinstance(v, str) for v in node["enum"]), node
        if isinstance(node.get("required"), list) and isinstance(node.get("properties"), dict):
            assert set(node["required"]) <= set(node["properties"]), node


def test_nasty_schema_in_the_developer_subset() -> None:
    out = to_gemini_schema(copy.deepcopy(NASTY_SCHEMA))
    assert_gemini_subset(out, vertex=False)
    props = out["properties"]
    assert props["id"] == {
        "type": "string",
        "nullable": True,
        "format": "uuid",
        "description": "Order id",
    }
    assert props["total"]["description"] == "Grand total"  # the $ref site's sibling wins
    assert props["total"]["properties"]["currency"] == {"type": "string", "pattern": "^[A-Z]{3}$"}
    assert props["total"]["properties"]["amount"] == {"type": "number"}
    assert props["total"]["required"] == ["amount", "currency"]
    assert props["status"] == {"enum": ["open", "closed", "3"], "type": "string"}
    assert props["kind"]["enum"] == ["order"]
    assert props["legacy"] == {"type": "integer"}
    assert props["note"]["nullable"] is True and props["note"]["type"] == "string"
    assert [sorted(o["properties"]) for o in props["payment"]["anyOf"]] == [["card"], ["iban"]]
    assert props["tags"] == {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "minItems": 0,
    }
    assert sorted(props["extra"]["properties"]) == ["a", "b"]
    assert sorted(props["extra"]["required"]) == ["a", "b"]
    assert props["either"] == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert out["required"] == ["id", "total", "kind"]  # "gone" names no property
    assert out["title"] == "Order"


def test_additional_properties_false_is_dropped_and_a_typed_map_needs_json_schema() -> None:
    # "No extra keys" says nothing the subset needs: dropped on both APIs.
    for vertex in (False, True):
        out = to_gemini_schema(copy.deepcopy(NASTY_SCHEMA), vertex=vertex)
        assert_gemini_subset(out, vertex=vertex)
        assert all("additionalProperties" not in n for n in walk(out) if isinstance(n, dict))
    # A typed map (an object whose keys are free): the subset cannot say it (an object needs
    # properties), so the schema goes as JSON Schema instead, unchanged, on both APIs.
    typed_map = {
        "type": "object",
        "properties": {"scores": {"type": "object", "additionalProperties": {"type": "integer"}}},
    }
    for vertex in (False, True):
        fields = schema_fields(
            typed_map, vertex=vertex, subset_key="parameters", json_key="parametersJsonSchema"
        )
        assert fields == {"parametersJsonSchema": typed_map}
    # Alongside real properties, Vertex keeps additionalProperties in the subset.
    with_props = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "additionalProperties": {"type": "integer"},
    }
    vertex_fields = schema_fields(
        with_props, vertex=True, subset_key="parameters", json_key="parametersJsonSchema"
    )
    assert vertex_fields["parameters"]["additionalProperties"] == {"type": "integer"}


def test_nasty_schema_as_tool_and_response_format_validates() -> None:
    for options in (DEV, VERTEX):
        request = translate(
            {
                "messages": [user()],
                "tools": [
                    {"type": "function", "function": {"name": "order", "parameters": NASTY_SCHEMA}}
                ],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "o", "schema": NASTY_SCHEMA},
                },
            },
            options,
        )
        assert_gemini_subset(
            request["tools"][0]["functionDeclarations"][0]["parameters"], vertex=options.vertex
        )
        assert_gemini_subset(request["generationConfig"]["responseSchema"], vertex=options.vertex)


def test_nested_object_without_properties_is_not_sent_empty() -> None:
    """Gemini rejects an OBJECT with empty properties at any depth (the fake does too:
    ``...parameters.properties["meta"].properties: should be non-empty for OBJECT type``)."""
    schema = {
        "type": "object",
        "properties": {"q": {"type": "string"}, "meta": {"type": "object", "required": ["x"]}},
    }
    # The subset cannot say "any object"; JSON Schema can, so the schema goes that way, intact.
    fields = schema_fields(
        schema, vertex=False, subset_key="parameters", json_key="parametersJsonSchema"
    )
    assert fields == {"parametersJsonSchema": schema}


RECURSIVE: dict[str, Any] = {
    "type": "object",
    "properties": {"root": {"$ref": "#/$defs/Node"}},
    "$defs": {
        "Node": {
            "type": "object",
            "properties": {
                "value": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
            },
            "required": ["value"],
        }
    },
}


def test_a_recursive_ref_goes_as_json_schema() -> None:
    """The subset has no recursion; cutting it would change the schema, so it goes as JSON
    Schema (which keeps ``$ref``) instead."""
    fields = schema_fields(
        copy.deepcopy(RECURSIVE), vertex=False, subset_key="responseSchema",
        json_key="responseJsonSchema",
    )
    assert fields == {"responseJsonSchema": RECURSIVE}


def test_recursive_schema_with_two_self_references_stays_small() -> None:
    """Two recursive references per level: the unrolled schema must not grow exponentially (a
    client's tool schema must not make the gateway build megabytes of JSON)."""
    schema = {
        "$ref": "#/$defs/Tree",
        "$defs": {
            "Tree": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "left": {"$ref": "#/$defs/Tree"},
                    "right": {"$ref": "#/$defs/Tree"},
                },
            }
        },
    }
    fields = schema_fields(
        schema, vertex=False, subset_key="parameters", json_key="parametersJsonSchema"
    )
    assert fields == {"parametersJsonSchema": schema}
    assert len(orjson.dumps(fields)) < 256 * 1024


def test_response_schema_keeps_property_order() -> None:
    """Gemini orders the keys of structured output by ``propertyOrdering`` (the SDK adds it;
    the golden ``json_schema`` fixture has it): without it, JSON answers come back in another
    key order than the schema's."""
    request = translate(load("json_schema")["openai_request"])
    schema = request["generationConfig"]["responseSchema"]
    assert schema.get("propertyOrdering") == ["name", "born"]


# -- schema property test ---------------------------------------------------------------------

_NAMES = st.sampled_from(["a", "b", "c", "d"])
_INT = st.integers(-(2**53), 2**53)  # what a JSON body parsed by orjson can hold
_SCALAR_TYPES = st.sampled_from(["string", "integer", "number", "boolean", "null"])
_JUNK = st.fixed_dictionaries(
    {},
    optional={
        "description": st.text(max_size=5),
        "title": st.text(max_size=5),
        "format": st.sampled_from(["date-time", "uuid", "email", "int32"]),
        "examples": st.lists(_INT, max_size=2),
        "exclusiveMinimum": _INT,
        "multipleOf": st.integers(min_value=1, max_value=100),
        "$comment": st.text(max_size=3),
        "default": st.none() | _INT | st.text(max_size=3),
        "deprecated": st.booleans(),
    },
)


def _schemas(with_refs: bool) -> st.SearchStrategy[Any]:
    leaf = st.one_of(
        st.builds(lambda t, j: {"type": t, **j}, _SCALAR_TYPES, _JUNK),
        st.builds(lambda t: {"type": list(t)}, st.lists(_SCALAR_TYPES, min_size=1, max_size=3)),
        st.builds(lambda v: {"const": v}, _INT | st.text(max_size=3) | st.booleans()),
        st.builds(
            lambda v: {"enum": v},
            st.lists(_INT | st.text(max_size=3) | st.none(), min_size=1, max_size=3),
        ),
        st.just({"type": "object"}),
        st.just({"type": "object", "properties": {}}),
        st.just({}),
    )
    if with_refs:
        leaf = leaf | st.sampled_from([{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}])

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        props = st.dictionaries(_NAMES, children, max_size=3)
        obj_type = st.sampled_from(["object", ["object", "null"], None])

        def make_object(p: dict[str, Any], t: Any, req: list[str], extra: Any) -> dict[str, Any]:
            node: dict[str, Any] = {"properties": p}
            if t is not None:
                node["type"] = t
            if req:
                node["required"] = req
            if extra is not None:
                node["additionalProperties"] = extra
            return node

        return st.one_of(
            st.builds(
                make_object,
                props,
                obj_type,
                st.lists(_NAMES, max_size=3),
                st.none() | st.booleans() | children,
            ),
            st.builds(lambda i: {"type": "array", "items": i}, children),
            st.builds(lambda o: {"anyOf": o}, st.lists(children, min_size=1, max_size=3)),
            st.builds(lambda o: {"oneOf": o}, st.lists(children, min_size=1, max_size=3)),
            st.builds(lambda o: {"allOf": o}, st.lists(children, min_size=1, max_size=2)),
            st.builds(lambda t, j: {"type": ["array", "null"], "items": t, **j}, children, _JUNK),
        )

    return st.recursive(leaf, extend, max_leaves=12)


@st.composite
def json_schemas(draw: st.DrawFn) -> Any:
    root = draw(_schemas(with_refs=True))
    if draw(st.booleans()):
        root = {"type": "object", "properties": {"x": root}}
    defs = {"A": draw(_schemas(with_refs=False)), "B": draw(_schemas(with_refs=True))}
    # B may refer to itself (recursion), but once: several self-references unroll into an
    # exponentially large schema (test_recursive_schema_with_two_self_references_stays_small).
    assume(orjson.dumps(defs["B"]).count(b"#/$defs/B") <= 1)
    if isinstance(root, dict):
        root = {**root, "$defs": defs}
    return root


def subset_of(schema: Any, vertex: bool) -> Any:
    """The subset schema sent for ``schema`` — None when it goes as JSON Schema (checked here:
    unchanged) or is an argument-less root object."""
    before = copy.deepcopy(schema)
    fields = schema_fields(schema, vertex=vertex, subset_key="s", json_key="j")
    assert schema == before, "the client's schema must not be modified"
    if "j" in fields:
        assert fields["j"] == before
        return None
    return fields.get("s")


@settings(deadline=None, max_examples=150)
@given(json_schemas(), st.booleans())
def test_schema_subset_property(schema: Any, vertex: bool) -> None:
    """No ``$ref``/``$defs``/``oneOf``/``const``/list type survives; the SDK accepts it."""
    out = subset_of(schema, vertex)
    if out is None:
        return  # an argument-less object at the root: the caller omits it
    text = orjson.dumps(out).decode()
    assert "$ref" not in text and "$defs" not in text
    types.Schema.model_validate(out)
    for node in walk(out):
        if isinstance(node, dict) and ("type" in node or "properties" in node):
            assert not ({"oneOf", "const", "$ref", "$defs", "allOf"} & set(node)), node
            assert not isinstance(node.get("type"), list), node
            if not vertex:
                assert "additionalProperties" not in node, node


@settings(deadline=None, max_examples=150)
@given(json_schemas(), st.booleans())
def test_schema_subset_property_no_empty_objects(schema: Any, vertex: bool) -> None:
    """Never an OBJECT with empty properties, at any depth (Gemini answers 400)."""
    out = subset_of(schema, vertex)
    if out is not None:
        assert_gemini_subset(out, vertex=vertex)


# -- generation config -----------------------------------------------------------------------


def test_sampling_fields_map_one_to_one() -> None:
    request = translate(
        {
            "messages": [user()],
            "temperature": 0.3,
            "top_p": 0.9,
            "top_k": 40,
            "seed": 7,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "max_tokens": 100,
            "n": 3,
            "stop": "END",
        }
    )
    assert request["generationConfig"] == {
        "temperature": 0.3,
        "topP": 0.9,
        "topK": 40,
        "seed": 7,
        "presencePenalty": 0.5,
        "frequencyPenalty": -0.5,
        "candidateCount": 3,
        "maxOutputTokens": 100,
        "stopSequences": ["END"],
    }


def test_generation_config_edge_values() -> None:
    assert "generationConfig" not in translate({"messages": [user()], "n": 1, "stop": []})
    zero = translate({"messages": [user()], "temperature": 0, "top_p": 0})
    assert zero["generationConfig"] == {"temperature": 0, "topP": 0}  # 0 is a value, not unset
    both = translate({"messages": [user()], "max_tokens": 10, "max_completion_tokens": 20})
    assert both["generationConfig"]["maxOutputTokens"] == 20
    stops = translate({"messages": [user()], "stop": ["a", "b"]})
    assert stops["generationConfig"]["stopSequences"] == ["a", "b"]


def test_response_formats() -> None:
    obj = translate({"messages": [user()], "response_format": {"type": "json_object"}})
    assert obj["generationConfig"] == {"responseMimeType": "application/json"}
    text = translate({"messages": [user()], "response_format": {"type": "text"}})
    assert "generationConfig" not in text
    empty = translate(
        {
            "messages": [user()],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "properties": {}}},
            },
        }
    )
    assert empty["generationConfig"] == {"responseMimeType": "application/json"}
    for bad in ({"type": "yaml"}, {"type": "json_schema", "json_schema": {"name": "x"}}):
        assert rejected({"messages": [user()], "response_format": bad}).param == "response_format"


@pytest.mark.parametrize(
    ("effort", "budget"),
    [("minimal", 512), ("low", 1024), ("medium", 8192), ("high", 24576)],
)
def test_reasoning_effort_on_gemini_2_5_is_a_budget(effort: str, budget: int) -> None:
    request = translate(
        {"model": "gemini-2.5-pro", "messages": [user()], "reasoning_effort": effort}
    )
    assert request["generationConfig"]["thinkingConfig"] == {
        "thinkingBudget": budget,
        "includeThoughts": True,
    }


@pytest.mark.parametrize(
    ("effort", "level"),
    [("minimal", "MINIMAL"), ("low", "LOW"), ("medium", "MEDIUM"), ("high", "HIGH")],
)
def test_reasoning_effort_on_gemini_3_is_a_level(effort: str, level: str) -> None:
    for model in ("gemini-3-pro-preview", "gemini-3-flash-preview"):
        request = translate({"model": model, "messages": [user()], "reasoning_effort": effort})
        assert request["generationConfig"]["thinkingConfig"] == {
            "thinkingLevel": level,
            "includeThoughts": True,
        }


def test_reasoning_effort_none_and_unknown() -> None:
    off = translate({"messages": [user()], "reasoning_effort": "none"})
    assert off["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}
    assert rejected({"messages": [user()], "reasoning_effort": "max"}).param == "reasoning_effort"


def test_extra_body_is_deep_merged() -> None:
    extra = {
        "generationConfig": {"thinkingConfig": {"includeThoughts": True}, "topK": 5},
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "OFF"}],
    }
    frozen = copy.deepcopy(extra)
    request = translate(
        {"messages": [user()], "temperature": 0.1, "reasoning_effort": "low"}, extra_body=extra
    )
    assert request["generationConfig"] == {
        "temperature": 0.1,
        "topK": 5,
        "thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True},
    }
    assert request["safetySettings"] == frozen["safetySettings"]
    request["safetySettings"][0]["threshold"] = "CHANGED"
    request["generationConfig"]["thinkingConfig"]["includeThoughts"] = False
    assert extra == frozen, "the connection's extra_body must not be shared with a request"


# -- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("logit_bias", {"50256": -100}),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("audio", {"voice": "x"}),
        ("modalities", ["audio"]),
        ("prediction", {"type": "content"}),
        ("web_search_options", {}),
        ("some_vendor_field", 1),
    ],
)
def test_unsupported_parameters_are_named(param: str, value: Any) -> None:
    error = rejected({"messages": [user()], param: value})
    assert error.param == param
    assert param in error.message
    assert error.code == "unsupported_parameter"
    dropped = translate({"messages": [user()], param: value}, GeminiOptions(drop_unsupported=True))
    assert dropped == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def test_neutral_and_deliberately_dropped_parameters() -> None:
    request = translate(
        {
            "messages": [user()],
            "logprobs": False,
            "logit_bias": {},
            "user": "u-1",
            "parallel_tool_calls": False,
            "metadata": {"k": "v"},
            "store": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "service_tier": "auto",
        }
    )
    assert request == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


# -- thought signatures ----------------------------------------------------------------------


def signed(signature: str) -> dict[str, Any]:
    return {"google": {"thought_signature": signature}}


def assistant_calls(*calls: tuple[str, str | None], text: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "tool_calls": []}
    for call_id, signature in calls:
        call: dict[str, Any] = {
            "id": call_id,
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        }
        if signature is not None:
            call["extra_content"] = signed(signature)
        message["tool_calls"].append(call)
    return message


def results(*ids: str) -> list[dict[str, Any]]:
    return [{"role": "tool", "tool_call_id": i, "content": "ok"} for i in ids]


def call_signatures(request: dict[str, Any]) -> list[str | None]:
    return [p.get("thoughtSignature") for p in parts_of(request) if "functionCall" in p]


def test_signatures_go_back_on_the_same_part() -> None:
    messages = [
        user("q"),
        assistant_calls(("c1", SIG_A), ("c2", None), text="Let me check."),
        *results("c1", "c2"),
    ]
    for model in (MODEL, MODEL3):
        request = translate({"model": model, "messages": messages})
        model_parts = request["contents"][1]["parts"]
        assert model_parts[0] == {"text": "Let me check."}
        assert model_parts[1]["thoughtSignature"] == SIG_A
        assert model_parts[1]["functionCall"]["id"] == "c1"
        assert "thoughtSignature" not in model_parts[2]  # not the first call: never a placeholder


def test_text_signature_goes_back_on_the_last_text_part() -> None:
    message = {
        "role": "assistant",
        "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
        "extra_content": signed(SIG_B),
    }
    request = translate({"model": MODEL3, "messages": [user(), message, user("more")]})
    assert request["contents"][1]["parts"] == [
        {"text": "Hello"},
        {"text": " there", "thoughtSignature": SIG_B},
    ]


def test_gemini_3_call_without_signature_gets_the_placeholder_on_the_first_call_only() -> None:
    messages = [
        user("q"),
        assistant_calls(("c1", None), ("c2", None)),
        *results("c1", "c2"),
        assistant_calls(("c3", None)),  # the next step of the same turn
        *results("c3"),
    ]
    for model in ("gemini-3-pro-preview", "models/gemini-3-flash-preview"):
        request = translate({"model": model, "messages": messages})
        assert call_signatures(request) == [SKIP_SIGNATURE, None, SKIP_SIGNATURE]
    # Gemini 2.5 does not enforce signatures: nothing is invented.
    assert call_signatures(translate({"model": MODEL, "messages": messages})) == [None] * 3
    # A real signature on the first call is kept; the placeholder never replaces it.
    kept = translate(
        {"model": MODEL3, "messages": [user(), assistant_calls(("c1", SIG_A)), *results("c1")]}
    )
    assert call_signatures(kept) == [SIG_A]


@pytest.mark.parametrize(
    "extra",
    [
        None,
        {},
        {"google": {}},
        {"google": {"thought_signature": ""}},
        {"other": {"thought_signature": SIG_A}},
        "junk",
    ],
)
def test_malformed_extra_content_counts_as_no_signature(extra: Any) -> None:
    message = assistant_calls(("c1", None))
    message["tool_calls"][0]["extra_content"] = extra
    request = translate({"model": MODEL3, "messages": [user(), message, *results("c1")]})
    assert call_signatures(request) == [SKIP_SIGNATURE]


def test_signature_on_a_separate_thought_part_is_echoed_back() -> None:
    """translation.md 5.2.12: the signature may ride on a thought part instead of the call;
    it must still reach the next request (here it would otherwise be replaced by the
    placeholder, losing the model's reasoning state)."""
    answer = gemini_answer(
        candidate(
            [
                {"text": "planning", "thought": True, "thoughtSignature": SIG_A},
                {"functionCall": {"id": "fc1", "name": "get_weather", "args": {"city": "Oslo"}}},
            ]
        ),
        modelVersion=MODEL3,
    )
    message = from_gemini_response(answer, RequestInfo())["choices"][0]["message"]
    request = translate({"model": MODEL3, "messages": [user(), message, *results("fc1")]})
    signatures = [p.get("thoughtSignature") for p in request["contents"][1]["parts"]]
    assert SIG_A in signatures


def test_foreign_tool_call_ids_are_kept_verbatim() -> None:
    """Ids replayed from other providers (``functions.Bash:0``) must map both ways unchanged."""
    calls = [("functions.Bash:0", "get_weather", "{}"), ("toolu_01/ä", "get_time", "{}")]
    request = translate(
        {"messages": tool_turn(("toolu_01/ä", "b"), ("functions.Bash:0", "a"), calls=calls)}
    )
    assert [p["functionCall"]["id"] for p in request["contents"][1]["parts"]] == [
        "functions.Bash:0",
        "toolu_01/ä",
    ]
    assert [
        (p["functionResponse"]["id"], p["functionResponse"]["name"])
        for p in request["contents"][2]["parts"]
    ] == [
        ("toolu_01/ä", "get_time"),
        ("functions.Bash:0", "get_weather"),
    ]


# -- golden requests -------------------------------------------------------------------------


def upper_types(node: Any) -> Any:
    """Schema ``type`` values upper-cased, ``propertyOrdering`` removed (see the caller)."""
    if isinstance(node, list):
        return [upper_types(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "propertyOrdering":
            continue
        if key == "type" and isinstance(value, str):
            out[key] = value.upper()
        elif key == "properties" and isinstance(value, dict):
            out[key] = {k: upper_types(v) for k, v in value.items()}
        else:
            out[key] = upper_types(value)
    return out


@pytest.mark.parametrize(
    "name",
    [n for n in FIXTURE_NAMES if "openai_request" in load(n) and "gemini_request" in load(n)],
)
def test_golden_request_translation(name: str) -> None:
    """The fixture's OpenAI request translates to its Gemini request. Two documented
    normalisations: schema ``type`` case (the API takes both; the SDK upper-cases) and
    ``propertyOrdering`` (checked on its own in ``test_response_schema_keeps_property_order``)."""
    data = load(name)
    request = translate(data["openai_request"])
    assert upper_types(request) == upper_types(data["gemini_request"])
    if "propertyOrdering" not in orjson.dumps(data["gemini_request"]).decode():
        assert request == data["gemini_request"]  # exactly, when nothing needs normalising


def test_golden_thinking_tool_round_trip() -> None:
    """thinking_with_tool_use: the OpenAI side of both requests is built from the fixture's
    own answer (the assistant message as the gateway returns it, sent back unchanged)."""
    data = load("thinking_with_tool_use")
    extra_body = {"generationConfig": {"thinkingConfig": {"includeThoughts": True}}}
    first = {
        "model": MODEL3,
        "messages": [user("Weather in Oslo tomorrow?")],
        "tools": [WEATHER_TOOL],
    }
    request = translate(first, extra_body=extra_body)
    assert upper_types(request) == upper_types(data["gemini_request"])

    answer = from_gemini_response(data["response"], RequestInfo())
    message = answer["choices"][0]["message"]
    (call,) = message["tool_calls"]
    followup = {
        **first,
        "messages": [
            *first["messages"],
            message,  # as returned: reasoning_content, tool_calls with extra_content, refusal
            {
                "role": "tool",
                "tool_call_id": call["id"],
                "content": orjson.dumps({"result": {"forecast": "snow", "high_c": -2}}).decode(),
            },
        ],
    }
    second = translate(followup, extra_body=extra_body)
    assert upper_types(second) == upper_types(data["gemini_followup_request"])


# ============================================================================================
# Answers


@pytest.mark.parametrize("name", [n for n in FIXTURE_NAMES if load(n)["response"] is not None])
def test_golden_response(name: str) -> None:
    data = load(name)
    completion = from_gemini_response(data["response"], RequestInfo())
    assert completion["object"] == "chat.completion"
    assert completion["model"] == data["response"]["modelVersion"]
    assert completion["id"] == f"chatcmpl-{data['response']['responseId']}"
    assert fold_completion(completion) == data["expect"]


def test_response_tool_call_ids_and_signatures() -> None:
    multi = from_gemini_response(load("multi_tool_stream")["response"], RequestInfo())
    calls = multi["choices"][0]["message"]["tool_calls"]
    assert [c["id"] for c in calls] == ["5e0sl1qk", "x3ex9bwc"]  # Gemini's ids kept
    parts = load("multi_tool_stream")["response"]["candidates"][0]["content"]["parts"]
    assert calls[0]["extra_content"] == signed(parts[0]["thoughtSignature"])
    assert "extra_content" not in calls[1]

    data = load("text_and_tool")["response"]
    first = from_gemini_response(data, RequestInfo())["choices"][0]["message"]
    second = from_gemini_response(data, RequestInfo())["choices"][0]["message"]
    (a,), (b,) = first["tool_calls"], second["tool_calls"]
    assert a["id"].startswith("call_") and len(a["id"]) > len("call_") + 8  # synthesised
    assert a["id"] != b["id"]
    signature = data["candidates"][0]["content"]["parts"][1]["thoughtSignature"]
    assert a["extra_content"] == signed(signature)
    assert "extra_content" not in first  # the signature belongs to the call, not the text


def gemini_answer(*candidates: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"candidates": list(candidates), "modelVersion": MODEL, "responseId": "r1", **top}


def candidate(
    parts: list[dict[str, Any]],
    finish: str | None = "STOP",
    index: int | None = 0,
) -> dict[str, Any]:
    out: dict[str, Any] = {"content": {"role": "model", "parts": parts}}
    if finish is not None:
        out["finishReason"] = finish
    if index is not None:
        out["index"] = index
    return out


def test_text_signature_and_thoughts_on_the_message() -> None:
    completion = from_gemini_response(
        gemini_answer(
            candidate(
                [
                    {"text": "hmm ", "thought": True},
                    {"text": "considered", "thought": True},
                    {"text": "Answer", "thoughtSignature": SIG_A},
                ]
            )
        ),
        RequestInfo(),
    )
    message = completion["choices"][0]["message"]
    assert message["content"] == "Answer"
    assert message["reasoning_content"] == "hmm considered"
    assert message["extra_content"] == signed(SIG_A)
    assert "tool_calls" not in message


def test_candidates_become_choices_in_index_order() -> None:
    completion = from_gemini_response(
        gemini_answer(
            candidate([{"text": "second"}], "MAX_TOKENS", index=1),
            candidate([{"text": "first"}], "STOP", index=0),
        ),
        RequestInfo(candidates=2),
    )
    assert [
        (c["index"], c["message"]["content"], c["finish_reason"]) for c in completion["choices"]
    ] == [(0, "first", "stop"), (1, "second", "length")]
    # Missing index (candidate 0 of a one-candidate answer, proto3 omits zeros).
    lone = from_gemini_response(
        gemini_answer(candidate([{"text": "x"}], index=None)), RequestInfo()
    )
    assert lone["choices"][0]["index"] == 0


@pytest.mark.parametrize("reason", sorted(FINISH_REASONS))
def test_finish_reason_table(reason: str) -> None:
    expected = FINISH_REASONS[reason]
    completion = from_gemini_response(
        gemini_answer(candidate([{"text": "x"}], reason)), RequestInfo()
    )
    assert completion["choices"][0]["finish_reason"] == expected
    if reason == "STOP":
        call = candidate([{"functionCall": {"name": "f", "args": {}}}], reason)
        with_call = from_gemini_response(gemini_answer(call), RequestInfo())
        assert with_call["choices"][0]["finish_reason"] == "tool_calls"


def test_finish_reason_rules() -> None:
    assert finish_reason("STOP", has_tool_calls=True) == "tool_calls"
    assert finish_reason("MAX_TOKENS", has_tool_calls=True) == "length"
    assert finish_reason("SAFETY", has_tool_calls=True) == "content_filter"
    for other in ("OTHER", "MALFORMED_FUNCTION_CALL", "FINISH_REASON_UNSPECIFIED", "NEW_ONE"):
        assert finish_reason(other, has_tool_calls=False) == "stop"
    assert {
        FINISH_REASONS[r] for r in ("RECITATION", "SPII", "BLOCKLIST", "PROHIBITED_CONTENT")
    } == {"content_filter"}


def test_usage_translation() -> None:
    usage = translate_usage(
        {
            "promptTokenCount": 100,
            "cachedContentTokenCount": 60,
            "candidatesTokenCount": 10,
            "thoughtsTokenCount": 5,
            "toolUsePromptTokenCount": 3,
            "totalTokenCount": 118,
        }
    )
    assert usage == {
        "prompt_tokens": 103,
        "completion_tokens": 15,
        "total_tokens": 118,
        "prompt_tokens_details": {"cached_tokens": 60},
        "completion_tokens_details": {"reasoning_tokens": 5},
    }
    assert translate_usage(None) is None
    empty = translate_usage({})
    assert empty is not None and empty["total_tokens"] == 0


def test_blocked_prompt_non_stream() -> None:
    completion = from_gemini_response(load("safety_block")["response"], RequestInfo())
    assert completion["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": None, "refusal": None},
            "logprobs": None,
            "finish_reason": "content_filter",
        }
    ]


# ============================================================================================
# Streams


@pytest.mark.parametrize("name", STREAM_FIXTURES)
def test_golden_stream(name: str) -> None:
    data = load(name)
    chunks, error = run_stream([data["stream"].encode()])
    expect = data.get("expect_stream", data["expect"])
    folded = fold_chunks(chunks, error)
    if name == "midstream_error":
        # The usage of a failed stream is not emitted as a chunk (the translator raises first);
        # the gateway's record has what was seen. Everything else must match.
        assert folded.pop("usage") is None
        expect = {k: v for k, v in expect.items() if k != "usage"}
    assert folded == expect
    assert all(
        c["model"] == orjson.loads(data["stream"].split("\r\n")[0][6:])["modelVersion"]
        for c in chunks
    )
    if error is None:
        assert len({c["id"] for c in chunks}) == 1, "one id for the whole stream"


def test_midstream_error_is_an_upstream_error_with_the_mapped_status() -> None:
    chunks, error = run_stream([load("midstream_error")["stream"].encode()])
    assert isinstance(error, UpstreamError)
    assert error.http_status == 503
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "The answer is"


def test_stream_tool_call_deltas_carry_signature_and_index() -> None:
    data = load("multi_tool_stream")
    chunks, error = run_stream([data["stream"].encode()])
    assert error is None
    deltas = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert [d["index"] for d in deltas] == [0, 1]
    assert [d["id"] for d in deltas] == ["5e0sl1qk", "x3ex9bwc"]
    assert deltas[0]["type"] == "function"
    signature = data["response"]["candidates"][0]["content"]["parts"][0]["thoughtSignature"]
    assert deltas[0]["extra_content"] == signed(signature)
    assert "extra_content" not in deltas[1]
    # Whole arguments in one delta (Gemini sends calls complete).
    assert orjson.loads(deltas[1]["function"]["arguments"]) == {"city": "London", "unit": "celsius"}


def test_stream_signature_only_final_part_and_thoughts() -> None:
    body = sse(
        gemini_answer(candidate([{"text": "pondering", "thought": True}], None)),
        gemini_answer(candidate([{"text": "Hi"}], None)),
        gemini_answer(
            candidate([{"text": "", "thoughtSignature": SIG_A}], "STOP"),
            usageMetadata={
                "promptTokenCount": 2,
                "candidatesTokenCount": 1,
                "thoughtsTokenCount": 4,
                "totalTokenCount": 7,
            },
        ),
    )
    chunks, error = run_stream([body])
    assert error is None
    (choice,) = accumulate(chunks).values()
    assert (choice["content"], choice["reasoning"], choice["finish"]) == ("Hi", "pondering", "stop")
    assert choice["extra"] == [signed(SIG_A)]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert "" not in contents, "no empty content deltas (the role chunk has no content)"
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_stream_text_and_call_in_one_chunk() -> None:
    """translation.md 5.3.16: text and a call in the same chunk both come through."""
    body = sse(
        gemini_answer(
            candidate([{"text": "Let me look."}, {"functionCall": {"name": "get_time"}}], "STOP")
        )
    )
    chunks, error = run_stream([body])
    assert error is None
    choice = accumulate(chunks)[0]
    assert choice["content"] == "Let me look."
    assert choice["calls"][0]["name"] == "get_time"
    assert choice["calls"][0]["arguments"] == "{}"  # no args -> "{}", never ""
    assert choice["calls"][0]["id"].startswith("call_")
    assert choice["finish"] == "tool_calls"


def test_stream_candidates_keep_their_choice_index() -> None:
    body = sse(
        gemini_answer(candidate([{"text": "a1"}], None, 0), candidate([{"text": "b1"}], None, 1)),
        gemini_answer(
            candidate([{"text": "a2"}], "STOP", 0),
            candidate([{"functionCall": {"name": "f", "args": {"x": 1}}}], "STOP", 1),
        ),
    )
    chunks, error = run_stream([body], RequestInfo(candidates=2))
    assert error is None
    choices = accumulate(chunks)
    assert choices[0]["content"] == "a1a2" and choices[0]["finish"] == "stop"
    assert choices[1]["content"] == "b1" and choices[1]["finish"] == "tool_calls"
    assert choices[1]["calls"][0]["name"] == "f"


def test_stream_usage_last_wins_and_may_follow_the_finish_reason() -> None:
    body = sse(
        gemini_answer(
            candidate([{"text": "a"}], "STOP"),
            usageMetadata={"promptTokenCount": 3, "totalTokenCount": 3},
        ),
        {
            "candidates": [],
            "usageMetadata": {
                "promptTokenCount": 3,
                "candidatesTokenCount": 1,
                "cachedContentTokenCount": 2,
                "totalTokenCount": 4,
            },
        },
    )
    chunks, error = run_stream([body])
    assert error is None
    usage = [c["usage"] for c in chunks if "usage" in c]
    assert len(usage) == 1
    assert usage[0]["completion_tokens"] == 1
    assert usage[0]["prompt_tokens_details"]["cached_tokens"] == 2


def test_stream_ending_without_finish_reason_is_an_error() -> None:
    chunks, error = run_stream([sse(gemini_answer(candidate([{"text": "cut"}], None)))])
    assert isinstance(error, UpstreamUnreachable)
    assert chunks  # what came before stays sent
    chunks, error = run_stream([b""])
    assert isinstance(error, UpstreamUnreachable)


@pytest.mark.parametrize("data", [b"data: {nope\r\n\r\n", b"data: [1, 2]\r\n\r\n"])
def test_malformed_stream_chunks(data: bytes) -> None:
    _, error = run_stream([data])
    assert isinstance(error, UpstreamProtocolError)
    assert error.http_status == 502


def normalised(chunks: list[dict[str, Any]], stream: bytes) -> list[dict[str, Any]]:
    """Chunks without their ids and timestamps (ids Gemini did not send are random)."""
    out = []
    for chunk in copy.deepcopy(chunks):
        chunk.pop("id", None)
        chunk.pop("created", None)
        for choice in chunk["choices"]:
            for call in choice["delta"].get("tool_calls") or []:
                if call.get("id", "").encode() not in stream:
                    call.pop("id", None)
        out.append(chunk)
    return out


@pytest.mark.parametrize("name", STREAM_FIXTURES)
@settings(deadline=None, max_examples=60)
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=25))
def test_rechunking_the_stream_gives_the_same_chunks(name: str, cuts: list[int]) -> None:
    stream = load(name)["stream"].encode()
    whole, whole_error = run_stream([stream])
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert b"".join(pieces) == stream
    chunks, error = run_stream(pieces)
    assert normalised(chunks, stream) == normalised(whole, stream)
    assert type(error) is type(whole_error)
    if error is not None and whole_error is not None:
        assert error.http_status == whole_error.http_status


# ============================================================================================
# Errors


def google_error(code: int, status: str, message: str, details: list[Any] | None = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return orjson.dumps({"error": error})


def body_of(error: UpstreamError) -> dict[str, Any]:
    body: dict[str, Any] = error.to_body()["error"]
    return body


def test_error_400_invalid_argument_is_passed_on() -> None:
    message = "* GenerateContentRequest.contents: contents is not specified\n"
    error = error_from_status("gem", 400, google_error(400, "INVALID_ARGUMENT", message), {})
    assert error.http_status == 400
    assert body_of(error)["type"] == "invalid_request_error"
    assert body_of(error)["message"] == message
    assert error.code != "context_length_exceeded"


def test_error_invalid_api_key_is_an_upstream_auth_error() -> None:
    details = [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
        }
    ]
    body = google_error(400, "INVALID_ARGUMENT", "API key not valid. AIzaSyFAKE1234", details)
    error = error_from_status("gem", 400, body, {})
    assert error.http_status == 401
    assert error.code == "upstream_authentication_failed"
    assert "AIza" not in error.message  # the key fragment is not relayed


def test_error_403_permission_denied() -> None:
    error = error_from_status("gem", 403, google_error(403, "PERMISSION_DENIED", "nope"), {})
    assert error.http_status == 403
    assert error.code == "upstream_authentication_failed"


def test_error_404_model_not_found() -> None:
    message = (
        "models/gemini-9 is not found for API version v1beta, or is not supported for "
        "generateContent. Call ListModels to see the list of available models."
    )
    error = error_from_status("gem", 404, google_error(404, "NOT_FOUND", message), {})
    assert error.http_status == 404
    assert error.code == "model_not_found"


@pytest.mark.parametrize(
    ("delay", "seconds"), [("7s", "7"), ("1.5s", "2"), ("0.2s", "1"), ("37s", "37")]
)
def test_error_429_retry_delay_becomes_retry_after(delay: str, seconds: str) -> None:
    data = load("rate_limited")
    error_body = copy.deepcopy(data["error_body"])
    error_body["error"]["details"][-1]["retryDelay"] = delay
    error = error_from_status("gem", data["http_status"], orjson.dumps(error_body), {})
    assert error.http_status == 429
    assert error.headers["retry-after"] == seconds
    assert body_of(error)["type"] == "rate_limit_error"


def test_golden_rate_limited() -> None:
    data = load("rate_limited")
    error = error_from_status("gem", data["http_status"], orjson.dumps(data["error_body"]), {})
    assert {
        "status": error.http_status,
        "retry_after_seconds": int(error.headers["retry-after"]),
    } == data["expect"]["error"]
    # A Retry-After the upstream did send is not overridden; none without RetryInfo.
    relayed = error_from_status("gem", 429, orjson.dumps(data["error_body"]), {"retry-after": "3"})
    assert relayed.headers["retry-after"] == "3"
    bare = error_from_status("gem", 429, google_error(429, "RESOURCE_EXHAUSTED", "slow"), {})
    assert "retry-after" not in bare.headers


@pytest.mark.parametrize(
    ("status", "rpc"), [(500, "INTERNAL"), (503, "UNAVAILABLE"), (504, "DEADLINE_EXCEEDED")]
)
def test_error_5xx_keep_their_status(status: int, rpc: str) -> None:
    error = error_from_status(
        "gem", status, google_error(status, rpc, "The model is overloaded."), {}
    )
    assert error.http_status == status
    assert "overloaded" not in error.message  # upstream text only in debug mode
    assert "overloaded" in (error.detail or "")


def test_error_context_overflow() -> None:
    message = (
        "The input token count (1200293) exceeds the maximum number of tokens allowed (1048576)."
    )
    error = error_from_status("gem", 400, google_error(400, "INVALID_ARGUMENT", message), {})
    assert error.http_status == 400
    assert error.code == "context_length_exceeded"
    assert body_of(error)["code"] == "context_length_exceeded"


def test_error_vertex_array_wrapped_and_non_json() -> None:
    wrapped = b"[" + google_error(429, "RESOURCE_EXHAUSTED", "Resource exhausted.") + b"]"
    error = error_from_status("gem", 429, wrapped, {})
    assert error.http_status == 429
    assert body_of(error)["message"] == "Resource exhausted."
    html = error_from_status("gem", 502, b"<html>bad gateway</html>", {})
    assert html.http_status == 502
    assert "bad gateway" in (html.detail or "")
