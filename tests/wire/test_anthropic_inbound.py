"""The Messages event stream synthesised from OpenAI chunks: a property test with a protocol
checker, plus the request and answer translations."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_gateway.errors import InvalidRequest, NotSupported
from lm_gateway.wire.anthropic_inbound import (
    MessageStreamEncoder,
    messages_to_openai,
    openai_to_message,
)


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}  # fmt: skip


def parse(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in data.decode().split("\n\n"):
        if not block.strip():
            continue
        kind, payload = block.split("\n", 1)
        assert kind.startswith("event: ") and payload.startswith("data: ")
        body = json.loads(payload.removeprefix("data: "))
        assert body["type"] == kind.removeprefix("event: ")
        events.append((body["type"], body))
    return events


def check(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Validate the Messages protocol; return what a client accumulates."""
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("message_start") == kinds.count("message_delta") == 1
    open_index: int | None = None
    next_index = 0
    blocks: list[dict[str, Any]] = []
    for kind, body in events[1:-2]:
        if kind == "content_block_start":
            assert open_index is None, "a block started before the previous one stopped"
            assert body["index"] == next_index
            open_index = next_index
            next_index += 1
            blocks.append({**body["content_block"], "_json": ""})
        elif kind == "content_block_delta":
            assert body["index"] == open_index
            block, delta = blocks[-1], body["delta"]
            expected = {"text": "text_delta", "tool_use": "input_json_delta",
                        "thinking": "thinking_delta"}[block["type"]]  # fmt: skip
            assert delta["type"] == expected
            if expected == "text_delta":
                assert delta["text"]
                block["text"] += delta["text"]
            elif expected == "thinking_delta":
                block["thinking"] += delta["thinking"]
            else:
                block["_json"] += delta["partial_json"]
        elif kind == "content_block_stop":
            assert body["index"] == open_index
            open_index = None
        else:
            raise AssertionError(f"unexpected {kind} inside the message")
    assert open_index is None
    for block in blocks:
        if block["type"] == "text":
            assert block["text"], "an empty text block"
    return {"blocks": blocks, "stop_reason": events[-2][1]["delta"]["stop_reason"],
            "usage": events[-2][1]["usage"]}  # fmt: skip


text_piece = st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=6)
tool = st.tuples(
    st.text(alphabet="abcdefgh", min_size=1, max_size=5),
    st.lists(st.text(alphabet='{}":ab1 ', max_size=4), max_size=4),
)
item = st.one_of(
    st.tuples(st.just("text"), text_piece),
    st.tuples(st.just("reasoning"), text_piece),
    st.tuples(st.just("tool"), tool),
)


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(item, max_size=12),
    finish=st.sampled_from(["stop", "length", "tool_calls", "content_filter", None]),
    usage=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=4), max_size=30),
)
def test_any_chunk_sequence_makes_a_well_formed_message_stream(
    items: list[tuple[str, Any]], finish: str | None, usage: bool, cuts: list[int]
) -> None:
    chunks = [chunk({"role": "assistant", "content": ""})]
    tool_index = 0
    for kind, value in items:
        if kind == "text":
            chunks.append(chunk({"content": value}))
        elif kind == "reasoning":
            chunks.append(chunk({"reasoning_content": value}))
        else:
            name, fragments = value
            chunks.append(chunk({"tool_calls": [{"index": tool_index, "id": f"call_{tool_index}",
                                                 "type": "function",
                                                 "function": {"name": name, "arguments": ""}}]}))
            for fragment in fragments:
                chunks.append(chunk({"tool_calls": [{"index": tool_index,
                                                     "function": {"arguments": fragment}}]}))
            tool_index += 1  # fmt: skip
    chunks.append(chunk({}, finish))
    if usage:
        chunks.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    encoder = MessageStreamEncoder("claude-x")
    out = b""
    position = 0
    for size in [*cuts, len(chunks)]:  # arbitrary batching, as reads deliver them
        out += encoder.encode(chunks[position : position + size])
        position += size
    out += encoder.end()
    assert encoder.end() == b""  # ends once
    result = check(parse(out))

    text = "".join(v for k, v in items if k == "text")
    assert "".join(b["text"] for b in result["blocks"] if b["type"] == "text") == text
    reasoning = "".join(v for k, v in items if k == "reasoning")
    assert "".join(b["thinking"] for b in result["blocks"] if b["type"] == "thinking") == reasoning
    tools = [b for b in result["blocks"] if b["type"] == "tool_use"]
    calls = [v for k, v in items if k == "tool"]
    assert [(b["name"], b["_json"]) for b in tools] == [(n, "".join(f)) for n, f in calls]
    if calls:
        assert result["stop_reason"] == "tool_use"
    else:
        expected = {"length": "max_tokens", "content_filter": "refusal", "tool_calls": "tool_use"}
        assert result["stop_reason"] == expected.get(finish or "", "end_turn")
    if usage:
        assert result["usage"] == {"input_tokens": 7, "output_tokens": 3}


def test_a_failed_stream_ends_with_an_error_event() -> None:
    encoder = MessageStreamEncoder("m")
    start = encoder.encode([chunk({"content": "par"})])
    (kind, body), = parse(encoder.error(529, "overloaded"))[-1:]
    assert b"message_start" in start
    assert kind == "error"
    assert body == {"type": "error", "error": {"type": "overloaded_error", "message": "overloaded"}}


def test_request_translation() -> None:
    request = messages_to_openai({
        "model": "m", "max_tokens": 50, "system": [{"type": "text", "text": "S"}],
        "stop_sequences": ["END"], "temperature": 0.2, "metadata": {"user_id": "u1"},
        "thinking": {"type": "enabled", "budget_tokens": 8000},
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "calling"},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                 "content": [{"type": "text", "text": "bad"}]},
                {"type": "text", "text": "go on"}]},
        ],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stream": True,
    })  # fmt: skip
    assert request["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "calling", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "f", "arguments": '{"a":1}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: bad"},
        {"role": "user", "content": "go on"},
    ]  # fmt: skip
    assert request["stop"] == ["END"] and request["user"] == "u1"
    assert request["tool_choice"] == "required" and request["parallel_tool_calls"] is False
    assert request["reasoning_effort"] == "medium"
    assert request["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("body", "error", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}, InvalidRequest,
         "model"),
        ({"model": "m", "messages": []}, InvalidRequest, "max_tokens"),
        ({"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]},
         InvalidRequest, "messages.0.role"),
        ({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "search_result", "source": "x"}]}]}, NotSupported, "messages.0.content[0]"),
        ({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
          "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, NotSupported,
         "tools.0"),
    ],
)  # fmt: skip
def test_bad_requests_name_the_field(body: dict[str, Any], error: type, param: str) -> None:
    with pytest.raises(error) as raised:
        messages_to_openai(body)
    assert raised.value.param == param  # type: ignore[attr-defined]


def test_answer_translation() -> None:
    message = openai_to_message({
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "", "reasoning_content": "think",
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "f", "arguments": '{"x": [1, 2]}'}}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 9},
    }, "claude-like")  # fmt: skip
    assert message["model"] == "claude-like" and message["stop_reason"] == "tool_use"
    assert message["content"] == [
        {"type": "thinking", "thinking": "think", "signature": ""},
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"x": [1, 2]}},
    ]
    assert message["usage"] == {"input_tokens": 5, "output_tokens": 9}
