"""Request handlers (``before = [...]``) and the HTTP key check.

A before-handler is any callable taking the request's
:class:`~lm_gateway.context.RequestContext`: sync or async, a function or an object. It runs
after authentication and routing, before the upstream call, in the order of the config; it may
change ``ctx.request`` (what is sent upstream), ``ctx.connection`` / ``ctx.upstream_model``
(where it goes), ``ctx.upstream_headers`` and ``ctx.response_headers``, or refuse the request by
raising a :class:`~lm_gateway.errors.GatewayError` (``RequestRejected`` for any status). A
synchronous handler runs in a worker thread unless it is marked ``inline = True`` (cheap,
non-blocking ones). Optional methods: ``lifetime()`` (an async context manager the gateway holds
open while serving), ``settle(ctx)`` (async, called for every finished request), ``aclose()``.
"""

from .headers import HTTPHeadersForwarder
from .keycheck import CheckAPIKeyWithRequest
from .ratelimit import RateLimiter

__all__ = ["CheckAPIKeyWithRequest", "HTTPHeadersForwarder", "RateLimiter"]
