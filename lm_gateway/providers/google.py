"""The Google connection: Gemini through the Developer API or Vertex AI.

HTTP is our own pooled httpx2 client (:mod:`lm_gateway.providers.http`) and the translation is
the sans-io :mod:`lm_gateway.wire.gemini`; the tests check both against the ``google-genai``
SDK's types. The SDK is not used at run time: its async client is asyncio-only, and even with an
injected httpx client its Vertex token refresh uses ``asyncio.Lock``/``asyncio.to_thread``,
which fails under trio. Here Vertex credentials (a service account file or JSON, or
application default credentials) are loaded and refreshed by google-auth in a worker thread,
one refresh at a time, never on the event loop.
"""

from __future__ import annotations

import functools
from typing import Any

import httpx2
import orjson
import trio

from ..config.model import GoogleConnection
from ..errors import UpstreamError
from ..wire.gemini import (
    GeminiOptions,
    GeminiStreamTranslator,
    error_from_status,
    from_gemini_embeddings,
    from_gemini_response,
    image_urls,
    to_gemini_embeddings,
    to_gemini_request,
)
from ..wire.openai import wants_stream_usage
from .base import ChatCall, ChatResult, ChatStream, JSONObject, raise_from_group
from .fetch import fetch_image
from .http import HTTPUpstream

_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


def _load_credentials(config: GoogleConnection) -> Any:
    """Vertex credentials: the configured service account, or application default credentials.

    Blocking (reads files, may query the metadata server): call it in a worker thread.
    """
    import google.auth
    from google.oauth2 import service_account

    make: Any = service_account.Credentials  # google-auth is untyped
    if config.service_account_info is not None:
        return make.from_service_account_info(dict(config.service_account_info), scopes=_SCOPES)
    if config.service_account_file is not None:
        return make.from_service_account_file(config.service_account_file, scopes=_SCOPES)
    credentials, _project = google.auth.default(scopes=list(_SCOPES))
    return credentials


def _refresh(credentials: Any) -> None:
    """Refresh an access token (blocking HTTP through google-auth's requests transport)."""
    from google.auth.transport.requests import Request

    credentials.refresh(Request())


class GoogleProvider:
    """Gemini (Developer API or Vertex AI) as a connection."""

    #: ``n`` is ``candidateCount``: Gemini answers several choices itself.
    native_n = True

    def __init__(
        self, config: GoogleConnection, *, transport: httpx2.AsyncBaseTransport | None = None
    ) -> None:
        self.name = config.name
        self.config = config
        self.options = GeminiOptions(
            vertex=config.vertexai, drop_unsupported=config.drop_unsupported_params
        )
        headers = {"content-type": "application/json"}
        # The Developer API (and Vertex "express mode") take the key as a header, never in the
        # URL, where it would end up in access logs.
        if config.api_key:
            headers["x-goog-api-key"] = config.api_key
        headers.update({k.lower(): v for k, v in config.http_headers.items()})
        self._http = HTTPUpstream(config, headers, error_from_status, transport=transport)
        self._fetcher = httpx2.AsyncClient(follow_redirects=False, transport=transport)
        base = f"{config.api_base}/{config.api_version}"
        if config.vertexai and config.project:
            self._models_base = (
                f"{base}/projects/{config.project}/locations/{config.location}"
                "/publishers/google/models"
            )
            self._list_url = f"{base}/publishers/google/models"
        elif config.vertexai:
            self._models_base = f"{base}/publishers/google/models"
            self._list_url = self._models_base
        else:
            self._models_base = f"{base}/models"
            self._list_url = self._models_base
        self._oauth = config.vertexai and not config.api_key
        self._credentials: Any = None
        self._credentials_lock = trio.Lock()

    # -- auth --------------------------------------------------------------------------------

    async def _auth_headers(self) -> dict[str, str]:
        if not self._oauth:
            return {}
        async with self._credentials_lock:  # one load/refresh at a time; the rest wait for it
            try:
                if self._credentials is None:
                    self._credentials = await trio.to_thread.run_sync(
                        _load_credentials, self.config
                    )
                if not self._credentials.valid:
                    await trio.to_thread.run_sync(_refresh, self._credentials)
            except Exception as exc:
                raise UpstreamError(
                    f"The gateway could not get Google credentials for connection {self.name!r}.",
                    status=502,
                    code="upstream_credentials_unavailable",
                    detail=f"{type(exc).__name__}: {exc}",
                    connection=self.name,
                ) from exc
            headers = {"authorization": f"Bearer {self._credentials.token}"}
            quota_project = getattr(self._credentials, "quota_project_id", None)
            if quota_project:
                headers["x-goog-user-project"] = quota_project
            return headers

    # -- requests ----------------------------------------------------------------------------

    def _url(self, model: str, method: str) -> str:
        model = model.removeprefix("models/")
        return f"{self._models_base}/{model}:{method}"

    async def _images(self, body: JSONObject) -> dict[str, tuple[str, str]]:
        """Fetch the request's image URLs concurrently (the request's scope owns the fetches)."""
        urls = list(dict.fromkeys(image_urls(body)))
        if not urls:
            return {}
        images: dict[str, tuple[str, str]] = {}
        fetch = functools.partial(
            fetch_image,
            self._fetcher,
            max_bytes=self.config.image_fetch_max_bytes,
            timeout_seconds=self.config.image_fetch_timeout_seconds,
            allow_private=self.config.image_fetch_allow_private,
        )

        async def one(url: str) -> None:
            images[url] = await fetch(url, param="messages")

        try:
            async with trio.open_nursery() as nursery:
                for url in urls:
                    nursery.start_soon(one, url)
        except BaseExceptionGroup as group:
            raise_from_group(group)
        return images

    async def _prepare(self, call: ChatCall) -> tuple[bytes, Any, dict[str, str]]:
        images = await self._images(call.body)
        request, info = to_gemini_request(
            call.body, self.options, images=images, extra_body=self.config.extra_body
        )
        headers = {**call.headers, **await self._auth_headers()}
        return orjson.dumps(request), info, headers

    async def chat(self, call: ChatCall) -> ChatResult:
        content, info, headers = await self._prepare(call)
        response = await self._http.request_json(
            "POST",
            self._url(str(call.body.get("model", "")), "generateContent"),
            content=content,
            headers=headers,
            deadline=self._http.deadline(call.deadline),
        )
        return ChatResult(body=from_gemini_response(response, info))

    async def open_chat_stream(self, call: ChatCall) -> ChatStream:
        content, info, headers = await self._prepare(call)
        # The translator ends with a usage chunk when Gemini reported usage; drop it unless
        # the client asked for it.
        call.usage_requested_by_gateway = not wants_stream_usage(call.body)
        return await self._http.open_sse(
            self._url(str(call.body.get("model", "")), "streamGenerateContent") + "?alt=sse",
            content=content,
            translator=GeminiStreamTranslator(self.name, info),
            headers=headers,
            deadline=self._http.deadline(call.deadline),
        )

    async def embeddings(self, call: ChatCall) -> ChatResult:
        """OpenAI embeddings through ``batchEmbedContents`` (Developer API) or ``predict``
        (Vertex AI)."""
        request, method = to_gemini_embeddings(call.body, vertex=self.config.vertexai)
        headers = {**call.headers, **await self._auth_headers()}
        response = await self._http.request_json(
            "POST",
            self._url(str(call.body.get("model", "")), method),
            content=orjson.dumps(request),
            headers=headers,
            deadline=self._http.deadline(call.deadline),
        )
        try:
            body = from_gemini_embeddings(response, call.body, vertex=self.config.vertexai)
        except UpstreamError as error:
            error.connection = self.name
            raise
        return ChatResult(body=body)

    async def list_models(self) -> list[JSONObject] | None:
        models: list[JSONObject] = []
        token: str | None = None
        for _ in range(20):  # pages
            url = f"{self._list_url}?pageSize=1000" + (f"&pageToken={token}" if token else "")
            body = await self._http.request_json(
                "GET",
                url,
                headers=await self._auth_headers(),
                deadline=trio.current_time() + self.config.connect_timeout_seconds + 30,
                during="listing models",
            )
            for entry in body.get("models") or body.get("publisherModels") or []:
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    continue
                model_id = entry["name"].rsplit("/", 1)[-1]
                item: JSONObject = {
                    "id": model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "google",
                }
                for key in ("displayName", "inputTokenLimit", "outputTokenLimit"):
                    if key in entry:
                        item[key] = entry[key]
                models.append(item)
            token = (
                body.get("nextPageToken") if isinstance(body.get("nextPageToken"), str) else None
            )
            if not token:
                break
        return models

    async def aclose(self) -> None:
        await self._fetcher.aclose()
        await self._http.aclose()
