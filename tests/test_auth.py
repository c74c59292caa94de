"""Unit and property tests of virtual API keys: extraction, the in-config check, key ids."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_gateway.auth import (
    AllowAll,
    ConfigKeyCheck,
    KeyCheckResult,
    api_key_id,
    client_ip,
    extract_api_key,
    key_digest,
    normalize_check_result,
)
from lm_gateway.config import build_config
from lm_gateway.errors import ConfigError, InternalError


def groups_from(groups: dict[str, Any], **environ: str) -> Any:
    config = build_config(
        {
            "connections": {"a": {"api_type": "echo"}, "b": {"api_type": "echo"}},
            "routing": {"*": "a.*"},
            "groups": groups,
        },
        environ=environ,
    )
    return config.groups


# --------------------------------------------------------------------------------------------
# extract_api_key


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": "Bearer sk-1"}, "sk-1"),
        ({"authorization": "bearer sk-1"}, "sk-1"),
        ({"authorization": "BEARER sk-1"}, "sk-1"),
        ({"authorization": "BeArEr sk-1"}, "sk-1"),
        ({"authorization": "  Bearer    sk-1  "}, "sk-1"),
        ({"authorization": "Bearer sk-1", "x-api-key": "sk-2"}, "sk-1"),
        ({"x-api-key": "sk-2"}, "sk-2"),
        ({"x-api-key": " sk-2 "}, "sk-2"),
        ({"api-key": "sk-3"}, "sk-3"),
        ({"x-api-key": "sk-2", "api-key": "sk-3"}, "sk-2"),
        ({"x-api-key": "   ", "api-key": "sk-3"}, "sk-3"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": "sk-2"}, "sk-2"),
        ({"authorization": "Bearer"}, None),
        ({"authorization": "Bearer    "}, None),
        ({"authorization": "Bearer ", "api-key": "sk-3"}, "sk-3"),
        ({"authorization": "sk-raw"}, None),
        ({"authorization": ""}, None),
        ({"x-api-key": ""}, None),
        ({}, None),
    ],
)
def test_extract_api_key(headers: dict[str, str], expected: str | None) -> None:
    assert extract_api_key(headers) == expected


_TOKEN = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


@settings(max_examples=200, deadline=None)
@given(
    key=_TOKEN,
    scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "bEARER"]),
    pad=st.text(alphabet=" ", max_size=3),
)
def test_bearer_key_round_trips(key: str, scheme: str, pad: str) -> None:
    assert extract_api_key({"authorization": f"{pad}{scheme} {pad}{key}{pad}"}) == key


@settings(max_examples=200, deadline=None)
@given(
    headers=st.dictionaries(
        st.sampled_from(["authorization", "x-api-key", "api-key", "x"]), st.text()
    )
)
def test_extracted_key_is_never_empty_or_padded(headers: dict[str, str]) -> None:
    key = extract_api_key(headers)
    if key is not None:
        assert key
        assert key == key.strip()


# --------------------------------------------------------------------------------------------
# ConfigKeyCheck


def test_config_key_check_finds_the_group() -> None:
    hashed = hashlib.sha256(b"sk-hashed").hexdigest()
    check = ConfigKeyCheck(
        groups_from(
            {
                "admin": {"api_keys": ["sk-admin", f"sha256:{hashed}"]},
                "users": {"api_keys": ["env:USER_KEY"], "allowed_connections": "a"},
            },
            USER_KEY="sk-user",
        )
    )
    assert check("sk-admin") == KeyCheckResult(group="admin")
    assert check("sk-hashed") == KeyCheckResult(group="admin")
    assert check("sk-user") == KeyCheckResult(group="users")
    assert check("sk-user").user_info == {}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "sk-admi",
        "sk-admin ",
        "SK-ADMIN",
        "env:USER_KEY",
        hashlib.sha256(b"sk-hashed").hexdigest(),
        "sha256:" + hashlib.sha256(b"sk-hashed").hexdigest(),
        key_digest("sk-admin"),
    ],
)
def test_config_key_check_rejects_other_keys(presented: str) -> None:
    # In particular, knowing a stored digest does not let anyone in.
    hashed = hashlib.sha256(b"sk-hashed").hexdigest()
    check = ConfigKeyCheck(
        groups_from(
            {"admin": {"api_keys": ["sk-admin", f"sha256:{hashed}"]}, "users": {"api_keys": ["u"]}}
        )
    )
    assert check(presented) is None


def test_config_key_check_with_no_keys_rejects_everything() -> None:
    check = ConfigKeyCheck({})
    assert check("anything") is None
    assert check("") is None


def test_configured_key_with_surrounding_whitespace_is_usable_or_rejected() -> None:
    # Clients' keys are stripped on extraction, so a configured " sk-pad " could never match.
    # Either the config refuses it, or the check accepts what a client can actually send.
    try:
        groups = groups_from({"g": {"api_keys": [" sk-pad "]}})
    except ConfigError:
        return
    assert ConfigKeyCheck(groups)("sk-pad") == KeyCheckResult(group="g")


@settings(max_examples=100, deadline=None)
@given(
    keys=st.lists(
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
        min_size=1,
        max_size=6,
        unique=True,
    ),
    data=st.data(),
)
def test_every_configured_key_finds_its_own_group(keys: list[str], data: st.DataObject) -> None:
    owners = [data.draw(st.sampled_from(["g1", "g2", "g3"])) for _ in keys]
    spec: dict[str, dict[str, list[str]]] = {}
    for key, owner in zip(keys, owners, strict=True):
        spec.setdefault(owner, {"api_keys": []})["api_keys"].append(key)
    check = ConfigKeyCheck(groups_from(spec))
    for key, owner in zip(keys, owners, strict=True):
        if key.startswith("sha256:") and len(key) == 71:
            continue  # that is a digest, not a key
        assert check(key) == KeyCheckResult(group=owner)
    assert check("\x00not-a-key") is None


# --------------------------------------------------------------------------------------------
# AllowAll


def test_allow_all_accepts_anything_without_capturing_the_key() -> None:
    check = AllowAll()
    assert check("sk-secret") == KeyCheckResult(group="default", user_info={})
    assert check("") == KeyCheckResult(group="default", user_info={})
    assert "sk-secret" not in repr(check("sk-secret"))
    assert AllowAll.accepts_missing_key is True


def test_allow_all_options() -> None:
    check = AllowAll(group="guests", capture_api_key=True)
    assert check("sk-1") == KeyCheckResult(group="guests", user_info={"api_key": "sk-1"})
    assert check("") == KeyCheckResult(group="guests", user_info={})


# --------------------------------------------------------------------------------------------
# api_key_id


def test_api_key_id_is_stable_and_short_hex() -> None:
    a = api_key_id("sk-1", b"secret")
    assert a == api_key_id("sk-1", b"secret")
    assert len(a) == 32
    int(a, 16)


def test_api_key_id_is_not_lm_proxys_unkeyed_hash() -> None:
    assert api_key_id("sk-1", b"Eclipse") != hashlib.md5(b"sk-1Eclipse").hexdigest()
    assert api_key_id("sk-1", b"") != hashlib.sha256(b"sk-1").hexdigest()[:32]


@settings(max_examples=200, deadline=None)
@given(
    key=st.text(min_size=1).map(lambda t: f"sk-{t}"),
    other=st.text(min_size=1).map(lambda t: f"sk-{t}"),
    secret=st.binary(min_size=1, max_size=32),
    other_secret=st.binary(min_size=1, max_size=32),
)
def test_api_key_id_properties(key: str, other: str, secret: bytes, other_secret: bytes) -> None:
    kid = api_key_id(key, secret)
    assert kid == api_key_id(key, secret)
    assert key not in kid
    assert len(kid) == 32
    if other != key:
        assert api_key_id(other, secret) != kid
    if other_secret != secret:
        assert api_key_id(key, other_secret) != kid


# --------------------------------------------------------------------------------------------
# normalize_check_result


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ("admin", KeyCheckResult(group="admin")),
        (("admin", {"user": "u1"}), KeyCheckResult(group="admin", user_info={"user": "u1"})),
        (["admin", {"user": "u1"}], KeyCheckResult(group="admin", user_info={"user": "u1"})),
        (("admin", None), KeyCheckResult(group="admin", user_info={})),
        (
            KeyCheckResult(group="g", user_info={"x": 1}),
            KeyCheckResult(group="g", user_info={"x": 1}),
        ),
        (None, None),
        (False, None),
        ("", None),
    ],
)
def test_normalize_check_result(result: Any, expected: KeyCheckResult | None) -> None:
    assert normalize_check_result(result, "my_pkg.check") == expected


def test_normalize_copies_user_info() -> None:
    info = {"user": "u1"}
    result = normalize_check_result(("g", info), "w")
    assert result is not None
    info["user"] = "changed"
    assert result.user_info == {"user": "u1"}


@pytest.mark.parametrize("result", [0, (), [], {}])
def test_normalize_treats_every_falsy_value_as_rejection(result: Any) -> None:
    # The docstring (and lm-proxy) say any falsy value means "not a valid key".
    assert normalize_check_result(result, "my_pkg.check") is None


@pytest.mark.parametrize(
    ("result", "words"),
    [
        (True, "bool"),
        (1, "int"),
        (("admin",), "tuple"),
        (("admin", {}, "extra"), "tuple"),
        ((1, {}), "tuple"),
        (("admin", "not-a-dict"), "str"),
        (("admin", ["x"]), "list"),
        ({"group": "admin"}, "dict"),
    ],
)
def test_normalize_rejects_other_results_with_internal_error(result: Any, words: str) -> None:
    with pytest.raises(InternalError) as info:
        normalize_check_result(result, "my_pkg.check")
    assert info.value.http_status == 500
    assert info.value.detail is not None
    assert "my_pkg.check" in info.value.detail
    assert words in info.value.detail
    # The client-facing message reveals nothing about the extension.
    assert "my_pkg" not in info.value.message


# -- client address behind proxies ---------------------------------------------------------


def _nets(*cidrs: str) -> list[Any]:
    import ipaddress

    return [ipaddress.ip_network(c) for c in cidrs]


@pytest.mark.parametrize(
    ("peer", "headers", "trusted", "expected"),
    [
        # No trusted proxies: headers are never believed.
        ("10.0.0.5", {"x-forwarded-for": "1.2.3.4"}, (), "10.0.0.5"),
        # A peer that is not a trusted proxy: ignored too (a client can send anything).
        ("198.51.100.1", {"x-forwarded-for": "1.2.3.4"}, ("10.0.0.0/8",), "198.51.100.1"),
        # Trusted peer: the nearest hop that is not a trusted proxy is the client.
        ("10.0.0.5", {"x-forwarded-for": "1.2.3.4, 5.6.7.8"}, ("10.0.0.0/8",), "5.6.7.8"),
        ("10.0.0.5", {"x-forwarded-for": "1.2.3.4, 10.0.0.9"}, ("10.0.0.0/8",), "1.2.3.4"),
        # Every hop trusted: the leftmost is the best we know.
        ("10.0.0.5", {"x-forwarded-for": "10.0.0.7, 10.0.0.9"}, ("10.0.0.0/8",), "10.0.0.7"),
        # An unreadable hop: no guessing beyond it.
        ("10.0.0.5", {"x-forwarded-for": "1.2.3.4, garbage"}, ("10.0.0.0/8",), "10.0.0.5"),
        # No header from a trusted proxy: the peer.
        ("10.0.0.5", {}, ("10.0.0.0/8",), "10.0.0.5"),
        # RFC 7239 Forwarded, with quotes, ports and IPv6 brackets; preferred over XFF.
        ("10.0.0.5", {"forwarded": 'for="[2001:db8::1]:4711";proto=https, for=10.0.0.8',
                      "x-forwarded-for": "9.9.9.9"}, ("10.0.0.0/8",), "2001:db8::1"),
        ("10.0.0.5", {"forwarded": "for=192.0.2.60:8080;by=10.0.0.5"}, ("10.0.0.0/8",),
         "192.0.2.60"),
        # No peer at all (a unix socket): nothing to trust.
        (None, {"x-forwarded-for": "1.2.3.4"}, ("10.0.0.0/8",), None),
    ],
)  # fmt: skip
def test_client_ip(
    peer: str | None, headers: dict[str, str], trusted: tuple[str, ...], expected: str | None
) -> None:
    assert client_ip(peer, headers, _nets(*trusted)) == expected
