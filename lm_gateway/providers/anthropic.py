"""The Anthropic connection: OpenAI chat completions over Anthropic's Messages API.

HTTP is our own pooled httpx2 client (:mod:`lm_gateway.providers.http`), so streaming,
cancellation and timeouts behave exactly as for every other connection; the translation is the
sans-io :mod:`lm_gateway.wire.anthropic`, whose output the tests check against the ``anthropic``
SDK's own types. ``n > 1`` is served by the gateway's fan-out (Anthropic has no ``n``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx2
import trio

from ..config.model import AnthropicConnection
from ..wire.anthropic import (
    AnthropicOptions,
    AnthropicStreamTranslator,
    error_from_status,
    from_anthropic_response,
    to_anthropic_request,
)
from ..wire.anthropic_inbound import PassthroughTranslator
from ..wire.openai import dumps, wants_stream_usage
from .base import ChatCall, ChatResult, ChatStream, JSONObject
from .http import HTTPUpstream


def _created(value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
        except ValueError:
            return 0
    return 0


class AnthropicProvider:
    """Anthropic's Messages API as a connection."""

    #: Anthropic answers one choice per call; the gateway fans n > 1 out.
    native_n = False

    def __init__(
        self, config: AnthropicConnection, *, transport: httpx2.AsyncBaseTransport | None = None
    ) -> None:
        self.name = config.name
        self.config = config
        self.options = AnthropicOptions(
            default_max_tokens=config.max_tokens,
            version=config.anthropic_version,
            reasoning=config.reasoning,
            drop_unsupported=config.drop_unsupported_params,
        )
        headers = {
            "content-type": "application/json",
            "anthropic-version": config.anthropic_version,
        }
        if config.api_key:
            headers["x-api-key"] = config.api_key
        headers.update({k.lower(): v for k, v in config.http_headers.items()})
        self._beta = list(config.anthropic_beta)
        self._http = HTTPUpstream(config, headers, error_from_status, transport=transport)
        self._messages_url = f"{config.api_base}/v1/messages"
        self._models_url = f"{config.api_base}/v1/models"

    def _headers(self, call: ChatCall) -> dict[str, str]:
        headers = dict(call.headers)
        betas = list(self._beta)
        client_betas = call.client_headers.get("anthropic-beta", "")
        for beta in client_betas.split(","):
            if beta.strip() and beta.strip() not in betas:
                betas.append(beta.strip())
        if betas:
            headers["anthropic-beta"] = ",".join(betas)
        return headers

    # -- Anthropic clients (POST /v1/messages): the request and answer as they are ----------

    def _passthrough(self, call: ChatCall) -> tuple[bytes, dict[str, str]]:
        headers = self._headers(call)
        version = call.client_headers.get("anthropic-version")
        if version:
            headers["anthropic-version"] = version
        return dumps(call.body), headers

    async def _post_passthrough(self, url: str, call: ChatCall) -> ChatResult:
        content, headers = self._passthrough(call)
        body = await self._http.request_json(
            "POST",
            url,
            content=content,
            headers=headers,
            deadline=self._http.deadline(call.deadline),
        )
        return ChatResult(body=body)

    async def messages_passthrough(self, call: ChatCall) -> ChatResult:
        return await self._post_passthrough(self._messages_url, call)

    async def count_tokens(self, call: ChatCall) -> ChatResult:
        """Anthropic's own ``count_tokens`` (exact, free of charge)."""
        return await self._post_passthrough(f"{self._messages_url}/count_tokens", call)

    async def open_messages_stream(self, call: ChatCall) -> ChatStream:
        content, headers = self._passthrough(call)
        return await self._http.open_sse(
            self._messages_url,
            content=content,
            translator=PassthroughTranslator(self.name),
            headers=headers,
            deadline=self._http.deadline(call.deadline),
        )

    async def chat(self, call: ChatCall) -> ChatResult:
        request, info = to_anthropic_request(call.body, self.options)
        message = await self._http.request_json(
            "POST",
            self._messages_url,
            content=dumps(request),
            headers=self._headers(call),
            deadline=self._http.deadline(call.deadline),
        )
        return ChatResult(body=from_anthropic_response(message, info))

    async def open_chat_stream(self, call: ChatCall) -> ChatStream:
        request, info = to_anthropic_request({**call.body, "stream": True}, self.options)
        # The translator always emits the final usage chunk; drop it unless the client asked.
        call.usage_requested_by_gateway = not wants_stream_usage(call.body)
        return await self._http.open_sse(
            self._messages_url,
            content=dumps(request),
            translator=AnthropicStreamTranslator(self.name, info),
            headers=self._headers(call),
            deadline=self._http.deadline(call.deadline),
        )

    async def list_models(self) -> list[JSONObject] | None:
        body = await self._http.request_json(
            "GET",
            f"{self._models_url}?limit=1000",
            deadline=trio.current_time() + self.config.connect_timeout_seconds + 30,
            during="listing models",
        )
        data = body.get("data")
        if not isinstance(data, list):
            return []
        return [
            {
                "id": m["id"],
                "object": "model",
                "created": _created(m.get("created_at")),
                "owned_by": "anthropic",
                **({"display_name": m["display_name"]} if "display_name" in m else {}),
            }
            for m in data
            if isinstance(m, dict) and isinstance(m.get("id"), str)
        ]

    async def aclose(self) -> None:
        await self._http.aclose()
