"""Cooldown state shared through Redis, so gateway instances agree on which connection is down.

Each instance keeps its own :class:`~.guard.Cooldown` (decisions need no round trip) and
synchronises it with two Redis keys per connection:

* ``lmgw:cd:<name>:failures``: consecutive failures seen by any instance (expires after
  ``cooldown_seconds`` without a new one); a success anywhere resets it;
* ``lmgw:cd:<name>:open``: present while the connection cools down (its TTL is the time left).

An instance reports each failure (one atomic script: count, and open the cooldown at the
threshold or on a 429's ``Retry-After``) and reads the ``open`` key's TTL before a request at
most every ``sync_seconds``. When the key expires every instance half-opens on its own, so up to
one probe per instance goes out. Redis trouble never fails a request: the instance carries on
with its local state and logs a warning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import trio

log = logging.getLogger("lm_gateway.strategies")

_FAILURE_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local explicit = tonumber(ARGV[3])
if explicit > 0 then
  redis.call('SET', KEYS[2], '1', 'PX', explicit)
  return -1
end
if n >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
  redis.call('DEL', KEYS[1])
  return -1
end
return n
"""


class SharedCooldown:
    """The Redis side of one connection's cooldown (see the module docstring)."""

    def __init__(
        self, url: str, name: str, *, timeout_seconds: float = 0.5, sync_seconds: float = 0.5
    ) -> None:
        self.url = url
        self.failures_key = f"lmgw:cd:{name}:failures"
        self.open_key = f"lmgw:cd:{name}:open"
        self.timeout_seconds = timeout_seconds
        self.sync_seconds = sync_seconds
        self._client: Any = None
        self._failure: Any = None
        self._next_sync = -float("inf")
        self._warned = False

    @contextlib.asynccontextmanager
    async def lifetime(self) -> AsyncIterator[None]:
        import coredis

        client = coredis.Redis.from_url(self.url, decode_responses=False)
        async with client:
            self._client = client
            self._failure = client.register_script(_FAILURE_SCRIPT)
            try:
                yield
            finally:
                self._client = None

    def _trouble(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("shared cooldown state in Redis unavailable (%s: %s); using local "
                        "state", type(exc).__name__, exc)  # fmt: skip

    async def remaining(self) -> float | None:
        """Seconds the connection still cools down according to Redis (None: not cooling, or
        not checked this time)."""
        now = trio.current_time()
        if self._client is None or now < self._next_sync:
            return None
        self._next_sync = now + self.sync_seconds
        try:
            with trio.fail_after(self.timeout_seconds):
                ttl = await self._client.pttl(self.open_key)
        except Exception as exc:
            self._trouble(exc)
            return None
        self._warned = False
        return ttl / 1000 if isinstance(ttl, int) and ttl > 0 else None

    async def failure(self, threshold: int, cooldown_seconds: float, open_for: float) -> None:
        """Count a failure; ``open_for`` > 0 opens the cooldown for that long at once."""
        if self._client is None:
            return
        try:
            with trio.fail_after(self.timeout_seconds):
                await self._failure(
                    keys=[self.failures_key, self.open_key],
                    args=[threshold, max(1, int(cooldown_seconds * 1000)), int(open_for * 1000)],
                )
        except Exception as exc:
            self._trouble(exc)
        self._next_sync = -float("inf")  # look again before the next request

    async def success(self) -> None:
        """A success resets the consecutive failures (and ends a cooldown being probed)."""
        if self._client is None:
            return
        try:
            with trio.fail_after(self.timeout_seconds):
                await self._client.delete([self.failures_key, self.open_key])
        except Exception as exc:
            self._trouble(exc)
