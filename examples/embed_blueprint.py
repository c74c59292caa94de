"""Embedding lm-gateway in your own Quart-Trio app, under a URL prefix.

Run it:   python examples/embed_blueprint.py         (serves on http://127.0.0.1:8080)
Then:     curl http://127.0.0.1:8080/llm/v1/chat/completions -H 'Authorization: Bearer demo-key' \
               -d '{"model": "anything", "messages": [{"role": "user", "content": "hi"}]}'

The gateway's routes live under /llm (/llm/v1/chat/completions, /llm/v1/models, /llm/health);
the app's own routes are untouched. The config here is inline (the echo model, so it runs with no
provider keys); pass a path to a config file instead in real use.
"""

from __future__ import annotations

from quart_trio import QuartTrio

import lm_gateway

GATEWAY_CONFIG = {
    "connections": {"echo": {"api_type": "echo"}},
    "routing": {"*": "echo.*"},
    "groups": {"demo": {"api_keys": ["demo-key"]}},
}


def make_app() -> QuartTrio:
    """Your application, with the gateway mounted at /llm."""
    app = QuartTrio(__name__)

    @app.get("/")
    async def index() -> dict[str, str]:
        return {"service": "my app", "llm": "/llm/v1"}

    # Registering the blueprint also makes the app give each HTTP request a scope that owns
    # its upstream calls, so a client disconnect closes them (see lm_gateway.server.app).
    app.register_blueprint(lm_gateway.blueprint(GATEWAY_CONFIG), url_prefix="/llm")
    return app


app = make_app()

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=8080)
