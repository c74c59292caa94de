"""Unit and property tests of config loading and validation (lm-proxy's format, our semantics).

The contract under test: every error is a :class:`ConfigError` naming the dotted key path it is
about; ``env:NAME`` works wherever a string does and a missing variable is an error; TOML, YAML,
JSON and Python files with the same content give equal :class:`Config` objects.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_gateway.config import (
    AnthropicConnection,
    Config,
    CustomConnection,
    EchoConnection,
    GoogleConnection,
    OpenAIConnection,
    apply_env_file,
    build_config,
    load_config,
    read_config_data,
)
from lm_gateway.config.load import EMBEDDED_DEFAULT_NAME, read_env_file
from lm_gateway.config.model import StrategyConnection
from lm_gateway.config.names import (
    BUILTIN_ALLOW_ALL,
    OPENAI_COMPATIBLE_PLATFORMS,
    canonical_name,
    not_supported_reason,
)
from lm_gateway.config.resolve import resolve_extension
from lm_gateway.config.schema import resolve_env_refs
from lm_gateway.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Helpers


def minimal() -> dict[str, Any]:
    """The smallest valid config: one OpenAI connection, a catch-all route, one key."""
    return {
        "connections": {"openai": {"api_key": "sk-upstream"}},
        "routing": {"*": "openai.*"},
        "groups": {"default": {"api_keys": ["sk-client"]}},
    }


def build(data: Mapping[str, Any], **environ: str) -> Config:
    return build_config(data, environ=environ)


def config_error(data: Mapping[str, Any], **environ: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_config(data, environ=environ)
    return info.value


def with_value(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """``minimal()`` with ``value`` set at ``path`` (intermediate tables created as needed)."""
    data = minimal()
    node: Any = data
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    node[path[-1]] = value
    return data


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# The smallest config, and defaults


def test_minimal_config_builds_with_defaults() -> None:
    config = build(minimal())
    conn = config.connections["openai"]
    assert isinstance(conn, OpenAIConnection)
    assert conn.api_base == "https://api.openai.com/v1"
    assert conn.api_key == "sk-upstream"
    assert conn.api_type == "openai"
    assert [(r.pattern, r.connection, r.model) for r in config.routing] == [("*", "openai", None)]
    assert config.groups["default"].api_key_digests == (digest("sk-client"),)
    assert config.groups["default"].allowed_connections is None
    assert config.api_key_check is None
    assert config.enabled is True
    assert config.api_prefix == "/v1"
    assert config.model_listing_mode == "as_is"
    assert config.source == "<dict>"
    assert config.warnings == ()


def test_build_config_does_not_mutate_its_input() -> None:
    data = minimal()
    data["connections"]["openai"]["api_key"] = "env:KEY"
    before = copy.deepcopy(data)
    build(data, KEY="sk-x")
    assert data == before


def test_secrets_are_not_in_repr() -> None:
    data = minimal()
    data["connections"]["openai"]["http_headers"] = {"X-Secret": "hdr-secret"}
    data["encryption_key"] = "salt-secret"
    text = repr(build(data))
    for secret in ("sk-upstream", "hdr-secret", "salt-secret", digest("sk-client")):
        assert secret not in text


# --------------------------------------------------------------------------------------------
# Every error names its dotted key path


def test_unknown_connection_key_suggests_the_right_one() -> None:
    data = minimal()
    data["connections"]["openai"]["api_bsae"] = "https://example.com/v1"
    err = config_error(data)
    assert str(err) == "connections.openai.api_bsae: unknown key (did you mean 'api_base'?)"
    assert err.path == "connections.openai.api_bsae"


def test_unknown_top_level_key_suggests_the_right_one() -> None:
    data = minimal()
    data["hots"] = "0.0.0.0"
    err = config_error(data)
    assert err.path == "hots"
    assert "did you mean 'host'?" in str(err)


def test_lm_proxy_group_typo_connections_is_named() -> None:
    # lm-proxy silently ignored `connections = ...` inside a group (it meant allowed_connections).
    data = minimal()
    data["groups"]["default"]["connections"] = "openai"
    err = config_error(data)
    assert err.path == "groups.default.connections"
    assert "did you mean 'allowed_connections'?" in str(err)


def test_unknown_init_params_key_is_named() -> None:
    err = config_error(with_value(("connections", "openai", "init_params", "organisation"), "o"))
    assert err.path == "connections.openai.init_params.organisation"
    assert "unknown key" in str(err)


def test_unknown_key_far_from_everything_has_no_suggestion() -> None:
    data = minimal()
    data["connections"]["openai"]["zzzzzzzzzzzz"] = 1
    err = config_error(data)
    assert str(err) == "connections.openai.zzzzzzzzzzzz: unknown key"


def test_odd_keys_are_quoted_in_paths() -> None:
    data = minimal()
    data["routing"] = {"gpt-4.1*": "nowhere.*"}
    err = config_error(data)
    assert err.path == 'routing."gpt-4.1*"'


@pytest.mark.parametrize(
    ("path", "value", "error_path", "words"),
    [
        (("port",), "eighty", "port", "expected an integer, got a string"),
        (("port",), True, "port", "expected an integer, got a boolean"),
        (("port",), 8000.5, "port", "expected an integer, got a number"),
        (("port",), 70000, "port", "at most 65535"),
        (("port",), -1, "port", "at least 0"),
        (("host",), 127, "host", "expected a string, got an integer"),
        (("host",), "  ", "host", "must not be empty"),
        (("enabled",), 1, "enabled", "expected true or false, got an integer"),
        (("enabled",), "maybe", "enabled", "expected true or false, got a string"),
        (("api_prefix",), "v1", "api_prefix", "must start with '/'"),
        (("model_listing_mode",), "all", "model_listing_mode", "as_is"),
        (("request_timeout_seconds",), 0, "request_timeout_seconds", "positive"),
        (("request_timeout_seconds",), -3, "request_timeout_seconds", "positive"),
        (("request_timeout_seconds",), "soon", "request_timeout_seconds", "seconds"),
        (("request_timeout_seconds",), [1], "request_timeout_seconds", "got a list"),
        (("max_request_body_bytes",), 10, "max_request_body_bytes", "at least 1024"),
        (("model_info",), [], "model_info", "expected a table, got a list"),
        (("model_info", "gpt-4o"), "big", "model_info.gpt-4o", "expected a table of fields"),
        (("ssl_certfile",), "cert.pem", "ssl_keyfile", "set together"),
        (("print_stream",), True, "print_stream", "not supported"),
        (("connections",), [], "connections", "expected a table, got a list"),
        (("connections",), {}, "connections", "at least one connection"),
        (("connections", "openai"), 42, "connections.openai", "got an integer"),
        (("connections", "openai", "api_key"), 5, "connections.openai.api_key", "a string"),
        (("connections", "openai", "api_type"), 1, "connections.openai.api_type", "a string"),
        (("connections", "openai", "api_base"), "ftp://x", "connections.openai.api_base", "http"),
        (
            ("connections", "openai", "http_headers"),
            ["X-A: 1"],
            "connections.openai.http_headers",
            "expected a table, got a list",
        ),
        (
            ("connections", "openai", "http_headers", "X-A"),
            ["1"],
            "connections.openai.http_headers.X-A",
            "expected a string, got a list",
        ),
        (
            ("connections", "openai", "http_headers", "X-A"),
            True,
            "connections.openai.http_headers.X-A",
            "expected a string, got a boolean",
        ),
        (
            ("connections", "openai", "default_args", "model"),
            "gpt-4o",
            "connections.openai.default_args.model",
            "cannot set a default",
        ),
        (
            ("connections", "openai", "default_args", "stream"),
            True,
            "connections.openai.default_args.stream",
            "cannot set a default",
        ),
        (
            ("connections", "openai", "read_timeout_seconds"),
            0,
            "connections.openai.read_timeout_seconds",
            "positive",
        ),
        (
            ("connections", "openai", "keepalive_expiry_seconds"),
            -1,
            "connections.openai.keepalive_expiry_seconds",
            "zero or more",
        ),
        (
            ("connections", "openai", "max_connections"),
            0,
            "connections.openai.max_connections",
            "at least 1",
        ),
        (
            ("connections", "openai", "http2"),
            "sometimes",
            "connections.openai.http2",
            "true or false",
        ),
        (
            ("connections", "openai", "verify_ssl"),
            3,
            "connections.openai.verify_ssl",
            "CA bundle",
        ),
        (
            ("connections", "openai", "init_params"),
            "x",
            "connections.openai.init_params",
            "expected a table",
        ),
        (
            ("connections", "openai", "init_params", "timeout"),
            "long",
            "connections.openai.init_params.timeout",
            "seconds",
        ),
        (
            ("connections", "openai", "init_params", "max_retries"),
            -1,
            "connections.openai.init_params.max_retries",
            "at least 0",
        ),
        (("routing",), "openai.*", "routing", "expected a table, got a string"),
        (("routing", "gpt"), 5, "routing.gpt", "expected 'connection.model', got an integer"),
        (("groups",), ["default"], "groups", "expected a table, got a list"),
        (("groups", "default"), "sk-1", "groups.default", "expected a table, got a string"),
        (
            ("groups", "default", "api_keys"),
            5,
            "groups.default.api_keys",
            "expected a list of keys",
        ),
        (
            ("groups", "default", "api_keys"),
            ["sk-1", 7],
            "groups.default.api_keys[1]",
            "expected a string key, got an integer",
        ),
        (
            ("groups", "default", "allowed_connections"),
            5,
            "groups.default.allowed_connections",
            "comma-separated",
        ),
        (
            ("groups", "default", "allowed_connections"),
            ["openai", 5],
            "groups.default.allowed_connections[1]",
            "expected a string",
        ),
        (("api_key_check",), 5, "api_key_check", "got an integer"),
        (("api_key_check",), " ", "api_key_check", "empty"),
        (("api_key_check",), {"group": "x"}, "api_key_check", "needs a 'class' key"),
    ],
)
def test_wrong_values_name_their_path(
    path: tuple[str, ...], value: Any, error_path: str, words: str
) -> None:
    err = config_error(with_value(path, value))
    assert err.path == error_path
    assert words in err.message
    assert str(err).startswith(f"{error_path}: ")


@pytest.mark.parametrize("value", [math.nan, "nan", "NaN"])
def test_nan_timeouts_are_rejected(value: Any) -> None:
    # A NaN deadline compares false with everything: it passes "positive" checks but is no
    # deadline at all (and trio refuses it at request time).
    err = config_error(with_value(("connections", "openai", "read_timeout_seconds"), value))
    assert err.path == "connections.openai.read_timeout_seconds"


def test_strings_from_env_are_converted_for_typed_keys() -> None:
    data = minimal()
    data.update(port="env:PORT", enabled="env:ENABLED", request_timeout_seconds="env:T")
    data["connections"]["openai"].update(http2="env:H2", verify_ssl="env:VERIFY")
    config = build(data, PORT="8080", ENABLED="off", T="12.5", H2="yes", VERIFY="false")
    assert config.port == 8080
    assert config.enabled is False
    assert config.request_timeout_seconds == 12.5
    conn = config.connections["openai"]
    assert isinstance(conn, OpenAIConnection)
    assert conn.http2 is True
    assert conn.verify_ssl is False


def test_verify_ssl_accepts_a_ca_bundle_path() -> None:
    config = build(with_value(("connections", "openai", "verify_ssl"), "/etc/ca.pem"))
    assert config.connections["openai"].verify_ssl == "/etc/ca.pem"  # type: ignore[union-attr]


def test_ssl_files_together_are_fine() -> None:
    data = minimal()
    data.update(ssl_certfile="c.pem", ssl_keyfile="k.pem")
    config = build(data)
    assert (config.ssl_certfile, config.ssl_keyfile) == ("c.pem", "k.pem")


def test_connection_names_cannot_contain_a_dot() -> None:
    data = minimal()
    data["connections"]["open.ai"] = {"api_key": "k"}
    err = config_error(data)
    assert err.path == 'connections."open.ai"'


def test_api_prefix_is_normalised() -> None:
    assert build(with_value(("api_prefix",), "/api/v2/")).api_prefix == "/api/v2"
    assert build(with_value(("api_prefix",), "")).api_prefix == ""


# --------------------------------------------------------------------------------------------
# env: references


def test_env_refs_anywhere_a_string_is_allowed() -> None:
    data = {
        "host": "env:HOST",
        "connections": {
            "openai": {
                "api_base": "env:BASE",
                "api_key": "env:UPSTREAM",
                "http_headers": {"X-Org": "env:ORG"},
                "default_args": {"metadata": {"team": "env:TEAM"}, "stop": ["env:STOP"]},
            }
        },
        "routing": {"*": "env:TARGET"},
        "groups": {"default": {"api_keys": ["env:K1", "literal"], "allowed_connections": "env:AC"}},
        "model_info": {"gpt": {"owner": "env:OWNER"}},
    }
    config = build(
        data,
        HOST="10.0.0.1",
        BASE="https://llm.internal/v1/",
        UPSTREAM="sk-up",
        ORG="org-7",
        TEAM="blue",
        STOP="###",
        TARGET="openai.gpt-4o",
        K1="sk-one",
        AC="openai",
        OWNER="me",
    )
    conn = config.connections["openai"]
    assert isinstance(conn, OpenAIConnection)
    assert config.host == "10.0.0.1"
    assert conn.api_base == "https://llm.internal/v1"
    assert conn.api_key == "sk-up"
    assert conn.http_headers == {"X-Org": "org-7"}
    assert conn.default_args == {"metadata": {"team": "blue"}, "stop": ["###"]}
    assert config.routing[0].model == "gpt-4o"
    assert config.groups["default"].api_key_digests == (digest("sk-one"), digest("literal"))
    assert config.groups["default"].allowed_connections == frozenset({"openai"})
    assert config.model_info == {"gpt": {"owner": "me"}}


@pytest.mark.parametrize(
    ("path", "error_path"),
    [
        (("connections", "openai", "api_key"), "connections.openai.api_key"),
        (
            ("connections", "openai", "http_headers", "X-Org"),
            "connections.openai.http_headers.X-Org",
        ),
        (
            ("connections", "openai", "default_args", "metadata", "deep"),
            "connections.openai.default_args.metadata.deep",
        ),
        (("groups", "default", "api_keys", 0), "groups.default.api_keys[0]"),
        (("routing", "*"), 'routing."*"'),
        (("host",), "host"),
    ],
)
def test_missing_env_var_names_the_key_path(path: tuple[str | int, ...], error_path: str) -> None:
    err = config_error(with_value(path, "env:NOT_SET_ANYWHERE"))
    assert err.path == error_path
    assert "NOT_SET_ANYWHERE" in err.message


def test_env_ref_name_is_whole_string_and_stripped() -> None:
    # Only a whole value is a reference: no interpolation inside strings.
    assert resolve_env_refs({"a": "x env:A"}, {"A": "1"}) == {"a": "x env:A"}
    assert resolve_env_refs({"a": "env: A "}, {"A": "1"}) == {"a": "1"}
    with pytest.raises(ConfigError) as info:
        resolve_env_refs({"a": {"b": "env:"}}, {})
    assert info.value.path == "a.b"


def test_env_values_are_not_resolved_again() -> None:
    assert resolve_env_refs({"a": "env:A"}, {"A": "env:B", "B": "no"}) == {"a": "env:B"}


def test_env_refs_in_tuples_become_lists() -> None:
    assert resolve_env_refs({"a": ("env:A", 1)}, {"A": "x"}) == {"a": ["x", 1]}


def test_empty_env_var_as_group_key_is_rejected() -> None:
    err = config_error(
        with_value(("groups", "default", "api_keys"), ["env:CLIENT_KEY"]), CLIENT_KEY=""
    )
    assert err.path == "groups.default.api_keys[0]"
    assert "empty" in err.message


def test_whitespace_env_var_as_group_key_is_rejected() -> None:
    err = config_error(with_value(("groups", "default", "api_keys"), ["env:K"]), K="  ")
    assert err.path == "groups.default.api_keys[0]"


def test_empty_env_var_as_single_string_group_key_is_rejected() -> None:
    err = config_error(with_value(("groups", "default", "api_keys"), "env:K"), K="")
    assert err.path is not None
    assert err.path.startswith("groups.default.api_keys")


@pytest.mark.parametrize("key", ["api_key", "openai_api_key"])
def test_empty_env_var_as_upstream_api_key_is_rejected(key: str) -> None:
    data = minimal()
    del data["connections"]["openai"]["api_key"]
    data["connections"]["openai"][key] = "env:OPENAI_API_KEY"
    err = config_error(data, OPENAI_API_KEY="")
    assert err.path == f"connections.openai.{key}"


def test_whitespace_env_var_as_upstream_api_key_is_rejected() -> None:
    err = config_error(with_value(("connections", "openai", "api_key"), "env:K"), K=" ")
    assert err.path == "connections.openai.api_key"


def test_no_upstream_api_key_is_allowed() -> None:
    # Local servers (vLLM, Ollama) take no key; no silent fallback to OPENAI_API_KEY either.
    data = minimal()
    del data["connections"]["openai"]["api_key"]
    config = build_config(data, environ={"OPENAI_API_KEY": "sk-from-env"})
    assert config.connections["openai"].api_key is None  # type: ignore[union-attr]


# A property: for arbitrary nested data with random env: references, resolve_env_refs either
# fails naming the path of a bad reference, or replaces every reference and nothing else.

_VAR_NAMES = st.text(alphabet="ABC", min_size=1, max_size=2)
_KEYS = st.text(alphabet='ab_.-*["', max_size=3)
_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(alphabet="env:AB ", max_size=6),
    _VAR_NAMES.map(lambda n: f"env:{n}"),
    _VAR_NAMES.map(lambda n: f"env: {n} "),
    st.just("env:"),
)
_NESTED = st.recursive(
    _LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=4)
    ),
    max_leaves=20,
)
_ENVIRON = st.dictionaries(_VAR_NAMES, st.text(alphabet="xyz-", max_size=4), max_size=6)


def parse_path(path: str) -> list[str | int]:
    """Split ``a."b.c"[2].d`` into ``["a", "b.c", 2, "d"]`` (written independently of the code)."""
    parts: list[str | int] = []
    i = 0
    while i < len(path):
        char = path[i]
        if char == ".":
            i += 1
        elif char == "[":
            end = path.index("]", i)
            parts.append(int(path[i + 1 : end]))
            i = end + 1
        elif char == '"':
            i += 1
            buf = []
            while path[i] != '"':
                if path[i] == "\\" and path[i + 1] == '"':
                    buf.append('"')
                    i += 2
                else:
                    buf.append(path[i])
                    i += 1
            parts.append("".join(buf))
            i += 1
        else:
            end = i
            while end < len(path) and path[end] not in ".[":
                end += 1
            parts.append(path[i:end])
            i = end
    return parts


def leaves(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in leaves(v, (*prefix, k))]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in leaves(v, (*prefix, i))]
    return [(prefix, value)]


def _attempt_resolve(data: Any, environ: dict[str, str]) -> tuple[Any, ConfigError | None]:
    try:
        return resolve_env_refs(data, environ), None
    except ConfigError as exc:
        return None, exc


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(_KEYS, _NESTED, max_size=4), environ=_ENVIRON)
def test_resolve_env_refs_property(data: dict[str, Any], environ: dict[str, str]) -> None:
    result, exc = _attempt_resolve(data, environ)
    if exc is not None:
        assert exc.path is not None
        node: Any = data
        for part in parse_path(exc.path):
            node = node[part]
        assert isinstance(node, str)
        assert node.startswith("env:")
        name = node[len("env:") :].strip()
        assert not name or name not in environ
        if name:
            assert repr(name) in exc.message
        return
    before = leaves(data)
    after = leaves(result)
    assert [p for p, _ in before] == [p for p, _ in after]
    for (_, old), (_, new) in zip(before, after, strict=True):
        if isinstance(old, str) and old.startswith("env:"):
            assert new == environ[old[len("env:") :].strip()]
            assert not new.startswith("env:")
        else:
            assert new == old
            assert type(new) is type(old)


# --------------------------------------------------------------------------------------------
# Connections: api types, platforms, lm-proxy's init_params, warnings


@pytest.mark.parametrize(
    ("api_type", "words"),
    [
        ("azure", "api_type = 'openai'"),
        ("function", "not supported"),
    ],
)
def test_non_openai_api_types_are_not_supported_yet(api_type: str, words: str) -> None:
    err = config_error(with_value(("connections", "openai", "api_type"), api_type))
    assert err.path == "connections.openai.api_type"
    assert words in err.message
    assert repr(api_type) in err.message


def test_unknown_api_type_lists_the_supported_ones() -> None:
    err = config_error(with_value(("connections", "openai", "api_type"), "opneai"))
    assert err.path == "connections.openai.api_type"
    assert "unknown api_type 'opneai'" in err.message
    assert "groq" in err.message
    assert "echo" in err.message


@pytest.mark.parametrize("platform", sorted(OPENAI_COMPATIBLE_PLATFORMS))
def test_openai_compatible_platforms_get_their_default_base(platform: str) -> None:
    conn = build(with_value(("connections", "openai", "api_type"), platform)).connections["openai"]
    assert isinstance(conn, OpenAIConnection)
    assert conn.api_base == OPENAI_COMPATIBLE_PLATFORMS[platform].rstrip("/")
    assert conn.api_base.startswith("https://")


def test_groq_default_base_and_explicit_base_wins() -> None:
    conn = build(with_value(("connections", "openai", "api_type"), "groq")).connections["openai"]
    assert conn.api_base == "https://api.groq.com/openai/v1"  # type: ignore[union-attr]
    data = with_value(("connections", "openai", "api_type"), "GROQ")
    data["connections"]["openai"]["api_base"] = "http://localhost:9000/v1/"
    conn = build(data).connections["openai"]
    assert conn.api_base == "http://localhost:9000/v1"  # type: ignore[union-attr]
    assert conn.api_type == "groq"


def test_lm_proxy_provider_named_keys() -> None:
    data = minimal()
    data["connections"]["openai"] = {
        "openai_api_key": "sk-named",
        "openai_api_base": "https://proxy.example/v1",
    }
    conn = build(data).connections["openai"]
    assert isinstance(conn, OpenAIConnection)
    assert (conn.api_key, conn.api_base) == ("sk-named", "https://proxy.example/v1")


def test_init_params_map_onto_our_keys() -> None:
    data = minimal()
    data["connections"]["openai"].update(
        http_headers={"X-A": "1"},
        init_params={
            "timeout": 30,
            "max_retries": 0,
            "default_headers": {"X-B": "2"},
            "base_url": "https://other.example/v1",
            "api_key": "sk-init",
        },
    )
    conn = build(data).connections["openai"]
    assert isinstance(conn, OpenAIConnection)
    assert conn.request_timeout_seconds == 30.0
    assert conn.http_headers == {"X-A": "1", "X-B": "2"}
    assert conn.api_base == "https://other.example/v1"
    assert conn.api_key == "sk-init"


def test_init_params_retries_become_max_retries() -> None:
    config = build(with_value(("connections", "openai", "init_params", "max_retries"), 2))
    conn = config.connections["openai"]
    assert isinstance(conn, OpenAIConnection)
    assert conn.resilience.max_retries == 2


def test_model_key_in_a_connection_is_a_warning() -> None:
    config = build(with_value(("connections", "openai", "model"), "gpt-4o"))
    assert len(config.warnings) == 1
    assert config.warnings[0].startswith("connections.openai.model: ")


def test_model_key_in_an_echo_connection_is_a_warning() -> None:
    data = minimal()
    data["connections"]["echo"] = {"api_type": "echo", "model": "x"}
    config = build(data)
    assert any(w.startswith("connections.echo.model: ") for w in config.warnings)
    assert isinstance(config.connections["echo"], EchoConnection)


def test_no_routing_rules_is_a_warning_not_an_error() -> None:
    data = minimal()
    del data["routing"]
    config = build(data)
    assert config.routing == ()
    assert any(w.startswith("routing") for w in config.warnings)


def test_echo_connection_rejects_openai_keys() -> None:
    data = minimal()
    data["connections"]["echo"] = {"api_type": "echo", "api_key": "x"}
    err = config_error(data)
    assert err.path == "connections.echo.api_key"


def test_connection_as_dotted_path_or_class_table() -> None:
    data = minimal()
    data["connections"]["mine"] = "my_pkg.llm.call"
    data["connections"]["cls"] = {"class": "my_pkg.llm.Client", "size": 3}
    config = build(data)
    mine = config.connections["mine"]
    cls = config.connections["cls"]
    assert isinstance(mine, CustomConnection)
    assert mine.ref.import_path == "my_pkg.llm.call"
    assert mine.ref.instantiate is False
    assert isinstance(cls, CustomConnection)
    assert cls.ref.import_path == "my_pkg.llm.Client"
    assert cls.ref.params == {"size": 3}
    assert cls.ref.instantiate is True
    assert cls.ref.config_path == "connections.cls"


# --------------------------------------------------------------------------------------------
# Routing section


def test_routing_keeps_file_order_and_splits_on_first_dot() -> None:
    data = minimal()
    data["routing"] = {
        "gpt-4.1": "openai.gpt-4.1-2025-04-14",
        "gpt*": " openai.* ",
        "*": "openai.gpt-4o-mini",
    }
    rules = build(data).routing
    assert [(r.pattern, r.connection, r.model, r.index) for r in rules] == [
        ("gpt-4.1", "openai", "gpt-4.1-2025-04-14", 0),
        ("gpt*", "openai", None, 1),
        ("*", "openai", "gpt-4o-mini", 2),
    ]


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("openai", "'connection.model'"),
        ("openai.", "'connection.model'"),
        (".gpt-4o", "'connection.model'"),
        ("anthropic.*", "undefined connection 'anthropic' (defined: openai)"),
        ("openai.gpt-*", "must be a model name or '*'"),
        ("openai.gpt-4?", "must be a model name or '*'"),
        ("openai.gpt-[45]", "must be a model name or '*'"),
    ],
)
def test_bad_routing_targets(target: str, words: str) -> None:
    data = minimal()
    data["routing"] = {"gpt-4o": "openai.*", "claude*": target}
    err = config_error(data)
    assert err.path == 'routing."claude*"'
    assert words in err.message


def test_empty_routing_pattern_is_rejected() -> None:
    data = minimal()
    data["routing"] = {"": "openai.*"}
    err = config_error(data)
    assert err.path == 'routing.""'


# --------------------------------------------------------------------------------------------
# Groups and keys


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        ("*", None),
        (" * ", None),
        (None, None),
        ("a, b", frozenset({"a", "b"})),
        ("a,b,", frozenset({"a", "b"})),
        (["a", " b "], frozenset({"a", "b"})),
        (["a", "*"], None),
        ("", frozenset()),
        ([], frozenset()),
    ],
)
def test_allowed_connections_forms(allowed: Any, expected: frozenset[str] | None) -> None:
    data = minimal()
    data["connections"] = {"a": {"api_key": "x"}, "b": {"api_key": "y"}}
    data["routing"] = {"*": "a.*"}
    if allowed is not None:
        data["groups"]["default"]["allowed_connections"] = allowed
    group = build(data).groups["default"]
    assert group.allowed_connections == expected
    if expected is None:
        assert group.allows_connection("a")
        assert group.allows_connection("anything")
    else:
        assert group.allows_connection("a") == ("a" in expected)
        assert not group.allows_connection("c")


@pytest.mark.parametrize("allowed", ["openai, anthropic", ["openai", "anthropic"]])
def test_allowed_connections_names_unknown_connection(allowed: Any) -> None:
    err = config_error(with_value(("groups", "default", "allowed_connections"), allowed))
    assert err.path == "groups.default.allowed_connections"
    assert "'anthropic'" in err.message
    assert "openai" in err.message  # the defined ones are listed


def test_allowed_models_are_kept_as_globs() -> None:
    group = build(with_value(("groups", "default", "allowed_models"), "gpt-4o*, o3")).groups[
        "default"
    ]
    assert group.allowed_models == ("gpt-4o*", "o3")
    group = build(minimal()).groups["default"]
    assert group.allowed_models is None


def test_duplicate_key_across_groups_is_rejected() -> None:
    data = minimal()
    data["groups"] = {"a": {"api_keys": ["k1", "k2"]}, "b": {"api_keys": ["k3", "k2"]}}
    err = config_error(data)
    assert err.path == "groups.b.api_keys[1]"
    assert "'a'" in err.message


def test_duplicate_key_plain_and_hashed_is_rejected() -> None:
    data = minimal()
    data["groups"] = {"a": {"api_keys": ["k1"]}, "b": {"api_keys": [f"sha256:{digest('k1')}"]}}
    err = config_error(data)
    assert err.path == "groups.b.api_keys[0]"


def test_duplicate_key_via_env_is_rejected() -> None:
    data = minimal()
    data["groups"] = {"a": {"api_keys": ["env:K"]}, "b": {"api_keys": ["sk-same"]}}
    err = config_error(data, K="sk-same")
    assert err.path == "groups.b.api_keys[0]"


def test_sha256_keys_are_stored_as_digests() -> None:
    hex_upper = digest("sk-secret").upper()
    data = with_value(("groups", "default", "api_keys"), [f"sha256:{hex_upper}", "plain"])
    group = build(data).groups["default"]
    assert group.api_key_digests == (digest("sk-secret"), digest("plain"))


def test_malformed_sha256_key_is_treated_as_a_plain_key() -> None:
    # Not 64 hex digits: it is a (strange) plain key, hashed like any other.
    data = with_value(("groups", "default", "api_keys"), ["sha256:abc"])
    assert build(data).groups["default"].api_key_digests == (digest("sha256:abc"),)


def test_no_keys_with_the_default_check_is_an_error() -> None:
    data = minimal()
    data["groups"] = {"default": {"api_keys": []}, "other": {}}
    err = config_error(data)
    assert err.path == "groups"
    assert "AllowAll" in err.message


def test_no_groups_at_all_with_the_default_check_is_an_error() -> None:
    data = minimal()
    del data["groups"]
    assert config_error(data).path == "groups"


@pytest.mark.parametrize(
    "check",
    [
        "lm_proxy.api_key_check.check_api_key_in_config",
        "check_api_key_in_config",
        {"class": "lm_proxy.api_key_check.check_api_key_in_config"},
    ],
)
def test_naming_the_default_check_explicitly_still_requires_keys(check: Any) -> None:
    data = minimal()
    data["api_key_check"] = check
    data["groups"] = {"default": {}}
    assert config_error(data).path == "groups"
    data["groups"] = {"default": {"api_keys": ["k"]}}
    assert build(data).api_key_check is None


@pytest.mark.parametrize(
    "check",
    [
        "AllowAll",
        "lm_proxy.api_key_check.AllowAll",
        "lm_proxy.api_key_check.allow_all.AllowAll",
        {"class": "lm_proxy.api_key_check.AllowAll", "capture_api_key": False},
    ],
)
def test_no_keys_is_fine_with_allow_all(check: Any) -> None:
    data = minimal()
    del data["groups"]
    data["api_key_check"] = check
    config = build(data)
    assert config.api_key_check is not None
    assert config.api_key_check.import_path == BUILTIN_ALLOW_ALL
    assert config.api_key_check.config_path == "api_key_check"
    assert list(config.groups) == ["default"]  # lm-proxy's implicit default group


def test_allow_all_alias_resolves_to_our_class() -> None:
    from lm_gateway.auth import AllowAll

    data = minimal()
    data["api_key_check"] = {"class": "lm_proxy.api_key_check.AllowAll", "group": "default"}
    ref = build(data).api_key_check
    assert ref is not None
    check = resolve_extension(ref)
    assert isinstance(check, AllowAll)
    assert check.group == "default"


def test_custom_key_check_needs_no_keys() -> None:
    data = minimal()
    data["groups"] = {"default": {}}
    data["api_key_check"] = "my_pkg.auth.check"
    config = build(data)
    assert config.api_key_check is not None
    assert config.api_key_check.import_path == "my_pkg.auth.check"


# --------------------------------------------------------------------------------------------
# Names: lm-proxy spellings and "not supported yet"


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("lm_proxy.api_key_check.AllowAll", "lm_gateway.auth.AllowAll"),
        ("lm_proxy.api_key_check.allow_all.AllowAll", "lm_gateway.auth.AllowAll"),
        ("lm_proxy.somewhere.else.AllowAll", "lm_gateway.auth.AllowAll"),
        ("AllowAll", "lm_gateway.auth.AllowAll"),
        (
            "lm_proxy.api_key_check.check_api_key_in_config",
            "lm_gateway.auth.check_api_key_in_config",
        ),
        ("my_pkg.AllowAll", "my_pkg.AllowAll"),
        ("my_pkg.checks.validate", "my_pkg.checks.validate"),
    ],
)
def test_canonical_names(name: str, ours: str) -> None:
    assert canonical_name(name) == ours


@pytest.mark.parametrize(
    "name",
    [
        "lm_proxy_db_connector.DBLogger",
    ],
)
def test_not_supported_yet_names(name: str) -> None:
    reason = not_supported_reason(name)
    assert reason is not None
    assert "not supported" in reason


def test_user_classes_with_builtin_names_are_not_rejected() -> None:
    assert not_supported_reason("my_pkg.RateLimiter") is None
    assert not_supported_reason("my_pkg.strategies.Fallback") is None


@pytest.mark.parametrize(
    "check",
    [
        {"class": "lm_proxy.api_key_check.CheckAPIKeyWithRequest", "url": "https://idp/{api_key}"},
        {"class": "CheckAPIKeyWithRequest", "url": "https://idp/"},
        {"class": "lm_gateway.handlers.CheckAPIKeyWithRequest", "url": "https://idp/"},
    ],
)
def test_check_api_key_with_request_resolves_to_ours(check: Any) -> None:
    config = build(with_value(("api_key_check",), check))
    assert config.api_key_check is not None
    assert config.api_key_check.import_path in (
        "lm_gateway.handlers.keycheck.CheckAPIKeyWithRequest",
        "lm_gateway.handlers.CheckAPIKeyWithRequest",
    )


def test_lm_proxy_fallback_connection_becomes_a_strategy() -> None:
    data = minimal()
    data["connections"]["fb"] = {
        "class": "lm_proxy.strategies.Fallback",
        "connections": ["openai.gpt-4o", {"openai": {"temperature": 0}}],
    }
    conn = build(data).connections["fb"]
    assert isinstance(conn, StrategyConnection)
    assert [(t.connection, t.model, dict(t.params)) for t in conn.targets] == [
        ("openai", "gpt-4o", {}),
        ("openai", None, {"temperature": 0}),
    ]


def test_before_handlers_resolve_lm_proxy_names() -> None:
    data = minimal()
    data["before"] = [
        {"class": "lm_proxy.handlers.RateLimiter", "max_requests": 10},
        "lm_proxy.handlers.HTTPHeadersForwarder",
        "my_pkg.handlers.audit",
    ]
    config = build(data)
    assert [ref.import_path for ref in config.before] == [
        "lm_gateway.handlers.RateLimiter",
        "lm_gateway.handlers.HTTPHeadersForwarder",
        "my_pkg.handlers.audit",
    ]
    assert config.before[0].params == {"max_requests": 10}
    assert config.before[0].config_path == "before[0]"


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("loggers", ["lm_proxy_db_connector.DBLogger"], "DBLogger is not supported"),
        ("components", {"db": {"class": "my_pkg.init"}}, "components are not supported yet"),
    ],
)
def test_later_features_non_empty_are_not_supported_yet(key: str, value: Any, words: str) -> None:
    err = config_error(with_value((key,), value))
    assert err.path is not None
    assert err.path == key or err.path.startswith(f"{key}[")
    assert words in err.message


@pytest.mark.parametrize(("key", "value"), [("before", []), ("loggers", []), ("components", {})])
def test_later_features_empty_are_fine(key: str, value: Any) -> None:
    assert isinstance(build(with_value((key,), value)), Config)


# --------------------------------------------------------------------------------------------
# Files: formats, BOM, syntax errors, .env


_HASHED = digest("sk-hashed")

#: One config, the same in every format below.
SAME_DATA: dict[str, Any] = {
    "host": "0.0.0.0",
    "port": 8080,
    "api_prefix": "/api/v1/",
    "model_listing_mode": "ignore_wildcards",
    "api_key_check": "lm_proxy.api_key_check.check_api_key_in_config",
    "connections": {
        "openai": {
            "api_type": "open_ai",
            "api_base": "https://api.openai.com/v1/",
            "api_key": "env:OPENAI_API_KEY",
            "model": "gpt-4o",
            "http_headers": {"OpenAI-Organization": "org-1"},
            "default_args": {"temperature": 0.5, "max_tokens": 100, "stop": ["\n\n"]},
            "init_params": {"timeout": 30, "max_retries": 0},
        },
        "groq": {"api_type": "groq", "api_key": "env:GROQ_API_KEY", "http2": True},
        "echo": {"api_type": "echo", "chunk_delay_seconds": 0.25},
        "mine": {"class": "my_pkg.llm.Client", "size": 3},
    },
    "routing": {
        "gpt*": "openai.*",
        "fast": "groq.llama-3.1-8b-instant",
        "gpt-4.1": "openai.gpt-4.1",
        "*": "echo.*",
    },
    "groups": {
        "admin": {"api_keys": ["sk-admin", f"sha256:{_HASHED}"], "allowed_connections": "*"},
        "users": {
            "api_keys": ["env:USER_KEY"],
            "allowed_connections": "openai, groq",
            "allowed_models": ["gpt-4o*", "fast"],
        },
    },
    "model_info": {"fast": {"owned_by": "groq", "context_length": 131072}},
}

SAME_TOML = f"""\
host = "0.0.0.0"
port = 8080
api_prefix = "/api/v1/"
model_listing_mode = "ignore_wildcards"
api_key_check = "lm_proxy.api_key_check.check_api_key_in_config"

[connections]
[connections.openai]
api_type = "open_ai"
api_base = "https://api.openai.com/v1/"
api_key = "env:OPENAI_API_KEY"
model = "gpt-4o"
http_headers = {{ "OpenAI-Organization" = "org-1" }}
default_args = {{ temperature = 0.5, max_tokens = 100, stop = ["\\n\\n"] }}
init_params = {{ timeout = 30, max_retries = 0 }}

[connections.groq]
api_type = "groq"
api_key = "env:GROQ_API_KEY"
http2 = true

[connections.echo]
api_type = "echo"
chunk_delay_seconds = 0.25

[connections.mine]
class = "my_pkg.llm.Client"
size = 3

[routing]
"gpt*" = "openai.*"
fast = "groq.llama-3.1-8b-instant"
"gpt-4.1" = "openai.gpt-4.1"
"*" = "echo.*"  # catch-all

[groups.admin]
api_keys = ["sk-admin", "sha256:{_HASHED}"]
allowed_connections = "*"

[groups.users]
api_keys = ["env:USER_KEY"]
allowed_connections = "openai, groq"
allowed_models = ["gpt-4o*", "fast"]

[model_info.fast]
owned_by = "groq"
context_length = 131072
"""

SAME_YAML = f"""\
host: 0.0.0.0
port: 8080
api_prefix: /api/v1/
model_listing_mode: ignore_wildcards
api_key_check: lm_proxy.api_key_check.check_api_key_in_config
connections:
  openai:
    api_type: open_ai
    api_base: https://api.openai.com/v1/
    api_key: "env:OPENAI_API_KEY"
    model: gpt-4o
    http_headers:
      OpenAI-Organization: org-1
    default_args: {{temperature: 0.5, max_tokens: 100, stop: ["\\n\\n"]}}
    init_params:
      timeout: 30
      max_retries: 0
  groq:
    api_type: groq
    api_key: env:GROQ_API_KEY
    http2: true
  echo:
    api_type: echo
    chunk_delay_seconds: 0.25
  mine:
    class: my_pkg.llm.Client
    size: 3
routing:
  "gpt*": openai.*
  fast: groq.llama-3.1-8b-instant
  gpt-4.1: openai.gpt-4.1
  "*": echo.*   # catch-all
groups:
  admin:
    api_keys:
      - sk-admin
      - sha256:{_HASHED}
    allowed_connections: "*"
  users:
    api_keys: ["env:USER_KEY"]
    allowed_connections: openai, groq
    allowed_models: [gpt-4o*, fast]
model_info:
  fast: {{owned_by: groq, context_length: 131072}}
"""

SAME_ENV = {"OPENAI_API_KEY": "sk-openai", "GROQ_API_KEY": "sk-groq", "USER_KEY": "sk-user"}


def write(tmp_path: Path, name: str, text: str, *, bom: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


@pytest.fixture
def same_files(tmp_path: Path) -> dict[str, Path]:
    return {
        "toml": write(tmp_path, "config.toml", SAME_TOML),
        "yaml": write(tmp_path, "config.yaml", SAME_YAML),
        "json": write(tmp_path, "config.json", json.dumps(SAME_DATA, indent=2)),
        "py": write(tmp_path, "config.py", f"config = {SAME_DATA!r}\n"),
    }


def test_every_format_reads_the_same_tables(same_files: dict[str, Path]) -> None:
    for path in same_files.values():
        assert read_config_data(path) == SAME_DATA, path.name


def test_toml_tables_are_plain_python_values(same_files: dict[str, Path]) -> None:
    data = read_config_data(same_files["toml"])
    assert type(data) is dict
    assert type(data["connections"]) is dict
    assert type(data["host"]) is str
    assert type(data["groups"]["admin"]["api_keys"]) is list


def test_every_format_gives_an_equal_config(same_files: dict[str, Path]) -> None:
    expected = build_config(SAME_DATA, environ=SAME_ENV, source="x")
    for path in same_files.values():
        config = load_config(path, environ=SAME_ENV)
        assert config.source == str(path)
        assert attrs.evolve(config, source="x") == expected, path.name


def test_the_shared_config_means_what_it_says(same_files: dict[str, Path]) -> None:
    config = load_config(same_files["toml"], environ=SAME_ENV)
    openai = config.connections["openai"]
    assert isinstance(openai, OpenAIConnection)
    assert openai.api_base == "https://api.openai.com/v1"
    assert openai.api_key == "sk-openai"
    assert openai.request_timeout_seconds == 30.0
    assert openai.default_args == {"temperature": 0.5, "max_tokens": 100, "stop": ["\n\n"]}
    groq = config.connections["groq"]
    assert isinstance(groq, OpenAIConnection)
    assert groq.api_base == "https://api.groq.com/openai/v1"
    assert groq.http2 is True
    assert config.connections["echo"] == EchoConnection(name="echo", chunk_delay_seconds=0.25)
    assert [r.pattern for r in config.routing] == ["gpt*", "fast", "gpt-4.1", "*"]
    assert config.groups["admin"].api_key_digests == (digest("sk-admin"), _HASHED)
    assert config.groups["users"].allowed_connections == frozenset({"openai", "groq"})
    assert config.api_prefix == "/api/v1"
    assert config.port == 8080
    assert config.api_key_check is None
    assert config.warnings == ("connections.openai.model: ignored (routing rules pick the model)",)


@pytest.mark.parametrize("name", ["config.toml", "config.yaml", "config.yml", "config.json"])
def test_a_bom_is_tolerated(tmp_path: Path, name: str) -> None:
    text = {
        ".toml": 'api_key_check = "AllowAll"\n[connections.e]\napi_type = "echo"\n',
        ".yaml": "api_key_check: AllowAll\nconnections:\n  e:\n    api_type: echo\n",
        ".yml": "api_key_check: AllowAll\nconnections:\n  e:\n    api_type: echo\n",
        ".json": '{"api_key_check": "AllowAll", "connections": {"e": {"api_type": "echo"}}}',
    }[Path(name).suffix]
    path = write(tmp_path, name, text, bom=True)
    data = read_config_data(path)
    assert list(data) == ["api_key_check", "connections"]
    assert load_config(path, environ={}).connections["e"] == EchoConnection(name="e")


def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path, "CONFIG.TOML", '[connections.e]\napi_type = "echo"\n')
    assert read_config_data(path) == {"connections": {"e": {"api_type": "echo"}}}


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("bad.toml", 'host = "x"\nport = = 1\n', ["line 2", "col"]),
        ("bad.yaml", "a: 1\nb: [1, 2\nc: 3\n", ["line 3", "column"]),
        ("bad.json", '{\n  "a": 1,\n  "b": }\n', ["line 3", "column 8"]),
        ("bad.py", "x = 1\nconfig = (\n", ["line 2"]),
    ],
)
def test_syntax_errors_name_line_and_column(
    tmp_path: Path, name: str, text: str, where: list[str]
) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        read_config_data(path)
    message = str(info.value)
    assert str(path) in message
    for words in where:
        assert words in message


@pytest.mark.parametrize(
    "text",
    [
        "port = 1\nport = 2\n",
        '[routing]\n"a" = "x.*"\n"a" = "y.*"\n',
        "[groups.a]\napi_keys = []\n[groups.a]\napi_keys = []\n",
    ],
    ids=["top-level", "inside-a-table", "table-twice"],
)
def test_toml_duplicate_key_is_a_config_error(tmp_path: Path, text: str) -> None:
    # A repeated routing pattern would otherwise silently change which rule wins.
    path = write(tmp_path, "dup.toml", text)
    with pytest.raises(ConfigError) as info:
        read_config_data(path)
    assert str(path) in str(info.value)


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\.toml"):
        read_config_data(write(tmp_path, "config.ini", "[x]\n"))
    with pytest.raises(ConfigError, match="not found"):
        read_config_data(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml", environ={})


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("list.json", "[1, 2]"),
        ("scalar.yaml", "just text\n"),
        ("empty.yaml", ""),
        ("l.py", "config = [1]\n"),
    ],
)
def test_top_level_must_be_a_table(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(ConfigError, match="top level must be a table"):
        read_config_data(write(tmp_path, name, text))


def test_python_config_without_config_or_raising(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must define 'config'"):
        read_config_data(write(tmp_path, "none.py", "settings = {}\n"))
    with pytest.raises(ConfigError, match="ZeroDivisionError"):
        read_config_data(write(tmp_path, "boom.py", "config = {'a': 1 / 0}\n"))


def test_python_config_can_hold_live_objects(tmp_path: Path) -> None:
    text = (
        "async def call(messages, **params):\n"
        "    return 'hi'\n"
        "\n"
        "class Check:\n"
        "    def __call__(self, api_key):\n"
        "        return 'default'\n"
        "\n"
        "config = {\n"
        "    'connections': {'mine': call},\n"
        "    'routing': {'*': 'mine.*'},\n"
        "    'api_key_check': Check(),\n"
        "    'groups': {'default': {'api_keys': ['env:K']}},\n"
        "}\n"
    )
    config = load_config(write(tmp_path, "live.py", text), environ={"K": "sk-py"})
    conn = config.connections["mine"]
    assert isinstance(conn, CustomConnection)
    assert callable(conn.ref.obj)
    assert getattr(conn.ref.obj, "__name__", None) == "call"
    assert config.api_key_check is not None
    assert config.api_key_check.obj is not None
    assert config.groups["default"].api_key_digests == (digest("sk-py"),)


def test_load_config_none_is_the_embedded_default() -> None:
    config = load_config(None, environ={})
    assert config.source == EMBEDDED_DEFAULT_NAME
    assert config.host == "127.0.0.1"
    assert isinstance(config.connections["echo"], EchoConnection)
    assert config.api_key_check is not None
    assert config.api_key_check.import_path == BUILTIN_ALLOW_ALL


def test_load_config_errors_carry_the_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.toml",
        '[connections.openai]\napi_bsae = "https://x/v1"\n[routing]\n"*" = "openai.*"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.path == "connections.openai.api_bsae"


LM_PROXY_README_TOML = """\
host = "0.0.0.0"  # Interface to bind to
port = 8000       # Port to listen on
dev_autoreload = false  # Enable for development

# API key validation function (optional)
api_key_check = "lm_proxy.api_key_check.check_api_key_in_config"

# LLM Provider Connections
[connections]

[connections.openai]
api_type = "open_ai"
api_base = "https://api.openai.com/v1/"
api_key = "env:OPENAI_API_KEY"

[connections.google]
api_type = "google"
api_key = "env:GOOGLE_API_KEY"

[connections.anthropic]
api_type = "anthropic"
api_key  = "env:ANTHROPIC_API_KEY"

# Routing rules (model_pattern = "connection.model")
[routing]
"gpt*" = "openai.*"     # Route all GPT models to OpenAI
"claude*" = "anthropic.*"  # Route all Claude models to Anthropic
"gemini*" = "google.*"  # Route all Gemini models to Google
"*" = "openai.gpt-3.5-turbo"  # Default fallback

# Access control groups
[groups.default]
api_keys = [
    "KEY1",
    "KEY2"
]
"""

README_ENV = {"OPENAI_API_KEY": "sk-o", "GOOGLE_API_KEY": "g", "ANTHROPIC_API_KEY": "a"}


def test_lm_proxy_readme_example_loads_with_all_its_providers(tmp_path: Path) -> None:
    # The README's example ([[loggers]] removed: loggers are not supported yet).
    path = write(tmp_path, "config.toml", LM_PROXY_README_TOML)
    config = load_config(path, environ=README_ENV)
    google = config.connections["google"]
    anthropic = config.connections["anthropic"]
    assert isinstance(google, GoogleConnection)
    assert not google.vertexai
    assert google.api_key == "g"
    assert google.api_base == "https://generativelanguage.googleapis.com"
    assert isinstance(anthropic, AnthropicConnection)
    assert anthropic.api_key == "a"
    assert anthropic.api_base == "https://api.anthropic.com"


def test_lm_proxy_readme_example_loads_without_unsupported_providers(tmp_path: Path) -> None:
    text = LM_PROXY_README_TOML
    for block in (
        '[connections.google]\napi_type = "google"\napi_key = "env:GOOGLE_API_KEY"\n',
        '[connections.anthropic]\napi_type = "anthropic"\napi_key  = "env:ANTHROPIC_API_KEY"\n',
        '"claude*" = "anthropic.*"  # Route all Claude models to Anthropic\n',
        '"gemini*" = "google.*"  # Route all Gemini models to Google\n',
    ):
        assert block in text
        text = text.replace(block, "")
    config = load_config(write(tmp_path, "config.toml", text), environ=README_ENV)
    assert config.host == "0.0.0.0"
    assert config.port == 8000
    assert config.api_key_check is None
    assert config.connections["openai"].api_key == "sk-o"  # type: ignore[union-attr]
    assert [(r.pattern, r.connection, r.model) for r in config.routing] == [
        ("gpt*", "openai", None),
        ("*", "openai", "gpt-3.5-turbo"),
    ]
    assert config.groups["default"].api_key_digests == (digest("KEY1"), digest("KEY2"))


def test_lm_proxy_quick_start_yaml_and_json(tmp_path: Path) -> None:
    data = {
        "connections": {"openai": {"api_type": "open_ai", "api_key": "env:OPENAI_API_KEY"}},
        "routing": {"gpt*": "openai.*", "*": "openai.gpt-3.5-turbo"},
        "groups": {"default": {"api_keys": ["YOUR_API_KEY_HERE"]}},
    }
    a = load_config(write(tmp_path, "c.json", json.dumps(data)), environ=README_ENV)
    yaml_text = (
        "connections:\n  openai:\n    api_type: open_ai\n    api_key: env:OPENAI_API_KEY\n"
        "routing:\n  gpt*: openai.*\n  '*': openai.gpt-3.5-turbo\n"
        "groups:\n  default:\n    api_keys: [YOUR_API_KEY_HERE]\n"
    )
    b = load_config(write(tmp_path, "c.yml", yaml_text), environ=README_ENV)
    assert attrs.evolve(a, source="x") == attrs.evolve(b, source="x")


# .env files


def test_env_file_does_not_override_real_environment(tmp_path: Path) -> None:
    env_file = write(tmp_path, ".env", "A=from-file\nB=from-file\nexport C='quoted value'\n")
    environ = {"A": "from-os"}
    applied = apply_env_file(env_file, environ)
    assert environ == {"A": "from-os", "B": "from-file", "C": "quoted value"}
    assert sorted(applied) == ["B", "C"]


def test_env_file_does_not_override_an_empty_real_variable(tmp_path: Path) -> None:
    env_file = write(tmp_path, ".env", "A=from-file\n")
    environ = {"A": ""}
    assert apply_env_file(env_file, environ) == []
    assert environ == {"A": ""}


def test_env_file_applies_to_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMGW_TEST_SET", "os")
    monkeypatch.delenv("LMGW_TEST_NEW", raising=False)
    env_file = write(tmp_path, ".env", "LMGW_TEST_SET=file\nLMGW_TEST_NEW=file\n")
    assert apply_env_file(env_file) == ["LMGW_TEST_NEW"]
    import os

    assert os.environ["LMGW_TEST_SET"] == "os"
    assert os.environ["LMGW_TEST_NEW"] == "file"


def test_env_file_with_bom_multiline_and_bare_names(tmp_path: Path) -> None:
    env_file = write(tmp_path, ".env", 'FIRST=1\nMULTI="a\nb"\nBARE\n# comment\n', bom=True)
    assert read_env_file(env_file) == {"FIRST": "1", "MULTI": "a\nb"}


def test_missing_env_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        apply_env_file(tmp_path / "nope.env", {})


def test_env_file_then_config(tmp_path: Path) -> None:
    env_file = write(tmp_path, ".env", "OPENAI_API_KEY=sk-file\nCLIENT=sk-client-file\n")
    config_file = write(
        tmp_path,
        "config.toml",
        '[connections.openai]\napi_key = "env:OPENAI_API_KEY"\n'
        '[routing]\n"*" = "openai.*"\n'
        '[groups.default]\napi_keys = ["env:CLIENT"]\n',
    )
    environ = {"OPENAI_API_KEY": "sk-real"}
    apply_env_file(env_file, environ)
    config = load_config(config_file, environ=environ)
    assert config.connections["openai"].api_key == "sk-real"  # type: ignore[union-attr]
    assert config.groups["default"].api_key_digests == (digest("sk-client-file"),)


# --------------------------------------------------------------------------------------------
# Fixes found in review: duplicate keys, aliases given twice, built-in check parameters


def test_json_duplicate_key_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text('{"routing": {"a*": "x.*", "a*": "y.*"}}')
    with pytest.raises(ConfigError, match="'a\\*' appears twice"):
        read_config_data(path)


def test_yaml_duplicate_key_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("routing:\n  a*: x.*\n  a*: y.*\n")
    with pytest.raises(ConfigError, match=r"line 3.*appears twice"):
        read_config_data(path)


def test_api_key_and_its_lm_proxy_alias_together_are_an_error() -> None:
    data = minimal()
    data["connections"]["openai"]["openai_api_key"] = "sk-other"
    err = config_error(data)
    assert err.path == "connections.openai.openai_api_key"
    assert "already set" in str(err)


def test_the_in_config_check_takes_no_parameters() -> None:
    data = minimal()
    data["api_key_check"] = {"class": "check_api_key_in_config", "strict": True}
    assert config_error(data).path == "api_key_check"


def test_missing_connections_says_required() -> None:
    data = minimal()
    del data["connections"]
    err = config_error(data)
    assert err.path == "connections"
    assert "required" in str(err)


def test_a_group_without_keys_is_a_warning_when_others_have_keys() -> None:
    data = minimal()
    data["groups"]["later"] = {"api_keys": []}
    config = build(data)
    assert "groups.later.api_keys: no keys, so no client can use this group" in config.warnings


# --------------------------------------------------------------------------------------------
# Anthropic and Google connections


def _one_connection(conn: dict[str, Any], **environ: str) -> Any:
    data = {
        "connections": {"c": conn},
        "routing": {"*": "c.*"},
        "groups": {"g": {"api_keys": ["k"]}},
    }
    return build(data, **environ).connections["c"]


def test_anthropic_connection_defaults_and_lm_proxy_key_alias() -> None:
    conn = _one_connection({"api_type": "anthropic", "anthropic_api_key": "env:AK"}, AK="sk-ant")
    assert isinstance(conn, AnthropicConnection)
    assert conn.api_key == "sk-ant"
    assert conn.api_base == "https://api.anthropic.com"
    assert conn.anthropic_version == "2023-06-01"
    assert conn.max_tokens == 4096
    assert conn.reasoning == "budget"
    assert conn.anthropic_beta == ()


def test_anthropic_connection_settings() -> None:
    conn = _one_connection({
        "api_type": "anthropic",
        "api_base": "https://proxy.example/v1",
        "max_tokens": 1024,
        "anthropic_version": "2026-10-21",
        "anthropic_beta": "a-1, b-2",
        "reasoning": "adaptive",
        "drop_unsupported_params": True,
        "read_timeout_seconds": 30,
    })
    assert conn.api_base == "https://proxy.example"  # the /v1 belongs to the Messages path
    assert conn.max_tokens == 1024
    assert conn.anthropic_beta == ("a-1", "b-2")
    assert conn.reasoning == "adaptive"
    assert conn.drop_unsupported_params is True
    assert conn.read_timeout_seconds == 30


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("reasoning", "deep", "expected 'budget' or 'adaptive'"),
        ("max_tokens", 0, "at least 1"),
        ("anthropic_beta", [1], "list of strings"),
        ("anthropic_version", " ", "must not be empty"),
        ("temperature", 0.5, "unknown key"),
    ],
)
def test_anthropic_connection_errors(key: str, value: Any, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        _one_connection({"api_type": "anthropic", key: value})
    assert info.value.path == f"connections.c.{key}"
    assert words in info.value.message


def test_google_developer_api_connection() -> None:
    conn = _one_connection({"api_type": "google", "google_api_key": "env:GK"}, GK="g-key")
    assert isinstance(conn, GoogleConnection)
    assert not conn.vertexai
    assert conn.api_key == "g-key"
    assert conn.api_base == "https://generativelanguage.googleapis.com"
    assert conn.api_version == "v1beta"
    assert conn.image_fetch_allow_private is False


@pytest.mark.parametrize(
    ("location", "host"),
    [
        ("global", "https://aiplatform.googleapis.com"),
        ("us", "https://aiplatform.us.rep.googleapis.com"),
        ("europe-west4", "https://europe-west4-aiplatform.googleapis.com"),
    ],
)
def test_google_vertex_connection_hosts(location: str, host: str) -> None:
    conn = _one_connection({
        "api_type": "google", "vertexai": True, "project": "p1", "location": location,
        "service_account_file": "/etc/sa.json",
    })
    assert conn.vertexai
    assert conn.api_base == host
    assert conn.api_version == "v1beta1"
    assert conn.service_account_file == "/etc/sa.json"


def test_google_lm_proxy_vertex_keys() -> None:
    sa = '{"type": "service_account", "project_id": "p"}'
    conn = _one_connection({
        "api_type": "google_vertex_ai",
        "google_cloud_project_id": "proj",
        "google_cloud_location": "us-central1",
        "google_cloud_service_account_json": sa,
    })
    assert conn.vertexai
    assert conn.project == "proj"
    assert conn.location == "us-central1"
    assert conn.service_account_info == {"type": "service_account", "project_id": "p"}
    assert "project_id" not in repr(conn)  # credentials never in a repr
    same = _one_connection({"api_type": "google", "google_genai_use_vertexai": True,
                            "project": "proj", "google_cloud_service_account": "/sa.json"})
    assert same.vertexai
    assert same.service_account_file == "/sa.json"


@pytest.mark.parametrize(
    ("conn", "path", "words"),
    [
        ({"api_type": "google", "vertexai": True}, "project", "needs a project"),
        ({"api_type": "google", "service_account_file": "/x.json"}, "vertexai",
         "service account credentials are for Vertex AI"),
        ({"api_type": "google_vertex_ai", "google_vertex_project_id": "p"},
         "google_vertex_project_id", "old Vertex settings are not supported"),
        ({"api_type": "google", "vertexai": True, "project": "p",
          "service_account_json": "{not json"}, "service_account_json", "not valid JSON"),
        ({"api_type": "google", "image_fetch_max_bytes": 0}, "image_fetch_max_bytes",
         "at least 1"),
    ],
)
def test_google_connection_errors(conn: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        _one_connection(conn)
    assert info.value.path == f"connections.c.{path}"
    assert words in info.value.message


def test_google_vertex_express_mode_needs_only_a_key() -> None:
    conn = _one_connection({"api_type": "google", "vertexai": True, "api_key": "k"})
    assert conn.vertexai
    assert conn.project is None


def test_trusted_proxies_are_validated_networks() -> None:
    data = minimal()
    data["trusted_proxies"] = ["10.0.0.0/8", "127.0.0.1", "::1"]
    assert build(data).trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32", "::1/128")
    data["trusted_proxies"] = ["10.0.0.0/8", "not-an-ip"]
    err = config_error(data)
    assert err.path == "trusted_proxies[1]"
    assert "not an IP address or network" in err.message
