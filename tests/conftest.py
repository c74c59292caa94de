"""Shared fixtures: a real gateway served by Hypercorn on an ephemeral loopback port."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping
from functools import partial
from typing import Any

import attrs
import hypercorn
import hypercorn.trio
import pytest
import trio

from lm_gateway import build_config, create_app
from lm_gateway.observability import RequestRecord
from lm_gateway.server.app import GatewayApp


class RecordCollector:
    """Collects the gateway's request records (delivered from a worker thread) for assertions."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self._changed = trio.Event()

    def __call__(self, record: RequestRecord) -> None:
        self.records.append(record)
        trio.from_thread.run_sync(self._wake)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(
        self, predicate: Callable[[RequestRecord], bool], timeout: float = 10.0
    ) -> RequestRecord:
        """The first record satisfying ``predicate``, waiting for it if needed."""
        with trio.fail_after(timeout):
            while True:
                for record in self.records:
                    if predicate(record):
                        return record
                await self._changed.wait()


@attrs.define
class RunningGateway:
    url: str
    app: GatewayApp
    records: RecordCollector

    @property
    def base_url(self) -> str:
        return f"{self.url}{self.app.gateway.config.api_prefix}"


def config_from(data: Mapping[str, Any], **environ: str) -> Any:
    return build_config(data, environ={**os.environ, **environ})


#: Which HTTP server :func:`serve_app` uses: Hypercorn (``hypercorn``) or lm-gateway's own
#: (``lm-gateway``). ``tests/e2e`` runs each of its tests on both (see its conftest).
TEST_SERVER = "hypercorn"


@contextlib.asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """Serve any ASGI app on 127.0.0.1:<ephemeral>; yields its base URL."""
    if TEST_SERVER == "lm-gateway":
        async with serve_app_on_edge(app) as url:
            yield url
        return
    hc = hypercorn.Config()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = None
    # Short: a test client's idle keep-alive connection would otherwise hold shutdown.
    hc.graceful_timeout = 0.2
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn.trio.serve, app, hc, shutdown_trigger=shutdown.wait)
        )
        try:
            yield binds[0]
        finally:
            shutdown.set()


@contextlib.asynccontextmanager
async def serve_app_on_edge(app: Any, **settings: Any) -> AsyncIterator[str]:
    """Serve an ASGI app on lm-gateway's own HTTP server; yields its base URL."""
    from lm_gateway.server.edge import EdgeSettings, serve

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            partial(
                serve,
                app,
                [("127.0.0.1", 0)],
                shutdown_trigger=shutdown.wait,
                settings=EdgeSettings(**{"graceful_timeout": 0.2, **settings}),
            )
        )
        try:
            yield urls[0]
        finally:
            shutdown.set()


@contextlib.asynccontextmanager
async def run_gateway(config: Any, **kwargs: Any) -> AsyncIterator[RunningGateway]:
    """Serve a gateway built from ``config`` (anything create_app accepts)."""
    if isinstance(config, Mapping):
        config = config_from(config)
    app = create_app(config, **kwargs)
    collector = RecordCollector()
    app.gateway.records.listeners.append(collector)
    async with serve_app(app) as url:
        yield RunningGateway(url=url, app=app, records=collector)


@pytest.fixture
def echo_config() -> dict[str, Any]:
    return {
        "connections": {"echo": {"api_type": "echo"}},
        "routing": {"*": "echo.*"},
        "groups": {"default": {"api_keys": ["sk-test"]}},
    }
