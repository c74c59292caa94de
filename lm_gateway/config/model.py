"""Frozen value objects describing a validated configuration.

Built by :func:`lm_gateway.config.schema.build_config` from the plain data a config file holds;
nothing here does I/O. Secrets are ``repr=False`` so a config can be printed or logged safely.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

ModelListingMode = Literal["as_is", "ignore_wildcards", "expand_wildcards"]


@attrs.frozen
class ExtensionRef:
    """A reference to user or built-in code: a dotted import path or a live object, plus params.

    Exactly one of ``import_path`` and ``obj`` is set. ``config_path`` is where the reference was
    written (``api_key_check``, ``connections.lb``) so a failure to resolve it can say so.
    lm-proxy spellings (``lm_proxy.…``) are already rewritten to ours in ``import_path``.
    """

    config_path: str
    import_path: str | None = None
    obj: object | None = None
    params: Mapping[str, Any] = attrs.field(factory=dict)
    #: True for ``class = "..."`` tables: the target is called with ``params`` to make the object.
    instantiate: bool = False


@attrs.frozen
class Resilience:
    """Retries and cooldown of one connection (see doc/resilience.md)."""

    #: Further tries of a failed call (connect errors, timeouts, 429, 5xx) before giving up.
    max_retries: int = 0
    #: Backoff before retry k: a random time up to min(max, base * 2**k) ("full jitter").
    retry_backoff_seconds: float = 0.5
    retry_max_backoff_seconds: float = 10.0
    #: A ``Retry-After`` longer than this is not waited for (the error goes back instead).
    retry_after_max_seconds: float = 30.0
    #: Consecutive failures that put the connection in cooldown (0: never).
    cooldown_after_failures: int = 5
    #: How long a cooldown lasts before one request probes the connection again.
    cooldown_seconds: float = 30.0
    #: Also cool down when at least this share of the last ``cooldown_window_requests`` calls
    #: failed (0: only consecutive failures count). Catches a connection failing half the time.
    cooldown_failure_ratio: float = 0.0
    cooldown_window_requests: int = 20
    #: Share the cooldown state between gateway instances through this Redis.
    cooldown_redis_url: str | None = None


@attrs.frozen
class Target:
    """One target of a strategy: a connection, optionally a model and request overrides."""

    connection: str
    model: str | None = None
    params: Mapping[str, Any] = attrs.field(factory=dict)
    weight: float = 1.0


#: Upstream statuses a strategy falls over for by default: timeouts, conflicts, rate limits,
#: server errors and Anthropic's "overloaded".
DEFAULT_FALLBACK_STATUSES = (408, 409, 429, 500, 502, 503, 504, 529)

StrategyOrder = Literal["sequential", "weighted", "round_robin", "least_in_flight", "latency"]


@attrs.frozen
class StrategyConnection:
    """A connection made of other connections: fallback, load balancing, hedging."""

    name: str
    targets: tuple[Target, ...]
    #: How targets are ordered per request (the first is tried first, the rest are fallbacks).
    order: StrategyOrder = "sequential"
    #: Try the next target when one fails with an error worth it (off: only the first is used).
    fallback: bool = True
    #: Start the next target when the current one has not produced its first token in this
    #: long; the first to produce one wins (None: no hedging).
    hedge_after_seconds: float | None = None
    #: How long one attempt may take to its first token before it counts as timed out and the
    #: next target is tried (None: only the connection's own timeouts and the request's).
    attempt_timeout_seconds: float | None = None
    #: Upstream statuses worth falling over for (connect errors and timeouts always are).
    fallback_on_status: tuple[int, ...] = DEFAULT_FALLBACK_STATUSES
    #: Where a request goes when its prompt is too long for a target.
    on_context_length: Target | None = None
    api_type: str = "strategy"


@attrs.frozen
class HTTPConnection:
    """What every HTTP upstream connection has: where it is, its key, and transport settings."""

    name: str
    api_base: str
    api_key: str | None = attrs.field(default=None, repr=False)
    #: Static headers sent with every upstream request (may hold secrets, hence no repr).
    http_headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    connect_timeout_seconds: float = 10.0
    #: Longest silence allowed between two bytes of the upstream's answer.
    read_timeout_seconds: float = 600.0
    write_timeout_seconds: float = 60.0
    #: Deadline for the whole upstream exchange; None uses the gateway's request deadline.
    request_timeout_seconds: float | None = None
    max_connections: int = 1000
    max_keepalive_connections: int = 1000
    keepalive_expiry_seconds: float = 30.0
    http2: bool = False
    #: True (system trust store), False (no verification; for lab setups), or a CA bundle path.
    verify_ssl: bool | str = True
    #: Price overrides for this connection's models (same shape as the top-level ``prices``).
    prices: Mapping[str, Mapping[str, float]] = attrs.field(factory=dict)
    resilience: Resilience = attrs.field(factory=Resilience)
    api_type: str = "openai"


@attrs.frozen
class OpenAIConnection(HTTPConnection):
    """An OpenAI-compatible HTTP upstream (OpenAI, vLLM, Ollama, llama.cpp, OpenRouter, Groq…)."""

    #: Request fields applied when the client does not send them (lm-proxy ``default_args``).
    default_args: Mapping[str, Any] = attrs.field(factory=dict)
    #: Ask the upstream for the final usage chunk on every stream (for accounting) and strip it
    #: from the relayed stream when the client did not ask for it. Turn off for servers that
    #: reject ``stream_options``.
    stream_usage: bool = True


@attrs.frozen
class AnthropicConnection(HTTPConnection):
    """Anthropic's Messages API, translated to and from OpenAI chat completions."""

    #: ``max_tokens`` when the client sends none (Anthropic requires it; OpenAI does not).
    max_tokens: int = 4096
    #: The ``anthropic-version`` header sent upstream (decides which sampling parameters exist).
    anthropic_version: str = "2023-06-01"
    #: ``anthropic-beta`` values sent with every request (merged with the client's header).
    anthropic_beta: tuple[str, ...] = ()
    #: How ``reasoning_effort`` becomes thinking: a token ``budget``, or ``adaptive`` thinking
    #: with ``output_config.effort`` (newer models).
    reasoning: Literal["budget", "adaptive"] = "budget"
    #: Drop request parameters Anthropic cannot honour instead of answering 400.
    drop_unsupported_params: bool = False
    api_type: str = "anthropic"


@attrs.frozen
class GoogleConnection(HTTPConnection):
    """Gemini: the Developer API (API key) or Vertex AI (OAuth from a service account or ADC)."""

    vertexai: bool = False
    project: str | None = None
    location: str = "global"
    #: The path's version segment: ``v1beta`` (Developer API) or ``v1beta1`` (Vertex) by default.
    api_version: str = "v1beta"
    service_account_file: str | None = None
    service_account_info: Mapping[str, Any] | None = attrs.field(default=None, repr=False)
    drop_unsupported_params: bool = False
    #: Images given as https URLs are fetched by the gateway (Gemini wants the bytes).
    image_fetch_max_bytes: int = 20 * 1024 * 1024
    image_fetch_timeout_seconds: float = 10.0
    #: Allow fetching images from loopback/private addresses (off: a request must not make the
    #: gateway reach into its own network).
    image_fetch_allow_private: bool = False
    #: Fields deep-merged into every request body (``safetySettings``, ``generationConfig``...).
    extra_body: Mapping[str, Any] = attrs.field(factory=dict)
    api_type: str = "google"


@attrs.frozen
class EchoConnection:
    """The built-in echo model: answers with the last user message (no keys, no network)."""

    name: str
    #: Pause between streamed words; lets demos and tests watch a stream in progress.
    chunk_delay_seconds: float = 0.0
    #: Price overrides (an echo model costs nothing, but demos of cost tracking want one).
    prices: Mapping[str, Mapping[str, float]] = attrs.field(factory=dict)
    api_type: str = "echo"


@attrs.frozen
class TransformersConnection:
    """A local Hugging Face causal LM run in-process (``api_type = "transformers"``)."""

    name: str
    #: A local directory, or a model id already in the Hugging Face cache (no downloads).
    model: str
    #: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, or ``auto`` (CUDA when available).
    device: str = "auto"
    #: ``auto`` (the checkpoint's), ``float32``, ``float16`` or ``bfloat16``.
    dtype: str = "auto"
    #: Generations running at once; more requests wait in a queue.
    max_concurrency: int = 1
    #: Requests waiting for a slot at most; beyond, 503.
    max_queue: int = 16
    #: ``max_new_tokens`` when the client sets no ``max_tokens``.
    max_new_tokens: int = 512
    #: Run code shipped with the model (off: a model directory is data, not a program).
    trust_remote_code: bool = False
    #: A Jinja chat template replacing the tokenizer's own.
    chat_template: str | None = None
    #: Extra keyword arguments for ``AutoModelForCausalLM.from_pretrained``.
    model_kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    prices: Mapping[str, Mapping[str, float]] = attrs.field(factory=dict)
    api_type: str = "transformers"


@attrs.frozen
class CustomConnection:
    """A user's own async callable or class acting as a connection (lm-proxy's convention)."""

    name: str
    ref: ExtensionRef
    api_type: str = "custom"


ConnectionConfig = (
    OpenAIConnection
    | AnthropicConnection
    | GoogleConnection
    | EchoConnection
    | TransformersConnection
    | StrategyConnection
    | CustomConnection
)


@attrs.frozen
class RouteRule:
    """``pattern = "connection.model"``: ``model`` None means pass the client's name through."""

    pattern: str
    connection: str
    model: str | None
    #: The rule's position in the file (0-based), used in messages.
    index: int


@attrs.frozen
class Group:
    """A set of virtual keys and what they may use."""

    name: str
    #: SHA-256 hex digests of the group's keys (plain keys are hashed at load time).
    api_key_digests: tuple[str, ...] = attrs.field(default=(), repr=False)
    #: None means every connection.
    allowed_connections: frozenset[str] | None = None
    #: Glob patterns over the model name the client asked for; None means every model.
    allowed_models: tuple[str, ...] | None = None

    def allows_connection(self, connection: str) -> bool:
        """Whether keys of this group may use ``connection``."""
        return self.allowed_connections is None or connection in self.allowed_connections


@attrs.frozen
class Config:
    """The whole validated configuration. Build it with :func:`build_config` or
    :func:`lm_gateway.config.load_config`, never by hand."""

    connections: Mapping[str, ConnectionConfig]
    routing: tuple[RouteRule, ...]
    groups: Mapping[str, Group]
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    api_prefix: str = "/v1"
    debug: bool = False
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    dev_autoreload: bool = False
    #: None = the built-in in-config key check.
    api_key_check: ExtensionRef | None = None
    model_listing_mode: ModelListingMode = "as_is"
    model_listing_cache_seconds: float = 300.0
    model_info: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    #: Secret for the keyed hash that identifies API keys in logs (lm-proxy's ``encryption_key``).
    encryption_key: str | None = attrs.field(default=None, repr=False)
    request_timeout_seconds: float = 600.0
    max_request_body_bytes: int = 32 * 1024 * 1024
    #: Where the config came from (a file path or "<embedded default>"), for messages.
    source: str = "<dict>"
    #: Things that are allowed but probably not what the user meant (logged at startup).
    warnings: tuple[str, ...] = ()
    #: Before-handlers, in order (each resolved when the gateway is built).
    before: tuple[ExtensionRef, ...] = ()
    #: Networks whose ``X-Forwarded-For`` / ``Forwarded`` headers are believed.
    trusted_proxies: tuple[str, ...] = ()
    #: Usage loggers (lm-proxy's ``loggers``), each resolved when the gateway is built.
    loggers: tuple[ExtensionRef, ...] = ()
    #: Model price overrides: pattern -> {input, output, cached_input, cache_write} per 1M tokens.
    prices: Mapping[str, Mapping[str, float]] = attrs.field(factory=dict)
    #: Serve Prometheus metrics at ``metrics_path``.
    metrics: bool = True
    metrics_path: str = "/metrics"
    #: When set, metrics are served only on this port (the CLI listens on it too, same host)
    #: and the API is not served there.
    metrics_port: int | None = None
    #: When set, /metrics needs ``Authorization: Bearer <metrics_api_key>``.
    metrics_api_key: str | None = attrs.field(default=None, repr=False)
    #: On shutdown, how long loggers may take to write what is still queued.
    log_flush_seconds: float = 10.0
