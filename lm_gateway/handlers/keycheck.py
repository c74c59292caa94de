"""``CheckAPIKeyWithRequest``: validate keys with an HTTP call (an OIDC ``userinfo`` endpoint,
Keycloak, your own service).

The key goes where ``{api_key}`` appears: in the URL (URL-encoded, so a key cannot add query
parameters or path segments) or in header values (a key with control characters is refused
before any call, so it cannot split headers). The call is async over httpx2 and has a
deadline; nothing blocks the event loop.

Answers:

- 2xx: valid. The group is ``user_info[group_field]`` when configured and present, else
  ``default_group``; with ``response_as_user_info`` the JSON object answered becomes the
  request's ``user_info`` (always a dict).
- 400, 401, 403, 404: not a valid key (RFC 6750 answers a malformed bearer token with 400).
- anything else, a timeout, or no answer: the identity provider is unavailable. The client gets
  503 ``auth_unavailable`` — never "invalid key" — and nothing is cached, so an outage does not
  revoke keys for a cache lifetime (lm-proxy cached it as "key revoked").

With ``use_cache``, valid answers are kept for ``cache_ttl`` seconds and invalid ones for
``negative_cache_ttl`` (short: a key just created works quickly). Keys are cached by their
SHA-256 digest. Concurrent requests with the same uncached key make one call: the others wait
for its answer, or its outage (so during an outage they all get their 503 at once, not one
timeout after another).
"""

from __future__ import annotations

import collections
import hashlib
import logging
from typing import Any
from urllib.parse import quote

import httpx2
import orjson
import trio

from ..auth import KeyCheckResult
from ..errors import AuthUnavailable

log = logging.getLogger("lm_gateway.auth")

#: "Not a valid key". 400 included: RFC 6750 answers a malformed bearer token with 400.
_INVALID_STATUSES = frozenset({400, 401, 403, 404})


class _Pending:
    """One check in flight; later callers with the same key wait on it and share its outcome:
    the answer, or the outage. Only a check abandoned by its caller (cancelled) is retried."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: KeyCheckResult | None = None
        self.outage: AuthUnavailable | None = None
        self.abandoned = False


class CheckAPIKeyWithRequest:
    """See the module docstring. lm-proxy's parameter names and defaults.

    Args:
        url: the endpoint; ``{api_key}`` is replaced by the URL-encoded key.
        method: HTTP method.
        headers: request headers; ``{api_key}`` in a value is replaced by the key.
        response_as_user_info: use the JSON answer as ``user_info``.
        group_field: the ``user_info`` field holding the group name.
        default_group: the group when ``group_field`` is absent or not set.
        key_placeholder: the placeholder text.
        use_cache: cache answers (see the module docstring).
        cache_size: most keys cached.
        cache_ttl: seconds a valid answer is kept.
        negative_cache_ttl: seconds an invalid answer is kept.
        timeout: deadline for the call, seconds.
        verify_ssl: verify the endpoint's TLS certificate (or a CA bundle path).
    """

    def __init__(
        self,
        url: str,
        method: str = "get",
        headers: dict[str, str] | None = None,
        *,
        response_as_user_info: bool = False,
        group_field: str | None = None,
        default_group: str = "default",
        key_placeholder: str = "{api_key}",
        use_cache: bool = False,
        cache_size: int = 16384,
        cache_ttl: float = 300.0,
        negative_cache_ttl: float = 10.0,
        timeout: float = 5.0,
        verify_ssl: bool | str = True,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url: must be an http(s) URL, got {url!r}")
        if not key_placeholder:
            raise ValueError("key_placeholder: must not be empty")
        for label, value in (
            ("cache_ttl", cache_ttl),
            ("negative_cache_ttl", negative_cache_ttl),
            ("timeout", timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{label}: must be a number of seconds, got {value!r}")
        self.url = url
        self.method = method.upper()
        self.headers = dict(headers or {})
        self.response_as_user_info = response_as_user_info
        self.group_field = group_field
        self.default_group = default_group
        self.placeholder = key_placeholder
        self.use_cache = use_cache
        self.cache_size = cache_size
        self.cache_ttl = float(cache_ttl)
        self.negative_cache_ttl = float(negative_cache_ttl)
        self.timeout = float(timeout)
        self._client = httpx2.AsyncClient(verify=verify_ssl, follow_redirects=False)
        self._cache: collections.OrderedDict[str, tuple[float, KeyCheckResult | None]] = (
            collections.OrderedDict()
        )
        self._pending: dict[str, _Pending] = {}
        #: Calls made to the endpoint (observability and tests).
        self.calls = 0

    async def aclose(self) -> None:
        await self._client.aclose()

    def _cached(self, digest: str) -> tuple[bool, KeyCheckResult | None]:
        entry = self._cache.get(digest)
        if entry is None:
            return False, None
        expires, result = entry
        if expires <= trio.current_time():
            del self._cache[digest]
            return False, None
        self._cache.move_to_end(digest)
        return True, _copy(result)

    def _remember(self, digest: str, result: KeyCheckResult | None) -> None:
        ttl = self.cache_ttl if result is not None else self.negative_cache_ttl
        if ttl <= 0:
            return
        self._cache[digest] = (trio.current_time() + ttl, result)
        self._cache.move_to_end(digest)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def __call__(self, api_key: str) -> KeyCheckResult | None:
        if not api_key or any(ord(c) < 32 or ord(c) == 127 for c in api_key):
            return None  # no key, or one that could split headers: never sent anywhere
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        if self.use_cache:
            hit, result = self._cached(digest)
            if hit:
                return result
        while (pending := self._pending.get(digest)) is not None:
            await pending.done.wait()
            if pending.outage is not None:
                # The same outage for everyone waiting, now: not one timeout after another.
                raise AuthUnavailable(pending.outage.message, detail=pending.outage.detail)
            if not pending.abandoned:
                return _copy(pending.result)
            # The call we waited on was cancelled with its request: ask ourselves.
        pending = self._pending[digest] = _Pending()
        try:
            result = await self._ask(api_key)
            pending.result = result
            if self.use_cache:
                self._remember(digest, result)
            return _copy(result)
        except AuthUnavailable as outage:
            pending.outage = outage
            raise
        except BaseException:
            pending.abandoned = True
            raise
        finally:
            del self._pending[digest]
            pending.done.set()

    async def _ask(self, api_key: str) -> KeyCheckResult | None:
        url = self.url.replace(self.placeholder, quote(api_key, safe=""))
        headers = {k: v.replace(self.placeholder, api_key) for k, v in self.headers.items()}
        if not api_key.isascii() and any(self.placeholder in v for v in self.headers.values()):
            return None  # cannot be sent in a header; no real token looks like that
        self.calls += 1
        try:
            with trio.fail_after(self.timeout):
                response = await self._client.request(self.method, url, headers=headers)
        except (httpx2.HTTPError, trio.TooSlowError) as exc:
            log.warning("key check: %s did not answer (%s)", _host(self.url), type(exc).__name__)
            raise AuthUnavailable(
                "The service that validates API keys is unavailable; try again shortly.",
                detail=f"{type(exc).__name__}: {exc}",
            ) from exc
        if response.status_code in _INVALID_STATUSES:
            return None
        if not 200 <= response.status_code < 300:
            log.warning("key check: %s answered HTTP %d", _host(self.url), response.status_code)
            raise AuthUnavailable(
                "The service that validates API keys is unavailable; try again shortly.",
                detail=f"HTTP {response.status_code}",
            )
        user_info: dict[str, Any] = {}
        if self.response_as_user_info or self.group_field:
            try:
                parsed = orjson.loads(response.content) if response.content else {}
            except orjson.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                raise AuthUnavailable(
                    "The service that validates API keys gave an answer that is not a JSON object.",
                    detail=f"body starts {response.content[:100]!r}",
                )
            user_info = parsed
        group = self.default_group
        if self.group_field and isinstance(user_info.get(self.group_field), str):
            group = user_info[self.group_field]
        return KeyCheckResult(
            group=group, user_info=user_info if self.response_as_user_info else {}
        )


def _copy(result: KeyCheckResult | None) -> KeyCheckResult | None:
    """A result the caller may change without changing the cached one."""
    if result is None:
        return None
    return KeyCheckResult(group=result.group, user_info=dict(result.user_info))


def _host(url: str) -> str:
    """The URL without path or query (the key may be in them: never log it)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"
