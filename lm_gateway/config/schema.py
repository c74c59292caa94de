"""Validation: plain config data (from any format) -> frozen :class:`Config`.

Pure: no file or network I/O, and the environment is passed in. Every error names the dotted
key path it is about (``connections.openai.api_bsae: unknown key (did you mean 'api_base'?)``),
and the first error stops validation: a config is fixed one line at a time.

Contract for ``env:NAME`` references: any string value that is exactly ``env:NAME`` is replaced by
the variable's value; a missing variable is an error naming the key path. (lm-proxy substituted an
empty string, which let requests without a key into a group whose key came from a missing
variable.)
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NoReturn, TypeVar, cast

from ..errors import ConfigError
from .model import (
    DEFAULT_FALLBACK_STATUSES,
    AnthropicConnection,
    Config,
    ConnectionConfig,
    CustomConnection,
    EchoConnection,
    ExtensionRef,
    GoogleConnection,
    Group,
    ModelListingMode,
    OpenAIConnection,
    Resilience,
    RouteRule,
    StrategyConnection,
    StrategyOrder,
    Target,
    TransformersConnection,
)
from .names import (
    ANTHROPIC_API_BASE,
    ANTHROPIC_DEFAULT_VERSION,
    API_TYPES_NOT_SUPPORTED_YET,
    BUILTIN_CONFIG_KEY_CHECK,
    FALLBACK_CLASS,
    GEMINI_API_BASE,
    GOOGLE_API_TYPES,
    OPENAI_COMPATIBLE_PLATFORMS,
    canonical_name,
    not_supported_reason,
)

T = TypeVar("T")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_SHA256_KEY = re.compile(r"sha256:([0-9a-fA-F]{64})\Z")
_GLOB_CHARS = frozenset("*?[")

ENV_PREFIX = "env:"


def join_path(base: str, key: str | int) -> str:
    """``connections`` + ``openai`` -> ``connections.openai``; odd keys are quoted, ints indexed."""
    if isinstance(key, int):
        return f"{base}[{key}]"
    if not _IDENTIFIER.match(key):
        key = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    part = key
    return f"{base}.{part}" if base else part


def resolve_env_refs(value: Any, environ: Mapping[str, str], path: str = "") -> Any:
    """Return a copy of ``value`` with every ``"env:NAME"`` string replaced by ``environ[NAME]``.

    Raises:
        ConfigError: a referenced variable is not set (naming the key path and the variable).
    """
    if isinstance(value, str):
        if value.startswith(ENV_PREFIX):
            name = value[len(ENV_PREFIX) :].strip()
            if not name:
                raise ConfigError("'env:' reference without a variable name", path)
            if name not in environ:
                raise ConfigError(
                    f"environment variable {name!r} is not set (referenced as {value!r})", path
                )
            return environ[name]
        return value
    if isinstance(value, dict):
        return {k: resolve_env_refs(v, environ, join_path(path, str(k))) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [resolve_env_refs(v, environ, join_path(path, i)) for i, v in enumerate(value)]
    return value


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "null",
    }.get(
        type(value),
        "a list"
        if isinstance(value, list)
        else "a table"
        if isinstance(value, Mapping)
        else type(value).__name__,
    )


class _Table:
    """Reads keys from one config table, checking types, and reports unknown keys at the end."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a table, got {_type_name(data)}", path or None)
        self.data: Mapping[str, Any] = data
        self.path = path
        self.seen: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(message, join_path(self.path, key))

    def string(self, key: str, default: T) -> str | T:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_type_name(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            # Strings come from env: references, which can only produce strings.
            return _BOOL_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_type_name(value)}")
        return value

    def integer(self, key: str, default: T, *, minimum: int = 0) -> int | T:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected an integer, got {_type_name(value)}")
        if value < minimum:
            self.fail(key, f"must be at least {minimum}, got {value}")
        return value

    def seconds(
        self, key: str, default: T, *, positive: bool = True, unit: str = "seconds"
    ) -> float | T:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                self.fail(key, f"expected a number of {unit}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"expected a number of {unit}, got {_type_name(value)}")
        if not math.isfinite(value):
            self.fail(key, f"expected a finite number of {unit}, got {value}")
        if value < 0 or (positive and value == 0):
            self.fail(key, f"must be {'positive' if positive else 'zero or more'}, got {value}")
        return float(value)

    def table(self, key: str) -> Mapping[str, Any]:
        value = self.raw(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(key, f"expected a table, got {_type_name(value)}")
        return value

    def str_map(self, key: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in self.table(key).items():
            if not isinstance(v, str | int | float) or isinstance(v, bool):
                raise ConfigError(
                    f"expected a string, got {_type_name(v)}",
                    join_path(join_path(self.path, key), k),
                )
            out[str(k)] = str(v)
        return out

    def finish(self, *, extra_known: Iterable[str] = ()) -> None:
        """Fail on the first key that was never read."""
        known = self.seen | set(extra_known)
        for key in self.data:
            if key not in known:
                hint = difflib.get_close_matches(str(key), sorted(known), n=1)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(f"unknown key{suffix}", join_path(self.path, str(key)))


_BOOL_WORDS = {
    **dict.fromkeys(("1", "true", "yes", "on", "y", "enabled", "+"), True),
    **dict.fromkeys(("0", "false", "no", "off", "n", "disabled", "-"), False),
}


def parse_bool_word(value: str) -> bool | None:
    """``"yes"`` -> True, ``"off"`` -> False, anything else -> None (lm-proxy's truthy words)."""
    return _BOOL_WORDS.get(value.strip().lower())


def _extension(value: Any, path: str, *, what: str, any_object: bool = False) -> ExtensionRef:
    """A dotted path string, a ``{class = ..., **params}`` table, or a live callable (or, with
    ``any_object``, any live object: a connection may be an object speaking our protocol)."""
    if isinstance(value, str):
        name = value.strip()
        if not name:
            raise ConfigError(f"empty {what} reference", path)
        _reject_not_supported(name, path)
        return ExtensionRef(config_path=path, import_path=canonical_name(name))
    if isinstance(value, Mapping):
        if "class" not in value:
            raise ConfigError(f"a {what} table needs a 'class' key", path)
        target = value["class"]
        # Nested ``{class = ...}`` tables are extensions too (lm-proxy's
        # ``[loggers.log_writer]``): resolved, inner first, when the outer one is built.
        params = {
            str(k): _extension(v, join_path(path, str(k)), what=f"{what}'s {k}")
            if isinstance(v, Mapping) and "class" in v
            else v
            for k, v in value.items()
            if k != "class"
        }
        if isinstance(target, str):
            _reject_not_supported(target.strip(), join_path(path, "class"))
            return ExtensionRef(
                config_path=path,
                import_path=canonical_name(target.strip()),
                params=params,
                instantiate=True,
            )
        if callable(target):
            return ExtensionRef(config_path=path, obj=target, params=params, instantiate=True)
        raise ConfigError(f"expected a dotted path or a class, got {_type_name(target)}", path)
    if callable(value) or (
        any_object and value is not None and not isinstance(value, bool | int | float | list)
    ):
        return ExtensionRef(config_path=path, obj=value)
    raise ConfigError(
        f"expected a dotted path, a table with 'class', or a callable; got {_type_name(value)}",
        path,
    )


def _reject_not_supported(name: str, path: str) -> None:
    reason = not_supported_reason(name)
    if reason:
        raise ConfigError(f"{reason} ({name!r})", path)


def _extension_list(table: _Table, key: str, *, what: str) -> tuple[ExtensionRef, ...]:
    """A list of extension references (``before = [...]``); absent or empty -> ()."""
    value = table.raw(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        value = [value]
    return tuple(
        _extension(item, join_path(join_path(table.path, key), i), what=what)
        for i, item in enumerate(value)
    )


_PRICE_KEYS = ("input", "output", "cached_input", "cache_write")


def _prices(table: _Table, key: str) -> dict[str, dict[str, float]]:
    """``prices = { "gpt-4o*" = { input = 2.5, output = 10, cached_input = 1.25 } }``."""
    out: dict[str, dict[str, float]] = {}
    prices = _Table(table.table(key), join_path(table.path, key))
    for model, value in prices.data.items():
        prices.seen.add(model)
        entry = _Table(value, join_path(prices.path, str(model)))
        price = {}
        for field in _PRICE_KEYS:
            amount = entry.seconds(field, None, positive=False, unit="US dollars")
            if amount is not None:
                price[field] = amount
        if "input" not in price or "output" not in price:
            raise ConfigError("a price needs input and output (USD per million tokens)", entry.path)
        entry.finish()
        out[str(model)] = price
    return out


def _path_key(table: _Table, key: str, default: str) -> str:
    value = table.string(key, default).strip()
    if not value.startswith("/"):
        table.fail(key, f"must start with '/', got {value!r}")
    return value.rstrip("/") or "/"


def _trusted_proxies(table: _Table) -> tuple[str, ...]:
    value = table.raw("trusted_proxies")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        table.fail(
            "trusted_proxies", f"expected a list of addresses or networks, got {_type_name(value)}"
        )
    out = []
    for i, item in enumerate(value):
        path = join_path(join_path(table.path, "trusted_proxies"), i)
        if not isinstance(item, str):
            raise ConfigError(f"expected an address or network, got {_type_name(item)}", path)
        try:
            out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError as exc:
            raise ConfigError(f"not an IP address or network: {item!r}", path) from exc
    return tuple(out)


def _fail_later_feature(table: _Table, key: str, reason: str) -> None:
    """Parse a key owned by later work: absent or empty is fine, anything else is an error."""
    value = table.raw(key)
    if value is None or value is False or (isinstance(value, list | dict) and not value):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            # A built-in name gets its specific message; anything else the generic one.
            if isinstance(item, str | Mapping):
                _extension(item, join_path(join_path(table.path, key), i), what=key)
    table.fail(key, f"{reason} (remove it, or leave it empty)")


def _connection(name: str, value: Any, path: str, warnings: list[str]) -> ConnectionConfig:
    if not name or "." in name:
        raise ConfigError(
            "connection names must be non-empty and contain no '.' (routing targets are "
            "'connection.model')",
            path,
        )
    if (
        isinstance(value, Mapping)
        and isinstance(value.get("class"), str)
        and canonical_name(value["class"].strip()) == FALLBACK_CLASS
    ):
        # lm-proxy's Fallback: connections = ["conn.model", {conn = {overrides}}].
        options = {k: v for k, v in value.items() if k not in ("class", "connections")}
        return strategy_from(name, path, value.get("connections"), options=options)
    if not isinstance(value, Mapping) or "class" in value:
        ref = _extension(value, path, what="connection", any_object=True)
        return CustomConnection(name=name, ref=ref)

    if "targets" in value:
        options = {k: v for k, v in value.items() if k not in ("targets", "api_type")}
        kind = str(value.get("api_type", "strategy")).strip().lower()
        if kind != "strategy":
            raise ConfigError(
                f"'targets' makes a strategy connection; api_type must be 'strategy', got {kind!r}",
                join_path(path, "api_type"),
            )
        return strategy_from(name, path, value["targets"], options=options)
    t = _Table(value, path)
    api_type_value = t.string("api_type", "")
    api_type = api_type_value.strip().lower()
    if not api_type:
        api_type = "openai"
    if api_type in API_TYPES_NOT_SUPPORTED_YET:
        t.fail("api_type", f"{API_TYPES_NOT_SUPPORTED_YET[api_type]} ({api_type_value!r})")
    if t.has("model") and api_type != "transformers":
        t.raw("model")
        warnings.append(f"{join_path(path, 'model')}: ignored (routing rules pick the model)")
    conn: ConnectionConfig
    if api_type == "echo":
        conn = EchoConnection(
            name=name,
            chunk_delay_seconds=t.seconds("chunk_delay_seconds", 0.0, positive=False),
            prices=_prices(t, "prices"),
        )
    elif api_type in OPENAI_COMPATIBLE_PLATFORMS:
        conn = _openai_connection(t, name, api_type)
    elif api_type == "transformers":
        conn = _transformers_connection(t, name)
    elif api_type == "anthropic":
        conn = _anthropic_connection(t, name)
    elif api_type in GOOGLE_API_TYPES:
        conn = _google_connection(t, name, vertex_default=api_type == "google_vertex_ai")
    else:
        supported = sorted(
            {*OPENAI_COMPATIBLE_PLATFORMS, "echo", "anthropic", "transformers", *GOOGLE_API_TYPES}
        )
        t.fail(
            "api_type", f"unknown api_type {api_type_value!r}; supported: {', '.join(supported)}"
        )
    t.finish()
    return conn


def _resilience(t: _Table, init_retries: int | None) -> Resilience:
    """Retry and cooldown settings; lm-proxy's ``init_params.max_retries`` counts too."""
    retries = t.integer("max_retries", init_retries if init_retries is not None else 0)
    return Resilience(
        max_retries=retries,
        retry_backoff_seconds=t.seconds("retry_backoff_seconds", 0.5),
        retry_max_backoff_seconds=t.seconds("retry_max_backoff_seconds", 10.0),
        retry_after_max_seconds=t.seconds("retry_after_max_seconds", 30.0, positive=False),
        cooldown_after_failures=t.integer("cooldown_after_failures", 5),
        cooldown_seconds=t.seconds("cooldown_seconds", 30.0),
        cooldown_failure_ratio=_ratio(t, "cooldown_failure_ratio"),
        cooldown_window_requests=t.integer("cooldown_window_requests", 20, minimum=2),
        cooldown_redis_url=_redis_url(t, "cooldown_redis_url"),
    )


def _ratio(t: _Table, key: str) -> float:
    value = t.seconds(key, 0.0, positive=False, unit="fraction")
    if value > 1:
        t.fail(key, f"must be a fraction between 0 and 1, got {value}")
    return value


def _redis_url(t: _Table, key: str) -> str | None:
    url = t.string(key, None)
    if url is None:
        return None
    url = url.strip()
    if not url.startswith(("redis://", "rediss://", "unix://")):
        t.fail(key, f"expected a redis://, rediss:// or unix:// URL, got {url!r}")
    return url


_ORDERS = ("sequential", "weighted", "round_robin", "least_in_flight", "latency")


def _target(value: Any, path: str) -> Target:
    """``"conn"``, ``"conn.model"``, ``{connection = "conn", model = ..., params = {...},
    weight = 2}``, or lm-proxy's ``{conn = {overrides}}``."""
    if isinstance(value, str):
        name, _, model = value.strip().partition(".")
        if not name:
            raise ConfigError("empty target", path)
        return Target(connection=name, model=model or None)
    if isinstance(value, Mapping) and "connection" in value:
        t = _Table(value, path)
        name = t.string("connection", "").strip()
        if not name:
            t.fail("connection", "must not be empty")
        chosen: str | None = t.string("model", None)
        weight = t.seconds("weight", 1.0, unit="weight units")
        params = dict(t.table("params"))
        t.finish()
        return Target(connection=name, model=chosen, params=params, weight=weight)
    if isinstance(value, Mapping) and len(value) == 1:
        ((key, overrides),) = value.items()
        if not isinstance(overrides, Mapping):
            raise ConfigError(
                "a target table is {connection = ..., model = ..., params = {...}} or "
                "lm-proxy's {connection_name = {overrides}}",
                path,
            )
        name, _, suffix = str(key).partition(".")
        overrides_ = {str(k): v for k, v in overrides.items()}
        override_model = str(overrides_.pop("model", "") or suffix) or None
        return Target(connection=name, model=override_model, params=overrides_)
    raise ConfigError(
        f"expected 'connection', 'connection.model' or a table, got {_type_name(value)}", path
    )


def strategy_from(
    name: str, path: str, targets: Any, *, options: Mapping[str, Any]
) -> StrategyConnection:
    """Build a strategy from its targets and options (also used by lm-proxy's ``Fallback``).

    Raises:
        ConfigError: naming the key at fault.
    """
    t = _Table(options, path)
    if not isinstance(targets, list) or not targets:
        raise ConfigError(
            "a strategy needs a non-empty list of targets", join_path(path, "targets")
        )
    parsed = tuple(
        _target(item, join_path(join_path(path, "targets"), i)) for i, item in enumerate(targets)
    )
    order = t.string("order", "sequential")
    if order not in _ORDERS:
        t.fail("order", f"expected one of {', '.join(_ORDERS)}, got {order!r}")
    statuses = t.raw("fallback_on_status")
    status_tuple: tuple[int, ...] = DEFAULT_FALLBACK_STATUSES
    if statuses is not None:
        if not isinstance(statuses, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 400 <= s < 600 for s in statuses
        ):
            t.fail("fallback_on_status", "expected a list of HTTP statuses (400-599)")
        status_tuple = tuple(statuses)
    context = t.raw("on_context_length")
    strategy = StrategyConnection(
        name=name,
        targets=parsed,
        order=cast(StrategyOrder, order),
        fallback=t.boolean("fallback", True),
        hedge_after_seconds=t.seconds("hedge_after_seconds", None),
        attempt_timeout_seconds=t.seconds("attempt_timeout_seconds", None),
        fallback_on_status=status_tuple,
        on_context_length=_target(context, join_path(path, "on_context_length"))
        if context is not None
        else None,
    )
    t.finish()
    return strategy


def _http_fields(
    t: _Table, *, default_base: str | None, key_aliases: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The settings every HTTP connection shares, read from ``t`` (keyword arguments for
    :class:`HTTPConnection` and its subclasses). ``api_base`` is None when neither the table
    nor ``default_base`` gives one (the caller decides)."""
    api_base = _one_of(t, "api_base", *(f"{a}_api_base" for a in key_aliases))
    api_key = _one_of(t, "api_key", *(f"{a}_api_key" for a in key_aliases))
    headers = t.str_map("http_headers")
    request_timeout = t.seconds("request_timeout_seconds", None)
    # lm-proxy passed init_params to the SDK client; the meaningful ones map onto our keys.
    init = _Table(t.table("init_params"), join_path(t.path, "init_params"))
    if init.has("timeout"):
        request_timeout = init.seconds("timeout", None)
    retries = init.integer("max_retries", None)
    headers.update(init.str_map("default_headers"))
    api_base = _one_of(init, "base_url") or api_base
    api_key = _one_of(init, "api_key") or api_key
    init.finish()

    if api_base is None:
        api_base = default_base
    if api_base is not None:
        api_base = api_base.strip().rstrip("/")
        if not api_base.startswith(("http://", "https://")):
            t.fail("api_base", f"must be an http:// or https:// URL, got {api_base!r}")

    verify_raw = t.raw("verify_ssl")
    verify: bool | str = True
    if isinstance(verify_raw, bool):
        verify = verify_raw
    elif isinstance(verify_raw, str):
        word = parse_bool_word(verify_raw)
        verify = word if word is not None else verify_raw
    elif verify_raw is not None:
        t.fail(
            "verify_ssl", f"expected true, false or a CA bundle path; got {_type_name(verify_raw)}"
        )
    return {
        "api_base": api_base,
        "api_key": api_key.strip() if api_key else None,
        "http_headers": headers,
        "prices": _prices(t, "prices"),
        "resilience": _resilience(t, retries),
        "connect_timeout_seconds": t.seconds("connect_timeout_seconds", 10.0),
        "read_timeout_seconds": t.seconds("read_timeout_seconds", 600.0),
        "write_timeout_seconds": t.seconds("write_timeout_seconds", 60.0),
        "request_timeout_seconds": request_timeout,
        "max_connections": t.integer("max_connections", 1000, minimum=1),
        "max_keepalive_connections": t.integer("max_keepalive_connections", 1000, minimum=0),
        "keepalive_expiry_seconds": t.seconds("keepalive_expiry_seconds", 30.0, positive=False),
        "http2": t.boolean("http2", False),
        "verify_ssl": verify,
    }


def _openai_connection(t: _Table, name: str, api_type: str) -> OpenAIConnection:
    fields = _http_fields(
        t, default_base=OPENAI_COMPATIBLE_PLATFORMS[api_type], key_aliases=("openai",)
    )
    default_args = dict(t.table("default_args"))
    for forbidden in ("model", "messages", "stream"):
        if forbidden in default_args:
            raise ConfigError(
                "cannot set a default for this field",
                join_path(join_path(t.path, "default_args"), forbidden),
            )
    return OpenAIConnection(
        name=name,
        api_type=api_type,
        default_args=default_args,
        stream_usage=t.boolean("stream_usage", True),
        **fields,
    )


def _string_list(t: _Table, key: str) -> tuple[str, ...]:
    value = t.raw(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        t.fail(key, "expected a list of strings (or one comma-separated string)")
    return tuple(v.strip() for v in value)


_DTYPES = ("auto", "float32", "float16", "bfloat16")


def _transformers_connection(t: _Table, name: str) -> TransformersConnection:
    """lm-proxy's keys are accepted: ``chat_mode`` (only true), and ``init_params`` whose
    ``device``/``dtype``/``torch_dtype``/``trust_remote_code`` are ours and whose other keys
    go to ``from_pretrained``."""
    model = t.string("model", "").strip()
    if not model:
        t.fail(
            "model",
            "a transformers connection needs model: a local directory or a model "
            "id already in the Hugging Face cache",
        )
    if not t.boolean("chat_mode", True):
        t.fail("chat_mode", "only chat mode is served (the tokenizer's chat template)")
    init = _Table(t.table("init_params"), join_path(t.path, "init_params"))
    kwargs: dict[str, Any] = {}
    device = t.string("device", "auto")
    dtype = t.string("dtype", "auto")
    trust = t.boolean("trust_remote_code", False)
    for key, value in init.data.items():
        init.seen.add(key)
        if key == "device":
            device = init.string("device", device)
        elif key in ("dtype", "torch_dtype"):
            dtype = init.string(key, dtype)
        elif key == "trust_remote_code":
            trust = init.boolean(key, trust)
        elif key in (
            "model",
            "tokenizer",
            "inference",
            "quantize_4bit",
            "use_pipeline",
            "pipeline_task",
            "gradient_checkpointing",
            "always_clear_mem",
        ):
            init.fail(key, "is not supported by lm-gateway's transformers connection")
        else:
            kwargs[str(key)] = value
    device = device.strip().lower()
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        t.fail("device", f"expected auto, cpu, cuda, cuda:N or mps, got {device!r}")
    dtype = dtype.strip().lower()
    if dtype not in _DTYPES:
        t.fail("dtype", f"expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    template = t.string("chat_template", None)
    return TransformersConnection(
        name=name,
        model=model,
        device=device,
        dtype=dtype,
        max_concurrency=t.integer("max_concurrency", 1, minimum=1),
        max_queue=t.integer("max_queue", 16, minimum=0),
        max_new_tokens=t.integer("max_new_tokens", 512, minimum=1),
        trust_remote_code=trust,
        chat_template=template if template and template.strip() else None,
        model_kwargs={**kwargs, **_plain_table(t, "model_kwargs")},
        prices=_prices(t, "prices"),
    )


def _plain_table(t: _Table, key: str) -> dict[str, Any]:
    value = t.table(key)
    return {str(k): v for k, v in value.items()}


def _anthropic_connection(t: _Table, name: str) -> AnthropicConnection:
    fields = _http_fields(t, default_base=ANTHROPIC_API_BASE, key_aliases=("anthropic",))
    # The Messages path starts with /v1; accept a base URL given with it as well.
    if fields["api_base"].endswith("/v1"):
        fields["api_base"] = fields["api_base"][: -len("/v1")]
    version = t.string("anthropic_version", ANTHROPIC_DEFAULT_VERSION).strip()
    if not version:
        t.fail("anthropic_version", "must not be empty")
    reasoning = t.string("reasoning", "budget")
    if reasoning not in ("budget", "adaptive"):
        t.fail("reasoning", f"expected 'budget' or 'adaptive', got {reasoning!r}")
    return AnthropicConnection(
        name=name,
        max_tokens=t.integer("max_tokens", 4096, minimum=1),
        anthropic_version=version,
        anthropic_beta=_string_list(t, "anthropic_beta"),
        reasoning=cast(Literal["budget", "adaptive"], reasoning),
        drop_unsupported_params=t.boolean("drop_unsupported_params", False),
        **fields,
    )


def _google_connection(t: _Table, name: str, *, vertex_default: bool) -> GoogleConnection:
    for legacy in (
        "google_vertex_project_id",
        "google_vertex_gcloud_auth",
        "google_vertex_response_validation",
    ):
        if t.raw(legacy) is not None:
            t.fail(
                legacy,
                "microcore's old Vertex settings are not supported: use vertexai = true, "
                "project, location, and a service account or application default credentials",
            )
    vertex = t.boolean("vertexai", vertex_default)
    if t.raw("google_genai_use_vertexai") is not None:
        vertex = t.boolean("google_genai_use_vertexai", vertex)
    project = _one_of(t, "project", "google_cloud_project_id")
    location = _one_of(t, "location", "google_cloud_location") or "global"
    sa_file = _one_of(t, "service_account_file")
    sa_info: dict[str, Any] | None = None
    for key in (
        "service_account_json",
        "google_cloud_service_account_json",
        "google_cloud_service_account",
    ):
        raw = t.raw(key)
        if raw is None:
            continue
        if isinstance(raw, Mapping):
            sa_info = dict(raw)
        elif isinstance(raw, str) and raw.strip().startswith("{"):
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError as exc:
                t.fail(key, f"is not valid JSON: {exc.msg} (line {exc.lineno})")
            if not isinstance(parsed, dict):
                t.fail(key, "must be a JSON object (a service account key)")
            sa_info = parsed
        elif isinstance(raw, str) and key == "google_cloud_service_account":
            sa_file = raw  # lm-proxy: a path or the key itself
        else:
            t.fail(key, f"expected a service account key (JSON), got {_type_name(raw)}")
    api_version = _one_of(t, "api_version")
    fields = _http_fields(t, default_base=None, key_aliases=("google",))
    if vertex:
        if not project and not fields["api_key"]:
            t.fail("project", "Vertex AI needs a project (or an API key for express mode)")
        if fields["api_base"] is None:
            fields["api_base"] = vertex_api_base(location)
    else:
        if sa_file or sa_info:
            t.fail(
                "vertexai",
                "service account credentials are for Vertex AI: set vertexai = true (and project)",
            )
        if fields["api_base"] is None:
            fields["api_base"] = GEMINI_API_BASE
    if sa_file and sa_info:
        t.fail("service_account_file", "give the service account as a file or as JSON, not both")
    return GoogleConnection(
        name=name,
        vertexai=vertex,
        project=project,
        location=location,
        api_version=api_version or ("v1beta1" if vertex else "v1beta"),
        service_account_file=sa_file,
        service_account_info=sa_info,
        drop_unsupported_params=t.boolean("drop_unsupported_params", False),
        image_fetch_max_bytes=t.integer("image_fetch_max_bytes", 20 * 1024 * 1024, minimum=1),
        image_fetch_timeout_seconds=t.seconds("image_fetch_timeout_seconds", 10.0),
        image_fetch_allow_private=t.boolean("image_fetch_allow_private", False),
        extra_body=dict(t.table("extra_body")),
        **fields,
    )


def vertex_api_base(location: str) -> str:
    """Vertex AI's host for a location (as google-genai builds it)."""
    if location == "global":
        return "https://aiplatform.googleapis.com"
    if location in ("us", "eu"):
        return f"https://aiplatform.{location}.rep.googleapis.com"
    return f"https://{location}-aiplatform.googleapis.com"


def _one_of(t: _Table, *keys: str) -> str | None:
    """The value of whichever of ``keys`` (aliases) is set; setting two, or an empty string,
    is an error naming the key."""
    found = [k for k in keys if t.raw(k) is not None]  # raw() also marks them as known keys
    if len(found) > 1:
        t.fail(found[1], f"{found[0]!r} is already set (they are the same setting)")
    if not found:
        return None
    value = t.string(found[0], None)
    if value is not None and not value.strip():
        t.fail(found[0], "is empty (an env: variable set to an empty string?)")
    return value


def _routing(value: Any, connections: Mapping[str, ConnectionConfig]) -> tuple[RouteRule, ...]:
    table = _Table(value if value is not None else {}, "routing")
    rules: list[RouteRule] = []
    for index, (pattern, target) in enumerate(table.data.items()):
        path = join_path("routing", str(pattern))
        table.seen.add(pattern)
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError("a routing pattern must be a non-empty string", path)
        if not isinstance(target, str):
            raise ConfigError(f"expected 'connection.model', got {_type_name(target)}", path)
        conn_name, dot, model = target.strip().partition(".")
        if not dot or not conn_name or not model:
            raise ConfigError(
                f"target {target!r} must have the form 'connection.model' or 'connection.*'", path
            )
        if conn_name not in connections:
            known = ", ".join(sorted(connections)) or "none"
            raise ConfigError(
                f"target {target!r} names undefined connection {conn_name!r} (defined: {known})",
                path,
            )
        if model != "*" and _GLOB_CHARS & set(model):
            raise ConfigError(
                f"target model {model!r} must be a model name or '*' (pass the name through)", path
            )
        rules.append(
            RouteRule(
                pattern=pattern,
                connection=conn_name,
                model=None if model == "*" else model,
                index=index,
            )
        )
    return tuple(rules)


def _key_digest(key: Any, path: str) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"expected a string key, got {_type_name(key)}", path)
    if not key.strip():
        raise ConfigError(
            "empty API key (an env: variable set to an empty string?) would let requests "
            "without a key in",
            path,
        )
    # Presented keys are stripped (extract_api_key), so configured ones must be too.
    key = key.strip()
    match = _SHA256_KEY.match(key)
    if match:
        return match.group(1).lower()
    return hashlib.sha256(key.encode()).hexdigest()


def _name_list(value: Any, path: str) -> list[str] | None:
    """``"*"`` -> None (everything); ``"a, b"`` or ``["a", "b"]`` -> the names."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip() == "*":
            return None
        items: list[Any] = value.split(",")
    elif isinstance(value, list):
        items = value
    else:
        raise ConfigError(
            f"expected '*', a comma-separated string or a list, got {_type_name(value)}", path
        )
    names: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(f"expected a string, got {_type_name(item)}", join_path(path, i))
        if item.strip() == "*":
            return None
        if item.strip():
            names.append(item.strip())
    return names


def _groups(
    value: Any,
    connections: Mapping[str, ConnectionConfig],
    *,
    keys_required: bool,
    warnings: list[str],
) -> dict[str, Group]:
    if value is None:
        # lm-proxy's default: one group named "default" that may use every connection.
        value = {"default": {}}
    table = _Table(value, "groups")
    groups: dict[str, Group] = {}
    owner_of: dict[str, str] = {}
    for name, raw in table.data.items():
        table.seen.add(name)
        path = join_path("groups", str(name))
        t = _Table(raw, path)
        keys_raw = t.raw("api_keys")
        if keys_raw is None:
            keys_raw = []
        if isinstance(keys_raw, str):
            keys_raw = [keys_raw]
        if not isinstance(keys_raw, list):
            t.fail("api_keys", f"expected a list of keys, got {_type_name(keys_raw)}")
        digests: list[str] = []
        for i, key in enumerate(keys_raw):
            key_path = join_path(join_path(path, "api_keys"), i)
            digest = _key_digest(key, key_path)
            if digest in owner_of:
                raise ConfigError(
                    f"this key is already listed in group {owner_of[digest]!r}; a key belongs to "
                    "one group",
                    key_path,
                )
            owner_of[digest] = str(name)
            digests.append(digest)
        allowed = _name_list(t.raw("allowed_connections"), join_path(path, "allowed_connections"))
        if allowed is not None:
            for conn in allowed:
                if conn not in connections:
                    known = ", ".join(sorted(connections)) or "none"
                    t.fail(
                        "allowed_connections",
                        f"unknown connection {conn!r} (defined: {known})",
                    )
        models = _name_list(t.raw("allowed_models"), join_path(path, "allowed_models"))
        # lm-proxy silently ignored a misspelt `connections = ...`; we name it.
        t.finish()
        groups[str(name)] = Group(
            name=str(name),
            api_key_digests=tuple(digests),
            allowed_connections=frozenset(allowed) if allowed is not None else None,
            allowed_models=tuple(models) if models is not None else None,
        )
    if keys_required and owner_of:
        for group in groups.values():
            if not group.api_key_digests:
                warnings.append(
                    f"groups.{group.name}.api_keys: no keys, so no client can use this group"
                )
    if keys_required and not owner_of:
        raise ConfigError(
            "no API keys are configured, so no client could use the gateway: add keys to "
            "groups.<name>.api_keys, or set api_key_check (e.g. 'AllowAll' on a trusted network)",
            "groups",
        )
    return groups


def _model_info(value: Any) -> dict[str, dict[str, Any]]:
    table = _Table(value if value is not None else {}, "model_info")
    out: dict[str, dict[str, Any]] = {}
    for model, info in table.data.items():
        table.seen.add(model)
        if not isinstance(info, Mapping):
            raise ConfigError(
                f"expected a table of fields, got {_type_name(info)}",
                join_path("model_info", str(model)),
            )
        out[str(model)] = dict(info)
    return out


def build_config(
    data: Mapping[str, Any],
    *,
    environ: Mapping[str, str],
    source: str = "<dict>",
) -> Config:
    """Validate plain config data and build a :class:`Config`.

    Args:
        data: the parsed file (TOML/YAML/JSON tables, or a Python config's ``config`` dict).
        environ: where ``env:NAME`` references are looked up (normally ``os.environ``).
        source: where the data came from, kept for messages.

    Raises:
        ConfigError: the first problem found, with its dotted key path.
    """
    data = resolve_env_refs(dict(data), environ)
    t = _Table(data, "")
    warnings: list[str] = []

    if t.raw("connections") is None:
        raise ConfigError("required: at least one connection", "connections")
    conn_table = _Table(t.raw("connections"), "connections")
    if not conn_table.data:
        raise ConfigError("at least one connection is required", "connections")
    connections: dict[str, ConnectionConfig] = {}
    for name, value in conn_table.data.items():
        conn_table.seen.add(name)
        connections[str(name)] = _connection(
            str(name), value, join_path("connections", str(name)), warnings
        )

    routing = _routing(t.raw("routing"), connections)
    if not routing:
        warnings.append("routing: no rules, so every model name gets 404 model_not_found")

    key_check_raw = t.raw("api_key_check")
    key_check: ExtensionRef | None = None
    if key_check_raw is not None:
        key_check = _extension(key_check_raw, "api_key_check", what="api_key_check")
        if key_check.import_path == BUILTIN_CONFIG_KEY_CHECK:
            if key_check.params:
                raise ConfigError("the in-config key check takes no parameters", "api_key_check")
            key_check = None
    groups = _groups(
        t.raw("groups"), connections, keys_required=key_check is None, warnings=warnings
    )

    mode = t.string("model_listing_mode", "as_is")
    if mode not in ("as_is", "ignore_wildcards", "expand_wildcards"):
        t.fail(
            "model_listing_mode",
            f"expected as_is, ignore_wildcards or expand_wildcards, got {mode!r}",
        )

    prefix = t.string("api_prefix", "/v1").strip()
    if prefix and not prefix.startswith("/"):
        t.fail("api_prefix", f"must start with '/' (or be empty), got {prefix!r}")
    prefix = prefix.rstrip("/")

    host = t.string("host", "127.0.0.1").strip()
    if not host:
        t.fail("host", "must not be empty")
    port = t.integer("port", 8000)
    metrics_port = t.integer("metrics_port", None, minimum=1)
    if metrics_port is not None and metrics_port > 65535:
        t.fail("metrics_port", f"must be at most 65535, got {metrics_port}")
    if metrics_port is not None and metrics_port == port:
        t.fail(
            "metrics_port",
            f"must differ from port ({port}); leave it out to serve metrics on the API port",
        )
    if port > 65535:
        t.fail("port", f"must be at most 65535, got {port}")
    certfile = t.string("ssl_certfile", None)
    keyfile = t.string("ssl_keyfile", None)
    if (certfile is None) != (keyfile is None):
        t.fail(
            "ssl_keyfile" if keyfile is None else "ssl_certfile",
            "ssl_certfile and ssl_keyfile must be set together",
        )

    before = _extension_list(t, "before", what="request handler")
    trusted = _trusted_proxies(t)
    loggers = _extension_list(t, "loggers", what="logger")
    prices = _prices(t, "prices")
    _fail_later_feature(t, "components", "components are not supported yet")
    if t.boolean("print_stream", False):
        t.fail("print_stream", "is not supported (use --debug for request logging)")

    config = Config(
        connections=connections,
        routing=routing,
        groups=groups,
        enabled=t.boolean("enabled", True),
        host=host,
        port=port,
        api_prefix=prefix,
        debug=t.boolean("debug", False),
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        dev_autoreload=t.boolean("dev_autoreload", False),
        api_key_check=key_check,
        model_listing_mode=cast(ModelListingMode, mode),
        model_listing_cache_seconds=t.seconds("model_listing_cache_seconds", 300.0, positive=False),
        model_info=_model_info(t.raw("model_info")),
        encryption_key=t.string("encryption_key", None),
        request_timeout_seconds=t.seconds("request_timeout_seconds", 600.0),
        max_request_body_bytes=t.integer("max_request_body_bytes", 32 * 1024 * 1024, minimum=1024),
        source=source,
        warnings=tuple(warnings),
        before=before,
        trusted_proxies=trusted,
        loggers=loggers,
        prices=prices,
        metrics=t.boolean("metrics", True),
        metrics_path=_path_key(t, "metrics_path", "/metrics"),
        metrics_port=metrics_port,
        metrics_api_key=t.string("metrics_api_key", None),
        log_flush_seconds=t.seconds("log_flush_seconds", 10.0),
    )
    t.finish()
    return config
