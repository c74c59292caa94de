"""Fallback, retries, hedging and cooldowns through a real gateway, against fault-injecting
fake upstreams on loopback (each a real HTTP server that records what it received and how its
connections were closed). The ``openai`` SDK is the client; its own retries are off."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import openai
import pytest
import trio

from lm_gateway import ConfigError, Gateway
from tests.conftest import RunningGateway, config_from, run_gateway
from tests.fakes.openai_upstream import (
    SSE_DONE,
    FakeOpenAI,
    Reply,
    open_fake_openai,
    openai_error,
    sse_event,
)

KEY = "sk-resilience"
GUARD = 15
MESSAGES = [{"role": "user", "content": "hello"}]


@asynccontextmanager
async def fakes(count: int) -> AsyncIterator[list[FakeOpenAI]]:
    async with open_fake_openai() as a, open_fake_openai() as b, open_fake_openai() as c:
        yield [a, b, c][:count]


def upstream(fake: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    return {"api_base": fake.base_url, "api_key": "sk-up", "read_timeout_seconds": 10, **extra}


def config(ups: list[FakeOpenAI], strategy: dict[str, Any], **per: dict[str, Any]) -> Any:
    names = ["a", "b", "c"]
    connections: dict[str, Any] = {
        name: upstream(fake, **per.get(name, {})) for name, fake in zip(names, ups, strict=False)
    }
    connections["main"] = strategy
    return {
        "connections": connections,
        "routing": {"*": "main.*"},
        "groups": {"default": {"api_keys": [KEY]}},
    }


def client(gateway: RunningGateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)


def chunk(delta: dict[str, Any], finish: str | None = None, cid: str = "c1") -> bytes:
    return sse_event(
        {
            "id": cid, "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )  # fmt: skip


def error_reply(status: int, **headers: str) -> Reply:
    return Reply.json(openai_error("upstream trouble", "server_error"), status=status,
                      headers=headers)  # fmt: skip


@pytest.mark.parametrize(
    "failure",
    [
        error_reply(503),
        error_reply(500),
        error_reply(529),
        error_reply(429, **{"retry-after": "1"}),
        Reply.close_without_response(),
    ],
    ids=["503", "500", "529", "429", "dropped"],
)
async def test_fallback_on_errors_worth_it(failure: Reply) -> None:
    async with fakes(2) as (a, b):
        a.push(failure)
        strategy = {"targets": ["a", "b.gpt-4o-mini"]}
        async with run_gateway(config([a, b], strategy)) as gateway:
            with trio.fail_after(GUARD):
                raw = await client(gateway).chat.completions.with_raw_response.create(
                    model="gpt-4o", messages=MESSAGES
                )
                record = await gateway.records.wait_for(lambda r: r.outcome == "ok")
    done = raw.parse()
    assert done.choices[0].message.content == "echo: hello"
    assert len(a.requests) == 1 and len(b.requests) == 1
    assert b.requests[0].json["model"] == "gpt-4o-mini"  # the target's model
    assert raw.headers["x-lm-gateway-connection"] == "b"
    assert raw.headers["x-lm-gateway-attempts"] == "2"
    assert raw.headers["x-lm-gateway-fallback-reason"].startswith("a: ")
    assert record.attempts == 2
    assert [x["outcome"] for x in record.attempt_log] == ["error", "ok"]
    assert record.served_by == "b/gpt-4o-mini"


async def test_no_fallback_on_the_clients_own_mistake() -> None:
    async with fakes(2) as (a, b):
        a.push(Reply.json(openai_error("bad temperature", param="temperature"), status=400))
        async with run_gateway(config([a, b], {"targets": ["a", "b"]})) as gateway:
            with pytest.raises(openai.BadRequestError) as refused:
                await client(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert refused.value.param == "temperature"
    assert len(b.requests) == 0
    assert refused.value.response.headers["x-lm-gateway-attempts"] == "1"


async def test_every_target_failing_answers_the_last_error() -> None:
    async with fakes(2) as (a, b):
        a.push(error_reply(503))
        b.push(error_reply(502))
        async with run_gateway(config([a, b], {"targets": ["a", "b"]})) as gateway:
            with pytest.raises(openai.APIStatusError) as failed:
                await client(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-lm-gateway-attempts"] == "2"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_fallback_when_a_target_is_unreachable() -> None:
    async with fakes(1) as (b,):
        data = config([b], {"targets": ["down", "a"]})
        data["connections"]["down"] = {
            "api_base": f"http://127.0.0.1:{closed_port()}/v1", "api_key": "k",
        }  # fmt: skip
        async with run_gateway(data) as gateway:
            raw = await client(gateway).chat.completions.with_raw_response.create(
                model="gpt-4o", messages=MESSAGES
            )
    assert raw.headers["x-lm-gateway-connection"] == "a"
    assert raw.headers["x-lm-gateway-fallback-reason"] == "down: unreachable"


async def test_streaming_fallback_before_the_first_token_is_invisible() -> None:
    async with fakes(2) as (a, b):
        # a sends the role chunk, then the connection breaks before any content.
        a.push(Reply.stream_then_cut([chunk({"role": "assistant", "content": ""}, cid="from-a")]))
        async with run_gateway(config([a, b], {"targets": ["a", "b"]})) as gateway:
            with trio.fail_after(GUARD):
                stream = await client(gateway).chat.completions.create(
                    model="gpt-4o", messages=MESSAGES, stream=True
                )
                chunks = [c async for c in stream]
    assert {c.id for c in chunks} != {"from-a"} and "from-a" not in {c.id for c in chunks}
    roles = [c for c in chunks if c.choices and c.choices[0].delta.role]
    assert len(roles) == 1, "one answer, one role chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello"


async def test_streaming_failure_after_the_first_token_is_an_error_not_a_second_answer() -> None:
    async with fakes(2) as (a, b):
        a.push(
            Reply.stream_then_cut(
                [chunk({"role": "assistant", "content": ""}), chunk({"content": "partial"})]
            )
        )
        async with (
            run_gateway(config([a, b], {"targets": ["a", "b"]})) as gateway,
            httpx2.AsyncClient(timeout=GUARD) as http,
        ):
            response = await http.post(
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer {KEY}"},
                json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
            )
    body = response.text
    assert "partial" in body
    assert '"error"' in body.splitlines()[-2] or '"error"' in body
    assert "echo: hello" not in body and "[DONE]" not in body
    assert len(b.requests) == 0


async def test_hedging_starts_the_next_target_and_cancels_the_loser() -> None:
    async with fakes(2) as (a, b):
        a.push(Reply.stall())  # a never answers
        strategy = {"targets": ["a", "b"], "hedge_after_seconds": 0.2}
        async with run_gateway(config([a, b], strategy)) as gateway:
            with trio.fail_after(GUARD):
                raw = await client(gateway).chat.completions.with_raw_response.create(
                    model="gpt-4o", messages=MESSAGES
                )
                # The loser's upstream connection was closed by the gateway.
                await a.wait_closed(a.requests[0])
                record = await gateway.records.wait_for(lambda r: r.outcome == "ok")
    assert raw.headers["x-lm-gateway-connection"] == "b"
    assert sorted(x["outcome"] for x in record.attempt_log) == ["cancelled", "ok"]
    assert a.active_replies == 0


async def test_hedged_streams_the_first_to_produce_wins() -> None:
    async with fakes(2) as (a, b):
        # a accepts the stream but produces nothing (role chunk only), then stalls.
        a.push(Reply.stream_then_stall([chunk({"role": "assistant", "content": ""})]))
        strategy = {"targets": ["a", "b"], "hedge_after_seconds": 0.2}
        async with run_gateway(config([a, b], strategy)) as gateway:
            with trio.fail_after(GUARD):
                stream = await client(gateway).chat.completions.create(
                    model="gpt-4o", messages=MESSAGES, stream=True
                )
                chunks = [c async for c in stream]
                await a.wait_closed(a.requests[0])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello"


async def test_a_client_leaving_cancels_every_attempt() -> None:
    async with fakes(2) as (a, b):
        a.push(Reply.stall())
        b.push(Reply.stall())
        strategy = {"targets": ["a", "b"], "hedge_after_seconds": 0.1}
        async with (
            run_gateway(config([a, b], strategy)) as gateway,
            httpx2.AsyncClient() as http,
            trio.open_nursery() as nursery,
        ):
            scope = trio.CancelScope()

            async def send() -> None:
                with scope:
                    await http.post(
                        f"{gateway.base_url}/chat/completions",
                        headers={"authorization": f"Bearer {KEY}"},
                        json={"model": "gpt-4o", "messages": MESSAGES},
                    )

            nursery.start_soon(send)
            with trio.fail_after(GUARD):
                await a.wait_for_request()
                await b.wait_for_request()
                scope.cancel()
                await a.wait_closed(a.requests[0])
                await b.wait_closed(b.requests[0])
                record = await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
    assert sorted(x["outcome"] for x in record.attempt_log) == ["cancelled", "cancelled"]


async def test_context_length_goes_to_the_larger_target() -> None:
    async with fakes(3) as (a, b, c):
        a.push(
            Reply.json(
                openai_error(
                    "This model's maximum context length is 8192 tokens.",
                    code="context_length_exceeded",
                ),
                status=400,
            )
        )
        strategy = {"targets": ["a", "b"], "on_context_length": "c.gpt-4.1"}
        async with run_gateway(config([a, b, c], strategy)) as gateway:
            raw = await client(gateway).chat.completions.with_raw_response.create(
                model="gpt-4o", messages=MESSAGES
            )
    assert raw.headers["x-lm-gateway-connection"] == "c"
    assert c.requests[0].json["model"] == "gpt-4.1"
    assert len(b.requests) == 0


async def test_retries_on_the_same_connection_honour_retry_after() -> None:
    async with fakes(1) as (a,):
        a.push(error_reply(503), error_reply(429, **{"retry-after": "0"}))
        data = {
            "connections": {"a": upstream(a, max_retries=2, retry_backoff_seconds=0.01)},
            "routing": {"*": "a.*"},
            "groups": {"default": {"api_keys": [KEY]}},
        }
        async with run_gateway(data) as gateway:
            raw = await client(gateway).chat.completions.with_raw_response.create(
                model="gpt-4o", messages=MESSAGES
            )
    assert len(a.requests) == 3
    assert raw.headers["x-lm-gateway-attempts"] == "3"
    assert raw.parse().choices[0].message.content == "echo: hello"


async def test_a_retry_after_beyond_the_cap_is_passed_on_not_waited_for() -> None:
    async with fakes(1) as (a,):
        a.push(error_reply(429, **{"retry-after": "120"}))
        data = {
            "connections": {"a": upstream(a, max_retries=3, retry_after_max_seconds=5)},
            "routing": {"*": "a.*"},
            "groups": {"default": {"api_keys": [KEY]}},
        }
        async with run_gateway(data) as gateway:
            with pytest.raises(openai.RateLimitError) as limited:
                await client(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert limited.value.response.headers["retry-after"] == "120"
    assert len(a.requests) == 1


async def test_a_failing_connection_cools_down_and_recovers() -> None:
    async with fakes(1) as (a,):
        a.push(error_reply(503), error_reply(503))
        data = {
            "connections": {"a": upstream(a, cooldown_after_failures=2, cooldown_seconds=0.3)},
            "routing": {"*": "a.*"},
            "groups": {"default": {"api_keys": [KEY]}},
        }
        async with run_gateway(data) as gateway:
            llm = client(gateway)
            for _ in range(2):
                with pytest.raises(openai.InternalServerError):
                    await llm.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            with pytest.raises(openai.APIStatusError) as cooling:
                await llm.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert len(a.requests) == 2, "a cooling connection is not called"
            await trio.sleep(0.35)
            done = await llm.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert cooling.value.status_code == 503
    assert cooling.value.code == "connection_cooling_down"
    assert int(cooling.value.response.headers["retry-after"]) >= 1
    assert done.choices[0].message.content == "echo: hello"
    assert len(a.requests) == 3


async def test_a_cooling_target_is_tried_last() -> None:
    async with fakes(2) as (a, b):
        a.push(error_reply(503))
        data = config([a, b], {"targets": ["a", "b"]}, a={"cooldown_after_failures": 1})
        async with run_gateway(data) as gateway:
            llm = client(gateway)
            first = await llm.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=MESSAGES
            )
            second = await llm.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=MESSAGES
            )
    assert first.headers["x-lm-gateway-attempts"] == "2"
    # a is cooling down: b goes first and a is not even tried.
    assert second.headers["x-lm-gateway-attempts"] == "1"
    assert second.headers["x-lm-gateway-connection"] == "b"
    assert len(a.requests) == 1


async def test_round_robin_spreads_requests() -> None:
    async with fakes(2) as (a, b):
        strategy = {"targets": ["a", "b"], "order": "round_robin"}
        async with run_gateway(config([a, b], strategy)) as gateway:
            for _ in range(6):
                await client(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(a.requests) == len(b.requests) == 3


async def test_lm_proxy_fallback_config_loads() -> None:
    async with fakes(2) as (a, b):
        a.push(error_reply(503))
        data = config([a, b], {
            "class": "lm_proxy.strategies.Fallback",
            "connections": ["a.gpt-4o", {"b": {"model": "gpt-4o-mini", "temperature": 0.1}}],
        })  # fmt: skip
        async with run_gateway(data) as gateway:
            await client(gateway).chat.completions.create(model="x", messages=MESSAGES)
    sent = b.requests[0].json
    assert (sent["model"], sent["temperature"]) == ("gpt-4o-mini", 0.1)
    assert a.requests[0].json["model"] == "gpt-4o"


@pytest.mark.parametrize(
    ("strategy", "path", "words"),
    [
        ({"targets": []}, "connections.main.targets", "non-empty list"),
        ({"targets": ["nope"]}, "connections.main.targets", "'nope' is not a connection"),
        ({"targets": ["main"]}, "connections.main.targets", "the strategy itself"),
        ({"targets": ["a"], "order": "fastest"}, "connections.main.order", "expected one of"),
        ({"targets": ["a"], "hedge_after_seconds": 0}, "connections.main.hedge_after_seconds",
         "positive"),
        ({"targets": [{"connection": "a", "wieght": 2}]}, "connections.main.targets[0].wieght",
         "unknown"),
    ],
)  # fmt: skip
def test_bad_strategies_are_config_errors(strategy: Any, path: str, words: str) -> None:
    data = {
        "connections": {"a": {"api_base": "http://127.0.0.1:9/v1", "api_key": "k"},
                        "main": strategy},
        "routing": {"*": "main.*"},
        "groups": {"default": {"api_keys": [KEY]}},
    }  # fmt: skip
    with pytest.raises(ConfigError) as info:
        Gateway(config_from(data))
    assert info.value.path == path
    assert words in info.value.message


async def test_stream_after_done_is_not_confused_with_content() -> None:
    """A stream whose first content is the finish itself (an empty answer) still wins."""
    async with fakes(1) as (a,):
        a.push(
            Reply.sse([chunk({"role": "assistant", "content": ""}), chunk({}, "stop"), SSE_DONE])
        )
        async with run_gateway(config([a], {"targets": ["a"]})) as gateway:
            stream = await client(gateway).chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True
            )
            chunks = [c async for c in stream]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_a_malformed_chunk_before_the_first_token_falls_over() -> None:
    async with fakes(2) as (a, b):
        a.push(Reply.sse([chunk({"role": "assistant", "content": ""}), b"data: {not json\n\n"]))
        async with run_gateway(config([a, b], {"targets": ["a", "b"]})) as gateway:
            stream = await client(gateway).chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "echo: hello"
    assert len(b.requests) == 1


async def test_a_stall_mid_stream_ends_in_an_error_event_not_a_second_answer() -> None:
    async with fakes(2) as (a, b):
        a.push(Reply.stream_then_stall([chunk({"role": "assistant", "content": "so far"})]))
        data = config([a, b], {"targets": ["a", "b"]}, a={"read_timeout_seconds": 0.3})
        async with (
            run_gateway(data) as gateway,
            httpx2.AsyncClient(timeout=GUARD) as http,
        ):
            response = await http.post(
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer {KEY}"},
                json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
            )
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert "so far" in events[0]
    assert '"error"' in events[-1] and "upstream_timeout" in events[-1]
    assert len(b.requests) == 0
