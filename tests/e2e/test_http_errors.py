"""Bad input and refusals at the HTTP edge: every error is OpenAI-shaped with the right status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest

from tests.conftest import RunningGateway, run_gateway

KEY = "sk-user-1"
ADMIN = "sk-admin-1"


def assert_openai_error(response: httpx2.Response, status: int, code: str | None = None) -> dict[
    str, Any
]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return dict(body["error"])


@pytest.fixture
async def gateway() -> AsyncIterator[RunningGateway]:
    config = {
        "connections": {
            "echo": {"api_type": "echo"},
            "premium": {"api_type": "echo"},
        },
        "routing": {"big-*": "premium.*", "*": "echo.*"},
        "groups": {
            "users": {
                "api_keys": [KEY],
                "allowed_connections": "echo",
                "allowed_models": ["small-*", "chat"],
            },
            "admin": {"api_keys": [ADMIN], "allowed_connections": "*"},
        },
        "max_request_body_bytes": 4096,
    }
    async with run_gateway(config) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient() as client:
        yield client


def chat(model: str = "chat", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_missing_key_is_401(gateway: RunningGateway, http: httpx2.AsyncClient) -> None:
    response = await http.post(f"{gateway.base_url}/chat/completions", json=chat())
    error = assert_openai_error(response, 401, "invalid_api_key")
    assert "API key" in error["message"]


async def test_wrong_key_is_401_and_never_echoed(
    gateway: RunningGateway, http: httpx2.AsyncClient
) -> None:
    response = await http.post(
        f"{gateway.base_url}/chat/completions",
        headers={"authorization": "Bearer sk-guess-123"},
        json=chat(),
    )
    assert_openai_error(response, 401, "invalid_api_key")
    assert "sk-guess-123" not in response.text
    record = await gateway.records.wait_for(lambda r: r.status == 401)
    assert record.outcome == "rejected"
    assert record.api_key_id is None


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": f"Bearer {KEY}"},
        {"authorization": f"bearer {KEY}"},
        {"x-api-key": KEY},
        {"api-key": KEY},
    ],
)
async def test_key_headers(
    gateway: RunningGateway, http: httpx2.AsyncClient, headers: dict[str, str]
) -> None:
    response = await http.post(f"{gateway.base_url}/chat/completions", headers=headers,
                               json=chat())
    assert response.status_code == 200, response.text


async def test_group_may_not_use_connection_is_403(
    gateway: RunningGateway, http: httpx2.AsyncClient
) -> None:
    response = await http.post(
        f"{gateway.base_url}/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json=chat("big-model"),
    )
    error = assert_openai_error(response, 403, "connection_not_allowed")
    assert error["type"] == "permission_error"
    admin = await http.post(
        f"{gateway.base_url}/chat/completions",
        headers={"authorization": f"Bearer {ADMIN}"},
        json=chat("big-model"),
    )
    assert admin.status_code == 200


async def test_group_may_not_use_model_is_403(
    gateway: RunningGateway, http: httpx2.AsyncClient
) -> None:
    response = await http.post(
        f"{gateway.base_url}/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json=chat("large-model"),
    )
    assert_openai_error(response, 403, "model_not_allowed")
    ok = await http.post(
        f"{gateway.base_url}/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json=chat("small-1"),
    )
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": 3, "messages": []}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": "hello"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (chat(temperature="hot"), "temperature"),
        (chat(stream="yes"), "stream"),
        (chat(n=0), "n"),
        (chat(max_tokens=True), "max_tokens"),
        (chat(stop=["a", 1]), "stop[1]"),
    ],
)
async def test_bad_body_is_400_naming_the_field(
    gateway: RunningGateway, http: httpx2.AsyncClient, payload: dict[str, Any], param: str
) -> None:
    response = await http.post(
        f"{gateway.base_url}/chat/completions",
        headers={"authorization": f"Bearer {ADMIN}"},
        json=payload,
    )
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b"\xff\xfe", b"null"])
async def test_malformed_json_is_400(
    gateway: RunningGateway, http: httpx2.AsyncClient, raw: bytes
) -> None:
    response = await http.post(
        f"{gateway.base_url}/chat/completions",
        headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json"},
        content=raw,
    )
    assert_openai_error(response, 400, "invalid_json")


async def test_body_over_the_limit_is_413(
    gateway: RunningGateway, http: httpx2.AsyncClient
) -> None:
    response = await http.post(
        f"{gateway.base_url}/chat/completions",
        headers={"authorization": f"Bearer {ADMIN}"},
        json=chat(padding="x" * 10_000),
    )
    assert_openai_error(response, 413, "request_too_large")


async def test_unknown_model_is_404_model_not_found() -> None:
    config = {
        "connections": {"echo": {"api_type": "echo"}},
        "routing": {"gpt-*": "echo.*"},
        "groups": {"default": {"api_keys": [KEY]}},
    }
    async with run_gateway(config) as gateway, openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key=KEY, max_retries=0
    ) as sdk:
        with pytest.raises(openai.NotFoundError) as info:
            await sdk.chat.completions.create(
                model="claude-3", messages=[{"role": "user", "content": "x"}]
            )
    body: Any = info.value.body
    assert body["code"] == "model_not_found"
    assert body["param"] == "model"


async def test_unknown_path_and_method_are_openai_shaped(
    gateway: RunningGateway, http: httpx2.AsyncClient
) -> None:
    assert_openai_error(await http.get(f"{gateway.url}/v1/nope"), 404, "unknown_url")
    assert_openai_error(await http.delete(f"{gateway.base_url}/models"), 405)


async def test_auth_before_body_validation(
    gateway: RunningGateway, http: httpx2.AsyncClient
) -> None:
    response = await http.post(f"{gateway.base_url}/chat/completions", content=b"{")
    assert_openai_error(response, 401)


async def test_disabled_gateway_is_503_everywhere(http: httpx2.AsyncClient) -> None:
    config = {
        "enabled": False,
        "connections": {"echo": {"api_type": "echo"}},
        "routing": {"*": "echo.*"},
        "groups": {"default": {"api_keys": [KEY]}},
    }
    headers = {"authorization": f"Bearer {KEY}"}
    async with run_gateway(config) as gateway:
        responses = [
            await http.post(f"{gateway.base_url}/chat/completions", headers=headers, json=chat()),
            await http.get(f"{gateway.base_url}/models", headers=headers),
            await http.get(f"{gateway.base_url}/models/x", headers=headers),
            await http.get(f"{gateway.url}/health"),
        ]
    for response in responses:
        assert_openai_error(response, 503, "service_disabled")


async def test_health_needs_no_key(gateway: RunningGateway, http: httpx2.AsyncClient) -> None:
    response = await http.get(f"{gateway.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_custom_key_check_sync_and_async(http: httpx2.AsyncClient) -> None:
    calls: list[str] = []

    def sync_check(key: str) -> Any:
        calls.append(key)
        return ("team", {"name": "ada"}) if key == "good" else None

    async def async_check(key: str) -> Any:
        return "team" if key == "good" else False

    for check in (sync_check, async_check):
        config = {
            "connections": {"echo": {"api_type": "echo"}},
            "routing": {"*": "echo.*"},
            "api_key_check": check,
            "groups": {"team": {}},
        }
        async with run_gateway(config) as gateway:
            ok = await http.post(f"{gateway.base_url}/chat/completions",
                                 headers={"x-api-key": "good"}, json=chat())
            bad = await http.post(f"{gateway.base_url}/chat/completions",
                                  headers={"x-api-key": "bad"}, json=chat())
            assert ok.status_code == 200
            assert_openai_error(bad, 401)
            record = await gateway.records.wait_for(lambda r: r.status == 200)
            assert record.group == "team"
            if check is sync_check:
                assert record.user_info == {"name": "ada"}
    assert calls == ["good", "bad"]


async def test_key_check_naming_an_undefined_group_is_500(http: httpx2.AsyncClient) -> None:
    config = {
        "connections": {"echo": {"api_type": "echo"}},
        "routing": {"*": "echo.*"},
        "api_key_check": lambda key: "ghosts",
        "groups": {"team": {}},
    }
    async with run_gateway(config) as gateway:
        response = await http.post(f"{gateway.base_url}/chat/completions",
                                   headers={"x-api-key": "k"}, json=chat())
    assert_openai_error(response, 500, "invalid_group")


async def test_key_check_raising_is_500_not_a_crash(http: httpx2.AsyncClient) -> None:
    def broken(key: str) -> str:
        raise RuntimeError("directory down")

    config = {
        "connections": {"echo": {"api_type": "echo"}},
        "routing": {"*": "echo.*"},
        "api_key_check": broken,
        "groups": {"team": {}},
    }
    async with run_gateway(config) as gateway:
        response = await http.post(f"{gateway.base_url}/chat/completions",
                                   headers={"x-api-key": "k"}, json=chat())
        error = assert_openai_error(response, 500, "internal_error")
        assert "directory down" not in error["message"]  # details only in debug mode


async def test_allow_all_accepts_requests_without_a_key(http: httpx2.AsyncClient) -> None:
    config = {
        "connections": {"echo": {"api_type": "echo"}},
        "routing": {"*": "echo.*"},
        "api_key_check": "lm_proxy.api_key_check.AllowAll",
    }
    async with run_gateway(config) as gateway:
        response = await http.post(f"{gateway.base_url}/chat/completions", json=chat())
        assert response.status_code == 200
        with_key = await http.post(f"{gateway.base_url}/chat/completions",
                                   headers={"authorization": "Bearer raw-secret"}, json=chat())
        assert with_key.status_code == 200
        record = await gateway.records.wait_for(lambda r: r.api_key_id is not None)
    assert "raw-secret" not in repr(record.to_dict())


def test_allow_all_into_an_undefined_group_fails_at_startup() -> None:
    from lm_gateway import ConfigError, create_app

    config = {
        "connections": {"echo": {"api_type": "echo"}},
        "routing": {"*": "echo.*"},
        "api_key_check": {"class": "AllowAll", "group": "guests"},
    }
    with pytest.raises(ConfigError, match="'guests'"):
        create_app(config)
