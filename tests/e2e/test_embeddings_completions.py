"""``POST /v1/embeddings`` and the legacy ``POST /v1/completions`` through the gateway, with the
official ``openai`` SDK as client and the fake OpenAI upstream (which answers both in OpenAI's
wire format) behind it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.conftest import run_gateway
from tests.fakes.openai_upstream import Reply, fake_embedding, open_fake_openai, openai_error

KEY = "sk-embed"


def config(fake: Any, **extra: Any) -> dict[str, Any]:
    return {
        "connections": {
            "up": {"api_base": fake.base_url, "api_key": "sk-provider"},
            "echo": {"api_type": "echo"},
        },
        "routing": {"echo*": "echo.*", "text-*": "up.*", "my-embedder": "up.text-embedding-3-small",
                    "*": "up.*"},
        "groups": {"default": {"api_keys": [KEY]}},
        **extra,
    }  # fmt: skip


async def test_embeddings_float_and_base64_round_trip() -> None:
    async with open_fake_openai() as fake, run_gateway(config(fake)) as gateway:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
        floats = await client.embeddings.create(
            model="my-embedder", input=["hello world", "second"], encoding_format="float"
        )
        # The SDK asks for base64 by default and decodes it itself.
        decoded = await client.embeddings.create(model="my-embedder", input="hello world")
        record = await gateway.records.wait_for(lambda r: r.endpoint == "embeddings")
    assert floats.model == "my-embedder"  # the name the client asked for
    assert [d.index for d in floats.data] == [0, 1]
    assert floats.data[0].embedding == fake_embedding("hello world")
    assert decoded.data[0].embedding == pytest.approx(fake_embedding("hello world"), abs=1e-6)
    assert floats.usage.prompt_tokens == 3 and floats.usage.total_tokens == 3
    sent = fake.requests[0].json
    assert sent["model"] == "text-embedding-3-small"  # the routed upstream model
    assert sent["input"] == ["hello world", "second"]
    assert fake.requests[1].json["encoding_format"] == "base64"
    assert record.usage == {"prompt_tokens": 3, "total_tokens": 3}
    assert record.connection == "up" and record.outcome == "ok"


async def test_embeddings_of_token_ids_and_usage_in_logs(tmp_path: Path) -> None:
    log = tmp_path / "e.jsonl"
    loggers = [{"class": "BaseLogger", "log_writer": {"class": "JsonLogWriter",
                                                      "file_name": str(log)}}]  # fmt: skip
    async with open_fake_openai() as fake, run_gateway(config(fake, loggers=loggers)) as gateway:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
        done = await client.embeddings.create(
            model="text-embedding-3-small", input=[[1, 2, 3], [4, 5]], encoding_format="float"
        )
    assert len(done.data) == 2 and done.usage.prompt_tokens == 5
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["endpoint"] == "embeddings" and entry["prompt_tokens"] == 5
    assert entry["cost"] == pytest.approx(5 * 0.02 / 1_000_000)


async def test_completions_plain_and_streamed() -> None:
    async with open_fake_openai() as fake, run_gateway(config(fake)) as gateway:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
        done = await client.completions.create(model="text-davinci-003", prompt="say hi")
        stream = await client.completions.create(
            model="text-davinci-003", prompt="say hi", stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
        bare = await client.completions.create(model="text-davinci-003", prompt="x", stream=True)
        bare_chunks = [c async for c in bare]
        record = await gateway.records.wait_for(lambda r: r.endpoint == "completions" and r.stream)
    assert done.choices[0].text == " echo: say hi"
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " echo: say hi"
    assert all(c.model == "text-davinci-003" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5
    # The gateway asked for usage (for accounting) but strips it when the client did not.
    assert all(c.usage is None for c in bare_chunks)
    assert fake.requests[2].json["stream_options"] == {"include_usage": True}
    assert record.usage is not None and record.finish_reasons == ["stop"]


async def test_connections_that_cannot_serve_the_endpoint_answer_400() -> None:
    async with open_fake_openai() as fake, run_gateway(config(fake)) as gateway:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError) as embeddings:
            await client.embeddings.create(model="echo", input="x")
        with pytest.raises(openai.BadRequestError) as completions:
            await client.completions.create(model="echo", prompt="x")
    for error in (embeddings.value, completions.value):
        assert error.code == "unsupported_endpoint"
        assert "'echo' cannot serve" in error.message
    assert len(fake.requests) == 0


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/embeddings", {"model": "m"}, "input"),
        ("/embeddings", {"model": "m", "input": []}, "input"),
        ("/embeddings", {"model": "m", "input": [{"x": 1}]}, "input[0]"),
        ("/embeddings", {"model": "m", "input": "x", "encoding_format": "int8"},
         "encoding_format"),
        ("/embeddings", {"input": "x"}, "model"),
        ("/completions", {"model": "m"}, "prompt"),
        ("/completions", {"model": "m", "prompt": 3}, "prompt"),
    ],
)  # fmt: skip
async def test_bad_requests_name_the_field(path: str, body: dict[str, Any], param: str) -> None:
    async with (
        open_fake_openai() as fake,
        run_gateway(config(fake)) as gateway,
        httpx2.AsyncClient() as http,
    ):
        response = await http.post(
            f"{gateway.base_url}{path}", json=body, headers={"authorization": f"Bearer {KEY}"}
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert len(fake.requests) == 0


async def test_upstream_errors_keep_their_status() -> None:
    async with open_fake_openai() as fake, run_gateway(config(fake)) as gateway:
        fake.push(Reply.json(openai_error("slow down"), status=429, headers={"retry-after": "3"}))
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert limited.value.response.headers["retry-after"] == "3"


async def test_strategies_balance_embeddings_too() -> None:
    async with open_fake_openai() as a, open_fake_openai() as b:
        data = {
            "connections": {
                "a": {"api_base": a.base_url, "api_key": "k"},
                "b": {"api_base": b.base_url, "api_key": "k"},
                "pool": {"targets": ["a", "b"], "order": "round_robin"},
            },
            "routing": {"*": "pool.*"},
            "groups": {"default": {"api_keys": [KEY]}},
        }
        a.push(Reply.json(openai_error("down", "server_error"), status=503))
        async with run_gateway(data) as gateway:
            client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
            raw = await client.embeddings.with_raw_response.create(
                model="text-embedding-3-small", input="x", encoding_format="float"
            )
    assert raw.headers["x-lm-gateway-connection"] == "b"
    assert raw.headers["x-lm-gateway-attempts"] == "2"
