"""Unit and property tests of the OpenAI chat-completions wire helpers."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_gateway.errors import InvalidRequest
from lm_gateway.wire.openai import (
    StreamTally,
    message_text,
    parse_json_object,
    validate_chat_request,
    wants_stream_usage,
)


def request(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


def top_field(param: str) -> str:
    """``messages[1].role`` -> ``messages``."""
    return param.partition("[")[0].partition(".")[0]


def invalid(body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate_chat_request(body)
    assert info.value.http_status == 400
    assert info.value.type == "invalid_request_error"
    return info.value


# --------------------------------------------------------------------------------------------
# parse_json_object


def test_parse_json_object() -> None:
    assert parse_json_object(b'{"model": "m", "n": 1}') == {"model": "m", "n": 1}
    assert parse_json_object('{"a": "\u00e9\u2028"}'.encode()) == {"a": "\u00e9\u2028"}


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b'{"a": 1,}', b"nope", b"[]", b'"text"', b"null", b"1", b"\xff\xfe"],
)
def test_parse_json_object_rejects(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_json_object(body)
    assert info.value.code == "invalid_json"
    assert info.value.http_status == 400


def test_parse_json_object_names_the_top_level_type() -> None:
    with pytest.raises(InvalidRequest, match="not an array"):
        parse_json_object(b"[1]")


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=15,
)


@settings(max_examples=200, deadline=None)
@given(obj=st.dictionaries(st.text(), _JSON, max_size=5))
def test_parse_json_object_round_trips(obj: dict[str, Any]) -> None:
    assert parse_json_object(orjson.dumps(obj)) == obj


# --------------------------------------------------------------------------------------------
# validate_chat_request


def test_a_valid_request_passes_and_is_not_changed() -> None:
    body = request(
        temperature=0.2,
        top_p=1,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        stop=["\n", "END"],
        max_tokens=100,
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice="auto",
        user="u1",
        seed=None,
    )
    before = copy.deepcopy(body)
    validate_chat_request(body)
    assert body == before


def test_unknown_fields_are_accepted() -> None:
    validate_chat_request(
        request(
            my_vendor_option={"x": [1, 2]},
            top_k=40,
            repetition_penalty="weird",
            extra_body=None,
        )
    )


def test_null_values_are_accepted_for_optional_fields() -> None:
    validate_chat_request(request(temperature=None, n=None, stop=None, stream=None, tools=None))


def test_message_shapes() -> None:
    validate_chat_request(
        request(
            messages=[
                {"role": "developer", "content": "x"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:..."}},
                    ],
                },
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "future-role", "content": "accepted", "name": "x"},
            ]
        )
    )


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (request(model=...), "model", "missing_required_parameter"),
        (request(model=None), "model", "missing_required_parameter"),
        (request(model=4), "model", "invalid_type"),
        (request(model=""), "model", "invalid_value"),
        (request(model="   "), "model", "invalid_value"),
        (request(messages=...), "messages", "missing_required_parameter"),
        (request(messages="Hi"), "messages", "invalid_type"),
        (request(messages={"role": "user"}), "messages", "invalid_type"),
        (request(messages=[]), "messages", "invalid_value"),
        (request(messages=[{"role": "user", "content": "a"}, "b"]), "messages[1]", "invalid_type"),
        (
            request(messages=[{"role": "user", "content": "a"}, {"content": "b"}]),
            "messages[1].role",
            "missing_required_parameter",
        ),
        (
            request(messages=[{"role": "user", "content": "a"}, {"role": 5, "content": "b"}]),
            "messages[1].role",
            "invalid_type",
        ),
        (
            request(messages=[{"role": "user"}, {"role": "", "content": "b"}]),
            "messages[1].role",
            "invalid_type",
        ),
        (
            request(messages=[{"role": "user", "content": 5}]),
            "messages[0].content",
            "invalid_type",
        ),
        (
            request(messages=[{"role": "user", "content": {"type": "text"}}]),
            "messages[0].content",
            "invalid_type",
        ),
        (
            request(messages=[{"role": "user", "content": [{"type": "text"}, "raw"]}]),
            "messages[0].content[1]",
            "invalid_type",
        ),
        (
            request(messages=[{"role": "user", "content": [{"text": "no type"}]}]),
            "messages[0].content[0].type",
            "missing_required_parameter",
        ),
        (
            request(messages=[{"role": "assistant", "tool_calls": {"id": "c"}}]),
            "messages[0].tool_calls",
            "invalid_type",
        ),
        (request(temperature="hot"), "temperature", "invalid_type"),
        (request(temperature=[1]), "temperature", "invalid_type"),
        (request(top_p="1"), "top_p", "invalid_type"),
        (request(n=1.5), "n", "invalid_type"),
        (request(n="2"), "n", "invalid_type"),
        (request(n=0), "n", "invalid_value"),
        (request(n=-1), "n", "invalid_value"),
        (request(max_tokens=10.0), "max_tokens", "invalid_type"),
        (request(stream="true"), "stream", "invalid_type"),
        (request(stream=1), "stream", "invalid_type"),
        (request(stream_options=True), "stream_options", "invalid_type"),
        (request(stop=5), "stop", "invalid_type"),
        (request(stop=[5]), "stop[0]", "invalid_type"),
        (request(stop=["a", None]), "stop[1]", "invalid_type"),
        (request(tools={"type": "function"}), "tools", "invalid_type"),
        (request(tools=["f"]), "tools[0]", "invalid_type"),
        (request(tool_choice=5), "tool_choice", "invalid_type"),
        (request(response_format="json"), "response_format", "invalid_type"),
        (request(user=5), "user", "invalid_type"),
        (request(logit_bias=[1]), "logit_bias", "invalid_type"),
    ],
)
def test_wrong_fields_are_named(body: dict[str, Any], param: str, code: str) -> None:
    err = invalid(body)
    assert err.param == param
    assert err.code == code
    assert top_field(param) in err.message


@pytest.mark.parametrize(
    "field",
    [
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "seed",
        "top_logprobs",
    ],
)
@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_a_number(field: str, value: bool) -> None:
    err = invalid(request(**{field: value}))
    assert err.param == field
    assert "a boolean" in err.message


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty"])
def test_integers_are_numbers(field: str) -> None:
    validate_chat_request(request(**{field: 1}))
    validate_chat_request(request(**{field: 0.5}))


@pytest.mark.parametrize("field", ["stream", "logprobs", "parallel_tool_calls", "store"])
def test_booleans_are_booleans(field: str) -> None:
    validate_chat_request(request(**{field: True}))
    err = invalid(request(**{field: 0}))
    assert err.param == field


def test_error_body_names_the_param() -> None:
    err = invalid(request(stop=["ok", 3]))
    body = err.to_body()
    assert body["error"]["param"] == "stop[1]"
    assert body["error"]["type"] == "invalid_request_error"


def test_a_non_object_body_is_rejected_cleanly() -> None:
    # validate_chat_request is documented for mappings; parse_json_object guarantees one.
    err = invalid({"model": "m", "messages": [None]})
    assert err.param == "messages[0]"


_WRONG_FOR_NUMBER = st.one_of(
    st.booleans(),
    st.text(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(), st.integers(), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(
    field=st.sampled_from(["temperature", "top_p", "presence_penalty", "frequency_penalty"]),
    value=_WRONG_FOR_NUMBER,
    extra=st.dictionaries(st.text().map(lambda k: f"x_{k}"), _JSON, max_size=3),
)
def test_any_non_number_is_rejected_naming_the_field(
    field: str, value: Any, extra: dict[str, Any]
) -> None:
    err = invalid({**request(**{field: value}), **extra})
    assert err.param == field


@settings(max_examples=200, deadline=None)
@given(extra=st.dictionaries(st.text(min_size=1).map(lambda k: f"x-{k}"), _JSON, max_size=5))
def test_any_unknown_fields_are_accepted(extra: dict[str, Any]) -> None:
    validate_chat_request({**request(), **extra})


@settings(max_examples=200, deadline=None)
@given(
    body=st.dictionaries(
        st.sampled_from(
            ["model", "messages", "n", "stop", "temperature", "stream", "tools", "user"]
        ),
        _JSON,
        max_size=8,
    )
)
def test_validation_only_raises_invalid_request(body: dict[str, Any]) -> None:
    try:
        validate_chat_request(body)
    except InvalidRequest as exc:
        error: InvalidRequest | None = exc
    else:
        error = None
    if error is not None:
        assert error.param is not None
        assert top_field(error.param) in body or error.param in ("model", "messages")


# --------------------------------------------------------------------------------------------
# message_text, wants_stream_usage


@pytest.mark.parametrize(
    ("message", "text"),
    [
        ({"role": "user", "content": "hello"}, "hello"),
        ({"role": "user", "content": ""}, ""),
        ({"role": "assistant", "content": None}, ""),
        ({"role": "assistant"}, ""),
        (
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "image_url", "image_url": {"url": "x"}, "text": "not text"},
                    {"type": "text", "text": "b"},
                    {"type": "text"},
                    {"type": "text", "text": 5},
                    "stray",
                ],
            },
            "ab",
        ),
        ({"role": "user", "content": 7}, ""),
    ],
)
def test_message_text(message: dict[str, Any], text: str) -> None:
    assert message_text(message) == text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"stream_options": {"include_usage": True}}, True),
        ({"stream_options": {"include_usage": False}}, False),
        ({"stream_options": {"include_usage": 1}}, False),
        ({"stream_options": {"include_usage": "true"}}, False),
        ({"stream_options": {}}, False),
        ({"stream_options": None}, False),
        ({"stream_options": [True]}, False),
        ({}, False),
    ],
)
def test_wants_stream_usage(body: dict[str, Any], expected: bool) -> None:
    assert wants_stream_usage(body) is expected


# --------------------------------------------------------------------------------------------
# StreamTally


def chunk(index: int = 0, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": extra.pop("id", "chatcmpl-1"),
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": {"content": "x"}, "finish_reason": finish}],
        **extra,
    }


def test_stream_tally() -> None:
    tally = StreamTally()
    assert not tally.finished
    assert (tally.chunks, tally.usage, tally.id) == (0, None, None)
    tally.observe(chunk(id="chatcmpl-A"))
    tally.observe(chunk(index=1, id="chatcmpl-B"))
    tally.observe(chunk(index=0, finish="stop"))
    assert tally.finished
    tally.observe(chunk(index=1, finish="length"))
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    tally.observe({"id": "chatcmpl-A", "choices": [], "usage": usage})
    assert tally.chunks == 5
    assert tally.id == "chatcmpl-A"
    assert tally.finish_reasons == {0: "stop", 1: "length"}
    assert tally.usage == usage


def test_stream_tally_tolerates_odd_chunks() -> None:
    tally = StreamTally()
    tally.observe({})
    tally.observe({"choices": None, "usage": None, "id": 5})
    tally.observe({"choices": ["x", {"finish_reason": "stop"}]})
    tally.observe({"usage": "lots"})
    assert tally.chunks == 4
    assert tally.id is None
    assert tally.usage is None
    assert tally.finish_reasons == {0: "stop"}


def test_stream_tally_keeps_the_last_usage() -> None:
    tally = StreamTally()
    tally.observe({"usage": {"total_tokens": 1}})
    tally.observe({"usage": {"total_tokens": 2}})
    assert tally.usage == {"total_tokens": 2}
