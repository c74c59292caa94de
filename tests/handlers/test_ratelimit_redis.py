"""``RateLimiter(storage="redis")`` against the real Redis on 127.0.0.1:6379.

Each test gets its own limiter name (``redis_namespace``), so its keys are its own and are
deleted afterwards. Redis decides with its own clock, so these tests run on trio's real clock
and the sleeps in them *are* the scenario (a window passing), never a wait for a condition.
The key requirement is the last group: several gateways sharing one Redis enforce one limit
exactly, whether they are two apps in this process or two ``lm-gateway`` processes.
"""

from __future__ import annotations

import logging
import socket
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import coredis
import httpx2
import orjson
import pytest
import trio

from lm_gateway.context import RequestContext
from lm_gateway.errors import AuthUnavailable, RateLimited
from lm_gateway.handlers import RateLimiter
from lm_gateway.handlers.ratelimit import RedisStorage
from tests.conftest import run_gateway
from tests.handlers.test_ratelimit import OTHER, finished, make_ctx
from tests.redis_support import (  # noqa: F401 - fixtures
    RedisNamespace,
    redis_namespace_fixture,
    redis_url_fixture,
)

GUARD = 20
KEY = "sk-redis-test"


def redis_limiter(ns: RedisNamespace, suffix: str = "", **kwargs: Any) -> RateLimiter:
    kwargs.setdefault("max_requests", 2)
    kwargs.setdefault("window_seconds", 60)
    return RateLimiter(
        storage="redis",
        redis_url=ns.url,
        name=ns.child(suffix) if suffix else ns.name,
        **kwargs,
    )


async def admitted(limiter: RateLimiter, ctx: RequestContext | None = None) -> bool:
    try:
        await limiter(ctx if ctx is not None else make_ctx())
    except RateLimited:
        return False
    return True


async def refusal(limiter: RateLimiter, ctx: RequestContext | None = None) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        await limiter(ctx if ctx is not None else make_ctx())
    return info.value


async def tokens_counted(limiter: RateLimiter, ctx: RequestContext) -> float:
    used, _ = await limiter.storage.tokens(limiter.key(ctx), limiter.window_seconds)
    return used


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def stalling_redis() -> AsyncIterator[str]:
    """A TCP server on loopback that accepts connections and never answers."""

    async def stall(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, stall, 0)
        port = listeners[0].socket.getsockname()[1]
        yield f"redis://127.0.0.1:{port}/0"
        nursery.cancel_scope.cancel()


# -- the core semantics, on Redis -----------------------------------------------------------------


async def test_admits_at_the_limit_then_refuses_with_headers(
    redis_namespace: RedisNamespace,
) -> None:
    limiter = redis_limiter(redis_namespace, max_requests=3, window_seconds=60)
    assert isinstance(limiter.storage, RedisStorage)
    with trio.fail_after(GUARD):
        async with limiter.lifetime():
            for remaining in ("2", "1", "0"):
                ctx = make_ctx()
                await limiter(ctx)
                assert ctx.response_headers == {
                    "x-ratelimit-limit-requests": "3",
                    "x-ratelimit-remaining-requests": remaining,
                    "x-ratelimit-reset-requests": "1m0s",
                }
            error = await refusal(limiter)
    assert error.http_status == 429
    assert error.code == "rate_limit_exceeded"
    assert "3 requests per 60s" in error.message
    assert 58 <= int(error.headers["retry-after"]) <= 60
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-limit-requests"] == "3"
    # The counts live under the limiter's name, and expire with the window.
    keys = await redis_namespace.keys()
    assert keys == [f"lmgw:rl:{redis_namespace.name}:kid-a".encode()]
    client = coredis.Redis.from_url(redis_namespace.url)
    async with client:
        ttl_ms = await client.pttl(keys[0])
    assert 0 < ttl_ms <= 60_000


async def test_rejected_requests_do_not_count_and_the_window_slides(
    redis_namespace: RedisNamespace,
) -> None:
    limiter = redis_limiter(redis_namespace, max_requests=1, window_seconds=1.0)
    with trio.fail_after(GUARD):
        async with limiter.lifetime():
            assert await admitted(limiter)
            start = trio.current_time()
            # Hammering the full limiter for 0.6 s: refused, and not counted.
            for _ in range(3):
                await trio.sleep(0.2)
                error = await refusal(limiter)
                assert error.headers["retry-after"] == "1"
            # The window passes (this sleep is the scenario): counting the refusals would have
            # pushed the next admission to 1.6 s.
            await trio.sleep_until(start + 1.05)
            assert await admitted(limiter)
            assert not await admitted(limiter)


async def test_scopes_key_the_shared_counts(redis_namespace: RedisNamespace) -> None:
    combined = redis_limiter(redis_namespace, "combined", max_requests=1, per=["api_key", "model"])
    everyone = redis_limiter(redis_namespace, "global", max_requests=1, per="global")
    anonymous = redis_limiter(redis_namespace, "anon", max_requests=1, per="api_key")
    with trio.fail_after(GUARD):
        async with combined.lifetime(), everyone.lifetime(), anonymous.lifetime():
            assert await admitted(combined, make_ctx())
            others = {k: v for k, v in OTHER.items() if k not in ("api_key_id", "model")}
            assert not await admitted(combined, make_ctx(**others))
            assert await admitted(combined, make_ctx(model="m2"))
            assert await admitted(combined, make_ctx(api_key_id="kid-b"))
            assert await admitted(everyone, make_ctx())
            assert not await admitted(everyone, make_ctx(**OTHER))
            assert await admitted(anonymous, make_ctx(api_key_id=None))
            assert not await admitted(
                anonymous,
                make_ctx(api_key_id=None, **{k: v for k, v in OTHER.items() if k != "api_key_id"}),
            )
            assert await admitted(anonymous, make_ctx())
    keys = {key.decode() for key in await redis_namespace.keys()}
    prefix = f"lmgw:rl:{redis_namespace.name}"
    assert keys == {
        f"{prefix}-combined:kid-a|m1",
        f"{prefix}-combined:kid-a|m2",
        f"{prefix}-combined:kid-b|m1",
        f"{prefix}-global:*",
        f"{prefix}-anon:anon",
        f"{prefix}-anon:kid-a",
    }


async def test_admitted_here_but_refused_later_still_counts(
    redis_namespace: RedisNamespace,
) -> None:
    per_key = redis_limiter(redis_namespace, "key", max_requests=2, per="api_key")
    per_connection = redis_limiter(redis_namespace, "conn", max_requests=1, per="connection")

    async def chain(ctx: RequestContext) -> str:
        for index, limiter in enumerate((per_key, per_connection)):
            if not await admitted(limiter, ctx):
                return f"refused by #{index + 1}"
        return "ok"

    with trio.fail_after(GUARD):
        async with per_key.lifetime(), per_connection.lifetime():
            assert await chain(make_ctx()) == "ok"
            assert await chain(make_ctx()) == "refused by #2"
            assert await chain(make_ctx()) == "refused by #1"


async def test_concurrent_decisions_are_atomic(redis_namespace: RedisNamespace) -> None:
    limiter = redis_limiter(redis_namespace, max_requests=7, per="global")
    results: list[bool] = []

    async def one() -> None:
        results.append(await admitted(limiter))

    with trio.fail_after(GUARD):
        async with limiter.lifetime(), trio.open_nursery() as nursery:
            for _ in range(60):
                nursery.start_soon(one)
    assert results.count(True) == 7
    assert results.count(False) == 53


async def test_token_limit_on_redis(redis_namespace: RedisNamespace) -> None:
    limiter = redis_limiter(
        redis_namespace, max_requests=None, max_tokens_per_window=100, window_seconds=60
    )
    other = redis_limiter(
        redis_namespace, "other", max_requests=None, max_tokens_per_window=100, per="global"
    )
    with trio.fail_after(GUARD):
        async with limiter.lifetime(), other.lifetime():
            first = make_ctx()
            await limiter(first)
            assert first.response_headers["x-ratelimit-remaining-tokens"] == "100"
            refused_by_other = make_ctx()
            await limiter(refused_by_other)
            finished(first, {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70})
            await limiter.settle(first)
            await other.settle(first)  # `other` never admitted it: nothing counted there
            assert await tokens_counted(limiter, first) == 70
            assert await tokens_counted(other, first) == 0
            # A cancelled stream with no usage: the documented estimate.
            messages = [{"role": "user", "content": "y" * 80}]
            cut = make_ctx(request={"model": "m1", "messages": messages, "stream": True})
            await limiter(cut)
            assert cut.response_headers["x-ratelimit-remaining-tokens"] == "30"
            cut.internal["upstream_started"] = True
            cut.stream = True
            cut.chunks = 3
            finished(cut, None, outcome="cancelled")
            await limiter.settle(cut)
            estimate = len(orjson.dumps(messages)) // 4 + 3
            assert await tokens_counted(limiter, first) == 70 + estimate
            error = await refusal(limiter)
            assert "100 tokens per 60s" in error.message
            assert error.headers["x-ratelimit-remaining-tokens"] == "0"
            assert 58 <= int(error.headers["retry-after"]) <= 60


async def test_token_window_slides_on_redis(redis_namespace: RedisNamespace) -> None:
    limiter = redis_limiter(
        redis_namespace, max_requests=None, max_tokens_per_window=10, window_seconds=1
    )
    with trio.fail_after(GUARD):
        async with limiter.lifetime():
            ctx = make_ctx()
            await limiter(ctx)
            finished(ctx, {"total_tokens": 10})
            await limiter.settle(ctx)
            error = await refusal(limiter)
            assert error.headers["retry-after"] == "1"
            # Tokens are kept in one-second buckets: after 1 s (+ a margin) they have left.
            await trio.sleep(1.05)
            assert await admitted(limiter)


# -- when Redis cannot be reached -----------------------------------------------------------------


async def test_fail_open_admits_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RateLimiter(
        max_requests=1,
        max_tokens_per_window=10,
        storage="redis",
        redis_url=f"redis://127.0.0.1:{closed_port()}/0",
        name="unreachable",
    )
    assert limiter.on_storage_error == "allow"  # the default
    with caplog.at_level(logging.WARNING, logger="lm_gateway.ratelimit"), trio.fail_after(GUARD):
        async with limiter.lifetime():
            contexts = [make_ctx() for _ in range(3)]
            for ctx in contexts:
                await limiter(ctx)  # over max_requests, but nothing can count: admitted
            finished(contexts[0], {"total_tokens": 50})
            await limiter.settle(contexts[0])  # cannot count either: a warning, no exception
    messages = [r.getMessage() for r in caplog.records if r.name == "lm_gateway.ratelimit"]
    assert sum("admitting (fail-open)" in m for m in messages) == 3, messages
    assert any("could not count 50 tokens" in m for m in messages), messages
    assert all("admitting (fail-open)" in m or "could not count" in m for m in messages)


async def test_fail_closed_answers_503() -> None:
    limiter = RateLimiter(
        storage="redis",
        redis_url=f"redis://127.0.0.1:{closed_port()}/0",
        on_storage_error="deny",
        name="fail-closed",
    )
    with trio.fail_after(GUARD):
        async with limiter.lifetime():
            with pytest.raises(AuthUnavailable) as info:
                await limiter(make_ctx())
    error = info.value
    assert error.http_status == 503
    assert error.code == "rate_limit_storage_unavailable"
    assert error.type == "service_unavailable"
    assert error.detail  # what failed, for debug mode and logs


async def test_a_limiter_whose_lifetime_is_not_open_cannot_count() -> None:
    """Outside the gateway's serving lifetime there is no client: a storage failure."""
    deny = RateLimiter(
        storage="redis",
        redis_url="redis://127.0.0.1:6379/0",
        on_storage_error="deny",
        name="never-opened",
    )
    with pytest.raises(AuthUnavailable) as info:
        await deny(make_ctx())
    assert "not open" in str(info.value.detail)


@pytest.mark.parametrize("mode", ["allow", "deny"])
async def test_a_redis_that_never_answers_is_a_storage_failure_after_the_timeout(
    stalling_redis: str, mode: str
) -> None:
    limiter = RateLimiter(
        storage="redis",
        redis_url=stalling_redis,
        on_storage_error=mode,  # type: ignore[arg-type]
        storage_timeout_seconds=0.3,
        name="stalled",
    )
    with trio.fail_after(GUARD):
        async with limiter.lifetime():
            started = trio.current_time()
            if mode == "allow":
                await limiter(make_ctx())
            else:
                with pytest.raises(AuthUnavailable):
                    await limiter(make_ctx())
            waited = trio.current_time() - started
    assert 0.3 <= waited < 5


async def test_http_fail_open_and_fail_closed() -> None:
    port = closed_port()
    modes: list[tuple[Literal["allow", "deny"], int]] = [("allow", 200), ("deny", 503)]
    for mode, status in modes:
        config = {
            "connections": {"echo": {"api_type": "echo"}},
            "routing": {"*": "echo.*"},
            "groups": {"default": {"api_keys": [KEY]}},
            "before": [
                RateLimiter(
                    storage="redis",
                    redis_url=f"redis://127.0.0.1:{port}/0",
                    on_storage_error=mode,
                    name=f"http-{mode}",
                )
            ],
        }
        with trio.fail_after(GUARD):
            async with run_gateway(config) as gateway, httpx2.AsyncClient() as http:
                response = await http.post(
                    f"{gateway.base_url}/chat/completions",
                    headers={"authorization": f"Bearer {KEY}"},
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                )
        assert response.status_code == status, response.text
        if status == 503:
            error = response.json()["error"]
            assert error["code"] == "rate_limit_storage_unavailable"
            assert error["type"] == "service_unavailable"


# -- one limit across gateway instances ---------------------------------------------------------

N = 10


def shared_limit_config(limiter: RateLimiter) -> dict[str, Any]:
    return {
        "connections": {"echo": {"api_type": "echo"}},
        "routing": {"*": "echo.*"},
        "groups": {"default": {"api_keys": [KEY]}},
        "before": [limiter],
    }


async def hammer(base_urls: list[str], clients: int, per_client: int) -> list[int]:
    """``clients`` concurrent clients, each with its own connection pool, sending
    ``per_client`` requests spread over ``base_urls``; returns every status."""
    statuses: list[int] = []

    async def client(index: int) -> None:
        async with httpx2.AsyncClient() as http:
            for i in range(per_client):
                base = base_urls[(index + i) % len(base_urls)]
                response = await http.post(
                    f"{base}/chat/completions",
                    headers={"authorization": f"Bearer {KEY}"},
                    json={"model": "m", "messages": [{"role": "user", "content": f"{index}"}]},
                )
                statuses.append(response.status_code)

    async with trio.open_nursery() as nursery:
        for index in range(clients):
            nursery.start_soon(client, index)
    return statuses


async def test_two_gateways_sharing_redis_admit_exactly_n_in_total(
    redis_namespace: RedisNamespace,
) -> None:
    # Two gateways, each with its own limiter object: the same Redis, the same name.
    limiters = [
        RateLimiter(
            max_requests=N,
            window_seconds=60,
            per="api_key",
            storage="redis",
            redis_url=redis_namespace.url,
            name=redis_namespace.name,
        )
        for _ in range(2)
    ]
    with trio.fail_after(GUARD * 2):
        async with (
            run_gateway(shared_limit_config(limiters[0])) as one,
            run_gateway(shared_limit_config(limiters[1])) as two,
        ):
            statuses = await hammer([one.base_url, two.base_url], clients=10, per_client=5)
            # Both gateways served (and refused) a share of the requests.
            for gateway in (one, two):
                await gateway.records.wait_for(lambda r: r.status == 429)
    assert len(statuses) == 5 * N
    assert statuses.count(200) == N, statuses
    assert statuses.count(429) == 4 * N, statuses
    # Redis holds one shared bucket for the key.
    assert len(await redis_namespace.keys()) == 1


@pytest.mark.slow
async def test_two_gateway_processes_sharing_redis_admit_exactly_n_in_total(
    redis_namespace: RedisNamespace, tmp_path: Path
) -> None:
    from tests.e2e.test_cli import PYTHON, clean_env, free_port, running

    limiter = (
        f'{{ class = "RateLimiter", storage = "redis", redis_url = "{redis_namespace.url}", '
        f'name = "{redis_namespace.name}", max_requests = {N}, window_seconds = 60, '
        'per = "global" }'
    )
    config = f"before = [{limiter}]\n" + textwrap.dedent(
        f"""
        [connections.echo]
        api_type = "echo"

        [routing]
        "*" = "echo.*"

        [groups.default]
        api_keys = ["{KEY}"]
        """
    )
    bases = []
    argvs = []
    for index in range(2):
        directory = tmp_path / f"gw{index}"
        directory.mkdir()
        (directory / "config.toml").write_text(config)
        port = free_port()
        bases.append(f"http://127.0.0.1:{port}")
        argvs.append([PYTHON, "-m", "lm_gateway", "--config", "config.toml", "--port", str(port)])
    env = clean_env()
    async with (
        running(argvs[0], tmp_path / "gw0", env, f"{bases[0]}/health"),
        running(argvs[1], tmp_path / "gw1", env, f"{bases[1]}/health"),
    ):
        with trio.fail_after(GUARD * 2):
            statuses = await hammer([f"{b}/v1" for b in bases], clients=10, per_client=5)
    assert statuses.count(200) == N, statuses
    assert statuses.count(429) == 4 * N, statuses
