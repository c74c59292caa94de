"""Configuration: lm-proxy's format (TOML, YAML, JSON, Python), validated into frozen values.

``load_config(path)`` reads a file; ``build_config(data, environ=...)`` validates plain data.
Both raise :class:`lm_gateway.errors.ConfigError` naming the dotted key path at fault.
"""

from .load import (
    EMBEDDED_DEFAULT,
    EMBEDDED_DEFAULT_NAME,
    apply_env_file,
    load_config,
    read_config_data,
)
from .model import (
    AnthropicConnection,
    Config,
    ConnectionConfig,
    CustomConnection,
    EchoConnection,
    ExtensionRef,
    GoogleConnection,
    Group,
    HTTPConnection,
    OpenAIConnection,
    RouteRule,
)
from .schema import build_config, parse_bool_word

__all__ = [
    "EMBEDDED_DEFAULT",
    "EMBEDDED_DEFAULT_NAME",
    "AnthropicConnection",
    "Config",
    "ConnectionConfig",
    "CustomConnection",
    "EchoConnection",
    "ExtensionRef",
    "GoogleConnection",
    "Group",
    "HTTPConnection",
    "OpenAIConnection",
    "RouteRule",
    "apply_env_file",
    "build_config",
    "load_config",
    "parse_bool_word",
    "read_config_data",
]
