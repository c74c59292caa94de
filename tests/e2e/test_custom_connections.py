"""Users' own connections: lm-proxy-style callables, dotted paths, classes, protocol objects."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import trio

from lm_gateway import load_config
from lm_gateway.errors import UpstreamError
from lm_gateway.providers import ChatCall, ChatResult
from tests.conftest import run_gateway

KEY = "k"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def config_with(connection: Any) -> dict[str, Any]:
    return {
        "connections": {"mine": connection},
        "routing": {"alias": "mine.real-model", "*": "mine.*"},
        "groups": {"g": {"api_keys": [KEY]}},
    }


async def complete(base_url: str, stream: bool = False, **extra: Any) -> str:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0) as sdk:
        if not stream:
            completion = await sdk.chat.completions.create(
                model="alias", messages=[{"role": "user", "content": "ping"}], **extra
            )
            return completion.choices[0].message.content or ""
        chunks = await sdk.chat.completions.create(
            model="alias", messages=[{"role": "user", "content": "ping"}], stream=True, **extra
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])


async def test_lm_proxy_style_async_callable() -> None:
    seen: list[dict[str, Any]] = []

    async def model(messages: list[dict[str, Any]], **params: Any) -> str:
        seen.append({"messages": messages, **params})
        callback = params.get("callback")
        if callback:
            for piece in ("po", "ng"):
                await callback(piece)
            return "pong"
        return f"pong from {params['model']}"

    async with run_gateway(config_with(model)) as gateway:
        assert await complete(gateway.base_url, temperature=0.5) == "pong from real-model"
        assert await complete(gateway.base_url, stream=True) == "pong"
    assert seen[0]["model"] == "real-model"
    assert seen[0]["temperature"] == 0.5
    assert seen[0]["messages"] == [{"role": "user", "content": "ping"}]
    assert "stream" not in seen[0]
    assert seen[1]["stream"] is True


async def test_callable_that_ignores_the_callback_still_streams_its_answer() -> None:
    async def model(messages: Any, **params: Any) -> str:
        return "whole answer"

    async with run_gateway(config_with(model)) as gateway:
        assert await complete(gateway.base_url, stream=True) == "whole answer"


async def test_sync_callable_runs_off_the_event_loop() -> None:
    release = threading.Event()
    entered = threading.Event()

    def slow_model(messages: Any, **params: Any) -> str:
        entered.set()
        release.wait(10)
        return "done"

    async with run_gateway(config_with(slow_model)) as gateway, trio.open_nursery() as nursery:
        answers: list[str] = []

        async def ask() -> None:
            answers.append(await complete(gateway.base_url))

        nursery.start_soon(ask)
        await trio.to_thread.run_sync(entered.wait, 10)
        # The model is blocked in its thread; the gateway still answers other requests.
        async with httpx2.AsyncClient() as http:
            health = await http.get(f"{gateway.url}/health")
        assert health.status_code == 200
        release.set()
    assert answers == ["done"]


async def test_callable_failure_is_a_502_not_a_crash() -> None:
    async def broken(messages: Any, **params: Any) -> str:
        raise ValueError("model exploded")

    async with run_gateway(config_with(broken)) as gateway, httpx2.AsyncClient() as http:
        for stream in (False, True):
            response = await http.post(
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer {KEY}"},
                json={"model": "alias", "stream": stream,
                      "messages": [{"role": "user", "content": "x"}]},
            )
            assert response.status_code == 502
            assert "model exploded" not in response.text


async def test_callable_raising_a_gateway_error_keeps_its_status() -> None:
    async def limited(messages: Any, **params: Any) -> str:
        raise UpstreamError("busy", status=429, headers={"retry-after": "3"})

    async with run_gateway(config_with(limited)) as gateway, httpx2.AsyncClient() as http:
        response = await http.post(
            f"{gateway.base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": "alias", "messages": [{"role": "user", "content": "x"}]},
        )
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"


class ProtocolConnection:
    """Speaks the Connection protocol directly (the seam strategies use)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.closed = False

    async def chat(self, call: ChatCall) -> ChatResult:
        await trio.lowlevel.checkpoint()
        return ChatResult(
            body={
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": call.body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant",
                                         "content": self.prefix + call.body["model"]}}],
            }
        )

    async def open_chat_stream(self, call: ChatCall) -> Any:
        raise UpstreamError("no streams here", status=400)

    async def list_models(self) -> list[dict[str, Any]] | None:
        return None

    async def aclose(self) -> None:
        self.closed = True


async def test_protocol_object_is_used_as_is() -> None:
    conn = ProtocolConnection("via protocol: ")
    async with run_gateway(config_with(conn)) as gateway:
        assert await complete(gateway.base_url) == "via protocol: real-model"
    assert conn.closed  # closed with the gateway


async def test_dotted_path_and_class_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            async def shout(messages, **params):
                return messages[-1]["content"].upper()

            class Prefixer:
                def __init__(self, prefix):
                    self.prefix = prefix

                async def __call__(self, messages, **params):
                    return self.prefix + messages[-1]["content"]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    async with run_gateway(config_with("my_models.shout")) as gateway:
        assert await complete(gateway.base_url) == "PING"
    async with run_gateway(
        config_with({"class": "my_models.Prefixer", "prefix": ">> "})
    ) as gateway:
        assert await complete(gateway.base_url) == ">> ping"


async def test_python_config_file_with_a_callable(tmp_path: Path) -> None:
    path = tmp_path / "gateway_config.py"
    path.write_text(
        textwrap.dedent(
            """
            async def reverse(messages, **params):
                return messages[-1]["content"][::-1]

            config = {
                "connections": {"rev": reverse},
                "routing": {"*": "rev.*"},
                "groups": {"g": {"api_keys": ["env:PY_CONFIG_KEY"]}},
            }
            """
        )
    )
    config = load_config(path, environ={"PY_CONFIG_KEY": "py-key"})
    async with run_gateway(config) as gateway, openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key="py-key", max_retries=0
    ) as sdk:
        completion = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "abc"}]
        )
    assert completion.choices[0].message.content == "cba"


class BrokenStream:
    """A stream that yields one chunk, then fails with a plain exception (a bug)."""

    def __init__(self) -> None:
        self.sent = False

    async def receive(self) -> list[dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        if not self.sent:
            self.sent = True
            return [{"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": "so far"},
                                  "finish_reason": None}]}]
        raise KeyError("oops")

    async def aclose(self) -> None:
        pass


class BrokenStreamConnection(ProtocolConnection):
    async def open_chat_stream(self, call: ChatCall) -> Any:
        return BrokenStream()


async def test_a_bug_in_a_stream_ends_it_with_an_error_event_and_an_error_record() -> None:
    async with run_gateway(config_with(BrokenStreamConnection())) as gateway, \
            httpx2.AsyncClient() as http:
        response = await http.post(
            f"{gateway.base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": "alias", "stream": True,
                  "messages": [{"role": "user", "content": "x"}]},
        )
        record = await gateway.records.wait_for(lambda r: r.stream)
    assert response.status_code == 200
    assert b"so far" in response.content
    assert b'"code":"internal_error"' in response.content
    assert b"oops" not in response.content
    assert record.outcome == "error"


async def test_load_balancer_example_alternates_backends() -> None:
    from tests.fakes.openai_upstream import open_fake_openai

    path = EXAMPLES / "load_balancer.py"
    async with open_fake_openai() as a, open_fake_openai() as b:
        config = load_config(
            path,
            environ={"BACKEND_A_URL": a.base_url, "BACKEND_B_URL": b.base_url, "DEMO_KEY": "d"},
        )
        async with run_gateway(config) as gateway, openai.AsyncOpenAI(
            base_url=gateway.base_url, api_key="d", max_retries=0
        ) as sdk:
            for _ in range(2):
                await sdk.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "x"}]
                )
            stream = await sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "y z"}], stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "echo: y z"
    assert [len(a.requests), len(b.requests)] == [2, 1]
