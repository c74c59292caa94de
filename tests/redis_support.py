"""Fixtures for tests that need a real Redis on 127.0.0.1:6379.

Use them by importing into a test module (pytest finds fixtures in the module's namespace)::

    from tests.redis_support import redis_namespace_fixture, redis_url_fixture  # noqa: F401

and name ``redis_url`` / ``redis_namespace`` as test parameters.

``redis_url`` checks that Redis answers a PING (within a short deadline) and gives its URL. When
it does not answer, the test is skipped with the reason, or fails when the environment sets
``LM_GATEWAY_REQUIRE_SERVICES=1`` (CI does: there a missing Redis is a broken build, not a
reason to skip). ``redis_namespace`` gives the test a unique name to pass as a limiter's
``name=`` (every key a limiter writes starts with ``lmgw:rl:<name>``), so concurrent or repeated
tests never see each other's counts, and deletes those keys after the test.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import attrs
import pytest
import trio

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
#: How long the reachability check may take.
PING_DEADLINE = 3.0
#: The prefix RateLimiter puts before its name in every Redis key.
LIMITER_PREFIX = "lmgw:rl:"


def services_required() -> bool:
    """Whether a missing service must fail the test run (CI) instead of skipping."""
    return os.environ.get("LM_GATEWAY_REQUIRE_SERVICES", "").strip() == "1"


async def redis_problem(url: str = REDIS_URL) -> str | None:
    """None when Redis at ``url`` answers PING in time, else what went wrong."""
    try:
        import coredis
    except ImportError as exc:  # pragma: no cover - coredis is a test dependency
        return f"coredis is not installed ({exc})"
    try:
        with trio.fail_after(PING_DEADLINE):
            client = coredis.Redis.from_url(url, decode_responses=False)
            async with client:
                answer = await client.ping()
    except trio.TooSlowError:
        return f"Redis at {url} did not answer PING within {PING_DEADLINE:g} s"
    except Exception as exc:  # connection refused, protocol errors, grouped errors...
        leaf = _leaf(exc)
        return f"Redis at {url} is not reachable ({type(leaf).__name__}: {leaf})"
    if answer not in (b"PONG", "PONG", True):
        return f"Redis at {url} answered PING with {answer!r}"
    return None


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups: what to tell the reader."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def require_redis(url: str = REDIS_URL) -> str:
    """``url`` if Redis is reachable; otherwise skip the test, or fail it when services are
    required (``LM_GATEWAY_REQUIRE_SERVICES=1``).

    Synchronous (it runs its own short trio run), so it works in plain fixtures, before the
    test's own trio run starts: a skip raised there keeps its reason.
    """
    problem = trio.run(redis_problem, url)
    if problem is None:
        return url
    start = (
        "start one with: redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 "
        '--save "" --appendonly no'
    )
    if services_required():
        pytest.fail(f"{problem}; LM_GATEWAY_REQUIRE_SERVICES=1 requires it ({start})")
    pytest.skip(f"{problem}; {start} (set LM_GATEWAY_REQUIRE_SERVICES=1 to fail instead)")


async def delete_matching(url: str, pattern: str) -> int:
    """Delete every key matching the glob ``pattern``; returns how many were deleted."""
    import coredis

    deleted = 0
    with trio.fail_after(10):
        client = coredis.Redis.from_url(url, decode_responses=False)
        async with client:
            keys = [key async for key in client.scan_iter(match=pattern, count=500)]
            for start in range(0, len(keys), 500):
                deleted += int(await client.delete(keys[start : start + 500]))
    return deleted


async def keys_matching(url: str, pattern: str) -> list[bytes]:
    """The keys matching the glob ``pattern`` (sorted)."""
    import coredis

    with trio.fail_after(10):
        client = coredis.Redis.from_url(url, decode_responses=False)
        async with client:
            return sorted([key async for key in client.scan_iter(match=pattern, count=500)])


@attrs.define
class RedisNamespace:
    """A unique limiter name for one test, and the Redis it lives in.

    ``name`` is passed as ``RateLimiter(name=...)``; :meth:`child` makes further unique names
    (a second, independent limiter in the same test) under the same namespace.
    """

    url: str
    name: str

    def child(self, suffix: str) -> str:
        return f"{self.name}-{suffix}"

    @property
    def key_pattern(self) -> str:
        """The glob matching every key of this namespace's limiters."""
        return f"{LIMITER_PREFIX}{self.name}*"

    async def keys(self) -> list[bytes]:
        return await keys_matching(self.url, self.key_pattern)

    async def clean(self) -> int:
        return await delete_matching(self.url, self.key_pattern)


# The fixtures are registered under their short names (``redis_url``, ``redis_namespace``)
# but defined under longer ones, so a test module importing them does not trip ruff's
# "redefinition" check when a test takes ``redis_namespace`` as a parameter.


@pytest.fixture(name="redis_url")
def redis_url_fixture() -> str:
    """The URL of the local Redis (skips or fails the test when it is not reachable)."""
    return require_redis(REDIS_URL)


@pytest.fixture(name="redis_namespace")
def redis_namespace_fixture(redis_url: str) -> Iterator[RedisNamespace]:
    """A unique limiter name for this test; its Redis keys are deleted afterwards.

    A plain fixture: setup and cleanup run outside the test's trio run (cleanup after it).
    """
    namespace = RedisNamespace(url=redis_url, name=f"test-{os.getpid()}-{secrets.token_hex(6)}")
    yield namespace
    trio.run(namespace.clean)


#: The short names work as imports too (``from tests.redis_support import redis_url``).
redis_url = redis_url_fixture
redis_namespace = redis_namespace_fixture
