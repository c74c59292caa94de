"""Loggers, their delivery (queue, retries, drops, shutdown flush), writers, and cost."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from lm_gateway import ConfigError
from lm_gateway.context import RequestContext
from lm_gateway.observability.cost import DEFAULT_PRICES, Price, PriceTable
from lm_gateway.observability.loggers import (
    BaseLogger,
    LogEntryTransformer,
    LoggerRunner,
    default_entry,
    redact,
    resolve_path,
)
from lm_gateway.observability.writers import JsonLogWriter
from lm_gateway.service import Gateway, format_cost
from lm_gateway.wire.openai import StreamAccumulator
from tests.conftest import config_from, run_gateway
from tests.observability.helpers import ListWriter

KEY = "sk-test"


def ctx(**fields: Any) -> RequestContext:
    base: dict[str, Any] = {
        "id": "r1", "endpoint": "chat.completions", "method": "POST",
        "path": "/v1/chat/completions", "remote_addr": "127.0.0.1",
    }  # fmt: skip
    base.update(fields)
    context = RequestContext(**base)
    context.finish("ok", 200)
    return context


def echo(**extra: Any) -> dict[str, Any]:
    return {
        "connections": {"echo": {"api_type": "echo"}},
        "routing": {"*": "echo.*"},
        "groups": {"default": {"api_keys": [KEY]}},
        **extra,
    }


# -- paths, transformer, redaction ---------------------------------------------------------------


def test_resolve_path_follows_attributes_keys_and_indices() -> None:
    c = ctx(request={"messages": [{"role": "user", "content": "hi"}]}, usage={"a": 1})
    assert resolve_path(c, "request.messages.0.content") == "hi"
    assert resolve_path(c, "request.messages.-1.role") == "user"
    assert resolve_path(c, "request.messages.5.role") is None
    assert resolve_path(c, "usage.a") == 1
    assert resolve_path(c, "response.usage.completion_tokens") is None
    assert resolve_path(c, "nothing.here") is None
    assert resolve_path(c, "llm_params.messages.0.role") == "user"


def test_transformer_maps_fields_and_formats_created_at() -> None:
    transformer = LogEntryTransformer(tokens="usage.total_tokens", created_at="created_at")
    entry = transformer(ctx(usage={"total_tokens": 7}))
    assert entry["tokens"] == 7
    assert isinstance(entry["created_at"], str) and entry["created_at"].endswith("+00:00")
    assert transformer.reads_response() is False
    assert LogEntryTransformer(r="response").reads_response() is True
    assert LogEntryTransformer(u="response.usage.total_tokens").reads_response() is False
    with pytest.raises(ValueError, match="x: expected a dotted path"):
        LogEntryTransformer(x="")


def test_redaction_replaces_values_at_paths_including_wildcards() -> None:
    entry = {
        "prompt": [{"role": "user", "content": "secret"}, {"role": "system", "content": "s2"}],
        "user_info": {"email": "a@b", "name": "A"},
    }
    redact(entry, ["prompt.*.content", "user_info.email", "absent.path", "prompt.9.content"])
    assert entry == {
        "prompt": [{"role": "user", "content": "[redacted]"},
                   {"role": "system", "content": "[redacted]"}],
        "user_info": {"email": "[redacted]", "name": "A"},
    }  # fmt: skip


def test_default_entry_has_the_fields_and_no_key_or_prompt_by_default() -> None:
    c = ctx(
        request={"messages": [{"role": "user", "content": "hi"}]},
        usage={
            "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
        group="g", api_key_id="kid", model="m", connection="c", upstream_model="u",
    )  # fmt: skip
    entry = default_entry(c)
    for field in (
        "id", "created_at", "duration", "time_to_first_token", "group", "api_key_id",
        "user_info", "remote_addr", "model", "connection", "upstream_model", "attempts",
        "status", "error_type", "prompt_tokens", "completion_tokens", "cached_tokens",
        "reasoning_tokens", "cost", "stream",
    ):  # fmt: skip
        assert field in entry, field
    assert (entry["cached_tokens"], entry["reasoning_tokens"]) == (4, 2)
    assert "prompt" not in entry and "response" not in entry
    with_prompt = default_entry(c, include_prompt=True)
    assert with_prompt["prompt"] == [{"role": "user", "content": "hi"}]


def test_base_logger_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="log_writer"):
        BaseLogger({"file_name": "x"})
    with pytest.raises(TypeError, match="no write"):
        BaseLogger(42)
    with pytest.raises(ValueError, match="queue_size"):
        BaseLogger(ListWriter(), queue_size=0)
    with pytest.raises(ValueError, match="max_retries"):
        BaseLogger(ListWriter(), max_retries=-1)


# -- the runner ----------------------------------------------------------------------------------


async def test_runner_retries_a_failing_writer_then_delivers() -> None:
    writer = ListWriter(fail_first=2)
    runner = LoggerRunner(BaseLogger(writer, max_retries=3), "t")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.serve)
        runner.submit(ctx(id="a"))
        runner.submit(ctx(id="b"))
        runner.close()
    assert [e["id"] for e in writer.entries] == ["a", "b"]
    assert writer.calls == 3  # one batch: two failures, then success
    assert runner.dropped == 0 and runner.written == 2


async def test_runner_drops_and_counts_when_its_queue_is_full() -> None:
    writer = ListWriter()
    writer.gate = threading.Event()  # the sink hangs
    drops: list[int] = []
    runner = LoggerRunner(BaseLogger(writer, queue_size=3, batch_size=1), "t")
    runner.on_drop = lambda name, count: drops.append(count)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.serve)
        runner.submit(ctx(id="first"))
        with trio.fail_after(5):
            while writer.calls == 0:  # "first" is being written (and hangs)
                await trio.sleep(0.001)
        for i in range(10):
            runner.submit(ctx(id=f"n{i}"))
        assert runner.dropped == 7  # 3 fit in the queue
        assert sum(drops) == 7
        writer.gate.set()
        runner.close()
    assert [e["id"] for e in writer.entries] == ["first", "n0", "n1", "n2"]


async def test_runner_counts_what_the_shutdown_flush_could_not_write() -> None:
    writer = ListWriter()
    writer.gate = threading.Event()
    runner = LoggerRunner(BaseLogger(writer, batch_size=2), "t")
    with trio.move_on_after(0.2):  # the flush deadline
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.serve)
            for i in range(5):
                runner.submit(ctx(id=str(i)))
            runner.close()
    # The runner returned while its write is still stuck (a dead database must not hold the
    # shutdown); the batch in hand (2) and the 3 still queued are counted, not silently lost.
    assert writer.entries == []
    assert runner.dropped == 5
    writer.gate.set()


async def test_runner_skips_outcomes_the_logger_does_not_want() -> None:
    writer = ListWriter()
    runner = LoggerRunner(BaseLogger(writer, only=["error"]), "t")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.serve)
        runner.submit(ctx(id="ok"))
        failed = RequestContext(id="bad", endpoint="e", method="POST", path="/", remote_addr=None)
        failed.finish("error", 502)
        runner.submit(failed)
        runner.close()
    assert [e["id"] for e in writer.entries] == ["bad"]


# -- writers -------------------------------------------------------------------------------------


def test_json_writer_appends_lines_and_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "a.jsonl"
    writer = JsonLogWriter(str(path), max_bytes=200, backup_count=2)
    for i in range(12):
        writer.write([{"i": i, "pad": "x" * 40}])
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["a.jsonl", "a.jsonl.1", "a.jsonl.2"]
    newest = [json.loads(line)["i"] for line in path.read_text().splitlines()]
    older = [json.loads(line)["i"] for line in (path.parent / "a.jsonl.1").read_text().splitlines()]
    assert newest[-1] == 11
    assert older[-1] == newest[0] - 1  # rotation lost nothing between the two
    assert all(p.stat().st_size <= 200 for p in path.parent.iterdir())


def test_json_writer_writes_what_json_cannot_hold(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"

    class Thing:
        def __init__(self) -> None:
            self.a = 1
            self._hidden = 2

    JsonLogWriter(str(path)).write(
        [{"err": ValueError("bad"), "b": b"\xffok", "s": {2, 1}, "t": Thing()}]
    )
    assert json.loads(path.read_text()) == {
        "err": "ValueError: bad", "b": "\ufffdok", "s": [1, 2], "t": {"a": 1},
    }  # fmt: skip


def test_json_writer_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="file_name"):
        JsonLogWriter("")
    with pytest.raises(ValueError, match="max_bytes"):
        JsonLogWriter("x", max_bytes=-1)


# -- cost ----------------------------------------------------------------------------------------


def test_price_counts_cached_and_cache_write_tokens_apart() -> None:
    price = Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)
    usage = {
        "prompt_tokens": 1_000_000, "completion_tokens": 100_000,
        "prompt_tokens_details": {"cached_tokens": 400_000, "cache_write_tokens": 100_000},
    }  # fmt: skip
    # 500k uncached * 3 + 400k cached * 0.3 + 100k written * 3.75 + 100k out * 15 (per 1M)
    assert price.cost(usage) == pytest.approx(1.5 + 0.12 + 0.375 + 1.5)
    assert Price(1.0, 2.0).cost(usage) == pytest.approx(1.0 + 0.2)


def test_price_table_precedence_and_patterns() -> None:
    table = PriceTable(DEFAULT_PRICES, {"gpt-4o*": Price(9.0, 9.0)}, {"gpt-4o-mini": Price(1, 1)})
    assert table.price("gpt-4o-2024-08-06") == Price(9.0, 9.0)  # config over shipped
    assert table.price("gpt-4o-mini") == Price(1, 1)  # the connection's layer first
    assert table.price("gpt-4o-mini-2024") == Price(9.0, 9.0)  # the config's glob covers it
    shipped = PriceTable(DEFAULT_PRICES)
    assert shipped.price("gpt-4o-mini-2024") == DEFAULT_PRICES["gpt-4o-mini*"]  # longest glob
    assert shipped.price("gpt-4o-2024") == DEFAULT_PRICES["gpt-4o*"]
    # A connection's catch-all beats the shipped prices of well-known names.
    local = PriceTable(DEFAULT_PRICES, {}, {"*": Price(0.05, 0.05)})
    assert local.price("gpt-4o") == Price(0.05, 0.05)
    assert table.price("models/gemini-2.5-flash") == DEFAULT_PRICES["gemini-2.5-flash*"]
    assert table.price("claude-sonnet-4-5-20250929") == DEFAULT_PRICES["claude-sonnet-4*"]
    assert table.price("my-local-model") is None
    assert table.cost("my-local-model", {"prompt_tokens": 5}) is None
    assert table.cost("gpt-4o", None) is None


def test_format_cost_is_plain_decimal() -> None:
    assert format_cost(0.0000125) == "0.0000125"
    assert format_cost(0.0) == "0"
    assert format_cost(12.5) == "12.5"


def test_config_prices_override_per_connection() -> None:
    config = config_from(
        {
            "connections": {
                "a": {"api_base": "http://127.0.0.1:9/v1", "api_key": "k"},
                "b": {"api_base": "http://127.0.0.1:9/v1", "api_key": "k",
                      "prices": {"gpt-4o": {"input": 1, "output": 2}}},
            },
            "routing": {"*": "a.*"},
            "groups": {"default": {"api_keys": [KEY]}},
            "prices": {"gpt-4o": {"input": 5, "output": 6, "cached_input": 0.5}},
        }
    )  # fmt: skip
    gateway = Gateway(config)
    assert gateway._price_tables["a"].price("gpt-4o") == Price(5.0, 6.0, 0.5)
    assert gateway._price_tables["b"].price("gpt-4o") == Price(1.0, 2.0)


@pytest.mark.parametrize(
    ("prices", "path", "words"),
    [
        ({"m": {"input": 1}}, "prices.m", "needs input and output"),
        ({"m": {"input": 1, "output": "x"}}, "prices.m.output", "number of US dollars"),
        ({"m": {"input": -1, "output": 1}}, "prices.m.input", "zero or more"),
        ({"m": {"input": 1, "output": 1, "cache_read": 1}}, "prices.m.cache_read", "unknown"),
    ],
)
def test_bad_prices_are_config_errors(prices: Any, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from(echo(prices=prices))
    assert info.value.path == path
    assert words in info.value.message


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        ({"metrics_path": "metrics"}, "metrics_path", "must start with '/'"),
        ({"metrics_port": 8000}, "metrics_port", "must differ from port"),
        ({"metrics_port": 70000}, "metrics_port", "at most 65535"),
        ({"metrics": "maybe"}, "metrics", ""),
        ({"log_flush_seconds": -1}, "log_flush_seconds", "positive"),
    ],
)
def test_bad_metrics_and_logging_settings_are_config_errors(
    extra: dict[str, Any], path: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config_from(echo(**extra))
    assert info.value.path == path
    assert words in info.value.message


@pytest.mark.parametrize(
    ("logger", "path", "words"),
    [
        ({"class": "BaseLogger"}, "loggers[0]", "log_writer"),
        (
            {"class": "BaseLogger", "log_writer": {"class": "JsonLogWriter", "file_name": ""}},
            "loggers[0].log_writer",
            "file_name: must not be empty",
        ),
        (
            {"class": "BaseLogger", "log_writer": {"class": "lm_proxy_db_connector.DBLogWriter"}},
            "loggers[0].log_writer.class",
            "SQLLogWriter",
        ),
        ("tests.observability.helpers.NOT_THERE", "loggers[0]", "has no attribute"),
        (
            {"class": "BaseLogger", "log_writer": {"class": "SQLLogWriter", "db_url": "nope://"}},
            "loggers[0].log_writer",
            "SQLLogWriter",
        ),
    ],
)
def test_bad_loggers_are_config_errors_naming_where(logger: Any, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        Gateway(config_from(echo(loggers=[logger])))
    assert info.value.path == path
    assert words in info.value.message


def test_a_logger_that_is_not_callable_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        Gateway(config_from(echo(loggers=["tests.observability.test_loggers.KEY"])))
    assert info.value.path == "loggers[0]"
    assert "BaseLogger or callable" in info.value.message


# -- callables as loggers ------------------------------------------------------------------------

SEEN: dict[str, list[str]] = {"sync": [], "async": [], "instance": []}


def sync_logger(ctx: RequestContext) -> None:
    assert threading.current_thread() is not threading.main_thread()  # off the event loop
    SEEN["sync"].append(ctx.id)


async def async_logger(ctx: RequestContext) -> None:
    SEEN["async"].append(ctx.id)


class AsyncCallLogger:
    """lm-proxy never ran these (an instance with ``async def __call__``); we do."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def __call__(self, ctx: RequestContext) -> None:
        SEEN["instance"].append(f"{self.tag}:{ctx.id}")


async def test_sync_async_and_instance_loggers_all_receive_every_request() -> None:
    for seen in SEEN.values():
        seen.clear()
    loggers = [
        "tests.observability.test_loggers.sync_logger",
        "tests.observability.test_loggers.async_logger",
        {"class": "tests.observability.test_loggers.AsyncCallLogger", "tag": "t"},
    ]
    async with run_gateway(echo(loggers=loggers)) as gateway:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(
                base_url=gateway.base_url, api_key="bad", max_retries=0
            ).models.list()
    rid = raw.headers["x-request-id"]
    assert SEEN["sync"][0] == rid and len(SEEN["sync"]) == 2
    assert SEEN["async"][0] == rid and len(SEEN["async"]) == 2
    assert SEEN["instance"][0] == f"t:{rid}" and len(SEEN["instance"]) == 2


async def test_shutdown_flushes_what_is_queued(tmp_path: Path) -> None:
    """Requests answered just before shutdown are all written (the queue is drained first)."""
    path = tmp_path / "flush.jsonl"
    logger = {"class": "BaseLogger", "batch_size": 1,
              "log_writer": {"class": "JsonLogWriter", "file_name": str(path)}}  # fmt: skip
    writer_class = "tests.observability.helpers.ListWriter"
    slow = {"class": "BaseLogger", "batch_size": 5,
            "log_writer": {"class": writer_class, "delay": 0.02}}  # fmt: skip
    async with run_gateway(echo(loggers=[logger, slow])) as gateway:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(
                    lambda: client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": "x"}]
                    )
                )
        runner, slow_runner = gateway.app.gateway.loggers
        writer = slow_runner.logger.log_writer  # type: ignore[union-attr]
        assert len(writer.entries) < 50, "the slow writer should still have work queued"
    assert len(path.read_text().splitlines()) == 50
    assert runner.dropped == 0 and slow_runner.dropped == 0
    assert len(writer.entries) == 50
    assert writer.closed  # and its resources were released


# -- the stream accumulator ----------------------------------------------------------------------


def test_stream_accumulator_rebuilds_text_tools_and_usage() -> None:
    acc = StreamAccumulator()
    chunks: list[dict[str, Any]] = [
        {"id": "c", "created": 5, "model": "m",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "Hel"}},
                                {"index": 1, "delta": {"content": "Other"}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "lo", "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": '{"a"'}}]}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]},
        {"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    ]  # fmt: skip
    for chunk in chunks:
        acc.observe(chunk)
    body = acc.result()
    assert body["id"] == "c" and body["created"] == 5 and body["object"] == "chat.completion"
    first, second = body["choices"]
    assert first["message"]["content"] == "Hello"
    assert first["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert first["finish_reason"] == "tool_calls"
    assert second["message"]["content"] == "Other" and second["finish_reason"] is None
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4}


def test_the_access_log_handler_writes_a_batch_at_once() -> None:
    import io
    import logging

    from lm_gateway.observability import BatchedStreamHandler

    class CountingStream(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    stream = CountingStream()
    handler = BatchedStreamHandler(stream, max_lines=3)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.batched")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.info("one")
    logger.info("two")
    assert stream.getvalue() == ""  # kept until the batch ends
    handler.flush()
    assert stream.getvalue() == "one\ntwo\n" and stream.writes == 1
    for word in ("a", "b", "c"):  # max_lines reached: written without waiting
        logger.info(word)
    assert stream.getvalue().endswith("a\nb\nc\n") and stream.writes == 2
