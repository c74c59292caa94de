"""The OpenAI chat-completions wire format: request checks and response/chunk bookkeeping.

Pure functions over parsed JSON. The gateway checks what it needs and what is cheap to check
(types of well-known fields, message structure) so a client gets a clear 400 naming the field,
as OpenAI itself would answer; fields it does not know are forwarded untouched.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

import orjson

from ..errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamUnreachable,
    upstream_status_error,
)
from .sse import DONE, SSEEvent

JSONObject = dict[str, Any]

_NUMBER = (int, float)
_DATA_URI = re.compile(r"data:([\w.+/-]+)?(;[^,]*)?,(.*)\Z", re.S)

# field -> (accepted Python types, description for messages). None is always accepted.
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "stream": ((bool,), "a boolean"),
    "stream_options": ((dict,), "an object"),
    "n": ((int,), "an integer"),
    "temperature": (_NUMBER, "a number"),
    "top_p": (_NUMBER, "a number"),
    "presence_penalty": (_NUMBER, "a number"),
    "frequency_penalty": (_NUMBER, "a number"),
    "max_tokens": ((int,), "an integer"),
    "max_completion_tokens": ((int,), "an integer"),
    "seed": ((int,), "an integer"),
    "top_logprobs": ((int,), "an integer"),
    "logprobs": ((bool,), "a boolean"),
    "parallel_tool_calls": ((bool,), "a boolean"),
    "store": ((bool,), "a boolean"),
    "tools": ((list,), "an array"),
    "tool_choice": ((str, dict), "a string or an object"),
    "response_format": ((dict,), "an object"),
    "user": ((str,), "a string"),
    "metadata": ((dict,), "an object"),
    "logit_bias": ((dict,), "an object"),
    "stop": ((str, list), "a string or an array of strings"),
    "reasoning_effort": ((str,), "a string"),
    "service_tier": ((str,), "a string"),
    "modalities": ((list,), "an array"),
}

_TYPE_WORDS = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def _kind(value: Any) -> str:
    return _TYPE_WORDS.get(type(value), type(value).__name__)


def _type_error(param: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.",
        param=param,
        code="invalid_type",
    )


def dumps(value: Any) -> bytes:
    """JSON bytes; orjson, or the standard library for what orjson refuses (integers beyond
    64 bits, which tool arguments may hold)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def parse_json_object(body: bytes) -> JSONObject:
    """Parse a request body that must be a JSON object.

    Raises:
        InvalidRequest: empty body, malformed JSON (with orjson's position), or not an object.
    """
    if not body:
        raise InvalidRequest(
            "The request body is empty; expected a JSON object.", code="invalid_json"
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from exc
    if not isinstance(data, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object, not {_kind(data)}.", code="invalid_json"
        )
    return data


def _validate_model(data: Mapping[str, Any]) -> None:
    model = data.get("model")
    if model is None:
        raise InvalidRequest(
            "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
        )
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if not model.strip():
        raise InvalidRequest("'model' must not be empty.", param="model", code="invalid_value")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_embeddings_request(data: Mapping[str, Any]) -> None:
    """Check an embeddings request: ``model``, and ``input`` as a string, an array of strings,
    an array of token ids, or an array of such arrays (OpenAI's four shapes).

    Raises:
        InvalidRequest: naming the field at fault.
    """
    _validate_model(data)
    value = data.get("input")
    if value is None:
        raise InvalidRequest(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )
    if not isinstance(value, str):
        if not isinstance(value, list) or not value:
            raise _type_error("input", "a string or a non-empty array", value)
        for i, item in enumerate(value):
            ok = (
                isinstance(item, str)
                or _is_int(item)
                or (isinstance(item, list) and item and all(_is_int(t) for t in item))
            )
            if not ok:
                raise _type_error(
                    f"input[{i}]", "a string, a token id or an array of token ids", item
                )
    encoding = data.get("encoding_format")
    if encoding is not None and encoding not in ("float", "base64"):
        raise InvalidRequest(
            f"'encoding_format' must be 'float' or 'base64', not {encoding!r}.",
            param="encoding_format",
            code="invalid_value",
        )


def validate_completions_request(data: Mapping[str, Any]) -> None:
    """Check a legacy completions request: ``model`` and ``prompt`` (a string, an array of
    strings, token ids, or arrays of token ids).

    Raises:
        InvalidRequest: naming the field at fault.
    """
    _validate_model(data)
    prompt = data.get("prompt")
    if prompt is None:
        raise InvalidRequest(
            "Missing required parameter: 'prompt'.",
            param="prompt",
            code="missing_required_parameter",
        )
    if not isinstance(prompt, str | list):
        raise _type_error("prompt", "a string or an array", prompt)
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _type_error("stream", "a boolean", stream)


def validate_chat_request(data: Mapping[str, Any]) -> None:
    """Check a chat-completions request the way OpenAI would, naming the field at fault.

    Raises:
        InvalidRequest: a required field is missing or a known field has the wrong type.
    """
    _validate_model(data)
    messages = data.get("messages")
    if messages is None:
        raise InvalidRequest(
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list):
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise InvalidRequest(
            "'messages' must contain at least one message.", param="messages", code="invalid_value"
        )
    for i, message in enumerate(messages):
        _validate_message(message, f"messages[{i}]")
    for field, (types, expected) in _FIELD_TYPES.items():
        value = data.get(field)
        if value is None:
            continue
        # bool is an int in Python; JSON true is not a number.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise _type_error(field, expected, value)
    n = data.get("n")
    if n is not None and n < 1:
        raise InvalidRequest("'n' must be at least 1.", param="n", code="invalid_value")
    stop = data.get("stop")
    if isinstance(stop, list):
        for i, item in enumerate(stop):
            if not isinstance(item, str):
                raise _type_error(f"stop[{i}]", "a string", item)
    tools = data.get("tools")
    if tools:
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise _type_error(f"tools[{i}]", "an object", tool)


def _validate_message(message: Any, param: str) -> None:
    if not isinstance(message, dict):
        raise _type_error(param, "an object", message)
    role = message.get("role")
    if role is None:
        raise InvalidRequest(
            f"Missing required parameter: '{param}.role'.",
            param=f"{param}.role",
            code="missing_required_parameter",
        )
    if not isinstance(role, str) or not role:
        raise _type_error(f"{param}.role", "a non-empty string", role)
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        if not isinstance(content, list):
            raise _type_error(f"{param}.content", "a string or an array", content)
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise _type_error(f"{param}.content[{j}]", "an object", part)
            if not isinstance(part.get("type"), str):
                raise InvalidRequest(
                    f"Missing required parameter: '{param}.content[{j}].type'.",
                    param=f"{param}.content[{j}].type",
                    code="missing_required_parameter",
                )
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and not isinstance(tool_calls, list):
        raise _type_error(f"{param}.tool_calls", "an array", tool_calls)


def parse_data_uri(uri: str, param: str) -> tuple[str, str]:
    """``data:<type>;base64,<data>`` -> (media type, base64 data).

    Raises:
        InvalidRequest: not a base64 data URI, or the data is not valid base64.
    """
    match = _DATA_URI.match(uri)
    if not match or not match.group(2) or "base64" not in match.group(2):
        raise InvalidRequest(f"'{param}' must be a base64 data: URI.", param=param)
    data = match.group(3)
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"'{param}' holds invalid base64 data.", param=param) from exc
    return (match.group(1) or "").lower(), data


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message: string content, or its text parts joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def wants_stream_usage(request: Mapping[str, Any]) -> bool:
    """Whether the client asked for the final usage chunk (``stream_options.include_usage``)."""
    options = request.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class StreamTally:
    """What the gateway learns from a stream of chunks: usage, finish reasons, chunk count."""

    def __init__(self) -> None:
        self.usage: JSONObject | None = None
        self.finish_reasons: dict[int, str] = {}
        self.chunks = 0
        self.id: str | None = None

    def observe(self, chunk: Mapping[str, Any]) -> None:
        """Record one chunk (cheap: a few dict lookups)."""
        self.chunks += 1
        if self.id is None and isinstance(chunk.get("id"), str):
            self.id = chunk["id"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                reason = choice.get("finish_reason")
                if reason:
                    self.finish_reasons[choice.get("index", 0)] = reason

    @property
    def finished(self) -> bool:
        """Whether any choice reported a finish reason."""
        return bool(self.finish_reasons)


class StreamAccumulator:
    """Rebuilds the ``chat.completion`` a stream of chunks amounts to (for loggers that record
    answers): content, reasoning, refusal and tool calls per choice, finish reasons, usage.

    Tool call fragments are joined by their ``index`` (the id and name come once, the arguments
    in pieces), as the OpenAI SDK's stream helpers do.
    """

    def __init__(self) -> None:
        self.id: str | None = None
        self.created: int | None = None
        self.model: str | None = None
        self.usage: JSONObject | None = None
        self._choices: dict[int, dict[str, Any]] = {}

    def observe(self, chunk: Mapping[str, Any]) -> None:
        if self.id is None and isinstance(chunk.get("id"), str):
            self.id = chunk["id"]
            self.created = chunk.get("created") if isinstance(chunk.get("created"), int) else None
            self.model = chunk.get("model") if isinstance(chunk.get("model"), str) else None
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = {
                    "index": index,
                    "message": {"role": "assistant", "content": None},
                    "finish_reason": None,
                    "_tools": {},
                }
            if choice.get("finish_reason"):
                state["finish_reason"] = choice["finish_reason"]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._merge(state, delta)

    @staticmethod
    def _merge(state: dict[str, Any], delta: Mapping[str, Any]) -> None:
        message = state["message"]
        for key, value in delta.items():
            if key == "tool_calls" and isinstance(value, list):
                tools: dict[int, dict[str, Any]] = state["_tools"]
                for call in value:
                    if not isinstance(call, dict):
                        continue
                    slot = tools.setdefault(
                        call.get("index", len(tools)),
                        {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                    )
                    for field in ("id", "type"):
                        if call.get(field):
                            slot[field] = call[field]
                    function = call.get("function")
                    if isinstance(function, dict):
                        if function.get("name"):
                            slot["function"]["name"] += function["name"]
                        if isinstance(function.get("arguments"), str):
                            slot["function"]["arguments"] += function["arguments"]
            elif isinstance(value, str) and key != "role":
                message[key] = (message.get(key) or "") + value
            elif value is not None:
                message[key] = value

    def result(self) -> JSONObject:
        """The answer so far, shaped as a non-streaming ``chat.completion``."""
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            message = dict(state["message"])
            if state["_tools"]:
                message["tool_calls"] = [state["_tools"][i] for i in sorted(state["_tools"])]
            choices.append(
                {"index": index, "message": message, "finish_reason": state["finish_reason"]}
            )
        body: JSONObject = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.usage is not None:
            body["usage"] = self.usage
        return body


# -- upstream answers -------------------------------------------------------------------------


def error_from_status(
    connection: str, status: int, body: bytes, headers: dict[str, str]
) -> UpstreamError:
    """Build the error for an upstream's non-2xx answer, keeping its status and fields.

    Messages of 4xx answers are about the client's own request (a bad parameter, a context too
    long), so they are passed on. 401/403 mean the *gateway's* provider key was refused: that
    message (which may quote part of the key) is replaced. 5xx details are shown only in debug.
    """
    info: dict[str, Any] = {}
    raw_text = body[:2000].decode("utf-8", "replace")
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed)
        if isinstance(err, dict):
            info = err
        elif isinstance(err, str):  # Ollama and others: {"error": "message"}
            info = {"message": err}
    message = info.get("message") if isinstance(info.get("message"), str) else None
    code = info.get("code")
    known = {"message", "type", "code", "param"}
    return upstream_status_error(
        connection,
        status,
        message=message,
        error_type=info.get("type") if isinstance(info.get("type"), str) else None,
        code=str(code) if code is not None else None,
        param=info.get("param") if isinstance(info.get("param"), str) else None,
        headers=headers,
        extra={k: v for k, v in info.items() if k not in known},
        raw=raw_text,
    )


class OpenAIStreamTranslator:
    """OpenAI SSE events -> chunk objects (the identity translation, plus the checks).

    ``done`` after ``[DONE]``. A body that ends without ``[DONE]`` is accepted if some choice
    reported a ``finish_reason`` (several OpenAI-compatible servers omit ``[DONE]``); otherwise
    the stream was cut and :meth:`finish` raises.
    """

    def __init__(self, connection: str) -> None:
        self._connection = connection
        self.done = False
        self._finished_choice = False

    def feed(self, event: SSEEvent) -> list[JSONObject]:
        if event.data == DONE:
            self.done = True
            return []
        try:
            chunk = orjson.loads(event.data)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(
                f"The upstream provider sent a malformed stream chunk (connection "
                f"{self._connection!r}).",
                detail=f"{exc}; data starts {event.data[:200]!r}",
                connection=self._connection,
            ) from exc
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError(
                f"The upstream provider sent a stream chunk that is not an object "
                f"(connection {self._connection!r}).",
                detail=f"data starts {event.data[:200]!r}",
                connection=self._connection,
            )
        if event.event == "error" or ("error" in chunk and "choices" not in chunk):
            raise _stream_error(self._connection, chunk)
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self._finished_choice = True
        return [chunk]

    def finish(self) -> list[JSONObject]:
        if not self.done and not self._finished_choice:
            raise UpstreamUnreachable(
                f"The upstream provider ended the stream before it finished (connection "
                f"{self._connection!r}).",
                detail="end of body without [DONE] or a finish_reason",
                connection=self._connection,
            )
        self.done = True
        return []


def _stream_error(connection: str, chunk: JSONObject) -> UpstreamError:
    """An error object sent inside a stream (OpenRouter and others do this after a 200)."""
    err = chunk.get("error")
    info = err if isinstance(err, dict) else {"message": str(err)}
    code = info.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 502
    return UpstreamError(
        f"The upstream provider reported an error mid-stream (connection {connection!r}).",
        status=status,
        error_type=info.get("type") if isinstance(info.get("type"), str) else "upstream_error",
        code=str(code) if code is not None else "upstream_error",
        detail=str(info.get("message", "")),
        connection=connection,
    )
