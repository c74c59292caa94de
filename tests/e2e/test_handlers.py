"""Before-handlers end to end: order, changing the request and its route, refusing it, header
forwarding, and lm-proxy's handler conventions."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
import trio

from lm_gateway.context import RequestContext
from lm_gateway.errors import RequestRejected
from tests.conftest import RunningGateway, run_gateway
from tests.fakes.openai_upstream import FakeOpenAI, open_fake_openai

KEY = "sk-handlers"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai() as upstream:
        yield upstream


def config(fake: FakeOpenAI, *before: Any, **extra: Any) -> dict[str, Any]:
    return {
        "connections": {
            "up": {"api_base": fake.base_url, "api_key": "sk-provider"},
            "other": {"api_base": fake.base_url, "api_key": "sk-other"},
            "echo": {"api_type": "echo"},
        },
        "routing": {"*": "up.*"},
        "groups": {"g": {"api_keys": [KEY], "allowed_connections": ["up", "echo"]}},
        "before": list(before),
        **extra,
    }


async def ask(gateway: RunningGateway, **headers: str) -> httpx2.Response:
    async with httpx2.AsyncClient() as http:
        return await http.post(
            f"{gateway.base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}", **headers},
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        )


async def test_handlers_run_in_order_and_change_the_request(fake: FakeOpenAI) -> None:
    seen: list[str] = []

    async def first(ctx: RequestContext) -> None:
        seen.append(f"first:{ctx.model}:{ctx.connection}:{ctx.group}")
        assert ctx.request is not None
        ctx.request["temperature"] = 0.1
        ctx.extra["tag"] = "from-first"

    def second(ctx: RequestContext) -> None:  # sync: runs in a worker thread
        seen.append(f"second:{ctx.extra['tag']}:{threading.current_thread().name != 'MainThread'}")
        assert ctx.llm_params is ctx.request  # lm-proxy's name
        ctx.request["max_tokens"] = 7

    async with run_gateway(config(fake, first, second)) as gateway:
        response = await ask(gateway)
        record = await gateway.records.wait_for(lambda r: r.outcome == "ok")
    assert response.status_code == 200
    assert seen == ["first:gpt-4o:up:g", "second:from-first:True"]
    sent = fake.requests[-1].json
    assert sent["temperature"] == 0.1
    assert sent["max_tokens"] == 7
    assert record.extra == {"tag": "from-first"}


async def test_a_handler_can_reroute_within_the_groups_connections(fake: FakeOpenAI) -> None:
    async def to_echo(ctx: RequestContext) -> None:
        ctx.connection = "echo"
        ctx.upstream_model = "echo-model"

    async def to_forbidden(ctx: RequestContext) -> None:
        ctx.connection = "other"

    async def to_nowhere(ctx: RequestContext) -> None:
        ctx.connection = "nope"

    async with run_gateway(config(fake, to_echo)) as gateway:
        response = await ask(gateway)
    assert response.json()["choices"][0]["message"]["content"] == "hi"  # echo answered
    assert not fake.requests
    async with run_gateway(config(fake, to_forbidden)) as gateway:
        forbidden = await ask(gateway)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "connection_not_allowed"
    async with run_gateway(config(fake, to_nowhere)) as gateway:
        nowhere = await ask(gateway)
    assert nowhere.status_code == 500
    assert not fake.requests


async def test_a_handler_refuses_with_any_status_in_openai_shape(fake: FakeOpenAI) -> None:
    async def refuse(ctx: RequestContext) -> None:
        raise RequestRejected(
            "Budget exhausted for this team.", status=402, error_type="billing_error",
            code="budget_exceeded", headers={"x-budget": "0"},
        )

    async with run_gateway(config(fake, refuse)) as gateway:
        response = await ask(gateway)
        record = await gateway.records.wait_for(lambda r: r.status == 402)
    assert response.status_code == 402
    assert response.headers["x-budget"] == "0"
    assert response.json() == {"error": {"message": "Budget exhausted for this team.",
                                         "type": "billing_error", "param": None,
                                         "code": "budget_exceeded"}}
    assert record.outcome == "rejected"
    assert not fake.requests  # refused before any upstream call


class OpenAIHTTPException(Exception):
    """The shape of lm-proxy's exception (handlers written for lm-proxy raise it)."""

    def __init__(self, message: str, status_code: int, error_type: str, code: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type
        self.code = code
        self.headers = headers


async def test_lm_proxy_style_handlers_work(fake: FakeOpenAI) -> None:
    class AuditLogger:  # lm-proxy README's example, with user_info always a dict
        def __init__(self, prefix: str = "AUDIT") -> None:
            self.prefix = prefix
            self.lines: list[str] = []

        async def __call__(self, ctx: RequestContext) -> None:
            user = ctx.user_info.get("name", "anonymous")
            self.lines.append(f"[{self.prefix}] User '{user}' requested model '{ctx.model}'")

    audit = AuditLogger("SECURITY_AUDIT")

    def headers(ctx: RequestContext) -> None:
        assert ctx.llm_params is not None
        ctx.llm_params["extra_headers"] = {"X-Team": "blue"}

    def deny(ctx: RequestContext) -> None:
        if ctx.headers.get("x-deny"):
            raise OpenAIHTTPException("Denied by policy", 451, "policy_error", "denied",
                                      {"x-why": "policy"})

    async with run_gateway(config(fake, audit, headers, deny)) as gateway:
        ok = await ask(gateway)
        denied = await ask(gateway, **{"x-deny": "1"})
    assert ok.status_code == 200
    assert audit.lines[0] == "[SECURITY_AUDIT] User 'anonymous' requested model 'gpt-4o'"
    assert fake.requests[-1].headers["x-team"] == "blue"
    assert "extra_headers" not in fake.requests[-1].json  # moved to headers, not sent as a field
    assert denied.status_code == 451
    assert denied.headers["x-why"] == "policy"
    assert denied.json()["error"] == {"message": "Denied by policy", "type": "policy_error",
                                      "param": None, "code": "denied"}


async def test_a_crashing_handler_is_a_500_not_a_crash(fake: FakeOpenAI) -> None:
    def broken(ctx: RequestContext) -> None:
        raise KeyError("oops")

    async with run_gateway(config(fake, broken)) as gateway:
        response = await ask(gateway)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "oops" not in response.text


async def test_handlers_from_dotted_paths_and_class_tables(
    fake: FakeOpenAI, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_handlers.py").write_text(
        "class Tagger:\n"
        "    def __init__(self, value):\n"
        "        self.value = value\n"
        "    async def __call__(self, ctx):\n"
        "        ctx.request['user'] = self.value\n"
        "\n"
        "def stamp(ctx):\n"
        "    ctx.upstream_headers['x-stamp'] = 'yes'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config(fake, {"class": "my_handlers.Tagger", "value": "team-7"}, "my_handlers.stamp")
    async with run_gateway(cfg) as gateway:
        await ask(gateway)
    assert fake.requests[-1].json["user"] == "team-7"
    assert fake.requests[-1].headers["x-stamp"] == "yes"


# -- HTTPHeadersForwarder -----------------------------------------------------------------------


async def test_forwarder_whitelist_is_case_insensitive(fake: FakeOpenAI) -> None:
    """lm-proxy lower-cased incoming names but not its whitelist: X-Trace-Id never matched."""
    forwarder = {"class": "lm_proxy.handlers.HTTPHeadersForwarder",
                 "white_list_headers": ["X-Trace-Id", "x-tenant-id"]}
    async with run_gateway(config(fake, forwarder)) as gateway:
        await ask(gateway, **{"X-Trace-Id": "t-1", "X-TENANT-ID": "acme", "x-other": "no",
                              "Cookie": "session=1"})
    sent = fake.requests[-1].headers
    assert sent["x-trace-id"] == "t-1"
    assert sent["x-tenant-id"] == "acme"
    assert "x-other" not in sent
    assert "cookie" not in sent
    assert sent["authorization"] == "Bearer sk-provider"  # the provider key, not the client's


async def test_forwarder_default_strips_everything_sensitive(fake: FakeOpenAI) -> None:
    forwarder = {"class": "HTTPHeadersForwarder", "ignore_headers": ["X-Internal"]}
    secrets = {
        "cookie": "session=abc",
        "x-api-key": "sk-client-secret",
        "api-key": "sk-client-secret",
        "x-goog-api-key": "g-secret",
        "openai-organization": "org-other",
        "x-forwarded-for": "10.0.0.1",
        "x-internal": "hidden",
        "x-trace-id": "t-2",
    }
    async with run_gateway(config(fake, forwarder)) as gateway:
        response = await ask(gateway, **secrets)
    assert response.status_code == 200
    sent = fake.requests[-1].headers
    for name in ("cookie", "x-api-key", "api-key", "x-goog-api-key", "openai-organization",
                 "x-forwarded-for", "x-internal"):
        assert name not in sent, name
    assert "sk-client-secret" not in str(sent)
    assert KEY not in str(sent)
    assert sent["x-trace-id"] == "t-2"
    assert sent["authorization"] == "Bearer sk-provider"
    assert sent["content-type"] == "application/json"  # the gateway's own, not the client's


async def test_forwarded_headers_reach_anthropic_too() -> None:
    from tests.fakes.anthropic_upstream import open_fake_anthropic

    async with open_fake_anthropic() as fake:
        cfg = {
            "connections": {"claude": {"api_type": "anthropic", "api_base": fake.base_url,
                                       "api_key": "sk-ant"}},
            "routing": {"*": "claude.*"},
            "groups": {"g": {"api_keys": [KEY]}},
            "before": [{"class": "HTTPHeadersForwarder", "white_list_headers": ["x-trace-id"]}],
        }
        async with run_gateway(cfg) as gateway, openai.AsyncOpenAI(
            base_url=gateway.base_url, api_key=KEY, max_retries=0,
            default_headers={"X-Trace-Id": "t-3"},
        ) as sdk:
            await sdk.chat.completions.create(
                model="claude-x", messages=[{"role": "user", "content": "hi"}]
            )
    assert fake.requests[-1].headers["x-trace-id"] == "t-3"
    assert fake.requests[-1].headers["x-api-key"] == "sk-ant"


# -- client address ----------------------------------------------------------------------------


async def test_client_address_trusts_forwarded_headers_only_from_trusted_proxies(
    fake: FakeOpenAI,
) -> None:
    async with run_gateway(config(fake)) as gateway:
        await ask(gateway, **{"x-forwarded-for": "203.0.113.9"})
        untrusted = await gateway.records.wait_for(lambda r: r.outcome == "ok")
    assert untrusted.remote_addr == "127.0.0.1"  # spoofing ignored
    async with run_gateway(config(fake, trusted_proxies=["127.0.0.0/8"])) as gateway:
        await ask(gateway, **{"x-forwarded-for": "198.51.100.7, 203.0.113.9"})
        trusted = await gateway.records.wait_for(lambda r: r.outcome == "ok")
    assert trusted.remote_addr == "203.0.113.9"  # the nearest untrusted hop


async def test_a_blocking_sync_handler_does_not_block_the_gateway(fake: FakeOpenAI) -> None:
    release = threading.Event()
    entered = threading.Event()

    def slow(ctx: RequestContext) -> None:
        entered.set()
        release.wait(10)

    async with run_gateway(config(fake, slow)) as gateway, trio.open_nursery() as nursery:
        nursery.start_soon(ask, gateway)
        await trio.to_thread.run_sync(entered.wait, 10)
        async with httpx2.AsyncClient() as http:
            health = await http.get(f"{gateway.url}/health")
        assert health.status_code == 200
        release.set()
