"""The HTTP edge: a Quart blueprint serving the gateway, and the QuartTrio app around it.

Routes adapt Quart requests to :class:`~lm_gateway.service.IncomingRequest` and the service's
replies to Quart responses; all decisions live in :mod:`lm_gateway.service`.

Request ownership: :class:`RequestScopeMixin` wraps Quart-Trio's per-request ASGI handler in
:func:`~lm_gateway.service.open_request_scope`, so everything a request opens (an upstream
stream, a task feeding it) is closed when the request ends, even in the gap between the route
returning a streaming response and Quart starting to send it, where a client disconnect would
otherwise skip the response body's cleanup. :func:`create_app` uses it; :func:`blueprint`
installs it into the host app when registered.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Mapping
from typing import Any, cast

import attrs
import orjson
import trio
from hypercorn.typing import HTTPScope
from quart import Blueprint, Quart, Response, current_app, request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ..auth import extract_api_key
from ..config import Config, build_config, load_config
from ..errors import (
    AuthenticationFailed,
    GatewayError,
    HTTPStatusError,
    InternalError,
    NotFound,
    RequestTooLarge,
)
from ..service import (
    Gateway,
    IncomingRequest,
    Reply,
    RequestScope,
    StreamReply,
    open_request_scope,
)
from .fast import Endpoint, FastRoutes, error_reply

log = logging.getLogger("lm_gateway")

#: Where the request scope travels in the ASGI scope dict.
SCOPE_KEY = "lm_gateway.request_scope"


class RequestScopeMixin:
    """Mixin for Quart-Trio's ASGI HTTP connection class; see the module docstring."""

    scope: HTTPScope

    async def __call__(self, receive: Any, send: Any) -> None:
        async with open_request_scope() as request_scope:
            cast(dict[str, Any], self.scope)[SCOPE_KEY] = request_scope
            await super().__call__(receive, send)  # type: ignore[misc]


class GatewayHTTPConnection(RequestScopeMixin, TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection handler with a per-request scope."""


def install_request_scope(app: Quart) -> None:
    """Make ``app`` open a request scope around each HTTP request (idempotent).

    Raises:
        TypeError: ``app`` is not a QuartTrio app (the gateway needs trio).
    """
    if not isinstance(app, QuartTrio):
        raise TypeError(
            f"lm-gateway needs a QuartTrio app (trio), not {type(app).__name__}; "
            "create the app with quart_trio.QuartTrio"
        )
    current = app.asgi_http_class
    if isinstance(current, type) and issubclass(current, RequestScopeMixin):
        return
    app.asgi_http_class = type(  # type: ignore[assignment]
        "GatewayHTTPConnection", (RequestScopeMixin, current), {}
    )


def _from_http_exception(error: HTTPException) -> GatewayError:
    """The gateway error for an exception the framework raised."""
    status = error.code or 500
    if status == 404:
        return NotFound(
            f"Unknown request URL: {request.method} {request.path}.", code="unknown_url"
        )
    if status == 405:
        return HTTPStatusError(
            f"The method {request.method} is not allowed for {request.path}.",
            status=405,
            code="method_not_allowed",
        )
    if status == 413:
        return RequestTooLarge("The request body is too large.")
    if status >= 500:
        return InternalError(error.description or "HTTP error", detail=error.name)
    return HTTPStatusError(
        error.description or error.name, status=status, code=error.name.lower().replace(" ", "_")
    )


def _error_response(error: GatewayError, debug: bool) -> Response:
    return Response(
        orjson.dumps(error.to_body(debug=debug)),
        status=error.http_status,
        headers=error.headers,
        content_type="application/json",
    )


def _to_response(reply: Reply | StreamReply) -> Response:
    if isinstance(reply, StreamReply):
        response = Response(reply.body, status=reply.status, headers=reply.headers)
        # Quart cuts responses after RESPONSE_TIMEOUT (60 s by default); streams have their own
        # deadline (request_timeout_seconds) enforced by the service.
        response.timeout = None
        return response
    response = Response(
        reply.body, status=reply.status, headers=reply.headers, content_type=reply.content_type
    )
    response.timeout = None
    return response


def shutdown_seconds(gateway: Gateway) -> float:
    """How long a graceful shutdown may take the gateway's background work (log flush)."""
    return gateway.config.log_flush_seconds + 10.0


def blueprint(
    config: ConfigSource = None, *, name: str = "lm_gateway", debug: bool | None = None
) -> Blueprint:
    """A Quart blueprint serving the gateway, to mount in a QuartTrio app.

    Routes (relative to the blueprint's ``url_prefix``): ``POST {api_prefix}/chat/completions``,
    ``GET {api_prefix}/models``, ``GET {api_prefix}/models/<id>``, ``GET /health``, and
    ``GET {metrics_path}`` (Prometheus; unless ``metrics = false``).

    With ``metrics_port`` set, metrics are answered only on that port and the API only on the
    others (the port is read from the ASGI scope's ``server``).

    The gateway's connection pools are opened with the app and closed when it stops serving
    (``before_app_serving``/``after_app_serving``). Registering the blueprint makes the app open
    a request scope per HTTP request (see :func:`install_request_scope`).

    Args:
        config: anything :func:`create_app` accepts.
        name: the blueprint name (give two gateways in one app different names).
        debug: override the config's ``debug``.

    Raises:
        ConfigError: the config is invalid or references an extension that cannot be loaded.
    """
    gateway = as_gateway(config, debug=debug)
    bp = Blueprint(name, __name__)
    prefix = gateway.config.api_prefix
    debug = gateway.debug
    max_body = gateway.config.max_request_body_bytes
    metrics_port = gateway.config.metrics_port

    def on_register(state: Any) -> None:
        app = cast(Quart, state.app)
        install_request_scope(app)
        # Quart cancels background tasks this long after shutdown starts; the loggers' flush
        # must fit (lm-gateway's own app sets it too; a host app's longer value is kept).
        needed = shutdown_seconds(gateway)
        current = app.config.get("BACKGROUND_TASK_SHUTDOWN_TIMEOUT")
        if current is not None and current < needed:
            app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = needed

    bp.record_once(on_register)

    @bp.before_app_serving
    async def _start() -> None:
        for warning in gateway.warnings():
            log.warning("config: %s", warning)
        app = cast(QuartTrio, current_app)
        await app.nursery.start(gateway.serve_background)

    @bp.after_app_serving
    async def _stop() -> None:
        await gateway.aclose()

    def on_metrics_port(scope: Mapping[str, Any]) -> bool:
        server = scope.get("server")
        return server is not None and server[1] == metrics_port

    async def incoming() -> IncomingRequest:
        scope = cast(dict[str, Any], request.scope)
        if metrics_port is not None and on_metrics_port(scope):
            raise NotFound(
                f"Unknown request URL: {request.method} {request.path} (this port serves "
                "metrics only).",
                code="unknown_url",
            )
        client = scope.get("client")
        if request.content_length is not None and request.content_length > max_body:
            raise RequestTooLarge(f"The request body is larger than the limit of {max_body} bytes.")
        try:
            body = await request.get_data(cache=False)
        except RequestEntityTooLarge as exc:
            raise RequestTooLarge(
                f"The request body is larger than the limit of {max_body} bytes."
            ) from exc
        except HTTPException as exc:  # 408 when the body does not arrive in time, ...
            raise _from_http_exception(exc) from exc
        return IncomingRequest(
            method=scope["method"],
            path=scope["path"],
            headers={k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            body=body if isinstance(body, bytes) else body.encode(),
            client_addr=client[0] if client else None,
        )

    def request_scope() -> RequestScope:
        scope = request.scope.get(SCOPE_KEY)
        if not isinstance(scope, RequestScope):
            raise InternalError(
                "The gateway blueprint is mounted in an app without a request scope.",
                detail="register the blueprint with app.register_blueprint() on a QuartTrio app",
            )
        return scope

    async def answer(endpoint: Endpoint, *, anthropic: bool = False) -> Response:
        """Serve the current request with ``endpoint``; a failure before the service took
        over (an oversized or unreadable body) in the endpoint's error shape."""
        try:
            reply = await endpoint(await incoming(), request_scope())
        except GatewayError as error:
            return _to_response(error_reply(error, debug, anthropic=anthropic))
        return _to_response(reply)

    @bp.post(f"{prefix}/chat/completions")
    async def chat_completions() -> Response:
        return await answer(gateway.chat_completions)

    @bp.post(f"{prefix}/messages")
    async def messages() -> Response:
        return await answer(gateway.messages, anthropic=True)

    @bp.post(f"{prefix}/messages/count_tokens")
    async def count_tokens() -> Response:
        return await answer(gateway.count_tokens, anthropic=True)

    @bp.post(f"{prefix}/embeddings")
    async def embeddings() -> Response:
        return await answer(gateway.embeddings)

    @bp.post(f"{prefix}/completions")
    async def completions() -> Response:
        return await answer(gateway.completions)

    @bp.get(f"{prefix}/models")
    async def list_models() -> Response:
        return await answer(lambda req, _scope: gateway.list_models(req))

    @bp.get(f"{prefix}/models/<path:model_id>")
    async def retrieve_model(model_id: str) -> Response:
        return await answer(lambda req, _scope: gateway.retrieve_model(req, model_id))

    @bp.get("/health")
    async def health() -> Response:
        return _to_response(await gateway.health(await incoming()))

    metrics = gateway.metrics
    if metrics is not None:
        expected = gateway.config.metrics_api_key
        expected_bytes = expected.encode() if expected else None

        @bp.get(gateway.config.metrics_path)
        async def prometheus_metrics() -> Response:
            scope = cast(dict[str, Any], request.scope)
            if metrics_port is not None and not on_metrics_port(scope):
                return _error_response(
                    NotFound(
                        f"Unknown request URL: GET {request.path} (metrics are served on port "
                        f"{metrics_port}).",
                        code="unknown_url",
                    ),
                    debug,
                )
            if expected_bytes is not None:
                given = extract_api_key(
                    {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                )
                if given is None or not hmac.compare_digest(
                    given.encode("utf-8", "surrogateescape"), expected_bytes
                ):
                    return _error_response(
                        AuthenticationFailed(
                            "Metrics need 'Authorization: Bearer <metrics_api_key>'."
                        ),
                        debug,
                    )
            # Rendering reads every series (and, with --workers, every worker's files).
            body, content_type = await trio.to_thread.run_sync(metrics.render)
            return Response(body, status=200, content_type=content_type)

    bp.gateway = gateway  # type: ignore[attr-defined]
    return bp


class GatewayApp(QuartTrio):
    """The QuartTrio app :func:`create_app` returns; ``app.gateway`` is its :class:`Gateway`.

    The gateway's API routes are served by :class:`~lm_gateway.server.fast.FastRoutes` straight
    from ASGI, unless the app has request hooks (which only Quart's path runs); everything else
    goes through Quart. Middleware wrapping ``app.asgi_app`` still sees every request.
    """

    asgi_http_class = GatewayHTTPConnection
    gateway: Gateway
    #: Built on the first HTTP request, when the app's hooks are settled; False: all via Quart.
    _fast_routes: FastRoutes | bool | None = None

    def _has_request_hooks(self) -> bool:
        hooks = (self.before_request_funcs, self.after_request_funcs, self.teardown_request_funcs)
        return any(funcs for table in hooks for funcs in table.values())

    async def asgi_app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            fast = self._fast_routes
            if fast is None:
                fast = self._fast_routes = (
                    False
                    if self._has_request_hooks()
                    else FastRoutes(self.gateway, body_timeout_seconds=self.config["BODY_TIMEOUT"])
                )
            if fast is not False:
                assert isinstance(fast, FastRoutes)
                route = fast.match(scope)
                if route is not None:
                    await fast.serve(route, scope, receive, send)
                    return
        await super().asgi_app(scope, receive, send)


ConfigSource = Config | Gateway | str | os.PathLike[str] | Mapping[str, Any] | None


def as_gateway(config: ConfigSource, *, debug: bool | None = None) -> Gateway:
    """A Gateway from a Config, a config file path, plain config data, or None (the embedded
    default). ``debug`` overrides the config's setting.

    Raises:
        ConfigError: the config is invalid or references an extension that cannot be loaded.
    """
    if isinstance(config, Gateway):
        if debug is not None:
            config.debug = debug
        return config
    if isinstance(config, Mapping):
        config = build_config(config, environ=os.environ)
    elif not isinstance(config, Config):
        config = load_config(config)
    if debug is not None:
        config = attrs.evolve(config, debug=debug)
    return Gateway(config)


def create_app(config: ConfigSource = None, *, debug: bool | None = None) -> GatewayApp:
    """A QuartTrio app serving one gateway at the root (``/v1/...``, ``/health``).

    Args:
        config: a Config, a path to a config file, plain config data (a dict in lm-proxy's
            format), a ready Gateway, or None for the embedded default (echo model).
        debug: override the config's ``debug``.

    Errors the framework itself produces (unknown path, wrong method, a crash outside the
    service) are answered in the OpenAI error shape too.

    Raises:
        ConfigError: the config is invalid or references an extension that cannot be loaded.
    """
    gateway = as_gateway(config, debug=debug)
    app = GatewayApp("lm_gateway", static_folder=None)
    app.gateway = gateway
    app.config["MAX_CONTENT_LENGTH"] = gateway.config.max_request_body_bytes
    # Our replies set their own timeouts; the service enforces request_timeout_seconds.
    app.config["RESPONSE_TIMEOUT"] = None
    app.register_blueprint(blueprint(gateway))
    debug = gateway.debug

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        response = _error_response(_from_http_exception(error), debug)
        response.status_code = error.code or 500
        return response

    @app.errorhandler(Exception)
    async def _crash(error: Exception) -> Response:
        log.exception("unhandled error", exc_info=error)
        return _error_response(
            InternalError(
                "The gateway failed to process the request.",
                detail=f"{type(error).__name__}: {error}",
            ),
            debug,
        )

    return app
