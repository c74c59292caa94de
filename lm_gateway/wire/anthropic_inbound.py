"""Anthropic's Messages API *inbound*: Claude Code and Anthropic-SDK clients reaching any model.

Sans-io, both ways:

* :func:`messages_to_openai`: a Messages request -> an OpenAI chat request (system prompt,
  text/image/tool_use/tool_result blocks, tools and tool_choice, stop sequences, sampling).
* :func:`openai_to_message`: a ``chat.completion`` -> a Messages ``message``.
* :class:`MessageStreamEncoder`: OpenAI chunks -> the Messages event stream, exactly as the
  protocol goes: ``message_start`` first; one ``content_block_start``/``delta``/``stop`` per
  text, thinking or tool_use block (never an empty text block); tool arguments as
  ``input_json_delta``; then ``message_delta`` with ``stop_reason`` (``tool_use`` when the model
  called tools, ``max_tokens``, ``end_turn``, ``refusal``) and the cumulative usage, and
  ``message_stop``.
* :func:`anthropic_error_body`: an error in Anthropic's shape, whose ``type`` the SDK maps to
  its exception classes.

Thinking blocks sent by a client are dropped on the way to a non-Anthropic model (their
signatures only mean something to Anthropic); reasoning a model streams comes back as a
thinking block without a signature.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

import orjson

from ..errors import InvalidRequest, NotSupported
from .openai import dumps

JSONObject = dict[str, Any]

#: HTTP status -> the error ``type`` Anthropic answers with (the SDK picks its exception by
#: status; the type is for people and logs).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}


#: Error ``type`` values only an Anthropic upstream produces (OpenAI-shaped errors use
#: ``invalid_request_error``/``api_error`` for everything): kept as the upstream sent them.
ANTHROPIC_ERROR_TYPES = frozenset(
    {"overloaded_error", "billing_error", "timeout_error", "not_found_error", "permission_error",
     "authentication_error", "request_too_large", "rate_limit_error"}
)  # fmt: skip


def anthropic_error_body(status: int, message: str) -> JSONObject:
    """``{"type": "error", "error": {"type", "message"}}`` for ``status``."""
    kind = _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


# -- requests ------------------------------------------------------------------------------


def _text_of(blocks: Any, param: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise InvalidRequest(f"'{param}' must be a string or an array of blocks.", param=param)
    texts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise NotSupported(
                f"'{param}[{i}]': only text blocks are supported here.", param=f"{param}[{i}]"
            )
        texts.append(str(block.get("text", "")))
    return "\n\n".join(texts) if param == "system" else "".join(texts)


def _image(block: Mapping[str, Any], param: str) -> JSONObject:
    source = block.get("source")
    if not isinstance(source, dict):
        raise InvalidRequest(f"'{param}.source' is required.", param=f"{param}.source")
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif source.get("type") == "url":
        url = str(source.get("url"))
    else:
        raise NotSupported(
            f"'{param}.source.type' {source.get('type')!r} is not supported.",
            param=f"{param}.source.type",
        )
    return {"type": "image_url", "image_url": {"url": url}}


def _user_message(content: Any, param: str) -> list[JSONObject]:
    """One Anthropic user turn -> OpenAI messages: tool results become ``tool`` messages
    (first, as OpenAI wants them right after the assistant's calls), the rest a user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"'{param}' must be a string or an array.", param=param)
    tools: list[JSONObject] = []
    parts: list[JSONObject] = []
    for i, block in enumerate(content):
        where = f"{param}[{i}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append(_image(block, where))
        elif kind == "tool_result":
            result = block.get("content")
            text = result if isinstance(result, str) else _text_of(result or [], where + ".content")
            if block.get("is_error"):
                text = f"Error: {text}"
            tools.append(
                {"role": "tool", "tool_call_id": str(block.get("tool_use_id")), "content": text}
            )
        elif kind == "document" and isinstance(block.get("source"), dict) and \
                block["source"].get("type") == "text":  # fmt: skip
            parts.append({"type": "text", "text": str(block["source"].get("data", ""))})
        else:
            raise NotSupported(
                f"'{where}': {kind!r} blocks can only be sent to Anthropic models.", param=where
            )
    out = list(tools)
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _assistant_message(content: Any, param: str) -> JSONObject:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(f"'{param}' must be a string or an array.", param=param)
    texts: list[str] = []
    calls: list[JSONObject] = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": str(block.get("id")),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name")),
                        "arguments": dumps(block.get("input") or {}).decode(),
                    },
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # signed for Anthropic only
        else:
            raise NotSupported(
                f"'{param}[{i}]': {kind!r} blocks can only be sent to Anthropic models.",
                param=f"{param}[{i}]",
            )
    message: JSONObject = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_choice(choice: Any) -> Any:
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise InvalidRequest(f"'tool_choice.type' {kind!r} is not valid.", param="tool_choice.type")


def messages_to_openai(body: Mapping[str, Any]) -> JSONObject:
    """A Messages request as an OpenAI chat request (see the module docstring).

    Raises:
        InvalidRequest: a required field is missing or malformed.
        NotSupported: blocks or tools only Anthropic models can take.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model: Field required", param="model")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidRequest("max_tokens: Field required (a positive integer)", param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    out: list[JSONObject] = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": _text_of(system, "system")})
    for i, message in enumerate(messages):
        param = f"messages.{i}"
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{param}' must be an object.", param=param)
        role = message.get("role")
        if role == "user":
            out.extend(_user_message(message.get("content"), f"{param}.content"))
        elif role == "assistant":
            out.append(_assistant_message(message.get("content"), f"{param}.content"))
        else:
            raise InvalidRequest(
                f"'{param}.role' must be 'user' or 'assistant'.", param=f"{param}.role"
            )
    request: JSONObject = {"model": model, "messages": out, "max_tokens": max_tokens}
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            request[key] = body[key]
    if body.get("stop_sequences"):
        request["stop"] = list(body["stop_sequences"])
    tools = body.get("tools")
    if tools:
        converted = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or "input_schema" not in tool:
                raise NotSupported(
                    f"'tools.{i}': server tools can only be used with Anthropic models.",
                    param=f"tools.{i}",
                )
            function: JSONObject = {"name": tool.get("name"), "parameters": tool["input_schema"]}
            if tool.get("description"):
                function["description"] = tool["description"]
            converted.append({"type": "function", "function": function})
        request["tools"] = converted
    choice = _tool_choice(body.get("tool_choice"))
    if choice is not None and tools:
        request["tool_choice"] = choice
    if isinstance(body.get("tool_choice"), dict) and body["tool_choice"].get(
        "disable_parallel_tool_use"
    ):
        request["parallel_tool_calls"] = False
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        request["user"] = metadata["user_id"]
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens") or 0
        request["reasoning_effort"] = "low" if budget < 4096 else "medium" if budget < 16384 \
            else "high"  # fmt: skip
    if body.get("stream"):
        request["stream"] = True
        request["stream_options"] = {"include_usage": True}
    return request


# -- answers -------------------------------------------------------------------------------


def _stop_reason(finish: str | None, called_tools: bool) -> str:
    if called_tools or finish in ("tool_calls", "function_call"):
        return "tool_use"
    if finish == "length":
        return "max_tokens"
    if finish == "content_filter":
        return "refusal"
    return "end_turn"


def anthropic_usage(usage: Any) -> JSONObject:
    """OpenAI usage -> Anthropic's (``input_tokens`` excludes cache reads)."""
    if not isinstance(usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    cached = cached if isinstance(cached, int) else 0
    raw_prompt = usage.get("prompt_tokens")
    prompt: int = raw_prompt if isinstance(raw_prompt, int) else 0
    out: JSONObject = {
        "input_tokens": max(0, prompt - cached),
        "output_tokens": usage.get("completion_tokens") or 0,
    }
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def _arguments(raw: Any) -> Any:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        return {"_raw": raw}
    return value if isinstance(value, dict) else {"_value": value}


def message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def openai_to_message(body: Mapping[str, Any], model: str) -> JSONObject:
    """A ``chat.completion`` (first choice) as a Messages ``message``."""
    choices = body.get("choices") or [{}]
    choice: JSONObject = choices[0] if isinstance(choices[0], dict) else {}
    found = choice.get("message")
    message: JSONObject = found if isinstance(found, dict) else {}
    content: list[JSONObject] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls") or []
    for call in calls:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{secrets.token_hex(8)}",
                "name": function.get("name"),
                "input": _arguments(function.get("arguments")),
            }
        )
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(choice.get("finish_reason"), bool(calls)),
        "stop_sequence": None,
        "usage": anthropic_usage(body.get("usage")),
    }


#: A marker chunk: no data arrived for a while, tell the client the stream is alive.
PING: JSONObject = {}


def _event(kind: str, data: JSONObject) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class MessageStreamEncoder:
    """OpenAI chunks -> Messages SSE events (the first choice; see the module docstring).

    :meth:`encode` takes each batch of chunks; :meth:`end` closes the message (once);
    :meth:`error` is the final event of a stream that failed.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self._started = False
        self._block: str | None = None  # "text", "thinking" or "tool_use"
        self._index = -1
        self._tool_slots: dict[int, int] = {}  # OpenAI tool index -> block index
        self._finish: str | None = None
        self._called_tools = False
        self._usage: Any = None
        self._ended = False

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        message: JSONObject = {
            "id": message_id(), "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }  # fmt: skip
        return [_event("message_start", {"type": "message_start", "message": message})]

    def _close_block(self) -> list[bytes]:
        if self._block is None:
            return []
        self._block = None
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self._index})]

    def _open(self, kind: str, block: JSONObject) -> list[bytes]:
        out = self._close_block()
        self._index += 1
        self._block = kind
        out.append(
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": self._index, "content_block": block},
            )
        )
        return out

    def _delta(self, delta: JSONObject) -> bytes:
        return _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": self._index, "delta": delta},
        )

    def encode(self, chunks: list[JSONObject]) -> bytes:
        out = self._start()
        for chunk in chunks:
            if chunk is PING:
                out.append(_event("ping", {"type": "ping"}))
                continue
            if isinstance(chunk.get("usage"), dict):
                self._usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                if choice.get("finish_reason"):
                    self._finish = choice["finish_reason"]
                delta = choice.get("delta") or {}
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if isinstance(reasoning, str) and reasoning:
                    if self._block != "thinking":
                        out += self._open("thinking", {"type": "thinking", "thinking": ""})
                    out.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
                text = delta.get("content")
                if isinstance(text, str) and text:
                    if self._block != "text":
                        out += self._open("text", {"type": "text", "text": ""})
                    out.append(self._delta({"type": "text_delta", "text": text}))
                for call in delta.get("tool_calls") or ():
                    out += self._tool_call(call)
        return b"".join(out)

    def _tool_call(self, call: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        self._called_tools = True
        slot = call.get("index", 0)
        function = call.get("function") or {}
        if slot not in self._tool_slots:
            out += self._open(
                "tool_use",
                {
                    "type": "tool_use",
                    "id": call.get("id") or f"toolu_{secrets.token_hex(8)}",
                    "name": function.get("name") or "",
                    "input": {},
                },
            )
            self._tool_slots[slot] = self._index
        fragment = function.get("arguments")
        if isinstance(fragment, str) and fragment:
            if self._tool_slots[slot] != self._index:
                return out  # arguments of an earlier call after a later one started: rare
            out.append(self._delta({"type": "input_json_delta", "partial_json": fragment}))
        return out

    def end(self) -> bytes:
        """``content_block_stop``, ``message_delta`` (stop reason, usage), ``message_stop``."""
        if self._ended:
            return b""
        self._ended = True
        out = self._start() + self._close_block()
        out.append(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": _stop_reason(self._finish, self._called_tools),
                        "stop_sequence": None,
                    },
                    "usage": anthropic_usage(self._usage),
                },
            )
        )
        out.append(_event("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def error(self, status: int, message: str) -> bytes:
        """The final event of a failed stream."""
        self._ended = True
        return _event("error", anthropic_error_body(status, message))


def estimate_input_tokens(body: Mapping[str, Any]) -> int:
    """A token estimate for ``count_tokens`` on models that are not Anthropic's: four
    characters of the prompt (system, messages, tools) a token."""
    size = len(dumps({k: body.get(k) for k in ("system", "messages", "tools")}))
    return max(1, size // 4)


# -- passthrough to Anthropic connections ----------------------------------------------------


class PassthroughTranslator:
    """Anthropic stream events, parsed and passed on as they are (for an Anthropic client
    talking to an Anthropic connection): nothing is translated, so thinking signatures,
    citations, server tool blocks and fields newer than this gateway all survive. ``ping``
    events are passed on too. An ``error`` event raises (the relay ends the stream with it)."""

    def __init__(self, connection: str) -> None:
        self._connection = connection
        self.done = False

    def feed(self, event: Any) -> list[JSONObject]:
        if not event.data:
            return []
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError as exc:
            from ..errors import UpstreamProtocolError

            raise UpstreamProtocolError(
                f"The upstream provider sent a malformed event (connection {self._connection!r}).",
                connection=self._connection,
            ) from exc
        if not isinstance(data, dict):
            return []
        if data.get("type") == "error":
            from .anthropic import error_from_body

            error = data.get("error")
            raise error_from_body(self._connection, None, error if isinstance(error, dict) else {})
        if data.get("type") == "message_stop":
            self.done = True
        return [data]

    def finish(self) -> list[JSONObject]:
        if not self.done:
            from ..errors import UpstreamProtocolError

            raise UpstreamProtocolError(
                f"The upstream stream ended before message_stop (connection {self._connection!r}).",
                connection=self._connection,
            )
        return []


class PassthroughEncoder:
    """Writes passed-through Anthropic events back out (``message_start`` gets the model name
    the client asked for) and keeps what accounting needs: the usage (OpenAI-shaped) and the
    stop reason."""

    passthrough = True

    def __init__(self, model: str) -> None:
        self.model = model
        self._usage: JSONObject = {}
        self.stop_reason: str | None = None

    @property
    def usage(self) -> JSONObject | None:
        from .anthropic import translate_usage

        return translate_usage(self._usage) if self._usage else None

    def encode(self, events: list[JSONObject]) -> bytes:
        out = []
        for data in events:
            kind = data.get("type")
            if kind == "message_start" and isinstance(data.get("message"), dict):
                message = data["message"]
                message["model"] = self.model
                if isinstance(message.get("usage"), dict):
                    self._usage.update(message["usage"])
            elif kind == "message_delta":
                if isinstance(data.get("usage"), dict):
                    self._usage.update({k: v for k, v in data["usage"].items() if v is not None})
                delta = data.get("delta")
                if isinstance(delta, dict) and delta.get("stop_reason"):
                    self.stop_reason = delta["stop_reason"]
            out.append(_event(str(kind), data))
        return b"".join(out)

    def end(self) -> bytes:
        return b""  # the upstream's own message_stop went through

    def error(self, status: int, message: str) -> bytes:
        return _event("error", anthropic_error_body(status, message))
