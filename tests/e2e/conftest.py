"""Every end-to-end test that serves an app runs twice: on Hypercorn (``hypercorn
lm_gateway:app``, ``--workers``, TLS, host apps) and on lm-gateway's own HTTP server (what
``lm-gateway serve`` runs by default). ``LM_GATEWAY_TEST_SERVER`` picks one of them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import tests.conftest

SERVERS = (
    [os.environ["LM_GATEWAY_TEST_SERVER"]]
    if os.environ.get("LM_GATEWAY_TEST_SERVER")
    else ["hypercorn", "lm-gateway"]
)
#: Modules that start their servers themselves (subprocesses, the edge directly).
OWN_SERVERS = ("test_cli", "test_edge")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.rsplit(".", 1)[-1] in OWN_SERVERS:
        return
    if "http_server" in metafunc.fixturenames:
        metafunc.parametrize("http_server", SERVERS, indirect=True)


@pytest.fixture(autouse=True)
def http_server(request: pytest.FixtureRequest) -> Iterator[str]:
    server = getattr(request, "param", "hypercorn")
    previous = tests.conftest.TEST_SERVER
    tests.conftest.TEST_SERVER = server
    try:
        yield server
    finally:
        tests.conftest.TEST_SERVER = previous
