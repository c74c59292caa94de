"""The guard around every connection: retries with backoff, cooldowns, and the attempt log.

Every connection the gateway builds is wrapped in a :class:`Guard`, which

* records each try in ``call.attempts`` (what logs, metrics and the ``x-lm-gateway-attempts``
  header report);
* retries a failed call up to ``max_retries`` times when the failure is worth it (see
  :mod:`.policy`): after the upstream's ``Retry-After`` when it sent one (up to
  ``retry_after_max_seconds``; a longer one is answered at once), else after a "full jitter"
  exponential backoff; never past the request's deadline;
* keeps a :class:`Cooldown` (a circuit breaker): after ``cooldown_after_failures`` failures in a
  row, or a 429 with ``Retry-After``, the connection is skipped for ``cooldown_seconds`` (or
  that long), then one request at a time probes it ("half open") until one succeeds.

Streams are guarded until the upstream accepted them; a stream failing later is the strategy's
business (it may fall over before the first token) or the client's (an error event).
"""

from __future__ import annotations

import collections
import contextlib
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio

from ..config.model import Resilience
from ..errors import GatewayError, NotSupported, UpstreamError
from ..providers.base import Attempt, ChatCall, ChatResult, ChatStream, Connection, JSONObject
from .policy import backoff_seconds, counts_against_health, failure_reason, retry_after_seconds
from .shared import SharedCooldown

R = TypeVar("R")

#: A cooldown started by a 429's ``Retry-After`` lasts at most this long.
MAX_RETRY_AFTER_COOLDOWN = 300.0


class ConnectionCoolingDown(UpstreamError):
    """The connection is in cooldown after failures (503 with ``Retry-After``)."""

    status = 503
    default_code = "connection_cooling_down"


class Cooldown:
    """A circuit breaker for one connection (see the module docstring). Time is trio's clock,
    so tests drive it with the autojump clock. ``threshold = 0`` turns it off."""

    def __init__(
        self, threshold: int, seconds: float, *, ratio: float = 0.0, window: int = 20
    ) -> None:
        self.threshold = threshold
        self.seconds = seconds
        self.ratio = ratio
        #: The last ``window`` outcomes (True: a failure), for the failure ratio.
        self._recent: collections.deque[bool] = collections.deque(maxlen=window)
        self.failures = 0
        self.open_until: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self.open_until is None:
            return "closed"
        return "open" if trio.current_time() < self.open_until else "half_open"

    def remaining(self) -> float | None:
        """None when a request may go (claiming the probe when half open), else the seconds
        until one may."""
        if self.open_until is None:
            return None
        left = self.open_until - trio.current_time()
        if left > 0:
            return left
        if self._probing:
            return 1.0  # another request is probing; it decides soon
        self._probing = True
        return None

    def success(self) -> None:
        self.failures = 0
        self.open_until = None
        self._probing = False
        if self.ratio:
            self._recent.append(False)

    def failure(self, error: GatewayError) -> None:
        if not self.threshold or not counts_against_health(error):
            self.neutral()
            return
        self.failures += 1
        if self.ratio:
            self._recent.append(True)
        wait = retry_after_seconds(error) if error.http_status == 429 else None
        if wait:
            self._open(min(wait, MAX_RETRY_AFTER_COOLDOWN))
        elif self._probing or self.failures >= self.threshold or self._ratio_exceeded():
            self._open(self.seconds)

    def _ratio_exceeded(self) -> bool:
        recent = self._recent
        return (
            bool(self.ratio)
            and len(recent) == recent.maxlen
            and sum(recent) >= self.ratio * len(recent)
        )

    def open_for(self, seconds: float) -> None:
        """Another instance says the connection cools down for ``seconds`` more."""
        until = trio.current_time() + seconds
        if self.open_until is None or self.open_until < until:
            self.open_until = until
            self._probing = False

    def neutral(self) -> None:
        """The request ended without saying anything about the connection's health."""
        self._probing = False

    def _open(self, seconds: float) -> None:
        self.open_until = trio.current_time() + seconds
        self._probing = False
        self._recent.clear()


class Guard:
    """A connection with retries, a cooldown and an attempt log (see the module docstring).

    Other attributes (``lifetime``, ``native_n``...) are the wrapped connection's.
    """

    def __init__(self, inner: Connection, resilience: Resilience | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.resilience = resilience or Resilience(max_retries=0, cooldown_after_failures=0)
        self.cooldown = Cooldown(
            self.resilience.cooldown_after_failures,
            self.resilience.cooldown_seconds,
            ratio=self.resilience.cooldown_failure_ratio,
            window=self.resilience.cooldown_window_requests,
        )
        url = self.resilience.cooldown_redis_url
        self.shared = (
            SharedCooldown(url, self.name)
            if url and self.resilience.cooldown_after_failures
            else None
        )
        self._rng = random.Random()

    @contextlib.asynccontextmanager
    async def lifetime(self) -> AsyncIterator[None]:
        """The shared cooldown's Redis client, and the connection's own lifetime (a local
        model loads in it)."""
        async with contextlib.AsyncExitStack() as stack:
            if self.shared is not None:
                await stack.enter_async_context(self.shared.lifetime())
            inner = getattr(self.inner, "lifetime", None)
            if callable(inner):
                await stack.enter_async_context(inner())
            yield

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def chat(self, call: ChatCall) -> ChatResult:
        return await self._run(call, self.inner.chat)

    async def open_chat_stream(self, call: ChatCall) -> ChatStream:
        return await self._run(call, self.inner.open_chat_stream)

    async def embeddings(self, call: ChatCall) -> ChatResult:
        return await self._run(call, self._optional("embeddings", "embeddings"))

    async def completions(self, call: ChatCall) -> ChatResult:
        return await self._run(call, self._optional("completions", "legacy completions"))

    async def open_completions_stream(self, call: ChatCall) -> ChatStream:
        return await self._run(
            call, self._optional("open_completions_stream", "legacy completions")
        )

    async def messages_passthrough(self, call: ChatCall) -> ChatResult:
        return await self._run(call, self._optional("messages_passthrough", "Anthropic messages"))

    async def open_messages_stream(self, call: ChatCall) -> ChatStream:
        return await self._run(call, self._optional("open_messages_stream", "Anthropic messages"))

    async def count_tokens(self, call: ChatCall) -> ChatResult:
        return await self._run(call, self._optional("count_tokens", "count_tokens"))

    def serves(self, method: str) -> bool:
        """Whether the wrapped connection has ``method`` (embeddings, completions...)."""
        return callable(getattr(self.inner, method, None))

    def _optional(self, method: str, what: str) -> Callable[[ChatCall], Awaitable[Any]]:
        function = getattr(self.inner, method, None)
        if not callable(function):
            raise NotSupported(
                f"The connection {self.name!r} cannot serve {what}.",
                param="model",
                code="unsupported_endpoint",
            )
        return function  # type: ignore[no-any-return]

    async def list_models(self) -> list[JSONObject] | None:
        return await self.inner.list_models()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def _run(self, call: ChatCall, op: Callable[[ChatCall], Awaitable[R]]) -> R:
        retry = 0
        shared = self.shared
        while True:
            if shared is not None:
                left = await shared.remaining()
                if left is not None:
                    self.cooldown.open_for(left)
            wait = self.cooldown.remaining()
            model = call.body.get("model")
            if wait is not None:
                call.attempts.append(Attempt(self.name, model, "skipped", "cooling_down"))
                raise ConnectionCoolingDown(
                    f"The connection {self.name!r} is cooling down after failures; "
                    f"try again in {math.ceil(wait)} s.",
                    headers={"retry-after": str(max(1, math.ceil(wait)))},
                    connection=self.name,
                )
            attempt = Attempt(self.name, model)
            call.attempts.append(attempt)
            # Each try gets its own copy of the body: connections add fields to it.
            # (attrs.evolve: a shallow copy at half copy.copy's cost; attempts stay shared.)
            sub = attrs.evolve(call, body=dict(call.body))
            started = trio.current_time()
            try:
                result = await op(sub)
            except GatewayError as error:
                attempt.outcome = "error"
                attempt.error = failure_reason(error) or error.code or type(error).__name__
                attempt.seconds = trio.current_time() - started
                self.cooldown.failure(error)
                if shared is not None and counts_against_health(error):
                    wait_for = retry_after_seconds(error) if error.http_status == 429 else None
                    await shared.failure(
                        self.cooldown.threshold,
                        self.cooldown.seconds,
                        min(wait_for or 0.0, MAX_RETRY_AFTER_COOLDOWN),
                    )
                delay = self._retry_delay(error, retry, call.deadline)
                if delay is None:
                    raise
                retry += 1
                await trio.sleep(delay)
                continue
            except BaseException:
                attempt.outcome = "cancelled"
                attempt.seconds = trio.current_time() - started
                self.cooldown.neutral()
                raise
            attempt.seconds = trio.current_time() - started
            troubled = self.cooldown.failures > 0 or self.cooldown.open_until is not None
            self.cooldown.success()
            if shared is not None and troubled:
                await shared.success()
            call.usage_requested_by_gateway = sub.usage_requested_by_gateway
            return result

    def _retry_delay(self, error: GatewayError, retry: int, deadline: float) -> float | None:
        """How long to wait before retrying after ``error``, or None to give up."""
        settings = self.resilience
        if retry >= settings.max_retries or failure_reason(error) is None:
            return None
        delay = retry_after_seconds(error)
        if delay is not None:
            if delay > settings.retry_after_max_seconds:
                return None
        else:
            delay = backoff_seconds(
                retry, settings.retry_backoff_seconds, settings.retry_max_backoff_seconds, self._rng
            )
        if self.cooldown.open_until is not None:
            # The failure put the connection in cooldown: retry when it ends, if soon enough.
            needed = self.cooldown.open_until - trio.current_time()
            if needed > settings.retry_after_max_seconds:
                return None
            delay = max(delay, needed)
        if trio.current_time() + delay >= deadline:
            return None
        return delay


def guard(connection: Connection, resilience: Resilience | None) -> Connection:
    """``connection`` wrapped in a :class:`Guard` (strategies are not: they guard their
    targets)."""
    if getattr(connection, "is_strategy", False):
        return connection
    return Guard(connection, resilience)
