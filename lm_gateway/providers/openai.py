"""The OpenAI-compatible connection: OpenAI, vLLM, Ollama, llama.cpp, OpenRouter, Groq, ...

A fast path: the request body is forwarded as the client wrote it (only ``model`` rewritten and
configured defaults added), the answer is parsed once with orjson, and streams are decoded with
our own SSE decoder from raw bytes (:mod:`lm_gateway.providers.http`). Error answers keep their
status, OpenAI error fields and ``Retry-After``/rate-limit headers
(:func:`lm_gateway.wire.openai.error_from_status`).
"""

from __future__ import annotations

import httpx2
import orjson
import trio

from ..config.model import OpenAIConnection
from ..errors import UpstreamProtocolError
from ..wire.openai import OpenAIStreamTranslator, error_from_status
from .base import ChatCall, ChatResult, ChatStream, JSONObject
from .http import HTTPUpstream


class OpenAIProvider:
    """An OpenAI-compatible upstream over a pooled ``httpx2.AsyncClient``.

    Args:
        config: the validated connection settings.
        transport: an httpx transport to use instead of the network (tests, embedding).
    """

    def __init__(
        self, config: OpenAIConnection, *, transport: httpx2.AsyncBaseTransport | None = None
    ) -> None:
        self.name = config.name
        self.config = config
        headers = {"content-type": "application/json"}
        if config.api_key:
            headers["authorization"] = f"Bearer {config.api_key}"
        headers.update({k.lower(): v for k, v in config.http_headers.items()})
        self._http = HTTPUpstream(config, headers, error_from_status, transport=transport)
        self._chat_url = f"{config.api_base}/chat/completions"
        self._models_url = f"{config.api_base}/models"
        self._embeddings_url = f"{config.api_base}/embeddings"
        self._completions_url = f"{config.api_base}/completions"

    def _encode(self, call: ChatCall) -> bytes:
        body = call.body
        for key, value in self.config.default_args.items():
            body.setdefault(key, value)
        if call.stream and self.config.stream_usage:
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            if options.get("include_usage") is not True:
                options["include_usage"] = True
                body["stream_options"] = options
                call.usage_requested_by_gateway = True
        return orjson.dumps(body)

    async def chat(self, call: ChatCall) -> ChatResult:
        body = await self._http.request_json(
            "POST",
            self._chat_url,
            content=self._encode(call),
            headers=call.headers,
            deadline=self._http.deadline(call.deadline),
        )
        if not isinstance(body.get("choices"), list):
            raise UpstreamProtocolError(
                f"The upstream provider sent an answer without choices (connection {self.name!r}).",
                detail=f"keys: {sorted(body)[:20]}",
                connection=self.name,
            )
        return ChatResult(body=body)

    async def open_chat_stream(self, call: ChatCall) -> ChatStream:
        return await self._http.open_sse(
            self._chat_url,
            content=self._encode(call),
            translator=OpenAIStreamTranslator(self.name),
            headers=call.headers,
            deadline=self._http.deadline(call.deadline),
        )

    async def embeddings(self, call: ChatCall) -> ChatResult:
        """``POST /embeddings``, passed through (no ``default_args``: they are chat settings)."""
        body = await self._http.request_json(
            "POST",
            self._embeddings_url,
            content=orjson.dumps(call.body),
            headers=call.headers,
            deadline=self._http.deadline(call.deadline),
        )
        if not isinstance(body.get("data"), list):
            raise UpstreamProtocolError(
                f"The upstream provider sent embeddings without data (connection {self.name!r}).",
                detail=f"keys: {sorted(body)[:20]}",
                connection=self.name,
            )
        return ChatResult(body=body)

    async def completions(self, call: ChatCall) -> ChatResult:
        """Legacy ``POST /completions``, passed through (vLLM and others still serve it)."""
        body = await self._http.request_json(
            "POST",
            self._completions_url,
            content=self._encode(call),
            headers=call.headers,
            deadline=self._http.deadline(call.deadline),
        )
        if not isinstance(body.get("choices"), list):
            raise UpstreamProtocolError(
                f"The upstream provider sent a completion without choices (connection "
                f"{self.name!r}).",
                detail=f"keys: {sorted(body)[:20]}",
                connection=self.name,
            )
        return ChatResult(body=body)

    async def open_completions_stream(self, call: ChatCall) -> ChatStream:
        return await self._http.open_sse(
            self._completions_url,
            content=self._encode(call),
            translator=OpenAIStreamTranslator(self.name),
            headers=call.headers,
            deadline=self._http.deadline(call.deadline),
        )

    async def list_models(self) -> list[JSONObject] | None:
        body = await self._http.request_json(
            "GET",
            self._models_url,
            deadline=trio.current_time() + self.config.connect_timeout_seconds + 30,
            during="listing models",
        )
        data = body.get("data")
        if not isinstance(data, list):
            raise UpstreamProtocolError(
                f"The upstream model list has no 'data' array (connection {self.name!r}).",
                connection=self.name,
            )
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def aclose(self) -> None:
        await self._http.aclose()
