"""Rate limits through the gateway over HTTP, with the openai SDK and raw httpx2.

lm-proxy's own HTTP-level scenario is ported first (2 requests / 2 s per API key, plus a limit
per connection: which requests get 429, and quota taken by a request the second limiter
refused stays taken); then the answer's shape, per-IP limits behind trusted proxies, token
limits settled from finished requests (streams the client left included), and a Redis limiter
configured in TOML. The sleeps here are the scenario (a window passing), never a wait for a
condition: records are awaited with ``gateway.records.wait_for``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
import trio

from lm_gateway.observability import RequestRecord
from tests.conftest import RunningGateway, run_gateway
from tests.fakes.openai_upstream import Reply, open_fake_openai, sse_event
from tests.redis_support import (  # noqa: F401 - fixtures
    RedisNamespace,
    redis_namespace_fixture,
    redis_url_fixture,
)

KEY = "sk-rate-1"
KEY2 = "sk-rate-2"
GUARD = 20


def echo_config(*before: Any, **extra: Any) -> dict[str, Any]:
    return {
        "connections": {"echo": {"api_type": "echo"}},
        "routing": {"*": "echo.*"},
        "groups": {"default": {"api_keys": [KEY, KEY2]}},
        "before": list(before),
        **extra,
    }


def limiter(**params: Any) -> dict[str, Any]:
    """A ``{class = "RateLimiter", ...}`` table, as a config file writes it."""
    return {"class": "RateLimiter", **params}


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


def auth(key: str = KEY, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **headers}


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient() as client:
        yield client


async def post(
    http: httpx2.AsyncClient, gateway: RunningGateway, key: str = KEY, **kwargs: Any
) -> httpx2.Response:
    headers = auth(key, **kwargs.pop("headers", {}))
    body = kwargs.pop("json", None) or chat()
    return await http.post(
        f"{gateway.base_url}/chat/completions", headers=headers, json=body, **kwargs
    )


def refused_by(response: httpx2.Response) -> str:
    """Which limit a 429 names ("2 requests per 2s"...)."""
    assert response.status_code == 429, response.text
    message = str(response.json()["error"]["message"])
    return message.removeprefix("Rate limit exceeded: ").removesuffix(". Try again later.")


# -- lm-proxy's scenario --------------------------------------------------------------------------


async def test_lm_proxy_scenario_per_key_then_per_connection(http: httpx2.AsyncClient) -> None:
    config = echo_config(
        limiter(max_requests=2, window_seconds=2, per="api_key"),
        limiter(max_requests=4, window_seconds=60, per="connection"),
    )
    async with run_gateway(config) as gateway:
        with trio.fail_after(GUARD):
            # Two requests of key 1 and one of key 2: all admitted (3 on the connection).
            assert (await post(http, gateway, json=chat("test 1"))).status_code == 200
            assert (await post(http, gateway, json=chat("test 2"))).status_code == 200
            assert (await post(http, gateway, KEY2)).status_code == 200
            # Key 1's third and fourth: refused by the per-key limit, which counts neither...
            for _ in range(2):
                response = await post(http, gateway)
                assert refused_by(response) == "2 requests per 2s"
                assert "retry-after" in response.headers
                error = response.json()["error"]
                assert error["type"] == "rate_limit_error"
                assert error["code"] == "rate_limit_exceeded"
            # ...and which never reached the connection limit (still 3 of 4 there).
            await trio.sleep(2.05)  # the per-key window passes (this sleep is the scenario)
            assert (await post(http, gateway)).status_code == 200  # connection: 4 of 4
            # Key 1 is admitted by the per-key limit (its 2nd in the window) but the connection
            # is full: refused by the second limiter...
            assert refused_by(await post(http, gateway)) == "4 requests per 60s"
            # ...and the per-key quota that request took stays taken.
            assert refused_by(await post(http, gateway)) == "2 requests per 2s"
            # Key 2 is admitted per key, then refused by the full connection.
            assert refused_by(await post(http, gateway, KEY2)) == "4 requests per 60s"
            record = await gateway.records.wait_for(lambda r: r.status == 429)
    assert record.outcome == "rejected"
    assert record.error_type == "rate_limit_error"
    assert record.error_code == "rate_limit_exceeded"


# -- the answers ----------------------------------------------------------------------------------


async def test_429_is_openai_shaped_with_retry_after(http: httpx2.AsyncClient) -> None:
    async with run_gateway(echo_config(limiter(max_requests=1, window_seconds=60))) as gateway:
        with trio.fail_after(GUARD):
            ok = await post(http, gateway)
            refused = await post(http, gateway)
    assert ok.status_code == 200
    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("application/json")
    body = refused.json()
    assert set(body) == {"error"}
    assert body["error"] == {
        "message": "Rate limit exceeded: 1 request per 60s. Try again later.",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert refused.headers["retry-after"] in ("59", "60")
    assert refused.headers["x-ratelimit-limit-requests"] == "1"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-request-id"]


async def test_the_sdk_raises_rate_limit_error_and_sees_the_headers() -> None:
    config = echo_config(limiter(max_requests=2, window_seconds=60))
    async with (
        run_gateway(config) as gateway,
        openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0) as sdk,
    ):
        with trio.fail_after(GUARD):
            raw = await sdk.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "hello"}]
            )
            completion = raw.parse()
            assert completion.choices[0].message.content == "hello"
            assert raw.headers["x-ratelimit-limit-requests"] == "2"
            assert raw.headers["x-ratelimit-remaining-requests"] == "1"
            await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
            with pytest.raises(openai.RateLimitError) as info:
                await sdk.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}]
                )
    error = info.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.type == "rate_limit_error"
    assert int(error.response.headers["retry-after"]) >= 1


async def test_ratelimit_headers_on_successful_answers(http: httpx2.AsyncClient) -> None:
    config = echo_config(limiter(max_requests=3, window_seconds=60))
    async with run_gateway(config) as gateway:
        with trio.fail_after(GUARD):
            plain = await post(http, gateway)
            async with http.stream(
                "POST",
                f"{gateway.base_url}/chat/completions",
                headers=auth(),
                json=chat("streamed answer", stream=True),
            ) as streamed:
                body = b"".join([part async for part in streamed.aiter_bytes()])
            last = await post(http, gateway)
    assert plain.status_code == streamed.status_code == last.status_code == 200
    assert b"data: [DONE]" in body
    for response, remaining in ((plain, "2"), (streamed, "1"), (last, "0")):
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-remaining-requests"] == remaining
        assert response.headers["x-ratelimit-reset-requests"] == "1m0s"


# -- per IP, and trusted proxies ------------------------------------------------------------------


def client_from(address: str) -> httpx2.AsyncClient:
    """A client whose connections come from ``address`` (another loopback address)."""
    return httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(local_address=address))


async def test_per_ip_counts_by_client_address() -> None:
    config = echo_config(limiter(max_requests=1, window_seconds=60, per="ip"))
    async with (
        run_gateway(config) as gateway,
        client_from("127.0.0.1") as one,
        client_from("127.0.0.2") as two,
    ):
        with trio.fail_after(GUARD):
            assert (await post(one, gateway)).status_code == 200
            # Another key from the same address: the same bucket.
            assert (await post(one, gateway, KEY2)).status_code == 429
            # Without trusted proxies, a forwarded address is ignored.
            forwarded = {"x-forwarded-for": "203.0.113.9"}
            assert (await post(one, gateway, headers=forwarded)).status_code == 429
            # Another address: another bucket.
            assert (await post(two, gateway)).status_code == 200
            record = await gateway.records.wait_for(lambda r: r.remote_addr == "127.0.0.2")
    assert record.status == 200


def from_address(ip: str, record: RequestRecord) -> bool:
    return record.remote_addr == ip


async def test_forwarded_for_selects_the_bucket_only_from_a_trusted_proxy() -> None:
    config = echo_config(
        limiter(max_requests=1, window_seconds=60, per="ip"), trusted_proxies=["127.0.0.2"]
    )
    async with (
        run_gateway(config) as gateway,
        client_from("127.0.0.2") as proxy,
        client_from("127.0.0.1") as direct,
    ):

        async def status(client: httpx2.AsyncClient, forwarded_for: str | None = None) -> int:
            headers = {"x-forwarded-for": forwarded_for} if forwarded_for else {}
            return (await post(client, gateway, headers=headers)).status_code

        with trio.fail_after(GUARD):
            # Through the trusted proxy: the forwarded client address is the bucket.
            assert await status(proxy, "203.0.113.5") == 200
            assert await status(proxy, "203.0.113.5") == 429
            assert await status(proxy, "198.51.100.7, 203.0.113.6") == 200  # the nearest hop
            assert await status(proxy) == 200  # the proxy's own requests: its own bucket
            # From an untrusted peer the header is ignored: the peer's address is the bucket.
            assert await status(direct, "203.0.113.7") == 200
            assert await status(direct, "203.0.113.8") == 429
            records = [
                await gateway.records.wait_for(partial(from_address, ip))
                for ip in ("203.0.113.5", "203.0.113.6", "127.0.0.2", "127.0.0.1")
            ]
    assert [r.status for r in records] == [200, 200, 200, 200]


# -- token limits ---------------------------------------------------------------------------------


async def remaining_tokens(http: httpx2.AsyncClient, gateway: RunningGateway) -> str:
    """What the next request is told is left (the answer's x-ratelimit-remaining-tokens)."""
    response = await post(http, gateway, json=chat("probe"))
    return str(response.headers.get("x-ratelimit-remaining-tokens"))


async def test_token_limit_end_to_end(http: httpx2.AsyncClient) -> None:
    config = echo_config(limiter(max_requests=None, max_tokens_per_window=20, window_seconds=60))
    async with run_gateway(config) as gateway:
        with trio.fail_after(GUARD):
            # The echo model reports one token per word: 6 prompt + 6 completion = 12.
            first = await post(http, gateway, json=chat("one two three four five six"))
            assert first.status_code == 200
            assert first.json()["usage"]["total_tokens"] == 12
            assert first.headers["x-ratelimit-limit-tokens"] == "20"
            assert first.headers["x-ratelimit-remaining-tokens"] == "20"
            # Settled when the record reaches the listeners (after the answer went out).
            await gateway.records.wait_for(lambda r: r.id == first.headers["x-request-id"])
            second = await post(http, gateway, json=chat("seven eight nine ten"))
            assert second.status_code == 200
            assert second.headers["x-ratelimit-remaining-tokens"] == "8"
            await gateway.records.wait_for(lambda r: r.id == second.headers["x-request-id"])
            # 12 + 8 = 20: the limit is reached.
            refused = await post(http, gateway)
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "20 tokens per 60s" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 59


async def test_a_stream_the_client_left_is_settled_with_an_estimate(
    http: httpx2.AsyncClient,
) -> None:
    config = {
        **echo_config(limiter(max_requests=None, max_tokens_per_window=1000, window_seconds=60)),
        "connections": {"echo": {"api_type": "echo", "chunk_delay_seconds": 30}},
    }
    messages = [{"role": "user", "content": "many words here " * 20}]
    async with run_gateway(config) as gateway:
        with trio.fail_after(GUARD):
            async with http.stream(
                "POST",
                f"{gateway.base_url}/chat/completions",
                headers=auth(),
                json={"model": "m", "messages": messages, "stream": True},
            ) as response:
                assert response.status_code == 200
                async for _ in response.aiter_bytes():
                    break  # the first chunk came; the rest is 30 s away: leave
            record = await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
            assert record.usage is None  # the echo stream reports usage only at its end
            assert record.chunks >= 1
            # The documented estimate: 4 bytes of the prompt per token, 1 per streamed chunk.
            estimate = len(orjson.dumps(messages)) // 4 + record.chunks
            assert await remaining_tokens(http, gateway) == str(1000 - estimate)


def _chunk(content: str, usage: dict[str, int] | None = None) -> bytes:
    data: dict[str, Any] = {
        "id": "chatcmpl-partial",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    if usage is not None:
        data["usage"] = usage
    return sse_event(data)


async def test_a_stream_the_client_left_is_settled_with_the_usage_reported_so_far(
    http: httpx2.AsyncClient,
) -> None:
    async with open_fake_openai() as fake:
        config = {
            "connections": {"up": {"api_base": fake.base_url, "api_key": "sk-provider"}},
            "routing": {"*": "up.*"},
            "groups": {"default": {"api_keys": [KEY]}},
            "before": [limiter(max_requests=None, max_tokens_per_window=1000)],
        }
        # Providers that report usage as they go (continuous usage stats) put it in chunks.
        usage = {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42}
        fake.push(Reply.stream_then_stall([_chunk("partial ", usage), _chunk("answer ")]))
        async with run_gateway(config) as gateway:
            with trio.fail_after(GUARD):
                async with http.stream(
                    "POST",
                    f"{gateway.base_url}/chat/completions",
                    headers=auth(),
                    json={
                        "model": "gpt-4o",
                        "messages": [{"role": "user", "content": "x"}],
                        "stream": True,
                    },
                ) as response:
                    received = b""
                    async for data in response.aiter_bytes():
                        received += data
                        if b"answer" in received:
                            break  # leave mid-stream: the upstream now stalls
                record = await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
                assert record.usage == usage
                assert await remaining_tokens(http, gateway) == str(1000 - 42)


# -- a Redis limiter from a TOML file -------------------------------------------------------------


async def test_redis_limiter_configured_in_toml(
    redis_namespace: RedisNamespace, tmp_path: Path, http: httpx2.AsyncClient
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        "before = [{ "
        f'class = "RateLimiter", storage = "redis", redis_url = "{redis_namespace.url}", '
        f'name = "{redis_namespace.name}", max_requests = 2, window_seconds = 60, '
        'on_storage_error = "deny" }]\n'
        "\n"
        "[connections.echo]\n"
        'api_type = "echo"\n'
        "\n"
        "[routing]\n"
        '"*" = "echo.*"\n'
        "\n"
        "[groups.default]\n"
        f'api_keys = ["{KEY}"]\n'
    )
    with trio.fail_after(GUARD):
        async with run_gateway(str(path)) as gateway:
            first = await post(http, gateway)
            second = await post(http, gateway)
            third = await post(http, gateway)
        # The count is in Redis: a second gateway from the same file shares it.
        async with run_gateway(str(path)) as again:
            fourth = await post(http, again)
    assert [first.status_code, second.status_code] == [200, 200], first.text
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert refused_by(third) == "2 requests per 60s"
    assert refused_by(fourth) == "2 requests per 60s"
    keys = await redis_namespace.keys()
    assert len(keys) == 1
    assert keys[0].startswith(f"lmgw:rl:{redis_namespace.name}:".encode())
