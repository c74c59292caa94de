"""One request's life, independent of the web framework.

``Gateway`` holds everything built from a config (router, key check, groups, connections) and
serves requests described by :class:`IncomingRequest`, answering with a :class:`Reply` (a whole
body) or a :class:`StreamReply` (an SSE body). The HTTP edge (:mod:`lm_gateway.server`) only
adapts Quart's request and response objects to these.

The order of steps for a chat completion::

    enabled? -> authenticate (401) -> parse + validate body (400) -> route (404)
      -> group may use connection/model (403) -> connection call -> answer

Authentication comes before parsing (DESIGN.md had it the other way round): an unauthenticated
caller learns nothing about the body format, and junk costs no JSON parsing.

Streaming: the handler pulls the upstream's first chunk *before* the response starts, so an
upstream refusal is answered with its real HTTP status; once the first byte went out, a failure
becomes a final SSE ``{"error": ...}`` event and the stream ends (no ``[DONE]``).

Cancellation: when the client leaves, the edge cancels the request's scope. A non-streaming
call is cancelled inside ``await connection.chat()``, which closes its upstream connection; a
stream is closed by :meth:`SSERelay.aclose`, which both the response body and the request scope
call (whichever comes first). Either way the record's outcome is ``cancelled``.
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

import attrs
import orjson
import trio

from .auth import (
    AllowAll,
    ConfigKeyCheck,
    KeyCheckResult,
    api_key_id,
    client_ip,
    extract_api_key,
    normalize_check_result,
)
from .config.model import Config, ConnectionConfig, ExtensionRef, Group, StrategyConnection
from .config.resolve import resolve_extension
from .context import Outcome, RequestContext
from .errors import (
    AuthenticationFailed,
    ConfigError,
    GatewayError,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    NotSupported,
    PermissionDenied,
    RequestRejected,
    ServiceDisabled,
    UpstreamError,
)
from .observability import RecordSink
from .observability.cost import DEFAULT_PRICES, Price, PriceTable
from .observability.loggers import BaseLogger, CallableLogger, LoggerRunner, logger_name
from .observability.metrics import GatewayMetrics
from .providers import ChatCall, ChatResult, ChatStream, Connection, build_connection, close_quietly
from .providers.fanout import fan_out_chat, fan_out_stream, has_native_n
from .routing import Route, Router, allowed_model, is_pattern
from .strategies import StrategyProvider, guard
from .wire.anthropic import translate_usage
from .wire.anthropic_inbound import (
    ANTHROPIC_ERROR_TYPES,
    PING,
    MessageStreamEncoder,
    PassthroughEncoder,
    anthropic_error_body,
    estimate_input_tokens,
    messages_to_openai,
    openai_to_message,
)
from .wire.openai import (
    StreamAccumulator,
    StreamTally,
    parse_json_object,
    validate_chat_request,
    validate_completions_request,
    validate_embeddings_request,
    wants_stream_usage,
)
from .wire.sse import DONE_EVENT

log = logging.getLogger("lm_gateway")

JSON_TYPE = "application/json"
SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    # Proxies must pass events through as they come.
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
#: On shutdown, time for delivering the last records on top of ``log_flush_seconds``.
_SHUTDOWN_MARGIN_SECONDS = 5.0
#: Upstream model lists are re-fetched after this long when fetching failed.
_MODEL_LIST_FAILURE_TTL = 10.0

KeyCheck = Callable[[str], Any]

#: Request ids correlate logs, records and headers; they are not secrets, so they come from a
#: fast PRNG (seeded from the OS) instead of ``secrets``, whose ``os.urandom`` call per
#: request showed in profiles (1.5% of the event loop at concurrency 64).
_request_ids = random.Random(secrets.randbits(128))


def new_request_id() -> str:
    """A 16-hex-digit request id."""
    return f"{_request_ids.getrandbits(64):016x}"


@attrs.define
class IncomingRequest:
    """A request as the service sees it. ``headers`` maps lower-case names to values."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes = b""
    client_addr: str | None = None
    request_id: str = attrs.field(factory=new_request_id)


@attrs.define
class Reply:
    """A whole answer."""

    status: int
    body: bytes
    headers: dict[str, str] = attrs.field(factory=dict)
    content_type: str = JSON_TYPE


@attrs.define
class StreamReply:
    """A streaming answer; ``body`` is an async iterator of SSE bytes that must be closed."""

    body: SSERelay
    status: int = 200
    headers: dict[str, str] = attrs.field(factory=lambda: dict(SSE_HEADERS))


@attrs.frozen
class Handler:
    """A resolved before-handler and how to call it."""

    call: Callable[[RequestContext], Any]
    is_async: bool
    inline: bool
    where: str


def _rejection_from(exc: Exception) -> GatewayError | None:
    """lm-proxy's ``OpenAIHTTPException`` and HTTP exceptions with a ``status_code`` (FastAPI's)
    as our error; None for anything else."""
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int) or not 400 <= status < 600:
        return None
    message = getattr(exc, "message", None) or getattr(exc, "detail", None) or str(exc)
    if isinstance(message, dict):
        message = message.get("message") or str(message)
    headers = getattr(exc, "headers", None)
    return RequestRejected(
        str(message) or f"Request refused (HTTP {status}).",
        status=status,
        error_type=getattr(exc, "error_type", None) or getattr(exc, "type", None),
        code=getattr(exc, "code", None),
        headers=headers if isinstance(headers, dict) else None,
    )


class RequestScope:
    """Resources and tasks owned by one HTTP request.

    The edge opens it around the whole request (including sending the response body) with
    :func:`open_request_scope`; anything registered with :meth:`add_closer` is closed, and every
    task in :attr:`nursery` cancelled, when the request ends for any reason.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def add_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run ``closer()`` when the request ends (it must be idempotent and shield-safe)."""
        self._closers.append(closer)

    async def _close_all(self) -> None:
        if not self._closers:
            return  # most requests (no stream) register none: no scopes to open
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            while self._closers:
                closer = self._closers.pop()
                try:
                    await closer()
                except Exception:
                    log.exception("closing a request resource failed")


def open_request_scope() -> _RequestScopeManager:
    """A :class:`RequestScope` whose tasks and resources do not outlive the ``async with``."""
    return _RequestScopeManager()


class _RequestScopeManager:
    """What :func:`open_request_scope` returns: on exit, the scope's nursery is cancelled and
    its closers run, then the nursery is left (its tasks awaited, their errors raised).

    A class, not an ``asynccontextmanager``: it is entered once per request, and the async
    generator machinery cost about 3% of a request's CPU.
    """

    __slots__ = ("_nursery_manager", "_scope")

    async def __aenter__(self) -> RequestScope:
        self._nursery_manager = trio.open_nursery()
        self._scope = RequestScope(await self._nursery_manager.__aenter__())
        return self._scope

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            self._scope.nursery.cancel_scope.cancel()
            await self._scope._close_all()
        except BaseException as failure:  # handed to the nursery, as a body's exception is
            return await self._nursery_manager.__aexit__(
                type(failure), failure, failure.__traceback__
            )
        return await self._nursery_manager.__aexit__(exc_type, exc, tb)


class Gateway:
    """Everything built from one :class:`Config`. Two gateways never share state.

    Construction does no I/O (connection pools open on first use). Call :meth:`aclose` when done
    (the server does it on shutdown) and run :meth:`serve_background` in a nursery so request
    records reach listeners.

    Raises:
        ConfigError: a referenced extension (key check, custom connection) cannot be loaded.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.debug = config.debug
        self.router = Router(config.routing)
        self.groups: Mapping[str, Group] = config.groups
        self.key_check, self._key_check_is_async, self._key_check_inline = self._build_key_check(
            config
        )
        self._key_secret = (config.encryption_key or "lm-gateway").encode()
        self.records = RecordSink()
        # Building a connection opens no sockets (pools connect on first use), so a failure
        # half-way leaves nothing to release.
        self.connections: dict[str, Connection] = {
            name: self._build_connection(conn_config)
            for name, conn_config in config.connections.items()
        }
        for name, connection in self.connections.items():
            if isinstance(connection, StrategyProvider):
                problems = connection.check_targets(self.connections)
                if problems:
                    raise ConfigError("; ".join(problems), f"connections.{name}.targets")
        self._model_lists: dict[str, tuple[float, list[dict[str, Any]] | None]] = {}
        self._model_list_locks: dict[str, trio.Lock] = {}
        self._trusted = tuple(ipaddress.ip_network(n) for n in config.trusted_proxies)
        self.handlers: list[Handler] = [self._build_handler(ref) for ref in config.before]
        self._background_done: trio.Event | None = None
        #: Seconds without upstream data after which an Anthropic stream gets a ``ping``.
        self.anthropic_ping_seconds = 10.0
        #: Prometheus metrics (None when ``metrics = false``).
        self.metrics = GatewayMetrics() if config.metrics else None
        self._price_tables = self._build_price_tables(config)
        self.loggers: list[LoggerRunner] = [
            self._build_logger(ref, i) for i, ref in enumerate(config.loggers)
        ]
        # Rebuilding a stream's whole answer costs a little per chunk: only when a logger
        # reads answers (an lm-proxy transformer with ``response = "response"``, say).
        self._capture_streams = any(r.logger.reads_response() for r in self.loggers)
        for extension in self._extensions():
            settle = getattr(extension, "settle", None)
            if settle is not None and inspect.iscoroutinefunction(settle):
                self.records.async_listeners.append(settle)

    # -- lifecycle ---------------------------------------------------------------------------

    def warnings(self) -> list[str]:
        """Config warnings plus routing rules that can never match."""
        out = list(self.config.warnings)
        for rule, by in self.router.shadowed():
            out.append(
                f"routing rule {rule.pattern!r} (#{rule.index + 1}) can never match: the earlier "
                f"rule {by.pattern!r} (#{by.index + 1}) catches every model name it would"
            )
        return out

    def _extensions(self) -> list[Any]:
        """The objects from the config that may have lifetimes, settlers or ``aclose``."""
        return [self.key_check, *(handler.call for handler in self.handlers)]

    async def serve_background(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold extensions' resources open (``lifetime()``: a Redis client, say), deliver
        request records and drain the loggers' queues, until :meth:`aclose`; then release them,
        last opened first.

        Resource handling: the lifetimes are entered before ``task_status.started()``, so once
        the server accepts requests they are open. After :meth:`aclose` the loggers write what
        is queued for at most ``log_flush_seconds``; what is left then is counted as dropped.
        """
        done = self._background_done = trio.Event()
        try:
            async with contextlib.AsyncExitStack() as stack:
                # Connections too: a local model loads here, before the server takes requests.
                for extension in [*self._extensions(), *self.connections.values()]:
                    lifetime = getattr(extension, "lifetime", None)
                    if callable(lifetime):
                        await stack.enter_async_context(lifetime())
                async with trio.open_nursery() as nursery:
                    for runner in self.loggers:
                        nursery.start_soon(runner.serve)
                    await self.records.serve(task_status=task_status)
                    # records.serve returns after aclose(): the loggers get a bounded flush.
                    nursery.cancel_scope.deadline = (
                        trio.current_time() + self.config.log_flush_seconds
                    )
        finally:
            # Writers are released even when the host cancelled us (a database pool left
            # open would hold the process); a close stuck on a dead server is abandoned.
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for runner in self.loggers:
                    await trio.to_thread.run_sync(runner.close_logger, abandon_on_cancel=True)
            done.set()

    async def aclose(self) -> None:
        """Stop background work after it drains, then close every connection's pool and
        extension.

        When :meth:`serve_background` runs, this waits for it to deliver the last records and
        flush the loggers (at most ``log_flush_seconds`` plus a margin): servers cancel their
        background tasks as soon as the shutdown hooks return, so the flush must happen here.
        """
        self.records.close()
        for runner in self.loggers:
            runner.close()
        if self.metrics is not None:
            self.metrics.close()
        done = self._background_done
        if done is not None:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self.config.log_flush_seconds + _SHUTDOWN_MARGIN_SECONDS),
            ):
                await done.wait()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            closers = [(c.name, c.aclose) for c in self.connections.values()]
            closers += [
                (type(e).__name__, e.aclose)
                for e in self._extensions()
                if callable(getattr(e, "aclose", None))
            ]
            for name, close in closers:
                try:
                    await close()
                except Exception:
                    log.exception("closing %r failed", name)

    # -- building blocks -----------------------------------------------------------------------

    @staticmethod
    def _build_key_check(config: Config) -> tuple[KeyCheck, bool, bool]:
        """The key check and how to call it: (check, is_async, safe_to_call_inline)."""
        if config.api_key_check is None:
            return ConfigKeyCheck(config.groups), False, True
        check = resolve_extension(config.api_key_check)
        if not callable(check):
            raise ConfigError(
                f"the API key check is a {type(check).__name__}, which is not callable",
                config.api_key_check.config_path,
            )
        is_async = inspect.iscoroutinefunction(check) or inspect.iscoroutinefunction(
            getattr(check, "__call__", None)  # noqa: B004 - instances with async __call__
        )
        inline = isinstance(check, AllowAll | ConfigKeyCheck)
        if isinstance(check, AllowAll) and check.group not in config.groups:
            raise ConfigError(
                f"AllowAll puts every caller in group {check.group!r}, which is not defined in "
                f"groups (defined: {', '.join(sorted(config.groups)) or 'none'})",
                config.api_key_check.config_path,
            )
        return check, is_async, inline

    @staticmethod
    def _build_handler(ref: ExtensionRef) -> Handler:
        handler = resolve_extension(ref)
        if not callable(handler):
            raise ConfigError(
                f"a request handler must be callable, not {type(handler).__name__}",
                ref.config_path,
            )
        return Handler(
            call=handler,
            is_async=inspect.iscoroutinefunction(handler)
            or inspect.iscoroutinefunction(getattr(handler, "__call__", None)),  # noqa: B004
            inline=bool(getattr(handler, "inline", False)),
            where=ref.config_path,
        )

    @staticmethod
    def _build_connection(conn_config: ConnectionConfig) -> Connection:
        """A strategy, or a connection inside its guard (retries, cooldown, attempt log)."""
        if isinstance(conn_config, StrategyConnection):
            return StrategyProvider(conn_config)
        return guard(build_connection(conn_config), getattr(conn_config, "resilience", None))

    @staticmethod
    def _build_price_tables(config: Config) -> dict[str, PriceTable]:
        """One price table per connection: shipped prices, then ``prices``, then the
        connection's own ``prices``."""
        top = {model: Price(**fields) for model, fields in config.prices.items()}
        tables = {}
        for name, conn in config.connections.items():
            own = getattr(conn, "prices", None) or {}
            tables[name] = PriceTable(
                DEFAULT_PRICES, top, {model: Price(**fields) for model, fields in own.items()}
            )
        return tables

    def _build_logger(self, ref: ExtensionRef, index: int) -> LoggerRunner:
        target = resolve_extension(ref)
        logger: BaseLogger | CallableLogger
        if isinstance(target, BaseLogger):
            logger = target
        elif callable(target):
            is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
                getattr(target, "__call__", None)  # noqa: B004 - instances with async __call__
            )
            logger = CallableLogger(target, is_async)
        else:
            raise ConfigError(
                f"a logger must be a BaseLogger or callable, not {type(target).__name__}",
                ref.config_path,
            )
        runner = LoggerRunner(logger, logger_name(target, index))
        runner.on_drop = self._log_entries_dropped
        return runner

    def _log_entries_dropped(self, logger: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.log_dropped.labels(logger).inc(count)

    def _submit(self, ctx: RequestContext) -> None:
        """A request has finished (exactly once): account for it and hand it to the access
        log, listeners, loggers and metrics. Never blocks, never raises."""
        try:
            # Priced where it was served (a strategy's target), else where it was routed.
            where, model = ctx.internal.get("served") or (ctx.connection, ctx.upstream_model)
            if ctx.usage is not None and where in self._price_tables:
                ctx.cost = self._price_tables[where].cost(model, ctx.usage)
            ctx.internal["overhead_seconds"] = self._overhead(ctx)
            if self.metrics is not None:
                self.metrics.finished(ctx)
        except Exception:
            log.exception("request %s: accounting failed", ctx.id)
        dropped = self.records.dropped
        self.records.submit(ctx)
        if self.records.dropped != dropped and self.metrics is not None:
            self.metrics.records_dropped.inc()
        for runner in self.loggers:
            runner.submit(ctx)

    @staticmethod
    def _overhead(ctx: RequestContext) -> float:
        """The gateway's own time on a request: all of it when no upstream was called;
        otherwise, up to the answer (non-streaming) or the first chunk sent (streaming), the
        time not spent waiting for the upstream. Relaying later chunks is not counted."""
        duration = ctx.duration or 0.0
        t0: float | None = ctx.internal.get("upstream_t0")
        if t0 is None:
            return duration
        t1: float | None = ctx.internal.get("upstream_t1")
        if t1 is None:  # the upstream call was still going when the request ended
            return max(0.0, t0 - ctx.started)
        until = ctx.time_to_first_chunk if ctx.stream and ctx.time_to_first_chunk else duration
        return max(0.0, until - (t1 - t0))

    @staticmethod
    def _note_attempts(record: RequestContext, call: ChatCall) -> None:
        """Copy the call's attempts into the record and the answer's headers:
        ``x-lm-gateway-connection`` (who answered), ``x-lm-gateway-attempts`` (tries made) and,
        after failures, ``x-lm-gateway-fallback-reason`` (the first one)."""
        attempts = call.attempts
        if not attempts:
            return
        record.attempt_log = [a.to_dict() for a in attempts]
        record.attempts = max(1, sum(1 for a in attempts if a.outcome != "skipped"))
        headers = record.response_headers
        headers["x-lm-gateway-attempts"] = str(record.attempts)
        ok = next((a for a in reversed(attempts) if a.outcome == "ok"), None)
        if ok is None:
            return
        record.served_by = f"{ok.connection}/{ok.model}"
        record.internal["served"] = (ok.connection, ok.model)
        headers["x-lm-gateway-connection"] = ok.connection
        failed = next((a for a in attempts if a.outcome in ("error", "skipped")), None)
        if failed is not None:
            headers["x-lm-gateway-fallback-reason"] = f"{failed.connection}: {failed.error}"

    def _new_record(self, request: IncomingRequest, endpoint: str) -> RequestContext:
        if self.metrics is not None:
            self.metrics.started()
        return RequestContext(
            id=request.request_id,
            endpoint=endpoint,
            method=request.method,
            path=request.path,
            remote_addr=client_ip(request.client_addr, request.headers, self._trusted),
            headers=request.headers,
        )

    async def _run_handlers(self, ctx: RequestContext, group: Group) -> None:
        """Run the before-handlers in order; each may change the request or refuse it."""
        for handler in self.handlers:
            try:
                if handler.is_async:
                    await handler.call(ctx)
                elif handler.inline:
                    result = handler.call(ctx)
                    if inspect.isawaitable(result):
                        await result
                else:
                    result = await trio.to_thread.run_sync(handler.call, ctx)
                    if inspect.isawaitable(result):
                        await result
            except GatewayError:
                raise
            except Exception as exc:
                rejection = _rejection_from(exc)
                if rejection is not None:
                    raise rejection from exc
                log.exception("request %s: handler %s failed", ctx.id, handler.where)
                raise InternalError(
                    "A request handler failed.", detail=f"{handler.where}: {exc!r}"
                ) from exc
        # lm-proxy handlers put upstream headers into llm_params["extra_headers"].
        extra_headers = (ctx.request or {}).pop("extra_headers", None)
        if isinstance(extra_headers, dict):
            ctx.upstream_headers.update({str(k).lower(): str(v) for k, v in extra_headers.items()})

    def _error_reply(self, error: GatewayError, record: RequestContext) -> Reply:
        """Finish ``record`` with ``error`` and build the OpenAI-shaped error answer."""
        status = error.http_status
        outcome: Outcome = (
            "error" if isinstance(error, UpstreamError | InternalError) else "rejected"
        )
        if record.finish(outcome, status):
            record.error_type = error.type
            record.error_code = error.code
            record.error_message = error.message
            if isinstance(error, InternalError):
                log.error("request %s: %s (%s)", record.id, error.message, error.detail)
            elif isinstance(error, UpstreamError) and error.detail:
                log.warning("request %s: %s (%s)", record.id, error.message, error.detail)
            self._submit(record)
        headers = {**record.response_headers, **error.headers, "x-request-id": record.id}
        return Reply(status, orjson.dumps(error.to_body(debug=self.debug)), headers)

    def _ok_reply(self, record: RequestContext, body: Any, status: int = 200) -> Reply:
        data = orjson.dumps(body)
        headers = {**record.response_headers, "x-request-id": record.id}
        if record.finish("ok", status):
            self._submit(record)
            if record.cost is not None:
                headers["x-lm-gateway-cost"] = format_cost(record.cost)
        return Reply(status, data, headers)

    def _record_cancelled(self, record: RequestContext) -> None:
        if record.finish("cancelled", 499):
            self._submit(record)

    def _check_enabled(self) -> None:
        if not self.config.enabled:
            raise ServiceDisabled("The service is disabled.")

    async def _authenticate(self, request: IncomingRequest, record: RequestContext) -> Group:
        key = extract_api_key(request.headers)
        if key is None and not getattr(self.key_check, "accepts_missing_key", False):
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                "(or in the 'x-api-key' header)."
            )
        result = await self._run_key_check(key or "")
        if result is None:
            raise AuthenticationFailed("Incorrect API key provided: it is invalid or revoked.")
        group = self.groups.get(result.group)
        if group is None:
            raise InternalError(
                "The API key check put this key in a group that is not configured.",
                code="invalid_group",
                detail=f"api_key_check returned group {result.group!r}; configured groups: "
                f"{', '.join(sorted(self.groups)) or 'none'}",
            )
        record.group = group.name
        record.user_info = dict(result.user_info)
        if key:
            record.api_key_id = api_key_id(key, self._key_secret)
        return group

    async def _run_key_check(self, key: str) -> KeyCheckResult | None:
        check = self.key_check
        where = "api_key_check"
        try:
            if self._key_check_inline:
                result = check(key)
            elif self._key_check_is_async:
                result = await check(key)
            else:
                # A user's sync check may do I/O (lm-proxy's HTTP check did): keep it off the loop.
                result = await trio.to_thread.run_sync(check, key)
                if inspect.isawaitable(result):
                    result = await result
        except GatewayError:
            raise
        except Exception as exc:
            log.exception("api_key_check raised")
            raise InternalError(
                "The API key check failed.", detail=f"{type(exc).__name__}: {exc}"
            ) from exc
        return normalize_check_result(result, where)

    def _after_handlers(self, ctx: RequestContext, group: Group) -> dict[str, Any]:
        """Check what the handlers left: a request body, and a route the group may use."""
        data = ctx.request
        if not isinstance(data, dict):
            raise InternalError(
                "A request handler removed the request.", detail="ctx.request is not a dict"
            )
        if ctx.connection not in self.connections:
            raise InternalError(
                "A request handler routed the request to an unknown connection.",
                detail=f"ctx.connection = {ctx.connection!r}",
            )
        if not isinstance(ctx.upstream_model, str) or not ctx.upstream_model:
            raise InternalError(
                "A request handler left no upstream model.",
                detail=f"ctx.upstream_model = {ctx.upstream_model!r}",
            )
        if not group.allows_connection(ctx.connection):
            raise PermissionDenied(
                f"Your API key does not allow using the {ctx.connection!r} connection.",
                code="connection_not_allowed",
                param="model",
            )
        return data

    def _authorize(self, group: Group, route: Route) -> None:
        if not group.allows_connection(route.connection):
            raise PermissionDenied(
                f"Your API key does not allow using the {route.connection!r} connection.",
                code="connection_not_allowed",
                param="model",
            )
        if not allowed_model(group.allowed_models, route.client_model):
            raise PermissionDenied(
                f"Your API key does not allow using the model {route.client_model!r}.",
                code="model_not_allowed",
                param="model",
            )

    # -- endpoints -------------------------------------------------------------------------------

    async def health(self, request: IncomingRequest) -> Reply:
        """Liveness: 200 while serving, 503 when ``enabled = false``. No authentication."""
        if not self.config.enabled:
            error = ServiceDisabled("The service is disabled.")
            return Reply(503, orjson.dumps(error.to_body()), {"x-request-id": request.request_id})
        await trio.lowlevel.checkpoint()
        return Reply(200, b'{"status":"ok"}', {"x-request-id": request.request_id})

    async def _serve(
        self,
        request: IncomingRequest,
        endpoint: str,
        handle: Callable[[RequestContext, Group], Awaitable[Reply | StreamReply]],
    ) -> Reply | StreamReply:
        """The frame every authenticated endpoint shares: enabled check, authentication, and
        turning every failure into an OpenAI-shaped reply with a finished record.

        Never raises a GatewayError or other Exception (those become error replies);
        cancellation propagates after the request is recorded as cancelled.
        """
        record = self._new_record(request, endpoint)
        try:
            self._check_enabled()
            group = await self._authenticate(request, record)
            return await handle(record, group)
        except GatewayError as error:
            return self._error_reply(error, record)
        except trio.Cancelled:
            self._record_cancelled(record)
            raise
        except BaseExceptionGroup as group:
            # A nursery inside the call (a strategy's attempts, a fan-out) cancelled with its
            # request: the cancellations arrive grouped.
            if group.subgroup(trio.Cancelled) is not None:
                self._record_cancelled(record)
                raise
            log.exception("request %s failed unexpectedly", record.id)
            return self._error_reply(
                InternalError("The gateway failed to process the request.", detail=repr(group)),
                record,
            )
        except Exception as exc:
            log.exception("request %s failed unexpectedly", record.id)
            return self._error_reply(
                InternalError(
                    "The gateway failed to process the request.",
                    detail=f"{type(exc).__name__}: {exc}",
                ),
                record,
            )

    async def chat_completions(
        self, request: IncomingRequest, scope: RequestScope
    ) -> Reply | StreamReply:
        """Serve ``POST {prefix}/chat/completions`` (see :meth:`_serve` for failures)."""

        async def handle(record: RequestContext, group: Group) -> Reply | StreamReply:
            data = parse_json_object(request.body)
            return await self._chat(record, group, request, scope, data)

        return await self._serve(request, "chat.completions", handle)

    async def messages(self, request: IncomingRequest, scope: RequestScope) -> Reply | StreamReply:
        """Serve Anthropic's ``POST {prefix}/messages`` for any connection: the request is
        translated to a chat completion, goes the same way (keys, routing, handlers, guards,
        strategies, logs), and the answer comes back as a Messages answer or event stream.
        Errors are in Anthropic's shape."""

        async def handle(record: RequestContext, group: Group) -> Reply | StreamReply:
            raw = parse_json_object(request.body)
            model = raw.get("model")
            if isinstance(model, str) and model:
                route = self.router.match(model)
                if route is not None:
                    target = self.connections.get(route.connection)
                    serves = getattr(target, "serves", None)
                    if callable(serves) and serves("messages_passthrough"):
                        return await self._messages_passthrough(record, group, request, scope, raw)
            data = messages_to_openai(raw)
            return await self._chat(record, group, request, scope, data, anthropic=True)

        return anthropic_errors(await self._serve(request, "messages", handle))

    async def _messages_passthrough(
        self,
        record: RequestContext,
        group: Group,
        request: IncomingRequest,
        scope: RequestScope,
        data: dict[str, Any],
    ) -> Reply | StreamReply:
        """An Anthropic client on an Anthropic connection: the request and the answer go
        through as they are (thinking signatures, ``cache_control``, beta features, fields
        newer than the gateway), with the same keys, routing, handlers, guard and accounting
        (the usage is read from the answer or the events)."""
        max_tokens = data.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidRequest(
                "max_tokens: Field required (a positive integer)", param="max_tokens"
            )
        if not isinstance(data.get("messages"), list):
            raise InvalidRequest("messages: Field required", param="messages")
        connection, call = await self._prepare(record, group, request, scope, data)
        if not call.stream:
            result = await self._upstream(record, call, connection.messages_passthrough)
            record.mark_first_chunk()
            body = result.body
            body["model"] = call.client_model
            record.response = body
            record.usage = translate_usage(body.get("usage"))
            if isinstance(body.get("stop_reason"), str):
                record.finish_reasons = [body["stop_reason"]]
            return self._reply_with(record, result, body)
        upstream = await self._upstream(
            record, call, connection.open_messages_stream, answered=False
        )
        return await self._stream_reply(
            record,
            scope,
            upstream,
            strip_usage=False,
            encoder=PassthroughEncoder(call.client_model),
        )

    async def count_tokens(
        self, request: IncomingRequest, scope: RequestScope
    ) -> Reply | StreamReply:
        """Serve ``POST {prefix}/messages/count_tokens``: an estimate (four characters a
        token) for a model the caller may use."""

        async def handle(record: RequestContext, group: Group) -> Reply:
            body = parse_json_object(request.body)
            model = body.get("model")
            if not isinstance(model, str) or not model.strip():
                raise InvalidRequest("model: Field required", param="model")
            record.model = model
            route = self.router.resolve(model)
            record.connection = route.connection
            record.upstream_model = route.upstream_model
            self._authorize(group, route)
            connection: Any = self.connections[route.connection]
            serves = getattr(connection, "serves", None)
            if callable(serves) and serves("count_tokens"):
                # An Anthropic connection counts exactly.
                call = self._new_call(
                    record, request, scope, {**body, "model": route.upstream_model}, stream=False
                )
                result = await connection.count_tokens(call)
                return self._ok_reply(record, result.body)
            messages_to_openai({"max_tokens": 1, **body})  # the same checks as a request
            return self._ok_reply(record, {"input_tokens": estimate_input_tokens(body)})

        return anthropic_errors(await self._serve(request, "messages.count_tokens", handle))

    async def _chat(
        self,
        record: RequestContext,
        group: Group,
        request: IncomingRequest,
        scope: RequestScope,
        data: dict[str, Any],
        *,
        anthropic: bool = False,
    ) -> Reply | StreamReply:
        """One chat completion, answered in OpenAI's format or (``anthropic``) as a Messages
        answer."""
        validate_chat_request(data)
        connection, call = await self._prepare(record, group, request, scope, data)
        client_wants_usage = wants_stream_usage(call.body)
        n = call.body.get("n") or 1
        fan_out = n > 1 and not has_native_n(connection)
        if not call.stream:
            result = await self._upstream(
                record,
                call,
                (lambda c: fan_out_chat(connection, c, n)) if fan_out else connection.chat,
            )
            body = self._answered(record, result)
            record.response = body
            return self._reply_with(
                record, result, openai_to_message(body, call.client_model) if anthropic else body
            )
        upstream = await self._upstream(
            record,
            call,
            (lambda c: fan_out_stream(connection, c, n))
            if fan_out
            else connection.open_chat_stream,
            answered=False,
        )
        if anthropic:
            # Anthropic's clients expect ``ping`` events while a model thinks.
            upstream = PingingStream(upstream, scope.nursery, self.anthropic_ping_seconds)
        return await self._stream_reply(
            record,
            scope,
            upstream,
            strip_usage=call.usage_requested_by_gateway and not client_wants_usage,
            encoder=MessageStreamEncoder(call.client_model) if anthropic else None,
        )

    async def embeddings(
        self, request: IncomingRequest, scope: RequestScope
    ) -> Reply | StreamReply:
        """Serve ``POST {prefix}/embeddings`` (routed, authorised, logged like chat)."""
        return await self._serve(
            request,
            "embeddings",
            lambda record, group: self._other_call(
                record,
                group,
                request,
                scope,
                method="embeddings",
                validate=validate_embeddings_request,
            ),
        )

    async def completions(
        self, request: IncomingRequest, scope: RequestScope
    ) -> Reply | StreamReply:
        """Serve the legacy ``POST {prefix}/completions`` (streaming too)."""
        return await self._serve(
            request,
            "completions",
            lambda record, group: self._other_call(
                record,
                group,
                request,
                scope,
                method="completions",
                validate=validate_completions_request,
            ),
        )

    async def _other_call(
        self,
        record: RequestContext,
        group: Group,
        request: IncomingRequest,
        scope: RequestScope,
        *,
        method: str,
        validate: Callable[[dict[str, Any]], None],
    ) -> Reply | StreamReply:
        """Embeddings and legacy completions: the chat path's steps (route, authorise,
        handlers, guard or strategy, accounting), without chat's translation. Connections that
        cannot serve the endpoint answer 400 ``unsupported_endpoint``."""
        data = parse_json_object(request.body)
        validate(data)
        connection, call = await self._prepare(
            record, group, request, scope, data, streamable=method == "completions"
        )
        serves = getattr(connection, "serves", None)
        if not callable(serves) or not serves(method):
            raise NotSupported(
                f"The connection {record.connection!r} cannot serve {method}.",
                param="model",
                code="unsupported_endpoint",
            )
        client_wants_usage = wants_stream_usage(call.body)
        if call.stream:
            # Optional in the Connection protocol: serves() checked it above.
            upstream = await self._upstream(
                record, call, connection.open_completions_stream, answered=False
            )
            return await self._stream_reply(
                record,
                scope,
                upstream,
                strip_usage=call.usage_requested_by_gateway and not client_wants_usage,
            )
        result = await self._upstream(record, call, getattr(connection, method))
        body = self._answered(record, result)
        record.response = {"usage": record.usage} if method == "embeddings" else body
        return self._reply_with(record, result, body)

    # -- the steps every upstream-bound endpoint shares --------------------------------------

    async def _prepare(
        self,
        record: RequestContext,
        group: Group,
        request: IncomingRequest,
        scope: RequestScope,
        data: dict[str, Any],
        *,
        streamable: bool = True,
    ) -> tuple[Any, ChatCall]:
        """Route ``data``'s model, authorise it for ``group``, run the before-handlers, and
        build the call (the body with the routed model). Returns the routed connection (typed
        loosely: endpoints use its optional methods after checking ``serves``) and the call.

        Raises:
            GatewayError: not routable (404), not allowed (403), refused by a handler.
        """
        record.request = data
        record.model = model = data["model"]
        route = self.router.resolve(model)
        record.connection = route.connection
        record.upstream_model = route.upstream_model
        self._authorize(group, route)
        if self.handlers:
            await self._run_handlers(record, group)
            data = self._after_handlers(record, group)
        record.stream = streamable and bool(data.get("stream"))
        data["model"] = record.upstream_model
        call = self._new_call(record, request, scope, data, stream=record.stream)
        return self.connections[str(record.connection)], call

    def _new_call(
        self,
        record: RequestContext,
        request: IncomingRequest,
        scope: RequestScope,
        body: dict[str, Any],
        *,
        stream: bool,
    ) -> ChatCall:
        return ChatCall(
            body=body,
            client_model=str(record.model),
            stream=stream,
            deadline=trio.current_time() + self.config.request_timeout_seconds,
            request_id=record.id,
            nursery=scope.nursery,
            headers=dict(record.upstream_headers),
            connections=self.connections,
            client_headers=request.headers,
        )

    async def _upstream(
        self,
        record: RequestContext,
        call: ChatCall,
        op: Callable[[ChatCall], Awaitable[Any]],
        *,
        answered: bool = True,
    ) -> Any:
        """``await op(call)``, with the bookkeeping around it: from here on the upstream may
        spend tokens (accounting needs to know), the upstream's share of the time starts (and,
        for whole answers, ends when it returns or fails), and the attempts are noted whatever
        happens."""
        record.internal["upstream_started"] = True
        record.internal["upstream_t0"] = time.perf_counter()
        try:
            return await op(call)
        finally:
            if answered:
                record.internal["upstream_t1"] = time.perf_counter()
            self._note_attempts(record, call)

    @staticmethod
    def _answered(record: RequestContext, result: ChatResult) -> dict[str, Any]:
        """An OpenAI-shaped answer, accounted: the client's model name, usage, finish reasons."""
        record.mark_first_chunk()
        body = result.body
        body["model"] = record.model
        usage = body.get("usage")
        record.usage = usage if isinstance(usage, dict) else None
        record.finish_reasons = [
            c["finish_reason"]
            for c in body.get("choices") or []
            if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)
        ]
        return body

    def _reply_with(self, record: RequestContext, result: ChatResult, answer: Any) -> Reply:
        reply = self._ok_reply(record, answer)
        reply.headers.update(result.headers)
        return reply

    async def _stream_reply(
        self,
        record: RequestContext,
        scope: RequestScope,
        upstream: ChatStream,
        *,
        strip_usage: bool,
        encoder: MessageStreamEncoder | PassthroughEncoder | None = None,
    ) -> StreamReply:
        """The SSE answer: a relay owned by the request scope, which has read up to the first
        chunk (so an upstream refusal is still answered with its status)."""
        relay = SSERelay(
            self, upstream, record, str(record.model), strip_usage=strip_usage, encoder=encoder
        )
        scope.add_closer(relay.aclose)
        try:
            await relay.prefetch()
        finally:
            record.internal["upstream_t1"] = relay.first_chunk_at or time.perf_counter()
        return StreamReply(
            relay,
            headers={**record.response_headers, **SSE_HEADERS, "x-request-id": record.id},
        )

    async def list_models(self, request: IncomingRequest) -> Reply | StreamReply:
        """Serve ``GET {prefix}/models``: the models the caller's group may use."""

        async def handle(record: RequestContext, group: Group) -> Reply:
            entries = await self._model_entries(group)
            if "anthropic-version" in request.headers:
                # Anthropic's SDK (and Claude Code) list models in Anthropic's shape.
                models = [
                    {"type": "model", "id": e["id"], "display_name": e["id"],
                     "created_at": "1970-01-01T00:00:00Z"}
                    for e in entries
                ]  # fmt: skip
                return self._ok_reply(
                    record,
                    {
                        "data": models,
                        "has_more": False,
                        "first_id": models[0]["id"] if models else None,
                        "last_id": models[-1]["id"] if models else None,
                    },
                )
            return self._ok_reply(record, {"object": "list", "data": entries})

        return await self._serve(request, "models.list", handle)

    async def retrieve_model(self, request: IncomingRequest, model_id: str) -> Reply | StreamReply:
        """Serve ``GET {prefix}/models/{id}``: 404 unless the caller could use that model."""

        async def handle(record: RequestContext, group: Group) -> Reply:
            record.model = model_id
            entry = await self._model_entry(group, model_id)
            if entry is None:
                raise ModelNotFound(f"The model {model_id!r} does not exist.", param="model")
            return self._ok_reply(record, entry)

        return await self._serve(request, "models.retrieve", handle)

    # -- model listing ---------------------------------------------------------------------------

    def _entry(
        self, model_id: str, connection: str, base: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": model_id,
            "object": "model",
            "created": 0,
            "owned_by": connection,
        }
        if base:
            entry.update(base)
            entry["id"] = model_id
        entry.update(self.config.model_info.get(model_id, {}))
        return entry

    def _usable(self, group: Group, model_id: str) -> Route | None:
        """The route of ``model_id`` if ``group`` may use it, else None."""
        route = self.router.match(model_id)
        if route is None or not group.allows_connection(route.connection):
            return None
        if not allowed_model(group.allowed_models, model_id):
            return None
        return route

    async def _model_entries(self, group: Group) -> list[dict[str, Any]]:
        mode = self.config.model_listing_mode
        entries: dict[str, dict[str, Any]] = {}
        for rule in self.router.rules:
            if not group.allows_connection(rule.connection):
                continue
            if not is_pattern(rule.pattern):
                route = self._usable(group, rule.pattern)
                if route is not None and route.rule is rule and rule.pattern not in entries:
                    entries[rule.pattern] = self._entry(rule.pattern, rule.connection)
            elif mode == "as_is":
                if rule.pattern not in entries and allowed_model(
                    group.allowed_models, rule.pattern
                ):
                    entries[rule.pattern] = self._entry(rule.pattern, rule.connection)
            elif mode == "expand_wildcards" and rule.model is None:
                for upstream in await self._upstream_models(rule.connection) or ():
                    model_id = upstream["id"]
                    route = self._usable(group, model_id)
                    if route is not None and route.rule is rule and model_id not in entries:
                        entries[model_id] = self._entry(model_id, rule.connection, upstream)
        return list(entries.values())

    async def _model_entry(self, group: Group, model_id: str) -> dict[str, Any] | None:
        route = self._usable(group, model_id)
        if route is None:
            return None
        rule = route.rule
        if (
            self.config.model_listing_mode == "expand_wildcards"
            and is_pattern(rule.pattern)
            and rule.model is None
        ):
            for upstream in await self._upstream_models(rule.connection) or ():
                if upstream["id"] == model_id:
                    return self._entry(model_id, rule.connection, upstream)
            return None
        return self._entry(model_id, rule.connection)

    async def _upstream_models(self, connection: str) -> list[dict[str, Any]] | None:
        """The connection's model list, cached for ``model_listing_cache_seconds``.

        One fetch at a time per connection: concurrent callers wait for it instead of each
        asking the upstream. A failed fetch is logged and cached briefly as "no list".
        """
        now = trio.current_time()
        cached = self._model_lists.get(connection)
        if cached and cached[0] > now:
            return cached[1]
        lock = self._model_list_locks.setdefault(connection, trio.Lock())
        async with lock:
            cached = self._model_lists.get(connection)
            now = trio.current_time()
            if cached and cached[0] > now:
                return cached[1]
            try:
                models = await self.connections[connection].list_models()
                ttl = self.config.model_listing_cache_seconds
            except GatewayError as exc:
                log.warning(
                    "listing models of connection %r failed: %s (%s)",
                    connection,
                    exc.message,
                    exc.detail,
                )
                models, ttl = None, _MODEL_LIST_FAILURE_TTL
            self._model_lists[connection] = (trio.current_time() + ttl, models)
            return models


class PingingStream:
    """A stream read by a task of its own (in the request's nursery), so that waiting for it
    can time out safely: :meth:`receive` returns ``[PING]`` after ``interval`` seconds without
    data. (Timing out an upstream read itself could lose data mid-read.)

    Resource handling: owns ``inner``; :meth:`aclose` stops the reader and closes it.
    """

    def __init__(self, inner: ChatStream, nursery: trio.Nursery, interval: float) -> None:
        self.inner = inner
        self._interval = interval
        self._send, self._receive = trio.open_memory_channel[tuple[str, Any]](1)
        self._scope = trio.CancelScope()
        nursery.start_soon(self._pump)

    @property
    def partial_usage(self) -> Any:
        return getattr(self.inner, "partial_usage", None)

    async def _pump(self) -> None:
        with self._scope:
            try:
                while True:
                    batch = await self.inner.receive()
                    await self._send.send(("batch", batch))
                    if not batch:
                        return
            except GatewayError as error:
                await self._send.send(("error", error))
            except Exception as exc:
                await self._send.send(
                    ("error", InternalError("The stream failed.", detail=repr(exc)))
                )

    async def receive(self) -> list[dict[str, Any]]:
        with trio.move_on_after(self._interval):
            kind, value = await self._receive.receive()
            if kind == "error":
                raise value
            return value  # type: ignore[no-any-return]
        return [PING]

    async def aclose(self) -> None:
        self._scope.cancel()
        await close_quietly(self.inner)


class SSERelay:
    """The body of a streaming answer: upstream chunks re-encoded as SSE, with bookkeeping.

    It implements Quart's ``ResponseBody`` protocol (``async with`` + ``async for``) and is a
    plain object, not an async generator, so no cancel scope or nursery is ever held across a
    ``yield`` (PEP 789). Per upstream read it writes one ``bytes`` (all chunks of that read), so a
    burst of chunks costs one write to the client.

    Resource handling: owns the upstream stream from construction; :meth:`aclose` (idempotent)
    closes it and finishes the request record.
    """

    def __init__(
        self,
        gateway: Gateway,
        upstream: ChatStream,
        record: RequestContext,
        client_model: str,
        *,
        strip_usage: bool,
        encoder: MessageStreamEncoder | PassthroughEncoder | None = None,
    ) -> None:
        self._gateway = gateway
        #: Re-encodes chunks for another protocol (Anthropic's Messages events); None: OpenAI.
        self._encoder = encoder
        self._upstream = upstream
        self._record = record
        self._model = client_model
        self._strip_usage = strip_usage
        self._tally = StreamTally()
        self._answer = StreamAccumulator() if gateway._capture_streams else None
        self._pending: bytes | None = None
        self._ended = False
        self._closed = False
        #: ``perf_counter()`` when the upstream's first chunk arrived.
        self.first_chunk_at: float | None = None
        self._metrics = gateway.metrics
        if self._metrics is not None:
            self._metrics.stream_started()

    async def prefetch(self) -> None:
        """Read up to the first chunk, so upstream failures before it surface as exceptions.

        Raises:
            GatewayError: the upstream failed before its first chunk (the stream is closed).
        """
        try:
            while True:
                batch = await self._upstream.receive()
                if not batch:
                    self._pending = self._done()
                    self._ended = True
                    self._finish("ok", 200)
                    break
                data = self._encode(batch)
                if data:
                    self._pending = data
                    break
        except BaseException:
            await close_quietly(self._upstream)
            self._closed = True
            if self._metrics is not None:
                self._metrics.stream_ended()
            raise
        self.first_chunk_at = time.perf_counter()
        self._record.mark_first_chunk()

    def _done(self) -> bytes:
        return DONE_EVENT if self._encoder is None else self._encoder.end()

    def _encode(self, batch: list[dict[str, Any]]) -> bytes:
        parts: list[bytes] = []
        tally = self._tally
        answer = self._answer
        if self._encoder is not None:
            if not getattr(self._encoder, "passthrough", False):
                for chunk in batch:
                    tally.observe(chunk)
                    if answer is not None:
                        answer.observe(chunk)
            return self._encoder.encode(batch)
        for chunk in batch:
            tally.observe(chunk)
            if answer is not None:
                answer.observe(chunk)
            if self._strip_usage and "usage" in chunk:
                # The usage chunk was requested for our accounting, not by the client.
                if not chunk.get("choices"):
                    continue
                del chunk["usage"]
            if "model" in chunk:
                chunk["model"] = self._model
            parts.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
        return b"".join(parts)

    # Quart ResponseBody protocol.
    async def __aenter__(self) -> SSERelay:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> SSERelay:
        return self

    async def __anext__(self) -> bytes:
        if self._pending is not None:
            data, self._pending = self._pending, None
            return data
        if self._ended:
            raise StopAsyncIteration
        while True:
            try:
                batch = await self._upstream.receive()
            except GatewayError as error:
                return self._fail(error)
            except Exception as exc:  # a broken custom connection must not kill the response
                log.exception("request %s: the stream's connection raised", self._record.id)
                return self._fail(
                    InternalError(
                        "The gateway failed while streaming the answer.",
                        detail=f"{type(exc).__name__}: {exc}",
                    )
                )
            if not batch:
                self._ended = True
                self._finish("ok", 200)
                return self._done()
            data = self._encode(batch)
            if data:
                return data

    def _fail(self, error: GatewayError) -> bytes:
        """End the stream with an error event (the status line went out long ago)."""
        self._ended = True
        record = self._record
        if record.outcome is None:
            record.error_type = error.type
            record.error_code = error.code
            record.error_message = error.message
            if error.detail:
                log.warning(
                    "request %s: stream failed: %s (%s)", record.id, error.message, error.detail
                )
        self._finish("error", error.http_status)
        if self._encoder is not None:
            message = error.to_body(debug=self._gateway.debug)["error"]["message"]
            return self._encoder.error(error.http_status, message)
        return b"data: " + orjson.dumps(error.to_body(debug=self._gateway.debug)) + b"\n\n"

    def _finish(self, outcome: Outcome, status: int) -> None:
        record = self._record
        tally = self._tally
        usage = tally.usage
        encoder = self._encoder
        if getattr(encoder, "passthrough", False):
            # Anthropic events relayed as they are: the encoder read the usage from them.
            usage = getattr(encoder, "usage", None)
            stop = getattr(encoder, "stop_reason", None)
            if stop:
                tally.finish_reasons[0] = stop
        if usage is None and outcome != "ok":
            # Interrupted before the final usage chunk: what the provider reported so far.
            partial = getattr(self._upstream, "partial_usage", None)
            usage = partial if isinstance(partial, dict) else None
        record.usage = usage
        record.chunks = tally.chunks
        record.finish_reasons = list(tally.finish_reasons.values())
        if self._answer is not None:
            record.response = self._answer.result()
            record.response["model"] = self._model
            if usage is not None:
                record.response["usage"] = usage
        elif usage is not None:
            # What transformers written for lm-proxy read (``response.usage.*``).
            record.response = {"usage": usage}
        if record.finish(outcome, status):
            self._gateway._submit(record)

    async def aclose(self) -> None:
        """Close the upstream; if the stream had not ended, the client left: record it so."""
        if self._closed:
            return
        self._closed = True
        if self._metrics is not None:
            self._metrics.stream_ended()
        await close_quietly(self._upstream)
        if not self._ended:
            self._finish("cancelled", 499)


def format_cost(cost: float) -> str:
    """US dollars as a plain decimal (no exponent): ``0.0001375``."""
    text = f"{cost:.10f}".rstrip("0").rstrip(".")
    return text or "0"


def anthropic_errors(reply: Reply | StreamReply) -> Reply | StreamReply:
    """An error reply in Anthropic's shape (``{"type": "error", "error": {...}}``), same
    status and headers; other replies unchanged."""
    if isinstance(reply, StreamReply) or reply.status < 400:
        return reply
    try:
        error = orjson.loads(reply.body)["error"]
        message, kind = str(error["message"]), error.get("type")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message, kind = "The request failed.", None
    if kind == "overloaded_error" and reply.status == 503:
        # Anthropic said 529 (OpenAI clients get 503); its own SDK expects 529 back.
        reply.status = 529
    body = anthropic_error_body(reply.status, message)
    if kind in ANTHROPIC_ERROR_TYPES:
        body["error"]["type"] = kind
    reply.body = orjson.dumps(body)
    return reply
