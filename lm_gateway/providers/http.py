"""Plumbing every HTTP upstream shares: the pooled client, deadlines, error translation, SSE.

A provider supplies URLs, headers, a request body, and two pure pieces from :mod:`lm_gateway.wire`:
a function mapping an error answer to an :class:`~lm_gateway.errors.UpstreamError`, and a
:class:`StreamTranslator` turning the provider's SSE events into OpenAI chunks. This module does
the I/O around them, once for all providers: so cancellation, timeouts and keep-alive behave the
same whatever the upstream speaks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import httpx2
import orjson
import trio

from ..config.model import HTTPConnection
from ..errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnreachable
from ..wire.sse import SSEDecoder, SSEEvent
from .base import JSONObject

#: Upstream headers relayed to the client with an error answer: they tell its SDK when to retry.
_RELAYED_ERROR_HEADERS = ("retry-after", "retry-after-ms")
_RELAYED_ERROR_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
#: How much of an error answer is read: an error body is small; a huge one is not worth reading.
ERROR_BODY_LIMIT = 64 * 1024

ErrorMapper = Callable[[str, int, bytes, dict[str, str]], UpstreamError]


def relayed_error_headers(headers: httpx2.Headers) -> dict[str, str]:
    """The upstream error headers worth passing on (``Retry-After``, rate-limit headers)."""
    out = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname in _RELAYED_ERROR_HEADERS or lname.startswith(_RELAYED_ERROR_PREFIXES):
            out[lname] = value
    return out


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
    """One pooled ``httpx2.AsyncClient`` configured from an :class:`HTTPConnection`.

    Args:
        config: the connection's settings.
        headers: headers for every request (auth, content type, static extras).
        error_mapper: ``(connection, status, body, relayed_headers) -> UpstreamError``.
        transport: an httpx transport to use instead of the network (tests, embedding).
    """

    def __init__(
        self,
        config: HTTPConnection,
        headers: dict[str, str],
        error_mapper: ErrorMapper,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.error_mapper = error_mapper
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
            with trio.fail_at(deadline):
                response = await self.client.request(
                    method, url, content=content, headers=headers or None
                )
        except (httpx2.HTTPError, trio.TooSlowError) as exc:
            raise translate_transport_error(exc, self.name, during=during) from exc
        if response.status_code >= 300:
            raise self.error_mapper(
                self.name,
                response.status_code,
                response.content[:ERROR_BODY_LIMIT],
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
        if not isinstance(body, dict):
            raise UpstreamProtocolError(
                f"The upstream provider sent an answer that is not a JSON object "
                f"(connection {self.name!r}).",
                detail=f"body starts {response.content[:200]!r}",
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
        request = self.client.build_request("POST", url, content=content, headers=headers or None)
        try:
            with trio.fail_at(deadline):
                response = await self.client.send(request, stream=True)
        except (httpx2.HTTPError, trio.TooSlowError) as exc:
            raise translate_transport_error(exc, self.name, during="opening the stream") from exc
        stream = SSEChatStream(self.name, response, deadline, translator)
        try:
            if response.status_code >= 300:
                body = await stream.read_limited()
                raise self.error_mapper(
                    self.name, response.status_code, body, relayed_error_headers(response.headers)
                )
            ctype = response.headers.get("content-type", "")
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
        response: httpx2.Response,
        deadline: float,
        translator: StreamTranslator,
    ) -> None:
        self._connection = connection
        self._response = response
        self._deadline = deadline
        self._translator = translator
        self._decoder = SSEDecoder()
        self._bytes: AsyncIterator[bytes] = response.aiter_bytes()
        self._ended = False
        self._closed = False
        self._pending_error: UpstreamError | None = None

    async def read_limited(self) -> bytes:
        """Read (a bounded amount of) a non-stream answer, e.g. an error body."""
        parts: list[bytes] = []
        size = 0
        try:
            with trio.fail_at(min(self._deadline, trio.current_time() + 30)):
                async for part in self._bytes:
                    parts.append(part)
                    size += len(part)
                    if size >= ERROR_BODY_LIMIT:
                        break
        except (httpx2.HTTPError, trio.TooSlowError):
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
                with trio.fail_at(self._deadline):
                    data = await self._bytes.__anext__()
            except StopAsyncIteration:
                self._ended = True
                chunks = self._translate(self._decoder.close())
                return chunks + self._translator.finish()
            except (httpx2.HTTPError, trio.TooSlowError) as exc:
                raise translate_transport_error(exc, self._connection, during="streaming") from exc
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
        with trio.move_on_after(seconds), contextlib.suppress(httpx2.HTTPError):
            async for _ in self._bytes:
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
