"""Local PyTorch inference end to end: the ``openai`` SDK -> gateway -> a tiny random model.

The model is built in a temporary directory (no downloads). Generation is greedy (deterministic)
unless a test samples on purpose. Nothing here measures time: "the gateway stays responsive"
is shown by order (``/health`` answered while a generation is still running), and "a
disconnect stops the generation" by the generation's own step count and its freed slot.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import trio

from lm_gateway import ConfigError, Gateway
from tests.conftest import RunningGateway, config_from, run_gateway
from tests.redis_support import services_required

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    if services_required():
        raise RuntimeError("torch and transformers must be installed (pip install -e '.[test]')")
    pytest.skip("torch/transformers are not installed", allow_module_level=True)

from tests.local.tiny_model import build_tiny_model

KEY = "sk-local"
GUARD = 60
MESSAGES = [{"role": "user", "content": "hello there"}]
#: A generation far longer than any test waits for (and than socket buffers hold).
LONG = 30_000


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def endless_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("endless"), endless=True)


def config(model: Path, **connection: Any) -> dict[str, Any]:
    return {
        "connections": {
            "local": {"api_type": "transformers", "model": str(model), "device": "cpu",
                      **connection},
            "echo": {"api_type": "echo"},
        },
        "routing": {"tiny*": "local.*", "echo": "echo.*"},
        "groups": {"default": {"api_keys": [KEY]}},
    }  # fmt: skip


def client(gateway: RunningGateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)


def templated_prompt_tokens(model_dir: Path, messages: list[dict[str, Any]]) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return len(ids["input_ids"])


async def test_completion_streamed_and_not_agree(tiny_dir: Path) -> None:
    async with run_gateway(config(tiny_dir)) as gateway:
        llm = client(gateway)
        with trio.fail_after(GUARD):
            done = await llm.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=12, temperature=0
            )
            stream = await llm.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = [c async for c in stream]
    choice = done.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert done.model == "tiny"
    assert done.usage is not None
    assert done.usage.prompt_tokens == templated_prompt_tokens(tiny_dir, MESSAGES)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    if choice.finish_reason == "length":
        assert done.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    finishes = [f for f in finishes if f]
    assert finishes == [choice.finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage == done.usage


async def test_max_tokens_ends_with_length(endless_dir: Path) -> None:
    async with run_gateway(config(endless_dir, max_new_tokens=7)) as gateway:
        with trio.fail_after(GUARD):
            default = await client(gateway).chat.completions.create(
                model="tiny", messages=MESSAGES, temperature=0
            )
            asked = await client(gateway).chat.completions.create(
                model="tiny", messages=MESSAGES, temperature=0, max_completion_tokens=3
            )
    assert default.choices[0].finish_reason == "length"
    assert default.usage is not None and default.usage.completion_tokens == 7
    assert asked.usage is not None and asked.usage.completion_tokens == 3


async def test_stop_strings_cut_the_answer(endless_dir: Path) -> None:
    async with run_gateway(config(endless_dir)) as gateway:
        llm = client(gateway)
        with trio.fail_after(GUARD):
            full = await llm.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=40, temperature=0
            )
            text = full.choices[0].message.content or ""
            assert len(text) > 12
            stop = text[6:9]
            cut = await llm.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=40, temperature=0, stop=[stop, "\x00"]
            )
            stream = await llm.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=40, temperature=0, stop=stop,
                stream=True,
            )  # fmt: skip
            chunks = [c async for c in stream]
    expected = text[: text.find(stop)]
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_n_returns_every_choice(endless_dir: Path) -> None:
    async with run_gateway(config(endless_dir)) as gateway:
        llm = client(gateway)
        with trio.fail_after(GUARD):
            sampled = await llm.chat.completions.create(
                model="tiny", messages=MESSAGES, n=2, max_tokens=8, temperature=1.0, seed=7
            )
            again = await llm.chat.completions.create(
                model="tiny", messages=MESSAGES, n=2, max_tokens=8, temperature=1.0, seed=7
            )
            greedy = await llm.chat.completions.create(
                model="tiny", messages=MESSAGES, n=3, max_tokens=8, temperature=0
            )
            stream = await llm.chat.completions.create(
                model="tiny", messages=MESSAGES, n=2, max_tokens=8, temperature=1.0, seed=7,
                stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = [c async for c in stream]
    assert [c.index for c in sampled.choices] == [0, 1]
    assert all(c.message.content for c in sampled.choices)
    contents = [c.message.content for c in sampled.choices]
    assert [c.message.content for c in again.choices] == contents
    assert sampled.choices[0].message.content != sampled.choices[1].message.content
    assert sampled.usage is not None and sampled.usage.completion_tokens == 16
    assert len({c.message.content for c in greedy.choices}) == 1
    assert greedy.usage is not None and greedy.usage.completion_tokens == 24
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {c.index: c.message.content for c in sampled.choices}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


async def stream_until_first_token(
    gateway: RunningGateway, http: httpx2.AsyncClient, max_tokens: int
) -> Any:
    """Open a streaming request; return the response once a content chunk has arrived."""
    response = await http.send(
        http.build_request(
            "POST",
            f"{gateway.base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": "tiny", "messages": MESSAGES, "stream": True,
                  "max_tokens": max_tokens, "temperature": 0},
        ),
        stream=True,
    )  # fmt: skip
    assert response.status_code == 200
    # Kept on the response: an abandoned line iterator, once garbage-collected, closes the
    # response (which is a disconnect).
    response.lines = lines = response.aiter_lines()
    async for line in lines:
        if '"content":"' in line and '"content":""' not in line:
            return response
    raise AssertionError("the stream ended before its first token")


async def test_gateway_answers_while_a_long_generation_runs(endless_dir: Path) -> None:
    async with run_gateway(config(endless_dir)) as gateway:
        provider: Any = gateway.app.gateway.connections["local"]
        async with httpx2.AsyncClient(timeout=GUARD) as http:
            with trio.fail_after(GUARD):
                response = await stream_until_first_token(gateway, http, max_tokens=LONG)
                try:
                    health = await http.get(f"{gateway.url}/health")
                    echo = await client(gateway).chat.completions.create(
                        model="echo", messages=[{"role": "user", "content": "still here"}]
                    )
                    # Both answered while the model was still generating.
                    assert provider._limiter.borrowed_tokens == 1
                finally:
                    await response.aclose()
    assert health.status_code == 200
    assert echo.choices[0].message.content == "still here"


async def test_client_disconnect_stops_the_generation(endless_dir: Path) -> None:
    async with run_gateway(config(endless_dir)) as gateway:
        provider: Any = gateway.app.gateway.connections["local"].inner  # inside its guard
        jobs: list[Any] = []
        original = provider._generate

        async def recording(job: Any) -> None:
            jobs.append(job)
            await original(job)

        provider._generate = recording
        async with httpx2.AsyncClient(timeout=GUARD) as http:
            with trio.fail_after(GUARD):
                response = await stream_until_first_token(gateway, http, max_tokens=LONG)
                await response.aclose()  # the client leaves
                record = await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
                # The slot is free again only once the generation thread has returned.
                while provider._limiter.borrowed_tokens:
                    await trio.sleep(0.01)
        (job,) = jobs
        steps = job.steps
        assert job.cancel.is_set()
        assert steps < LONG, "the thread generated to the end for nobody"
        # And it stays stopped.
        await trio.sleep(0.2)
        assert job.steps == steps
    assert record.status == 499


async def test_a_full_queue_answers_503_at_once(endless_dir: Path) -> None:
    settings = config(endless_dir, max_concurrency=1, max_queue=0)
    async with run_gateway(settings) as gateway, httpx2.AsyncClient(timeout=GUARD) as http:
        with trio.fail_after(GUARD):
            response = await stream_until_first_token(gateway, http, max_tokens=LONG)
            try:
                with pytest.raises(openai.APIStatusError) as busy:
                    await client(gateway).chat.completions.create(
                        model="tiny", messages=MESSAGES, max_tokens=2
                    )
                with pytest.raises(openai.APIStatusError) as busy_stream:
                    await client(gateway).chat.completions.create(
                        model="tiny", messages=MESSAGES, max_tokens=2, stream=True
                    )
            finally:
                await response.aclose()
    for error in (busy.value, busy_stream.value):
        assert error.status_code == 503
        assert error.response.headers["retry-after"] == "1"
        assert error.code == "model_overloaded"


async def test_queued_requests_wait_their_turn(endless_dir: Path) -> None:
    async with run_gateway(config(endless_dir, max_concurrency=1, max_queue=4)) as gateway:
        provider: Any = gateway.app.gateway.connections["local"]
        results: list[str] = []

        async def ask(i: int) -> None:
            done = await client(gateway).chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=20, temperature=0
            )
            results.append(done.choices[0].message.content or "")

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(ask, i)
                while provider._waiting < 3:  # one generating, three queued
                    await trio.sleep(0.001)
    assert len(results) == 4 and len(set(results)) == 1


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        (
            {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
            "messages[0].content[0]",
        ),
    ],
)  # fmt: skip
async def test_what_a_local_model_cannot_do_is_a_clear_400(
    tiny_dir: Path, extra: dict[str, Any], param: str
) -> None:
    async with run_gateway(config(tiny_dir)) as gateway:
        with pytest.raises(openai.BadRequestError) as refused:
            await client(gateway).chat.completions.create(
                **{"model": "tiny", "messages": MESSAGES, **extra}
            )
    assert refused.value.param == param


async def test_the_model_loads_at_startup_and_a_bad_path_stops_the_start(tmp_path: Path) -> None:
    gateway = Gateway(config_from(config(tmp_path / "missing")))
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve_background)
    error = info.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, ConfigError)
    assert error.path == "connections.local"
    assert f"no model directory at '{tmp_path / 'missing'}'" in error.message
    await gateway.aclose()


@pytest.mark.parametrize(
    ("connection", "path", "words"),
    [
        ({"model": ""}, "connections.local.model", "needs model"),
        ({"device": "tpu"}, "connections.local.device", "expected auto, cpu"),
        ({"dtype": "int3"}, "connections.local.dtype", "expected one of"),
        ({"max_concurrency": 0}, "connections.local.max_concurrency", "at least 1"),
        ({"chat_mode": False}, "connections.local.chat_mode", "only chat mode"),
        ({"init_params": {"quantize_4bit": True}}, "connections.local.init_params.quantize_4bit",
         "not supported"),
    ],
)  # fmt: skip
def test_bad_local_settings_are_config_errors(
    tiny_dir: Path, connection: dict[str, Any], path: str, words: str
) -> None:
    data = config(tiny_dir)
    data["connections"]["local"].update(connection)
    with pytest.raises(ConfigError) as info:
        config_from(data)
    assert info.value.path == path
    assert words in info.value.message


def test_lm_proxy_init_params_are_read(tiny_dir: Path) -> None:
    data = config(tiny_dir)
    data["connections"]["local"].pop("device")
    data["connections"]["local"]["init_params"] = {
        "device": "cpu", "torch_dtype": "float32", "attn_implementation": "eager",
    }  # fmt: skip
    conn = config_from(data).connections["local"]
    assert (conn.device, conn.dtype) == ("cpu", "float32")
    assert conn.model_kwargs == {"attn_implementation": "eager"}


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("torch", "transformers") else real(name, *a),
    )


def test_without_torch_a_local_connection_says_what_to_install(
    tiny_dir: Path, no_torch: None
) -> None:
    with pytest.raises(ConfigError) as info:
        Gateway(config_from(config(tiny_dir)))
    assert "pip install 'lm-gateway[local]'" in info.value.message


def test_the_gateway_never_imports_torch_without_a_local_connection() -> None:
    """Startup stays fast (and works without torch) unless a local model is configured."""
    import subprocess
    import sys

    code = (
        "import sys, lm_gateway\n"
        "from lm_gateway.providers import local\n"  # the module itself imports lazily
        "app = lm_gateway.create_app(None)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(\n"
        "    m for m in sys.modules if m.startswith(('torch', 'transformers')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


async def test_anthropic_clients_reach_a_local_model(tiny_dir: Path) -> None:
    """Claude Code's protocol on a local model: translated both ways, streamed exactly."""
    import anthropic

    async with run_gateway(config(tiny_dir)) as gateway:
        llm = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=KEY, max_retries=0)
        # Greedy, for identical answers (this SDK version no longer has a temperature argument).
        greedy: Any = {"temperature": 0}
        plain = await llm.messages.create(
            model="tiny", max_tokens=6, messages=[{"role": "user", "content": "hi"}],
            extra_body=greedy,
        )  # fmt: skip
        async with llm.messages.stream(
            model="tiny", max_tokens=6, messages=[{"role": "user", "content": "hi"}],
            extra_body=greedy,
        ) as stream:  # fmt: skip
            final = await stream.get_final_message()
    assert plain.content[0].type == "text"
    assert final.content[0].text == plain.content[0].text  # type: ignore[union-attr]
    assert plain.stop_reason in ("max_tokens", "end_turn")
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens
