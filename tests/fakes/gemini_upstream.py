"""A fake Gemini upstream (Developer API and Vertex AI), on the fake OpenAI server's h11 core.

:class:`FakeGemini` subclasses :class:`~tests.fakes.openai_upstream.FakeOpenAI`: the
server, request recording, scripting with :class:`Reply` and close detection are the same;
only the default behaviour speaks Gemini's REST dialect, as ``google-genai`` 3.x and the
real service do (error texts are the real ones where known). Point a client at
:attr:`FakeGemini.base_url` (no version segment: ``http://127.0.0.1:PORT``), as
``HttpOptions(base_url=...)`` of ``google-genai``.

Routes answered by default (``{v}`` is any of ``v1``, ``v1beta``, ``v1alpha``, ``v1beta1``):

* ``POST /{v}/models/{model}:generateContent`` and ``:streamGenerateContent`` (Developer
  API), ``POST /{v}/projects/{p}/locations/{l}/publishers/google/models/{model}:...``
  (Vertex AI) and ``POST /{v}/publishers/google/models/{model}:...`` (Vertex express mode);
  ``:countTokens`` on the same three shapes;
* ``GET /{v}/models`` and ``GET /{v}/models/{model}`` (Developer API),
  ``GET /{v}/publishers/google/models`` (Vertex).

Behaviour, deterministic so tests can compare whole bodies:

* Auth: Developer API paths need ``x-goog-api-key`` (or ``?key=``) or a Bearer token, else
  403 ``PERMISSION_DENIED``; with :attr:`FakeGemini.api_keys` set, an unknown key gets the
  real API's 400 ``INVALID_ARGUMENT`` "API key not valid". Vertex project paths need a
  Bearer token, else 401 ``UNAUTHENTICATED`` (checked against
  :attr:`FakeGemini.bearer_tokens` when set). Errors use Google's shape
  ``{"error": {"code", "message", "status", "details"?}}``.
* Requests are parsed like proto3 JSON: every field may be spelled in lowerCamelCase or
  snake_case (``google-genai`` sends both). Unknown fields get 400 "Invalid JSON payload
  received. Unknown name ..."; then the semantic checks the real API makes: ``contents``
  required, roles ``user``/``model``, non-empty ``parts`` with data, an OBJECT schema with
  empty ``properties`` in ``parameters``/``responseSchema`` rejected, keywords outside the
  OpenAPI subset rejected (``$ref``, ``$defs``, ``oneOf``, ``const`` ...; and
  ``additionalProperties`` on the Developer API), ``parameters`` and
  ``parametersJsonSchema`` mutually exclusive, function-call / function-response turns
  paired part for part, ``id`` on function calls rejected on Vertex; a ``thoughtSignature``
  sent back must be one this fake issued or a documented dummy value (else "Corrupted thought
  signature."), and on ``gemini-3*`` models the first function call of each step of the
  current turn must carry one.
* The answer of each of ``candidateCount`` candidates (``index`` 0..n-1) is
  ``"echo: " + <text of the last user content>``; with function declarations (and mode not
  ``NONE``) it is instead one ``functionCall`` of the only allowed, else the first, function
  with ``args {"q": <that text>}`` -- except right after a function-response turn, when the
  model answers in text (unless mode is ``ANY``). ``stopSequences`` cut the text (STOP),
  ``maxOutputTokens`` truncates it (``MAX_TOKENS``).
* Thinking is on with ``thinkingConfig.includeThoughts`` or on ``gemini-3*`` models (off
  with ``thinkingBudget: 0`` on other models): the thought is
  ``"thinking about: <text>"``, returned as a ``thought: true`` part first only with
  ``includeThoughts``, counted in ``thoughtsTokenCount`` either way, and a
  ``thoughtSignature`` goes on the function-call part (or on the last text part; in a stream,
  on a final empty text part).
* Function-call ``id`` values (``fc_fake_1``...) are returned on the Developer API for
  ``gemini-3*`` models only (older models omit ids); see :attr:`FakeGemini.function_call_ids`.
* Tokens are whitespace-separated words: ``promptTokenCount`` counts the text parts of
  ``systemInstruction`` and ``contents``; ``candidatesTokenCount`` the answer of every
  candidate (the JSON of the args for a call); ``thoughtsTokenCount`` the thought of every
  candidate. Zero counts are omitted, as proto3 JSON does.
* Streams (``?alt=sse``): one ``data:`` event per chunk, CRLF-framed, no terminator; a
  thought chunk, the text in up to three fragments (a call in one chunk), the finish reason
  on the last chunk. Cumulative ``usageMetadata`` on every chunk (``stream_usage="every"``,
  as the Developer API does) or on the last only (``"last"``). Without ``alt=sse`` the same
  chunks come back as one JSON array. The ``x-fake-chunk-delay`` request header paces the
  chunks, as for the OpenAI fake.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json as stdlib_json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final, Literal

import attrs
import orjson

from .openai_upstream import (
    CHUNK_DELAY_HEADER,
    HOST,
    FakeOpenAI,
    RecordedRequest,
    Reply,
    serve_fake,
)

__all__ = [
    "DEFAULT_GEMINI_MODELS",
    "DUMMY_THOUGHT_SIGNATURES",
    "GOOGLE_STATUS",
    "FakeGemini",
    "gemini_error",
    "gemini_error_reply",
    "gemini_json_reply",
    "gemini_rate_limit_error",
    "gemini_sse",
    "open_fake_gemini",
    "retry_info",
]

DEFAULT_GEMINI_MODELS: Final[tuple[str, ...]] = (
    "gemini-2.5-flash",
    "gemini-2.5-pro",
    "gemini-3-flash-preview",
    "gemini-3-pro-preview",
)
#: Values Google documents as accepted in place of a real ``thoughtSignature`` (for history
#: that did not come from Gemini); the fake accepts them too.
DUMMY_THOUGHT_SIGNATURES: Final = frozenset(
    {"skip_thought_signature_validator", "context_engineering_is_the_way_to_go"}
)
#: HTTP status -> the ``google.rpc.Code`` name Google puts in ``error.status``.
GOOGLE_STATUS: Final[dict[int, str]] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
GOOGLE_CONTENT_TYPE: Final = "application/json; charset=UTF-8"
THOUGHT_PREFIX: Final = "thinking about: "
_CREATE_TIME: Final = "2023-11-14T22:13:20.000000Z"  # CREATED as RFC 3339
_TYPE_URL: Final = "type.googleapis.com/google.rpc."
_UNREGISTERED: Final = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)
_OAUTH_HINT: Final = (
    "Expected OAuth 2 access token, login cookie or other valid authentication credential. "
    "See https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_SIGNATURE_DOCS: Final = "https://ai.google.dev/gemini-api/docs/thought-signatures"

# -- helpers for tests --------------------------------------------------------------------


def gemini_sse(obj: Any) -> bytes:
    """One SSE event as Gemini frames it: ``b"data: " + json + b"\\r\\n\\r\\n"``."""
    return b"data: " + orjson.dumps(obj) + b"\r\n\r\n"


def gemini_error(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A Google error body: ``{"error": {"code", "message", "status", "details"?}}``."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return {"error": error}


def retry_info(delay: str) -> dict[str, Any]:
    """A ``google.rpc.RetryInfo`` error detail, e.g. ``retry_info("7s")``."""
    return {"@type": _TYPE_URL + "RetryInfo", "retryDelay": delay}


def gemini_rate_limit_error(
    retry_delay: str | None = "7s", model: str = "gemini-2.5-flash"
) -> dict[str, Any]:
    """The Developer API's 429 body for a per-minute quota: ``QuotaFailure``, ``Help`` and
    (unless ``retry_delay`` is None) ``RetryInfo`` details."""
    details: list[dict[str, Any]] = [
        {
            "@type": _TYPE_URL + "QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/"
                    "generate_content_free_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    "quotaDimensions": {"location": "global", "model": model},
                    "quotaValue": "10",
                }
            ],
        },
        {
            "@type": _TYPE_URL + "Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        },
    ]
    if retry_delay is not None:
        details.append(retry_info(retry_delay))
    return gemini_error(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details. For "
        "more information on this error, head to: "
        "https://ai.google.dev/gemini-api/docs/rate-limits.",
        details,
    )


def gemini_json_reply(body: Any, status: int = 200, delay: float = 0.0) -> Reply:
    """A JSON reply with Google's ``content-type: application/json; charset=UTF-8``."""
    return Reply.json(
        body, status=status, headers={"content-type": GOOGLE_CONTENT_TYPE}, delay=delay
    )


def gemini_error_reply(
    code: int,
    message: str,
    details: list[dict[str, Any]] | None = None,
    status: str | None = None,
) -> Reply:
    """An error reply; ``status`` defaults to the usual name for ``code``."""
    name = status if status is not None else GOOGLE_STATUS.get(code, "UNKNOWN")
    return gemini_json_reply(gemini_error(code, name, message, details), status=code)


# -- proto3 JSON field access -------------------------------------------------------------

_UPPER: Final = re.compile(r"(?<!^)(?=[A-Z])")
_UNDERSCORE_LETTER: Final = re.compile(r"_([a-zA-Z0-9])")


def _snake(name: str) -> str:
    return _UPPER.sub("_", name).lower()


def _camel(name: str) -> str:
    return _UNDERSCORE_LETTER.sub(lambda match: match.group(1).upper(), name)


def _get(obj: Any, name: str) -> Any:
    """Field ``name`` (given in lowerCamelCase) of a JSON object, in either spelling."""
    if not isinstance(obj, dict):
        return None
    if name in obj:
        return obj[name]
    return obj.get(_snake(name))


class _Rejected(Exception):
    """Internal: the request is answered with ``reply`` (an error) instead."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply)
        self.reply = reply


def _invalid(message: str, details: list[dict[str, Any]] | None = None) -> _Rejected:
    return _Rejected(gemini_error_reply(400, message, details))


# Fields the API knows, in lowerCamelCase (Developer API and Vertex together).
_REQUEST_FIELDS: Final = frozenset(
    {
        "model", "contents", "systemInstruction", "tools", "toolConfig", "safetySettings",
        "generationConfig", "cachedContent", "labels", "serviceTier", "store",
        "modelArmorConfig", "continuationToken",
    }
)  # fmt: skip
_CONTENT_FIELDS: Final = frozenset({"role", "parts"})
_PART_FIELDS: Final = frozenset(
    {
        "text", "inlineData", "fileData", "functionCall", "functionResponse", "thought",
        "thoughtSignature", "executableCode", "codeExecutionResult", "videoMetadata",
        "mediaResolution", "partMetadata", "toolCall", "toolResponse",
    }
)  # fmt: skip
_PART_DATA_FIELDS: Final = frozenset(
    {
        "text", "inlineData", "fileData", "functionCall", "functionResponse",
        "executableCode", "codeExecutionResult", "toolCall", "toolResponse",
    }
)  # fmt: skip
_BLOB_FIELDS: Final = frozenset({"mimeType", "data", "displayName"})
_FILE_DATA_FIELDS: Final = frozenset({"mimeType", "fileUri", "displayName"})
_FUNCTION_CALL_FIELDS: Final = frozenset({"id", "name", "args", "partialArgs", "willContinue"})
_FUNCTION_RESPONSE_FIELDS: Final = frozenset(
    {"id", "name", "response", "parts", "willContinue", "scheduling"}
)
_GENERATION_CONFIG_FIELDS: Final = frozenset(
    {
        "temperature", "topP", "topK", "candidateCount", "maxOutputTokens", "stopSequences",
        "seed", "presencePenalty", "frequencyPenalty", "responseMimeType", "responseSchema",
        "responseJsonSchema", "responseLogprobs", "logprobs", "thinkingConfig",
        "responseModalities", "mediaResolution", "speechConfig", "imageConfig",
        "enableEnhancedCivicAnswers", "audioTimestamp", "routingConfig", "modelConfig",
        "audioTranscriptionConfig",
    }
)  # fmt: skip
_THINKING_CONFIG_FIELDS: Final = frozenset({"includeThoughts", "thinkingBudget", "thinkingLevel"})
_TOOL_FIELDS: Final = frozenset(
    {
        "functionDeclarations", "googleSearch", "googleSearchRetrieval", "codeExecution",
        "urlContext", "googleMaps", "fileSearch", "computerUse", "mcpServers", "retrieval",
        "enterpriseWebSearch",
    }
)  # fmt: skip
_FUNCTION_DECLARATION_FIELDS: Final = frozenset(
    {
        "name", "description", "parameters", "parametersJsonSchema", "response",
        "responseJsonSchema", "behavior",
    }
)  # fmt: skip
_TOOL_CONFIG_FIELDS: Final = frozenset(
    {"functionCallingConfig", "retrievalConfig", "includeServerSideToolInvocations"}
)
_FUNCTION_CALLING_CONFIG_FIELDS: Final = frozenset(
    {"mode", "allowedFunctionNames", "streamFunctionCallArguments"}
)
_SAFETY_SETTING_FIELDS: Final = frozenset({"category", "threshold", "method"})
# The OpenAPI-subset ``Schema`` (types.py ``class Schema``); ``additionalProperties`` is
# added for Vertex only.
_SCHEMA_FIELDS: Final = frozenset(
    {
        "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
        "properties", "required", "minProperties", "maxProperties", "minLength",
        "maxLength", "pattern", "example", "anyOf", "propertyOrdering", "default", "items",
        "minimum", "maximum", "ref", "defs",
    }
)  # fmt: skip
_SCHEMA_TYPES: Final = frozenset(
    {"TYPE_UNSPECIFIED", "STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"}
)
_FUNCTION_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,63}")
_MODES: Final = frozenset({"MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED"})


class _Checker:
    """Phase 1 of validation: unknown field names, as the proto3 JSON parser reports them
    (all at once, one line each)."""

    def __init__(self, *, vertex: bool) -> None:
        self.vertex = vertex
        self.problems: list[tuple[str, str]] = []  # (field path, description)

    def unknown(self, obj: Any, allowed: frozenset[str], path: str) -> None:
        if not isinstance(obj, dict):
            return
        for key in obj:
            if key not in allowed and _camel(key) not in allowed:
                where = f" at '{path}'" if path else ""
                self.problems.append(
                    (path, f'Invalid JSON payload received. Unknown name "{key}"{where}: '
                     "Cannot find field.")
                )  # fmt: skip

    def invalid_value(self, path: str, kind: str, value: Any) -> None:
        self.problems.append(
            (path, f"Invalid value at '{path}' ({kind}), {stdlib_json.dumps(value)}")
        )

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        message = "\n".join(description for _, description in self.problems)
        violations = [
            {"field": field, "description": description} if field else {"description": description}
            for field, description in self.problems
        ]
        raise _invalid(
            message, [{"@type": _TYPE_URL + "BadRequest", "fieldViolations": violations}]
        )

    # -- the request tree ---------------------------------------------------------------

    def request(self, payload: dict[str, Any]) -> None:
        self.unknown(payload, _REQUEST_FIELDS, "")
        contents = _get(payload, "contents")
        if isinstance(contents, list):
            for i, content in enumerate(contents):
                self.content(content, f"contents[{i}]")
        system = _get(payload, "systemInstruction")
        if system is not None:
            self.content(system, "system_instruction")
        tools = _get(payload, "tools")
        if isinstance(tools, list):
            for t, tool in enumerate(tools):
                self.tool(tool, f"tools[{t}]")
        tool_config = _get(payload, "toolConfig")
        self.unknown(tool_config, _TOOL_CONFIG_FIELDS, "tool_config")
        calling = _get(tool_config, "functionCallingConfig")
        path = "tool_config.function_calling_config"
        self.unknown(calling, _FUNCTION_CALLING_CONFIG_FIELDS, path)
        mode = _get(calling, "mode")
        if mode is not None and (not isinstance(mode, str) or mode.upper() not in _MODES):
            self.invalid_value(f"{path}.mode", self._type_name("FunctionCallingConfig.Mode"), mode)
        settings = _get(payload, "safetySettings")
        if isinstance(settings, list):
            for s, setting in enumerate(settings):
                self.unknown(setting, _SAFETY_SETTING_FIELDS, f"safety_settings[{s}]")
        config = _get(payload, "generationConfig")
        self.unknown(config, _GENERATION_CONFIG_FIELDS, "generation_config")
        thinking = _get(config, "thinkingConfig")
        self.unknown(thinking, _THINKING_CONFIG_FIELDS, "generation_config.thinking_config")
        schema = _get(config, "responseSchema")
        if schema is not None:
            self.schema(schema, "generation_config.response_schema")

    def content(self, content: Any, path: str) -> None:
        self.unknown(content, _CONTENT_FIELDS, path)
        parts = _get(content, "parts")
        if not isinstance(parts, list):
            return
        for j, part in enumerate(parts):
            part_path = f"{path}.parts[{j}]"
            self.unknown(part, _PART_FIELDS, part_path)
            self.unknown(_get(part, "inlineData"), _BLOB_FIELDS, f"{part_path}.inline_data")
            self.unknown(_get(part, "fileData"), _FILE_DATA_FIELDS, f"{part_path}.file_data")
            call_fields = _FUNCTION_CALL_FIELDS - {"id"} if self.vertex else _FUNCTION_CALL_FIELDS
            self.unknown(_get(part, "functionCall"), call_fields, f"{part_path}.function_call")
            response_fields = (
                _FUNCTION_RESPONSE_FIELDS - {"id"} if self.vertex else _FUNCTION_RESPONSE_FIELDS
            )
            self.unknown(
                _get(part, "functionResponse"), response_fields, f"{part_path}.function_response"
            )

    def tool(self, tool: Any, path: str) -> None:
        self.unknown(tool, _TOOL_FIELDS, path)
        declarations = _get(tool, "functionDeclarations")
        if not isinstance(declarations, list):
            return
        for f, declaration in enumerate(declarations):
            decl_path = f"{path}.function_declarations[{f}]"
            self.unknown(declaration, _FUNCTION_DECLARATION_FIELDS, decl_path)
            parameters = _get(declaration, "parameters")
            if parameters is not None:
                self.schema(parameters, f"{decl_path}.parameters")
            response = _get(declaration, "response")
            if response is not None:
                self.schema(response, f"{decl_path}.response")

    def _type_name(self, name: str) -> str:
        package = (
            "google.cloud.aiplatform.v1beta1"
            if self.vertex
            else "google.ai.generativelanguage.v1beta"
        )
        return f"type.googleapis.com/{package}.{name}"

    def schema(self, schema: Any, path: str) -> None:
        if not isinstance(schema, dict):
            return
        allowed = _SCHEMA_FIELDS | {"additionalProperties"} if self.vertex else _SCHEMA_FIELDS
        self.unknown(schema, allowed, path)
        type_ = _get(schema, "type")
        if isinstance(type_, list):
            self.problems.append(
                (path, f"Invalid JSON payload received. Unknown name \"type\" at '{path}': "
                 "Proto field is not repeating, cannot start list.")
            )  # fmt: skip
        elif type_ is not None and (
            not isinstance(type_, str) or type_.upper() not in _SCHEMA_TYPES
        ):
            self.invalid_value(f"{path}.type", self._type_name("Type"), type_)
        enum = _get(schema, "enum")
        if isinstance(enum, list):
            for e, value in enumerate(enum):
                if not isinstance(value, str):
                    self.invalid_value(f"{path}.enum[{e}]", "TYPE_STRING", value)
        properties = _get(schema, "properties")
        if isinstance(properties, dict):
            for k, sub in enumerate(properties.values()):
                self.schema(sub, f"{path}.properties[{k}].value")
        items = _get(schema, "items")
        if items is not None:
            self.schema(items, f"{path}.items")
        any_of = _get(schema, "anyOf")
        if isinstance(any_of, list):
            for a, sub in enumerate(any_of):
                self.schema(sub, f"{path}.any_of[{a}]")
        defs = _get(schema, "defs")
        if isinstance(defs, dict):
            for k, sub in enumerate(defs.values()):
                self.schema(sub, f"{path}.defs[{k}].value")
        additional = _get(schema, "additionalProperties")
        if self.vertex and isinstance(additional, dict):
            self.schema(additional, f"{path}.additional_properties")


def _empty_object_errors(schema: Any, path: str) -> Iterator[str]:
    """Phase 2: an OBJECT schema must have non-empty ``properties`` (recursively)."""
    if not isinstance(schema, dict):
        return
    type_ = _get(schema, "type")
    properties = _get(schema, "properties")
    if isinstance(type_, str) and type_.upper() == "OBJECT" and not properties:
        yield f"* GenerateContentRequest.{path}.properties: should be non-empty for OBJECT type\n"
    if isinstance(properties, dict):
        for name, sub in properties.items():
            yield from _empty_object_errors(sub, f'{path}.properties["{name}"]')
    items = _get(schema, "items")
    if items is not None:
        yield from _empty_object_errors(items, f"{path}.items")
    any_of = _get(schema, "anyOf")
    if isinstance(any_of, list):
        for a, sub in enumerate(any_of):
            yield from _empty_object_errors(sub, f"{path}.any_of[{a}]")


# -- reading requests ---------------------------------------------------------------------

def _vector(text: str, size: int) -> list[float]:
    """A deterministic embedding of ``text``."""
    digest = hashlib.sha256(text.encode()).digest() * (size // 32 + 1)
    return [round((byte - 128) / 128, 6) for byte in digest[:size]]


_ROUTE: Final = re.compile(
    r"/(?P<version>v1|v1beta|v1alpha|v1beta1)/"
    r"(?:(?P<vertex>projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/)?"
    r"(?P<publisher>publishers/google/)?)"
    r"models/(?P<model>[^/:]+):"
    r"(?P<method>generateContent|streamGenerateContent|countTokens|batchEmbedContents|predict)"
)
_LIST: Final = re.compile(
    r"/(?P<version>v1|v1beta|v1alpha|v1beta1)/(?P<publisher>publishers/google/)?models"
)
_GET: Final = re.compile(r"/(?P<version>v1|v1beta|v1alpha|v1beta1)/models/(?P<model>[^/:]+)")


def _words(text: str) -> list[str]:
    """Split points after whitespace; the pieces concatenate to ``text``."""
    return [piece for piece in re.split(r"(?<=\s)(?=\S)", text) if piece]


def _word_count(text: str) -> int:
    return len(text.split())


def _role(content: Any) -> str:
    role = _get(content, "role")
    return role if isinstance(role, str) and role else "user"


def _parts(content: Any) -> list[Any]:
    parts = _get(content, "parts")
    return parts if isinstance(parts, list) else []


def _texts(content: Any) -> list[str]:
    return [
        text
        for part in _parts(content)
        if isinstance(text := _get(part, "text"), str) and not _get(part, "thought")
    ]


def _has(part: Any, field: str) -> bool:
    return _get(part, field) is not None


def _has_data(part: Any) -> bool:
    """Whether a part sets its ``data`` oneof (an empty ``text`` counts as unset, as in
    proto3, unless the part carries a ``thoughtSignature``: the last chunk of a stream is
    such a part)."""
    for field in _PART_DATA_FIELDS:
        value = _get(part, field)
        if value is None or (
            field == "text" and value == "" and not _has(part, "thoughtSignature")
        ):
            continue
        return True
    return False


def _is_gemini3(model: str) -> bool:
    return model.startswith("gemini-3")


def _query(path: str) -> dict[str, str]:
    _, _, query = path.partition("?")
    pairs = (item.partition("=") for item in query.split("&") if item)
    return {name: value for name, _, value in pairs}


@attrs.frozen
class _Target:
    """Where a generate/count request went."""

    version: str
    model: str
    method: str
    vertex: bool  # project/location path (OAuth only)
    express: bool  # Vertex publisher path without project (API key allowed)
    sse: bool

    @property
    def vertex_like(self) -> bool:
        return self.vertex or self.express


@attrs.frozen
class _Answer:
    """The deterministic answer to one generateContent request."""

    model: str
    vertex: bool
    n: int
    prompt_tokens: int
    response_id: str
    text: str | None  # None when the answer is a function call
    finish_reason: str
    call_name: str | None
    call_args: dict[str, Any] | None
    call_ids: tuple[str, ...]  # one per candidate, or empty
    thought: str | None  # the thought text, when thinking is on
    include_thoughts: bool
    signatures: tuple[str, ...]  # one per candidate, or empty

    @property
    def answer_tokens(self) -> int:
        if self.call_args is not None:
            return _word_count(stdlib_json.dumps(self.call_args))
        return _word_count(self.text or "")

    @property
    def thought_tokens(self) -> int:
        return _word_count(self.thought) if self.thought is not None else 0

    def usage(self, *, answer_tokens: int | None = None) -> dict[str, Any]:
        candidates = (self.answer_tokens if answer_tokens is None else answer_tokens) * self.n
        thoughts = self.thought_tokens * self.n
        usage: dict[str, Any] = {"promptTokenCount": self.prompt_tokens}
        if candidates:
            usage["candidatesTokenCount"] = candidates
        usage["totalTokenCount"] = self.prompt_tokens + candidates + thoughts
        usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": self.prompt_tokens}]
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        return usage

    def _thought_part(self) -> dict[str, Any]:
        return {"text": self.thought, "thought": True}

    def _call_part(self, index: int) -> dict[str, Any]:
        call: dict[str, Any] = {"name": self.call_name, "args": self.call_args}
        if self.call_ids:
            call = {"id": self.call_ids[index], **call}
        part: dict[str, Any] = {"functionCall": call}
        if self.signatures:
            part["thoughtSignature"] = self.signatures[index]
        return part

    def _envelope(
        self, candidates: list[dict[str, Any]], usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"candidates": candidates}
        if usage is not None:
            body["usageMetadata"] = usage
        body["modelVersion"] = self.model
        if self.vertex:
            body["createTime"] = _CREATE_TIME
        body["responseId"] = self.response_id
        return body

    def response(self) -> dict[str, Any]:
        """The non-streaming ``GenerateContentResponse``."""
        candidates = []
        for index in range(self.n):
            parts: list[dict[str, Any]] = []
            if self.include_thoughts and self.thought is not None:
                parts.append(self._thought_part())
            if self.call_name is not None:
                parts.append(self._call_part(index))
            else:
                text_part: dict[str, Any] = {"text": self.text}
                if self.signatures:
                    text_part["thoughtSignature"] = self.signatures[index]
                parts.append(text_part)
            candidates.append(self._candidate(index, parts, self.finish_reason))
        return self._envelope(candidates, self.usage())

    @staticmethod
    def _candidate(index: int, parts: list[dict[str, Any]], finish: str | None) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
        if finish is not None:
            candidate["finishReason"] = finish
        candidate["index"] = index
        return candidate

    def chunks(self, *, usage_every_chunk: bool) -> list[dict[str, Any]]:
        """The ``GenerateContentResponse`` chunks of the streamed answer."""
        # Each step: (the parts of each candidate, answer tokens emitted up to this step).
        steps: list[tuple[list[list[dict[str, Any]]], int]] = []
        every = range(self.n)
        if self.include_thoughts and self.thought is not None:
            steps.append(([[self._thought_part()] for _ in every], 0))
        if self.call_name is not None:
            steps.append(([[self._call_part(i)] for i in every], self.answer_tokens))
        else:
            emitted = 0
            for fragment in _fragments(self.text or ""):
                emitted += _word_count(fragment)
                steps.append(([[{"text": fragment}] for _ in every], emitted))
            if self.signatures:
                signed = [[{"text": "", "thoughtSignature": self.signatures[i]}] for i in every]
                steps.append((signed, emitted))
        events = []
        for number, (parts, tokens) in enumerate(steps):
            last = number == len(steps) - 1
            finish = self.finish_reason if last else None
            candidates = [self._candidate(i, parts[i], finish) for i in every]
            usage = self.usage(answer_tokens=tokens) if last or usage_every_chunk else None
            events.append(self._envelope(candidates, usage))
        return events


def _fragments(text: str, count: int = 3) -> list[str]:
    """``text`` in up to ``count`` word-aligned pieces (one empty piece for empty text)."""
    words = _words(text)
    if not words:
        return [""]
    size = -(-len(words) // count)
    return ["".join(words[i : i + size]) for i in range(0, len(words), size)]


class FakeGemini(FakeOpenAI):
    """A fake Gemini upstream; get one from :func:`open_fake_gemini`.

    Everything of :class:`FakeOpenAI` applies (``requests``, ``push``, ``wait_*``, close
    tracking). The attributes below tune the default behaviour and may be changed while the
    fake runs.
    """

    #: API keys accepted on Developer API paths; None accepts any non-empty key.
    api_keys: set[str] | None
    #: Bearer tokens accepted on Vertex paths; None accepts any non-empty token.
    bearer_tokens: set[str] | None
    #: "every": cumulative ``usageMetadata`` on every stream chunk; "last": on the last only.
    stream_usage: Literal["every", "last"]
    #: Whether function calls carry ``id``: None = Developer API and ``gemini-3*`` only.
    function_call_ids: bool | None
    #: Whether signatures must come back: None = on ``gemini-3*`` models.
    require_thought_signatures: bool | None
    #: Answer 404 NOT_FOUND for a model not in :attr:`models` (default: any model works).
    reject_unknown_models: bool
    #: Every ``thoughtSignature`` the fake has issued.
    issued_signatures: set[str]

    def __init__(
        self,
        *,
        port: int,
        models: list[str] | None = None,
        api_keys: set[str] | None = None,
        bearer_tokens: set[str] | None = None,
    ) -> None:
        super().__init__(
            port=port, models=list(DEFAULT_GEMINI_MODELS) if models is None else models
        )
        self.base_url = f"http://{HOST}:{port}"
        self.api_keys = api_keys
        self.bearer_tokens = bearer_tokens
        self.stream_usage = "every"
        self.function_call_ids = None
        self.require_thought_signatures = None
        self.reject_unknown_models = False
        self.issued_signatures = set()
        self._last_response_number = 0
        self._last_call_number = 0

    # -- routing --------------------------------------------------------------------------

    def default_reply(self, request: RecordedRequest) -> Reply:
        """Answer ``request`` as described in the module docstring."""
        path = request.path.partition("?")[0]
        try:
            if request.method == "POST" and (match := _ROUTE.fullmatch(path)):
                target = _Target(
                    version=match["version"],
                    model=match["model"],
                    method=match["method"],
                    vertex=match["vertex"] is not None,
                    express=match["vertex"] is None and match["publisher"] is not None,
                    sse=_query(request.path).get("alt") == "sse",
                )
                self._authenticate(request, vertex=target.vertex)
                self._check_model(target)
                if target.method == "countTokens":
                    return self._count_tokens(request, target)
                if target.method in ("batchEmbedContents", "predict"):
                    return self._embed(request, target)
                return self._generate(request, target)
            if request.method == "GET" and (match := _LIST.fullmatch(path)):
                vertex = match["publisher"] is not None
                self._authenticate(request, vertex=False)
                if vertex:
                    models = [self._model_json(m, vertex=True) for m in self.models]
                    return gemini_json_reply({"publisherModels": models})
                return gemini_json_reply({"models": [self._model_json(m) for m in self.models]})
            if request.method == "GET" and (match := _GET.fullmatch(path)):
                self._authenticate(request, vertex=False)
                if match["model"] in self.models:
                    return gemini_json_reply(self._model_json(match["model"]))
                raise _Rejected(
                    gemini_error_reply(
                        404,
                        f"models/{match['model']} is not found for API version "
                        f"{match['version']}, or is not supported for GET. Call ListModels "
                        "to see the list of available models and their supported methods.",
                    )
                )
        except _Rejected as rejected:
            return rejected.reply
        return gemini_error_reply(404, "Requested entity was not found.")

    def _authenticate(self, request: RecordedRequest, *, vertex: bool) -> None:
        headers = request.headers
        authorization = headers.get("authorization", "")
        token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
        key = headers.get("x-goog-api-key") or _query(request.path).get("key", "")
        if token:
            if self.bearer_tokens is not None and token not in self.bearer_tokens:
                raise _Rejected(
                    gemini_error_reply(
                        401, f"Request had invalid authentication credentials. {_OAUTH_HINT}"
                    )
                )
            return
        if vertex:
            raise _Rejected(
                gemini_error_reply(
                    401,
                    f"Request is missing required authentication credential. {_OAUTH_HINT}",
                    [
                        {
                            "@type": _TYPE_URL + "ErrorInfo",
                            "reason": "CREDENTIALS_MISSING",
                            "domain": "googleapis.com",
                            "metadata": {"service": "aiplatform.googleapis.com"},
                        }
                    ],
                )
            )
        if not key:
            raise _Rejected(gemini_error_reply(403, _UNREGISTERED))
        if self.api_keys is not None and key not in self.api_keys:
            message = "API key not valid. Please pass a valid API key."
            raise _Rejected(
                gemini_error_reply(
                    400,
                    message,
                    [
                        {
                            "@type": _TYPE_URL + "ErrorInfo",
                            "reason": "API_KEY_INVALID",
                            "domain": "googleapis.com",
                            "metadata": {"service": "generativelanguage.googleapis.com"},
                        },
                        {
                            "@type": _TYPE_URL + "LocalizedMessage",
                            "locale": "en-US",
                            "message": message,
                        },
                    ],
                )
            )

    def _check_model(self, target: _Target) -> None:
        if not self.reject_unknown_models or target.model in self.models:
            return
        if target.vertex_like:
            message = (
                f"Publisher Model `publishers/google/models/{target.model}` was not found or "
                "your project does not have access to it."
            )
        else:
            message = (
                f"models/{target.model} is not found for API version {target.version}, or is "
                f"not supported for {target.method}. Call ListModels to see the list of "
                "available models and their supported methods."
            )
        raise _Rejected(gemini_error_reply(404, message))

    def _model_json(self, model: str, *, vertex: bool = False) -> dict[str, Any]:
        if vertex:
            return {"name": f"publishers/google/models/{model}", "versionId": "001"}
        return {
            "name": f"models/{model}",
            "version": "001",
            "displayName": model,
            "description": f"Fake {model}",
            "inputTokenLimit": 1_048_576,
            "outputTokenLimit": 65_536,
            "supportedGenerationMethods": ["generateContent", "countTokens"],
            "temperature": 1.0,
            "topP": 0.95,
            "topK": 64,
            "maxTemperature": 2.0,
            "thinking": True,
        }

    # -- countTokens ----------------------------------------------------------------------

    def _embed(self, request: RecordedRequest, target: _Target) -> Reply:
        """``batchEmbedContents`` (Developer API) or ``predict`` (Vertex AI): one deterministic
        vector per text, ``outputDimensionality`` long (default 8), in each API's own shape."""
        payload = _parse_body(request)
        if target.method == "predict":
            if not target.vertex_like:
                raise _invalid("predict is a Vertex AI method\n")
            instances = payload.get("instances")
            if not isinstance(instances, list) or not instances:
                raise _invalid("instances is required\n")
            size = (payload.get("parameters") or {}).get("outputDimensionality") or 8
            predictions = []
            for instance in instances:
                text = instance.get("content") if isinstance(instance, dict) else None
                if not isinstance(text, str):
                    raise _invalid("each instance needs a content string\n")
                predictions.append({"embeddings": {
                    "values": _vector(text, size),
                    "statistics": {"token_count": _word_count(text), "truncated": False},
                }})  # fmt: skip
            return gemini_json_reply({"predictions": predictions})
        if target.vertex_like:
            raise _invalid("batchEmbedContents is not served by Vertex AI; use predict\n")
        requests = payload.get("requests")
        if not isinstance(requests, list) or not requests:
            raise _invalid("* BatchEmbedContentsRequest.requests: requests is required\n")
        embeddings = []
        for item in requests:
            if not isinstance(item, dict) or item.get("model") != f"models/{target.model}":
                raise _invalid("* requests[].model must match the URL's model\n")
            parts = (item.get("content") or {}).get("parts") or []
            text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
            size = item.get("outputDimensionality") or 8
            embeddings.append({"values": _vector(text, size)})
        return gemini_json_reply({"embeddings": embeddings})

    def _count_tokens(self, request: RecordedRequest, target: _Target) -> Reply:
        payload = _parse_body(request)
        inner = _get(payload, "generateContentRequest")
        source = inner if isinstance(inner, dict) else payload
        if isinstance(inner, dict):
            _Checker(vertex=target.vertex_like).request(inner)
        contents = _get(source, "contents")
        if not isinstance(contents, list) or not contents:
            raise _invalid("* CountTokensRequest.contents: contents is not specified\n")
        total = _prompt_tokens(source)
        return gemini_json_reply(
            {
                "totalTokens": total,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}],
            }
        )

    # -- generateContent ------------------------------------------------------------------

    def _generate(self, request: RecordedRequest, target: _Target) -> Reply:
        payload = _parse_body(request)
        checker = _Checker(vertex=target.vertex_like)
        checker.request(payload)
        checker.raise_if_any()
        self._validate(payload, target)
        answer = self._answer(payload, target)
        if target.method == "generateContent":
            return gemini_json_reply(answer.response())
        chunks = answer.chunks(usage_every_chunk=self.stream_usage == "every")
        delay = 0.0
        if CHUNK_DELAY_HEADER in request.headers:
            try:
                delay = float(request.headers[CHUNK_DELAY_HEADER])
            except ValueError as exc:
                raise _invalid(f"Invalid {CHUNK_DELAY_HEADER} header.") from exc
        if target.sse:
            return Reply.sse([gemini_sse(chunk) for chunk in chunks], delay=delay)
        return gemini_json_reply(chunks)

    def _validate(self, payload: dict[str, Any], target: _Target) -> None:
        """Phase 2: the semantic checks, after the JSON parsed."""
        contents = _get(payload, "contents")
        if not isinstance(contents, list) or not contents:
            raise _invalid("* GenerateContentRequest.contents: contents is not specified\n")
        problems: list[str] = []
        for i, content in enumerate(contents):
            role = _get(content, "role")
            if role is not None and role not in ("user", "model"):
                raise _invalid("Please use a valid role: user, model.")
            parts = _parts(content)
            if not parts:
                problems.append(
                    f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be "
                    "empty.\n"
                )
            for j, part in enumerate(parts):
                if not _has_data(part):
                    problems.append(
                        f"* GenerateContentRequest.contents[{i}].parts[{j}].data: required "
                        "oneof field 'data' must have one initialized field\n"
                    )
        problems += self._tool_problems(payload, target)
        config = _get(payload, "generationConfig")
        if (
            _get(config, "responseSchema") is not None
            and _get(config, "responseJsonSchema") is not None
        ):
            problems.append(
                "* GenerateContentRequest.generation_config.response_schema: response_schema "
                "and response_json_schema are mutually exclusive\n"
            )
        problems += _empty_object_errors(
            _get(config, "responseSchema"), "generation_config.response_schema"
        )
        if problems:
            raise _invalid("".join(problems))
        self._check_turns(contents, target)

    def _tool_problems(self, payload: dict[str, Any], target: _Target) -> list[str]:
        problems: list[str] = []
        tools = _get(payload, "tools")
        for t, tool in enumerate(tools if isinstance(tools, list) else []):
            declarations = _get(tool, "functionDeclarations")
            for f, declaration in enumerate(declarations if isinstance(declarations, list) else []):
                path = f"tools[{t}].function_declarations[{f}]"
                name = _get(declaration, "name")
                if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
                    problems.append(
                        f"* GenerateContentRequest.{path}.name: Invalid function name. Must "
                        "start with a letter or an underscore. Must be alphameric (a-z, A-Z, "
                        "0-9), underscores (_), dots (.), colons (:) or dashes (-), with a "
                        "maximum length of 64.\n"
                    )
                parameters = _get(declaration, "parameters")
                if parameters is not None and _get(declaration, "parametersJsonSchema") is not None:
                    problems.append(
                        f"* GenerateContentRequest.{path}.parameters: parameters and "
                        "parameters_json_schema are mutually exclusive\n"
                    )
                problems += _empty_object_errors(parameters, f"{path}.parameters")
        return problems

    def _check_turns(self, contents: list[Any], target: _Target) -> None:
        """Function-call / function-response pairing, and Gemini 3 thought signatures."""
        for i, content in enumerate(contents):
            calls = sum(_has(part, "functionCall") for part in _parts(content))
            responses = sum(_has(part, "functionResponse") for part in _parts(content))
            previous = contents[i - 1] if i else None
            previous_calls = sum(_has(part, "functionCall") for part in _parts(previous))
            if calls and (previous is None or _role(previous) == "model"):
                raise _invalid(
                    "Please ensure that function call turn comes immediately after a user "
                    "turn or after a function response turn."
                )
            if responses and not previous_calls:
                raise _invalid(
                    "Please ensure that function response turn comes immediately after a "
                    "function call turn."
                )
            if previous_calls and responses != previous_calls:
                raise _invalid(
                    "Please ensure that the number of function response parts is equal to "
                    "the number of function call parts of the function call turn."
                )
        required = self.require_thought_signatures
        if required is None:
            required = _is_gemini3(target.model)
        # Every signature sent back must be one the fake issued (or a documented dummy).
        for content in contents:
            for part in _parts(content):
                signature = _get(part, "thoughtSignature")
                if (
                    signature is not None
                    and signature not in self.issued_signatures | DUMMY_THOUGHT_SIGNATURES
                ):
                    raise _invalid("Corrupted thought signature.")
        if not required:
            return
        # The current turn starts at the last user content with standard (non-response) parts.
        start = 0
        for i, content in enumerate(contents):
            if _role(content) == "user" and any(
                not _has(part, "functionResponse") for part in _parts(content)
            ):
                start = i
        for i in range(start, len(contents)):
            content = contents[i]
            if _role(content) != "model":
                continue
            for part in _parts(content):
                call = _get(part, "functionCall")
                if call is None:
                    continue
                if _get(part, "thoughtSignature") is None:
                    name = _get(call, "name")
                    raise _invalid(
                        "Function call is missing a thought_signature in functionCall parts. "
                        "This is required for tools to work correctly, and missing "
                        "thought_signature may lead to degraded model performance. Additional "
                        f"data, function call `default_api:{name}` , position {i + 1}. Please "
                        f"refer to {_SIGNATURE_DOCS} for more details."
                    )
                break  # only the first call of each step needs one

    def _answer(self, payload: dict[str, Any], target: _Target) -> _Answer:
        contents: list[Any] = _get(payload, "contents")
        config = _get(payload, "generationConfig")
        config = config if isinstance(config, dict) else {}
        n = _get(config, "candidateCount")
        n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
        user_text = ""
        for content in reversed(contents):
            if _role(content) == "user" and (texts := _texts(content)):
                user_text = "".join(texts)
                break
        after_tool = any(_has(part, "functionResponse") for part in _parts(contents[-1]))

        thinking_config = _get(config, "thinkingConfig")
        include_thoughts = _get(thinking_config, "includeThoughts") is True
        budget = _get(thinking_config, "thinkingBudget")
        gemini3 = _is_gemini3(target.model)
        thinking = (include_thoughts or gemini3) and (budget != 0 or gemini3)

        self._last_response_number += 1
        response_id = f"resp-fake-{self._last_response_number}"
        signatures: tuple[str, ...] = ()
        if thinking:
            signatures = tuple(
                base64.b64encode(f"sig:{response_id}:{i}".encode()).decode() for i in range(n)
            )
            self.issued_signatures.update(signatures)

        call_name = _chosen_function(payload, after_tool=after_tool)
        text: str | None = None
        finish = "STOP"
        call_ids: tuple[str, ...] = ()
        if call_name is None:
            text, finish = _shape_text("echo: " + user_text, config)
        else:
            with_ids = self.function_call_ids
            if with_ids is None:
                with_ids = gemini3 and not target.vertex_like
            if with_ids:
                ids = []
                for _ in range(n):
                    self._last_call_number += 1
                    ids.append(f"fc_fake_{self._last_call_number}")
                call_ids = tuple(ids)
        return _Answer(
            model=target.model,
            vertex=target.vertex_like,
            n=n,
            prompt_tokens=_prompt_tokens(payload),
            response_id=response_id,
            text=text,
            finish_reason=finish,
            call_name=call_name,
            call_args={"q": user_text} if call_name is not None else None,
            call_ids=call_ids,
            thought=THOUGHT_PREFIX + user_text if thinking else None,
            include_thoughts=include_thoughts,
            signatures=signatures,
        )


def _parse_body(request: RecordedRequest) -> dict[str, Any]:
    try:
        payload = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise _invalid("Invalid JSON payload received. Unexpected token.") from exc
    if not isinstance(payload, dict):
        raise _invalid(
            'Invalid JSON payload received. Unknown name "": Root element must be a message.'
        )
    return payload


def _prompt_tokens(payload: dict[str, Any]) -> int:
    contents = _get(payload, "contents")
    sources = [
        *(contents if isinstance(contents, list) else []),
        _get(payload, "systemInstruction"),
    ]
    return sum(_word_count(text) for source in sources for text in _texts(source))


def _chosen_function(payload: dict[str, Any], *, after_tool: bool) -> str | None:
    """The function the model calls, or None to answer in text."""
    names = [
        name
        for tool in (_get(payload, "tools") or [])
        for declaration in (_get(tool, "functionDeclarations") or [])
        if isinstance(name := _get(declaration, "name"), str)
    ]
    calling = _get(_get(payload, "toolConfig"), "functionCallingConfig")
    mode = str(_get(calling, "mode") or "AUTO").upper()
    if not names or mode == "NONE" or (after_tool and mode != "ANY"):
        return None
    allowed = _get(calling, "allowedFunctionNames")
    if isinstance(allowed, list) and allowed and isinstance(allowed[0], str):
        return allowed[0]
    return names[0]


def _shape_text(text: str, config: dict[str, Any]) -> tuple[str, str]:
    """Apply ``stopSequences`` then ``maxOutputTokens``; return (text, finishReason)."""
    stops = _get(config, "stopSequences")
    if isinstance(stops, list):
        cuts = [text.find(stop) for stop in stops if isinstance(stop, str) and stop in text]
        if cuts:
            text = text[: min(cuts)]
    limit = _get(config, "maxOutputTokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
        words = _words(text)
        if len(words) > limit:
            return "".join(words[:limit]).rstrip(), "MAX_TOKENS"
    return text, "STOP"


@contextlib.asynccontextmanager
async def open_fake_gemini(
    *,
    models: list[str] | None = None,
    api_keys: set[str] | None = None,
    bearer_tokens: set[str] | None = None,
) -> AsyncIterator[FakeGemini]:
    """Run a fake Gemini upstream on ``127.0.0.1`` (ephemeral port) for the ``async with``;
    shutdown is as for :func:`~tests.fakes.openai_upstream.open_fake_openai`."""

    def factory(port: int) -> FakeGemini:
        return FakeGemini(port=port, models=models, api_keys=api_keys, bearer_tokens=bearer_tokens)

    async with serve_fake(factory) as fake:
        yield fake
