"""``GET /metrics`` through a real gateway, parsed with prometheus-client's own parser."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import httpx2
import hypercorn
import hypercorn.trio
import openai
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from lm_gateway import create_app
from tests.conftest import config_from, run_gateway
from tests.fakes.openai_upstream import FakeOpenAI, Reply, open_fake_openai, openai_error

KEY = "sk-metrics"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai() as upstream:
        yield upstream


def config(fake: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    return {
        "connections": {"up": {"api_base": fake.base_url, "api_key": "sk-provider"}},
        "routing": {"gpt*": "up.*"},
        "groups": {"default": {"api_keys": [KEY]}},
        **extra,
    }


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def scrape(base: str, **headers: str) -> Samples:
    async with httpx2.AsyncClient() as http:
        response = await http.get(f"{base}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def test_counters_move_as_requests_happen(fake: FakeOpenAI) -> None:
    async with run_gateway(
        config(fake, before=[{"class": "RateLimiter", "max_requests": 3}])
    ) as gw:
        before = await scrape(gw.url)
        assert value(before, "lmgw_requests_total") == 0
        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        done = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "one two three"}]
        )
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for _ in stream:
            pass
        fake.push(Reply.json(openai_error("nope", "server_error"), status=500))
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
        await gw.records.wait_for(lambda r: r.status == 429)
        after = await scrape(gw.url)

    ok = {"endpoint": "chat.completions", "connection": "up", "model": "gpt-4o", "group": "default"}
    assert value(after, "lmgw_requests_total", **ok, status="200", outcome="ok") == 2
    assert value(after, "lmgw_requests_total", **ok, status="500", outcome="error") == 1
    assert value(after, "lmgw_requests_total", status="429", outcome="rejected") == 1
    assert value(after, "lmgw_rate_limit_rejections_total", group="default") == 1
    assert done.usage is not None
    # The stream's usage comes on top of the first answer's.
    prompt = value(after, "lmgw_tokens_total", connection="up", kind="prompt")
    completion = value(after, "lmgw_tokens_total", connection="up", kind="completion")
    assert prompt >= done.usage.prompt_tokens + 1
    assert completion >= done.usage.completion_tokens + 1
    assert value(after, "lmgw_cost_usd_total", connection="up", model="gpt-4o") > 0
    # The rate-limited request was routed (to "up") before the limiter refused it.
    assert value(after, "lmgw_request_duration_seconds_count", connection="up") == 4
    assert value(after, "lmgw_time_to_first_token_seconds_count", stream="true") == 1
    assert value(after, "lmgw_gateway_overhead_seconds_count") == 4
    # Nothing is in flight once the answers are done.
    assert value(after, "lmgw_in_flight_requests") == 0
    assert value(after, "lmgw_in_flight_streams") == 0


async def test_in_flight_and_cancellations(fake: FakeOpenAI) -> None:
    async with run_gateway(config(fake)) as gw:
        fake.push(
            Reply.stream_then_stall(
                [
                    b'data: {"id":"c","object":"chat.completion.chunk",'
                    b'"created":1,"model":"gpt-4o","choices":[{"index":0,'
                    b'"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
                ]
            )
        )
        async with httpx2.AsyncClient() as http, trio.open_nursery() as nursery:
            scope = trio.CancelScope()
            streaming = trio.Event()

            async def send() -> None:
                with scope:
                    async with http.stream(
                        "POST", f"{gw.base_url}/chat/completions",
                        headers={"authorization": f"Bearer {KEY}"},
                        json={"model": "gpt-4o", "stream": True,
                              "messages": [{"role": "user", "content": "x"}]},
                    ) as response:  # fmt: skip
                        async for _ in response.aiter_bytes():
                            streaming.set()

            nursery.start_soon(send)
            await streaming.wait()
            during = await scrape(gw.url)
            scope.cancel()
        await gw.records.wait_for(lambda r: r.outcome == "cancelled")
        after = await scrape(gw.url)
    assert value(during, "lmgw_in_flight_requests") == 1
    assert value(during, "lmgw_in_flight_streams") == 1
    assert value(after, "lmgw_in_flight_requests") == 0
    assert value(after, "lmgw_in_flight_streams") == 0
    assert value(after, "lmgw_cancellations_total", connection="up", stream="true") == 1


async def test_metrics_key_is_required_when_configured(fake: FakeOpenAI) -> None:
    async with run_gateway(config(fake, metrics_api_key="m-secret")) as gw:
        async with httpx2.AsyncClient() as http:
            missing = await http.get(f"{gw.url}/metrics")
            wrong = await http.get(f"{gw.url}/metrics", headers={"authorization": "Bearer x"})
            api_key = await http.get(
                f"{gw.url}/metrics", headers={"authorization": f"Bearer {KEY}"}
            )
        assert missing.status_code == wrong.status_code == api_key.status_code == 401
        assert missing.json()["error"]["type"] == "invalid_request_error"
        samples = await scrape(gw.url, authorization="Bearer m-secret")
    assert ("lmgw_in_flight_requests", frozenset()) in samples


async def test_metrics_can_be_turned_off_or_moved(fake: FakeOpenAI) -> None:
    async with run_gateway(config(fake, metrics=False)) as gw, httpx2.AsyncClient() as http:
        response = await http.get(f"{gw.url}/metrics")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_url"
    async with run_gateway(config(fake, metrics_path="/internal/prom")) as gw:
        async with httpx2.AsyncClient() as http:
            assert (await http.get(f"{gw.url}/metrics")).status_code == 404
            moved = await http.get(f"{gw.url}/internal/prom")
        assert moved.status_code == 200 and "lmgw_requests" in moved.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("server", ["hypercorn", "lm-gateway"])
async def test_metrics_port_serves_metrics_only(fake: FakeOpenAI, server: str) -> None:
    """Both HTTP servers the CLI uses listen on the two ports; each port serves its part."""
    from lm_gateway.server.edge import EdgeSettings, serve

    metrics_port = free_port()
    app = create_app(config_from(config(fake, metrics_port=metrics_port)))
    hc = hypercorn.Config()
    hc.bind = ["127.0.0.1:0", f"127.0.0.1:{metrics_port}"]
    hc.accesslog = None
    hc.graceful_timeout = 0.2
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        if server == "hypercorn":
            binds = await nursery.start(
                partial(hypercorn.trio.serve, app, hc, shutdown_trigger=shutdown.wait)
            )
        else:
            binds = await nursery.start(
                partial(
                    serve,
                    app,
                    [("127.0.0.1", 0), ("127.0.0.1", metrics_port)],
                    shutdown_trigger=shutdown.wait,
                    settings=EdgeSettings(graceful_timeout=0.2),
                )
            )
        api = next(b for b in binds if not b.endswith(f":{metrics_port}"))
        async with httpx2.AsyncClient() as http:
            on_api = await http.get(f"{api}/metrics")
            models_on_metrics = await http.get(
                f"http://127.0.0.1:{metrics_port}/v1/models",
                headers={"authorization": f"Bearer {KEY}"},
            )
            models_on_api = await http.get(
                f"{api}/v1/models", headers={"authorization": f"Bearer {KEY}"}
            )
            on_metrics = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
        shutdown.set()
    assert on_api.status_code == 404
    assert models_on_metrics.status_code == 404
    assert models_on_api.status_code == 200
    assert on_metrics.status_code == 200 and "lmgw_requests" in on_metrics.text


async def test_dropped_log_entries_are_counted(fake: FakeOpenAI, tmp_path: Any) -> None:
    """A logger whose writer always fails: its batches are dropped after the retries, and the
    metric says how many."""
    logger = {
        "class": "BaseLogger",
        "max_retries": 0,
        "log_writer": {"class": "tests.observability.helpers.FailingWriter"},
    }
    async with run_gateway(config(fake, loggers=[logger])) as gw:
        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        for _ in range(3):
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
        runner = gw.app.gateway.loggers[0]
        with trio.fail_after(10):
            while runner.dropped < 3:
                await trio.sleep(0.01)
        samples = await scrape(gw.url)
    assert value(samples, "lmgw_log_entries_dropped_total") == 3
