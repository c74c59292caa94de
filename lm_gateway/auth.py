"""Virtual API keys: extraction from headers, the in-config check, allow-all, key ids.

Pure logic. Keys in the config are stored as SHA-256 digests (a config may also list
``sha256:<hex>`` digests instead of plain keys). A presented key is hashed and looked up by digest,
then the digests are compared with :func:`hmac.compare_digest`; a timing difference can at most
reveal something about a digest, never about a key, and the lookup stays O(1) however many keys
there are (comparing against each key in turn would cost milliseconds with thousands of keys).

A key check is any callable ``check(api_key) -> group | (group, user_info) | None``; ``None`` or
``False`` means "not a valid key". The built-ins here are synchronous and CPU-only; the service
layer runs users' synchronous checks in a worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .config.model import Group
from .errors import InternalError

#: Headers a client may carry its key in, in order of preference.
KEY_HEADERS = ("authorization", "x-api-key", "api-key")


def extract_api_key(headers: Mapping[str, str]) -> str | None:
    """The client's key from ``Authorization: Bearer``, ``x-api-key`` or ``api-key``.

    ``headers`` must map lower-case names to values. An ``Authorization`` header with another
    scheme (``Basic``) is not a key; the other headers are then tried.
    """
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for name in ("x-api-key", "api-key"):
        value = headers.get(name)
        if value and value.strip():
            return value.strip()
    return None


def key_digest(api_key: str) -> str:
    """SHA-256 hex digest of a key, as stored for configured keys."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def api_key_id(api_key: str, secret: bytes) -> str:
    """A stable, non-reversible id for a key, for logs and limits (HMAC-SHA256, 16 bytes hex).

    Keyed, unlike lm-proxy's ``md5(key + "Eclipse")``: without the secret, ids in a leaked log
    cannot be used to test guesses of short keys.
    """
    return hmac.new(secret, api_key.encode(), hashlib.sha256).hexdigest()[:32]


@attrs.frozen
class KeyCheckResult:
    """A successful key check: the group and what the check knows about the caller."""

    group: str
    user_info: dict[str, Any] = attrs.field(factory=dict)


class ConfigKeyCheck:
    """The default check: is the key listed in some group's ``api_keys``?"""

    def __init__(self, groups: Mapping[str, Group]) -> None:
        # Buckets keyed by a 64-bit prefix of the digest; the full digest is then compared in
        # constant time. What timing can reveal is at most whether a prefix of a *digest*
        # exists, which does not help anyone find a key.
        self._buckets: dict[str, list[tuple[str, KeyCheckResult]]] = {}
        for group in groups.values():
            for digest in group.api_key_digests:
                self._buckets.setdefault(digest[:16], []).append(
                    (digest, KeyCheckResult(group=group.name))
                )

    def __call__(self, api_key: str) -> KeyCheckResult | None:
        digest = key_digest(api_key)
        found = None
        for stored, result in self._buckets.get(digest[:16], ()):
            if hmac.compare_digest(stored, digest):
                found = result
        return found


class AllowAll:
    """Accept every request, with or without a key (for trusted networks only).

    Args:
        group: the group every caller is put in.
        capture_api_key: put the raw key into ``user_info["api_key"]``. Off by default because
            user_info reaches logs (lm-proxy had it on, so raw keys ended up in log files).
    """

    #: The service layer calls this check even when the request carries no key.
    accepts_missing_key = True

    def __init__(self, group: str = "default", capture_api_key: bool = False) -> None:
        self.group = group
        self.capture_api_key = capture_api_key

    def __call__(self, api_key: str) -> KeyCheckResult:
        info: dict[str, Any] = {"api_key": api_key} if self.capture_api_key and api_key else {}
        return KeyCheckResult(group=self.group, user_info=info)


def normalize_check_result(result: Any, where: str) -> KeyCheckResult | None:
    """Turn what a key check returned into a :class:`KeyCheckResult` (None = rejected).

    Accepted: a group name, ``(group, user_info)``, a :class:`KeyCheckResult`, or a falsy value.

    Raises:
        InternalError: the check returned something else (such as ``True``); the message says
            what, so the extension's author can fix it.
    """
    if isinstance(result, KeyCheckResult):
        return result
    if not result:  # None, False, "", 0, empty containers: "not a valid key"
        return None
    if isinstance(result, str):
        return KeyCheckResult(group=result)
    if isinstance(result, tuple | list) and len(result) == 2 and isinstance(result[0], str):
        group, info = result
        if info is None:
            info = {}
        if not isinstance(info, Mapping):
            raise InternalError(
                "The API key check failed.",
                detail=f"{where} returned user_info of type {type(info).__name__}, not a dict",
            )
        return KeyCheckResult(group=group, user_info=dict(info))
    raise InternalError(
        "The API key check failed.",
        detail=f"{where} returned {type(result).__name__}; expected a group name, "
        "(group, user_info) or None",
    )


def _forwarded_for(headers: Mapping[str, str]) -> list[str]:
    """The client chain a proxy reported: ``Forwarded: for=...`` (RFC 7239) or
    ``X-Forwarded-For``, leftmost = the original client. Ports and brackets are removed."""
    chain: list[str] = []
    forwarded = headers.get("forwarded")
    if forwarded:
        for element in forwarded.split(","):
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.strip().lower() == "for" and value:
                    chain.append(_strip_port(value.strip().strip('"')))
        if chain:
            return chain
    xff = headers.get("x-forwarded-for")
    if xff:
        chain = [_strip_port(item.strip()) for item in xff.split(",") if item.strip()]
    return chain


def _strip_port(value: str) -> str:
    if value.startswith("["):  # [2001:db8::1]:4711
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:  # 192.0.2.1:8080
        return value.split(":", 1)[0]
    return value


def client_ip(
    peer: str | None,
    headers: Mapping[str, str],
    trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str | None:
    """The client's address: the socket peer, unless the peer is a trusted proxy.

    Behind trusted proxies, the ``Forwarded``/``X-Forwarded-For`` chain is read from the right
    (the nearest hop) and the first address that is not itself a trusted proxy is the client:
    addresses further left were written by the client or untrusted hops and prove nothing.
    Without trusted proxies the headers are ignored (lm-proxy believed them from anyone, which
    made IP limits and logged addresses spoofable).
    """
    if peer is None or not trusted or not _is_trusted(peer, trusted):
        return peer
    chain = _forwarded_for(headers)
    for address in reversed(chain):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            return peer  # a hop we cannot read: do not guess beyond it
        if not _is_trusted(address, trusted):
            return address
    return chain[0] if chain else peer


def _is_trusted(
    address: str, trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)
