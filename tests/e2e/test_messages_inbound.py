"""Anthropic's Messages API inbound: the official ``anthropic`` SDK -> gateway -> any model.

The SDK is the judge: if its stream helpers accumulate our events into the right final
message and it raises the right exception classes, Claude Code and other Anthropic-SDK tools
will work too. Upstreams are the echo model and the fake OpenAI server (tools, errors).
"""

from __future__ import annotations

import base64
from typing import Any

import anthropic
import httpx2
import pytest
import trio

from tests.conftest import RunningGateway, run_gateway
from tests.fakes.openai_upstream import FakeOpenAI, Reply, open_fake_openai, openai_error

KEY = "sk-claude-code"
GUARD = 15
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city.",
    "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
}


def config(fake: FakeOpenAI) -> dict[str, Any]:
    return {
        "connections": {
            "up": {"api_base": fake.base_url, "api_key": "sk-provider"},
            "echo": {"api_type": "echo"},
        },
        "routing": {"echo*": "echo.*", "gpt*": "up.*"},
        "groups": {"default": {"api_keys": [KEY]}},
    }


def client(gateway: RunningGateway, key: str = KEY) -> anthropic.AsyncAnthropic:
    # Like Claude Code with ANTHROPIC_BASE_URL: the SDK appends /v1/messages itself.
    return anthropic.AsyncAnthropic(
        base_url=gateway.url, api_key=key, max_retries=0, timeout=GUARD
    )


async def test_text_plain_and_streamed_with_the_sdk_helpers() -> None:
    async with open_fake_openai() as fake, run_gateway(config(fake)) as gateway:
        llm = client(gateway)
        message = await llm.messages.create(
            model="echo", max_tokens=100, system="be brief",
            messages=[{"role": "user", "content": "hello there"}],
        )  # fmt: skip
        async with llm.messages.stream(
            model="echo", max_tokens=100,
            messages=[{"role": "user", "content": [{"type": "text", "text": "stream me please"}]}],
        ) as stream:  # fmt: skip
            events = [event.type async for event in stream]
            final = await stream.get_final_message()
        record = await gateway.records.wait_for(lambda r: r.endpoint == "messages" and r.stream)
    assert message.type == "message" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "hello there"
    assert message.stop_reason == "end_turn"
    assert message.model == "echo"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 2
    assert final.content[0].text == "stream me please"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert record.usage is not None and record.outcome == "ok"


async def test_tool_use_streamed_then_tool_result_round_trip() -> None:
    async with open_fake_openai() as fake, run_gateway(config(fake)) as gateway:
        llm = client(gateway)
        async with llm.messages.stream(
            model="gpt-4o", max_tokens=200, tools=[WEATHER],
            tool_choice={"type": "tool", "name": "get_weather"},
            messages=[{"role": "user", "content": "Paris"}],
        ) as stream:  # fmt: skip
            final = await stream.get_final_message()
        (call,) = [b for b in final.content if b.type == "tool_use"]
        assert not [b for b in final.content if b.type == "text"], "no empty text blocks"
        follow = await llm.messages.create(
            model="gpt-4o", max_tokens=200, tools=[WEATHER],
            messages=[
                {"role": "user", "content": "Paris"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]},
            ],
        )  # fmt: skip
    assert final.stop_reason == "tool_use"
    assert call.name == "get_weather" and call.input == {"q": "Paris"}
    sent = fake.requests[0].json
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    second = fake.requests[1].json["messages"]
    assert second[1]["tool_calls"][0]["id"] == call.id
    assert second[2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    assert follow.stop_reason == "tool_use"  # the fake calls its first tool again


async def test_images_and_max_tokens() -> None:
    async with open_fake_openai() as fake, run_gateway(config(fake)) as gateway:
        fake.push(
            Reply.json({
                "id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o",
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": "cut sh"}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                          "prompt_tokens_details": {"cached_tokens": 4}},
            })
        )  # fmt: skip
        png = base64.b64encode(b"\x89PNG fake").decode()
        message = await client(gateway).messages.create(
            model="gpt-4o", max_tokens=2,
            messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": png}},
                {"type": "text", "text": "what is it?"}]}],
        )  # fmt: skip
    assert message.stop_reason == "max_tokens"
    assert message.usage.input_tokens == 6 and message.usage.cache_read_input_tokens == 4
    parts = fake.requests[0].json["messages"][0]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}
    assert fake.requests[0].json["max_tokens"] == 2


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Reply.json(openai_error("slow down"), status=429, headers={"retry-after": "5"}),
         anthropic.RateLimitError),
        (Reply.json(openai_error("overloaded", "server_error"), status=529),
         anthropic.OverloadedError),
        (Reply.json(openai_error("boom", "server_error"), status=500),
         anthropic.InternalServerError),
    ],
)  # fmt: skip
async def test_upstream_errors_raise_the_sdks_exception_classes(reply: Reply, error: Any) -> None:
    async with open_fake_openai() as fake, run_gateway(config(fake)) as gateway:
        fake.push(reply)
        with pytest.raises(error) as raised:
            await client(gateway).messages.create(
                model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            )
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] in ("rate_limit_error", "overloaded_error", "api_error")


async def test_gateway_refusals_in_anthropics_shape() -> None:
    async with open_fake_openai() as fake, run_gateway(config(fake)) as gateway:
        with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
            await client(gateway, key="wrong").messages.create(
                model="echo", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(anthropic.NotFoundError) as unknown:
            await client(gateway).messages.create(
                model="nope", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            )
        async with httpx2.AsyncClient() as http:  # the SDK itself insists on max_tokens
            no_max = await http.post(
                f"{gateway.url}/v1/messages",
                headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
                json={"model": "echo", "messages": [{"role": "user", "content": "x"}]},
            )
    assert unauthenticated.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert no_max.status_code == 400
    assert no_max.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error",
                  "message": "max_tokens: Field required (a positive integer)"},
    }  # fmt: skip


async def test_count_tokens_and_models_in_anthropics_shape() -> None:
    async with open_fake_openai() as fake, run_gateway(config(fake)) as gateway:
        llm = client(gateway)
        counted = await llm.messages.count_tokens(
            model="echo", messages=[{"role": "user", "content": "hello " * 40}]
        )
        models = await llm.models.list()
    assert counted.input_tokens >= 60
    assert {m.id for m in models.data} == {"echo*", "gpt*"}
    assert all(m.type == "model" for m in models.data)


async def test_a_client_leaving_a_message_stream_cancels_the_upstream() -> None:
    async with open_fake_openai() as fake, run_gateway(config(fake)) as gateway:
        fake.push(Reply.stall())
        llm = client(gateway)
        with trio.move_on_after(0.5):
            async with llm.messages.stream(
                model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            ) as stream:
                await stream.get_final_message()
        with trio.fail_after(GUARD):
            await fake.wait_closed(fake.requests[0])
            record = await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
    assert record.endpoint == "messages"


# -- Anthropic connections: passthrough ----------------------------------------------------


async def test_passthrough_to_an_anthropic_connection_keeps_everything(tmp_path: Any) -> None:
    from tests.fakes.anthropic_upstream import open_fake_anthropic, thinking_signature

    async with open_fake_anthropic(api_keys=["sk-ant-provider"]) as fake:
        data = {
            "connections": {"claude": {
                "api_type": "anthropic", "api_base": fake.base_url, "api_key": "sk-ant-provider",
                "anthropic_beta": ["config-beta-1"]}},
            "routing": {"claude*": "claude.*", "sonnet": "claude.claude-sonnet-4-6"},
            "groups": {"default": {"api_keys": [KEY]}},
            "loggers": [{"class": "BaseLogger", "log_writer": {
                "class": "JsonLogWriter", "file_name": str(tmp_path / "l.jsonl")}}],
        }  # fmt: skip
        async with run_gateway(data) as gateway:
            llm = anthropic.AsyncAnthropic(
                base_url=gateway.url, api_key=KEY, max_retries=0, timeout=GUARD,
                default_headers={"anthropic-beta": "client-beta-2"},
            )  # fmt: skip
            request: Any = {
                "model": "sonnet", "max_tokens": 2000,
                "thinking": {"type": "enabled", "budget_tokens": 1024},
                "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
                "messages": [{"role": "user", "content": "plan it"}],
            }  # fmt: skip
            message = await llm.messages.create(**request)
            async with llm.messages.stream(**request) as stream:
                final = await stream.get_final_message()
            await gateway.records.wait_for(lambda r: r.stream and r.outcome == "ok")
    # The thinking block arrives signed, as Anthropic made it (a translation would lose it).
    thinking = message.content[0]
    assert thinking.type == "thinking"
    assert thinking.signature == thinking_signature(thinking.thinking)
    assert final.content[0].signature == thinking.signature  # type: ignore[union-attr]
    assert message.model == final.model == "sonnet"
    sent = fake.requests[0]
    body = sent.json
    assert body["model"] == "claude-sonnet-4-6"
    assert body["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent.headers["x-api-key"] == "sk-ant-provider"
    assert set(sent.headers["anthropic-beta"].split(",")) == {"config-beta-1", "client-beta-2"}
    import json

    entries = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [e["endpoint"] for e in entries] == ["messages", "messages"]
    for entry in entries:
        assert entry["prompt_tokens"] == message.usage.input_tokens
        assert entry["completion_tokens"] == message.usage.output_tokens
        assert entry["cost"] > 0


async def test_passthrough_errors_keep_anthropics_status() -> None:
    from tests.fakes.anthropic_upstream import error_reply, open_fake_anthropic

    async with open_fake_anthropic(api_keys=["k"]) as fake:
        data = {
            "connections": {"claude": {"api_type": "anthropic", "api_base": fake.base_url,
                                       "api_key": "k", "cooldown_after_failures": 0}},
            "routing": {"claude*": "claude.*"},
            "groups": {"default": {"api_keys": [KEY]}},
        }  # fmt: skip
        fake.push(error_reply("overloaded_error", "Overloaded"))
        async with run_gateway(data) as gateway:
            with pytest.raises(anthropic.OverloadedError) as raised:
                await client(gateway).messages.create(
                    model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x"}]
                )
    assert raised.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


async def test_count_tokens_is_exact_on_an_anthropic_connection() -> None:
    from tests.fakes.anthropic_upstream import open_fake_anthropic

    async with open_fake_anthropic(api_keys=["k"]) as fake:
        data = {
            "connections": {"claude": {"api_type": "anthropic", "api_base": fake.base_url,
                                       "api_key": "k"}},
            "routing": {"claude*": "claude.claude-sonnet-4-6"},
            "groups": {"default": {"api_keys": [KEY]}},
        }  # fmt: skip
        async with run_gateway(data) as gateway:
            counted = await client(gateway).messages.count_tokens(
                model="claude-any", messages=[{"role": "user", "content": "one two three four"}]
            )
    assert counted.input_tokens == 4  # the fake counts words, as its usage does
    sent = fake.requests[0]
    assert sent.path == "/v1/messages/count_tokens"
    assert sent.json["model"] == "claude-sonnet-4-6"


async def test_messages_to_a_gemini_connection() -> None:
    from tests.fakes.gemini_upstream import open_fake_gemini

    async with open_fake_gemini(api_keys={"g"}) as fake:
        data = {
            "connections": {"gem": {"api_type": "google", "api_base": fake.base_url,
                                    "api_key": "g"}},
            "routing": {"gemini*": "gem.*"},
            "groups": {"default": {"api_keys": [KEY]}},
        }  # fmt: skip
        async with run_gateway(data) as gateway:
            llm = client(gateway)
            message = await llm.messages.create(
                model="gemini-2.5-flash", max_tokens=50,
                messages=[{"role": "user", "content": "hello gemini"}],
            )  # fmt: skip
            async with llm.messages.stream(
                model="gemini-2.5-flash", max_tokens=50, tools=[WEATHER],
                tool_choice={"type": "tool", "name": "get_weather"},
                messages=[{"role": "user", "content": "Rome"}],
            ) as stream:  # fmt: skip
                final = await stream.get_final_message()
    assert message.content[0].type == "text" and "hello gemini" in message.content[0].text
    assert message.stop_reason == "end_turn"
    (call,) = [b for b in final.content if b.type == "tool_use"]
    assert call.name == "get_weather" and final.stop_reason == "tool_use"


async def test_pings_keep_a_slow_stream_alive() -> None:
    from tests.fakes.openai_upstream import sse_event
    from tests.wire.test_anthropic_inbound import check, parse

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse_event({"id": "c", "object": "chat.completion.chunk", "created": 1,
                          "model": "gpt-4o", "choices": [
                              {"index": 0, "delta": delta, "finish_reason": finish}]})  # fmt: skip

    async with open_fake_openai() as fake, run_gateway(config(fake)) as gateway:
        gateway.app.gateway.anthropic_ping_seconds = 0.05
        fake.push(Reply.sse(
            [chunk({"role": "assistant", "content": ""}), chunk({"content": "slow"}),
             chunk({"content": " answer"}), chunk({}, "stop")],
            delay=0.3,
        ))  # fmt: skip
        async with httpx2.AsyncClient(timeout=GUARD) as http:
            response = await http.post(
                f"{gateway.url}/v1/messages",
                headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
                json={"model": "gpt-4o", "max_tokens": 20, "stream": True,
                      "messages": [{"role": "user", "content": "x"}]},
            )  # fmt: skip
    events = parse(response.content)
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start"
    assert kinds.count("ping") >= 2
    result = check([e for e in events if e[0] != "ping"])
    assert result["blocks"][0]["text"] == "slow answer"
