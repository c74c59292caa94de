"""``GET /v1/models`` and ``/v1/models/{id}``: listing modes, group filtering, model_info."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
import trio

from tests.conftest import run_gateway
from tests.fakes.openai_upstream import FakeOpenAI, Reply, open_fake_openai, openai_error

KEY = "sk-all"
LIMITED = "sk-limited"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai(models=["gpt-4o", "gpt-4o-mini", "o3", "text-embedding-3"]) as up:
        yield up


def config(fake: FakeOpenAI, mode: str, **extra: Any) -> dict[str, Any]:
    return {
        "connections": {
            "up": {"api_base": fake.base_url, "api_key": "p"},
            "echo": {"api_type": "echo"},
        },
        "routing": {
            "fast": "up.gpt-4o-mini",
            "gpt*": "up.*",
            "o?": "up.*",
            "local-*": "echo.llama",
            "echo-model": "echo.*",
        },
        "groups": {
            "all": {"api_keys": [KEY]},
            "limited": {"api_keys": [LIMITED], "allowed_connections": ["echo"]},
        },
        "model_listing_mode": mode,
        "model_info": {"fast": {"context_window": 128000, "owned_by": "openai"}},
        **extra,
    }


async def ids(base_url: str, key: str) -> list[str]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as sdk:
        return [m.id async for m in sdk.models.list()]


async def test_as_is_lists_routing_keys_literally(fake: FakeOpenAI) -> None:
    async with run_gateway(config(fake, "as_is")) as gateway:
        assert await ids(gateway.base_url, KEY) == ["fast", "gpt*", "o?", "local-*", "echo-model"]
        assert await ids(gateway.base_url, LIMITED) == ["local-*", "echo-model"]
    assert not any(r.path.endswith("/models") for r in fake.requests)


async def test_ignore_wildcards(fake: FakeOpenAI) -> None:
    async with run_gateway(config(fake, "ignore_wildcards")) as gateway:
        assert await ids(gateway.base_url, KEY) == ["fast", "echo-model"]


async def test_expand_wildcards_asks_the_upstream_once_and_filters(fake: FakeOpenAI) -> None:
    async with run_gateway(config(fake, "expand_wildcards")) as gateway:
        first = await ids(gateway.base_url, KEY)
        second = await ids(gateway.base_url, KEY)
    # "gpt*" expands to the upstream's gpt models, "o?" to o3; "local-*" cannot be expanded
    # (it maps every name to one model) and "text-embedding-3" matches no rule.
    assert first == ["fast", "gpt-4o", "gpt-4o-mini", "o3", "echo-model"]
    assert second == first
    listing_calls = [r for r in fake.requests if r.path == "/v1/models"]
    assert len(listing_calls) == 1  # cached
    assert listing_calls[0].headers["authorization"] == "Bearer p"


async def test_expand_wildcards_concurrent_requests_share_one_fetch(fake: FakeOpenAI) -> None:
    fake.push(Reply.json({"object": "list", "data": [{"id": "gpt-x", "object": "model"}]},
                         delay=0.2))
    async with run_gateway(config(fake, "expand_wildcards")) as gateway:
        results: list[list[str]] = []

        async def one() -> None:
            results.append(await ids(gateway.base_url, KEY))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
    assert all("gpt-x" in r for r in results)
    assert len([r for r in fake.requests if r.path == "/v1/models"]) == 1


async def test_expand_wildcards_survives_an_upstream_failure(fake: FakeOpenAI) -> None:
    fake.push(Reply.json(openai_error("nope", type="server_error"), status=500))
    async with run_gateway(config(fake, "expand_wildcards")) as gateway:
        assert await ids(gateway.base_url, KEY) == ["fast", "echo-model"]


async def test_model_info_is_merged(fake: FakeOpenAI) -> None:
    async with run_gateway(config(fake, "as_is")) as gateway, httpx2.AsyncClient() as http:
        response = await http.get(f"{gateway.base_url}/models",
                                  headers={"authorization": f"Bearer {KEY}"})
    entry = next(m for m in response.json()["data"] if m["id"] == "fast")
    assert entry == {"id": "fast", "object": "model", "created": 0, "owned_by": "openai",
                     "context_window": 128000}
    assert response.json()["object"] == "list"


async def test_retrieve_model(fake: FakeOpenAI) -> None:
    async with run_gateway(config(fake, "as_is")) as gateway, openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key=KEY, max_retries=0
    ) as sdk:
        fast = await sdk.models.retrieve("fast")
        assert fast.id == "fast"
        assert fast.owned_by == "openai"
        routed = await sdk.models.retrieve("gpt-anything")  # any name a rule routes
        assert routed.owned_by == "up"
        slashed = await sdk.models.retrieve("local-org/model")
        assert slashed.id == "local-org/model"
        with pytest.raises(openai.NotFoundError):
            await sdk.models.retrieve("claude")
    async with run_gateway(config(fake, "as_is")) as gateway, openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key=LIMITED, max_retries=0
    ) as sdk:
        with pytest.raises(openai.NotFoundError):  # exists, but not for this group
            await sdk.models.retrieve("fast")


async def test_retrieve_model_in_expand_mode_checks_the_upstream(fake: FakeOpenAI) -> None:
    async with run_gateway(config(fake, "expand_wildcards")) as gateway, openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key=KEY, max_retries=0
    ) as sdk:
        assert (await sdk.models.retrieve("gpt-4o")).id == "gpt-4o"
        with pytest.raises(openai.NotFoundError):
            await sdk.models.retrieve("gpt-5-imaginary")


async def test_models_need_a_key(fake: FakeOpenAI) -> None:
    async with run_gateway(config(fake, "as_is")) as gateway, httpx2.AsyncClient() as http:
        response = await http.get(f"{gateway.base_url}/models")
    assert response.status_code == 401
