"""Plumbing every HTTP upstream shares: the pooled client, deadlines, error translation, SSE.

A provider supplies URLs, headers, a request body, and two pure pieces from :mod:`lm_gateway.wire`:
a function mapping an error answer to an :class:`~lm_gateway.errors.UpstreamError`, and a
:class:`StreamTranslator` turning the provider's SSE events into OpenAI chunks. This module does
the I/O around them, once for all providers: so cancellation, timeouts and keep-alive behave the
same whatever the upstream speaks.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

import httpx2
import orjson
import trio

from ..config.model import HTTPConnection
from ..errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnreachable
from ..wire.sse import SSEDecoder, SSEEvent
from .base import JSONObject
from .http1 import (
    ConnectFailed,
    ConnectTimedOut,
    HTTP1Client,
    PoolTimedOut,
    ReadTimedOut,
    TransportError,
    WriteTimedOut,
)

#: Upstream headers relayed to the client with an error answer: they tell its SDK when to retry.
_RELAYED_ERROR_HEADERS = ("retry-after", "retry-after-ms")
_RELAYED_ERROR_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
#: How much of an error answer is read: an error body is small; a huge one is not worth reading.
ERROR_BODY_LIMIT = 64 * 1024

ErrorMapper = Callable[[str, int, bytes, dict[str, str]], UpstreamError]


#: Environment variables through which httpx2 would route requests via a proxy.
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


class Headers(Protocol):
    """Response headers: what both clients' header objects offer."""

    def get(self, name: str, /) -> str | None: ...

    def items(self) -> Iterable[tuple[str, str]]: ...


class UpstreamResponse(Protocol):
    """An answer whose head arrived; the body is read on demand."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Headers: ...

    @property
    def is_closed(self) -> bool: ...

    async def read_some(self, deadline: float = math.inf) -> bytes:
        """The next part of the body (``b""`` at its end).

        Raises:
            trio.TooSlowError: ``deadline`` (trio time) passed first.
        """
        ...

    async def read(self, limit: int | None = None) -> bytes: ...

    async def aclose(self) -> None: ...


class _HTTPXResponse:
    """An httpx2 streaming response seen as an :class:`UpstreamResponse`."""

    def __init__(self, response: httpx2.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers: Headers = response.headers
        self._parts: AsyncIterator[bytes] = response.aiter_bytes()

    @property
    def is_closed(self) -> bool:
        return self._response.is_closed

    async def read_some(self, deadline: float = math.inf) -> bytes:
        try:
            with trio.fail_at(deadline):
                return await self._parts.__anext__()
        except StopAsyncIteration:
            return b""

    async def read(self, limit: int | None = None) -> bytes:
        parts: list[bytes] = []
        size = 0
        while part := await self.read_some():
            parts.append(part)
            size += len(part)
            if limit is not None and size >= limit:
                break
        return b"".join(parts)

    async def aclose(self) -> None:
        await self._response.aclose()


def _proxy_configured(environ: os._Environ[str] | dict[str, str]) -> bool:
    return any(environ.get(name) or environ.get(name.upper()) for name in _PROXY_VARIABLES)


def relayed_error_headers(headers: Headers) -> dict[str, str]:
    """The upstream error headers worth passing on (``Retry-After``, rate-limit headers)."""
    out = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname in _RELAYED_ERROR_HEADERS or lname.startswith(_RELAYED_ERROR_PREFIXES):
            out[lname] = value
    return out


def translate_transport_error(exc: BaseException, connection: str, *, during: str) -> UpstreamError:
    """Map a transport (ours or httpx's) or trio timeout exception to our error, for
    ``raise ... from exc``."""
    where = f"connection {connection!r}"
    if isinstance(exc, trio.TooSlowError):
        return UpstreamTimeout(
            f"The upstream provider did not finish in time ({where}, {during}).",
            detail="request deadline passed",
            connection=connection,
        )
    if isinstance(exc, TransportError):
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, PoolTimedOut):
            return UpstreamTimeout(
                f"No upstream connection became free in time ({where}).",
                detail=detail,
                connection=connection,
            )
        if isinstance(exc, ConnectTimedOut):
            return UpstreamTimeout(
                f"The upstream provider timed out ({where}, connecting).",
                detail=detail,
                connection=connection,
            )
        if isinstance(exc, ConnectFailed):
            return UpstreamUnreachable(
                f"The upstream provider is unreachable ({where}).",
                detail=detail,
                connection=connection,
            )
        if isinstance(exc, ReadTimedOut | WriteTimedOut):
            return UpstreamTimeout(
                f"The upstream provider timed out ({where}, {during}).",
                detail=detail,
                connection=connection,
            )
        return UpstreamUnreachable(
            f"The connection to the upstream provider failed ({where}, {during}).",
            detail=detail,
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


class StreamTranslator(Protocol):
    """Pure, stateful: a provider's SSE events in, OpenAI ``chat.completion.chunk`` objects out."""

    #: True once the provider's terminal event (``[DONE]``, ``message_stop``...) was seen.
    done: bool

    def feed(self, event: SSEEvent) -> list[JSONObject]:
        """Translate one event.

        Raises:
            UpstreamError: the event is malformed, or is the provider reporting an error.
        """
        ...

    def finish(self) -> list[JSONObject]:
        """The body ended: any last chunks.

        Raises:
            UpstreamError: the stream ended before the answer was complete.
        """
        ...

    # Optional: ``usage_so_far() -> OpenAI usage | None``, what the provider reported before a
    # failure or a cancellation (so an interrupted stream is still accounted for).


class HTTPUpstream:
    """The pooled HTTP client of one :class:`HTTPConnection`, and the calls every provider makes.

    The client is :class:`~lm_gateway.providers.http1.HTTP1Client` (lean HTTP/1.1), unless the
    connection needs what only httpx2 offers: ``http2 = true``, a proxy from the environment
    (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``), or an injected ``transport``.

    Args:
        config: the connection's settings.
        headers: headers for every request (auth, content type, static extras).
        error_mapper: ``(connection, status, body, relayed_headers) -> UpstreamError``.
        transport: an httpx transport to use instead of the network (tests, embedding).
        environ: where proxy variables are looked up (default ``os.environ``).
    """

    def __init__(
        self,
        config: HTTPConnection,
        headers: dict[str, str],
        error_mapper: ErrorMapper,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.error_mapper = error_mapper
        self.client: HTTP1Client | httpx2.AsyncClient
        lean = (
            transport is None
            and not config.http2
            and not _proxy_configured(os.environ if environ is None else environ)
        )
        if lean:
            verify = config.verify_ssl
            self.client = HTTP1Client(
                headers=headers,
                connect_timeout=config.connect_timeout_seconds,
                read_timeout=config.read_timeout_seconds,
                write_timeout=config.write_timeout_seconds,
                pool_timeout=config.connect_timeout_seconds,
                max_connections=config.max_connections,
                max_keepalive=config.max_keepalive_connections,
                keepalive_expiry=config.keepalive_expiry_seconds,
                ssl_context=lambda: httpx2.create_ssl_context(verify=verify),
            )
            return
        self.client = httpx2.AsyncClient(
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

    def deadline(self, call_deadline: float) -> float:
        """The earlier of the request's deadline and this connection's own limit."""
        if self.config.request_timeout_seconds is None:
            return call_deadline
        return min(call_deadline, trio.current_time() + self.config.request_timeout_seconds)

    async def _send(
        self, method: str, url: str, content: bytes | None, headers: dict[str, str] | None
    ) -> UpstreamResponse:
        """Send and return once the answer's head arrived (the caller closes it).

        Raises:
            TransportError | httpx2.HTTPError: the exchange failed.
        """
        client = self.client
        if isinstance(client, HTTP1Client):
            return await client.send(method, url, headers=headers, content=content)
        request = client.build_request(method, url, content=content, headers=headers or None)
        return _HTTPXResponse(await client.send(request, stream=True))

    async def request_json(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        deadline: float,
        during: str = "waiting for the answer",
    ) -> JSONObject:
        """Send a request and return its JSON object answer.

        Raises:
            UpstreamError: transport failure, timeout, error status (via the error mapper), or
                an answer that is not a JSON object.
        """
        try:
            # A plain scope, not trio.fail_at (a generator-based context manager): this runs
            # once per request.
            with trio.CancelScope(deadline=deadline) as timer:
                response = await self._send(method, url, content, headers)
                try:
                    if response.status_code >= 300:
                        raw = await response.read(ERROR_BODY_LIMIT)
                    else:
                        raw = await response.read()
                finally:
                    await response.aclose()
            if timer.cancelled_caught:
                raise trio.TooSlowError
        except (TransportError, httpx2.HTTPError, trio.TooSlowError) as exc:
            raise translate_transport_error(exc, self.name, during=during) from exc
        if response.status_code >= 300:
            raise self.error_mapper(
                self.name,
                response.status_code,
                raw[:ERROR_BODY_LIMIT],
                relayed_error_headers(response.headers),
            )
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(
                f"The upstream provider sent an answer that is not JSON "
                f"(connection {self.name!r}).",
                detail=f"{exc}; body starts {raw[:200]!r}",
                connection=self.name,
            ) from exc
        if not isinstance(body, dict):
            raise UpstreamProtocolError(
                f"The upstream provider sent an answer that is not a JSON object "
                f"(connection {self.name!r}).",
                detail=f"body starts {raw[:200]!r}",
                connection=self.name,
            )
        return body

    async def open_sse(
        self,
        url: str,
        *,
        content: bytes,
        translator: StreamTranslator,
        headers: dict[str, str] | None = None,
        deadline: float,
    ) -> SSEChatStream:
        """POST and return the open event stream, once the upstream accepted it (2xx, SSE).

        Resource handling: the caller owns the returned stream and must ``aclose()`` it; on
        failure nothing stays open.

        Raises:
            UpstreamError: transport failure, timeout, error status, or a non-SSE answer.
        """
        try:
            with trio.CancelScope(deadline=deadline) as timer:
                response = await self._send("POST", url, content, headers)
            if timer.cancelled_caught:
                raise trio.TooSlowError
        except (TransportError, httpx2.HTTPError, trio.TooSlowError) as exc:
            raise translate_transport_error(exc, self.name, during="opening the stream") from exc
        stream = SSEChatStream(self.name, response, deadline, translator)
        try:
            if response.status_code >= 300:
                body = await stream.read_limited()
                raise self.error_mapper(
                    self.name, response.status_code, body, relayed_error_headers(response.headers)
                )
            ctype = response.headers.get("content-type") or ""
            if "text/event-stream" not in ctype:
                body = await stream.read_limited()
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

    async def aclose(self) -> None:
        await self.client.aclose()


class SSEChatStream:
    """OpenAI chunks from an upstream SSE answer; owns the response until ``aclose``.

    Each ``receive()`` reads from the socket until the translator produced chunks (so a burst
    of events becomes one batch) or the stream ended.
    """

    def __init__(
        self,
        connection: str,
        response: UpstreamResponse,
        deadline: float,
        translator: StreamTranslator,
    ) -> None:
        self._connection = connection
        self._response = response
        self._deadline = deadline
        self._translator = translator
        self._decoder = SSEDecoder()
        self._ended = False
        self._closed = False
        self._pending_error: UpstreamError | None = None

    async def read_limited(self) -> bytes:
        """Read (a bounded amount of) a non-stream answer, e.g. an error body."""
        parts: list[bytes] = []
        size = 0
        try:
            with trio.fail_at(min(self._deadline, trio.current_time() + 30)):
                while part := await self._response.read_some():
                    parts.append(part)
                    size += len(part)
                    if size >= ERROR_BODY_LIMIT:
                        break
        except (TransportError, httpx2.HTTPError, trio.TooSlowError):
            pass  # what was read so far is all the detail there will be
        return b"".join(parts)

    @property
    def partial_usage(self) -> JSONObject | None:
        """OpenAI-shaped usage reported so far (for a stream that failed or was cancelled)."""
        usage_so_far = getattr(self._translator, "usage_so_far", None)
        return usage_so_far() if callable(usage_so_far) else None

    def _translate(self, events: list[SSEEvent]) -> list[JSONObject]:
        chunks: list[JSONObject] = []
        translator = self._translator
        for event in events:
            if translator.done:
                break  # nothing after the terminal event belongs to the answer
            try:
                chunks.extend(translator.feed(event))
            except UpstreamError as error:
                if not chunks:
                    raise
                # Chunks that came in the same read as the error still go out first.
                self._pending_error = error
                break
        return chunks

    async def receive(self) -> list[JSONObject]:
        while True:
            if self._pending_error is not None:
                error, self._pending_error = self._pending_error, None
                self._ended = True
                raise error
            if self._ended:
                return []
            try:
                data = await self._response.read_some(self._deadline)
            except (TransportError, httpx2.HTTPError, trio.TooSlowError) as exc:
                raise translate_transport_error(exc, self._connection, during="streaming") from exc
            if not data:
                self._ended = True
                chunks = self._translate(self._decoder.close())
                return chunks + self._translator.finish()
            chunks = self._translate(self._decoder.feed(data))
            if self._translator.done:
                self._ended = True
                # The end of the body normally arrives with the terminal event; consuming it
                # now, before the client sees the end and sends its next request, returns the
                # connection to the pool in time for that request.
                await self._drain(0.05)
                return chunks + self._translator.finish()
            if chunks:
                return chunks

    async def _drain(self, seconds: float) -> None:
        """Read what is left of the body (after the terminal event) for at most ``seconds``."""
        if self._response.is_closed:  # (is_stream_consumed is set when reading *starts*)
            return
        with (
            trio.move_on_after(seconds),
            contextlib.suppress(TransportError, httpx2.HTTPError),
        ):
            while await self._response.read_some():
                pass

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._translator.done:
            # Only the end of the body can be left; reading it lets the pool keep the
            # connection. A server that holds the body open after its last event gets it closed.
            await self._drain(0.5)
        await self._response.aclose()
