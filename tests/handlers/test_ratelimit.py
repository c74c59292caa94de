"""``RateLimiter`` with in-memory storage, driven directly with ``RequestContext`` objects.

Time is trio's, under pytest-trio's ``autojump_clock``: ``at(t)`` moves to exactly ``t`` seconds
after the test started, so windows, ``Retry-After`` and sliding are checked to the exact value.
The semantics checked are the module docstring's (and lm-proxy's, kept): a request is admitted
while fewer than ``max_requests`` admitted requests fall in the last ``window_seconds``; refused
requests are not counted; a request admitted here but refused later still counts here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_gateway.context import RequestContext
from lm_gateway.errors import GatewayError, RateLimited
from lm_gateway.handlers import RateLimiter
from lm_gateway.handlers.ratelimit import SCOPES, MemoryStorage, estimate_tokens

_ids = itertools.count(1)

#: The context fields each scope reads.
SCOPE_FIELD = {
    "api_key": "api_key_id",
    "ip": "remote_addr",
    "connection": "connection",
    "group": "group",
    "model": "model",
}
BASE = {
    "api_key_id": "kid-a",
    "remote_addr": "192.0.2.1",
    "connection": "c1",
    "group": "g1",
    "model": "m1",
}
OTHER = {
    "api_key_id": "kid-b",
    "remote_addr": "192.0.2.2",
    "connection": "c2",
    "group": "g2",
    "model": "m2",
}


def make_ctx(**fields: Any) -> RequestContext:
    """A context as the service has it when before-handlers run (authenticated, routed)."""
    values: dict[str, Any] = {**BASE, "request": None}
    values.update(fields)
    request = values.pop("request")
    if request is None:
        request = {"model": values["model"], "messages": [{"role": "user", "content": "hi"}]}
    ctx = RequestContext(
        id=f"req-{next(_ids)}",
        endpoint="chat.completions",
        method="POST",
        path="/v1/chat/completions",
        remote_addr=values.pop("remote_addr"),
    )
    ctx.request = request
    for name, value in values.items():
        setattr(ctx, name, value)
    return ctx


async def admitted(limiter: RateLimiter, ctx: RequestContext | None = None) -> bool:
    """Run the limiter; True if it admitted the request, False if it refused it (429)."""
    try:
        await limiter(ctx if ctx is not None else make_ctx())
    except RateLimited:
        return False
    return True


async def refusal(limiter: RateLimiter, ctx: RequestContext | None = None) -> RateLimited:
    """Run the limiter, expecting a refusal; returns it."""
    with pytest.raises(RateLimited) as info:
        await limiter(ctx if ctx is not None else make_ctx())
    return info.value


def timeline() -> Callable[[float], Any]:
    """``await at(t)``: sleep until exactly ``t`` seconds after this call (autojump clock)."""
    start = trio.current_time()

    async def at(t: float) -> None:
        await trio.sleep_until(start + t)

    return at


def finished(ctx: RequestContext, usage: dict[str, Any] | None, *, outcome: str = "ok") -> None:
    ctx.usage = usage
    ctx.finish(outcome, {"ok": 200, "cancelled": 499, "rejected": 429, "error": 502}[outcome])  # type: ignore[arg-type]


async def tokens_counted(limiter: RateLimiter, ctx: RequestContext) -> float:
    used, _ = await limiter.storage.tokens(limiter.key(ctx), limiter.window_seconds)
    return used


# -- admission at the limit, refusal, headers ---------------------------------------------------


async def test_admits_up_to_the_limit_with_headers(autojump_clock: Any) -> None:
    limiter = RateLimiter(max_requests=3, window_seconds=10)
    for remaining in ("2", "1", "0"):
        ctx = make_ctx()
        await limiter(ctx)
        assert ctx.response_headers == {
            "x-ratelimit-limit-requests": "3",
            "x-ratelimit-remaining-requests": remaining,
            "x-ratelimit-reset-requests": "10s",
        }
    assert "x-ratelimit-limit-tokens" not in ctx.response_headers


async def test_refusal_is_a_429_with_retry_after_and_headers(autojump_clock: Any) -> None:
    limiter = RateLimiter(max_requests=2, window_seconds=60)
    assert await admitted(limiter)
    assert await admitted(limiter)
    ctx = make_ctx()
    error = await refusal(limiter, ctx)
    assert isinstance(error, GatewayError)
    assert error.http_status == 429
    assert error.type == "rate_limit_error"
    assert error.code == "rate_limit_exceeded"
    assert "Rate limit exceeded" in error.message
    assert "2 requests per 60s" in error.message
    assert error.headers == {
        "retry-after": "60",
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
    }
    # The refused request's context carries the same headers (they go on the 429 answer).
    assert ctx.response_headers["x-ratelimit-remaining-requests"] == "0"
    body = error.to_body()["error"]
    assert body["type"] == "rate_limit_error"
    assert body["code"] == "rate_limit_exceeded"


async def test_retry_after_is_the_wait_for_the_oldest_counted_request(
    autojump_clock: Any,
) -> None:
    limiter = RateLimiter(max_requests=2, window_seconds=10)
    at = timeline()
    assert await admitted(limiter)  # t = 0
    await at(4)
    assert await admitted(limiter)  # t = 4
    await at(7.5)
    error = await refusal(limiter)
    assert error.headers["retry-after"] == "3"  # the t=0 request leaves at 10: 2.5 s, rounded up
    assert error.headers["x-ratelimit-reset-requests"] == "3s"
    await at(9.75)
    error = await refusal(limiter)
    assert error.headers["retry-after"] == "1"  # 0.25 s, but never less than 1
    assert error.headers["x-ratelimit-reset-requests"] == "250ms"
    await at(10)  # the t=0 request has left the window: exactly when Retry-After said
    assert await admitted(limiter)
    error = await refusal(limiter)
    assert error.headers["retry-after"] == "4"  # now the oldest is the t=4 one


async def test_retry_after_is_at_least_one_second(autojump_clock: Any) -> None:
    limiter = RateLimiter(max_requests=1, window_seconds=0.25)
    assert await admitted(limiter)
    error = await refusal(limiter)
    assert error.headers["retry-after"] == "1"
    assert error.headers["x-ratelimit-reset-requests"] == "250ms"


async def test_the_window_slides(autojump_clock: Any) -> None:
    limiter = RateLimiter(max_requests=2, window_seconds=10)
    at = timeline()
    results = []
    for t in (0, 5, 9, 10, 11, 14.999, 15, 16, 20, 20, 25):
        await at(t)
        results.append((t, await admitted(limiter)))
    assert results == [
        (0, True),
        (5, True),
        (9, False),  # 0 and 5 are in (-1, 9]
        (10, True),  # 0 left at 10; 5 and 10 are counted
        (11, False),
        (14.999, False),
        (15, True),  # 5 left at 15
        (16, False),
        (20, True),  # 10 left at 20
        (20, False),
        (25, True),  # 15 left at 25
    ]


async def test_rejected_requests_do_not_count(autojump_clock: Any) -> None:
    """A client hammering a full limiter does not extend its own ban."""
    limiter = RateLimiter(max_requests=1, window_seconds=10)
    at = timeline()
    assert await admitted(limiter)
    for second in range(1, 10):
        await at(second)
        error = await refusal(limiter)
        assert error.headers["retry-after"] == str(10 - second)
    await at(10)
    assert await admitted(limiter)


async def test_admitted_here_but_refused_by_a_later_limiter_still_counts(
    autojump_clock: Any,
) -> None:
    """lm-proxy's semantics: limiter #1 cannot know what comes after it."""
    per_key = RateLimiter(max_requests=2, window_seconds=10, per="api_key")
    per_connection = RateLimiter(max_requests=1, window_seconds=10, per="connection")

    async def chain(ctx: RequestContext) -> str:
        for index, limiter in enumerate((per_key, per_connection)):
            if not await admitted(limiter, ctx):
                return f"refused by #{index + 1}"
        return "ok"

    assert await chain(make_ctx()) == "ok"
    assert await chain(make_ctx()) == "refused by #2"  # #1 admitted and counted it
    assert await chain(make_ctx()) == "refused by #1"  # #1's quota is used up
    # The same key on another connection: #1 still refuses (its count is per key).
    assert await chain(make_ctx(connection="c2")) == "refused by #1"
    # Another key: #1 admits; the connection is full.
    assert await chain(make_ctx(api_key_id="kid-b")) == "refused by #2"


async def test_concurrent_requests_admit_exactly_the_limit(autojump_clock: Any) -> None:
    limiter = RateLimiter(max_requests=7, window_seconds=60, per="global")
    results: list[bool] = []

    async def one() -> None:
        results.append(await admitted(limiter))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)
    assert results.count(True) == 7
    assert results.count(False) == 43


# -- what is counted together (per) -------------------------------------------------------------


@pytest.mark.parametrize("scope", SCOPES)
async def test_each_scope_keys_by_its_field_only(autojump_clock: Any, scope: str) -> None:
    limiter = RateLimiter(max_requests=1, window_seconds=60, per=scope)
    assert await admitted(limiter, make_ctx())
    field = SCOPE_FIELD.get(scope)
    # Everything else differs, the scope's field is the same: same bucket, refused.
    same = {name: value for name, value in OTHER.items() if name != field}
    assert not await admitted(limiter, make_ctx(**same))
    if field is None:  # global: one bucket for everything
        assert not await admitted(limiter, make_ctx(**OTHER))
        assert limiter.key(make_ctx()) == limiter.key(make_ctx(**OTHER))
    else:
        # Only the scope's field differs: another bucket, admitted.
        assert await admitted(limiter, make_ctx(**{field: OTHER[field]}))
        assert limiter.key(make_ctx()) != limiter.key(make_ctx(**{field: OTHER[field]}))


async def test_combined_scope_keys_by_every_field(autojump_clock: Any) -> None:
    limiter = RateLimiter(max_requests=1, window_seconds=60, per=["api_key", "model"])
    assert limiter.key(make_ctx()) == "kid-a|m1"
    assert await admitted(limiter, make_ctx())
    # Same key and model, everything else different: the same bucket.
    others = {k: v for k, v in OTHER.items() if k not in ("api_key_id", "model")}
    assert not await admitted(limiter, make_ctx(**others))
    assert await admitted(limiter, make_ctx(model="m2"))  # same key, another model
    assert await admitted(limiter, make_ctx(api_key_id="kid-b"))  # same model, another key
    assert not await admitted(limiter, make_ctx(api_key_id="kid-b"))
    assert not await admitted(limiter, make_ctx(model="m2"))


@pytest.mark.parametrize(("scope", "field"), [("api_key", "api_key_id"), ("ip", "remote_addr")])
async def test_missing_key_or_address_counts_as_anon(
    autojump_clock: Any, scope: str, field: str
) -> None:
    limiter = RateLimiter(max_requests=1, window_seconds=60, per=scope)
    assert limiter.key(make_ctx(**{field: None})) == "anon"
    assert await admitted(limiter, make_ctx(**{field: None}))
    # Every caller without a key (address) shares that one bucket...
    assert not await admitted(
        limiter, make_ctx(**{field: None}, **{k: v for k, v in OTHER.items() if k != field})
    )
    # ...which is not any identified caller's.
    assert await admitted(limiter, make_ctx())


async def test_per_accepts_a_tuple_and_a_one_element_list(autojump_clock: Any) -> None:
    assert RateLimiter(per=("model", "group")).key(make_ctx()) == "m1|g1"
    assert RateLimiter(per=["ip"]).key(make_ctx()) == RateLimiter(per="ip").key(make_ctx())


# -- bad parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per": "user"}, r"per: unknown scope 'user'.*api_key"),
        ({"per": ["api_key", "ip ", "model"]}, r"per: unknown scope 'ip '"),
        ({"per": []}, r"per: give at least one scope"),
        ({"max_requests": 0}, r"max_requests: must be a whole number of at least 1, got 0"),
        ({"max_requests": -5}, r"max_requests: .* got -5"),
        ({"max_requests": 2.5}, r"max_requests: .* got 2.5"),
        ({"max_requests": "10"}, r"max_requests: .* got '10'"),
        ({"max_requests": True}, r"max_requests: .* got True"),
        ({"max_requests": None}, r"set max_requests, max_tokens_per_window, or both"),
        ({"max_tokens_per_window": 0}, r"max_tokens_per_window: .* got 0"),
        ({"max_tokens_per_window": 1.5}, r"max_tokens_per_window: .* got 1.5"),
        ({"window_seconds": 0}, r"window_seconds: must be a positive number, got 0"),
        ({"window_seconds": -1.5}, r"window_seconds: .* got -1.5"),
        ({"window_seconds": "60"}, r"window_seconds: .* got '60'"),
        ({"window_seconds": False}, r"window_seconds: .* got False"),
        ({"window_seconds": math.nan}, r"window_seconds: .* got nan"),
        ({"storage": "disk"}, r"storage: 'memory' or 'redis', not 'disk'"),
        ({"storage": "redis"}, r"storage = 'redis' needs redis_url"),
        ({"on_storage_error": "maybe"}, r"on_storage_error: 'allow' or 'deny', not 'maybe'"),
    ],
)
def test_bad_parameters_raise_value_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RateLimiter(**kwargs)


def test_unknown_parameter_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="max_request"):
        RateLimiter(max_request=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        RateLimiter(5, 60, "api_key", None)  # type: ignore[call-arg]


@pytest.mark.parametrize("per", [5, None])
def test_per_of_the_wrong_type_is_refused_naming_per(per: Any) -> None:
    """``per`` must be a scope name or a list of them; anything else is refused at
    construction with a message naming ``per`` (not "'int' object is not iterable")."""
    with pytest.raises((TypeError, ValueError), match=r"\bper\b"):
        RateLimiter(per=per)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_buckets": "many"}, "max_buckets"),
        ({"storage_timeout_seconds": -1}, "storage_timeout_seconds"),
        ({"storage_timeout_seconds": "1"}, "storage_timeout_seconds"),
    ],
)
def test_bad_numbers_are_refused_at_construction_not_at_request_time(
    kwargs: dict[str, Any], name: str
) -> None:
    """A bad ``max_buckets`` or ``storage_timeout_seconds`` would otherwise only fail inside a
    request (a 500 for every client), or never be noticed."""
    with pytest.raises((TypeError, ValueError), match=name):
        RateLimiter(**kwargs)


# -- memory bounds ------------------------------------------------------------------------------


async def test_max_buckets_drops_keys_with_nothing_left_in_their_window(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage(max_buckets=2)
    at = timeline()
    for key in ("a", "b", "c"):
        assert (await storage.hit(key, 1, 10)).admitted
    # Eviction only drops stale keys: at t=0 all three are live and kept.
    assert set(storage._requests) == {"a", "b", "c"}
    await at(10)  # every key's only request has left its window
    assert (await storage.hit("d", 1, 10)).admitted
    assert set(storage._requests) == {"d"}


async def test_eviction_never_forgets_a_live_count(autojump_clock: Any) -> None:
    """Flooding with new keys (other IPs, say) must not reset a full bucket."""
    limiter = RateLimiter(max_requests=1, window_seconds=10, per="ip", max_buckets=3)
    assert isinstance(limiter.storage, MemoryStorage)
    assert limiter.storage.max_buckets == 3
    at = timeline()
    assert await admitted(limiter, make_ctx(remote_addr="10.0.0.1"))
    await at(1)
    for i in range(2, 40):
        assert await admitted(limiter, make_ctx(remote_addr=f"10.0.0.{i}"))
    await at(2)
    assert not await admitted(limiter, make_ctx(remote_addr="10.0.0.1"))
    await at(12)  # everything is stale now: the next new key drops it all
    assert await admitted(limiter, make_ctx(remote_addr="10.0.1.1"))
    assert len(limiter.storage._requests) == 1


async def test_token_buckets_are_bounded_too(autojump_clock: Any) -> None:
    storage = MemoryStorage(max_buckets=2)
    at = timeline()
    for key in ("a", "b", "c"):
        await storage.add_tokens(key, 5, 10)
    await at(10)
    await storage.add_tokens("d", 5, 10)
    assert set(storage._tokens) == {"d"}
    assert await storage.tokens("d", 10) == (5, 10)
    assert await storage.tokens("a", 10) == (0, 0.0)


# -- token limits -------------------------------------------------------------------------------


async def test_token_limit_refuses_once_settled_tokens_reach_it(autojump_clock: Any) -> None:
    limiter = RateLimiter(max_requests=None, max_tokens_per_window=100, window_seconds=60)
    at = timeline()
    first = make_ctx()
    await limiter(first)
    assert first.response_headers == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "0ms",
    }
    # Admission does not count tokens; settling the finished request does.
    second = make_ctx()
    await limiter(second)
    await at(5)
    finished(first, {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60})
    await limiter.settle(first)
    third = make_ctx()
    await limiter(third)  # 60 < 100
    assert third.response_headers["x-ratelimit-remaining-tokens"] == "40"
    assert third.response_headers["x-ratelimit-reset-tokens"] == "1m0s"
    await at(6)
    finished(second, {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50})
    await limiter.settle(second)  # 110: the last admitted request may overshoot
    await at(7)
    error = await refusal(limiter)
    assert "100 tokens per 60s" in error.message
    assert error.headers["x-ratelimit-remaining-tokens"] == "0"
    assert error.headers["retry-after"] == "58"  # the t=5 settlement leaves at 65
    assert "x-ratelimit-limit-requests" not in error.headers
    await at(65)  # 60 tokens left the window: 50 < 100
    ctx = make_ctx()
    await limiter(ctx)
    assert ctx.response_headers["x-ratelimit-remaining-tokens"] == "50"


async def test_settle_counts_total_tokens_or_prompt_plus_completion(
    autojump_clock: Any,
) -> None:
    limiter = RateLimiter(max_requests=None, max_tokens_per_window=1000, window_seconds=60)
    with_total = make_ctx()
    await limiter(with_total)
    finished(with_total, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 30})
    await limiter.settle(with_total)
    assert await tokens_counted(limiter, with_total) == 30
    without_total = make_ctx()
    await limiter(without_total)
    finished(without_total, {"prompt_tokens": 7, "completion_tokens": 5})
    await limiter.settle(without_total)
    assert await tokens_counted(limiter, without_total) == 42


async def test_cancelled_stream_without_usage_is_settled_with_an_estimate(
    autojump_clock: Any,
) -> None:
    limiter = RateLimiter(max_requests=None, max_tokens_per_window=10_000, window_seconds=60)
    messages = [{"role": "user", "content": "word " * 100}]
    ctx = make_ctx(request={"model": "m1", "messages": messages, "stream": True})
    await limiter(ctx)
    ctx.internal["upstream_started"] = True  # the service marks the upstream call
    ctx.stream = True
    ctx.chunks = 7  # streamed before the client left; no usage came
    finished(ctx, None, outcome="cancelled")
    # The documented estimate: 4 bytes of the prompt per token, one token per streamed chunk.
    expected = len(orjson.dumps(messages)) // 4 + 7
    assert estimate_tokens(ctx) == expected
    await limiter.settle(ctx)
    assert await tokens_counted(limiter, ctx) == expected


async def test_cancelled_stream_with_partial_usage_is_settled_with_it(
    autojump_clock: Any,
) -> None:
    limiter = RateLimiter(max_requests=None, max_tokens_per_window=10_000, window_seconds=60)
    ctx = make_ctx()
    await limiter(ctx)
    ctx.stream = True
    ctx.chunks = 50
    finished(
        ctx, {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}, outcome="cancelled"
    )
    await limiter.settle(ctx)
    assert await tokens_counted(limiter, ctx) == 15


async def test_settle_counts_only_requests_this_limiter_admitted(autojump_clock: Any) -> None:
    limiter = RateLimiter(max_requests=1, max_tokens_per_window=1000, window_seconds=60)
    other = RateLimiter(
        max_requests=None, max_tokens_per_window=1000, window_seconds=60, per="global"
    )
    usage = {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    admitted_ctx = make_ctx()
    await limiter(admitted_ctx)
    refused_ctx = make_ctx()
    await refusal(limiter, refused_ctx)  # over max_requests
    stranger = make_ctx()  # never went through this limiter
    for ctx in (admitted_ctx, refused_ctx, stranger):
        finished(ctx, usage)
        await limiter.settle(ctx)
        await other.settle(ctx)  # `other` admitted none of them
    assert await tokens_counted(limiter, admitted_ctx) == 10
    assert await tokens_counted(other, admitted_ctx) == 0
    # A refused request's context carries no settlement entry at all.
    assert "rate_limit_tokens" not in refused_ctx.internal


async def test_request_refused_by_a_later_handler_is_not_charged_tokens(
    autojump_clock: Any,
) -> None:
    """A request admitted here but refused by the next handler never reached the upstream: it
    used no tokens (only streams cut before their usage are estimated). It still counts as a
    *request* here (lm-proxy's semantics); charging it an estimate of its prompt as well would
    let refusals elsewhere eat the client's token quota."""
    tokens = RateLimiter(max_requests=None, max_tokens_per_window=1000, window_seconds=60)
    requests = RateLimiter(max_requests=1, window_seconds=60)
    first = make_ctx()
    await tokens(first)
    await requests(first)
    finished(first, {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3})
    await tokens.settle(first)
    second = make_ctx(request={"model": "m1", "messages": [{"role": "user", "content": "x" * 400}]})
    await tokens(second)
    error = await refusal(requests, second)
    second.error_type = error.type
    finished(second, None, outcome="rejected")  # as the service records it: no usage, no chunks
    await tokens.settle(second)
    assert await tokens_counted(tokens, second) == 3


async def test_a_token_refusal_does_not_count_as_a_request(autojump_clock: Any) -> None:
    limiter = RateLimiter(max_requests=2, max_tokens_per_window=10, window_seconds=10)
    at = timeline()
    first = make_ctx()
    await limiter(first)  # t=0: one request counted
    await at(5)
    finished(first, {"total_tokens": 10})
    await limiter.settle(first)  # t=5: 10 tokens
    await at(6)
    error = await refusal(limiter)  # by tokens
    assert "10 tokens per 10s" in error.message
    assert error.headers["retry-after"] == "9"
    assert "x-ratelimit-limit-requests" not in error.headers
    await at(15)  # the t=5 tokens left; had the t=6 refusal counted, it would still be here
    ctx = make_ctx()
    await limiter(ctx)
    assert ctx.response_headers["x-ratelimit-remaining-requests"] == "1"
    assert ctx.response_headers["x-ratelimit-remaining-tokens"] == "10"


async def test_two_limiters_keep_separate_token_counts(autojump_clock: Any) -> None:
    per_key = RateLimiter(max_requests=None, max_tokens_per_window=100, window_seconds=60)
    per_model = RateLimiter(
        max_requests=None, max_tokens_per_window=100, window_seconds=60, per="model"
    )
    ctx = make_ctx()
    await per_key(ctx)
    await per_model(ctx)
    finished(ctx, {"total_tokens": 25})
    await per_key.settle(ctx)
    await per_model.settle(ctx)
    assert await tokens_counted(per_key, ctx) == 25
    assert await tokens_counted(per_model, ctx) == 25
    # Another key, same model: the per-model limiter has seen those tokens, per-key has not.
    other = make_ctx(api_key_id="kid-b")
    assert await tokens_counted(per_key, other) == 0
    assert await tokens_counted(per_model, other) == 25


def test_estimate_tokens_prefers_reported_usage() -> None:
    ctx = make_ctx()
    ctx.chunks = 99
    ctx.usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    assert estimate_tokens(ctx) == 2
    ctx.usage = {"prompt_tokens": 4, "completion_tokens": None}
    assert estimate_tokens(ctx) == 4
    ctx.usage = None
    ctx.request = None
    assert estimate_tokens(ctx) == 0  # never reached the upstream: nothing spent
    ctx.internal["upstream_started"] = True
    assert estimate_tokens(ctx) == len(b"[]") // 4 + 99


# -- exactness, as a property -------------------------------------------------------------------

_TIMES = st.lists(
    st.one_of(
        st.integers(min_value=0, max_value=40).map(float),  # exact window boundaries
        st.floats(min_value=0, max_value=40, allow_nan=False, allow_infinity=False),
    ),
    max_size=60,
).map(sorted)


def _run_arrivals(
    times: Sequence[float], max_requests: int, window: float
) -> list[tuple[float, bool, str | None]]:
    """Send one request at each time (autojump clock); returns (time, admitted, retry-after)."""
    out: list[tuple[float, bool, str | None]] = []

    async def main() -> None:
        limiter = RateLimiter(max_requests=max_requests, window_seconds=window, per="global")
        start = trio.current_time()
        for t in times:
            await trio.sleep_until(start + t)
            now = trio.current_time()
            try:
                await limiter(make_ctx())
            except RateLimited as error:
                out.append((now, False, error.headers["retry-after"]))
            else:
                out.append((now, True, None))
            assert trio.current_time() == now  # the decision took no (virtual) time

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return out


@settings(max_examples=300, deadline=None)
@given(
    times=_TIMES,
    max_requests=st.integers(min_value=1, max_value=5),
    window=st.one_of(
        st.sampled_from([1.0, 2.5, 3.0, 10.0]),
        st.floats(min_value=0.01, max_value=30, allow_nan=False, allow_infinity=False),
    ),
)
def test_sliding_window_is_exact(times: list[float], max_requests: int, window: float) -> None:
    """Never more than ``max_requests`` admitted in any window, and never a refusal while fewer
    were admitted in the preceding window; Retry-After names when the oldest counted leaves."""
    decisions = _run_arrivals(times, max_requests, window)
    admitted_at: list[float] = []
    for now, was_admitted, retry_after in decisions:
        counted = [a for a in admitted_at if a > now - window]
        assert was_admitted == (len(counted) < max_requests), (now, admitted_at)
        if was_admitted:
            admitted_at.append(now)
        else:
            assert retry_after == str(max(1, math.ceil(min(counted) + window - now)))
    # Safety, checked on its own: every window (t - window, t] holds at most max_requests.
    for t in admitted_at:
        assert sum(1 for a in admitted_at if t - window < a <= t) <= max_requests


async def test_the_most_restrictive_limiter_reports_the_headers(autojump_clock: Any) -> None:
    tight = RateLimiter(max_requests=2, window_seconds=60, per="api_key")
    loose = RateLimiter(max_requests=100, window_seconds=60, per="global")
    ctx = make_ctx()
    await tight(ctx)
    await loose(ctx)  # runs after: must not overwrite the tighter numbers
    assert ctx.response_headers["x-ratelimit-limit-requests"] == "2"
    assert ctx.response_headers["x-ratelimit-remaining-requests"] == "1"
    other = make_ctx()
    await loose(other)
    await tight(other)  # the tighter one comes second: it wins
    assert other.response_headers["x-ratelimit-remaining-requests"] == "0"
