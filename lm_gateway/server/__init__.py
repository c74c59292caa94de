"""The HTTP edge: Quart-Trio app factory, blueprint, lazily built ASGI app, and serving."""

from .app import GatewayApp, as_gateway, blueprint, create_app, install_request_scope
from .lazy import LazyApp

__all__ = [
    "GatewayApp",
    "LazyApp",
    "as_gateway",
    "blueprint",
    "create_app",
    "install_request_scope",
]
