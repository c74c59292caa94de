"""Connections: the OpenAI-compatible HTTP upstream, the echo model, and users' own callables."""

from __future__ import annotations

from ..config.model import (
    AnthropicConnection,
    ConnectionConfig,
    CustomConnection,
    EchoConnection,
    GoogleConnection,
    OpenAIConnection,
    TransformersConnection,
)
from ..config.resolve import resolve_extension
from ..errors import ConfigError
from .base import ChatCall, ChatResult, ChatStream, Connection, close_quietly
from .custom import wrap_custom
from .echo import EchoProvider
from .openai import OpenAIProvider

__all__ = [
    "ChatCall",
    "ChatResult",
    "ChatStream",
    "Connection",
    "EchoProvider",
    "OpenAIProvider",
    "build_connection",
    "close_quietly",
]


def build_connection(config: ConnectionConfig) -> Connection:
    """Create the connection a config entry describes (no I/O; pools open lazily).

    Raises:
        ConfigError: a custom connection cannot be imported or is not usable as a connection.
    """
    if isinstance(config, OpenAIConnection):
        return OpenAIProvider(config)
    if isinstance(config, AnthropicConnection):
        from .anthropic import AnthropicProvider

        return AnthropicProvider(config)
    if isinstance(config, GoogleConnection):
        from .google import GoogleProvider

        return GoogleProvider(config)
    if isinstance(config, EchoConnection):
        return EchoProvider(config)
    if isinstance(config, TransformersConnection):
        from .local import TransformersProvider

        return TransformersProvider(config)
    if isinstance(config, CustomConnection):
        obj = resolve_extension(config.ref)
        try:
            return wrap_custom(config.name, obj)
        except TypeError as exc:
            raise ConfigError(str(exc), config.ref.config_path) from exc
    raise ConfigError(f"unsupported connection type {type(config).__name__}")  # pragma: no cover
