"""Names of built-in extensions, lm-proxy's spellings of them, and what is not built yet.

A config written for lm-proxy names classes such as ``lm_proxy.api_key_check.AllowAll``; we map
those to our own built-ins so the file loads unchanged. Names of features that later work will
bring are recognised here so that a config using them fails with a clear "not supported yet"
instead of an import error or, worse, being ignored.
"""

from __future__ import annotations

BUILTIN_CONFIG_KEY_CHECK = "lm_gateway.auth.check_api_key_in_config"
BUILTIN_ALLOW_ALL = "lm_gateway.auth.AllowAll"
#: lm-proxy's fallback strategy class; read by the config schema into a strategy connection.
FALLBACK_CLASS = "lm_gateway.strategies.Fallback"

#: lm-proxy import paths -> ours. Short names (``AllowAll``) are accepted as well.
LM_PROXY_ALIASES: dict[str, str] = {
    "lm_proxy.api_key_check.check_api_key_in_config": BUILTIN_CONFIG_KEY_CHECK,
    "lm_proxy.api_key_check.in_config.check_api_key_in_config": BUILTIN_CONFIG_KEY_CHECK,
    "lm_proxy.api_key_check.AllowAll": BUILTIN_ALLOW_ALL,
    "lm_proxy.api_key_check.allow_all.AllowAll": BUILTIN_ALLOW_ALL,
    "check_api_key_in_config": BUILTIN_CONFIG_KEY_CHECK,
    "AllowAll": BUILTIN_ALLOW_ALL,
    "CheckAPIKeyWithRequest": "lm_gateway.handlers.keycheck.CheckAPIKeyWithRequest",
    "RateLimiter": "lm_gateway.handlers.RateLimiter",
    "HTTPHeadersForwarder": "lm_gateway.handlers.HTTPHeadersForwarder",
    "BaseLogger": "lm_gateway.observability.loggers.BaseLogger",
    "LogEntryTransformer": "lm_gateway.observability.loggers.LogEntryTransformer",
    "JsonLogWriter": "lm_gateway.observability.writers.JsonLogWriter",
    "SQLLogWriter": "lm_gateway.observability.writers.SQLLogWriter",
    "Fallback": FALLBACK_CLASS,
}

#: Built-ins that are planned but not implemented yet, with the reason shown to the user.
NOT_SUPPORTED_YET: dict[str, str] = {
    "DBLogWriter": (
        "lm-proxy-db-connector's DBLogWriter is not supported; use "
        "lm_gateway.observability.writers.SQLLogWriter with db_url (see doc/observability.md)"
    ),
    "DBLogger": (
        "lm-proxy-db-connector's DBLogger is not supported; use a BaseLogger with "
        "log_writer = { class = 'SQLLogWriter', db_url = ... } (see doc/observability.md)"
    ),
    "init_db": "components are not supported yet",
}

#: ``api_type`` values served by the OpenAI-compatible connection, with their default base URL.
OPENAI_COMPATIBLE_PLATFORMS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "open_ai": "https://api.openai.com/v1",
    "groq": "https://api.groq.com/openai/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "mistral": "https://api.mistral.ai/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "together_ai": "https://api.together.xyz/v1",
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "xai": "https://api.x.ai/v1",
    "cerebras": "https://api.cerebras.ai/v1",
    "perplexity": "https://api.perplexity.ai",
    "deepinfra": "https://api.deepinfra.com/v1/openai",
    "anyscale": "https://api.endpoints.anyscale.com/v1",
    "deep_infra": "https://api.deepinfra.com/v1/openai",
}

ANTHROPIC_API_BASE = "https://api.anthropic.com"
#: The ``anthropic-version`` sent by default: the version that still has ``temperature``,
#: ``top_p`` and ``top_k`` (2026-10-21 removed them), which OpenAI clients send all the time.
ANTHROPIC_DEFAULT_VERSION = "2023-06-01"
GEMINI_API_BASE = "https://generativelanguage.googleapis.com"
#: ``api_type`` values served by the Gemini connection (lm-proxy's deprecated aliases included).
GOOGLE_API_TYPES = ("google", "google_ai_studio", "google_vertex_ai")

#: ``api_type`` values recognised but not served yet, with the reason shown to the user.
API_TYPES_NOT_SUPPORTED_YET: dict[str, str] = {
    "azure": (
        "Azure OpenAI connections are not supported yet; Azure's OpenAI-compatible v1 endpoint "
        "works with api_type = 'openai', api_base = 'https://<resource>.openai.azure.com/openai/v1'"
        " and http_headers = { api-key = 'env:AZURE_OPENAI_API_KEY' }"
    ),
    "function": "api_type 'function' is not supported; name your callable as the connection",
    "cli": "api_type 'cli' is not supported",
    "none": "api_type 'none' is not supported",
}


def canonical_name(path: str) -> str:
    """Map an lm-proxy spelling of a built-in to ours; other paths are returned unchanged."""
    if path in LM_PROXY_ALIASES:
        return LM_PROXY_ALIASES[path]
    if path.startswith("lm_proxy."):
        tail = path.rsplit(".", 1)[-1]
        return LM_PROXY_ALIASES.get(tail, path)
    return path


def not_supported_reason(path: str) -> str | None:
    """If ``path`` names a built-in that is not implemented yet, say so; else None."""
    tail = path.rsplit(".", 1)[-1]
    if tail in NOT_SUPPORTED_YET and (
        "." not in path or path.startswith(("lm_proxy.", "lm_gateway.", "lm_proxy_db_connector."))
    ):
        return NOT_SUPPORTED_YET[tail]
    return None
