"""lm-gateway: one OpenAI-compatible endpoint in front of every LLM a team uses.

Entry points:

- ``lm-gateway --config config.toml`` (the CLI, :mod:`lm_gateway.cli`);
- ``hypercorn -k trio lm_gateway:app`` (:data:`app`, built lazily from ``LM_GATEWAY_CONFIG``);
- :func:`create_app` (a QuartTrio app) and :func:`blueprint` (to mount in your own QuartTrio app).
"""

from .config import Config, build_config, load_config
from .errors import ConfigError, GatewayError
from .server import GatewayApp, LazyApp, blueprint, create_app
from .service import Gateway

__version__ = "0.1.0"

#: The ASGI app for ``hypercorn -k trio lm_gateway:app`` (a real attribute: Hypercorn looks it
#: up with ``eval("app", vars(module))``).
app = LazyApp()

__all__ = [
    "Config",
    "ConfigError",
    "Gateway",
    "GatewayApp",
    "GatewayError",
    "LazyApp",
    "__version__",
    "app",
    "blueprint",
    "build_config",
    "create_app",
    "load_config",
]
