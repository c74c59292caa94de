"""``CheckAPIKeyWithRequest``: keys validated by an HTTP call (an OIDC userinfo endpoint).

Everything goes over real loopback HTTP: the fake OpenAI server plays the identity provider
(it pops scripted replies whatever the path). The first half calls the checker directly, the
second half runs it inside a gateway, configured as lm-proxy configs name it.

Clocks: cache lifetimes are tested with pytest-trio's ``mock_clock`` set to run at real speed
(``rate = 1``) and jumped by hand. ``autojump_clock`` is not used where sockets are: it would
jump to the checker's own ``fail_after(timeout)`` deadline whenever every task waits on a
socket, so a loopback answer still in flight would look like an outage. One test uses a small
real TTL and sleeps just past it, because that sleep is the scenario ("a key just created").
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx2
import openai
import pytest
import trio
import trio.testing

from lm_gateway import load_config
from lm_gateway.auth import KeyCheckResult
from lm_gateway.errors import AuthUnavailable
from lm_gateway.handlers.keycheck import CheckAPIKeyWithRequest
from tests.conftest import RunningGateway, run_gateway
from tests.fakes.openai_upstream import FakeOpenAI, Reply, open_fake_openai

GUARD = 10.0
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
USERINFO = {"sub": "f3b1c2", "preferred_username": "alice", "email": "alice@example.com"}
CHECK_CLASS = "lm_proxy.api_key_check.CheckAPIKeyWithRequest"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai() as server:
        yield server


def idp_url(fake: FakeOpenAI, path: str = "/userinfo") -> str:
    return f"http://{fake.host}:{fake.port}{path}"


@contextlib.asynccontextmanager
async def checking(url: str, **options: Any) -> AsyncIterator[CheckAPIKeyWithRequest]:
    checker = CheckAPIKeyWithRequest(url, **options)
    try:
        yield checker
    finally:
        await checker.aclose()


async def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = int(listeners[0].socket.getsockname()[1])
    for listener in listeners:
        await listener.aclose()
    return port


# -- answers ----------------------------------------------------------------------------------


async def test_valid_key_without_options_is_default_group_with_empty_user_info(
    fake: FakeOpenAI,
) -> None:
    fake.push(Reply.json(USERINFO))
    async with checking(idp_url(fake)) as checker:
        with trio.fail_after(GUARD):
            result = await checker(TOKEN)
    assert result == KeyCheckResult(group="default", user_info={})
    assert isinstance(result.user_info, dict)  # lm-proxy gave None here
    assert checker.calls == 1
    assert len(fake.requests) == 1


async def test_response_as_user_info_and_group_field(fake: FakeOpenAI) -> None:
    body = {**USERINFO, "role": "admin", "groups": ["a", "b"]}
    fake.push(Reply.json(body))
    async with checking(idp_url(fake), response_as_user_info=True, group_field="role") as checker:
        with trio.fail_after(GUARD):
            result = await checker(TOKEN)
    assert result == KeyCheckResult(group="admin", user_info=body)


async def test_group_field_without_user_info_gives_group_and_empty_user_info(
    fake: FakeOpenAI,
) -> None:
    fake.push(Reply.json({"role": "admin", "secret": "x"}))
    async with checking(idp_url(fake), group_field="role") as checker:
        with trio.fail_after(GUARD):
            result = await checker(TOKEN)
    assert result == KeyCheckResult(group="admin", user_info={})


@pytest.mark.parametrize("body", [{"sub": "u"}, {"role": None}, {"role": ["admin"]}, {"role": 3}])
async def test_group_field_absent_or_not_a_string_gives_default_group(
    fake: FakeOpenAI, body: dict[str, Any]
) -> None:
    fake.push(Reply.json(body))
    async with checking(
        idp_url(fake), response_as_user_info=True, group_field="role", default_group="basic"
    ) as checker:
        with trio.fail_after(GUARD):
            result = await checker(TOKEN)
    assert result == KeyCheckResult(group="basic", user_info=body)


@pytest.mark.parametrize("status", [200, 201, 204])
async def test_any_2xx_is_valid_and_an_empty_body_is_empty_user_info(
    fake: FakeOpenAI, status: int
) -> None:
    fake.push(Reply.raw(b"", status=status))
    async with checking(idp_url(fake), response_as_user_info=True) as checker:
        with trio.fail_after(GUARD):
            result = await checker(TOKEN)
    assert result == KeyCheckResult(group="default", user_info={})


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_refusal_statuses_mean_invalid_key(fake: FakeOpenAI, status: int) -> None:
    fake.push(Reply.json({"error": "invalid_token"}, status=status))
    async with checking(idp_url(fake), response_as_user_info=True) as checker:
        with trio.fail_after(GUARD):
            assert await checker(TOKEN) is None
    assert checker.calls == 1


@pytest.mark.parametrize("status", [500, 502, 503, 429, 302])
async def test_other_statuses_are_an_outage_and_not_cached(fake: FakeOpenAI, status: int) -> None:
    headers = {"location": "http://127.0.0.1:9/elsewhere"} if status == 302 else None
    fake.push(Reply.json({"error": "busy"}, status=status, headers=headers))
    fake.push(Reply.json(USERINFO))
    async with checking(idp_url(fake), use_cache=True, response_as_user_info=True) as checker:
        with trio.fail_after(GUARD):
            with pytest.raises(AuthUnavailable) as caught:
                await checker(TOKEN)
            # Not remembered as "revoked" (lm-proxy cached the failure for the whole TTL).
            assert await checker(TOKEN) == KeyCheckResult("default", USERINFO)
    error = caught.value
    assert error.http_status == 503
    assert error.code == "auth_unavailable"
    assert error.to_body()["error"]["type"] == "service_unavailable"
    assert TOKEN not in str(error.to_body(debug=True))
    assert checker.calls == 2
    assert len(fake.requests) == 2  # a redirect is not followed


async def test_stall_past_timeout_is_an_outage_and_not_cached(fake: FakeOpenAI) -> None:
    fake.push(Reply.stall(), Reply.json(USERINFO))
    async with checking(idp_url(fake), use_cache=True, timeout=0.3) as checker:
        with trio.fail_after(GUARD):
            started = trio.current_time()
            with pytest.raises(AuthUnavailable):
                await checker(TOKEN)
            assert 0.3 <= trio.current_time() - started < 3
            await fake.wait_closed(fake.requests[0])  # the stalled call was abandoned
            assert await checker(TOKEN) == KeyCheckResult("default", {})
    assert checker.calls == 2


async def test_connection_refused_is_an_outage_and_not_cached() -> None:
    port = await closed_port()
    async with checking(f"http://127.0.0.1:{port}/userinfo", use_cache=True) as checker:
        with trio.fail_after(GUARD):
            for _ in range(2):
                with pytest.raises(AuthUnavailable) as caught:
                    await checker(TOKEN)
                assert caught.value.http_status == 503
    assert checker.calls == 2


async def test_connection_closed_without_answer_is_an_outage(fake: FakeOpenAI) -> None:
    fake.push(Reply.close_without_response())
    async with checking(idp_url(fake)) as checker:
        with trio.fail_after(GUARD), pytest.raises(AuthUnavailable):
            await checker(TOKEN)


@pytest.mark.parametrize(
    "reply",
    [
        Reply.json([USERINFO]),
        Reply.json("alice"),
        Reply.json(None),
        Reply.json(42),
        Reply.raw(b"<html>login</html>", content_type="text/html"),
        Reply.raw(b'{"sub": "trunc'),
    ],
    ids=["list", "string", "null", "number", "html", "truncated"],
)
@pytest.mark.parametrize(
    "options",
    [{"response_as_user_info": True}, {"group_field": "role"}],
    ids=["user_info", "group_field"],
)
async def test_answer_that_is_not_a_json_object_is_an_outage(
    fake: FakeOpenAI, reply: Reply, options: dict[str, Any]
) -> None:
    fake.push(reply, Reply.json({"role": "x"}))
    async with checking(idp_url(fake), use_cache=True, **options) as checker:
        with trio.fail_after(GUARD):
            with pytest.raises(AuthUnavailable) as caught:
                await checker(TOKEN)
            assert caught.value.http_status == 503
            assert await checker(TOKEN) is not None  # not cached
    assert checker.calls == 2


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="url"):
        CheckAPIKeyWithRequest("keycloak:8080/userinfo")
    with pytest.raises(ValueError, match="cache_ttl"):
        CheckAPIKeyWithRequest("http://127.0.0.1/u", cache_ttl=-1)
    with pytest.raises(ValueError, match="timeout"):
        CheckAPIKeyWithRequest("http://127.0.0.1/u", timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key_placeholder"):
        CheckAPIKeyWithRequest("http://127.0.0.1/u", key_placeholder="")


# -- where the key goes -----------------------------------------------------------------------

TRICKY_KEY = "a/b?c=d&e#f"


async def test_key_in_url_is_url_encoded(fake: FakeOpenAI) -> None:
    fake.push(Reply.json({}))
    url = idp_url(fake, "/keys/{api_key}/info?token={api_key}&realm=main")
    async with checking(url) as checker:
        with trio.fail_after(GUARD):
            assert await checker(TRICKY_KEY) is not None
    sent = fake.requests[0]
    parts = urlsplit(sent.path)
    segments = parts.path.split("/")
    assert segments[:2] == ["", "keys"]
    assert segments[3:] == ["info"]  # the key added no path segment
    assert unquote(segments[2]) == TRICKY_KEY
    assert parse_qs(parts.query) == {"token": [TRICKY_KEY], "realm": ["main"]}
    assert not parts.fragment
    assert sent.path == ("/keys/a%2Fb%3Fc%3Dd%26e%23f/info?token=a%2Fb%3Fc%3Dd%26e%23f&realm=main")


async def test_key_in_url_with_spaces_percent_and_unicode(fake: FakeOpenAI) -> None:
    key = "k 100%+é"
    fake.push(Reply.json({}))
    async with checking(idp_url(fake, "/check?key={api_key}")) as checker:
        with trio.fail_after(GUARD):
            assert await checker(key) is not None
    assert parse_qs(urlsplit(fake.requests[0].path).query) == {"key": [key]}


async def test_key_in_header_is_replaced_raw_and_method_honoured(fake: FakeOpenAI) -> None:
    fake.push(Reply.json(USERINFO))
    async with checking(
        idp_url(fake, "/realms/master/protocol/openid-connect/userinfo"),
        method="post",
        headers={
            "Authorization": "Bearer {api_key}",
            "X-Token-Twice": "{api_key}:{api_key}",
            "X-Static": "gateway",
        },
    ) as checker:
        with trio.fail_after(GUARD):
            assert await checker(TRICKY_KEY) is not None
    sent = fake.requests[0]
    assert sent.method == "POST"
    assert sent.path == "/realms/master/protocol/openid-connect/userinfo"  # no placeholder: as is
    assert sent.headers["authorization"] == f"Bearer {TRICKY_KEY}"
    assert sent.headers["x-token-twice"] == f"{TRICKY_KEY}:{TRICKY_KEY}"
    assert sent.headers["x-static"] == "gateway"


@pytest.mark.parametrize(("method", "sent"), [("get", "GET"), ("POST", "POST"), ("put", "PUT")])
async def test_method(fake: FakeOpenAI, method: str, sent: str) -> None:
    fake.push(Reply.json({}))
    async with checking(idp_url(fake), method=method) as checker:
        with trio.fail_after(GUARD):
            assert await checker(TOKEN) is not None
    assert fake.requests[0].method == sent


async def test_custom_key_placeholder(fake: FakeOpenAI) -> None:
    fake.push(Reply.json({}))
    async with checking(
        idp_url(fake, "/check/<KEY>"),
        headers={"X-Key": "<KEY>", "X-Literal": "{api_key}"},
        key_placeholder="<KEY>",
    ) as checker:
        with trio.fail_after(GUARD):
            assert await checker(TOKEN) is not None
    assert fake.requests[0].path == f"/check/{TOKEN}"
    assert fake.requests[0].headers["x-key"] == TOKEN
    assert fake.requests[0].headers["x-literal"] == "{api_key}"


@pytest.mark.parametrize(
    "key",
    [
        "sk-1\r\nX-Injected: yes",
        "sk-1\nX-Injected: yes",
        "sk-1\r",
        "sk-\x00",
        "sk-\t1",
        "sk-\x1b[31m",
        "sk-\x7f",
        "",
    ],
    ids=["crlf", "lf", "cr", "nul", "tab", "escape", "del", "empty"],
)
async def test_keys_with_control_characters_or_empty_are_refused_without_a_call(
    fake: FakeOpenAI, key: str
) -> None:
    async with checking(
        idp_url(fake, "/u/{api_key}"), headers={"Authorization": "Bearer {api_key}"}
    ) as checker:
        with trio.fail_after(GUARD):
            assert await checker(key) is None
    assert checker.calls == 0
    assert fake.requests == []


async def test_key_that_cannot_go_in_a_header_is_refused_not_crashing(fake: FakeOpenAI) -> None:
    """A non-ASCII key (a client can send one as Latin-1 header bytes) cannot be put into a
    header value: it is not a valid token, so "invalid key", not an unexpected exception (which
    the gateway answers with a 500 and a logged traceback)."""
    async with checking(idp_url(fake), headers={"Authorization": "Bearer {api_key}"}) as checker:
        with trio.fail_after(GUARD):
            assert await checker("sk-caf\xe9") is None
    assert fake.requests == []


# -- caching ----------------------------------------------------------------------------------


async def check(checker: CheckAPIKeyWithRequest, key: str) -> KeyCheckResult | None:
    """``checker(key)`` under a guard of its own (for tests that jump a mock clock: a guard
    around a jump would expire with it)."""
    with trio.fail_after(GUARD):
        return await checker(key)


async def test_valid_answers_cached_for_cache_ttl(
    fake: FakeOpenAI, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1  # real time flows (socket deadlines work), jumps are added by hand
    fake.push(Reply.json(USERINFO), Reply.json({"error": "revoked"}, status=401))
    async with checking(
        idp_url(fake), use_cache=True, cache_ttl=60, response_as_user_info=True
    ) as checker:
        first = await check(checker, TOKEN)
        assert first == KeyCheckResult("default", USERINFO)
        mock_clock.jump(59)
        assert await check(checker, TOKEN) == first
        assert checker.calls == 1
        mock_clock.jump(1.5)
        assert await check(checker, TOKEN) is None  # asked again: revoked since
    assert checker.calls == 2
    assert len(fake.requests) == 2


async def test_invalid_answers_cached_for_negative_cache_ttl(
    fake: FakeOpenAI, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1
    fake.push(
        Reply.json({}, status=401),  # bad key
        Reply.json(USERINFO),  # good key
        Reply.json(USERINFO),  # bad key, now created
    )
    async with checking(
        idp_url(fake), use_cache=True, cache_ttl=300, negative_cache_ttl=10
    ) as checker:
        assert await check(checker, "sk-bad") is None
        assert await check(checker, "sk-good") is not None
        mock_clock.jump(9)
        assert await check(checker, "sk-bad") is None
        assert checker.calls == 2
        mock_clock.jump(2)  # past the negative TTL, well within the positive one
        assert await check(checker, "sk-good") is not None
        assert checker.calls == 2
        assert await check(checker, "sk-bad") == KeyCheckResult("default", {})
    assert checker.calls == 3


async def test_a_key_just_created_works_after_the_short_negative_ttl(fake: FakeOpenAI) -> None:
    fake.push(Reply.json({}, status=401), Reply.json({}))
    async with checking(
        idp_url(fake), use_cache=True, cache_ttl=300, negative_cache_ttl=0.2
    ) as checker:
        with trio.fail_after(GUARD):
            assert await checker(TOKEN) is None
            assert await checker(TOKEN) is None
            assert checker.calls == 1
            await trio.sleep(0.25)  # the key is created meanwhile; the negative answer expires
            assert await checker(TOKEN) is not None
    assert checker.calls == 2


async def test_zero_ttl_caches_nothing(fake: FakeOpenAI) -> None:
    fake.push(*[Reply.json({}, status=401)] * 3)
    async with checking(idp_url(fake), use_cache=True, negative_cache_ttl=0) as checker:
        with trio.fail_after(GUARD):
            for _ in range(3):
                assert await checker(TOKEN) is None
    assert checker.calls == 3


async def test_cache_size_evicts_least_recently_used(fake: FakeOpenAI) -> None:
    fake.push(*[Reply.json({"sub": str(i)}) for i in range(5)])
    async with checking(
        idp_url(fake, "/u/{api_key}"), use_cache=True, cache_size=2, response_as_user_info=True
    ) as checker:
        with trio.fail_after(GUARD):
            assert await checker("key-a") == KeyCheckResult("default", {"sub": "0"})
            assert await checker("key-b") == KeyCheckResult("default", {"sub": "1"})
            assert await checker("key-a") == KeyCheckResult("default", {"sub": "0"})  # hit
            assert checker.calls == 2
            # "key-a" was used last, so "key-c" evicts "key-b".
            assert await checker("key-c") == KeyCheckResult("default", {"sub": "2"})
            assert await checker("key-a") == KeyCheckResult("default", {"sub": "0"})
            assert checker.calls == 3
            assert await checker("key-b") == KeyCheckResult("default", {"sub": "3"})
    assert checker.calls == 4
    assert [r.path for r in fake.requests] == ["/u/key-a", "/u/key-b", "/u/key-c", "/u/key-b"]


async def test_without_cache_every_check_asks(fake: FakeOpenAI) -> None:
    fake.push(Reply.json({}), Reply.json({}), Reply.json({}, status=401), Reply.json({}))
    async with checking(idp_url(fake), use_cache=False) as checker:
        with trio.fail_after(GUARD):
            assert await checker(TOKEN) is not None
            assert await checker(TOKEN) is not None
            assert await checker(TOKEN) is None  # revoked: seen at once
            assert await checker(TOKEN) is not None
    assert checker.calls == 4
    assert len(fake.requests) == 4


# -- single flight ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
async def test_concurrent_checks_of_one_key_make_one_call(
    fake: FakeOpenAI, use_cache: bool
) -> None:
    fake.push(Reply.json(USERINFO, delay=0.3), Reply.json({}, status=401))
    results: list[KeyCheckResult | None] = []

    async with checking(idp_url(fake), use_cache=use_cache, response_as_user_info=True) as checker:

        async def check() -> None:
            results.append(await checker(TOKEN))

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(check)
            assert results == [KeyCheckResult("default", USERINFO)] * 20
            assert checker.calls == 1
            assert len(fake.requests) == 1
            # Afterwards: from the cache, or (without one) asked again.
            after = await checker(TOKEN)
    if use_cache:
        assert after == KeyCheckResult("default", USERINFO)
        assert len(fake.requests) == 1
    else:
        assert after is None
        assert len(fake.requests) == 2


async def test_different_keys_are_not_merged(fake: FakeOpenAI) -> None:
    fake.push(Reply.json({"sub": "a"}, delay=0.2), Reply.json({}, status=401, delay=0.2))
    results: dict[str, KeyCheckResult | None] = {}

    async with checking(idp_url(fake, "/u/{api_key}"), response_as_user_info=True) as checker:

        async def check(key: str) -> None:
            results[key] = await checker(key)

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(check, "key-a")
                await fake.wait_for_request(1)
                nursery.start_soon(check, "key-b")
    assert results == {"key-a": KeyCheckResult("default", {"sub": "a"}), "key-b": None}
    assert checker.calls == 2


async def test_when_the_shared_call_fails_every_waiter_gets_503(fake: FakeOpenAI) -> None:
    fake.push(Reply.json({}, status=500, delay=0.3))
    outcomes: list[object] = []

    async with checking(idp_url(fake), use_cache=True) as checker:

        async def check() -> None:
            try:
                outcomes.append(await checker(TOKEN))
            except AuthUnavailable as exc:
                outcomes.append(exc)

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(check)
            assert len(outcomes) == 20
            assert all(isinstance(o, AuthUnavailable) for o in outcomes)
            # The waiters share the one call's outage instead of each asking again.
            assert checker.calls == 1
            assert checker.calls == len(fake.requests)
            # Nothing was cached and nothing is left pending: the next check asks.
            fake.push(Reply.json({}))
            calls = checker.calls
            assert await checker(TOKEN) is not None
            assert checker.calls == calls + 1


async def test_outage_waiters_do_not_queue_behind_each_other(fake: FakeOpenAI) -> None:
    """An IdP that stalls: the shared call times out after ``timeout``. Waiters must get their
    503 within about that time too, not each retry in turn behind the previous one (with N
    waiters the last would answer after N timeouts: 20 requests x the default 5 s = 100 s)."""
    timeout = 0.4
    fake.push(*[Reply.stall()] * 10)
    finished: list[float] = []

    async with checking(idp_url(fake), timeout=timeout) as checker:

        async def check() -> None:
            with pytest.raises(AuthUnavailable):
                await checker(TOKEN)
            finished.append(trio.current_time())

        with trio.fail_after(GUARD):
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(check)
    assert len(finished) == 10
    slowest = max(finished) - started
    assert slowest < 3 * timeout, (
        f"the last of 10 waiters got its 503 after {slowest:.1f} s "
        f"({checker.calls} calls made one after another)"
    )


async def test_waiters_do_not_hang_when_the_first_caller_is_cancelled(fake: FakeOpenAI) -> None:
    fake.push(Reply.stall(), Reply.json(USERINFO))
    results: list[KeyCheckResult | None] = []

    async with checking(idp_url(fake), response_as_user_info=True, timeout=GUARD) as checker:
        leader_scope = trio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await checker(TOKEN)

        async def waiter() -> None:
            results.append(await checker(TOKEN))

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(leader)
                await fake.wait_for_request(1)
                for _ in range(5):
                    nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert checker.calls == 1  # the waiters wait, they do not ask
                leader_scope.cancel()  # e.g. its client disconnected
            await fake.wait_closed(fake.requests[0])
    assert leader_scope.cancelled_caught
    assert results == [KeyCheckResult("default", USERINFO)] * 5
    assert checker.calls == 2  # one waiter asked in the leader's place, for all of them
    assert len(fake.requests) == 2


# -- through the gateway ----------------------------------------------------------------------


def gateway_config(fake_url: str, **check: Any) -> dict[str, Any]:
    return {
        "connections": {"echo": {"api_type": "echo"}, "premium": {"api_type": "echo"}},
        "routing": {"big-*": "premium.*", "*": "echo.*"},
        "groups": {
            "default": {"allowed_connections": "echo"},
            "admin": {"allowed_connections": "*"},
        },
        "api_key_check": {
            "class": CHECK_CLASS,
            "url": fake_url,
            "headers": {"Authorization": "Bearer {api_key}"},
            "response_as_user_info": True,
            "group_field": "role",
            **check,
        },
    }


def chat(model: str = "chat", text: str = "hello") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


async def post_chat(
    http: httpx2.AsyncClient, gateway: RunningGateway, token: str, model: str = "chat"
) -> httpx2.Response:
    return await http.post(
        f"{gateway.base_url}/chat/completions",
        headers={"authorization": f"Bearer {token}"},
        json=chat(model),
    )


def assert_openai_error(response: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return dict(body["error"])


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=GUARD) as client:
        yield client


async def test_gateway_sdk_with_valid_token(fake: FakeOpenAI) -> None:
    fake.push(Reply.json(USERINFO))
    async with run_gateway(gateway_config(idp_url(fake))) as gateway:
        assert isinstance(gateway.app.gateway.key_check, CheckAPIKeyWithRequest)
        with trio.fail_after(GUARD):
            async with openai.AsyncOpenAI(
                base_url=gateway.base_url, api_key=TOKEN, max_retries=0
            ) as sdk:
                completion = await sdk.chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": "hello there"}]
                )
            record = await gateway.records.wait_for(lambda r: r.status == 200)
    assert completion.choices[0].message.content == "hello there"
    assert fake.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert record.group == "default"
    assert record.user_info == USERINFO
    assert record.api_key_id
    assert TOKEN not in record.api_key_id


async def test_gateway_bad_token_is_401(fake: FakeOpenAI, http: httpx2.AsyncClient) -> None:
    fake.push(Reply.json({"error": "invalid_token"}, status=401))
    async with run_gateway(gateway_config(idp_url(fake))) as gateway:
        with trio.fail_after(GUARD):
            response = await post_chat(http, gateway, "expired-token")
            record = await gateway.records.wait_for(lambda r: r.status == 401)
    assert_openai_error(response, 401, "invalid_api_key")
    assert "expired-token" not in response.text
    assert record.outcome == "rejected"


async def test_gateway_sdk_bad_token_raises_authentication_error(fake: FakeOpenAI) -> None:
    fake.push(Reply.json({}, status=403))
    async with run_gateway(gateway_config(idp_url(fake))) as gateway:
        with trio.fail_after(GUARD):
            async with openai.AsyncOpenAI(
                base_url=gateway.base_url, api_key="nope", max_retries=0
            ) as sdk:
                with pytest.raises(openai.AuthenticationError):
                    await sdk.chat.completions.create(**chat())


async def test_gateway_idp_error_is_503_and_not_remembered(
    fake: FakeOpenAI, http: httpx2.AsyncClient
) -> None:
    fake.push(Reply.json({"error": "down"}, status=502), Reply.json(USERINFO))
    config = gateway_config(idp_url(fake), use_cache=True, cache_ttl=300)
    async with run_gateway(config) as gateway:
        with trio.fail_after(GUARD):
            down = await post_chat(http, gateway, TOKEN)
            record = await gateway.records.wait_for(lambda r: r.status == 503)
            up = await post_chat(http, gateway, TOKEN)
    error = assert_openai_error(down, 503, "auth_unavailable")
    assert error["type"] == "service_unavailable"
    assert TOKEN not in down.text
    assert record.error_code == "auth_unavailable"
    assert up.status_code == 200, up.text
    assert len(fake.requests) == 2


async def test_gateway_idp_unreachable_is_503(http: httpx2.AsyncClient) -> None:
    port = await closed_port()
    async with run_gateway(gateway_config(f"http://127.0.0.1:{port}/userinfo")) as gateway:
        with trio.fail_after(GUARD):
            response = await post_chat(http, gateway, TOKEN)
    assert_openai_error(response, 503, "auth_unavailable")


async def test_gateway_idp_stall_is_503_after_timeout(
    fake: FakeOpenAI, http: httpx2.AsyncClient
) -> None:
    fake.push(Reply.stall())
    async with run_gateway(gateway_config(idp_url(fake), timeout=0.3)) as gateway:
        with trio.fail_after(GUARD):
            response = await post_chat(http, gateway, TOKEN)
    assert_openai_error(response, 503, "auth_unavailable")


async def test_gateway_group_field_picks_allowed_connections(
    fake: FakeOpenAI, http: httpx2.AsyncClient
) -> None:
    fake.push(
        Reply.json({**USERINFO, "role": "admin"}),
        Reply.json(USERINFO),  # no role: default group, echo only
        Reply.json(USERINFO),
    )
    async with run_gateway(gateway_config(idp_url(fake, "/u/{api_key}"))) as gateway:
        with trio.fail_after(GUARD):
            admin = await post_chat(http, gateway, "tok-admin", "big-model")
            user_big = await post_chat(http, gateway, "tok-user", "big-model")
            user_small = await post_chat(http, gateway, "tok-user", "small-model")
            admin_record = await gateway.records.wait_for(lambda r: r.group == "admin")
    assert admin.status_code == 200, admin.text
    assert admin_record.connection == "premium"
    assert admin_record.user_info == {**USERINFO, "role": "admin"}
    error = assert_openai_error(user_big, 403, "connection_not_allowed")
    assert error["type"] == "permission_error"
    assert user_small.status_code == 200, user_small.text
    assert [r.path for r in fake.requests] == ["/u/tok-admin", "/u/tok-user", "/u/tok-user"]


async def test_gateway_unknown_group_is_500_invalid_group(
    fake: FakeOpenAI, http: httpx2.AsyncClient
) -> None:
    fake.push(Reply.json({"role": "superusers"}))
    async with run_gateway(gateway_config(idp_url(fake))) as gateway:
        with trio.fail_after(GUARD):
            response = await post_chat(http, gateway, TOKEN)
    error = assert_openai_error(response, 500, "invalid_group")
    assert error["type"] == "server_error"
    assert "superusers" not in response.text  # the detail is for the log, not the client


async def test_gateway_loop_is_not_blocked_while_the_idp_stalls(
    fake: FakeOpenAI, http: httpx2.AsyncClient
) -> None:
    fake.push(Reply.stall(), Reply.json({"role": "admin"}))
    config = gateway_config(idp_url(fake, "/u/{api_key}"), timeout=3)
    slow: dict[str, Any] = {}
    async with run_gateway(config) as gateway:

        async def stalled_request() -> None:
            slow["response"] = await post_chat(http, gateway, "tok-stalled")

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stalled_request)
                await fake.wait_for_request(1)
                with trio.fail_after(1):
                    health = await http.get(f"{gateway.url}/health")
                    other = await post_chat(http, gateway, "tok-other")
                assert "response" not in slow  # still waiting for the IdP
                assert health.status_code == 200
                assert other.status_code == 200, other.text
                nursery.cancel_scope.cancel()  # the stalled client gives up
            await fake.wait_closed(fake.requests[0])  # and the gateway drops its IdP call
    assert "response" not in slow


class RecordingCheck(CheckAPIKeyWithRequest):
    """The real checker, remembering the instances the gateway closed."""

    closed: list[RecordingCheck] = []  # noqa: RUF012 - a class-level log on purpose

    async def aclose(self) -> None:
        await super().aclose()
        RecordingCheck.closed.append(self)


async def test_gateway_shutdown_closes_the_checker_client(
    fake: FakeOpenAI, http: httpx2.AsyncClient
) -> None:
    RecordingCheck.closed.clear()
    fake.push(Reply.json(USERINFO))
    config = gateway_config(idp_url(fake))
    config["api_key_check"]["class"] = f"{__name__}.RecordingCheck"
    with trio.fail_after(GUARD):
        async with run_gateway(config) as gateway:
            checker = gateway.app.gateway.key_check
            assert isinstance(checker, RecordingCheck)
            response = await post_chat(http, gateway, TOKEN)
            assert response.status_code == 200, response.text
            assert RecordingCheck.closed == []
        # run_gateway exited: the app stopped serving and closed its extensions.
        assert RecordingCheck.closed == [checker]
        # The kept-alive connection to the IdP was closed by the gateway's side.
        await fake.wait_closed(fake.requests[0])


# -- lm-proxy's README example ----------------------------------------------------------------

KEYCLOAK_TOML = """\
[connections.echo]
api_type = "echo"

[routing]
"*" = "echo.*"

[groups.default]

[api_key_check]
class = "lm_proxy.api_key_check.CheckAPIKeyWithRequest"
method = "POST"
url = "{url}"
response_as_user_info = true
use_cache = true
cache_ttl = 60

[api_key_check.headers]
Authorization = "Bearer {{api_key}}"
"""


async def test_lm_proxy_keycloak_example_config(fake: FakeOpenAI, tmp_path: Any) -> None:
    path = tmp_path / "config.toml"
    url = idp_url(fake, "/realms/master/protocol/openid-connect/userinfo")
    path.write_text(KEYCLOAK_TOML.format(url=url), encoding="utf-8")
    config = load_config(path)
    fake.push(Reply.json(USERINFO))
    async with run_gateway(config) as gateway:
        checker = gateway.app.gateway.key_check
        assert isinstance(checker, CheckAPIKeyWithRequest)
        assert (checker.method, checker.use_cache, checker.cache_ttl) == ("POST", True, 60.0)
        with trio.fail_after(GUARD):
            async with openai.AsyncOpenAI(
                base_url=gateway.base_url, api_key=TOKEN, max_retries=0
            ) as sdk:
                answers = [
                    await sdk.chat.completions.create(
                        model="any-model", messages=[{"role": "user", "content": f"hi {i}"}]
                    )
                    for i in range(3)
                ]
                with pytest.raises(openai.AuthenticationError):
                    fake.push(Reply.json({"error": "invalid_token"}, status=401))
                    await sdk.with_options(api_key="forged").chat.completions.create(**chat())
            record = await gateway.records.wait_for(lambda r: r.status == 200)
    assert [a.choices[0].message.content for a in answers] == ["hi 0", "hi 1", "hi 2"]
    assert len(fake.requests) == 2  # the token was checked once (cached), then "forged"
    sent = fake.requests[0]
    assert sent.method == "POST"
    assert sent.path == "/realms/master/protocol/openid-connect/userinfo"
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"
    assert fake.requests[1].headers["authorization"] == "Bearer forged"
    assert record.user_info == USERINFO
    assert record.group == "default"


async def test_gateway_non_ascii_token_is_401_not_500(
    fake: FakeOpenAI, http: httpx2.AsyncClient
) -> None:
    """A client can send any Latin-1 bytes as its token; the header placeholder cannot carry a
    non-ASCII one, so it is an invalid key (401), not a gateway failure (500)."""
    async with run_gateway(gateway_config(idp_url(fake))) as gateway:
        with trio.fail_after(GUARD):
            response = await http.post(
                f"{gateway.base_url}/chat/completions",
                headers={b"authorization": "Bearer sk-caf\xe9".encode("latin-1")},
                json=chat(),
            )
    assert_openai_error(response, 401, "invalid_api_key")
    assert fake.requests == []
