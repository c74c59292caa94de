"""Cooldown state shared through the real local Redis: two gateways agree a connection is down."""

from __future__ import annotations

import secrets
from typing import Any

import openai
import pytest

from tests.conftest import run_gateway
from tests.fakes.openai_upstream import Reply, open_fake_openai, openai_error
from tests.redis_support import delete_matching, redis_url_fixture  # noqa: F401

KEY = "sk-shared"
MESSAGES = [{"role": "user", "content": "hello"}]


def config(fake: Any, name: str, redis_url: str) -> dict[str, Any]:
    return {
        "connections": {
            name: {
                "api_base": fake.base_url, "api_key": "k", "cooldown_after_failures": 2,
                "cooldown_seconds": 30, "cooldown_redis_url": redis_url,
            }
        },
        "routing": {"*": f"{name}.*"},
        "groups": {"default": {"api_keys": [KEY]}},
    }  # fmt: skip


async def test_failures_seen_by_one_gateway_cool_the_connection_down_for_another(
    redis_url: str,
) -> None:
    name = f"shared{secrets.token_hex(4)}"
    try:
        async with open_fake_openai() as fake:
            failure = Reply.json(openai_error("down", "server_error"), status=503)
            fake.push(failure, failure)
            async with (
                run_gateway(config(fake, name, redis_url)) as first,
                run_gateway(config(fake, name, redis_url)) as second,
            ):
                one = openai.AsyncOpenAI(base_url=first.base_url, api_key=KEY, max_retries=0)
                two = openai.AsyncOpenAI(base_url=second.base_url, api_key=KEY, max_retries=0)
                for _ in range(2):
                    with pytest.raises(openai.InternalServerError):
                        await one.chat.completions.create(model="m", messages=MESSAGES)
                # The second gateway never saw a failure, yet skips the connection.
                with pytest.raises(openai.APIStatusError) as cooling:
                    await two.chat.completions.create(model="m", messages=MESSAGES)
            assert cooling.value.status_code == 503
            assert cooling.value.code == "connection_cooling_down"
            assert 25 <= int(cooling.value.response.headers["retry-after"]) <= 30
            assert len(fake.requests) == 2
    finally:
        await delete_matching(redis_url, f"lmgw:cd:{name}:*")


async def test_a_429_retry_after_is_shared(redis_url: str) -> None:
    name = f"shared{secrets.token_hex(4)}"
    try:
        async with open_fake_openai() as fake:
            fake.push(
                Reply.json(openai_error("slow down"), status=429, headers={"retry-after": "12"})
            )
            async with (
                run_gateway(config(fake, name, redis_url)) as first,
                run_gateway(config(fake, name, redis_url)) as second,
            ):
                one = openai.AsyncOpenAI(base_url=first.base_url, api_key=KEY, max_retries=0)
                two = openai.AsyncOpenAI(base_url=second.base_url, api_key=KEY, max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    await one.chat.completions.create(model="m", messages=MESSAGES)
                with pytest.raises(openai.APIStatusError) as cooling:
                    await two.chat.completions.create(model="m", messages=MESSAGES)
            assert 10 <= int(cooling.value.response.headers["retry-after"]) <= 12
            assert len(fake.requests) == 1
    finally:
        await delete_matching(redis_url, f"lmgw:cd:{name}:*")


async def test_redis_down_means_local_state_not_failures() -> None:
    """An unreachable Redis never fails a request: the gateway carries on locally."""
    async with open_fake_openai() as fake:
        data = config(fake, "local", "redis://127.0.0.1:1/0")
        async with run_gateway(data) as gateway:
            llm = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
            done = await llm.chat.completions.create(model="m", messages=MESSAGES)
    assert done.choices[0].message.content == "echo: hello"
