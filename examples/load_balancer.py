"""A connection made of other connections: round-robin over two OpenAI-compatible backends.

lm-proxy showed load balancing as a Python config whose connection picks another connection per
request; this is the same idea on lm-gateway's connection protocol. Each request gets a
``ChatCall`` whose ``connections`` maps names to the gateway's connections, so a strategy
delegates to one of them, streaming included.

    BACKEND_A_URL=http://127.0.0.1:8001/v1 BACKEND_B_URL=http://127.0.0.1:8002/v1 \\
        lm-gateway --config examples/load_balancer.py

(Built-in fallback, retry and load-balancing strategies are planned; this shows the seam.)
"""

from __future__ import annotations

import itertools
from typing import Any

from lm_gateway.providers import ChatCall, ChatResult, ChatStream


class RoundRobin:
    """Sends each request to the next of ``targets`` (connection names) in turn."""

    def __init__(self, targets: list[str]) -> None:
        self.targets = targets
        self._order = itertools.cycle(targets)

    async def chat(self, call: ChatCall) -> ChatResult:
        return await call.connections[next(self._order)].chat(call)

    async def open_chat_stream(self, call: ChatCall) -> ChatStream:
        return await call.connections[next(self._order)].open_chat_stream(call)

    async def list_models(self) -> list[dict[str, Any]] | None:
        return None

    async def aclose(self) -> None:
        pass  # the targets are the gateway's own connections; it closes them


config = {
    "host": "127.0.0.1",
    "port": 8000,
    "connections": {
        "backend_a": {"api_base": "env:BACKEND_A_URL"},
        "backend_b": {"api_base": "env:BACKEND_B_URL"},
        "balanced": RoundRobin(["backend_a", "backend_b"]),
    },
    "routing": {"*": "balanced.*"},
    "groups": {"default": {"api_keys": ["env:DEMO_KEY"], "allowed_connections": ["balanced"]}},
}
