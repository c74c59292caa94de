"""Unit and property tests of the OpenAI <-> Anthropic Messages translation (sans-io).

Requests: every rule of the module docstring, and every translated request validated against
the ``anthropic`` SDK's own request TypedDicts (pydantic, unknown keys detected by comparing the
validated copy with the original). Answers: the golden transcripts in
``tests/fixtures/anthropic`` (``response`` and ``stream``) must translate to their ``expect``;
streams are also re-chunked arbitrarily (Hypothesis) and must translate identically.
Errors: each Anthropic error type/status maps to the status and code OpenAI clients act on.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import openai.types.chat
import orjson
import pydantic
import pytest
from anthropic.types.message_create_params import (
    MessageCreateParamsNonStreaming,
    MessageCreateParamsStreaming,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lm_gateway.errors import (
    GatewayError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamUnreachable,
)
from lm_gateway.wire.anthropic import (
    JSON_TOOL,
    AnthropicOptions,
    AnthropicStreamTranslator,
    RequestInfo,
    error_from_status,
    from_anthropic_response,
    to_anthropic_request,
    tool_use_id,
)
from lm_gateway.wire.openai import dumps
from lm_gateway.wire.sse import SSEDecoder
from tests.fakes.anthropic_upstream import (
    anthropic_error,
    anthropic_event,
    message_stream_events,
    thinking_signature,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "anthropic"
FIXTURE_PATHS = sorted(FIXTURES.glob("*.json"))
LEGACY = "2023-06-01"
NEW = "2026-10-21"
MODEL = "claude-sonnet-4-6"
VALID_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5E"
    "rkJggg=="
)
PDF = "JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"
SAMPLING = ("temperature", "top_p", "top_k")

_NON_STREAMING: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(MessageCreateParamsNonStreaming)
_STREAMING: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(MessageCreateParamsStreaming)


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def fixture(name: str) -> dict[str, Any]:
    return load(FIXTURES / f"{name}.json")


def fixture_id(path: Path) -> str:
    return path.stem


# -- helpers: requests ------------------------------------------------------------------------


def translate(body: dict[str, Any], **options: Any) -> dict[str, Any]:
    request, _ = to_anthropic_request(copy.deepcopy(body), AnthropicOptions(**options))
    return request


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": list(messages), **fields}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any = None, **fields: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **fields}


def tool_result(call_id: str, content: Any) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def rejected(body: dict[str, Any], param: str, **options: Any) -> GatewayError:
    """The request is refused with a 400 naming ``param`` (in the field and the message)."""
    with pytest.raises(GatewayError) as info:
        to_anthropic_request(copy.deepcopy(body), AnthropicOptions(**options))
    error = info.value
    assert error.http_status == 400, error
    assert error.param == param, error.message
    assert re.split(r"[.\[]", param, maxsplit=1)[0] in error.message
    assert error.to_body()["error"]["param"] == param
    return error


def _materialize(value: Any) -> Any:
    """Consume pydantic's lazy ``Iterable`` validators (which validate only when iterated)."""
    if isinstance(value, dict):
        return {key: _materialize(item) for key, item in value.items()}
    if isinstance(value, pydantic.BaseModel):
        return ("not a param type", type(value).__name__, value.model_dump())
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple | Iterator | Iterable):
        return [_materialize(item) for item in value]
    return value


def assert_valid_for_sdk(request: dict[str, Any], version: str = LEGACY) -> None:
    """``request`` is a valid ``messages.create`` body per the anthropic SDK's TypedDicts.

    TypedDict validation ignores unknown keys (and drops them from its output), so comparing
    the validated copy with the original also proves there is no key the SDK does not know, at
    any depth. Sampling parameters are not in SDK 2.x's types: checked by hand (2023-06-01
    only).
    """
    sampling = {key: request[key] for key in SAMPLING if key in request}
    if version >= NEW:
        assert not sampling, f"{version} has no sampling parameters: {sampling}"
    for key in ("temperature", "top_p"):
        if key in sampling:
            assert isinstance(sampling[key], int | float)
            assert 0 <= sampling[key] <= 1
    if "top_k" in sampling:
        assert isinstance(sampling["top_k"], int)
        assert sampling["top_k"] >= 0
    rest = {key: value for key, value in request.items() if key not in SAMPLING}
    adapter = _STREAMING if request.get("stream") else _NON_STREAMING
    validated = _materialize(adapter.validate_python(rest))
    assert validated == rest


def as_blocks(content: Any) -> Any:
    """Anthropic content in block form (a string is one text block)."""
    return [text(content)] if isinstance(content, str) else content


def normalized(request: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic request with string ``system``/``content`` written as text blocks."""
    out = copy.deepcopy(request)
    if "system" in out:
        out["system"] = as_blocks(out["system"])
    for message in out["messages"]:
        message["content"] = as_blocks(message["content"])
    return out


def blocks_of(request: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for message in request["messages"]:
        for block in message["content"]:
            yield message["role"], block


# -- helpers: answers -------------------------------------------------------------------------


def view_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI usage in the shape of the fixtures' ``expect.usage``."""
    out = {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
    }
    details = usage.get("completion_tokens_details")
    if details is not None:
        out["reasoning_tokens"] = details["reasoning_tokens"]
    return out


def view(
    *,
    content: str | None,
    reasoning: str | None,
    tool_calls: list[dict[str, Any]],
    finish_reason: str | None,
    usage: dict[str, Any] | None,
    thinking_blocks: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """A translated answer in the shape of the fixtures' ``expect`` (arguments parsed)."""
    out: dict[str, Any] = {
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": [
            {"id": c["id"], "name": c["name"], "arguments": json.loads(c["arguments"])}
            for c in tool_calls
        ],
        "finish_reason": finish_reason,
        "usage": view_usage(usage) if usage is not None else None,
    }
    if thinking_blocks:
        out["thinking_blocks"] = thinking_blocks
    return out


def expected(path_or_data: Path | dict[str, Any]) -> dict[str, Any]:
    data = load(path_or_data) if isinstance(path_or_data, Path) else path_or_data
    return {key: value for key, value in data["expect"].items() if key != "error"}


def completion_view(completion: dict[str, Any]) -> dict[str, Any]:
    [choice] = completion["choices"]
    message = choice["message"]
    return view(
        content=message["content"],
        reasoning=message.get("reasoning_content"),
        tool_calls=[
            {
                "id": c["id"],
                "name": c["function"]["name"],
                "arguments": c["function"]["arguments"],
            }
            for c in message.get("tool_calls") or []
        ],
        finish_reason=choice["finish_reason"],
        usage=completion.get("usage"),
        thinking_blocks=message.get("thinking_blocks"),
    )


class Accumulated:
    """A stream's chunks folded into one answer, as an OpenAI client accumulates them."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self.role: str | None = None
        content: list[str] = []
        reasoning: list[str] = []
        refusal: list[str] = []
        self.thinking_blocks: list[dict[str, Any]] = []
        self.thinking_deltas = 0
        self.calls: dict[int, dict[str, Any]] = {}
        self.call_order: list[int] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.finish_position: int | None = None
        for position, chunk in enumerate(chunks):
            assert chunk["object"] == "chat.completion.chunk"
            if chunk.get("usage") is not None:
                assert chunk["choices"] == []
                self.usage = chunk["usage"]
            for choice in chunk["choices"]:
                assert choice["index"] == 0
                assert self.finish_reason is None, "nothing may follow the finish_reason"
                delta = choice["delta"]
                self.role = delta.get("role") or self.role
                content.append(delta.get("content") or "")
                reasoning.append(delta.get("reasoning_content") or "")
                refusal.append(delta.get("refusal") or "")
                if delta.get("thinking_blocks"):
                    self.thinking_deltas += 1
                    for entry in delta["thinking_blocks"]:
                        # Entries carry their position ("index") so stream accumulators can
                        # merge them; it is not part of the block the client sends back.
                        assert entry["index"] == len(self.thinking_blocks)
                        self.thinking_blocks.append(
                            {k: v for k, v in entry.items() if k != "index"}
                        )
                for fragment in delta.get("tool_calls") or []:
                    self._tool_fragment(fragment)
                if choice["finish_reason"] is not None:
                    self.finish_reason = choice["finish_reason"]
                    self.finish_position = position
        self.content = "".join(content) or None
        self.reasoning = "".join(reasoning) or None
        self.refusal = "".join(refusal) or None

    def _tool_fragment(self, fragment: dict[str, Any]) -> None:
        index = fragment["index"]
        function = fragment.get("function") or {}
        if index not in self.calls:
            # The first fragment of a call names it (OpenAI's streaming contract).
            assert fragment.get("id"), fragment
            assert fragment.get("type") == "function", fragment
            assert function.get("name"), fragment
            self.calls[index] = {"id": fragment["id"], "name": function["name"], "arguments": ""}
            self.call_order.append(index)
        else:
            assert not fragment.get("id") or fragment["id"] == self.calls[index]["id"]
        self.calls[index]["arguments"] += function.get("arguments") or ""

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [self.calls[index] for index in sorted(self.calls)]

    def view(self) -> dict[str, Any]:
        return view(
            content=self.content,
            reasoning=self.reasoning,
            tool_calls=self.tool_calls,
            finish_reason=self.finish_reason,
            usage=self.usage,
            thinking_blocks=self.thinking_blocks,
        )


def run_stream(
    pieces: Iterable[bytes], info: RequestInfo | None = None
) -> tuple[list[dict[str, Any]], UpstreamError | None]:
    """Feed raw SSE bytes, piece by piece, as the HTTP layer does; (chunks, error raised)."""
    decoder = SSEDecoder()
    translator = AnthropicStreamTranslator("claude", info or RequestInfo())
    chunks: list[dict[str, Any]] = []

    def feed(events: list[Any]) -> None:
        for event in events:
            if translator.done:
                break
            chunks.extend(translator.feed(event))

    try:
        for piece in pieces:
            feed(decoder.feed(piece))
        feed(decoder.close())
        chunks.extend(translator.finish())
    except UpstreamError as error:
        return chunks, error
    return chunks, None


def stream_of(message: dict[str, Any], info: RequestInfo | None = None) -> list[dict[str, Any]]:
    """The chunks for a streamed ``message`` (events as the fake upstream sends them)."""
    chunks, error = run_stream(message_stream_events(message), info)
    assert error is None, error
    return chunks


def message(
    *content: dict[str, Any], stop_reason: str = "end_turn", **fields: Any
) -> dict[str, Any]:
    return {
        "id": "msg_unit_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": list(content),
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "stop_details": None,
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 5,
        },
        **fields,
    }


def tool_use(tool_id: str, name: str, tool_input: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}


def without_ids(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in chunk.items() if k not in ("id", "created")} for chunk in chunks]


# =============================================================================================
# Requests: messages


def test_system_and_developer_messages_anywhere_are_hoisted_in_order() -> None:
    cached = {"type": "text", "text": "Third.", "cache_control": {"type": "ephemeral"}}
    request = translate(
        chat(
            {"role": "system", "content": "First."},
            user("hello"),
            {"role": "developer", "content": [text("Second.")]},
            assistant("hi"),
            {"role": "system", "content": [cached]},
            user("bye"),
        )
    )
    assert request["system"] == [text("First."), text("Second."), cached]
    assert [m["role"] for m in request["messages"]] == ["user", "assistant", "user"]
    assert [m["content"] for m in request["messages"]] == [
        [text("hello")],
        [text("hi")],
        [text("bye")],
    ]
    assert_valid_for_sdk(request)


def test_no_system_key_without_system_messages() -> None:
    assert "system" not in translate(chat(user("x")))
    assert "system" not in translate(chat({"role": "system", "content": ""}, user("x")))


def test_consecutive_same_role_messages_are_merged() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    request = translate(
        chat(
            user("one"),
            user([text("two"), image]),
            {"role": "system", "content": "hoisted, so the users around it merge"},
            user("three"),
            assistant("a"),
            assistant([text("b")]),
            user("four"),
        )
    )
    assert request["messages"] == [
        {
            "role": "user",
            "content": [
                text("one"),
                text("two"),
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                text("three"),
            ],
        },
        {"role": "assistant", "content": [text("a"), text("b")]},
        {"role": "user", "content": [text("four")]},
    ]
    assert_valid_for_sdk(request)


def test_tool_results_of_a_turn_go_into_one_user_message() -> None:
    request = translate(
        chat(
            user("weather in Paris and Tokyo?"),
            assistant(
                None,
                tool_calls=[
                    call("call_a", "get_weather", '{"city": "Paris"}'),
                    call("call_b", "get_weather", '{"city": "Tokyo"}'),
                ],
            ),
            tool_result("call_a", "18 C"),
            {"role": "system", "content": "between the results"},
            tool_result("call_b", [text("25 C"), text(" and sunny")]),
            user("also, be brief"),
        )
    )
    assert [m["role"] for m in request["messages"]] == ["user", "assistant", "user"]
    assert request["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_weather", "input": {"city": "Tokyo"}},
    ]
    assert request["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_a", "content": "18 C"},
        {
            "type": "tool_result",
            "tool_use_id": "call_b",
            "content": [text("25 C"), text(" and sunny")],
        },
        text("also, be brief"),
    ]
    assert request["system"] == [text("between the results")]
    assert_valid_for_sdk(request)


TWO_CALLS = assistant(None, tool_calls=[call("call_a", "f", "{}"), call("call_b", "f", "{}")])
RESULT_A = {"type": "tool_result", "tool_use_id": "call_a", "content": "A"}
RESULT_B = {"type": "tool_result", "tool_use_id": "call_b", "content": "B"}


def test_tool_results_go_ahead_of_text_sent_before_them() -> None:
    request = translate(
        chat(
            user("q"),
            TWO_CALLS,
            user("note"),
            tool_result("call_a", "A"),
            tool_result("call_b", "B"),
        )
    )
    assert request["messages"][2]["content"] == [RESULT_A, RESULT_B, text("note")]


def test_tool_results_go_ahead_of_text_sent_between_them() -> None:
    """Anthropic wants every tool_result of the turn first, any text after all of them."""
    request = translate(
        chat(
            user("q"),
            TWO_CALLS,
            tool_result("call_a", "A"),
            user("note"),
            tool_result("call_b", "B"),
        )
    )
    assert request["messages"][2]["content"] == [RESULT_A, RESULT_B, text("note")]


def test_a_tool_result_without_content_has_no_empty_content() -> None:
    request = translate(
        chat(user("go"), assistant(None, tool_calls=[call("c1", "f", "{}")]), tool_result("c1", ""))
    )
    assert request["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "c1"}]
    assert_valid_for_sdk(request)


def test_empty_text_is_dropped_everywhere() -> None:
    request = translate(
        chat(
            {"role": "system", "content": ""},
            {"role": "developer", "content": [text(""), text("Rules.")]},
            user([text(""), text("question")]),
            assistant("", tool_calls=[call("c1", "lookup", "")]),
            tool_result("c1", [text("")]),
            user(""),
            assistant([text("")]),
            user("next"),
        )
    )
    assert request["system"] == [text("Rules.")]
    for _, block in blocks_of(request):
        if block["type"] == "text":
            assert block["text"].strip()
    assert [m["role"] for m in request["messages"]] == ["user", "assistant", "user"]
    assert request["messages"][1]["content"] == [
        {"type": "tool_use", "id": "c1", "name": "lookup", "input": {}}
    ]
    assert request["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "c1"},
        text("next"),
    ]
    assert_valid_for_sdk(request)


def test_only_empty_messages_is_a_400() -> None:
    rejected(chat({"role": "system", "content": "sys"}, user("")), "messages")


@pytest.mark.parametrize("role", ["function", "narrator"])
def test_unknown_and_legacy_roles_are_refused(role: str) -> None:
    rejected(chat(user("x"), {"role": role, "content": "y", "name": "f"}), "messages[1].role")


def test_a_tool_message_needs_its_call_id() -> None:
    body = chat(user("x"), assistant(None, tool_calls=[call("c", "f", "{}")]))
    body["messages"].append({"role": "tool", "content": "r"})
    rejected(body, "messages[2].tool_call_id")


# -- images and files -------------------------------------------------------------------------


@pytest.mark.parametrize("media_type", ["image/png", "image/jpeg", "image/gif", "image/webp"])
def test_data_uri_images_become_base64_sources(media_type: str) -> None:
    url = f"data:{media_type};base64,{PNG}"
    request = translate(
        chat(user([text("what is it?"), {"type": "image_url", "image_url": {"url": url}}]))
    )
    assert request["messages"][0]["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": media_type, "data": PNG},
    }
    assert_valid_for_sdk(request)


def test_https_images_become_url_sources_and_detail_is_dropped() -> None:
    url = "https://upload.wikimedia.org/wikipedia/commons/3/3a/Cat03.jpg"
    request = translate(
        chat(user([{"type": "image_url", "image_url": {"url": url, "detail": "high"}}]))
    )
    assert request["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "url", "url": url}}
    ]
    assert_valid_for_sdk(request)


def test_image_cache_control_is_kept() -> None:
    part = {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{PNG}"},
        "cache_control": {"type": "ephemeral"},
    }
    request = translate(chat(user([part])))
    assert request["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral"}
    assert_valid_for_sdk(request)


@pytest.mark.parametrize(
    ("url", "param"),
    [
        (f"data:image/bmp;base64,{PNG}", "messages[0].content[1].image_url"),
        (f"data:image/svg+xml;base64,{PNG}", "messages[0].content[1].image_url"),
        (f"data:;base64,{PNG}", "messages[0].content[1].image_url"),
        ("data:image/png;base64,not*base64!", "messages[0].content[1].image_url.url"),
        ("data:image/png,rawbytes", "messages[0].content[1].image_url.url"),
        ("ftp://example.com/cat.png", "messages[0].content[1].image_url"),
        ("", "messages[0].content[1].image_url"),
    ],
)
def test_bad_images_are_a_400_naming_the_part(url: str, param: str) -> None:
    body = chat(user([text("look"), {"type": "image_url", "image_url": {"url": url}}]))
    rejected(body, param)


def test_pdf_file_part_becomes_a_document() -> None:
    part = {
        "type": "file",
        "file": {"filename": "report.pdf", "file_data": f"data:application/pdf;base64,{PDF}"},
    }
    request = translate(chat(user([text("summarise"), part])))
    assert request["messages"][0]["content"][1] == {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
        "title": "report.pdf",
    }
    assert_valid_for_sdk(request)


@pytest.mark.parametrize(
    "file",
    [
        {"file_data": f"data:text/plain;base64,{PDF}"},
        {"file_id": "file-abc123"},
    ],
)
def test_other_files_are_a_400_naming_the_part(file: dict[str, Any]) -> None:
    rejected(chat(user([text("x"), {"type": "file", "file": file}])), "messages[0].content[1]")


def test_audio_parts_are_a_400_naming_the_part() -> None:
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    rejected(chat(user([part])), "messages[0].content[0]")


def test_a_non_string_text_part_is_a_400_naming_that_part() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    rejected(
        chat(user([image, text("fine"), {"type": "text", "text": 5}])), "messages[0].content[2]"
    )


# -- assistant turns ----------------------------------------------------------------------------


def test_tool_calls_become_tool_use_with_parsed_input() -> None:
    arguments = {"city": "Paris", "days": [1, 2], "units": {"temp": "C"}, "exact": True}
    request = translate(
        chat(
            user("plan"),
            assistant(
                "Looking.",
                tool_calls=[
                    call("toolu_01", "forecast", json.dumps(arguments)),
                    call("toolu_02", "now", ""),
                ],
            ),
            tool_result("toolu_01", "ok"),
            tool_result("toolu_02", "12:00"),
        )
    )
    assert request["messages"][1]["content"] == [
        text("Looking."),
        {"type": "tool_use", "id": "toolu_01", "name": "forecast", "input": arguments},
        {"type": "tool_use", "id": "toolu_02", "name": "now", "input": {}},
    ]
    assert_valid_for_sdk(request)


@pytest.mark.parametrize("arguments", ['{"city": "Par', "[1, 2]", '"text"', "nope"])
def test_bad_tool_call_arguments_are_a_400_naming_them(arguments: str) -> None:
    body = chat(
        user("x"),
        user("y"),
        assistant(None, tool_calls=[call("c0", "f", "{}"), call("c1", "g", arguments)]),
    )
    rejected(body, "messages[2].tool_calls[1].function.arguments")


def test_thinking_blocks_go_first_in_the_assistant_turn_verbatim() -> None:
    signed = {"type": "thinking", "thinking": "Let me think.", "signature": "sig-abc=="}
    redacted = {"type": "redacted_thinking", "data": "EuYBCkQYAiJA"}
    request = translate(
        chat(
            user("q"),
            assistant(
                "Calling.",
                reasoning_content="Let me think.",
                thinking_blocks=[signed, redacted],
                tool_calls=[call("toolu_9", "f", '{"a": 1}')],
            ),
            tool_result("toolu_9", "done"),
        )
    )
    assert request["messages"][1]["content"] == [
        signed,
        redacted,
        text("Calling."),
        {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {"a": 1}},
    ]
    assert_valid_for_sdk(request)


@pytest.mark.parametrize(
    "block",
    [
        {"type": "thinking", "thinking": "no signature"},
        {"type": "redacted_thinking"},
        {"type": "reasoning", "text": "x"},
        "just text",
    ],
)
def test_thinking_blocks_that_cannot_be_returned_are_a_400(block: Any) -> None:
    body = chat(user("q"), assistant("a", thinking_blocks=[block]))
    rejected(body, "messages[1].thinking_blocks[0]")


def test_assistant_refusal_parts_are_sent_as_text() -> None:
    request = translate(
        chat(user("q"), assistant([{"type": "refusal", "refusal": "I can't."}]), user("why?"))
    )
    assert request["messages"][1]["content"] == [text("I can't.")]


# -- tools --------------------------------------------------------------------------------------

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
        "strict": True,
    },
}
CLOCK: dict[str, Any] = {"type": "function", "function": {"name": "clock"}}


def test_tools_are_translated() -> None:
    request = translate(chat(user("x"), tools=[WEATHER, CLOCK]))
    assert request["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather.",
            "input_schema": WEATHER["function"]["parameters"],
            "strict": True,
        },
        {"name": "clock", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in request
    assert_valid_for_sdk(request)


def test_non_function_tools_are_a_400() -> None:
    rejected(chat(user("x"), tools=[CLOCK, {"type": "web_search"}]), "tools[1]")


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("auto", True, {"type": "auto"}),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", None, {"type": "any"}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", None, {"type": "none"}),
        ("none", False, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "clock"}},
            None,
            {"type": "tool", "name": "clock"},
        ),
        (
            {"type": "function", "function": {"name": "clock"}},
            False,
            {"type": "tool", "name": "clock", "disable_parallel_tool_use": True},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, True, None),
        (None, None, None),
    ],
)
def test_tool_choice_and_parallel_tool_calls(
    tool_choice: Any, parallel: bool | None, expected: dict[str, Any] | None
) -> None:
    fields: dict[str, Any] = {"tools": [WEATHER, CLOCK]}
    if tool_choice is not None:
        fields["tool_choice"] = tool_choice
    if parallel is not None:
        fields["parallel_tool_calls"] = parallel
    request = translate(chat(user("x"), **fields))
    assert request.get("tool_choice") == expected
    assert_valid_for_sdk(request)


def test_tool_choice_without_tools_is_not_sent() -> None:
    request = translate(chat(user("x"), tool_choice="auto", parallel_tool_calls=False))
    assert "tool_choice" not in request
    assert "tools" not in request


def test_an_unknown_tool_choice_is_a_400() -> None:
    rejected(chat(user("x"), tools=[CLOCK], tool_choice="sometimes"), "tool_choice")


# -- stop, user, max_tokens -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("END", ["END"]), (["a", "\n\n"], ["a", "\n\n"]), (None, None), ([], None)],
)
def test_stop_becomes_stop_sequences(stop: Any, expected: list[str] | None) -> None:
    request = translate(chat(user("x"), stop=stop))
    assert request.get("stop_sequences") == expected
    assert_valid_for_sdk(request)


def test_user_becomes_metadata_user_id_and_openai_metadata_is_not_sent() -> None:
    request = translate(chat(user("x"), user="user-42", metadata={"team": "a"}))
    assert request["metadata"] == {"user_id": "user-42"}
    assert "metadata" not in translate(chat(user("x"), metadata={"team": "a"}))
    assert_valid_for_sdk(request)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, 777),
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 60}, 60),
        ({"max_tokens": 50, "max_completion_tokens": 70}, 70),
    ],
)
def test_max_tokens_default_and_aliases(fields: dict[str, Any], expected: int) -> None:
    request = translate(chat(user("x"), **fields), default_max_tokens=777)
    assert request["max_tokens"] == expected
    assert_valid_for_sdk(request)


def test_stream_flag() -> None:
    streaming = translate(chat(user("x"), stream=True, stream_options={"include_usage": True}))
    assert streaming["stream"] is True
    assert "stream_options" not in streaming
    assert_valid_for_sdk(streaming)
    assert "stream" not in translate(chat(user("x"), stream=False))


# -- reasoning ---------------------------------------------------------------------------------

EFFORTS = ["minimal", "low", "medium", "high"]


def test_reasoning_effort_budget_mode() -> None:
    budgets = []
    for effort in EFFORTS:
        request = translate(chat(user("x"), reasoning_effort=effort, max_tokens=100_000))
        thinking = request["thinking"]
        assert thinking["type"] == "enabled"
        assert thinking["budget_tokens"] >= 1024  # Anthropic's minimum
        assert request["max_tokens"] == 100_000  # room enough: the client's value stands
        assert "output_config" not in request
        budgets.append(thinking["budget_tokens"])
        assert_valid_for_sdk(request)
    assert budgets == sorted(budgets)
    assert len(set(budgets)) == len(budgets), "each effort has its own budget"


@pytest.mark.parametrize("effort", EFFORTS)
@pytest.mark.parametrize("fields", [{"max_tokens": 1000}, {"max_completion_tokens": 1000}, {}])
def test_max_tokens_is_raised_above_the_thinking_budget(
    effort: str, fields: dict[str, Any]
) -> None:
    request = translate(chat(user("x"), reasoning_effort=effort, **fields), default_max_tokens=1000)
    budget = request["thinking"]["budget_tokens"]
    assert request["max_tokens"] > budget
    # The answer keeps the room the client asked for, on top of the thinking.
    assert request["max_tokens"] - budget == 1000
    assert_valid_for_sdk(request)


@pytest.mark.parametrize(
    ("effort", "expected"),
    [("minimal", "low"), ("low", "low"), ("medium", "medium"), ("high", "high")],
)
def test_reasoning_effort_adaptive_mode(effort: str, expected: str) -> None:
    request = translate(
        chat(user("x"), reasoning_effort=effort, max_tokens=1000), reasoning="adaptive"
    )
    assert request["thinking"] == {"type": "adaptive"}
    assert request["output_config"] == {"effort": expected}
    assert request["max_tokens"] == 1000  # no budget to make room for
    assert_valid_for_sdk(request)


def test_adaptive_effort_and_json_schema_share_output_config() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    request = translate(
        chat(
            user("x"),
            reasoning_effort="high",
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        ),
        reasoning="adaptive",
    )
    assert request["output_config"] == {
        "effort": "high",
        "format": {"type": "json_schema", "schema": schema},
    }
    assert_valid_for_sdk(request)


@pytest.mark.parametrize("reasoning", ["budget", "adaptive"])
def test_reasoning_effort_none_means_no_thinking(reasoning: str) -> None:
    request = translate(chat(user("x"), reasoning_effort="none"), reasoning=reasoning)
    assert "thinking" not in request
    assert "output_config" not in request


@pytest.mark.parametrize("reasoning", ["budget", "adaptive"])
def test_unknown_reasoning_effort_is_a_400(reasoning: str) -> None:
    rejected(chat(user("x"), reasoning_effort="extreme"), "reasoning_effort", reasoning=reasoning)


def test_anthropic_thinking_parameter_is_passed_as_given() -> None:
    thinking = {"type": "enabled", "budget_tokens": 2000, "display": "omitted"}
    request = translate(chat(user("x"), thinking=thinking, max_tokens=5000))
    assert request["thinking"] == thinking
    assert request["max_tokens"] == 5000
    assert_valid_for_sdk(request)


# -- response_format ------------------------------------------------------------------------


def test_json_schema_uses_output_config_format() -> None:
    data = fixture("json_schema")
    request, info = to_anthropic_request(copy.deepcopy(data["openai_request"]), AnthropicOptions())
    assert info.json_tool is False
    assert normalized(request) == normalized(data["anthropic_request"])
    assert_valid_for_sdk(request)


def test_json_schema_without_a_schema_is_a_400() -> None:
    body = chat(user("x"), response_format={"type": "json_schema", "json_schema": {"name": "a"}})
    rejected(body, "response_format")


def test_json_object_forces_the_json_tool() -> None:
    request, info = to_anthropic_request(
        chat(user("x"), response_format={"type": "json_object"}), AnthropicOptions()
    )
    assert info.json_tool is True
    [tool] = request["tools"]
    assert tool["name"] == JSON_TOOL
    assert tool["input_schema"]["type"] == "object"
    assert request["tool_choice"] == {"type": "tool", "name": JSON_TOOL}
    assert "output_config" not in request
    assert_valid_for_sdk(request)


def test_json_object_with_tools_or_budget_thinking_is_a_400() -> None:
    fmt = {"type": "json_object"}
    rejected(chat(user("x"), response_format=fmt, tools=[CLOCK]), "response_format")
    rejected(chat(user("x"), response_format=fmt, reasoning_effort="low"), "response_format")


def test_text_response_format_changes_nothing() -> None:
    plain = translate(chat(user("x")))
    assert translate(chat(user("x"), response_format={"type": "text"})) == plain


def test_unknown_response_format_is_a_400() -> None:
    rejected(chat(user("x"), response_format={"type": "yaml"}), "response_format")


# -- sampling and unsupported parameters -----------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0},
        {"temperature": 0.7},
        {"temperature": 1},
        {"top_p": 0.9},
        {"top_k": 40},
        {"temperature": 0.2, "top_p": 0.5, "top_k": 1},
    ],
)
def test_sampling_under_the_legacy_version_is_passed(fields: dict[str, Any]) -> None:
    request = translate(chat(user("x"), **fields), version=LEGACY)
    assert {key: request[key] for key in fields} == fields
    assert_valid_for_sdk(request, LEGACY)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 1.5), ("temperature", 2), ("temperature", -0.1), ("top_p", 1.01)],
)
def test_sampling_out_of_anthropics_range_is_a_400(field: str, value: float) -> None:
    error = rejected(chat(user("x"), **{field: value}), field, version=LEGACY)
    assert "between 0 and 1" in error.message


@pytest.mark.parametrize("fields", [{"temperature": 1}, {"top_p": 1}, {"temperature": 1.0}])
def test_neutral_sampling_under_the_new_version_is_dropped(fields: dict[str, Any]) -> None:
    request = translate(chat(user("x"), **fields), version=NEW)
    assert not set(SAMPLING) & set(request)
    assert_valid_for_sdk(request, NEW)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 0.5), ("temperature", 0), ("top_p", 0.9), ("top_k", 5)],
)
def test_other_sampling_under_the_new_version_is_a_400(field: str, value: float) -> None:
    error = rejected(chat(user("x"), **{field: value}), field, version=NEW)
    assert NEW in error.message
    request = translate(chat(user("x"), **{field: value}), version=NEW, drop_unsupported=True)
    assert field not in request
    assert_valid_for_sdk(request, NEW)


UNSUPPORTED = [
    ("seed", 7),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1),
    ("logit_bias", {"50256": -100}),
    ("logprobs", True),
    ("top_logprobs", 3),
    ("n", 2),
]


@pytest.mark.parametrize(("field", "value"), UNSUPPORTED)
def test_unsupported_parameters_are_a_400_naming_them(field: str, value: Any) -> None:
    error = rejected(chat(user("x"), **{field: value}), field)
    assert error.code == "unsupported_parameter"
    assert f"'{field}'" in error.message


def test_drop_unsupported_params_drops_them_all() -> None:
    body = chat(user("x"), **dict(UNSUPPORTED))
    request = translate(body, drop_unsupported=True)
    assert request == translate(chat(user("x")))
    assert_valid_for_sdk(request)


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 1},
        {"presence_penalty": 0},
        {"frequency_penalty": 0.0},
        {"logprobs": False},
        {"top_logprobs": 0},
        {"logit_bias": {}},
        {"seed": None},
        {"store": False, "service_tier": "auto", "stream_options": None, "metadata": {"a": "b"}},
    ],
)
def test_neutral_values_are_silently_omitted(fields: dict[str, Any]) -> None:
    assert translate(chat(user("x"), **fields)) == translate(chat(user("x")))


# -- the SDK's types, for a variety of requests ----------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name"],
}
VARIETY: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "plain": (chat(user("Hello")), {}),
    "everything": (
        chat(
            {"role": "system", "content": "Be helpful."},
            user(
                [
                    text("Look:"),
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ]
            ),
            assistant(
                "Checking.",
                reasoning_content="hm",
                thinking_blocks=[
                    {"type": "thinking", "thinking": "hm", "signature": "c2ln"},
                    {"type": "redacted_thinking", "data": "ZGF0YQ=="},
                ],
                tool_calls=[call("functions.get_weather:0", "get_weather", '{"city": "Oslo"}')],
            ),
            tool_result("functions.get_weather:0", "cold"),
            {"role": "developer", "content": "Answer in English."},
            user([{"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF}"}}]),
        ),
        {},
    ),
    "tools_and_choice": (
        chat(
            user("x"),
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False,
            stop=["STOP"],
            user="u-1",
            temperature=0.3,
            top_p=0.8,
            max_completion_tokens=300,
        ),
        {},
    ),
    "json_object": (chat(user("x"), response_format={"type": "json_object"}), {}),
    "json_schema_adaptive": (
        chat(
            user("x"),
            reasoning_effort="low",
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
        ),
        {"reasoning": "adaptive"},
    ),
    "budget_thinking_new_version": (
        chat(user("x"), reasoning_effort="high", temperature=1, tools=[WEATHER]),
        {"version": NEW},
    ),
    "dropped_params": (
        chat(user("x"), seed=1, frequency_penalty=1.0, logprobs=True, top_k=3),
        {"version": NEW, "drop_unsupported": True},
    ),
    "legacy_functions": (
        chat(
            user("x"),
            assistant(None, function_call={"name": "clock", "arguments": "{}"}),
            tool_result("call_clock", "noon"),
            functions=[{"name": "clock", "parameters": {"type": "object", "properties": {}}}],
            function_call="auto",
        ),
        {},
    ),
}
for _path in FIXTURE_PATHS:
    _data = load(_path)
    for _source in (_data, _data.get("followup") or {}):
        if "openai_request" in _source:
            _options = (
                {"reasoning": "adaptive"} if "reasoning_effort" in _source["openai_request"] else {}
            )
            VARIETY[f"fixture:{_path.stem}"] = (_source["openai_request"], _options)


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
@pytest.mark.parametrize("name", sorted(VARIETY))
def test_translated_requests_validate_as_the_sdks_types(name: str, stream: bool) -> None:
    body, options = VARIETY[name]
    body = {**copy.deepcopy(body), "stream": stream}
    before = copy.deepcopy(body)
    request, _ = to_anthropic_request(body, AnthropicOptions(**options))
    assert body == before, "the client's request is not modified"
    assert (request.get("stream") is True) is stream
    assert_valid_for_sdk(request, options.get("version", LEGACY))
    for _, block in blocks_of(request):
        if block["type"] == "tool_use":
            assert VALID_ID.match(block["id"])
        if block["type"] == "tool_result":
            assert VALID_ID.match(block["tool_use_id"])


def test_the_sdk_check_catches_what_anthropic_would_refuse() -> None:
    """The validator used above does reject bad requests (else the tests prove nothing)."""
    good = translate(chat(user("x")))
    for bad in (
        {**good, "n": 2},
        {
            **good,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "z": 1}]}],
        },
        {**good, "messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
        {**good, "tool_choice": {"type": "required"}},
        {key: value for key, value in good.items() if key != "max_tokens"},
    ):
        with pytest.raises((AssertionError, pydantic.ValidationError)):
            assert_valid_for_sdk(bad)
    with pytest.raises(AssertionError):
        assert_valid_for_sdk({**good, "temperature": 0.5}, NEW)
    with pytest.raises(AssertionError):
        assert_valid_for_sdk({**good, "temperature": 1.5}, LEGACY)


@pytest.mark.parametrize(
    "path",
    [p for p in FIXTURE_PATHS if "anthropic_request" in load(p)],
    ids=fixture_id,
)
def test_fixture_requests_translate_to_their_anthropic_request(path: Path) -> None:
    data = load(path)
    request = translate(data["openai_request"])
    assert normalized(request) == normalized(data["anthropic_request"])


def test_followup_with_thinking_translates_to_the_fixture() -> None:
    followup = fixture("thinking_with_tool_use")["followup"]
    request = translate(followup["openai_request"], reasoning="adaptive")
    assert normalized(request) == normalized(followup["anthropic_request"])
    assistant_turn = request["messages"][1]["content"]
    assert assistant_turn[0]["signature"] == thinking_signature(assistant_turn[0]["thinking"])


# =============================================================================================
# Answers (non-streaming)


@pytest.mark.parametrize(
    "path", [p for p in FIXTURE_PATHS if load(p)["response"] is not None], ids=fixture_id
)
def test_fixture_response_translates_to_expect(path: Path) -> None:
    data = load(path)
    completion = from_anthropic_response(copy.deepcopy(data["response"]), RequestInfo())
    assert completion_view(completion) == expected(data)
    openai.types.chat.ChatCompletion.model_validate(completion)
    assert completion["object"] == "chat.completion"
    usage = completion["usage"]
    anthropic_usage = data["response"]["usage"]
    assert (
        usage["prompt_tokens_details"]["cache_write_tokens"]
        == anthropic_usage["cache_creation_input_tokens"]
    )
    for tool_call in completion["choices"][0]["message"].get("tool_calls") or []:
        assert isinstance(tool_call["function"]["arguments"], str)


def test_refusal_sets_the_refusal_field_and_content_filter() -> None:
    data = fixture("refusal")
    completion = from_anthropic_response(data["response"], RequestInfo())
    [choice] = completion["choices"]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["refusal"] == data["response"]["stop_details"]["explanation"]
    assert choice["message"]["content"] == data["expect"]["content"]
    no_details = from_anthropic_response(
        message(text("partial"), stop_reason="refusal"), RequestInfo()
    )
    assert no_details["choices"][0]["message"]["refusal"]  # a refusal is never silent
    assert no_details["choices"][0]["finish_reason"] == "content_filter"


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
    ],
)
def test_stop_reasons(stop_reason: str, finish: str) -> None:
    completion = from_anthropic_response(
        message(text("hi"), stop_reason=stop_reason), RequestInfo()
    )
    assert completion["choices"][0]["finish_reason"] == finish


def test_usage_counts_cache_reads_and_writes_in_the_prompt() -> None:
    answer = message(text("hi"))
    answer["usage"] = {
        "input_tokens": 7,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 20,
        "output_tokens": 30,
        "output_tokens_details": {"thinking_tokens": 12},
    }
    usage = from_anthropic_response(answer, RequestInfo())["usage"]
    assert usage["prompt_tokens"] == 127
    assert usage["completion_tokens"] == 30
    assert usage["total_tokens"] == 157
    assert usage["prompt_tokens_details"] == {"cached_tokens": 100, "cache_write_tokens": 20}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 12}


def test_json_tool_answer_is_unwrapped_into_content() -> None:
    answer = message(
        tool_use("toolu_j", JSON_TOOL, {"name": "Ada", "n": [1, 2]}), stop_reason="tool_use"
    )
    completion = from_anthropic_response(copy.deepcopy(answer), RequestInfo(json_tool=True))
    [choice] = completion["choices"]
    assert json.loads(choice["message"]["content"]) == {"name": "Ada", "n": [1, 2]}
    assert "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop"
    # Without the json_object request, the same answer is an ordinary tool call.
    plain = from_anthropic_response(answer, RequestInfo())["choices"][0]
    assert plain["finish_reason"] == "tool_calls"
    assert plain["message"]["tool_calls"][0]["function"]["name"] == JSON_TOOL


def test_thinking_and_redacted_thinking_become_thinking_blocks() -> None:
    signed = {"type": "thinking", "thinking": "First idea.", "signature": "c2ln"}
    second = {"type": "thinking", "thinking": " Second idea.", "signature": "c2lnMg=="}
    redacted = {"type": "redacted_thinking", "data": "b3BhcXVl"}
    answer = message(signed, redacted, text("Answer."), second, text(" More."))
    result = from_anthropic_response(answer, RequestInfo())["choices"][0]["message"]
    assert result["content"] == "Answer. More."
    assert result["reasoning_content"] == "First idea. Second idea."
    assert result["thinking_blocks"] == [signed, redacted, second]


def test_an_answer_without_content_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        from_anthropic_response({"type": "message", "id": "x"}, RequestInfo())


# =============================================================================================
# Answers (streaming)

STREAM_FIXTURES = [p for p in FIXTURE_PATHS if p.stem != "midstream_error"]


@pytest.mark.parametrize("path", STREAM_FIXTURES, ids=fixture_id)
def test_fixture_stream_translates_to_expect(path: Path) -> None:
    data = load(path)
    chunks, error = run_stream([data["stream"].encode()])
    assert error is None
    for chunk in chunks:
        openai.types.chat.ChatCompletionChunk.model_validate(chunk)
    result = Accumulated(chunks)
    assert result.view() == expected(data)
    assert result.role == "assistant"
    assert chunks[-1]["choices"] == []  # usage comes last, in its own chunk
    assert result.finish_position == len(chunks) - 2
    assert len({chunk["id"] for chunk in chunks}) == 1


def test_fixture_stream_and_response_agree() -> None:
    for path in STREAM_FIXTURES:
        data = load(path)
        chunks, _ = run_stream([data["stream"].encode()])
        completion = from_anthropic_response(data["response"], RequestInfo())
        assert Accumulated(chunks).view() == completion_view(completion), path.stem


def test_tool_call_indices_are_dense_when_text_and_tools_interleave() -> None:
    answer = message(
        text("First part, "),
        tool_use("toolu_a", "alpha", {}),
        text("second part, "),
        tool_use("toolu_b", "beta", {"x": 1}),
        {"type": "thinking", "thinking": "hmm", "signature": "c2ln"},
        tool_use("toolu_c", "gamma", {"y": [1, {"z": "w"}]}),
        text("end."),
        stop_reason="tool_use",
    )
    chunks = stream_of(answer)
    result = Accumulated(chunks)
    assert result.call_order == [0, 1, 2]
    assert [(c["id"], c["name"]) for c in result.tool_calls] == [
        ("toolu_a", "alpha"),
        ("toolu_b", "beta"),
        ("toolu_c", "gamma"),
    ]
    assert [json.loads(c["arguments"]) for c in result.tool_calls] == [
        {},
        {"x": 1},
        {"y": [1, {"z": "w"}]},
    ]
    assert result.content == "First part, second part, end."
    assert result.finish_reason == "tool_calls"
    # Each chunk's tool_calls name distinct indices.
    for chunk in chunks:
        for choice in chunk["choices"]:
            indices = [c["index"] for c in choice["delta"].get("tool_calls") or []]
            assert len(indices) == len(set(indices))


def test_multi_tool_fixture_maps_block_indexes_1_and_2_to_tool_calls_0_and_1() -> None:
    chunks, _ = run_stream([fixture("multi_tool_stream")["stream"].encode()])
    result = Accumulated(chunks)
    assert result.call_order == [0, 1]
    assert [c["id"] for c in result.tool_calls] == [
        "toolu_01A09q90qw90lq917835lq9",
        "toolu_01B7kzR3h5vY2mJ8nQ4wX6pT",
    ]


def test_a_tool_call_without_arguments_streams_empty_object() -> None:
    chunks, _ = run_stream([fixture("empty_args_tool")["stream"].encode()])
    result = Accumulated(chunks)
    assert [c["arguments"] for c in result.tool_calls] == ["{}"]
    # Also when the block carries no input_json_delta at all.
    events = [
        anthropic_event("message_start", {"type": "message_start", "message": message()}),
        anthropic_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0,
             "content_block": tool_use("toolu_n", "now", {})},
        ),
        anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        anthropic_event(
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
             "usage": {"output_tokens": 3}},
        ),
        anthropic_event("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    chunks, error = run_stream(events)
    assert error is None
    assert [c["arguments"] for c in Accumulated(chunks).tool_calls] == ["{}"]


def test_thinking_streams_as_reasoning_then_one_signed_block_per_block() -> None:
    first = {"type": "thinking", "thinking": "one two three", "signature": "c2lnMQ=="}
    redacted = {"type": "redacted_thinking", "data": "b3BhcXVl"}
    second = {"type": "thinking", "thinking": " four", "signature": "c2lnMg=="}
    chunks = stream_of(message(first, redacted, tool_use("t1", "f", {"a": 1}), second, text("ok")))
    result = Accumulated(chunks)
    assert result.reasoning == "one two three four"
    assert result.thinking_blocks == [first, redacted, second]
    assert result.thinking_deltas == 3
    # A signed block is sent once complete: after all of its reasoning deltas, before what
    # follows it.
    blocks = positions_of(chunks, "thinking_blocks")
    reasoning = positions_of(chunks, "reasoning_content")
    first_text = positions_of(chunks, "content")[0]
    assert blocks[0] > max(i for i in reasoning if i < blocks[1])
    assert blocks[2] > max(reasoning)
    assert blocks[2] < first_text


def positions_of(chunks: list[dict[str, Any]], key: str) -> list[int]:
    """Indexes of the chunks whose delta has a non-empty ``key``."""
    return [i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["delta"].get(key)]


def test_json_tool_stream_is_unwrapped_into_content() -> None:
    answer = message(
        tool_use("toolu_j", JSON_TOOL, {"city": "Paris", "n": 3}), stop_reason="tool_use"
    )
    result = Accumulated(stream_of(answer, RequestInfo(json_tool=True)))
    assert result.tool_calls == []
    assert result.content is not None
    assert json.loads(result.content) == {"city": "Paris", "n": 3}
    assert result.finish_reason == "stop"
    empty = message(tool_use("toolu_j", JSON_TOOL, {}), stop_reason="tool_use")
    assert Accumulated(stream_of(empty, RequestInfo(json_tool=True))).content == "{}"


def test_refusal_in_a_stream() -> None:
    data = fixture("refusal")
    result = Accumulated(run_stream([data["stream"].encode()])[0])
    assert result.finish_reason == "content_filter"
    assert result.refusal == data["response"]["stop_details"]["explanation"]
    assert result.content == data["expect"]["content"]


def test_stream_usage_is_set_not_added() -> None:
    data = fixture("max_tokens_stop")
    result = Accumulated(run_stream([data["stream"].encode()])[0])
    assert result.usage is not None
    # message_start said output_tokens 1, message_delta 8 (cumulative): 8, not 9.
    assert result.usage["completion_tokens"] == data["response"]["usage"]["output_tokens"]
    assert result.usage["prompt_tokens"] == data["response"]["usage"]["input_tokens"]


def test_midstream_error_raises_the_mapped_upstream_error() -> None:
    data = fixture("midstream_error")
    chunks, error = run_stream([data["stream"].encode()])
    assert error is not None
    assert error.http_status == 503  # overloaded_error (529 without a stream) -> 503
    body = error.to_body()["error"]
    assert body["type"] == data["expect"]["error"]["type"]
    assert body["code"] == "overloaded"
    result = Accumulated(chunks)
    assert result.content == data["expect"]["content"]
    assert result.finish_reason is None


@pytest.mark.parametrize(
    ("error_type", "status"),
    [("invalid_request_error", 400), ("rate_limit_error", 429), ("api_error", 500)],
)
def test_midstream_errors_of_other_types(error_type: str, status: int) -> None:
    events = [
        anthropic_event("message_start", {"type": "message_start", "message": message()}),
        anthropic_event("error", anthropic_error(error_type, "went wrong")),
    ]
    _, error = run_stream(events)
    assert error is not None
    assert error.http_status == status
    assert error.to_body()["error"]["type"] == error_type


def test_a_stream_cut_before_the_end_is_an_error() -> None:
    events = message_stream_events(message(text("partial answer")))
    before_delta = [e for e in events if b"message_delta" not in e and b"message_stop" not in e]
    _, error = run_stream(before_delta)
    assert isinstance(error, UpstreamUnreachable)
    # With message_delta but no message_stop, the answer itself is complete.
    chunks, error = run_stream([e for e in events if b"message_stop" not in e])
    assert error is None
    assert Accumulated(chunks).finish_reason == "stop"


def test_a_malformed_event_is_a_protocol_error() -> None:
    _, error = run_stream([b"event: message_start\ndata: {not json\n\n"])
    assert isinstance(error, UpstreamProtocolError)
    _, error = run_stream([b"event: message_start\ndata: [1, 2]\n\n"])
    assert isinstance(error, UpstreamProtocolError)


# -- properties ---------------------------------------------------------------------------------


@settings(deadline=None, max_examples=100)
@given(data=st.data(), path=st.sampled_from(FIXTURE_PATHS))
def test_any_rechunking_of_a_stream_translates_identically(data: st.DataObject, path: Path) -> None:
    raw = load(path)["stream"].encode()
    reference, reference_error = run_stream([raw])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=40), label="cuts"))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    chunks, error = run_stream(pieces)
    assert without_ids(chunks) == without_ids(reference)
    assert (error is None) == (reference_error is None)
    if error is not None and reference_error is not None:
        assert error.http_status == reference_error.http_status
        assert error.to_body() == reference_error.to_body()


_IDS = st.text(min_size=1, max_size=60) | st.from_regex(r"[a-zA-Z0-9_-]{1,40}", fullmatch=True)


@settings(deadline=None, max_examples=100)
@given(
    call_id=_IDS,
    other_id=_IDS,
    arguments=st.dictionaries(
        st.text(max_size=10), st.integers() | st.text(max_size=10), max_size=4
    ),
    words=st.text(max_size=40),
)
def test_translation_is_deterministic_and_tool_ids_are_stable_and_valid(
    call_id: str, other_id: str, arguments: dict[str, Any], words: str
) -> None:
    body = chat(
        {"role": "system", "content": words},
        user(words or "q"),
        assistant(
            words,
            tool_calls=[
                call(call_id, "first", json.dumps(arguments)),
                call(other_id, "second", "{}"),
            ],
        ),
        tool_result(other_id, words),
        tool_result(call_id, "r"),
    )
    before = copy.deepcopy(body)
    first = translate(body)
    assert body == before
    assert translate(body) == first
    # The gateway's serializer (orjson refuses integers beyond 64 bits; tool arguments may hold
    # them).
    assert dumps(translate(body)) == dumps(first)
    uses = [b for role, b in blocks_of(first) if b["type"] == "tool_use"]
    results = [b for role, b in blocks_of(first) if b["type"] == "tool_result"]
    assert [b["id"] for b in uses] == [tool_use_id(call_id), tool_use_id(other_id)]
    assert [b["tool_use_id"] for b in results] == [tool_use_id(other_id), tool_use_id(call_id)]
    assert uses[0]["input"] == arguments
    for new_id in (tool_use_id(call_id), tool_use_id(other_id)):
        assert VALID_ID.match(new_id)
    if VALID_ID.match(call_id):
        assert tool_use_id(call_id) == call_id  # valid ids are left alone
    if call_id != other_id:
        assert tool_use_id(call_id) != tool_use_id(other_id)
    assert_valid_for_sdk(first)


_MESSAGE_TEXT = st.sampled_from(["", "hi", "two words", " "])


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """OpenAI conversations: any order of roles, tool results answering earlier calls."""
    messages: list[dict[str, Any]] = []
    pending: list[str] = []
    for i in range(draw(st.integers(1, 10))):
        content = draw(_MESSAGE_TEXT)
        if pending and draw(st.booleans()):
            messages.append(tool_result(pending.pop(0), content))
            continue
        kind = draw(st.sampled_from(["system", "developer", "user", "assistant"]))
        if kind == "assistant" and draw(st.booleans()):
            ids = [f"call.{i}:{k}" for k in range(draw(st.integers(1, 3)))]
            pending = list(ids)
            messages.append(assistant(content, tool_calls=[call(c, "f", "{}") for c in ids]))
        else:
            messages.append({"role": kind, "content": content})
    return messages


@settings(deadline=None, max_examples=100)
@given(messages=conversations())
@example(  # text between two tool results of one turn
    messages=[
        user("q"),
        assistant("", tool_calls=[call("call.0:0", "f", "{}"), call("call.0:1", "f", "{}")]),
        tool_result("call.0:0", "a"),
        user("note"),
        tool_result("call.0:1", "b"),
    ]
)
def test_message_rules_hold_for_any_conversation(messages: list[dict[str, Any]]) -> None:
    # Whitespace-only text carries nothing and Anthropic rejects it: it is dropped.
    nothing_to_send = not any(
        m.get("tool_calls") or m["role"] == "tool" or m["content"].strip()
        for m in messages
        if m["role"] not in ("system", "developer")
    )
    if nothing_to_send:
        # Only a conversation with nothing to send is refused.
        rejected(chat(*messages), "messages")
        return
    request = translate(chat(*messages))
    out = request["messages"]
    roles = [m["role"] for m in out]
    assert all(role in ("user", "assistant") for role in roles)
    assert all(a != b for a, b in itertools.pairwise(roles)), roles
    for m in out:
        assert m["content"], "no empty turn"
        kinds = [b["type"] for b in m["content"]]
        if "tool_result" in kinds:
            first_other = next((k for k, t in enumerate(kinds) if t != "tool_result"), len(kinds))
            assert "tool_result" not in kinds[first_other:], kinds
    for _, block in blocks_of(request):
        if block["type"] == "text":
            assert block["text"].strip()
    system_texts = [
        m["content"]
        for m in messages
        if m["role"] in ("system", "developer") and m["content"].strip()
    ]
    assert [b["text"] for b in request.get("system", [])] == system_texts
    user_texts = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
    assert [
        b["text"] for role, b in blocks_of(request) if role == "user" and b["type"] == "text"
    ] == user_texts
    assert_valid_for_sdk(request)


# =============================================================================================
# Errors


ANY_BUT_CONTEXT = "<any code but context_length_exceeded>"


def error_for(status: int, body: Any, headers: dict[str, str] | None = None) -> UpstreamError:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return error_from_status("claude", status, raw, headers or {})


@pytest.mark.parametrize(
    ("status", "error_type", "message_text", "out_status", "code"),
    [
        (400, "invalid_request_error", "max_tokens: Field required", 400, ANY_BUT_CONTEXT),
        (402, "billing_error", "Your credit balance is too low.", 402, "insufficient_quota"),
        (404, "not_found_error", "model: claude-nope", 404, "not_found"),
        (413, "request_too_large", "Request exceeds the maximum size", 413, "request_too_large"),
        (429, "rate_limit_error", "Number of requests has exceeded your rate limit", 429,
         "rate_limit_exceeded"),
    ],
)  # fmt: skip
def test_client_side_errors_keep_status_type_and_message(
    status: int, error_type: str, message_text: str, out_status: int, code: str | None
) -> None:
    error = error_for(status, anthropic_error(error_type, message_text, "req_1"))
    assert error.http_status == out_status
    body = error.to_body()["error"]
    assert body["type"] == error_type
    if code is ANY_BUT_CONTEXT:
        assert body["code"] != "context_length_exceeded"
    else:
        assert body["code"] == code
    assert body["message"] == message_text


@pytest.mark.parametrize("status", [401, 403])
def test_credential_errors_keep_the_status_but_not_the_message(status: int) -> None:
    secret = "invalid x-api-key sk-ant-api03-SECRETSECRET"
    kind = "authentication_error" if status == 401 else "permission_error"
    error = error_for(status, anthropic_error(kind, secret))
    assert error.http_status == status
    body = error.to_body()["error"]
    assert "SECRET" not in body["message"]
    assert "claude" in body["message"]  # names the connection whose credentials failed
    assert "SECRET" not in orjson.dumps(error.to_body()).decode()


def test_429_relays_retry_after_and_rate_limit_headers() -> None:
    headers = {"retry-after": "7", "anthropic-ratelimit-requests-remaining": "0"}
    error = error_for(429, anthropic_error("rate_limit_error", "slow down"), headers)
    assert error.http_status == 429
    assert error.headers["retry-after"] == "7"
    assert error.headers["anthropic-ratelimit-requests-remaining"] == "0"


@pytest.mark.parametrize(
    ("status", "error_type", "out_status", "code"),
    [
        (500, "api_error", 500, "upstream_error"),
        (529, "overloaded_error", 503, "overloaded"),
        (504, "timeout_error", 504, "upstream_timeout"),
    ],
)
def test_server_errors(status: int, error_type: str, out_status: int, code: str) -> None:
    error = error_for(
        status, anthropic_error(error_type, "internal detail xyz"), {"retry-after": "3"}
    )
    assert error.http_status == out_status
    body = error.to_body()["error"]
    assert body["type"] == error_type
    assert body["code"] == code
    assert "xyz" not in body["message"]  # the upstream's text only in debug mode
    assert "xyz" in error.to_body(debug=True)["error"]["message"]
    assert error.headers["retry-after"] == "3"


@pytest.mark.parametrize(
    "message_text",
    [
        "prompt is too long: 207791 tokens > 200000 maximum",
        "input length and `max_tokens` exceed context limit: 178959 + 64000 > 200000, "
        "decrease input length or `max_tokens` and try again",
    ],
)
def test_context_length_errors_get_their_code(message_text: str) -> None:
    error = error_for(400, anthropic_error("invalid_request_error", message_text))
    assert error.http_status == 400
    assert error.code == "context_length_exceeded"
    assert error.to_body()["error"]["message"] == message_text


def test_an_error_body_that_is_not_anthropics_keeps_the_status() -> None:
    error = error_for(413, b"<html><body>413 Request Entity Too Large</body></html>")
    assert error.http_status == 413
    assert error.to_body()["error"]["message"]
    error = error_for(529, b"")
    assert error.http_status == 503


# =============================================================================================
# Review fixes: each of these failed before its fix


def test_forcing_a_tool_with_manual_thinking_is_a_400_naming_tool_choice() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        rejected(chat(user("q"), tools=tools, tool_choice=choice, reasoning_effort="low"),
                 "tool_choice")
    # Adaptive thinking may force a tool (the model then skips thinking): allowed.
    request = translate(
        chat(user("q"), tools=tools, tool_choice="required", reasoning_effort="low"),
        reasoning="adaptive",
    )
    assert request["tool_choice"] == {"type": "any"}


def test_temperature_other_than_1_with_manual_thinking() -> None:
    rejected(chat(user("q"), temperature=0.5, reasoning_effort="low"), "temperature")
    assert "temperature" not in translate(
        chat(user("q"), temperature=0.5, reasoning_effort="low"), drop_unsupported=True
    )
    assert translate(chat(user("q"), temperature=1, reasoning_effort="low"))["temperature"] == 1


@pytest.mark.parametrize("top_k", [-1, 2.5])
def test_a_bad_top_k_is_a_400(top_k: Any) -> None:
    rejected(chat(user("q"), top_k=top_k), "top_k")


def test_json_object_answer_is_only_the_tool_input_even_with_text_around() -> None:
    info = RequestInfo(json_tool=True)
    answer = message(
        {"type": "text", "text": "Here you go:"},
        tool_use("toolu_1", JSON_TOOL, {"a": 1}),
        stop_reason="tool_use",
    )
    completion = from_anthropic_response(answer, info)
    assert orjson.loads(completion["choices"][0]["message"]["content"]) == {"a": 1}
    chunks = stream_of(answer, info)
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    assert orjson.loads(streamed) == {"a": 1}


def test_a_client_side_upstream_error_without_a_code_keeps_no_code() -> None:
    error = error_for(400, anthropic_error("invalid_request_error", "messages: bad", "req_1"))
    assert error.to_body()["error"]["code"] is None
