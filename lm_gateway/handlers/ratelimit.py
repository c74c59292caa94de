"""``RateLimiter``: sliding-window limits on requests and tokens, per key, IP, group...

Semantics (also in ``doc/handlers.md``):

- A limiter counts requests it **admits**, in a sliding window of ``window_seconds``: a request
  is admitted when fewer than ``max_requests`` admitted requests fall in the last
  ``window_seconds``. A rejected request is not counted (so a client hammering a full limiter
  does not extend its own ban). A request admitted here but rejected later (by another limiter,
  a failed upstream call) still counts here: the limiter cannot know what comes after it.
  That is lm-proxy's behaviour, kept.
- ``max_tokens_per_window``: a request is admitted while the tokens *settled* in the window are
  below the limit; a request's tokens (prompt + completion, from the usage the provider reported,
  or an estimate for a stream cut before usage came) are settled when it finishes — cancelled
  streams included. So the last admitted request may overshoot the limit by its own size.
- ``per``: ``api_key`` (the key's id; ``anon`` without a key), ``ip`` (the client address;
  see ``trusted_proxies``), ``connection``, ``group``, ``model`` (the name the client asked
  for), ``global``, or a list of them for a combined key.
- Storage ``memory`` (default) counts in this process (per worker with ``--workers``);
  ``redis`` shares the counts between every gateway using the same Redis: each decision is one
  atomic Lua script using the Redis server's clock, so N instances enforce one limit exactly.
  When Redis cannot be reached, ``on_storage_error = "allow"`` (default) admits the request and
  logs a warning; ``"deny"`` answers 503.
- Refusals are 429 with ``Retry-After`` (seconds until the oldest counted request leaves the
  window) and ``x-ratelimit-*`` headers in OpenAI's style; admitted requests get the same
  headers with what remains.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import math
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal, Protocol

import attrs
import orjson
import trio

from ..context import RequestContext
from ..errors import AuthUnavailable, RateLimited

log = logging.getLogger("lm_gateway.ratelimit")

SCOPES = ("api_key", "ip", "connection", "group", "model", "global")


@attrs.frozen
class Decision:
    """One admission decision: admitted, how many are counted now, seconds until a slot."""

    admitted: bool
    count: float
    retry_after: float


class Storage(Protocol):
    """Where a limiter keeps its counts."""

    async def hit(self, key: str, limit: int, window: float) -> Decision:
        """Admit and count one request if fewer than ``limit`` are in the window."""
        ...

    async def tokens(self, key: str, window: float) -> tuple[float, float]:
        """(tokens counted in the window, seconds until the oldest leaves it)."""
        ...

    async def add_tokens(self, key: str, tokens: int, window: float) -> None:
        """Count ``tokens`` now."""
        ...


class MemoryStorage:
    """Exact sliding-window logs in this process (trio's clock, so tests can jump it).

    Each key keeps at most ``limit`` timestamps; ``max_buckets`` bounds the number of keys:
    beyond it, keys with nothing left in their window are dropped.
    """

    def __init__(self, max_buckets: int = 10_000) -> None:
        self.max_buckets = max_buckets
        self._requests: dict[str, collections.deque[float]] = {}
        self._tokens: dict[str, collections.deque[tuple[float, int]]] = {}
        self._token_sums: dict[str, int] = {}

    def _evict(self, now: float, window: float) -> None:
        if len(self._requests) > self.max_buckets:
            stale = [k for k, q in self._requests.items() if not q or q[-1] <= now - window]
            for key in stale:
                del self._requests[key]
        if len(self._tokens) > self.max_buckets:
            stale = [k for k, q in self._tokens.items() if not q or q[-1][0] <= now - window]
            for key in stale:
                del self._tokens[key]
                self._token_sums.pop(key, None)

    async def hit(self, key: str, limit: int, window: float) -> Decision:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        log_ = self._requests.get(key)
        if log_ is None:
            self._evict(now, window)
            log_ = self._requests[key] = collections.deque()
        cutoff = now - window
        while log_ and log_[0] <= cutoff:
            log_.popleft()
        if len(log_) < limit:
            log_.append(now)
            return Decision(True, len(log_), 0.0)
        return Decision(False, len(log_), log_[0] + window - now)

    def _token_log(
        self, key: str, now: float, window: float
    ) -> collections.deque[tuple[float, int]]:
        entries = self._tokens.get(key)
        if entries is None:
            self._evict(now, window)
            entries = self._tokens[key] = collections.deque()
            self._token_sums[key] = 0
        cutoff = now - window
        while entries and entries[0][0] <= cutoff:
            self._token_sums[key] -= entries.popleft()[1]
        return entries

    async def tokens(self, key: str, window: float) -> tuple[float, float]:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        entries = self._token_log(key, now, window)
        oldest = entries[0][0] + window - now if entries else 0.0
        return self._token_sums[key], oldest

    async def add_tokens(self, key: str, tokens: int, window: float) -> None:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        self._token_log(key, now, window).append((now, tokens))
        self._token_sums[key] += tokens


# Atomic sliding-window admission: the Redis server's clock, so every instance agrees.
_HIT_SCRIPT = """
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window_ms = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window_ms)
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, now, ARGV[3])
  redis.call('PEXPIRE', key, window_ms)
  return {1, count + 1, 0}
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return {0, count, tonumber(oldest[2]) + window_ms - now}
"""

# Tokens in one-second buckets of a hash: sum the live ones, drop the old ones.
_TOKENS_SCRIPT = """
local key = KEYS[1]
local window = tonumber(ARGV[1])
local add = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1])
local fields = redis.call('HGETALL', key)
local total = 0
local oldest = now
for i = 1, #fields, 2 do
  local second = tonumber(fields[i])
  if second <= now - window then
    redis.call('HDEL', key, fields[i])
  else
    total = total + tonumber(fields[i + 1])
    if second < oldest then oldest = second end
  end
end
if add > 0 then
  redis.call('HINCRBY', key, tostring(now), add)
  redis.call('EXPIRE', key, math.ceil(window) + 1)
  total = total + add
end
return {total, oldest + window - now}
"""


class RedisStorage:
    """Counts in Redis (coredis), shared by every gateway instance using the same server.

    The client is opened by :meth:`lifetime` (the gateway enters it for its serving lifetime).
    """

    def __init__(self, url: str, prefix: str, timeout_seconds: float) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout_seconds = timeout_seconds
        self._client: Any = None
        self._hit: Any = None
        self._tokens: Any = None

    @contextlib.asynccontextmanager
    async def lifetime(self) -> AsyncIterator[None]:
        import coredis

        client = coredis.Redis.from_url(self.url, decode_responses=False)
        async with client:
            self._client = client
            self._hit = client.register_script(_HIT_SCRIPT)
            self._tokens = client.register_script(_TOKENS_SCRIPT)
            try:
                yield
            finally:
                self._client = None

    def _ready(self) -> None:
        if self._client is None:
            raise ConnectionError("the Redis client is not open (the gateway is not serving)")

    async def hit(self, key: str, limit: int, window: float) -> Decision:
        self._ready()
        with trio.fail_after(self.timeout_seconds):
            admitted, count, retry_ms = await self._hit(
                keys=[f"{self.prefix}:{key}"],
                args=[limit, max(1, int(window * 1000)), secrets.token_hex(8)],
            )
        return Decision(bool(int(admitted)), float(count), max(0.0, int(retry_ms) / 1000))

    async def tokens(self, key: str, window: float) -> tuple[float, float]:
        self._ready()
        with trio.fail_after(self.timeout_seconds):
            total, oldest = await self._tokens(
                keys=[f"{self.prefix}:t:{key}"], args=[max(1, math.ceil(window)), 0]
            )
        return float(total), max(0.0, float(oldest))

    async def add_tokens(self, key: str, tokens: int, window: float) -> None:
        self._ready()
        with trio.fail_after(self.timeout_seconds):
            await self._tokens(
                keys=[f"{self.prefix}:t:{key}"], args=[max(1, math.ceil(window)), tokens]
            )


def _duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format: ``1s``, ``6m0s``, ``20ms``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _report(headers: dict[str, str], what: str, limit: int, remaining: int, reset: float) -> None:
    """Set ``x-ratelimit-*`` headers, keeping the most restrictive limiter's when several
    report the same kind."""
    current = headers.get(f"x-ratelimit-remaining-{what}")
    if current is not None and current.isdigit() and int(current) <= remaining:
        return
    headers[f"x-ratelimit-limit-{what}"] = str(limit)
    headers[f"x-ratelimit-remaining-{what}"] = str(remaining)
    headers[f"x-ratelimit-reset-{what}"] = _duration(reset)


def estimate_tokens(ctx: RequestContext) -> int:
    """Tokens of a finished request: the reported usage, or a rough estimate (4 bytes of the
    prompt per token, one token per streamed chunk) when the upstream was called but reported
    nothing (a stream cut before usage came). A request that never reached the upstream (refused
    by a later handler, say) costs nothing."""
    usage = ctx.usage
    if isinstance(usage, dict):
        total = usage.get("total_tokens")
        if isinstance(total, int):
            return total
        return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
    if not ctx.internal.get("upstream_started"):
        return 0
    prompt = len(orjson.dumps((ctx.request or {}).get("messages") or [])) // 4
    return prompt + ctx.chunks


class RateLimiter:
    """A before-handler limiting requests (and optionally tokens) in a sliding window.

    Args:
        max_requests: requests admitted per window (None: no request limit).
        window_seconds: the window's length.
        per: what is counted together (see the module docstring); a string or a list.
        max_tokens_per_window: tokens (prompt + completion) per window (None: no token limit).
        storage: ``memory`` or ``redis``.
        redis_url: for ``storage = "redis"`` (``redis://host:port/db``, ``rediss://`` for TLS).
        on_storage_error: ``allow`` (admit, log a warning) or ``deny`` (503) when Redis fails.
        name: distinguishes limiters sharing a Redis (default: derived from the settings).
        max_buckets: memory storage: most keys kept (stale ones dropped beyond it).
        storage_timeout_seconds: longest wait for Redis per decision.
    """

    #: A cheap, non-blocking handler: the service calls it on the event loop.
    inline = True

    def __init__(
        self,
        max_requests: int | None = 60,
        window_seconds: float = 60.0,
        per: str | Sequence[str] = "api_key",
        *,
        max_tokens_per_window: int | None = None,
        storage: Literal["memory", "redis"] = "memory",
        redis_url: str | None = None,
        on_storage_error: Literal["allow", "deny"] = "allow",
        name: str | None = None,
        max_buckets: int = 10_000,
        storage_timeout_seconds: float = 1.0,
    ) -> None:
        if isinstance(per, str):
            scopes = [per]
        elif isinstance(per, list | tuple):
            scopes = list(per)
        else:
            raise TypeError(f"per: a scope name or a list of them, not {per!r}")
        for scope in scopes:
            if scope not in SCOPES:
                raise ValueError(f"per: unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
        if not scopes:
            raise ValueError("per: give at least one scope")
        if max_requests is None and max_tokens_per_window is None:
            raise ValueError("set max_requests, max_tokens_per_window, or both")
        for label, value in (
            ("max_requests", max_requests),
            ("max_tokens_per_window", max_tokens_per_window),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{label}: must be a whole number of at least 1, got {value!r}")
        if (
            isinstance(window_seconds, bool)
            or not isinstance(window_seconds, int | float)
            or not window_seconds > 0
        ):
            raise ValueError(f"window_seconds: must be a positive number, got {window_seconds!r}")
        if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
            raise ValueError(
                f"max_buckets: must be a whole number of at least 1, got {max_buckets!r}"
            )
        if (
            isinstance(storage_timeout_seconds, bool)
            or not isinstance(storage_timeout_seconds, int | float)
            or not storage_timeout_seconds > 0
        ):
            raise ValueError(
                f"storage_timeout_seconds: must be a positive number, "
                f"got {storage_timeout_seconds!r}"
            )
        if on_storage_error not in ("allow", "deny"):
            raise ValueError(f"on_storage_error: 'allow' or 'deny', not {on_storage_error!r}")
        self.max_requests = max_requests
        self.window_seconds = float(window_seconds)
        self.scopes = scopes
        self.max_tokens = max_tokens_per_window
        self.on_storage_error = on_storage_error
        self.name = (
            name
            or hashlib.sha256(
                f"{scopes}:{max_requests}:{window_seconds}:{max_tokens_per_window}".encode()
            ).hexdigest()[:12]
        )
        self.storage: Storage
        if storage == "memory":
            self.storage = MemoryStorage(max_buckets)
        elif storage == "redis":
            if not redis_url:
                raise ValueError("storage = 'redis' needs redis_url")
            self.storage = RedisStorage(redis_url, f"lmgw:rl:{self.name}", storage_timeout_seconds)
        else:
            raise ValueError(f"storage: 'memory' or 'redis', not {storage!r}")

    def lifetime(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held open by the gateway while it serves (the Redis client lives in it)."""
        if isinstance(self.storage, RedisStorage):
            return self.storage.lifetime()
        return contextlib.nullcontext()

    def key(self, ctx: RequestContext) -> str:
        """The bucket a request counts in."""
        parts = []
        for scope in self.scopes:
            if scope == "api_key":
                parts.append(ctx.api_key_id or "anon")
            elif scope == "ip":
                parts.append(ctx.remote_addr or "anon")
            elif scope == "connection":
                parts.append(ctx.connection or "")
            elif scope == "group":
                parts.append(ctx.group or "")
            elif scope == "model":
                parts.append(ctx.model or "")
            else:
                parts.append("*")
        return "|".join(parts)

    def _storage_failed(self, exc: Exception) -> None:
        if self.on_storage_error == "deny":
            raise AuthUnavailable(
                "The rate-limit store is unavailable.",
                code="rate_limit_storage_unavailable",
                detail=f"{type(exc).__name__}: {exc}",
            ) from exc
        log.warning(
            "rate limiter %s: storage failed (%s: %s); admitting (fail-open)",
            self.name,
            type(exc).__name__,
            exc,
        )

    async def __call__(self, ctx: RequestContext) -> None:
        """Admit ``ctx`` or raise :class:`~lm_gateway.errors.RateLimited`."""
        key = self.key(ctx)
        window = self.window_seconds
        headers = ctx.response_headers
        try:
            if self.max_tokens is not None:
                used, oldest = await self.storage.tokens(key, window)
                _report(
                    headers, "tokens", self.max_tokens, max(0, int(self.max_tokens - used)), oldest
                )
                if used >= self.max_tokens:
                    self._refuse(ctx, oldest, f"{self.max_tokens} tokens per {window:g}s")
            if self.max_requests is not None:
                decision = await self.storage.hit(key, self.max_requests, window)
                remaining = max(0, int(self.max_requests - decision.count))
                _report(
                    headers,
                    "requests",
                    self.max_requests,
                    remaining,
                    decision.retry_after or window,
                )
                if not decision.admitted:
                    noun = "request" if self.max_requests == 1 else "requests"
                    self._refuse(
                        ctx, decision.retry_after, f"{self.max_requests} {noun} per {window:g}s"
                    )
        except RateLimited:
            raise
        except (OSError, trio.TooSlowError, ConnectionError) as exc:
            self._storage_failed(exc)
        except Exception as exc:
            if type(exc).__module__.startswith("coredis"):
                self._storage_failed(exc)
            else:
                raise
        if self.max_tokens is not None:
            ctx.internal.setdefault("rate_limit_tokens", []).append((self, key))

    def _refuse(self, ctx: RequestContext, retry_after: float, what: str) -> None:
        headers = dict(ctx.response_headers)
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        raise RateLimited(f"Rate limit exceeded: {what}. Try again later.", headers=headers)

    async def settle(self, ctx: RequestContext) -> None:
        """Count a finished request's tokens (called for every finished request)."""
        for limiter, key in ctx.internal.get("rate_limit_tokens", ()):
            if limiter is not self:
                continue
            tokens = estimate_tokens(ctx)
            if tokens <= 0:
                continue
            try:
                await self.storage.add_tokens(key, tokens, self.window_seconds)
            except Exception as exc:
                log.warning(
                    "rate limiter %s: could not count %d tokens (%s: %s)",
                    self.name,
                    tokens,
                    type(exc).__name__,
                    exc,
                )
