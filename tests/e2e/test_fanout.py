"""``n > 1`` on connections that produce one choice per call: n concurrent calls, merged."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import orjson
import trio

from lm_gateway.errors import UpstreamError
from tests.conftest import run_gateway

KEY = "k"
GUARD = 10


def config_with(fn: Any) -> dict[str, Any]:
    return {
        "connections": {"fn": fn},
        "routing": {"*": "fn.*"},
        "groups": {"g": {"api_keys": [KEY]}},
    }


class Rendezvous:
    """Lets each of n calls proceed only once all n have started: proves they ran at once."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrived = 0
        self.all_here = trio.Event()

    async def arrive(self) -> int:
        self.arrived += 1
        number = self.arrived
        if self.arrived == self.n:
            self.all_here.set()
        await self.all_here.wait()
        return number


async def test_n_calls_run_concurrently_and_merge_with_summed_usage() -> None:
    meeting = Rendezvous(3)

    async def model(messages: Any, **params: Any) -> dict[str, Any]:
        assert "n" not in params  # each call asks for one choice
        number = await meeting.arrive()
        return {
            "id": f"call-{number}",
            "object": "chat.completion",
            "created": 1,
            "model": params["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"answer {number}"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": number, "total_tokens": 5 + number,
                      "completion_tokens_details": {"reasoning_tokens": 1}},
        }

    async with run_gateway(config_with(model)) as gateway, openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key=KEY, max_retries=0
    ) as sdk:
        with trio.fail_after(GUARD):
            completion = await sdk.chat.completions.create(
                model="m", n=3, messages=[{"role": "user", "content": "x"}]
            )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert sorted(c.message.content or "" for c in completion.choices) == [
        "answer 1", "answer 2", "answer 3"
    ]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 15
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == 21
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 3


async def test_streaming_n_interleaves_choices_under_one_id() -> None:
    meeting = Rendezvous(2)

    async def model(messages: Any, **params: Any) -> str:
        number = await meeting.arrive()
        for word in (f"from-{number} ", "done"):
            await params["callback"](word)
        return ""

    async with run_gateway(config_with(model)) as gateway, openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key=KEY, max_retries=0
    ) as sdk:
        with trio.fail_after(GUARD):
            stream = await sdk.chat.completions.create(
                model="m", n=2, stream=True, messages=[{"role": "user", "content": "x"}]
            )
            chunks = [chunk async for chunk in stream]
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert sorted(texts.values()) == ["from-1 done", "from-2 done"]
    assert finishes == {0: "stop", 1: "stop"}
    assert len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage


async def test_one_failure_cancels_the_other_calls() -> None:
    cancelled: list[int] = []
    started = Rendezvous(3)

    async def model(messages: Any, **params: Any) -> str:
        started.arrived += 1
        number = started.arrived  # taken before any checkpoint, so a cancel can't lose it
        try:
            if number == started.n:
                started.all_here.set()
            await started.all_here.wait()
            if number == 2:
                raise UpstreamError("slow down", status=429, headers={"retry-after": "4"})
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(number)
            raise
        return "never"

    async with run_gateway(config_with(model)) as gateway, httpx2.AsyncClient() as http:
        for stream in (False, True):
            cancelled.clear()
            started.__init__(3)  # type: ignore[misc]
            with trio.fail_after(GUARD):
                response = await http.post(
                    f"{gateway.base_url}/chat/completions",
                    headers={"authorization": f"Bearer {KEY}"},
                    json={"model": "m", "n": 3, "stream": stream,
                          "messages": [{"role": "user", "content": "x"}]},
                )
            # Nothing was streamed before the failure, so even the stream gets a real 429.
            assert response.status_code == 429
            assert response.headers["retry-after"] == "4"
            assert sorted(cancelled) == [1, 3]


async def test_client_leaving_cancels_every_fanned_out_call() -> None:
    cancelled = trio.Event()
    count = {"cancelled": 0, "started": 0}
    all_started = trio.Event()

    async def model(messages: Any, **params: Any) -> str:
        await params["callback"]("first ")
        count["started"] += 1
        if count["started"] == 2:
            all_started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            count["cancelled"] += 1
            if count["cancelled"] == 2:
                cancelled.set()
            raise
        return ""

    async with run_gateway(config_with(model)) as gateway:
        with trio.fail_after(GUARD):
            async with httpx2.AsyncClient() as http, http.stream(
                "POST",
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer {KEY}"},
                json={"model": "m", "n": 2, "stream": True,
                      "messages": [{"role": "user", "content": "x"}]},
            ) as response:
                async for _ in response.aiter_bytes():
                    break
                await all_started.wait()
            await cancelled.wait()
            record = await gateway.records.wait_for(lambda r: r.outcome == "cancelled")
    assert record.stream


async def test_failure_after_the_first_chunk_ends_the_merged_stream_with_an_error() -> None:
    cancelled: list[int] = []
    started = Rendezvous(2)

    async def model(messages: Any, **params: Any) -> str:
        number = await started.arrive()
        await params["callback"](f"hello-{number} ")
        if number == 2:
            await trio.sleep(0.05)  # let the first chunks go out before failing
            raise UpstreamError("upstream broke", status=503)
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(number)
            raise
        return "never"

    async with run_gateway(config_with(model)) as gateway, httpx2.AsyncClient() as http:
        with trio.fail_after(GUARD):
            response = await http.post(
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer {KEY}"},
                json={"model": "m", "n": 2, "stream": True,
                      "messages": [{"role": "user", "content": "x"}]},
            )
    assert response.status_code == 200
    assert b"hello-1" in response.content
    last = orjson.loads(response.content.strip().split(b"\n\n")[-1][6:])
    assert last["error"]["code"] == "upstream_error"
    assert b"[DONE]" not in response.content
    assert cancelled == [1]
