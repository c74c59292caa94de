"""OpenAI chat completions <-> Anthropic Messages, both directions, streaming included.

Sans-io: dicts and SSE events in, dicts out. The rules (each one a place where other gateways
lost data; see ``doc/providers.md`` for the tables):

- ``system``/``developer`` messages anywhere are hoisted, in order, into ``system``; consecutive
  same-role messages are merged; every ``role: tool`` result of a turn goes into one user
  message as ``tool_result`` blocks, ahead of any text; empty text blocks are dropped.
- Tool-call ids from other providers are made valid for Anthropic (``^[a-zA-Z0-9_-]+$``) by one
  deterministic function applied to ``tool_use`` and ``tool_result`` alike.
- Thinking blocks travel through OpenAI-shaped clients as ``thinking_blocks`` on the assistant
  message (text *and* signature, or redacted data), and their text as ``reasoning_content``;
  a client that sends the message back returns the signed blocks verbatim, as Anthropic
  requires in a tool loop.
- ``response_format: json_schema`` uses native ``output_config.format``; ``json_object`` uses a
  forced tool whose input is unwrapped back into ``message.content`` (finish ``stop``).
- Parameters Anthropic cannot honour answer 400 naming the parameter, unless the connection
  drops them; parameters at their neutral value (``presence_penalty: 0``, ``n: 1``...) are
  simply omitted, as that changes nothing.
- Usage: ``prompt_tokens`` = input + cache reads + cache writes (Anthropic's ``input_tokens``
  excludes both); stream usage is cumulative in ``message_delta``: set, never added.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import orjson

from ..errors import (
    InvalidRequest,
    NotSupported,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamUnreachable,
    upstream_status_error,
)
from .openai import dumps, parse_data_uri
from .sse import SSEEvent

JSONObject = dict[str, Any]

#: The forced tool that carries ``response_format: json_object`` answers.
JSON_TOOL = "json_object_response"
#: The version that removed temperature/top_p/top_k.
_SAMPLING_REMOVED_IN = "2026-10-21"
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_TOOL_ID = re.compile(r"[a-zA-Z0-9_-]+\Z")

#: ``reasoning_effort`` -> thinking budget (tokens) for ``reasoning = "budget"``.
THINKING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768}
#: ``reasoning_effort`` -> ``output_config.effort`` for ``reasoning = "adaptive"``.
ADAPTIVE_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high",
                   "xhigh": "xhigh", "max": "max"}  # fmt: skip

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Request fields: translated, dropped on purpose (no effect on the answer), or neutral values.
_DROPPED = frozenset(
    {"stream_options", "store", "metadata", "service_tier", "prompt_cache_key",
     "safety_identifier", "prompt_cache_retention"}
)  # fmt: skip
_NEUTRAL: dict[str, Any] = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "top_logprobs": 0,
    "logit_bias": {},
}
_HANDLED = frozenset(
    {"model", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature",
     "top_p", "top_k", "stop", "user", "tools", "tool_choice", "parallel_tool_calls",
     "response_format", "reasoning_effort", "thinking", "functions", "function_call"}
)  # fmt: skip


@attrs.frozen
class AnthropicOptions:
    """Connection settings the translation depends on."""

    default_max_tokens: int = 4096
    version: str = "2023-06-01"
    reasoning: Literal["budget", "adaptive"] = "budget"
    drop_unsupported: bool = False


@attrs.frozen
class RequestInfo:
    """What the answer's translation needs to know about the request."""

    json_tool: bool = False


def tool_use_id(value: Any) -> str:
    """A tool-call id made valid for Anthropic, deterministically (same input, same output),
    so a ``tool_use`` and its ``tool_result`` still match. Valid ids are unchanged."""
    text = str(value) if value is not None else ""
    if _TOOL_ID.match(text):
        return text
    digest = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:10]
    return re.sub(r"[^a-zA-Z0-9_-]", "_", text)[:80] + "_" + digest


def _unsupported(param: str, why: str) -> NotSupported:
    return NotSupported(
        f"'{param}' is not supported by Anthropic connections: {why}",
        param=param,
        code="unsupported_parameter",
    )


def _text_of_parts(
    content: Any, param: str, *, allow_refusal: bool = False, start: int = 0
) -> list[JSONObject]:
    """Text blocks of a system/assistant/tool message (strings or text parts).

    ``start`` is the index of the first part in the message (for error messages when called
    on a slice). Whitespace-only text is dropped: Anthropic rejects blocks without content.
    """
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content.strip() else []
    blocks: list[JSONObject] = []
    for j, part in enumerate(content, start):
        kind = part.get("type")
        if kind == "text" or (allow_refusal and kind == "refusal"):
            text = part.get("text") if kind == "text" else part.get("refusal")
            if not isinstance(text, str):
                raise InvalidRequest(
                    f"'{param}[{j}]' needs a string '{'text' if kind == 'text' else 'refusal'}'.",
                    param=f"{param}[{j}]",
                )
            if text.strip():
                block: JSONObject = {"type": "text", "text": text}
                if "cache_control" in part:
                    block["cache_control"] = part["cache_control"]
                blocks.append(block)
        else:
            raise _unsupported(f"{param}[{j}]", f"a {kind!r} part cannot appear in this message")
    return blocks


def _image_block(part: JSONObject, param: str) -> JSONObject:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"'{param}.image_url.url' must be a URL.", param=f"{param}.image_url")
    block: JSONObject
    if url.startswith("data:"):
        media_type, data = parse_data_uri(url, f"{param}.image_url.url")
        if media_type not in _IMAGE_TYPES:
            raise _unsupported(
                f"{param}.image_url",
                f"images must be JPEG, PNG, GIF or WebP (got {media_type or 'no media type'})",
            )
        block = {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    elif url.startswith(("https://", "http://")):
        block = {"type": "image", "source": {"type": "url", "url": url}}
    else:
        raise InvalidRequest(
            f"'{param}.image_url.url' must be an http(s) URL or a data: URI.",
            param=f"{param}.image_url",
        )
    if "cache_control" in part:
        block["cache_control"] = part["cache_control"]
    return block


def _user_blocks(content: Any, param: str) -> list[JSONObject]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content.strip() else []
    blocks: list[JSONObject] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        where = f"{param}[{j}]"
        if kind == "text":
            blocks.extend(_text_of_parts([part], param, start=j))
        elif kind == "image_url":
            blocks.append(_image_block(part, where))
        elif kind == "file":
            file = part.get("file") if isinstance(part.get("file"), dict) else {}
            data = file.get("file_data")
            if not isinstance(data, str):
                raise _unsupported(where, "only files given inline as file_data (a data: URI)")
            media_type, b64 = parse_data_uri(data, f"{where}.file.file_data")
            if media_type != "application/pdf":
                raise _unsupported(where, f"only PDF files (got {media_type or 'none'})")
            doc: JSONObject = {
                "type": "document",
                "source": {"type": "base64", "media_type": media_type, "data": b64},
            }
            if isinstance(file.get("filename"), str):
                doc["title"] = file["filename"]
            blocks.append(doc)
        else:
            raise _unsupported(where, f"{kind!r} content parts cannot be sent to Anthropic")
    return blocks


def _arguments(raw: Any, param: str) -> JSONObject:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise InvalidRequest(f"'{param}' must be a JSON string.", param=param)
    try:
        # The standard library keeps integers beyond 64 bits exact (orjson makes them floats).
        value = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"'{param}' is not valid JSON: {exc}", param=param) from exc
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{param}' must be a JSON object.", param=param)
    return value


def _assistant_blocks(message: JSONObject, param: str) -> list[JSONObject]:
    blocks: list[JSONObject] = []
    for k, block in enumerate(message.get("thinking_blocks") or []):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "thinking" and isinstance(block.get("signature"), str):
            blocks.append(
                {
                    "type": "thinking",
                    "thinking": block.get("thinking") or "",
                    "signature": block["signature"],
                }
            )
        elif kind == "redacted_thinking" and isinstance(block.get("data"), str):
            blocks.append({"type": "redacted_thinking", "data": block["data"]})
        else:
            raise InvalidRequest(
                f"'{param}.thinking_blocks[{k}]' must be a thinking block with a signature or a "
                "redacted_thinking block, as the gateway returned it.",
                param=f"{param}.thinking_blocks[{k}]",
            )
    blocks.extend(_text_of_parts(message.get("content"), f"{param}.content", allow_refusal=True))
    calls = message.get("tool_calls") or []
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        calls = [
            *calls,
            {"id": f"call_{legacy.get('name')}", "type": "function", "function": legacy},
        ]
    for k, call in enumerate(calls):
        where = f"{param}.tool_calls[{k}]"
        if not isinstance(call, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        function = call.get("function") or {}
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"'{where}.function.name' is required.", param=where)
        blocks.append(
            {
                "type": "tool_use",
                "id": tool_use_id(call.get("id")),
                "name": name,
                "input": _arguments(function.get("arguments"), f"{where}.function.arguments"),
            }
        )
    return blocks


def _tool_result(message: JSONObject, param: str) -> JSONObject:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"'{param}.tool_call_id' is required.", param=f"{param}.tool_call_id")
    content = message.get("content")
    block: JSONObject = {"type": "tool_result", "tool_use_id": tool_use_id(call_id)}
    if isinstance(content, str):
        if content:
            block["content"] = content
    else:
        parts = _text_of_parts(content, f"{param}.content")
        if parts:
            block["content"] = parts
    return block


def convert_messages(
    messages: list[JSONObject],
) -> tuple[list[JSONObject], list[JSONObject]]:
    """OpenAI messages -> (Anthropic ``system`` blocks, Anthropic ``messages``).

    Raises:
        InvalidRequest, NotSupported: a message that cannot be translated (``param`` names it).
    """
    system: list[JSONObject] = []
    out: list[JSONObject] = []

    def add(role: str, blocks: list[JSONObject]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": list(blocks)})

    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_text_of_parts(message.get("content"), f"{param}.content"))
        elif role == "user":
            add("user", _user_blocks(message.get("content"), f"{param}.content"))
        elif role == "assistant":
            add("assistant", _assistant_blocks(message, param))
        elif role == "tool":
            add("user", [_tool_result(message, param)])
        elif role == "function":
            raise _unsupported(f"{param}.role", "legacy 'function' messages: use tools")
        else:
            raise InvalidRequest(f"Unknown role {role!r} in '{param}'.", param=f"{param}.role")
    # tool_result blocks must lead their user message (after merging, text could precede them).
    for message in out:
        if message["role"] == "user":
            blocks = message["content"]
            results = [b for b in blocks if b["type"] == "tool_result"]
            if results and blocks[: len(results)] != results:
                message["content"] = results + [b for b in blocks if b["type"] != "tool_result"]
    return system, out


def _tools(body: JSONObject) -> list[JSONObject] | None:
    tools = body.get("tools")
    functions = body.get("functions")
    if functions and not tools:
        tools = [{"type": "function", "function": f} for f in functions if isinstance(f, dict)]
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise _unsupported(f"tools[{i}]", "only function tools can be sent to Anthropic")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"'tools[{i}].function.name' is required.", param=f"tools[{i}]")
        schema = function.get("parameters")
        if not isinstance(schema, dict) or not schema:
            schema = {"type": "object", "properties": {}}
        converted: JSONObject = {"name": name, "input_schema": schema}
        if isinstance(function.get("description"), str) and function["description"]:
            converted["description"] = function["description"]
        if function.get("strict") is True:
            converted["strict"] = True
        if "cache_control" in tool:
            converted["cache_control"] = tool["cache_control"]
        out.append(converted)
    return out


def _tool_choice(body: JSONObject) -> JSONObject | None:
    choice = body.get("tool_choice")
    if choice is None and isinstance(body.get("function_call"), str | dict):
        legacy = body["function_call"]
        choice = legacy if isinstance(legacy, str) else {"type": "function", "function": legacy}
    parallel = body.get("parallel_tool_calls")
    out: JSONObject | None
    if choice is None:
        out = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        out = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise InvalidRequest(
            "'tool_choice' must be 'auto', 'none', 'required' or a named function.",
            param="tool_choice",
        )
    if out is not None and parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def to_anthropic_request(
    body: JSONObject, options: AnthropicOptions
) -> tuple[JSONObject, RequestInfo]:
    """Translate an OpenAI chat request into an Anthropic Messages request.

    Raises:
        InvalidRequest, NotSupported: the request cannot be translated faithfully; the error
            names the parameter.
    """
    drop = options.drop_unsupported
    for key, value in body.items():
        if key in _HANDLED or key in _DROPPED or value is None:
            continue
        if key in _NEUTRAL and value == _NEUTRAL[key]:
            continue
        if drop:
            continue
        reasons = {
            "seed": "Anthropic has no seed",
            "presence_penalty": "Anthropic has no presence penalty",
            "frequency_penalty": "Anthropic has no frequency penalty",
            "logit_bias": "Anthropic has no logit bias",
            "logprobs": "Anthropic returns no log probabilities",
            "top_logprobs": "Anthropic returns no log probabilities",
            "n": "n > 1 is served by the gateway, not by Anthropic",
        }
        raise _unsupported(key, reasons.get(key, "the parameter has no Anthropic equivalent"))

    system, messages = convert_messages(body.get("messages") or [])
    if not messages:
        raise InvalidRequest(
            "Anthropic needs at least one user or assistant message besides system messages.",
            param="messages",
        )
    request: JSONObject = {"model": body["model"], "messages": messages}
    if system:
        request["system"] = system
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    request["max_tokens"] = (
        max_tokens
        if isinstance(max_tokens, int) and max_tokens > 0
        else (options.default_max_tokens)
    )

    new_version = options.version >= _SAMPLING_REMOVED_IN
    for key, neutral in (("temperature", 1), ("top_p", 1), ("top_k", None)):
        value = body.get(key)
        if value is None:
            continue
        if new_version:
            if value == neutral or drop:
                continue  # the default sampling is what this version always uses
            raise _unsupported(
                key,
                f"anthropic-version {options.version} samples with the model's defaults only; "
                f"remove it, or set the connection's anthropic_version to 2023-06-01",
            )
        if key == "top_k" and (not isinstance(value, int) or value < 0):
            raise InvalidRequest(
                f"'top_k' must be a whole number of at least 0 (got {value}).",
                param=key,
                code="invalid_value",
            )
        if key in ("temperature", "top_p") and not 0 <= value <= 1:
            if drop:
                continue
            raise InvalidRequest(
                f"'{key}' must be between 0 and 1 for Anthropic models (got {value}).",
                param=key,
                code="invalid_value",
            )
        request[key] = value

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop:
        request["stop_sequences"] = list(stop)
    if isinstance(body.get("user"), str):
        request["metadata"] = {"user_id": body["user"]}

    tools = _tools(body)
    tool_choice = _tool_choice(body)
    info = RequestInfo()
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise InvalidRequest(
                    "'response_format.json_schema.schema' must be a JSON schema object.",
                    param="response_format",
                )
            request["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        elif kind == "json_object":
            if tools:
                raise _unsupported(
                    "response_format",
                    "json_object cannot be combined with tools (use json_schema)",
                )
            tools = [
                {
                    "name": JSON_TOOL,
                    "description": "Respond with a JSON object.",
                    "input_schema": {"type": "object", "additionalProperties": True},
                }
            ]
            tool_choice = {"type": "tool", "name": JSON_TOOL}
            info = RequestInfo(json_tool=True)
        elif kind not in (None, "text"):
            raise InvalidRequest(f"Unknown response_format type {kind!r}.", param="response_format")
    if tools:
        request["tools"] = tools
        if tool_choice is not None:
            request["tool_choice"] = tool_choice

    thinking = body.get("thinking")
    effort = body.get("reasoning_effort")
    if isinstance(thinking, dict):
        request["thinking"] = thinking  # Anthropic's own parameter, passed as the client wrote it
    elif isinstance(effort, str) and effort != "none":
        if options.reasoning == "adaptive":
            if effort not in ADAPTIVE_EFFORT:
                raise InvalidRequest(
                    f"Unknown reasoning_effort {effort!r}.", param="reasoning_effort"
                )
            request["thinking"] = {"type": "adaptive"}
            request.setdefault("output_config", {})["effort"] = ADAPTIVE_EFFORT[effort]
        else:
            if effort not in THINKING_BUDGETS:
                raise InvalidRequest(
                    f"Unknown reasoning_effort {effort!r}.", param="reasoning_effort"
                )
            budget = THINKING_BUDGETS[effort]
            request["thinking"] = {"type": "enabled", "budget_tokens": budget}
            if request["max_tokens"] <= budget:
                # Thinking counts toward max_tokens and the budget must be below it: give the
                # answer the room the client asked for on top of the thinking budget.
                request["max_tokens"] = budget + request["max_tokens"]
    manual_thinking = request.get("thinking", {}).get("type") == "enabled"
    if info.json_tool and manual_thinking:
        raise _unsupported(
            "response_format", "json_object forces a tool, which Anthropic refuses with thinking"
        )
    if manual_thinking and request.get("tool_choice", {}).get("type") in ("any", "tool"):
        raise _unsupported(
            "tool_choice",
            "Anthropic cannot force a tool while thinking is on (use 'auto', or no "
            "reasoning_effort)",
        )
    if manual_thinking and request.get("temperature", 1) != 1:
        if drop:
            del request["temperature"]
        else:
            raise _unsupported("temperature", "with thinking on, Anthropic only samples at 1")
    if body.get("stream"):
        request["stream"] = True
    return request, info


# -- answers --------------------------------------------------------------------------------


def translate_usage(usage: Mapping[str, Any] | None) -> JSONObject | None:
    """Anthropic usage -> OpenAI usage (prompt includes cache reads and writes)."""
    if not isinstance(usage, Mapping):
        return None
    uncached = usage.get("input_tokens") or 0
    cache_read = usage.get("cache_read_input_tokens") or 0
    cache_write = usage.get("cache_creation_input_tokens") or 0
    output = usage.get("output_tokens") or 0
    details = usage.get("output_tokens_details")
    thinking = details.get("thinking_tokens") if isinstance(details, Mapping) else None
    prompt = uncached + cache_read + cache_write
    out: JSONObject = {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {
            "cached_tokens": cache_read,
            "cache_write_tokens": cache_write,
        },
    }
    if thinking is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": thinking}
    return out


def finish_reason(stop_reason: Any, *, json_tool: bool = False) -> str:
    """Anthropic ``stop_reason`` -> OpenAI ``finish_reason`` (unknown values -> ``stop``)."""
    if json_tool and stop_reason == "tool_use":
        return "stop"
    return FINISH_REASONS.get(str(stop_reason), "stop")


def from_anthropic_response(message: JSONObject, info: RequestInfo) -> JSONObject:
    """An Anthropic ``Message`` -> an OpenAI ``chat.completion``.

    Raises:
        UpstreamProtocolError: the answer is not a Message.
    """
    content = message.get("content")
    if not isinstance(content, list):
        raise UpstreamProtocolError(
            "The upstream provider sent a message without content.",
            detail=f"keys: {sorted(message)[:20]}",
        )
    json_answer: str | None = None
    texts: list[str] = []
    reasoning: list[str] = []
    thinking_blocks: list[JSONObject] = []
    tool_calls: list[JSONObject] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "thinking":
            reasoning.append(block.get("thinking") or "")
            thinking_blocks.append(
                {
                    "type": "thinking",
                    "thinking": block.get("thinking") or "",
                    "signature": block.get("signature") or "",
                }
            )
        elif kind == "redacted_thinking":
            thinking_blocks.append({"type": "redacted_thinking", "data": block.get("data")})
        elif kind == "tool_use":
            arguments = dumps(block.get("input") or {}).decode()
            if info.json_tool and block.get("name") == JSON_TOOL:
                json_answer = arguments
                continue
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
    if json_answer is not None:
        texts = [json_answer]  # text around the forced tool would break the JSON
    stop_reason = message.get("stop_reason")
    result: JSONObject = {
        "role": "assistant",
        "content": "".join(texts) if texts or not tool_calls else None,
        "refusal": None,
    }
    if stop_reason == "refusal":
        details = message.get("stop_details")
        explanation = details.get("explanation") if isinstance(details, dict) else None
        result["refusal"] = explanation or "The model declined to answer."
    if reasoning:
        result["reasoning_content"] = "".join(reasoning)
    if thinking_blocks:
        result["thinking_blocks"] = thinking_blocks
    if tool_calls:
        result["tool_calls"] = tool_calls
    completion: JSONObject = {
        "id": message.get("id") or f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": result,
                "logprobs": None,
                "finish_reason": finish_reason(stop_reason, json_tool=info.json_tool),
            }
        ],
    }
    usage = translate_usage(message.get("usage"))
    if usage is not None:
        completion["usage"] = usage
    return completion


class AnthropicStreamTranslator:
    """Anthropic stream events -> OpenAI chunks (see the module docstring).

    Text and tool blocks share Anthropic's block index space; OpenAI tool calls have their own
    index, so a map block-index -> tool-index is kept. A thinking block's text streams as
    ``reasoning_content``; when the block ends, the whole signed block is sent once as
    ``thinking_blocks`` so an accumulating client can send it back.
    """

    def __init__(self, connection: str, info: RequestInfo) -> None:
        self._connection = connection
        self._info = info
        self.done = False
        self._id = f"chatcmpl-{secrets.token_hex(12)}"
        self._model: Any = None
        self._created = int(time.time())
        self._usage: JSONObject = {}
        self._blocks: dict[int, JSONObject] = {}
        self._tool_index: dict[int, int] = {}
        self._stop_reason: Any = None
        self._stop_details: Any = None
        self._started = False
        self._finished = False
        self._thinking_count = 0

    def _next_thinking_index(self) -> int:
        # Stream accumulators (the openai SDK's among them) merge list entries by "index".
        index = self._thinking_count
        self._thinking_count += 1
        return index

    def _chunk(self, delta: JSONObject, finish: str | None = None) -> JSONObject:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def feed(self, event: SSEEvent) -> list[JSONObject]:
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(
                f"The upstream provider sent a malformed stream event (connection "
                f"{self._connection!r}).",
                detail=f"{exc}; data starts {event.data[:200]!r}",
                connection=self._connection,
            ) from exc
        if not isinstance(data, dict):
            raise UpstreamProtocolError(
                f"The upstream provider sent a stream event that is not an object (connection "
                f"{self._connection!r}).",
                connection=self._connection,
            )
        kind = data.get("type") or event.event
        handler = getattr(self, f"_on_{kind}", None)
        if handler is None:
            return []  # ping, and event types this version does not know: nothing to relay
        chunks: list[JSONObject] = handler(data)
        return chunks

    def _on_error(self, data: JSONObject) -> list[JSONObject]:
        error = data.get("error")
        raise error_from_body(self._connection, None, error if isinstance(error, dict) else {})

    def _on_message_start(self, data: JSONObject) -> list[JSONObject]:
        message = data.get("message") or {}
        if isinstance(message.get("id"), str):
            self._id = message["id"]
        self._model = message.get("model")
        if isinstance(message.get("usage"), dict):
            self._usage = dict(message["usage"])
        self._started = True
        return [self._chunk({"role": "assistant"})]

    def _on_content_block_start(self, data: JSONObject) -> list[JSONObject]:
        index = data.get("index", 0)
        block = data.get("content_block") or {}
        kind = block.get("type")
        self._blocks[index] = {
            "type": kind,
            "text": "",
            "signature": block.get("signature") or "",
            "args": False,
            "name": block.get("name"),
        }
        if kind == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if kind == "redacted_thinking":
            entry = {
                "index": self._next_thinking_index(),
                "type": "redacted_thinking",
                "data": block.get("data"),
            }
            return [self._chunk({"thinking_blocks": [entry]})]
        if kind == "tool_use":
            if self._info.json_tool and block.get("name") == JSON_TOOL:
                return []
            tool_index = len(self._tool_index)
            self._tool_index[index] = tool_index
            call = {
                "index": tool_index,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return [self._chunk({"tool_calls": [call]})]
        return []

    def _on_content_block_delta(self, data: JSONObject) -> list[JSONObject]:
        index = data.get("index", 0)
        delta = data.get("delta") or {}
        kind = delta.get("type")
        state = self._blocks.setdefault(
            index, {"type": None, "text": "", "signature": "", "args": False, "name": None}
        )
        if kind == "text_delta":
            if self._info.json_tool:
                return []  # in json_object mode the answer is the forced tool's input alone
            text = delta.get("text") or ""
            return [self._chunk({"content": text})] if text else []
        if kind == "thinking_delta":
            text = delta.get("thinking") or ""
            state["text"] += text
            return [self._chunk({"reasoning_content": text})] if text else []
        if kind == "signature_delta":
            state["signature"] += delta.get("signature") or ""
            return []
        if kind == "input_json_delta":
            fragment = delta.get("partial_json") or ""
            if not fragment:
                return []
            state["args"] = True
            if index not in self._tool_index:  # the json_object tool: its input is the answer
                return [self._chunk({"content": fragment})]
            call = {"index": self._tool_index[index], "function": {"arguments": fragment}}
            return [self._chunk({"tool_calls": [call]})]
        return []

    def _on_content_block_stop(self, data: JSONObject) -> list[JSONObject]:
        index = data.get("index", 0)
        state = self._blocks.get(index)
        if not state:
            return []
        if state["type"] == "thinking":
            block = {
                "index": self._next_thinking_index(),
                "type": "thinking",
                "thinking": state["text"],
                "signature": state["signature"],
            }
            return [self._chunk({"thinking_blocks": [block]})]
        if state["type"] == "tool_use" and not state["args"]:
            # A call without arguments streams no input at all; OpenAI clients expect "{}".
            if index in self._tool_index:
                call = {"index": self._tool_index[index], "function": {"arguments": "{}"}}
                return [self._chunk({"tool_calls": [call]})]
            return [self._chunk({"content": "{}"})]
        return []

    def _on_message_delta(self, data: JSONObject) -> list[JSONObject]:
        usage = data.get("usage")
        if isinstance(usage, dict):
            # Cumulative counts: later values replace earlier ones, never add to them.
            self._usage.update({k: v for k, v in usage.items() if v is not None})
        delta = data.get("delta") or {}
        if delta.get("stop_reason"):
            self._stop_reason = delta["stop_reason"]
            self._stop_details = delta.get("stop_details")
        return []

    def _on_message_stop(self, data: JSONObject) -> list[JSONObject]:
        self.done = True
        return self._final()

    def _final(self) -> list[JSONObject]:
        if self._finished:
            return []
        self._finished = True
        delta: JSONObject = {}
        if self._stop_reason == "refusal":
            details = self._stop_details if isinstance(self._stop_details, dict) else {}
            delta["refusal"] = details.get("explanation") or "The model declined to answer."
        chunks = [
            self._chunk(delta, finish_reason(self._stop_reason, json_tool=self._info.json_tool))
        ]
        usage = translate_usage(self._usage) if self._usage else None
        if usage is not None:
            chunks.append(
                {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self._model,
                    "choices": [],
                    "usage": usage,
                }
            )
        return chunks

    def usage_so_far(self) -> JSONObject | None:
        """The usage reported until now (cumulative), in OpenAI's fields."""
        return translate_usage(self._usage) if self._usage else None

    def finish(self) -> list[JSONObject]:
        if self.done:
            return []
        if self._stop_reason is not None:
            # message_delta came but message_stop did not: the answer itself is complete.
            self.done = True
            return self._final()
        raise UpstreamUnreachable(
            f"The upstream provider ended the stream before it finished (connection "
            f"{self._connection!r}).",
            detail="end of body without message_stop",
            connection=self._connection,
        )


# -- errors ---------------------------------------------------------------------------------

_CONTEXT_PATTERNS = ("prompt is too long", "exceed context limit", "context window",
                     "maximum context length")  # fmt: skip
_ERROR_CODES = {
    "rate_limit_error": "rate_limit_exceeded",
    "overloaded_error": "overloaded",
    "billing_error": "insufficient_quota",
    "request_too_large": "request_too_large",
    "not_found_error": "not_found",
    "timeout_error": "upstream_timeout",
    "api_error": "upstream_error",
}
#: Statuses for error types (used for mid-stream errors, which arrive after a 200).
_ERROR_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
    "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
    "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529,
}  # fmt: skip


def error_from_body(
    connection: str,
    status: int | None,
    error: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    raw: str = "",
) -> UpstreamError:
    """Anthropic's ``error`` object (and status, if any) -> our UpstreamError.

    529 ``overloaded_error`` becomes 503 (the status OpenAI clients retry and gateways fail
    over on); a context-length 400 gets code ``context_length_exceeded``.
    """
    etype = error.get("type") if isinstance(error.get("type"), str) else None
    message = error.get("message") if isinstance(error.get("message"), str) else None
    if status is None:
        status = _ERROR_STATUS.get(etype or "", 502)
    code = _ERROR_CODES.get(etype or "")
    if status == 400 and message and any(p in message.lower() for p in _CONTEXT_PATTERNS):
        code = "context_length_exceeded"
    if status == 529:
        status = 503
    extra = {}
    details = error.get("details")
    if isinstance(details, dict):
        extra["details"] = details
    return upstream_status_error(
        connection,
        status,
        message=message,
        error_type=etype,
        code=code,
        headers=headers,
        extra=extra,
        raw=raw,
    )


def error_from_status(
    connection: str, status: int, body: bytes, headers: dict[str, str]
) -> UpstreamError:
    """An Anthropic error answer -> our UpstreamError (the HTTP error mapper)."""
    raw = body[:2000].decode("utf-8", "replace")
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error_from_body(
        connection, status, error if isinstance(error, dict) else {}, headers, raw
    )
