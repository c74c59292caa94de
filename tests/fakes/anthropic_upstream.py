"""A fake Anthropic Messages API upstream, built on the fake OpenAI server's h11 machinery.

:class:`FakeAnthropic` subclasses :class:`~tests.fakes.openai_upstream.FakeOpenAI`: scripting
(:meth:`~FakeOpenAI.push` with :class:`Reply`), request recording, close detection and the
``wait_*`` methods are inherited unchanged; only the default behaviour speaks Anthropic's wire
format, as the ``anthropic`` SDK 2.x encodes and decodes it (see ``notes/anthropic-api.md``).

:attr:`FakeAnthropic.base_url` is ``http://127.0.0.1:PORT`` (no ``/v1``: the SDK appends
``/v1/messages`` itself). Default routes:

* ``POST /v1/messages``: see :meth:`FakeAnthropic.messages_reply`.
* ``POST /v1/messages/count_tokens``: ``{"input_tokens": N}`` (N as in ``usage.input_tokens``).
* ``GET /v1/models`` and ``GET /v1/models/{id}``: Anthropic's page / ``ModelInfo`` shapes.
* anything else: 404 ``not_found_error``.

Every default route requires credentials (``x-api-key``, or ``Authorization: Bearer``; with
both, ``x-api-key`` wins) and an ``anthropic-version`` header of a known version; errors use
Anthropic's shape ``{"type": "error", "error": {"type", "message"}, "request_id"}`` and carry a
``request-id`` header, like every default answer.

Validation is deliberately *stricter* than today's API in one configurable way
(``strict_roles``, on by default): messages must start with ``user`` and alternate, and only
``user``/``assistant`` roles are accepted. The API of 2024 rejected such requests; the current
one merges consecutive turns and accepts ``role: "system"`` on some models. A gateway that
translates OpenAI chats should never rely on that leniency, so the fake catches it.

Tokens are whitespace-separated words, as in the OpenAI fake.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json as stdlib_json
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Final, Literal

import attrs
import orjson

from .openai_upstream import (
    CHUNK_DELAY_HEADER,
    FakeOpenAI,
    RecordedRequest,
    Reply,
    _fragments,
    _word_count,
    _words,
    serve_fake,
)

__all__ = [
    "ANTHROPIC_VERSION",
    "DEFAULT_MODELS",
    "ERROR_STATUS",
    "KNOWN_VERSIONS",
    "LEGACY_ANTHROPIC_VERSION",
    "PING",
    "TOOL_USE_ID",
    "FakeAnthropic",
    "anthropic_error",
    "anthropic_event",
    "error_reply",
    "message_stream_events",
    "open_fake_anthropic",
    "thinking_signature",
]

#: The version the ``anthropic`` SDK 2.x sends (``anthropic/_constants.py``).
ANTHROPIC_VERSION: Final = "2026-10-21"
#: The version older clients (SDK 1.x, Claude Code) send; it still accepts sampling parameters.
LEGACY_ANTHROPIC_VERSION: Final = "2023-06-01"
KNOWN_VERSIONS: Final = frozenset({LEGACY_ANTHROPIC_VERSION, ANTHROPIC_VERSION})
DEFAULT_MODELS: Final[tuple[str, ...]] = (
    "claude-sonnet-4-6",
    "claude-opus-4-7",
    "claude-haiku-4-5",
)
#: The id of the (single) tool_use block the fake answers with.
TOOL_USE_ID: Final = "toolu_fake_1"
#: The ``created_at`` of every model the fake lists.
MODEL_CREATED_AT: Final = "2025-09-29T00:00:00Z"
#: What the fake "thinks" before answering: this prefix + the last user text.
THINKING_PREFIX: Final = "thinking about: "

#: HTTP status of each error ``type`` (docs.claude.com/en/api/errors; ``timeout_error`` and
#: ``billing_error`` from the SDK's exception classes).
ERROR_STATUS: Final[Mapping[str, int]] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

_SAMPLING_PARAMS: Final = ("temperature", "top_p", "top_k")
# Top-level fields of messages.create in SDK 2.12 (non-beta and beta), minus the two that
# the SDK sends as headers (user_profile_id, workspace_id); ``output_format`` is the
# deprecated spelling of ``output_config.format``, still accepted for a transition period.
_KNOWN_FIELDS: Final = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "cache_control",
        "container",
        "diagnostics",
        "inference_geo",
        "metadata",
        "output_config",
        "output_format",
        "service_tier",
        "speed",
        "stop_sequences",
        "stream",
        "system",
        "thinking",
        "tool_choice",
        "tools",
        # beta-only
        "billing_policy",
        "compaction",
        "context_management",
        "fallback_credit_token",
        "fallbacks",
        "mcp_servers",
        "thread",
    }
)
_COUNT_TOKENS_FIELDS: Final = frozenset(
    {
        "model",
        "messages",
        "cache_control",
        "output_config",
        "output_format",
        "speed",
        "system",
        "thinking",
        "tool_choice",
        "tools",
        "context_management",
        "mcp_servers",
    }
)
_IMAGE_MEDIA_TYPES: Final = ("image/jpeg", "image/png", "image/gif", "image/webp")
_NAME_PATTERN: Final = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_ID_PATTERN: Final = re.compile(r"^[a-zA-Z0-9_-]+$")
_EFFORTS: Final = ("low", "medium", "high", "xhigh", "max")
_USER_BLOCKS: Final = frozenset(
    {"text", "image", "document", "search_result", "tool_result", "container_upload"}
)
_TOOL_RESULT_BLOCKS: Final = frozenset(
    {"text", "image", "document", "search_result", "tool_reference", "browser_state"}
)
_ASSISTANT_BLOCKS: Final = frozenset(
    {
        "text",
        "thinking",
        "redacted_thinking",
        "tool_use",
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "container_upload",
    }
)

#: The keep-alive event Anthropic interleaves (the SDK drops it).
PING: Final = b'event: ping\ndata: {"type":"ping"}\n\n'


def anthropic_event(event_type: str, obj: Any) -> bytes:
    """One named SSE event: ``event: <event_type>\\ndata: <json>\\n\\n``."""
    return b"event: " + event_type.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def anthropic_error(type: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    """An Anthropic error body: ``{"type": "error", "error": {"type", "message"}}``, plus
    ``request_id`` when given (the API always sends one)."""
    body: dict[str, Any] = {"type": "error", "error": {"type": type, "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_reply(
    type: str,
    message: str,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    request_id: str = "req_fake_scripted",
) -> Reply:
    """A scripted error :class:`Reply` in Anthropic's shape; ``status`` defaults to the one
    :data:`ERROR_STATUS` gives ``type``. ``request_id`` goes in the body and, unless
    ``headers`` names one, in the ``request-id`` header."""
    merged = {"request-id": request_id, **(headers or {})}
    return Reply.json(
        anthropic_error(type, message, request_id),
        status=ERROR_STATUS.get(type, 400) if status is None else status,
        headers=merged,
    )


def thinking_signature(thinking: str) -> str:
    """The fake's signature of a thinking block whose (returned) text is ``thinking``.

    Deterministic, so tests can predict it; the fake rejects a thinking block passed back
    whose signature is not ``thinking_signature(block["thinking"])``.
    """
    digest = hashlib.sha256(b"fake-anthropic-thinking\x00" + thinking.encode()).digest()
    return "fakesig_" + base64.b64encode(digest).decode("ascii")


def _initial_block(block: Mapping[str, Any]) -> dict[str, Any]:
    """The ``content_block`` of a ``content_block_start`` event for ``block``."""
    kind = block["type"]
    if kind == "text":
        return {"type": "text", "text": ""}
    if kind == "thinking":
        return {"type": "thinking", "thinking": "", "signature": ""}
    if kind in {"tool_use", "server_tool_use"}:
        return {**block, "input": {}}
    return dict(block)


def _block_deltas(block: Mapping[str, Any]) -> list[dict[str, Any]]:
    kind = block["type"]
    if kind == "text":
        return [{"type": "text_delta", "text": piece} for piece in _words(block["text"])]
    if kind == "thinking":
        deltas: list[dict[str, Any]] = [
            {"type": "thinking_delta", "thinking": piece} for piece in _words(block["thinking"])
        ]
        return [*deltas, {"type": "signature_delta", "signature": block["signature"]}]
    if kind in {"tool_use", "server_tool_use"}:
        arguments = stdlib_json.dumps(block["input"]) if block["input"] else ""
        # The API opens every tool input with an empty fragment; {} arrives as that alone.
        fragments = [""] + (_fragments(arguments) if arguments else [])
        return [{"type": "input_json_delta", "partial_json": f} for f in fragments]
    return []


def message_stream_events(
    message: Mapping[str, Any],
    *,
    ping: bool = True,
    delta_usage: Literal["full", "output_only"] = "full",
) -> list[bytes]:
    """The SSE events of a streamed answer that accumulates to ``message`` (a ``Message``).

    ``message_start`` carries the message with empty content, null stop fields and usage
    with the input/cache counts and ``output_tokens: 1``; each block is opened, filled
    (text and thinking word by word, tool input as JSON fragments starting with ``""``,
    thinking closed by a ``signature_delta``) and closed; a ``ping`` follows the first
    ``content_block_start``; ``message_delta`` carries the stop fields and the final,
    *cumulative* usage (``delta_usage="output_only"`` sends only ``output_tokens``, as the
    API did before it repeated input counts there); then ``message_stop``.
    """
    usage = message["usage"]
    start_usage = {key: value for key, value in usage.items() if key != "output_tokens_details"}
    start_usage["output_tokens"] = min(1, usage["output_tokens"])
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "stop_details": None,
        "usage": start_usage,
    }
    events = [anthropic_event("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message["content"]):
        events.append(
            anthropic_event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": _initial_block(block),
                },
            )
        )
        if index == 0 and ping:
            events.append(PING)
        events.extend(
            anthropic_event(
                "content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}
            )
            for d in _block_deltas(block)
        )
        events.append(
            anthropic_event("content_block_stop", {"type": "content_block_stop", "index": index})
        )
    if not message["content"] and ping:
        events.append(PING)
    delta: dict[str, Any] = {
        "stop_reason": message["stop_reason"],
        "stop_sequence": message.get("stop_sequence"),
    }
    if message.get("stop_details") is not None:
        delta["stop_details"] = message["stop_details"]
    if delta_usage == "full":
        final_usage = {
            key: usage[key]
            for key in (
                "input_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
                "output_tokens",
                "output_tokens_details",
            )
            if key in usage
        }
    else:
        final_usage = {"output_tokens": usage["output_tokens"]}
    events.append(
        anthropic_event(
            "message_delta", {"type": "message_delta", "delta": delta, "usage": final_usage}
        )
    )
    events.append(anthropic_event("message_stop", {"type": "message_stop"}))
    return events


class _Invalid(Exception):
    """Internal: the request is invalid; carries the error type, message and status."""

    def __init__(self, message: str, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.type = type


def _text_of(content: Any) -> str:
    """Text of a message's content: a string, or its text blocks (and the text inside
    tool_result blocks) joined with spaces."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    if isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                parts.append(block["text"])
            elif block.get("type") == "tool_result":
                parts.append(_text_of(block.get("content", "")))
    return " ".join(part for part in parts if part)


def _blocks(message: Any, kind: str) -> list[dict[str, Any]]:
    """The content blocks of type ``kind`` of ``message`` (none if it is malformed)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return []
    return [b for b in content if isinstance(b, dict) and b.get("type") == kind]


def _has_block(message: Any, kind: str) -> bool:
    return bool(_blocks(message, kind))


def _example(schema: Any, text: str, defs: Mapping[str, Any], depth: int = 0) -> Any:
    """A deterministic instance of a (simple) JSON schema; strings are ``text``."""
    if not isinstance(schema, dict) or depth > 20:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
        return _example(defs.get(ref.rsplit("/", 1)[1]), text, defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _example(schema[key][0], text, defs, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        return {name: _example(sub, text, defs, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        return []
    if kind == "string":
        return text
    if kind in {"integer", "number"}:
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    return None


@attrs.frozen
class _Answer:
    """What the fake answers to one valid messages request, before encoding."""

    message_id: str
    model: str
    user_text: str
    input_tokens: int
    cache_read: int
    cache_creation: int
    thinking: bool
    thinking_omitted: bool
    tool_name: str | None
    text: str
    max_tokens: int
    stop_sequences: tuple[str, ...]

    def message(self) -> dict[str, Any]:
        """The complete ``Message`` object."""
        content: list[dict[str, Any]] = []
        output_tokens = 0
        thinking_tokens = 0
        if self.thinking:
            thought = THINKING_PREFIX + self.user_text
            thinking_tokens = _word_count(thought)
            shown = "" if self.thinking_omitted else thought
            content.append(
                {"type": "thinking", "thinking": shown, "signature": thinking_signature(shown)}
            )
        output_tokens += thinking_tokens
        stop_sequence: str | None = None
        if self.tool_name is not None:
            tool_input = {"q": self.user_text}
            content.append(
                {"type": "tool_use", "id": TOOL_USE_ID, "name": self.tool_name, "input": tool_input}
            )
            output_tokens += _word_count(stdlib_json.dumps(tool_input))
            stop_reason = "tool_use"
        else:
            text = self.text
            stop_reason = "end_turn"
            hits = [(text.find(s), s) for s in self.stop_sequences if s and s in text]
            if hits:
                position, stop_sequence = min(hits)
                text = text[:position]
                stop_reason = "stop_sequence"
            pieces = _words(text)
            room = max(0, self.max_tokens - thinking_tokens)
            if len(pieces) > room:
                text = "".join(pieces[:room]).rstrip()
                stop_reason, stop_sequence = "max_tokens", None
            if text:
                content.append({"type": "text", "text": text})
            output_tokens += _word_count(text)
        usage: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.cache_creation,
                "ephemeral_1h_input_tokens": 0,
            },
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }
        if self.thinking:
            usage["output_tokens_details"] = {"thinking_tokens": thinking_tokens}
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "stop_details": None,
            "usage": usage,
        }


class FakeAnthropic(FakeOpenAI):
    """A running fake Anthropic upstream; get one from :func:`open_fake_anthropic`.

    Besides the inherited attributes: :attr:`api_keys` (None: any key is accepted),
    :attr:`strict_roles` (see the module docstring), and :attr:`cache_read_input_tokens` /
    :attr:`cache_creation_input_tokens`, reported in every answer's usage (0 by default;
    they come on top of ``input_tokens``, which counts the words of the prompt).
    """

    api_keys: frozenset[str] | None
    strict_roles: bool
    cache_read_input_tokens: int
    cache_creation_input_tokens: int

    def __init__(
        self,
        *,
        port: int,
        models: list[str] | None = None,
        api_keys: Iterable[str] | None = None,
        strict_roles: bool = True,
    ) -> None:
        super().__init__(port=port, models=list(DEFAULT_MODELS) if models is None else models)
        self.base_url = f"http://{self.host}:{port}"
        self.api_keys = None if api_keys is None else frozenset(api_keys)
        self.strict_roles = strict_roles
        self.cache_read_input_tokens = 0
        self.cache_creation_input_tokens = 0
        self._last_message_id = 0

    # -- routing --------------------------------------------------------------------------

    def default_reply(self, request: RecordedRequest) -> Reply:
        """Route ``request`` (see the module docstring); every answer has ``request-id``."""
        request_id = self._next_request_id()
        try:
            return self._route(request, request_id)
        except _Invalid as invalid:
            return self._error(invalid.type, invalid.message, request_id)

    def _error(self, type: str, message: str, request_id: str) -> Reply:
        headers = {"request-id": request_id, "x-request-id": request_id}
        if ERROR_STATUS.get(type, 400) < 500 and type != "rate_limit_error":
            headers["x-should-retry"] = "false"
        return Reply.json(
            anthropic_error(type, message, request_id),
            status=ERROR_STATUS.get(type, 400),
            headers=headers,
        )

    def _route(self, request: RecordedRequest, request_id: str) -> Reply:
        path = request.path.partition("?")[0]
        headers = {"request-id": request_id, "x-request-id": request_id}
        routes = {
            ("POST", "/v1/messages"),
            ("POST", "/v1/messages/count_tokens"),
            ("GET", "/v1/models"),
        }
        is_model = request.method == "GET" and path.startswith("/v1/models/")
        if (request.method, path) not in routes and not is_model:
            raise _Invalid("Not Found", "not_found_error")
        self._check_headers(request)
        if request.method == "GET":
            if not is_model:
                data = [self._model(m) for m in self.models]
                page = {
                    "data": data,
                    "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                }
                return Reply.json(page, headers=headers)
            model_id = path.removeprefix("/v1/models/")
            if model_id not in self.models:
                raise _Invalid(f"model: {model_id}", "not_found_error")
            return Reply.json(self._model(model_id), headers=headers)
        payload = self._payload(request)
        version = request.headers["anthropic-version"]
        if path == "/v1/messages/count_tokens":
            self._validate(payload, version, fields=_COUNT_TOKENS_FIELDS, needs_max_tokens=False)
            return Reply.json({"input_tokens": self._input_tokens(payload)}, headers=headers)
        self._validate(payload, version, fields=_KNOWN_FIELDS, needs_max_tokens=True)
        return self.messages_reply(request, payload, headers)

    @staticmethod
    def _model(model_id: str) -> dict[str, Any]:
        return {
            "type": "model",
            "id": model_id,
            "display_name": model_id.replace("-", " ").title(),
            "created_at": MODEL_CREATED_AT,
            "lifecycle": "active",
        }

    def _check_headers(self, request: RecordedRequest) -> None:
        api_key = request.headers.get("x-api-key")
        if api_key is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            api_key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        if api_key is None:
            raise _Invalid("x-api-key header is required", "authentication_error")
        if self.api_keys is not None and api_key not in self.api_keys:
            raise _Invalid("invalid x-api-key", "authentication_error")
        version = request.headers.get("anthropic-version")
        if version is None:
            raise _Invalid("anthropic-version: header is required")
        if version not in KNOWN_VERSIONS:
            raise _Invalid(f"anthropic-version: unknown version {version!r}")

    @staticmethod
    def _payload(request: RecordedRequest) -> dict[str, Any]:
        try:
            payload = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise _Invalid(f"The request body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise _Invalid("The request body must be a JSON object.")
        return payload

    # -- validation -----------------------------------------------------------------------

    def _validate(
        self,
        payload: dict[str, Any],
        version: str,
        *,
        fields: frozenset[str],
        needs_max_tokens: bool,
    ) -> None:
        required = (
            ("model", "max_tokens", "messages") if needs_max_tokens else ("model", "messages")
        )
        for name in required:
            if name not in payload:
                raise _Invalid(f"{name}: Field required")
        allowed = (
            fields | frozenset(_SAMPLING_PARAMS) if version == LEGACY_ANTHROPIC_VERSION else fields
        )
        for name in payload:
            if name not in allowed:
                raise _Invalid(f"{name}: Extra inputs are not permitted")
        if not isinstance(payload["model"], str) or not payload["model"]:
            raise _Invalid("model: Input should be a valid string")
        if needs_max_tokens:
            max_tokens = payload["max_tokens"]
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
                raise _Invalid("max_tokens: Input should be a valid integer >= 0")
        if "stream" in payload and not isinstance(payload["stream"], bool):
            raise _Invalid("stream: Input should be a valid boolean")
        for name in ("temperature", "top_p"):
            value = payload.get(name)
            if name in payload and (
                not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1
            ):
                raise _Invalid(f"{name}: Input should be a number between 0 and 1")
        if "top_k" in payload and (not isinstance(payload["top_k"], int) or payload["top_k"] < 0):
            raise _Invalid("top_k: Input should be an integer >= 0")
        stop_sequences = payload.get("stop_sequences", [])
        if not isinstance(stop_sequences, list) or not all(
            isinstance(s, str) for s in stop_sequences
        ):
            raise _Invalid("stop_sequences: Input should be a valid list of strings")
        metadata = payload.get("metadata", {})
        if not isinstance(metadata, dict) or not isinstance(
            metadata.get("user_id", ""), str | None
        ):
            raise _Invalid("metadata.user_id: Input should be a valid string")
        self._validate_system(payload.get("system"))
        tool_names = self._validate_tools(payload.get("tools"))
        self._validate_tool_choice(payload.get("tool_choice"), tool_names)
        self._validate_thinking(payload)
        self._validate_output_config(payload)
        self._validate_messages(payload["messages"], version)
        self._validate_thinking_history(payload)

    @staticmethod
    def _validate_text_block(
        block: dict[str, Any], where: str, *, user: bool, version: str
    ) -> None:
        if not isinstance(block.get("text"), str):
            raise _Invalid(f"{where}.text: Field required")
        if not block["text"]:
            raise _Invalid(f"{where.partition('.')[0]}: text content blocks must be non-empty")
        if user and version != LEGACY_ANTHROPIC_VERSION and block.get("citations"):
            raise _Invalid(f"{where}.citations: citations are not allowed in user messages")

    def _validate_system(self, system: Any) -> None:
        if system is None or isinstance(system, str):
            return
        if not isinstance(system, list):
            raise _Invalid("system: Input should be a valid string or list of text blocks")
        for index, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise _Invalid(f"system.{index}.type: Input should be 'text'")
            self._validate_text_block(block, f"system.{index}", user=False, version="")

    @staticmethod
    def _validate_tools(tools: Any) -> list[str]:
        if tools is None:
            return []
        if not isinstance(tools, list):
            raise _Invalid("tools: Input should be a valid list")
        names: list[str] = []
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise _Invalid(f"tools.{index}: Input should be a valid dictionary")
            name = tool.get("name")
            if not isinstance(name, str) or not _NAME_PATTERN.match(name):
                raise _Invalid(
                    f"tools.{index}.custom.name: String should match pattern "
                    f"'{_NAME_PATTERN.pattern}'"
                )
            if tool.get("type") in {None, "custom"}:
                schema = tool.get("input_schema")
                if not isinstance(schema, dict):
                    raise _Invalid(f"tools.{index}.custom.input_schema: Field required")
                if schema.get("type") != "object":
                    raise _Invalid(
                        f"tools.{index}.custom.input_schema.type: Input should be 'object'"
                    )
            if name in names:
                raise _Invalid(f"tools: Tool names must be unique ({name!r})")
            names.append(name)
        return names

    @staticmethod
    def _validate_tool_choice(tool_choice: Any, tool_names: list[str]) -> None:
        if tool_choice is None:
            return
        if not isinstance(tool_choice, dict) or tool_choice.get("type") not in {
            "auto",
            "any",
            "tool",
            "none",
        }:
            raise _Invalid(
                "tool_choice: Input should be an object with type 'auto', 'any', 'tool' or 'none'"
            )
        if tool_choice["type"] == "tool" and tool_choice.get("name") not in tool_names:
            raise _Invalid(f"tool_choice.tool.name: no tool named {tool_choice.get('name')!r}")
        flag = tool_choice.get("disable_parallel_tool_use", False)
        if not isinstance(flag, bool) or (
            tool_choice["type"] == "none" and "disable_parallel_tool_use" in tool_choice
        ):
            raise _Invalid(f"tool_choice.{tool_choice['type']}.disable_parallel_tool_use: invalid")

    @staticmethod
    def _validate_thinking(payload: dict[str, Any]) -> None:
        thinking = payload.get("thinking")
        if thinking is None:
            return
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in {"enabled", "adaptive", "disabled", "between_tools"}:
            raise _Invalid(
                "thinking: Input tag found using 'type' does not match any of the expected tags: "
                "'enabled', 'disabled', 'between_tools', 'adaptive'"
            )
        assert isinstance(thinking, dict)
        if thinking.get("display", "summarized") not in {None, "summarized", "omitted"}:
            raise _Invalid(f"thinking.{kind}.display: Input should be 'summarized' or 'omitted'")
        if kind != "enabled":
            return
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1024:
            raise _Invalid(
                "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
            )
        if "max_tokens" in payload and payload["max_tokens"] <= budget:
            raise _Invalid("`max_tokens` must be greater than `thinking.budget_tokens`.")
        tool_choice = payload.get("tool_choice")
        if isinstance(tool_choice, dict) and tool_choice.get("type") in {"any", "tool"}:
            raise _Invalid("Thinking may not be enabled when tool_choice forces tool use.")

    @staticmethod
    def _validate_output_config(payload: dict[str, Any]) -> None:
        output_config = payload.get("output_config", {})
        if not isinstance(output_config, dict):
            raise _Invalid("output_config: Input should be a valid dictionary")
        effort = output_config.get("effort")
        if effort is not None and effort not in _EFFORTS:
            raise _Invalid(f"output_config.effort: Input should be one of {', '.join(_EFFORTS)}")
        for where, fmt in (
            ("output_config.format", output_config.get("format")),
            ("output_format", payload.get("output_format")),
        ):
            if fmt is None:
                continue
            if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
                raise _Invalid(f"{where}.type: Input should be 'json_schema'")
            if not isinstance(fmt.get("schema"), dict):
                raise _Invalid(f"{where}.schema: Field required")

    def _validate_messages(self, messages: Any, version: str) -> None:
        if not isinstance(messages, list) or not messages:
            raise _Invalid("messages: at least one message is required")
        previous_role: str | None = None
        for index, message in enumerate(messages):
            where = f"messages.{index}"
            if not isinstance(message, dict):
                raise _Invalid(f"{where}: Input should be a valid dictionary")
            role = message.get("role")
            allowed_roles = (
                {"user", "assistant"} if self.strict_roles else {"user", "assistant", "system"}
            )
            if role not in allowed_roles:
                raise _Invalid(
                    f"{where}.role: Input should be "
                    + " or ".join(repr(r) for r in sorted(allowed_roles))
                )
            if self.strict_roles:
                if index == 0 and role != "user":
                    raise _Invalid('messages: first message must use the "user" role')
                if role == previous_role:
                    raise _Invalid(
                        'messages: roles must alternate between "user" and "assistant", '
                        f'but found multiple "{role}" roles in a row'
                    )
            previous_role = role
            content = message.get("content")
            is_final_assistant = role == "assistant" and index == len(messages) - 1
            if content in ("", []) and not is_final_assistant:
                raise _Invalid(
                    f"{where}: all messages must have non-empty content except for the "
                    "optional final assistant message"
                )
            if isinstance(content, str):
                continue
            if not isinstance(content, list):
                raise _Invalid(f"{where}.content: Input should be a valid string or list")
            for position, block in enumerate(content):
                self._validate_block(block, f"{where}.content.{position}", str(role), version)
            self._validate_tool_pairing(messages, index)

    def _validate_block(self, block: Any, where: str, role: str, version: str) -> None:
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _Invalid(f"{where}: Input should be a valid content block")
        kind = block["type"]
        allowed = _ASSISTANT_BLOCKS if role == "assistant" else _USER_BLOCKS
        if role == "system":
            allowed = frozenset({"text"})
        if kind == "document" and role == "assistant" and version != LEGACY_ANTHROPIC_VERSION:
            raise _Invalid(f"{where}: document blocks are not allowed in assistant messages")
        if kind not in allowed:
            raise _Invalid(
                f"{where}.type: Input tag '{kind}' found using 'type' does not match any of the "
                f"expected tags for a {role} message"
            )
        if kind == "text":
            self._validate_text_block(block, where, user=role == "user", version=version)
        elif kind == "image":
            self._validate_image(block, where)
        elif kind == "tool_use":
            for field, pattern in (("id", _ID_PATTERN), ("name", _NAME_PATTERN)):
                value = block.get(field)
                if not isinstance(value, str) or not pattern.match(value):
                    raise _Invalid(
                        f"{where}.tool_use.{field}: String should match pattern '{pattern.pattern}'"
                    )
            if not isinstance(block.get("input"), dict):
                raise _Invalid(f"{where}.tool_use.input: Input should be a valid dictionary")
        elif kind == "tool_result":
            self._validate_tool_result(block, where, version)
        elif kind == "thinking":
            if not isinstance(block.get("thinking"), str) or not isinstance(
                block.get("signature"), str
            ):
                raise _Invalid(f"{where}.thinking: `thinking` and `signature` are required")
            if block["signature"] != thinking_signature(block["thinking"]):
                raise _Invalid(f"{where}: Invalid `signature` in `thinking` block")
        elif kind == "redacted_thinking" and not isinstance(block.get("data"), str):
            raise _Invalid(f"{where}.redacted_thinking.data: Field required")

    @staticmethod
    def _validate_image(block: dict[str, Any], where: str) -> None:
        source = block.get("source")
        kind = source.get("type") if isinstance(source, dict) else None
        if kind == "base64":
            assert isinstance(source, dict)
            if source.get("media_type") not in _IMAGE_MEDIA_TYPES:
                raise _Invalid(
                    f"{where}.image.source.base64.media_type: Input should be "
                    "'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
                )
            data = source.get("data")
            if not isinstance(data, str) or not data:
                raise _Invalid(f"{where}.image.source.base64.data: Field required")
            try:
                base64.b64decode(data, validate=True)
            except ValueError:
                raise _Invalid(f"{where}.image.source.base64.data: invalid base64 data") from None
        elif kind == "url":
            assert isinstance(source, dict)
            url = source.get("url")
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                raise _Invalid(f"{where}.image.source.url.url: Input should be a valid URL")
        elif kind == "file":
            assert isinstance(source, dict)
            if not isinstance(source.get("file_id"), str):
                raise _Invalid(f"{where}.image.source.file.file_id: Field required")
        else:
            raise _Invalid(
                f"{where}.image.source: Input tag found using 'type' does not match any of the "
                "expected tags: 'base64', 'url', 'file'"
            )

    def _validate_tool_result(self, block: dict[str, Any], where: str, version: str) -> None:
        tool_use_id = block.get("tool_use_id")
        if not isinstance(tool_use_id, str) or not _ID_PATTERN.match(tool_use_id):
            raise _Invalid(
                f"{where}.tool_result.tool_use_id: String should match pattern "
                f"'{_ID_PATTERN.pattern}'"
            )
        if not isinstance(block.get("is_error", False), bool):
            raise _Invalid(f"{where}.tool_result.is_error: Input should be a valid boolean")
        content = block.get("content", "")
        if isinstance(content, str):
            return
        if not isinstance(content, list):
            raise _Invalid(f"{where}.tool_result.content: Input should be a valid string or list")
        for index, inner in enumerate(content):
            inner_where = f"{where}.tool_result.content.{index}"
            if not isinstance(inner, dict) or inner.get("type") not in _TOOL_RESULT_BLOCKS:
                raise _Invalid(f"{inner_where}.type: not a block type allowed in a tool_result")
            if inner["type"] == "text":
                self._validate_text_block(inner, inner_where, user=True, version=version)
            elif inner["type"] == "image":
                self._validate_image(inner, inner_where)

    @staticmethod
    def _validate_tool_pairing(messages: list[Any], index: int) -> None:
        """Each assistant tool_use must be answered by a tool_result in the next (user)
        message, and each tool_result must answer a tool_use of the message before it."""
        message = messages[index]
        if message.get("role") == "assistant":
            ids = [b["id"] for b in _blocks(message, "tool_use")]
            if not ids or index == len(messages) - 1:
                return
            following = messages[index + 1]
            answered = {b.get("tool_use_id") for b in _blocks(following, "tool_result")}
            missing = [i for i in ids if i not in answered]
            if missing or not isinstance(following, dict) or following.get("role") != "user":
                raise _Invalid(
                    f"messages.{index + 1}: `tool_use` ids were found without `tool_result` "
                    f"blocks immediately after: {', '.join(missing or ids)}. Each `tool_use` "
                    "block must have a corresponding `tool_result` block in the next message."
                )
        elif message.get("role") == "user":
            result_ids = [b.get("tool_use_id") for b in _blocks(message, "tool_result")]
            if not result_ids:
                return
            asked = (
                {b.get("id") for b in _blocks(messages[index - 1], "tool_use")} if index else set()
            )
            unexpected = [str(i) for i in result_ids if i not in asked]
            if unexpected:
                raise _Invalid(
                    f"messages.{index}.content: unexpected `tool_use_id` found in `tool_result` "
                    f"blocks: {', '.join(unexpected)}. Each `tool_result` block must have a "
                    "corresponding `tool_use` block in the previous message."
                )

    @staticmethod
    def _validate_thinking_history(payload: dict[str, Any]) -> None:
        """With thinking on, the assistant turn of the ongoing tool-use loop must start with
        its (signed) thinking block."""
        if not _thinking_on(payload):
            return
        messages: list[dict[str, Any]] = payload["messages"]
        if (
            not messages
            or messages[-1].get("role") != "user"
            or not _has_block(messages[-1], "tool_result")
        ):
            return
        index = len(messages) - 2
        assistant = messages[index]
        content = assistant.get("content")
        first = content[0] if isinstance(content, list) and content else None
        first_type = first.get("type") if isinstance(first, dict) else "text"
        if first_type not in {"thinking", "redacted_thinking"}:
            raise _Invalid(
                f"messages.{index}.content.0.type: Expected `thinking` or `redacted_thinking`, "
                f"but found `{first_type}`. When `thinking` is enabled, a final `assistant` "
                "message must start with a thinking block (preceding the lastmost set of "
                "`tool_use` and `tool_result` blocks). We recommend you include thinking blocks "
                "from previous turns."
            )

    # -- answering ------------------------------------------------------------------------

    @staticmethod
    def _input_tokens(payload: dict[str, Any]) -> int:
        system = payload.get("system")
        words = _word_count(_text_of(system) if system is not None else "")
        for message in payload["messages"]:
            words += _word_count(_text_of(message.get("content")))
        return words

    def messages_reply(
        self, request: RecordedRequest, payload: dict[str, Any], headers: dict[str, str]
    ) -> Reply:
        """Answer a valid ``POST /v1/messages`` deterministically.

        The answer is text ``"echo: " + <last user text>`` (text blocks of the last user
        message, or else the text of its tool_result blocks). With ``tools`` and a
        ``tool_choice`` that is not ``none``, it is instead one ``tool_use`` block (id
        :data:`TOOL_USE_ID`) calling the named tool (``{"type": "tool"}``) or the first one,
        with input ``{"q": <that text>}`` and ``stop_reason: "tool_use"`` -- except that
        under ``auto`` a request whose last message carries tool results is answered with
        text, so a tool loop ends. With ``thinking`` enabled or adaptive, a thinking block
        (``"thinking about: <text>"``, signed by :func:`thinking_signature`; empty text with
        ``display: "omitted"``) comes first -- not under adaptive thinking with forced tool
        use. ``output_config.format`` (or legacy ``output_format``) makes the text a JSON
        instance of the schema (strings are the user text). ``stop_sequences`` cut the text
        before the first match (``stop_reason: "stop_sequence"``); a ``max_tokens`` smaller
        than the words of thinking + text truncates the text (``"max_tokens"``). Usage counts
        words: input = system + messages, output = thinking + text (or the tool input's
        JSON); cache counts are the fake's attributes. ``"stream": true`` sends the same
        message as events (:func:`message_stream_events`), paced by ``x-fake-chunk-delay``.
        """
        messages: list[dict[str, Any]] = payload["messages"]
        last_user: dict[str, Any] = next(
            (m for m in reversed(messages) if m.get("role") == "user"), {}
        )
        user_text = _text_of(last_user.get("content"))
        thinking = payload.get("thinking") if isinstance(payload.get("thinking"), dict) else {}
        assert isinstance(thinking, dict)
        tool_name = _chosen_tool(
            payload, answering_tool_results=_has_block(last_user, "tool_result")
        )
        forced = isinstance(payload.get("tool_choice"), dict) and payload["tool_choice"].get(
            "type"
        ) in {
            "any",
            "tool",
        }
        output_config = payload.get("output_config") or {}
        fmt = output_config.get("format") or payload.get("output_format")
        if isinstance(fmt, dict):
            schema = fmt["schema"]
            text = stdlib_json.dumps(_example(schema, user_text, schema.get("$defs", {})))
        else:
            text = "echo: " + user_text
        self._last_message_id += 1
        answer = _Answer(
            message_id=f"msg_fake_{self._last_message_id:04d}",
            model=payload["model"],
            user_text=user_text,
            input_tokens=self._input_tokens(payload),
            cache_read=self.cache_read_input_tokens,
            cache_creation=self.cache_creation_input_tokens,
            thinking=_thinking_on(payload) and not (forced and tool_name is not None),
            thinking_omitted=thinking.get("display") == "omitted",
            tool_name=tool_name,
            text=text,
            max_tokens=payload["max_tokens"],
            stop_sequences=tuple(payload.get("stop_sequences", ())),
        )
        message = answer.message()
        if payload.get("stream") is True:
            delay = 0.0
            if CHUNK_DELAY_HEADER in request.headers:
                try:
                    delay = float(request.headers[CHUNK_DELAY_HEADER])
                except ValueError:
                    raise _Invalid(f"Invalid {CHUNK_DELAY_HEADER} header.") from None
            return Reply.sse(message_stream_events(message), delay=delay, headers=headers)
        return Reply.json(message, headers=headers)


def _thinking_on(payload: Mapping[str, Any]) -> bool:
    thinking = payload.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in {"enabled", "adaptive"}


def _chosen_tool(payload: Mapping[str, Any], *, answering_tool_results: bool) -> str | None:
    tools = payload.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    tool_choice = payload.get("tool_choice")
    kind = tool_choice.get("type", "auto") if isinstance(tool_choice, dict) else "auto"
    if kind == "none" or (kind == "auto" and answering_tool_results):
        return None
    if kind == "tool":
        assert isinstance(tool_choice, dict)
        return str(tool_choice["name"])
    return str(tools[0]["name"])


@contextlib.asynccontextmanager
async def open_fake_anthropic(
    *,
    models: list[str] | None = None,
    api_keys: Iterable[str] | None = None,
    strict_roles: bool = True,
) -> AsyncIterator[FakeAnthropic]:
    """Run a fake Anthropic upstream on ``127.0.0.1`` (ephemeral port) for the ``async with``;
    see :func:`~tests.fakes.openai_upstream.open_fake_openai` for the lifecycle."""

    def factory(port: int) -> FakeAnthropic:
        return FakeAnthropic(port=port, models=models, api_keys=api_keys, strict_roles=strict_roles)

    async with serve_fake(factory) as fake:
        yield fake
