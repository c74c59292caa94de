"""The gateway's own API routes served straight from ASGI, without Quart's request machinery.

Why: per request, Quart builds a werkzeug-style ``Request`` and ``Response``, pushes request and
app contexts, runs hook chains and dispatches through a URL map. On one core that costs about
as much as everything the gateway itself does for a request (``doc/benchmarks.md``). The
service layer (:mod:`lm_gateway.service`) knows nothing of Quart, so :class:`FastRoutes` can
hand it the ASGI request directly: one dict lookup to find the route, the body read from
``receive``, the reply written to ``send``.

What stays with Quart: everything :meth:`FastRoutes.match` does not claim — unknown paths,
other methods, ``/v1/models/<id>``, the metrics route, requests on ``metrics_port``, an app
mounted under a ``root_path`` — and every app that added request hooks (``before_request``,
``after_request``, ``teardown_request``), whose requests must run them. The blueprint
(:func:`~lm_gateway.server.app.blueprint`) for host apps is unchanged: it always goes through
Quart.

The contract is the Quart path's, observable on the wire: same status, headers, body, error
shape per endpoint (OpenAI's, or Anthropic's for the Messages routes), and the same request
ownership — everything a request opens lives in its :func:`~lm_gateway.service.open_request_scope`,
and a client that disconnects cancels its request at once, before or after the first byte. On
our own server (:mod:`.edge`) the server cancels it (the ``CANCEL_ON_DISCONNECT`` extension);
on any other, a task per request waits for ``http.disconnect``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
import orjson
import trio

from ..errors import GatewayError, HTTPStatusError, InternalError, RequestTooLarge
from ..service import (
    Gateway,
    IncomingRequest,
    Reply,
    RequestScope,
    StreamReply,
    anthropic_errors,
    open_request_scope,
)
from .edge import CANCEL_ON_DISCONNECT

log = logging.getLogger("lm_gateway")

Endpoint = Callable[[IncomingRequest, RequestScope], Awaitable[Reply | StreamReply]]
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


def error_reply(
    error: GatewayError, debug: bool, *, anthropic: bool = False
) -> Reply | StreamReply:
    """``error`` as a reply in OpenAI's error shape, or (``anthropic``) Anthropic's."""
    reply = Reply(error.http_status, orjson.dumps(error.to_body(debug=debug)), dict(error.headers))
    return anthropic_errors(reply) if anthropic else reply


@attrs.frozen
class Route:
    """One fast route: the service endpoint, and whether its errors take Anthropic's shape."""

    endpoint: Endpoint
    anthropic: bool = False


def _encode_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    # latin-1, as HTTP/1.1 and werkzeug encode header values.
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


class FastRoutes:
    """Serves the gateway's API routes from ASGI; see the module docstring.

    Args:
        gateway: the gateway whose service endpoints answer.
        body_timeout_seconds: how long a request body may take to arrive (Quart's
            ``BODY_TIMEOUT``); None waits forever. Past it the answer is 408.
    """

    def __init__(self, gateway: Gateway, *, body_timeout_seconds: float | None) -> None:
        self._gateway = gateway
        self._debug = gateway.debug
        self._max_body = gateway.config.max_request_body_bytes
        self._body_timeout = body_timeout_seconds
        self._metrics_port = gateway.config.metrics_port
        prefix = gateway.config.api_prefix

        async def list_models(
            request: IncomingRequest, _scope: RequestScope
        ) -> Reply | StreamReply:
            return await gateway.list_models(request)

        async def health(request: IncomingRequest, _scope: RequestScope) -> Reply:
            return await gateway.health(request)

        self._routes: dict[tuple[str, str], Route] = {
            ("POST", f"{prefix}/chat/completions"): Route(gateway.chat_completions),
            ("POST", f"{prefix}/messages"): Route(gateway.messages, anthropic=True),
            ("POST", f"{prefix}/messages/count_tokens"): Route(
                gateway.count_tokens, anthropic=True
            ),
            ("POST", f"{prefix}/embeddings"): Route(gateway.embeddings),
            ("POST", f"{prefix}/completions"): Route(gateway.completions),
            ("GET", f"{prefix}/models"): Route(list_models),
            ("GET", "/health"): Route(health),
        }

    def match(self, scope: dict[str, Any]) -> Route | None:
        """The route serving this HTTP scope, or None to leave it to Quart."""
        route = self._routes.get((scope["method"], scope["path"]))
        if route is None or scope.get("root_path"):
            return None
        if self._metrics_port is not None:
            server = scope.get("server")
            if server is not None and server[1] == self._metrics_port:
                return None  # the metrics port refuses the API; Quart answers that
        return route

    async def serve(
        self, route: Route, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
    ) -> None:
        """Answer one request.

        Cancellation: a ``http.disconnect`` from the client cancels the endpoint (and so its
        upstream call) at once; the request scope closes whatever the request opened.
        """
        async with open_request_scope() as request_scope:
            try:
                body = await self._read_body(scope, receive)
            except GatewayError as error:
                await self._send(send, self._error_reply(error, route))
                return
            if body is None:
                return  # the client left before its body arrived: nobody to answer
            client = scope.get("client")
            request = IncomingRequest(
                method=scope["method"],
                path=scope["path"],
                headers={k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
                body=body,
                client_addr=client[0] if client else None,
            )
            with trio.CancelScope() as cancel_on_disconnect:
                server_watch = (scope.get("extensions") or {}).get(CANCEL_ON_DISCONNECT)
                if server_watch is not None:
                    server_watch["register"](cancel_on_disconnect)  # our own server: no task
                else:
                    request_scope.nursery.start_soon(
                        _watch_disconnect, receive, cancel_on_disconnect
                    )
                try:
                    reply = await route.endpoint(request, request_scope)
                except GatewayError as error:
                    reply = self._error_reply(error, route)
                except Exception as exc:  # the crash handler of the Quart path, in ASGI
                    log.exception("unhandled error", exc_info=exc)
                    reply = self._error_reply(
                        InternalError(
                            "The gateway failed to process the request.",
                            detail=f"{type(exc).__name__}: {exc}",
                        ),
                        route,
                    )
                await self._send(send, reply)

    async def _read_body(self, scope: dict[str, Any], receive: ASGIReceive) -> bytes | None:
        """The whole request body; None if the client disconnected first.

        Raises:
            RequestTooLarge: the body is (announced or found) larger than the limit.
            HTTPStatusError: 408, the body did not arrive within the body timeout.
        """
        limit = self._max_body
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    break  # the HTTP server already refuses a malformed length
                if announced > limit:
                    raise RequestTooLarge(
                        f"The request body is larger than the limit of {limit} bytes."
                    )
                break
        parts: list[bytes] = []
        size = 0
        with trio.move_on_after(
            self._body_timeout if self._body_timeout is not None else float("inf")
        ):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                part = message.get("body", b"")
                if part:
                    size += len(part)
                    if size > limit:
                        raise RequestTooLarge(
                            f"The request body is larger than the limit of {limit} bytes."
                        )
                    parts.append(part)
                if not message.get("more_body", False):
                    return parts[0] if len(parts) == 1 else b"".join(parts)
        raise HTTPStatusError(
            "The request body did not arrive in time.", status=408, code="request_timeout"
        )

    def _error_reply(self, error: GatewayError, route: Route) -> Reply | StreamReply:
        return error_reply(error, self._debug, anthropic=route.anthropic)

    @classmethod
    async def _send(cls, send: ASGISend, reply: Reply | StreamReply) -> None:
        if isinstance(reply, StreamReply):
            await cls._send_stream(send, reply)
        else:
            await cls._send_whole(send, reply)

    @staticmethod
    async def _send_whole(send: ASGISend, reply: Reply) -> None:
        headers = [
            (b"content-type", reply.content_type.encode("latin-1")),
            (b"content-length", str(len(reply.body)).encode()),
        ]
        headers.extend(_encode_headers(reply.headers.items()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body, "more_body": False})

    @staticmethod
    async def _send_stream(send: ASGISend, reply: StreamReply) -> None:
        # The relay is entered before anything is sent, so it is closed (upstream released,
        # request accounted for) however sending ends.
        async with reply.body as body:
            await send(
                {
                    "type": "http.response.start",
                    "status": reply.status,
                    "headers": _encode_headers(reply.headers.items()),
                }
            )
            async for data in body:
                await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _watch_disconnect(receive: ASGIReceive, cancel_scope: trio.CancelScope) -> None:
    """Cancel ``cancel_scope`` when the client disconnects (runs until then, or cancelled)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel_scope.cancel()
            return
