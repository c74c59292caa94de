"""Every example config loads, validates and builds (no example rots unnoticed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm_gateway import Gateway, load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENV = {
    "OPENAI_API_KEY": "sk-x",
    "TEAM_KEY": "team",
    "INTERN_KEY": "intern",
    "DEMO_KEY": "demo",
    "BACKEND_A_URL": "http://127.0.0.1:8001/v1",
    "BACKEND_B_URL": "http://127.0.0.1:8002/v1",
    "ANTHROPIC_API_KEY": "sk-ant",
    "GEMINI_API_KEY": "g",
    "GOOGLE_CLOUD_PROJECT": "p",
    "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/sa.json",
    "REDIS_URL": "redis://127.0.0.1:6379/15",
    "METRICS_KEY": "m",
    "LOG_DB_URL": "sqlite://",
}


@pytest.mark.parametrize(
    "path",
    sorted(p for p in EXAMPLES.iterdir() if p.suffix in {".toml", ".yaml", ".json"}
           or p.name in {"python_config.py", "load_balancer.py"}),
    ids=lambda p: p.name,
)
def test_example_config_builds(path: Path) -> None:
    config = load_config(path, environ=ENV)
    gateway = Gateway(config)
    assert gateway.router.rules
    assert not gateway.warnings()
