"""Usage logging through a real gateway: every outcome gives exactly one entry, in every writer.

A real gateway (Hypercorn on loopback) in front of the fake OpenAI upstream, with two loggers
configured as users write them: a ``JsonLogWriter`` and a ``SQLLogWriter`` on SQLite. Each test
leaves the ``run_gateway`` block before reading the logs: shutdown flushes the loggers' queues,
so what is in the files then is everything that will ever be there.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import trio

from lm_gateway import load_config
from lm_gateway.observability.cost import DEFAULT_PRICES
from tests.conftest import RunningGateway, run_gateway
from tests.fakes.openai_upstream import (
    FakeOpenAI,
    Reply,
    open_fake_openai,
    openai_error,
    sse_event,
)

KEY = "sk-logs"
LIMITED_MODEL = "m-limited"
GUARD = 15


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_sqlite(path: Path, table: str = "llm_requests") -> list[dict[str, Any]]:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(f'SELECT * FROM "{table}"')]


def gateway_config(fake: FakeOpenAI, tmp_path: Path) -> dict[str, Any]:
    return {
        "connections": {"up": {"api_base": fake.base_url, "api_key": "sk-provider"}},
        # Every model name starting with m- goes to the upstream's gpt-4o (which has a price).
        "routing": {"m-*": "up.gpt-4o"},
        "groups": {"default": {"api_keys": [KEY]}},
        "before": [{"class": "RateLimiter", "max_requests": 1, "per": "model"}],
        "loggers": [
            {
                "class": "BaseLogger",
                "log_writer": {"class": "JsonLogWriter", "file_name": str(tmp_path / "l.jsonl")},
            },
            {
                "class": "BaseLogger",
                "log_writer": {"class": "SQLLogWriter", "db_url": f"sqlite:///{tmp_path}/l.db"},
            },
        ],
    }


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi there"}], "stream": stream}


def chunk(content: str) -> bytes:
    return sse_event(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        }
    )


async def leave_midway(gateway: RunningGateway, fake: FakeOpenAI, body: dict[str, Any]) -> str:
    """Send ``body``; once the upstream has it (and, for a stream, the first bytes came back),
    drop the client connection. Returns the request id."""
    ids: list[str] = []
    async with httpx2.AsyncClient() as http, trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        first_bytes = trio.Event()

        async def send() -> None:
            with scope:
                async with http.stream(
                    "POST",
                    f"{gateway.base_url}/chat/completions",
                    headers={"authorization": f"Bearer {KEY}"},
                    json=body,
                ) as response:
                    ids.append(response.headers["x-request-id"])
                    async for _ in response.aiter_bytes():
                        first_bytes.set()

        nursery.start_soon(send)
        await fake.wait_for_request(len(fake.requests) + 1)
        if body["stream"]:
            await first_bytes.wait()
        scope.cancel()
    if not ids:  # the non-streaming answer never started: find the id in the records
        record = await gateway.records.wait_for(
            lambda r: r.outcome == "cancelled" and r.model == body["model"]
        )
        ids.append(record.id)
    await gateway.records.wait_for(lambda r: r.id == ids[0] and r.outcome == "cancelled")
    return ids[0]


async def test_every_outcome_logs_exactly_one_entry_in_jsonl_and_sqlite(tmp_path: Path) -> None:
    expected: dict[str, dict[str, Any]] = {}
    async with open_fake_openai() as fake:
        async with run_gateway(gateway_config(fake, tmp_path)) as gateway:
            client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
            with trio.fail_after(GUARD):
                # ok, not streamed
                raw = await client.chat.completions.with_raw_response.create(**chat("m-ok"))
                done = raw.parse()
                assert done.usage is not None
                expected[raw.headers["x-request-id"]] = {
                    "outcome": "ok", "status": 200, "model": "m-ok", "stream": False,
                    "prompt_tokens": done.usage.prompt_tokens,
                    "completion_tokens": done.usage.completion_tokens,
                    "header_cost": raw.headers["x-lm-gateway-cost"],
                }  # fmt: skip
                # ok, streamed (the client did not ask for usage; the log still has it)
                stream_raw = await client.chat.completions.with_raw_response.create(
                    **chat("m-stream", stream=True)
                )
                chunks = [c async for c in stream_raw.parse()]
                assert all(c.usage is None for c in chunks)
                expected[stream_raw.headers["x-request-id"]] = {
                    "outcome": "ok", "status": 200, "model": "m-stream", "stream": True,
                    "prompt_tokens": done.usage.prompt_tokens,
                    "completion_tokens": done.usage.completion_tokens,
                }  # fmt: skip
                # the upstream fails
                fake.push(Reply.json(openai_error("overloaded", "server_error"), status=503))
                with pytest.raises(openai.InternalServerError) as failed:
                    await client.chat.completions.create(**chat("m-fail"))
                expected[failed.value.response.headers["x-request-id"]] = {
                    "outcome": "error", "status": 503, "model": "m-fail", "stream": False,
                    "error_type": "upstream_error",
                }  # fmt: skip
                # rejected: bad key, unknown model, rate limit
                bad = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-bad", max_retries=0)
                with pytest.raises(openai.AuthenticationError) as unauthenticated:
                    await bad.chat.completions.create(**chat("m-x"))
                expected[unauthenticated.value.response.headers["x-request-id"]] = {
                    "outcome": "rejected", "status": 401, "group": None, "api_key_id": None,
                }  # fmt: skip
                with pytest.raises(openai.NotFoundError) as unrouted:
                    await client.chat.completions.create(**chat("other"))
                expected[unrouted.value.response.headers["x-request-id"]] = {
                    "outcome": "rejected", "status": 404, "model": "other", "connection": None,
                }  # fmt: skip
                await client.chat.completions.create(**chat(LIMITED_MODEL))
                with pytest.raises(openai.RateLimitError) as limited:
                    await client.chat.completions.create(**chat(LIMITED_MODEL))
                rid = limited.value.response.headers["x-request-id"]
                expected[rid] = {
                    "outcome": "rejected", "status": 429, "error_code": "rate_limit_exceeded",
                    "prompt_tokens": None,
                }  # fmt: skip
                # cancelled by the client: while the upstream thinks, and mid-stream
                fake.push(Reply.stall())
                rid = await leave_midway(gateway, fake, chat("m-cancel"))
                expected[rid] = {"outcome": "cancelled", "status": 499, "stream": False}
                fake.push(Reply.stream_then_stall([chunk("partial ")]))
                rid = await leave_midway(gateway, fake, chat("m-cancel-stream", stream=True))
                expected[rid] = {"outcome": "cancelled", "status": 499, "stream": True}
            requests_made = len(gateway.records.records)
            runners = gateway.app.gateway.loggers
        assert all(r.dropped == 0 for r in runners)

    assert requests_made == len(expected) + 1  # + the rate limiter's first, admitted request
    for rows in (read_jsonl(tmp_path / "l.jsonl"), read_sqlite(tmp_path / "l.db")):
        by_id: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_id.setdefault(row["id"], []).append(row)
        assert len(rows) == requests_made
        assert all(len(entries) == 1 for entries in by_id.values()), "an entry was duplicated"
        for rid, fields in expected.items():
            entry = by_id[rid][0]
            for name, value in fields.items():
                if name == "header_cost":
                    assert float(value) == pytest.approx(entry["cost"])
                elif name == "stream" and isinstance(entry[name], int):  # SQLite booleans
                    assert bool(entry[name]) is value
                else:
                    assert entry[name] == value, (rid, name, entry)
            assert entry["created_at"].startswith("20")
            assert entry["duration"] > 0
            assert "sk-logs" not in json.dumps(entry), "the key itself must never be logged"
            if entry["status"] != 401:
                assert entry["group"] == "default"
                assert entry["api_key_id"]
            assert entry["remote_addr"] == "127.0.0.1"
        ok = by_id[next(r for r, f in expected.items() if f.get("model") == "m-ok")][0]
        assert ok["connection"] == "up"
        assert ok["upstream_model"] == "gpt-4o"
        assert ok["time_to_first_token"] > 0
        assert ok["cost"] == pytest.approx(
            DEFAULT_PRICES["gpt-4o*"].cost(
                {"prompt_tokens": ok["prompt_tokens"],
                 "completion_tokens": ok["completion_tokens"]}
            )
        )  # fmt: skip
        # Prompts and answers are not logged unless asked for.
        assert ok.get("prompt") is None and ok.get("response") is None


async def test_cost_is_the_same_streamed_or_not(tmp_path: Path) -> None:
    """Same prompt, same usage, same cost (and the header matches the log)."""
    async with open_fake_openai() as fake:
        config = gateway_config(fake, tmp_path)
        config["before"] = []
        async with run_gateway(config) as gateway:
            client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
            raw = await client.chat.completions.with_raw_response.create(**chat("m-a"))
            stream = await client.chat.completions.create(
                **chat("m-a", stream=True), stream_options={"include_usage": True}
            )
            streamed_usage = [c.usage async for c in stream if c.usage is not None]
            await gateway.records.wait_for(lambda r: r.stream and r.outcome == "ok")
    assert raw.parse().usage == streamed_usage[0]
    entries = read_jsonl(tmp_path / "l.jsonl")
    costs = {e["stream"]: e["cost"] for e in entries}
    assert costs[False] is not None and costs[False] > 0
    assert costs[False] == costs[True]
    assert float(raw.headers["x-lm-gateway-cost"]) == pytest.approx(costs[False])


README_LOGGERS = """
[[loggers]]
class = 'lm_proxy.loggers.BaseLogger'
[loggers.log_writer]
class = 'lm_proxy.loggers.log_writers.JsonLogWriter'
file_name = 'storage/json.log'
[loggers.entry_transformer]
class = 'lm_proxy.loggers.LogEntryTransformer'
completion_tokens = "response.usage.completion_tokens"
prompt_tokens = "response.usage.prompt_tokens"
prompt = "request.messages"
response = "response"
group = "group"
connection = "connection"
api_key_id = "api_key_id"
remote_addr = "remote_addr"
created_at = "created_at"
duration = "duration"
"""


async def test_lm_proxy_readme_logger_example_works_verbatim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes to storage/json.log, relative
    async with open_fake_openai() as fake:
        path = tmp_path / "config.toml"
        path.write_text(
            f"""
[connections.openai]
api_base = "{fake.base_url}"
api_key = "sk-provider"

[routing]
"gpt*" = "openai.*"

[groups.default]
api_keys = ["{KEY}"]
"""
            + README_LOGGERS
        )
        async with run_gateway(load_config(path)) as gateway:
            client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
            done = await client.chat.completions.create(**chat("gpt-4o"))
            stream = await client.chat.completions.create(
                **chat("gpt-4o", stream=True),
                tools=[{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
                tool_choice={"type": "function", "function": {"name": "lookup"}},
            )
            streamed = [c async for c in stream]
            await gateway.records.wait_for(lambda r: r.stream)
    entries = read_jsonl(tmp_path / "storage" / "json.log")
    assert len(entries) == 2
    plain, tools = entries
    assert set(plain) == {
        "completion_tokens", "prompt_tokens", "prompt", "response", "group", "connection",
        "api_key_id", "remote_addr", "created_at", "duration",
    }  # fmt: skip
    assert done.usage is not None
    assert plain["completion_tokens"] == done.usage.completion_tokens
    assert plain["prompt_tokens"] == done.usage.prompt_tokens
    assert plain["prompt"] == [{"role": "user", "content": "hi there"}]
    assert plain["response"]["choices"][0]["message"]["content"] == done.choices[0].message.content
    assert plain["group"] == "default" and plain["connection"] == "openai"
    assert plain["remote_addr"] == "127.0.0.1"
    # A streamed answer is logged as the whole answer it amounted to, tool call included.
    call = tools["response"]["choices"][0]["message"]["tool_calls"][0]
    pieces = [
        tc.function.arguments
        for c in streamed
        for ch in c.choices
        for tc in ch.delta.tool_calls or []
        if tc.function and tc.function.arguments
    ]
    assert len(pieces) > 1, "the fake should stream the arguments in pieces"
    assert call["function"] == {"name": "lookup", "arguments": "".join(pieces)}
    assert tools["response"]["choices"][0]["finish_reason"] == "tool_calls"
    assert tools["completion_tokens"] is not None


async def test_a_cancelled_stream_is_logged_with_the_usage_reported_so_far(tmp_path: Path) -> None:
    """Anthropic reports input tokens (and cache reads) at the start of a stream: a client
    leaving mid-answer is still billed for them, and the log says so."""
    from tests.fakes.anthropic_upstream import message_stream_events, open_fake_anthropic

    answer = {
        "id": "msg_fake_long", "type": "message", "role": "assistant",
        "model": "claude-sonnet-4-6",
        "content": [{"type": "text", "text": "first second third fourth fifth"}],
        "stop_reason": "end_turn", "stop_sequence": None, "stop_details": None,
        "usage": {"input_tokens": 1200, "output_tokens": 5},
    }  # fmt: skip
    async with open_fake_anthropic(api_keys=["sk-ant"]) as fake:
        config = {
            "connections": {
                "claude": {"api_type": "anthropic", "api_base": fake.base_url, "api_key": "sk-ant"}
            },
            "routing": {"claude*": "claude.*"},
            "groups": {"default": {"api_keys": [KEY]}},
            "loggers": [
                {"class": "BaseLogger",
                 "log_writer": {"class": "JsonLogWriter", "file_name": str(tmp_path / "a.jsonl")}}
            ],
        }  # fmt: skip
        fake.push(Reply.stream_then_stall(message_stream_events(answer)[:6]))
        async with run_gateway(config) as gateway:
            client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
            with trio.fail_after(GUARD):
                stream = await client.chat.completions.create(
                    model="claude-sonnet-4-6",
                    messages=[{"role": "user", "content": "x"}],
                    stream=True,
                )
                async for chunk in stream:
                    if any(c.delta.content for c in chunk.choices):
                        break
                await stream.close()
                await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
    (entry,) = read_jsonl(tmp_path / "a.jsonl")
    assert entry["outcome"] == "cancelled" and entry["status"] == 499
    assert entry["prompt_tokens"] == 1200
    assert entry["cost"] == pytest.approx(
        DEFAULT_PRICES["claude-sonnet-4*"].cost(entry | {"prompt_tokens_details": None})
    )
    assert entry["cost"] > 0
