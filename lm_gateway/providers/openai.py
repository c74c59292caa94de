"""The OpenAI-compatible connection: OpenAI, vLLM, Ollama, llama.cpp, OpenRouter, Groq, ...

A fast path: the request body is forwarded as the client wrote it (only ``model`` rewritten and
configured defaults added), the answer is parsed once with orjson, and streams are decoded with
our own SSE decoder from raw bytes. One ``httpx2.AsyncClient`` per connection, created with the
gateway and closed with it, pools keep-alive connections.

Error translation happens here, once: httpx exceptions and upstream error statuses become
:mod:`lm_gateway.errors` exceptions that keep the status, the OpenAI error fields and the
``Retry-After``/rate-limit headers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import orjson
import trio

from ..config.model import OpenAIConnection
from ..errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from ..wire.sse import DONE, SSEDecoder
from .base import ChatCall, ChatResult, ChatStream, JSONObject

#: Upstream headers relayed to the client with an error answer: they tell its SDK when to retry.
_RELAYED_ERROR_HEADERS = ("retry-after", "retry-after-ms")
_RELAYED_ERROR_PREFIXES = ("x-ratelimit-",)
#: Cap on how much of an upstream error body is read: an error body is small; a huge one is not
#: an error body worth reading.
_ERROR_BODY_LIMIT = 64 * 1024


def relayed_error_headers(headers: httpx2.Headers) -> dict[str, str]:
    """The upstream error headers worth passing on (``Retry-After``, ``x-ratelimit-*``)."""
    out = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname in _RELAYED_ERROR_HEADERS or lname.startswith(_RELAYED_ERROR_PREFIXES):
            out[lname] = value
    return out


def upstream_status_error(
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
    error_type = info.get("type") if isinstance(info.get("type"), str) else None
    code = info.get("code")
    code = str(code) if code is not None else None
    param = info.get("param") if isinstance(info.get("param"), str) else None
    detail = f"upstream HTTP {status}: {message or raw_text}"

    if status in (401, 403):
        return UpstreamError(
            f"The upstream provider rejected the gateway's credentials for connection "
            f"{connection!r} (HTTP {status}).",
            status=status,
            error_type="upstream_authentication_error",
            code="upstream_authentication_failed",
            headers=headers,
            detail=detail,
            connection=connection,
        )
    if 400 <= status < 500:
        known = {"message", "type", "code", "param"}
        return UpstreamError(
            message or f"The upstream provider rejected the request (HTTP {status}).",
            status=status,
            error_type=error_type
            or ("rate_limit_error" if status == 429 else "invalid_request_error"),
            code=code,
            param=param,
            headers=headers,
            detail=None if message else detail,
            connection=connection,
            extra={k: v for k, v in info.items() if k not in known},
        )
    return UpstreamError(
        f"The upstream provider failed (HTTP {status}) on connection {connection!r}.",
        status=status if status >= 500 else 502,
        error_type=error_type or "upstream_error",
        code=code or "upstream_error",
        headers=headers,
        detail=detail,
        connection=connection,
    )


def translate_transport_error(exc: BaseException, connection: str, *, during: str) -> UpstreamError:
    """Map an httpx or trio timeout exception to our error, for ``raise ... from exc``."""
    where = f"connection {connection!r}"
    if isinstance(exc, trio.TooSlowError):
        return UpstreamTimeout(
            f"The upstream provider did not finish in time ({where}, {during}).",
            detail="request deadline passed",
            connection=connection,
        )
    if isinstance(exc, httpx2.PoolTimeout):
        return UpstreamTimeout(
            f"No upstream connection became free in time ({where}).",
            detail=str(exc) or type(exc).__name__,
            connection=connection,
        )
    if isinstance(exc, httpx2.TimeoutException):
        return UpstreamTimeout(
            f"The upstream provider timed out ({where}, {during}).",
            detail=f"{type(exc).__name__}: {exc}",
            connection=connection,
        )
    if isinstance(exc, httpx2.ConnectError):
        return UpstreamUnreachable(
            f"The upstream provider is unreachable ({where}).",
            detail=f"{type(exc).__name__}: {exc}",
            connection=connection,
        )
    return UpstreamUnreachable(
        f"The connection to the upstream provider failed ({where}, {during}).",
        detail=f"{type(exc).__name__}: {exc}",
        connection=connection,
    )


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
        self._chat_url = f"{config.api_base}/chat/completions"
        self._models_url = f"{config.api_base}/models"
        self._client = httpx2.AsyncClient(
            headers=headers,
            timeout=httpx2.Timeout(
                connect=config.connect_timeout_seconds,
                read=config.read_timeout_seconds,
                write=config.write_timeout_seconds,
                pool=config.connect_timeout_seconds,
            ),
            limits=httpx2.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_keepalive_connections,
                keepalive_expiry=config.keepalive_expiry_seconds,
            ),
            http2=config.http2,
            verify=config.verify_ssl,
            transport=transport,
            follow_redirects=False,
        )

    def _deadline(self, call: ChatCall) -> float:
        if self.config.request_timeout_seconds is None:
            return call.deadline
        return min(call.deadline, trio.current_time() + self.config.request_timeout_seconds)

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
        content = self._encode(call)
        try:
            with trio.fail_at(self._deadline(call)):
                response = await self._client.post(
                    self._chat_url, content=content, headers=call.headers or None
                )
        except (httpx2.HTTPError, trio.TooSlowError) as exc:
            raise translate_transport_error(
                exc, self.name, during="waiting for the answer"
            ) from exc
        if response.status_code >= 300:
            raise upstream_status_error(
                self.name,
                response.status_code,
                response.content[:_ERROR_BODY_LIMIT],
                relayed_error_headers(response.headers),
            )
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(
                f"The upstream provider sent an answer that is not JSON "
                f"(connection {self.name!r}).",
                detail=f"{exc}; body starts {response.content[:200]!r}",
                connection=self.name,
            ) from exc
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            raise UpstreamProtocolError(
                f"The upstream provider sent an answer without choices (connection {self.name!r}).",
                detail=f"body starts {response.content[:200]!r}",
                connection=self.name,
            )
        return ChatResult(body=body)

    async def open_chat_stream(self, call: ChatCall) -> ChatStream:
        content = self._encode(call)
        deadline = self._deadline(call)
        request = self._client.build_request(
            "POST", self._chat_url, content=content, headers=call.headers or None
        )
        try:
            with trio.fail_at(deadline):
                response = await self._client.send(request, stream=True)
        except (httpx2.HTTPError, trio.TooSlowError) as exc:
            raise translate_transport_error(exc, self.name, during="opening the stream") from exc
        stream = OpenAIChatStream(self.name, response, deadline)
        try:
            if response.status_code >= 300:
                body = await stream.read_error_body()
                raise upstream_status_error(
                    self.name, response.status_code, body, relayed_error_headers(response.headers)
                )
            ctype = response.headers.get("content-type", "")
            if "text/event-stream" not in ctype:
                body = await stream.read_error_body()
                raise UpstreamProtocolError(
                    f"The upstream provider did not answer with a stream (connection "
                    f"{self.name!r}).",
                    detail=f"content-type {ctype!r}; body starts {body[:200]!r}",
                    connection=self.name,
                )
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await response.aclose()
            raise
        return stream

    async def list_models(self) -> list[JSONObject] | None:
        try:
            with trio.fail_after(self.config.connect_timeout_seconds + 30):
                response = await self._client.get(self._models_url)
        except (httpx2.HTTPError, trio.TooSlowError) as exc:
            raise translate_transport_error(exc, self.name, during="listing models") from exc
        if response.status_code >= 300:
            raise upstream_status_error(
                self.name, response.status_code, response.content[:_ERROR_BODY_LIMIT], {}
            )
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(
                f"The upstream model list is not JSON (connection {self.name!r}).",
                connection=self.name,
            ) from exc
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise UpstreamProtocolError(
                f"The upstream model list has no 'data' array (connection {self.name!r}).",
                connection=self.name,
            )
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def aclose(self) -> None:
        await self._client.aclose()


class OpenAIChatStream:
    """Chunks decoded from an upstream SSE response; owns the response until ``aclose``."""

    def __init__(self, connection: str, response: httpx2.Response, deadline: float) -> None:
        self._connection = connection
        self._response = response
        self._deadline = deadline
        self._decoder = SSEDecoder()
        self._bytes: AsyncIterator[bytes] = response.aiter_bytes()
        self._done = False
        self._finished_choice = False
        self._closed = False

    @property
    def saw_done(self) -> bool:
        """Whether the upstream's ``[DONE]`` has been read."""
        return self._done

    async def read_error_body(self) -> bytes:
        """Read (a bounded amount of) a non-stream answer, e.g. an error body."""
        parts: list[bytes] = []
        size = 0
        try:
            with trio.fail_at(min(self._deadline, trio.current_time() + 30)):
                async for part in self._bytes:
                    parts.append(part)
                    size += len(part)
                    if size >= _ERROR_BODY_LIMIT:
                        break
        except (httpx2.HTTPError, trio.TooSlowError):
            pass  # what was read so far is all the detail there will be
        return b"".join(parts)

    async def receive(self) -> list[JSONObject]:
        while True:
            if self._done:
                return []
            try:
                with trio.fail_at(self._deadline):
                    data = await self._bytes.__anext__()
            except StopAsyncIteration:
                return self._end(self._decoder.close())
            except (httpx2.HTTPError, trio.TooSlowError) as exc:
                raise translate_transport_error(exc, self._connection, during="streaming") from exc
            chunks = self._decode(self._decoder.feed(data))
            if self.saw_done:
                # The end of the chunked body normally arrives with [DONE]; consuming it now,
                # before the client sees [DONE] and sends its next request, returns the
                # connection to the pool in time for that request.
                await self._drain(0.05)
                return chunks
            if chunks:
                return chunks

    async def _drain(self, seconds: float) -> None:
        """Read what is left of the body (after [DONE]) for at most ``seconds``."""
        if self._response.is_closed:  # (is_stream_consumed is set when reading *starts*)
            return
        with trio.move_on_after(seconds), contextlib.suppress(httpx2.HTTPError):
            async for _ in self._bytes:
                pass

    def _end(self, tail: list[Any]) -> list[JSONObject]:
        chunks = self._decode(tail)
        if not self._done and not self._finished_choice:
            raise UpstreamUnreachable(
                f"The upstream provider ended the stream before it finished (connection "
                f"{self._connection!r}).",
                detail="end of body without [DONE] or a finish_reason",
                connection=self._connection,
            )
        self._done = True
        return chunks

    def _decode(self, events: list[Any]) -> list[JSONObject]:
        chunks: list[JSONObject] = []
        for event in events:
            if self._done:
                break  # nothing after [DONE] belongs to the answer
            if event.data == DONE:
                self._done = True
                break
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
            chunks.append(chunk)
        return chunks

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._done:
            # Only the end of the chunked body can be left; reading it lets the pool keep the
            # connection. A server that holds the body open after [DONE] gets it closed.
            await self._drain(0.5)
        await self._response.aclose()


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
