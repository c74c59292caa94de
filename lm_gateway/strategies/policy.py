"""Which failures are worth another try, and how long to wait before it (pure functions).

Worth it: the upstream could not be reached or did not answer in time, it is rate limiting
(429), overloaded (529) or failing (5xx), or — for strategies, configurable — another status
in the list. Never: the client's own mistakes (400, 401, 403, 404, 422...), which a second
upstream would refuse just the same. A prompt too long for one model is its own case: it goes
to the strategy's ``on_context_length`` target, if there is one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Container

from ..errors import (
    GatewayError,
    InternalError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

#: Statuses a retry of the same connection may cure.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})

_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
_CONTEXT_WORDS = re.compile(
    r"context (length|window)|maximum context|too many (input )?tokens|prompt is too long|"
    r"input is too long|exceeds the (maximum|context)",
    re.IGNORECASE,
)


def failure_reason(error: GatewayError, statuses: Container[int] = RETRY_STATUSES) -> str | None:
    """A short reason (``timeout``, ``unreachable``, ``http_503``...) when ``error`` is worth
    trying again or elsewhere, None when it is not."""
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamUnreachable):
        return "unreachable"
    if isinstance(error, UpstreamError):
        status = error.http_status
        return f"http_{status}" if status in statuses else None
    if isinstance(error, InternalError):
        # A user's connection code raised: lm-proxy fell over on any exception; so do we.
        return "connection_failed"
    return None


def is_context_length(error: GatewayError) -> bool:
    """Whether ``error`` says the prompt does not fit the model's context."""
    if not isinstance(error, UpstreamError) or error.http_status not in (400, 413, 422):
        return False
    return error.code in _CONTEXT_CODES or bool(_CONTEXT_WORDS.search(error.message))


def counts_against_health(error: GatewayError) -> bool:
    """Whether ``error`` says the connection is unwell (for cooldowns), not the request."""
    return failure_reason(error) is not None and not isinstance(error, InternalError)


def retry_after_seconds(error: GatewayError) -> float | None:
    """The upstream's ``Retry-After`` in seconds (delta-seconds form), if it sent one."""
    value = error.headers.get("retry-after") or error.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare from APIs; treated as absent
    return seconds if seconds >= 0 else None


def backoff_seconds(retry: int, base: float, cap: float, rng: random.Random) -> float:
    """The wait before retry number ``retry`` (0-based): "full jitter", a random time up to
    ``min(cap, base * 2**retry)``, so many clients retrying at once spread out."""
    return rng.uniform(0, min(cap, base * (2**retry)))
