"""The gateway as a blueprint inside someone else's QuartTrio app (examples/embed_blueprint.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import httpx2
import openai
import pytest
import trio
from quart import Quart

import lm_gateway
from tests.conftest import serve_app
from tests.fakes.openai_upstream import Reply, open_fake_openai

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "embed_blueprint.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("embed_blueprint", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_example_serves_both_the_app_and_the_gateway() -> None:
    app = load_example().make_app()
    async with serve_app(app) as url:
        async with httpx2.AsyncClient() as http:
            own = await http.get(f"{url}/")
            health = await http.get(f"{url}/llm/health")
        async with openai.AsyncOpenAI(base_url=f"{url}/llm/v1", api_key="demo-key") as sdk:
            completion = await sdk.chat.completions.create(
                model="anything", messages=[{"role": "user", "content": "embedded hello"}]
            )
            stream = await sdk.chat.completions.create(
                model="anything", messages=[{"role": "user", "content": "a b"}], stream=True
            )
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream
                                if c.choices])
            models = [m.id async for m in sdk.models.list()]
    assert own.json() == {"service": "my app", "llm": "/llm/v1"}
    assert health.json() == {"status": "ok"}
    assert completion.choices[0].message.content == "embedded hello"
    assert streamed == "a b"
    assert models == ["*"]


async def test_blueprint_mount_keeps_cancellation() -> None:
    """The request scope is installed into the host app, so leaving still closes upstream."""
    from quart_trio import QuartTrio

    async with open_fake_openai() as fake:
        host = QuartTrio("host")
        host.register_blueprint(
            lm_gateway.blueprint(
                {
                    "connections": {"up": {"api_base": fake.base_url}},
                    "routing": {"*": "up.*"},
                    "groups": {"g": {"api_keys": ["k"]}},
                }
            ),
            url_prefix="/ai",
        )
        fake.push(Reply.stall())
        async with serve_app(host) as url:
            with trio.fail_after(10):
                async with httpx2.AsyncClient() as http, trio.open_nursery() as nursery:
                    scope = trio.CancelScope()

                    async def call() -> None:
                        with scope:
                            await http.post(
                                f"{url}/ai/v1/chat/completions",
                                headers={"authorization": "Bearer k"},
                                json={"model": "m", "stream": True,
                                      "messages": [{"role": "user", "content": "x"}]},
                            )

                    nursery.start_soon(call)
                    await fake.wait_for_request()
                    scope.cancel()
                await fake.wait_closed(fake.requests[0])


def test_blueprint_refuses_a_non_trio_app() -> None:
    app = Quart("asyncio-app")
    with pytest.raises(TypeError, match="QuartTrio"):
        app.register_blueprint(lm_gateway.blueprint(None))


def test_two_gateways_in_one_process_do_not_share_state() -> None:
    a = lm_gateway.create_app({"connections": {"e": {"api_type": "echo"}},
                               "routing": {"a*": "e.*"}, "groups": {"g": {"api_keys": ["1"]}}})
    b = lm_gateway.create_app({"connections": {"e": {"api_type": "echo"}},
                               "routing": {"b*": "e.*"}, "groups": {"g": {"api_keys": ["2"]}}})
    assert a.gateway.router.match("apple") is not None
    assert b.gateway.router.match("apple") is None
    assert a.gateway.records is not b.gateway.records
