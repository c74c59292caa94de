"""One request's context: what handlers see and change, and what loggers receive.

Plain data (no I/O). The service creates a :class:`RequestContext` when a request arrives, fills
it in as the request is authenticated, parsed and routed, passes it to every before-handler
(which may change :attr:`~RequestContext.request`, the routed connection and model, and the
headers sent upstream or answered), and finishes it exactly once with an outcome. Finished
contexts go to listeners (the access log, loggers, rate-limit settlement) off the request path.

The field names follow lm-proxy's ``RequestContext`` where it had one (``request``,
``remote_addr``, ``api_key_id``, ``user_info``, ``extra``; ``llm_params`` is an alias of
``request``), so handlers and log transformers written for lm-proxy keep working.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import attrs

Outcome = Literal["ok", "error", "rejected", "cancelled"]

#: Fields never included in :meth:`RequestContext.to_dict`: they may hold credentials
#: (headers) or a whole conversation (request, response), which logging must opt into.
_PRIVATE_FIELDS = frozenset(
    {"headers", "upstream_headers", "response_headers", "request", "response", "internal",
     "started"}
)  # fmt: skip


@attrs.define(eq=False)
class RequestContext:
    """See the module docstring.

    ``outcome``: ``ok`` (answered), ``error`` (the upstream or the gateway failed), ``rejected``
    (refused before any upstream call: auth, validation, routing, a handler), ``cancelled``
    (the client left; ``usage`` then holds what was reported so far, if anything).
    """

    id: str
    endpoint: str
    method: str
    path: str
    #: The client's address (the socket peer, or the client behind a trusted proxy).
    remote_addr: str | None
    #: The client's request headers, lower-case names. Read-only; may hold credentials.
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    created_at: datetime = attrs.field(factory=lambda: datetime.now(UTC))
    started: float = attrs.field(factory=time.perf_counter)
    #: The parsed request body. Before-handlers may change it: what it holds is sent upstream.
    request: dict[str, Any] | None = attrs.field(default=None, repr=False)
    #: The model name the client asked for.
    model: str | None = None
    #: The routed connection and model; before-handlers may change them.
    connection: str | None = None
    upstream_model: str | None = None
    group: str | None = None
    api_key_id: str | None = None
    user_info: dict[str, Any] = attrs.field(factory=dict)
    #: Free-form data handlers pass to loggers.
    extra: dict[str, Any] = attrs.field(factory=dict)
    #: Headers to add to the upstream request (the header forwarder puts client headers here).
    upstream_headers: dict[str, str] = attrs.field(factory=dict, repr=False)
    #: Headers to add to the answer (rate limiters put ``x-ratelimit-*`` here).
    response_headers: dict[str, str] = attrs.field(factory=dict, repr=False)
    #: The answer's body (a whole ``chat.completion``) when there is one.
    response: dict[str, Any] | None = attrs.field(default=None, repr=False)
    stream: bool = False
    status: int | None = None
    outcome: Outcome | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    usage: dict[str, Any] | None = None
    finish_reasons: list[str] = attrs.field(factory=list)
    chunks: int = 0
    duration: float | None = None
    time_to_first_chunk: float | None = None
    #: Upstream attempts made (more than 1 after fallbacks or retries).
    attempts: int = 1
    #: Each attempt: connection, model, outcome (ok, error, cancelled, skipped), error, seconds.
    attempt_log: list[dict[str, Any]] = attrs.field(factory=list)
    #: ``connection/model`` that produced the answer (differs from the route for strategies).
    served_by: str | None = None
    #: What the request cost in US dollars, when the model has a price (see ``prices``).
    cost: float | None = None
    #: Bookkeeping of the gateway's own extensions (never logged).
    internal: dict[str, Any] = attrs.field(factory=dict, repr=False)

    @property
    def llm_params(self) -> dict[str, Any] | None:
        """lm-proxy's name for the request body sent upstream."""
        return self.request

    @property
    def client_ip(self) -> str | None:
        return self.remote_addr

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def mark_first_chunk(self) -> None:
        if self.time_to_first_chunk is None:
            self.time_to_first_chunk = time.perf_counter() - self.started

    def finish(self, outcome: Outcome, status: int | None) -> bool:
        """Set the outcome once; returns False if it was already set (later calls are no-ops)."""
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self.status = status
        self.duration = time.perf_counter() - self.started
        return True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict without headers, bodies or internal bookkeeping."""
        data = {
            a.name: getattr(self, a.name)
            for a in attrs.fields(type(self))
            if a.name not in _PRIVATE_FIELDS
        }
        data["created_at"] = self.created_at.isoformat()
        return data
