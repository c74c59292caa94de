"""OpenAI chat completions <-> Gemini ``generateContent``, both directions, streaming included.

Sans-io: dicts and SSE events in, dicts out; images given as https URLs are fetched by the
provider beforehand and handed in as bytes. The rules (tables in ``doc/providers.md``):

- ``system``/``developer`` messages anywhere -> ``systemInstruction``; consecutive same-role
  messages merged; every ``role: tool`` result of a turn -> one ``user`` content of
  ``functionResponse`` parts, named after the call they answer (resolved from the earlier
  ``tool_calls`` by id: OpenAI tool messages carry no name).
- Tool schemas are turned into Gemini's OpenAPI subset: ``$ref``/``$defs`` inlined, type lists
  -> ``nullable``, ``oneOf`` -> ``anyOf``, ``const`` -> ``enum``, unsupported keywords dropped,
  and a tool without arguments gets no ``parameters`` (Gemini rejects an empty object).
- Thought signatures ride on the OpenAI tool call as ``extra_content.google.thought_signature``
  (the convention of Google's own OpenAI-compatible endpoint) and go back on the same part.
  For Gemini 3, whose API refuses a function call without one, a call that comes back without
  its signature gets Google's documented placeholder instead of a 400.
- Function-call ids: sent to the Developer API; never to Vertex AI, which rejects the field.
- Usage: ``completion_tokens`` = candidates + thoughts (Gemini counts them apart); streamed
  ``usageMetadata`` is cumulative: the last one wins.
"""

from __future__ import annotations

import base64
import copy
import functools
import math
import re
import secrets
import struct
import time
from collections.abc import Mapping
from typing import Any

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
from .openai import parse_data_uri
from .sse import SSEEvent

JSONObject = dict[str, Any]

#: Google's documented value that makes Gemini skip thought-signature validation for a
#: function call whose signature was lost on the way through a client.
SKIP_SIGNATURE = "skip_thought_signature_validator"

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "CONTINUATION": "length",
    **dict.fromkeys(
        ("SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION", "IMAGE_SAFETY",
         "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "MODEL_ARMOR", "ESCALATION",
         "PUP_LIMITED_DISABLED"),
        "content_filter",
    ),
}  # fmt: skip

#: ``reasoning_effort`` -> ``thinkingBudget`` (Gemini 2.x) / ``thinkingLevel`` (Gemini 3).
THINKING_BUDGETS = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576,
                    "xhigh": 32768}  # fmt: skip
THINKING_LEVELS = {"none": "MINIMAL", "minimal": "MINIMAL", "low": "LOW", "medium": "MEDIUM",
                   "high": "HIGH", "xhigh": "XHIGH"}  # fmt: skip

_DROPPED = frozenset(
    {"stream_options", "store", "metadata", "service_tier", "prompt_cache_key",
     "safety_identifier", "prompt_cache_retention", "user", "parallel_tool_calls"}
)  # fmt: skip
_NEUTRAL: dict[str, Any] = {"logprobs": False, "top_logprobs": 0, "logit_bias": {}}
_HANDLED = frozenset(
    {"model", "messages", "stream", "n", "max_tokens", "max_completion_tokens", "temperature",
     "top_p", "top_k", "stop", "seed", "presence_penalty", "frequency_penalty", "tools",
     "tool_choice", "response_format", "reasoning_effort", "functions", "function_call"}
)  # fmt: skip
# Schema keywords Gemini's subset accepts (everything else is dropped).
_SCHEMA_KEYS = frozenset(
    {"type", "format", "title", "description", "nullable", "enum", "items", "minItems",
     "maxItems", "properties", "required", "propertyOrdering", "minProperties",
     "maxProperties", "minLength", "maxLength", "pattern", "minimum", "maximum", "example",
     "default", "anyOf"}
)  # fmt: skip


@attrs.frozen
class GeminiOptions:
    """Connection settings the translation depends on."""

    vertex: bool = False
    drop_unsupported: bool = False


@attrs.frozen
class RequestInfo:
    """What the answer's translation needs to know about the request."""

    candidates: int = 1


def is_gemini_3(model: str) -> bool:
    """Gemini 3 models use thinking levels and require thought signatures on function calls."""
    return model.removeprefix("models/").startswith("gemini-3")


def _obj(value: Any) -> JSONObject:
    """``value`` if it is a JSON object, else an empty one (tolerant reading of answers)."""
    return value if isinstance(value, dict) else {}


def _unsupported(param: str, why: str) -> NotSupported:
    return NotSupported(
        f"'{param}' is not supported by Gemini connections: {why}",
        param=param,
        code="unsupported_parameter",
    )


# -- schemas ---------------------------------------------------------------------------------


class _NotInSubset(Exception):
    """The schema uses something Gemini's OpenAPI subset cannot say exactly."""


#: Nodes a converted schema may have; beyond it (a shared definition inlined over and over)
#: the JSON-schema field is used instead of an exponentially growing subset.
_SCHEMA_NODE_BUDGET = 10_000


def to_gemini_schema(schema: Any, *, vertex: bool = False) -> Any:
    """A JSON schema in Gemini's OpenAPI subset: refs inlined, unsupported keywords dropped,
    ``propertyOrdering`` added (so structured output keeps the schema's key order).

    ``additionalProperties: false`` is dropped (the Developer API refuses the keyword; it only
    forbids extra keys); other ``additionalProperties`` are kept for Vertex AI only.

    Returns:
        The converted schema, or None for a top-level object without properties (Gemini
        rejects those; the caller omits the schema).

    Raises:
        _NotInSubset: the subset cannot express the schema exactly (a recursive ``$ref``, an
            object without properties inside it, a typed map on the Developer API, or a size
            that would explode); use :func:`schema_fields`, which falls back to JSON Schema.
    """
    if not isinstance(schema, dict):
        return schema
    defs = {**schema.get("$defs", {}), **schema.get("definitions", {})}
    return _Subset(defs, vertex).convert(schema, depth=0, refs=())


def schema_fields(schema: Any, *, vertex: bool, subset_key: str, json_key: str) -> JSONObject:
    """The request fields that carry ``schema``: ``{subset_key: converted}`` when Gemini's
    subset can say it exactly, else ``{json_key: schema}`` (JSON Schema, taken as is); ``{}``
    for an object without properties (a tool without arguments)."""
    if not isinstance(schema, dict) or not schema:
        return {}
    try:
        converted = to_gemini_schema(schema, vertex=vertex)
    except _NotInSubset:
        return {json_key: schema}
    return {subset_key: converted} if converted else {}


def _resolve(ref: str, defs: Mapping[str, Any]) -> Any:
    name = ref.rsplit("/", 1)[-1]
    return defs.get(name)


class _Subset:
    def __init__(self, defs: Mapping[str, Any], vertex: bool) -> None:
        self.defs = defs
        self.vertex = vertex
        self.nodes = 0

    def convert(self, node: Any, *, depth: int, refs: tuple[str, ...]) -> Any:
        self.nodes += 1
        if self.nodes > _SCHEMA_NODE_BUDGET:
            raise _NotInSubset("schema too large once references are inlined")
        if isinstance(node, list):
            return [self.convert(n, depth=depth + 1, refs=refs) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            ref = str(node["$ref"])
            if ref in refs:
                raise _NotInSubset(f"recursive reference {ref}")
            target = _resolve(ref, self.defs)
            merged = {
                **(target if isinstance(target, dict) else {}),
                **{k: v for k, v in node.items() if k != "$ref"},
            }
            return self.convert(merged, depth=depth + 1, refs=(*refs, ref))
        sub = functools.partial(self.convert, depth=depth + 1, refs=refs)
        out: JSONObject = {}
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                out[key] = {k: sub(v) for k, v in value.items()}
            elif key == "items":
                out[key] = sub(value)
            elif key in ("anyOf", "oneOf") and isinstance(value, list):
                options = [sub(v) for v in value]
                nulls = [o for o in options if isinstance(o, dict) and o.get("type") == "null"]
                rest = [o for o in options if o not in nulls]
                if nulls:
                    out["nullable"] = True
                if len(rest) == 1 and isinstance(rest[0], dict):
                    out.update(rest[0])
                elif rest:
                    out["anyOf"] = rest
            elif key == "allOf" and isinstance(value, list):
                for part in value:
                    resolved = sub(part)
                    if isinstance(resolved, dict):
                        for k, v in resolved.items():
                            if k == "properties" and isinstance(out.get(k), dict):
                                out[k] = {**out[k], **v}
                            elif k == "required" and isinstance(out.get(k), list):
                                out[k] = [*out[k], *v]
                            else:
                                out.setdefault(k, v)
            elif key == "type" and isinstance(value, list):
                types = [t for t in value if t != "null"]
                if len(types) < len(value):
                    out["nullable"] = True
                if len(types) == 1:
                    out["type"] = types[0]
                elif types:
                    out["anyOf"] = [{"type": t} for t in types]
            elif key == "const":
                out["enum"] = [value if isinstance(value, str) else orjson.dumps(value).decode()]
            elif key == "enum" and isinstance(value, list):
                out["enum"] = [v if isinstance(v, str) else orjson.dumps(v).decode() for v in value]
                out.setdefault("type", "string")
            elif key == "additionalProperties":
                if value is False:
                    continue  # "no extra keys": nothing the subset needs to say
                if not self.vertex:
                    raise _NotInSubset("additionalProperties on the Developer API")
                out[key] = sub(value) if isinstance(value, dict) else value
            elif key in _SCHEMA_KEYS:
                out[key] = value
        if out.get("type") == "object" and not out.get("properties"):
            if depth == 0:
                return None
            raise _NotInSubset("an object without properties")
        props = out.get("properties")
        if isinstance(props, dict):
            if isinstance(out.get("required"), list):
                out["required"] = [r for r in out["required"] if r in props]
            if len(props) > 1:
                out.setdefault("propertyOrdering", list(props))
        return out


# -- requests --------------------------------------------------------------------------------


def image_urls(body: Mapping[str, Any]) -> list[str]:
    """The http(s) image URLs in a request (the provider fetches them; Gemini wants bytes)."""
    urls: list[str] = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if isinstance(url, str) and url.startswith(("https://", "http://")):
                    urls.append(url)
    return urls


def _text_parts(content: Any, param: str) -> list[JSONObject]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[JSONObject] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind in ("text", "refusal"):
            text = part.get("text") if kind == "text" else part.get("refusal")
            if not isinstance(text, str):
                raise InvalidRequest(f"'{param}[{j}]' needs a string text.", param=f"{param}[{j}]")
            if text:
                parts.append({"text": text})
        else:
            raise _unsupported(f"{param}[{j}]", f"a {kind!r} part cannot appear in this message")
    return parts


def _user_parts(
    content: Any, param: str, images: Mapping[str, tuple[str, str]]
) -> list[JSONObject]:
    if content is None or isinstance(content, str):
        return _text_parts(content, param)
    parts: list[JSONObject] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        where = f"{param}[{j}]"
        if kind == "text":
            parts.extend(_text_parts([part], param))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str) and url.startswith("data:"):
                mime, data = parse_data_uri(url, f"{where}.image_url.url")
                parts.append({"inlineData": {"mimeType": mime, "data": data}})
            elif isinstance(url, str) and url in images:
                mime, data = images[url]
                parts.append({"inlineData": {"mimeType": mime, "data": data}})
            else:
                raise InvalidRequest(
                    f"'{where}.image_url.url' must be an http(s) URL or a data: URI.",
                    param=f"{where}.image_url",
                )
        elif kind == "file":
            file = _obj(part.get("file"))
            file_data = file.get("file_data")
            if not isinstance(file_data, str):
                raise _unsupported(where, "only files given inline as file_data (a data: URI)")
            mime, b64 = parse_data_uri(file_data, f"{where}.file.file_data")
            parts.append({"inlineData": {"mimeType": mime, "data": b64}})
        elif kind == "input_audio":
            audio = _obj(part.get("input_audio"))
            fmt = audio.get("format")
            if not isinstance(audio.get("data"), str) or not isinstance(fmt, str):
                raise InvalidRequest(f"'{where}.input_audio' needs data and format.", param=where)
            parts.append({"inlineData": {"mimeType": f"audio/{fmt}", "data": audio["data"]}})
        else:
            raise _unsupported(where, f"{kind!r} content parts cannot be sent to Gemini")
    return parts


def _arguments(raw: Any, param: str) -> JSONObject:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise InvalidRequest(f"'{param}' must be a JSON string.", param=param)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"'{param}' is not valid JSON: {exc}", param=param) from exc
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{param}' must be a JSON object.", param=param)
    return value


def _signature_of(item: Mapping[str, Any]) -> str | None:
    extra = item.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) and signature else None


def convert_messages(
    messages: list[JSONObject],
    *,
    model: str,
    options: GeminiOptions,
    images: Mapping[str, tuple[str, str]],
) -> tuple[JSONObject | None, list[JSONObject]]:
    """OpenAI messages -> (``systemInstruction``, ``contents``).

    Raises:
        InvalidRequest, NotSupported: a message that cannot be translated (``param`` names it).
    """
    system: list[JSONObject] = []
    contents: list[JSONObject] = []
    names: dict[str, str] = {}  # tool call id -> function name
    needs_signature = is_gemini_3(model)

    def add(role: str, parts: list[JSONObject]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": list(parts)})

    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_text_parts(message.get("content"), f"{param}.content"))
        elif role == "user":
            add("user", _user_parts(message.get("content"), f"{param}.content", images))
        elif role == "assistant":
            parts = _text_parts(message.get("content"), f"{param}.content")
            signature = _signature_of(message)
            if signature and parts:
                parts[-1]["thoughtSignature"] = signature
            elif signature:
                # The signature came on a part of its own (a thought); send that part back.
                thought = message.get("reasoning_content")
                parts.append(
                    {
                        "thought": True,
                        "text": thought if isinstance(thought, str) else "",
                        "thoughtSignature": signature,
                    }
                )
            calls = list(message.get("tool_calls") or [])
            legacy = message.get("function_call")
            if isinstance(legacy, dict):
                calls.append({"id": f"call_{legacy.get('name')}", "function": legacy})
            for k, call in enumerate(calls):
                where = f"{param}.tool_calls[{k}]"
                function = _obj(call.get("function") if isinstance(call, dict) else None)
                name = function.get("name")
                if not isinstance(name, str) or not name:
                    raise InvalidRequest(f"'{where}.function.name' is required.", param=where)
                call_part: JSONObject = {
                    "name": name,
                    "args": _arguments(function.get("arguments"), f"{where}.function.arguments"),
                }
                call_id = call.get("id")
                if isinstance(call_id, str):
                    names[call_id] = name
                    if not options.vertex:
                        call_part["id"] = call_id
                part: JSONObject = {"functionCall": call_part}
                sig = _signature_of(call)
                if sig:
                    part["thoughtSignature"] = sig
                elif k == 0 and needs_signature:
                    part["thoughtSignature"] = SKIP_SIGNATURE
                parts.append(part)
            add("model", parts)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in names:
                raise InvalidRequest(
                    f"'{param}.tool_call_id' must name a tool call of an earlier assistant "
                    "message (Gemini needs the function's name).",
                    param=f"{param}.tool_call_id",
                )
            content = message.get("content")
            text = (
                content
                if isinstance(content, str)
                else "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))
            )
            try:
                parsed = orjson.loads(text) if text else None
            except orjson.JSONDecodeError:
                parsed = None
            response = parsed if isinstance(parsed, dict) else {"result": text}
            fn: JSONObject = {"name": names[call_id], "response": response}
            if not options.vertex:
                fn["id"] = call_id
            add("user", [{"functionResponse": fn}])
        elif role == "function":
            raise _unsupported(f"{param}.role", "legacy 'function' messages: use tools")
        else:
            raise InvalidRequest(f"Unknown role {role!r} in '{param}'.", param=f"{param}.role")
    instruction = {"role": "user", "parts": system} if system else None
    return instruction, contents


def _tools(body: JSONObject, options: GeminiOptions) -> list[JSONObject] | None:
    tools = body.get("tools")
    functions = body.get("functions")
    if functions and not tools:
        tools = [{"type": "function", "function": f} for f in functions if isinstance(f, dict)]
    if not tools:
        return None
    declarations = []
    for i, tool in enumerate(tools):
        if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise _unsupported(f"tools[{i}]", "only function tools can be sent to Gemini")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"'tools[{i}].function.name' is required.", param=f"tools[{i}]")
        declaration: JSONObject = {"name": name}
        if isinstance(function.get("description"), str) and function["description"]:
            declaration["description"] = function["description"]
        declaration.update(
            schema_fields(
                function.get("parameters"),
                vertex=options.vertex,
                subset_key="parameters",
                json_key="parametersJsonSchema",
            )
        )
        declarations.append(declaration)
    return [{"functionDeclarations": declarations}]


def _tool_config(body: JSONObject) -> JSONObject | None:
    choice = body.get("tool_choice")
    if choice is None and isinstance(body.get("function_call"), str | dict):
        legacy = body["function_call"]
        choice = legacy if isinstance(legacy, str) else {"type": "function", "function": legacy}
    if choice is None:
        return None
    if choice == "auto":
        config: JSONObject = {"mode": "AUTO"}
    elif choice == "none":
        config = {"mode": "NONE"}
    elif choice == "required":
        config = {"mode": "ANY"}
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        config = {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
    else:
        raise InvalidRequest(
            "'tool_choice' must be 'auto', 'none', 'required' or a named function.",
            param="tool_choice",
        )
    return {"functionCallingConfig": config}


def _deep_merge(base: JSONObject, extra: Mapping[str, Any]) -> JSONObject:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def to_gemini_request(
    body: JSONObject,
    options: GeminiOptions,
    *,
    images: Mapping[str, tuple[str, str]] | None = None,
    extra_body: Mapping[str, Any] | None = None,
) -> tuple[JSONObject, RequestInfo]:
    """Translate an OpenAI chat request into a Gemini ``GenerateContentRequest``.

    Args:
        images: fetched image URLs -> (mime type, base64 data).
        extra_body: connection-level fields deep-merged into the request.

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
            "logit_bias": "Gemini has no logit bias",
            "logprobs": "log probabilities are not translated for Gemini yet",
            "top_logprobs": "log probabilities are not translated for Gemini yet",
        }
        raise _unsupported(key, reasons.get(key, "the parameter has no Gemini equivalent"))

    model = str(body.get("model", ""))
    instruction, contents = convert_messages(
        body.get("messages") or [], model=model, options=options, images=images or {}
    )
    if not contents:
        raise InvalidRequest(
            "Gemini needs at least one user or assistant message besides system messages.",
            param="messages",
        )
    request: JSONObject = {"contents": contents}
    if instruction:
        request["systemInstruction"] = instruction
    tools = _tools(body, options)
    if tools:
        request["tools"] = tools
        tool_config = _tool_config(body)
        if tool_config:
            request["toolConfig"] = tool_config

    generation: JSONObject = {}
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        if body.get(ours) is not None:
            generation[theirs] = body[ours]
    n = body.get("n") or 1
    if n > 1:
        generation["candidateCount"] = n
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > 0:
        generation["maxOutputTokens"] = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop:
        generation["stopSequences"] = list(stop)
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_object":
            generation["responseMimeType"] = "application/json"
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise InvalidRequest(
                    "'response_format.json_schema.schema' must be a JSON schema object.",
                    param="response_format",
                )
            generation["responseMimeType"] = "application/json"
            generation.update(
                schema_fields(
                    schema,
                    vertex=options.vertex,
                    subset_key="responseSchema",
                    json_key="responseJsonSchema",
                )
            )
        elif kind not in (None, "text"):
            raise InvalidRequest(f"Unknown response_format type {kind!r}.", param="response_format")
    effort = body.get("reasoning_effort")
    if isinstance(effort, str):
        if effort not in THINKING_BUDGETS:
            raise InvalidRequest(f"Unknown reasoning_effort {effort!r}.", param="reasoning_effort")
        if is_gemini_3(model):
            thinking: JSONObject = {"thinkingLevel": THINKING_LEVELS[effort]}
        else:
            thinking = {"thinkingBudget": THINKING_BUDGETS[effort]}
        if effort != "none":
            thinking["includeThoughts"] = True  # so the answer has reasoning_content
        generation["thinkingConfig"] = thinking
    if generation:
        request["generationConfig"] = generation
    if extra_body:
        _deep_merge(request, extra_body)
    return request, RequestInfo(candidates=n)


# -- answers --------------------------------------------------------------------------------


def translate_usage(usage: Any) -> JSONObject | None:
    """Gemini ``usageMetadata`` -> OpenAI usage (thoughts count as completion tokens)."""
    if not isinstance(usage, Mapping):
        return None
    prompt = (usage.get("promptTokenCount") or 0) + (usage.get("toolUsePromptTokenCount") or 0)
    thoughts = usage.get("thoughtsTokenCount") or 0
    completion = (usage.get("candidatesTokenCount") or 0) + thoughts
    total = usage.get("totalTokenCount") or prompt + completion
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
        "prompt_tokens_details": {"cached_tokens": usage.get("cachedContentTokenCount") or 0},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


def finish_reason(reason: Any, *, has_tool_calls: bool) -> str:
    """Gemini ``finishReason`` -> OpenAI ``finish_reason`` (see ``doc/providers.md``)."""
    if reason in (None, "STOP") and has_tool_calls:
        return "tool_calls"
    return FINISH_REASONS.get(str(reason), "stop")


def _call_id(call: Mapping[str, Any]) -> str:
    value = call.get("id")
    return value if isinstance(value, str) and value else f"call_{secrets.token_hex(12)}"


def _tool_call(part: Mapping[str, Any], index: int | None = None) -> JSONObject:
    call = part["functionCall"] if isinstance(part.get("functionCall"), dict) else {}
    out: JSONObject = {
        "id": _call_id(call),
        "type": "function",
        "function": {
            "name": call.get("name"),
            "arguments": orjson.dumps(call.get("args") or {}).decode(),
        },
    }
    if index is not None:
        out = {"index": index, **out}
    signature = part.get("thoughtSignature")
    if isinstance(signature, str) and signature:
        out["extra_content"] = {"google": {"thought_signature": signature}}
    return out


def from_gemini_response(response: JSONObject, info: RequestInfo) -> JSONObject:
    """A ``GenerateContentResponse`` -> an OpenAI ``chat.completion``.

    A prompt blocked by safety (no candidates, ``promptFeedback.blockReason``) becomes one
    choice with no content and ``finish_reason: content_filter``.
    """
    candidates = response.get("candidates")
    if not isinstance(candidates, list):
        candidates = []
    choices: list[JSONObject] = []
    for position, candidate in enumerate(candidates):
        if not isinstance(candidate, dict):
            continue
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[JSONObject] = []
        text_signature: str | None = None
        content = _obj(candidate.get("content"))
        for part in content.get("parts") or []:
            if not isinstance(part, dict):
                continue
            if "functionCall" in part:
                calls.append(_tool_call(part))
                continue
            if isinstance(part.get("thoughtSignature"), str) and part["thoughtSignature"]:
                text_signature = part["thoughtSignature"]
            text = part.get("text")
            if isinstance(text, str):
                (thoughts if part.get("thought") else texts).append(text)
        message: JSONObject = {
            "role": "assistant",
            "content": "".join(texts) if texts else None,
            "refusal": None,
        }
        if thoughts:
            message["reasoning_content"] = "".join(thoughts)
        if calls:
            message["tool_calls"] = calls
        if text_signature:
            message["extra_content"] = {"google": {"thought_signature": text_signature}}
        index = candidate.get("index", position)
        choices.append(
            {
                "index": index if isinstance(index, int) else position,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason(
                    candidate.get("finishReason"), has_tool_calls=bool(calls)
                ),
            }
        )
    if not choices:
        feedback = response.get("promptFeedback")
        blocked = isinstance(feedback, dict) and feedback.get("blockReason")
        choices.append(
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "refusal": None},
                "logprobs": None,
                "finish_reason": "content_filter" if blocked else "stop",
            }
        )
    choices.sort(key=lambda c: c["index"])
    completion: JSONObject = {
        "id": f"chatcmpl-{response.get('responseId') or secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": response.get("modelVersion"),
        "choices": choices,
    }
    usage = translate_usage(response.get("usageMetadata"))
    if usage is not None:
        completion["usage"] = usage
    return completion


class GeminiStreamTranslator:
    """Gemini stream chunks -> OpenAI chunks.

    Each event is a whole ``GenerateContentResponse``; function calls arrive complete, so each
    becomes one tool-call delta with the full arguments. Gemini sends no end marker (the body
    just ends, and usage may come after the last ``finishReason``), so ``done`` is only set by
    :meth:`finish` at the end of the body.
    """

    def __init__(self, connection: str, info: RequestInfo) -> None:
        self._connection = connection
        self._info = info
        self.done = False
        self._id = f"chatcmpl-{secrets.token_hex(12)}"
        self._created = int(time.time())
        self._model: Any = None
        self._usage: Any = None
        self._started: set[int] = set()
        self._tools: dict[int, int] = {}
        self._finished: dict[int, str] = {}
        self._blocked = False

    def _chunk(self, index: int, delta: JSONObject, finish: str | None = None) -> JSONObject:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }

    def feed(self, event: SSEEvent) -> list[JSONObject]:
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(
                f"The upstream provider sent a malformed stream chunk (connection "
                f"{self._connection!r}).",
                detail=f"{exc}; data starts {event.data[:200]!r}",
                connection=self._connection,
            ) from exc
        if not isinstance(data, dict):
            raise UpstreamProtocolError(
                f"The upstream provider sent a stream chunk that is not an object "
                f"(connection {self._connection!r}).",
                connection=self._connection,
            )
        if "error" in data:
            error = data["error"] if isinstance(data["error"], dict) else {}
            raise error_from_body(self._connection, None, error)
        if self._model is None:
            self._model = data.get("modelVersion")
            if isinstance(data.get("responseId"), str):
                self._id = f"chatcmpl-{data['responseId']}"
        if isinstance(data.get("usageMetadata"), dict):
            self._usage = data["usageMetadata"]  # cumulative: the last one wins
        chunks: list[JSONObject] = []
        candidates = data.get("candidates")
        if not isinstance(candidates, list) or not candidates:
            feedback = data.get("promptFeedback")
            if isinstance(feedback, dict) and feedback.get("blockReason"):
                self._blocked = True
                chunks.append(self._chunk(0, {"role": "assistant"}))
                chunks.append(self._chunk(0, {}, "content_filter"))
                self._finished[0] = "content_filter"
            return chunks
        for position, candidate in enumerate(candidates):
            if not isinstance(candidate, dict):
                continue
            index = candidate.get("index", position)
            index = index if isinstance(index, int) else position
            if index not in self._started:
                self._started.add(index)
                chunks.append(self._chunk(index, {"role": "assistant"}))
            content = _obj(candidate.get("content"))
            for part in content.get("parts") or []:
                if not isinstance(part, dict):
                    continue
                if "functionCall" in part:
                    tool_index = self._tools.get(index, 0)
                    self._tools[index] = tool_index + 1
                    chunks.append(
                        self._chunk(index, {"tool_calls": [_tool_call(part, tool_index)]})
                    )
                    continue
                text = part.get("text")
                signature = part.get("thoughtSignature")
                if isinstance(text, str) and text:
                    key = "reasoning_content" if part.get("thought") else "content"
                    chunks.append(self._chunk(index, {key: text}))
                if isinstance(signature, str) and signature:
                    chunks.append(
                        self._chunk(
                            index, {"extra_content": {"google": {"thought_signature": signature}}}
                        )
                    )
            reason = candidate.get("finishReason")
            if reason:
                mapped = finish_reason(reason, has_tool_calls=index in self._tools)
                self._finished[index] = mapped
                chunks.append(self._chunk(index, {}, mapped))
        return chunks

    def usage_so_far(self) -> JSONObject | None:
        """The usage reported until now (Gemini's is cumulative), in OpenAI's fields."""
        return translate_usage(self._usage)

    def finish(self) -> list[JSONObject]:
        if not self._finished:
            raise UpstreamUnreachable(
                f"The upstream provider ended the stream before it finished (connection "
                f"{self._connection!r}).",
                detail="end of body without a finishReason",
                connection=self._connection,
            )
        self.done = True
        usage = translate_usage(self._usage)
        if usage is None:
            return []
        return [
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [],
                "usage": usage,
            }
        ]


# -- errors ---------------------------------------------------------------------------------

_CONTEXT_PATTERN = re.compile(r"input token count .* exceeds the maximum", re.I | re.S)
_STATUS_TYPES = {
    "INVALID_ARGUMENT": "invalid_request_error",
    "FAILED_PRECONDITION": "invalid_request_error",
    "NOT_FOUND": "invalid_request_error",
    "RESOURCE_EXHAUSTED": "rate_limit_error",
    "PERMISSION_DENIED": "permission_error",
    "UNAUTHENTICATED": "authentication_error",
    "INTERNAL": "server_error",
    "UNAVAILABLE": "service_unavailable",
    "DEADLINE_EXCEEDED": "timeout",
}
_STATUS_CODES = {"UNAVAILABLE": 503, "INTERNAL": 500, "DEADLINE_EXCEEDED": 504,
                 "RESOURCE_EXHAUSTED": 429, "INVALID_ARGUMENT": 400, "NOT_FOUND": 404,
                 "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401}  # fmt: skip


def retry_after_seconds(error: Mapping[str, Any]) -> int | None:
    """Seconds from a ``google.rpc.RetryInfo`` detail (``"retryDelay": "7s"``), rounded up."""
    for detail in error.get("details") or []:
        if not isinstance(detail, dict):
            continue
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(1, math.ceil(float(delay[:-1])))
            except ValueError:
                continue
    return None


def error_from_body(
    connection: str,
    status: int | None,
    error: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    raw: str = "",
) -> UpstreamError:
    """Google's ``error`` object (and status, if any) -> our UpstreamError.

    The 429 retry delay (in the body, not in a header) becomes ``Retry-After``; an invalid API
    key (a 400 with reason ``API_KEY_INVALID``) is reported as the gateway's credentials being
    refused; a context overflow gets code ``context_length_exceeded``.
    """
    rpc_status = error.get("status") if isinstance(error.get("status"), str) else None
    message = error.get("message") if isinstance(error.get("message"), str) else None
    if status is None:
        code_value = error.get("code")
        status = (
            code_value if isinstance(code_value, int) else _STATUS_CODES.get(rpc_status or "", 502)
        )
    out_headers = dict(headers or {})
    retry = retry_after_seconds(error)
    if retry is not None:
        out_headers.setdefault("retry-after", str(retry))
    reasons = {d.get("reason") for d in error.get("details") or [] if isinstance(d, dict)}
    if "API_KEY_INVALID" in reasons:
        status = 401
    code = rpc_status.lower() if rpc_status else None
    if status == 400 and message and _CONTEXT_PATTERN.search(message):
        code = "context_length_exceeded"
    elif status == 404 and message and "model" in message.lower():
        code = "model_not_found"
    elif status == 402:
        code = "insufficient_quota"
    return upstream_status_error(
        connection,
        status,
        message=message,
        error_type=_STATUS_TYPES.get(rpc_status or ""),
        code=code,
        headers=out_headers,
        raw=raw,
    )


def error_from_status(
    connection: str, status: int, body: bytes, headers: dict[str, str]
) -> UpstreamError:
    """A Gemini error answer -> our UpstreamError (the HTTP error mapper)."""
    raw = body[:2000].decode("utf-8", "replace")
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list) and parsed and isinstance(parsed[0], dict):
        parsed = parsed[0]  # Vertex sometimes wraps the error in an array
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error_from_body(
        connection, status, error if isinstance(error, dict) else {}, headers, raw
    )


# -- embeddings ---------------------------------------------------------------------------------


def to_gemini_embeddings(body: Mapping[str, Any], *, vertex: bool) -> tuple[JSONObject, str]:
    """An OpenAI embeddings request as Gemini's: ``(request body, method)``.

    The Developer API takes ``batchEmbedContents`` (one request per input text); Vertex AI
    takes ``predict`` (one instance per text). ``dimensions`` becomes
    ``outputDimensionality``; Gemini's ``task_type`` may be sent as an extra field.

    Raises:
        NotSupported: token-id inputs (Gemini embeds text only).
    """
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise NotSupported(
            "Gemini embeds text: send 'input' as a string or an array of strings, not token ids.",
            param="input",
        )
    model = str(body.get("model", "")).removeprefix("models/")
    dimensions = body.get("dimensions")
    task = body.get("task_type") or body.get("taskType")
    if vertex:
        instance_extra = {"task_type": task} if task else {}
        request: JSONObject = {"instances": [{"content": t, **instance_extra} for t in texts]}
        if dimensions:
            request["parameters"] = {"outputDimensionality": dimensions}
        return request, "predict"
    one_extra: JSONObject = {}
    if task:
        one_extra["taskType"] = task
    if dimensions:
        one_extra["outputDimensionality"] = dimensions
    requests = [
        {"model": f"models/{model}", "content": {"parts": [{"text": t}]}, **one_extra}
        for t in texts
    ]
    return {"requests": requests}, "batchEmbedContents"


def from_gemini_embeddings(
    response: Mapping[str, Any], body: Mapping[str, Any], *, vertex: bool
) -> JSONObject:
    """Gemini's embeddings as OpenAI's list (floats, or base64 float32 when asked).

    Usage: Vertex reports token counts per text; the Developer API may report
    ``usageMetadata.promptTokenCount``; without either, an estimate (4 characters a token).

    Raises:
        UpstreamProtocolError: the answer has no vectors.
    """
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else list(raw or [])
    vectors: list[list[float]] = []
    tokens = 0
    if vertex:
        for prediction in response.get("predictions") or []:
            embeddings = prediction.get("embeddings") if isinstance(prediction, dict) else None
            values = embeddings.get("values") if isinstance(embeddings, dict) else None
            if isinstance(values, list):
                vectors.append(values)
                stats = embeddings.get("statistics") if isinstance(embeddings, dict) else None
                if isinstance(stats, dict) and isinstance(stats.get("token_count"), int | float):
                    tokens += int(stats["token_count"])
    else:
        for embedding in response.get("embeddings") or []:
            values = embedding.get("values") if isinstance(embedding, dict) else None
            if isinstance(values, list):
                vectors.append(values)
        usage = response.get("usageMetadata")
        if isinstance(usage, dict) and isinstance(usage.get("promptTokenCount"), int):
            tokens = usage["promptTokenCount"]
    if len(vectors) != len(texts):
        raise UpstreamProtocolError(
            f"Gemini answered {len(vectors)} embeddings for {len(texts)} inputs.",
            detail=f"keys: {sorted(response)[:10]}",
        )
    if not tokens:
        tokens = sum(max(1, len(t) // 4) for t in texts)
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, vector in enumerate(vectors):
        encoded: Any = vector
        if as_base64:
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": body.get("model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
