"""Strategies and guards without HTTP: fake connections, trio's autojump clock for time."""

from __future__ import annotations

import collections
import random
from typing import Any

import pytest
import trio
import trio.testing

from lm_gateway.config.model import Resilience, StrategyConnection, Target
from lm_gateway.errors import InvalidRequest, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from lm_gateway.providers.base import ChatCall, ChatResult
from lm_gateway.strategies import ConnectionCoolingDown, Cooldown, Guard, StrategyProvider
from lm_gateway.strategies.policy import (
    backoff_seconds,
    failure_reason,
    is_context_length,
    retry_after_seconds,
)
from lm_gateway.strategies.strategy import has_content


class Scripted:
    """A connection answering from a script: each call pops an outcome (an exception to raise,
    a number of seconds to sleep before answering, or "ok")."""

    native_n = True

    def __init__(self, name: str, *script: Any) -> None:
        self.name = name
        self.script = list(script)
        self.calls: list[tuple[float, dict[str, Any]]] = []
        self.cancelled = 0

    async def chat(self, call: ChatCall) -> ChatResult:
        self.calls.append((trio.current_time(), dict(call.body)))
        step = self.script.pop(0) if self.script else "ok"
        if isinstance(step, BaseException):
            raise step
        try:
            if isinstance(step, int | float):
                await trio.sleep(step)
            else:
                await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        return ChatResult(body={"choices": [], "answered_by": self.name})

    async def open_chat_stream(self, call: ChatCall) -> Any:
        raise NotImplementedError

    async def list_models(self) -> None:
        return None

    async def aclose(self) -> None:
        pass


def call(nursery: trio.Nursery, connections: dict[str, Any], deadline: float = 1e9) -> ChatCall:
    return ChatCall(
        body={"model": "m", "messages": []}, client_model="m", stream=False, deadline=deadline,
        request_id="r", nursery=nursery, connections=connections,
    )  # fmt: skip


def unavailable(status: int = 503, **headers: str) -> UpstreamError:
    return UpstreamError("down", status=status, headers=headers)


# -- policy ----------------------------------------------------------------------------------


def test_failure_reasons() -> None:
    assert failure_reason(UpstreamTimeout("t")) == "timeout"
    assert failure_reason(UpstreamUnreachable("u")) == "unreachable"
    assert failure_reason(unavailable(529)) == "http_529"
    assert failure_reason(unavailable(429)) == "http_429"
    assert failure_reason(unavailable(400)) is None
    assert failure_reason(unavailable(401)) is None
    assert failure_reason(InvalidRequest("bad")) is None
    assert failure_reason(unavailable(418), statuses={418}) == "http_418"


def test_context_length_errors_are_recognised() -> None:
    assert is_context_length(UpstreamError("x", status=400, code="context_length_exceeded"))
    assert is_context_length(UpstreamError("prompt is too long: 210000 tokens", status=400))
    assert not is_context_length(UpstreamError("bad temperature", status=400))
    assert not is_context_length(UpstreamError("context length", status=500))


def test_retry_after_and_backoff() -> None:
    assert retry_after_seconds(unavailable(429, **{"retry-after": "2.5"})) == 2.5
    assert retry_after_seconds(unavailable(429, **{"retry-after": "Wed, 21 Oct 2015"})) is None
    rng = random.Random(1)
    waits = [backoff_seconds(k, 0.5, 4.0, rng) for k in range(8) for _ in range(50)]
    assert all(0 <= w <= 4.0 for w in waits)
    assert max(backoff_seconds(0, 0.5, 4.0, rng) for _ in range(100)) <= 0.5


def test_has_content() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    assert not has_content(chunk({"role": "assistant", "content": ""}))
    assert not has_content(chunk({}))
    assert not has_content({"choices": [], "usage": {"prompt_tokens": 1}})
    assert has_content(chunk({"content": "x"}))
    assert has_content(chunk({"tool_calls": [{"index": 0, "id": "c"}]}))
    assert has_content(chunk({"reasoning_content": "hmm"}))
    assert has_content(chunk({}, "stop"))


# -- cooldown --------------------------------------------------------------------------------


async def test_cooldown_opens_after_consecutive_failures_and_probes_half_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cooldown = Cooldown(threshold=3, seconds=30)
    for _ in range(2):
        cooldown.failure(unavailable())
    assert cooldown.remaining() is None and cooldown.state == "closed"
    cooldown.failure(unavailable())
    assert cooldown.state == "open"
    assert cooldown.remaining() == pytest.approx(30)
    await trio.sleep(30)
    assert cooldown.state == "half_open"
    assert cooldown.remaining() is None  # this request probes
    assert cooldown.remaining() == 1.0  # others wait for the probe
    cooldown.failure(unavailable())  # the probe failed: open again, at once
    assert cooldown.state == "open"
    await trio.sleep(30)
    assert cooldown.remaining() is None
    cooldown.success()
    assert cooldown.state == "closed" and cooldown.failures == 0


async def test_a_429_cools_down_for_its_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    cooldown = Cooldown(threshold=5, seconds=30)
    cooldown.failure(unavailable(429, **{"retry-after": "7"}))
    assert cooldown.remaining() == pytest.approx(7)
    await trio.sleep(7)
    assert cooldown.remaining() is None


def test_client_errors_do_not_count_against_a_connection() -> None:
    cooldown = Cooldown(threshold=1, seconds=30)
    cooldown.failure(unavailable(400))
    cooldown.failure(InvalidRequest("bad"))
    assert cooldown.state == "closed"
    off = Cooldown(threshold=0, seconds=30)
    for _ in range(10):
        off.failure(unavailable())
    assert off.state == "closed"


# -- guard -----------------------------------------------------------------------------------


async def test_guard_retries_with_backoff_then_succeeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inner = Scripted("a", unavailable(), UpstreamTimeout("slow"), "ok")
    guarded = Guard(inner, Resilience(max_retries=2, retry_backoff_seconds=1,
                                      retry_max_backoff_seconds=8))  # fmt: skip
    async with trio.open_nursery() as nursery:
        c = call(nursery, {})
        result = await guarded.chat(c)
    assert result.body["answered_by"] == "a"
    assert [a.outcome for a in c.attempts] == ["error", "error", "ok"]
    assert [a.error for a in c.attempts[:2]] == ["http_503", "timeout"]
    gaps = [b[0] - a[0] for a, b in zip(inner.calls, inner.calls[1:], strict=False)]
    assert 0 <= gaps[0] <= 1 and 0 <= gaps[1] <= 2  # full jitter under 1 s, then 2 s


async def test_guard_does_not_retry_past_the_deadline_or_a_client_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inner = Scripted("a", unavailable(429, **{"retry-after": "20"}))
    guarded = Guard(inner, Resilience(max_retries=5))
    async with trio.open_nursery() as nursery:
        with pytest.raises(UpstreamError):
            await guarded.chat(call(nursery, {}, deadline=trio.current_time() + 10))
    assert len(inner.calls) == 1
    bad = Scripted("b", InvalidRequest("no"))
    async with trio.open_nursery() as nursery:
        with pytest.raises(InvalidRequest):
            await Guard(bad, Resilience(max_retries=5)).chat(call(nursery, {}))
    assert len(bad.calls) == 1


async def test_guard_fails_fast_while_cooling_down(autojump_clock: trio.testing.MockClock) -> None:
    inner = Scripted("a", unavailable(), unavailable())
    guarded = Guard(inner, Resilience(cooldown_after_failures=2, cooldown_seconds=10))
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            with pytest.raises(UpstreamError):
                await guarded.chat(call(nursery, {}))
        c = call(nursery, {})
        with pytest.raises(ConnectionCoolingDown) as cooling:
            await guarded.chat(c)
        assert cooling.value.headers["retry-after"] == "10"
        assert [a.outcome for a in c.attempts] == ["skipped"]
        await trio.sleep(10)
        await guarded.chat(call(nursery, {}))
    assert len(inner.calls) == 3


# -- strategies ------------------------------------------------------------------------------


def strategy(*targets: Target, **options: Any) -> StrategyProvider:
    return StrategyProvider(
        StrategyConnection(name="main", targets=targets, **options), rng=random.Random(7)
    )


def test_weighted_order_follows_the_weights() -> None:
    s = strategy(Target("a", weight=3), Target("b", weight=1), order="weighted")
    firsts = collections.Counter(s.order({})[0].connection for _ in range(4000))
    assert 0.70 < firsts["a"] / 4000 < 0.80


def test_round_robin_and_least_in_flight_orders() -> None:
    s = strategy(Target("a"), Target("b"), Target("c"), order="round_robin")
    assert [s.order({})[0].connection for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    least = strategy(Target("a"), Target("b"), order="least_in_flight")
    a, _b = least.config.targets
    least._state[id(a)].in_flight = 3
    assert [t.connection for t in least.order({})] == ["b", "a"]


def test_latency_order_prefers_the_faster_of_two() -> None:
    s = strategy(Target("fast"), Target("slow"), order="latency")
    fast, slow = s.config.targets
    s._state[id(fast)].latency = 0.1
    s._state[id(slow)].latency = 2.0
    assert all(s.order({})[0].connection == "fast" for _ in range(50))


async def test_hedging_starts_the_next_target_after_the_delay_and_cancels_the_loser(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slow, quick = Scripted("slow", 100), Scripted("quick", 1)
    s = strategy(Target("slow"), Target("quick"), hedge_after_seconds=2)
    connections = {"slow": Guard(slow), "quick": Guard(quick)}
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        c = call(nursery, connections)
        result = await s.chat(c)
    assert result.body["answered_by"] == "quick"
    assert quick.calls[0][0] - start == pytest.approx(2)  # started at the hedge delay
    assert trio.current_time() - start == pytest.approx(3)  # not waiting for the slow one
    assert slow.cancelled == 1
    assert sorted(a.outcome for a in c.attempts) == ["cancelled", "ok"]


async def test_fallback_without_hedging_is_sequential(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first, second = Scripted("a", unavailable()), Scripted("b")
    s = strategy(Target("a", model="m-a"), Target("b", params={"temperature": 0}))
    async with trio.open_nursery() as nursery:
        c = call(nursery, {"a": Guard(first), "b": Guard(second)})
        result = await s.chat(c)
    assert result.body["answered_by"] == "b"
    assert first.calls[0][1]["model"] == "m-a"
    assert second.calls[0][1]["temperature"] == 0
    assert "temperature" not in first.calls[0][1]


async def test_an_attempt_timeout_moves_on_to_the_next_target(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slow, quick = Scripted("slow", 100), Scripted("quick")
    s = strategy(Target("slow"), Target("quick"), attempt_timeout_seconds=5)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        c = call(nursery, {"slow": Guard(slow), "quick": Guard(quick)})
        result = await s.chat(c)
    assert result.body["answered_by"] == "quick"
    assert trio.current_time() - start == pytest.approx(5)
    assert slow.cancelled == 1
    assert [a.outcome for a in c.attempts] == ["cancelled", "ok"]


async def test_a_connection_failing_half_the_time_cools_down_by_ratio() -> None:
    cooldown = Cooldown(threshold=5, seconds=30, ratio=0.5, window=10)
    for _ in range(5):  # alternating: never 5 in a row
        cooldown.success()
        assert cooldown.state == "closed"
        cooldown.failure(unavailable())
    assert cooldown.state == "open"
    never = Cooldown(threshold=5, seconds=30)
    for _ in range(20):
        never.success()
        never.failure(unavailable())
    assert never.state == "closed"
