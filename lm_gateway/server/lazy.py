"""``lm_gateway.app``: the ASGI app for ``hypercorn -k trio lm_gateway:app``.

Hypercorn finds the app with ``eval("app", vars(module))``, so it must be a real module attribute
that exists before any config is read. :class:`LazyApp` is that attribute: it builds the gateway
on first use (the lifespan startup) from ``LM_GATEWAY_CONFIG`` (default ``./config.toml``;
``:default:`` selects the embedded echo config), loading ``./.env`` first if present
(``LM_GATEWAY_ENV`` names another file; empty disables it). ``LM_GATEWAY_DEBUG`` turns debug on.

Startup failures end the worker process with one line on stderr and a non-zero exit code, which
makes Hypercorn exit with it: Hypercorn would otherwise print a traceback for a failed lifespan
startup and still exit with 0. The same happens under Hypercorn's asyncio worker, which cannot
run a trio app: the line says to use ``-k trio``.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "config.toml"
EMBEDDED_SENTINEL = ":default:"
TRIO_REQUIRED = (
    "lm-gateway runs on trio; start it with `hypercorn -k trio lm_gateway:app` "
    "(Hypercorn's default worker is asyncio)"
)


def _running_on_trio() -> bool:
    import trio

    try:
        trio.lowlevel.current_task()
    except RuntimeError:  # not inside trio.run (e.g. Hypercorn's asyncio worker)
        return False
    return True


def _die(message: str, code: int) -> None:
    """End this worker process now with one line on stderr (see the module docstring)."""
    sys.stderr.write(f"lm-gateway: {message}\n")
    sys.stderr.flush()
    os._exit(code)


#: Collector thresholds for a server process: (young, middle, old). Python's default
#: (700, 10, 10) ran a full collection every few seconds under load; with a thousand streams
#: open, each one walked ~300k objects and stalled every stream for up to 120 ms
#: (doc/benchmarks.md). Young collections stay cheap at 10,000; full ones become rare.
GC_THRESHOLDS = (10_000, 50, 100)


def tune_garbage_collector() -> None:
    """Make the collector's pauses rare and short in a process that serves the gateway (the
    ``lm-gateway`` command, and ``lm_gateway:app``'s workers). Call once, after start-up.

    What start-up built (modules, config, routing tables) lives as long as the process: frozen
    out of the collector's view, it is not walked by every full collection again. Reference
    counting still frees everything promptly; the thresholds only pace the cycle collector.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def build_app_from_environment(environ: dict[str, str] | None = None) -> Any:
    """Load config and build the QuartTrio app as the environment says (blocking; startup only).

    Raises:
        ConfigError: the config or .env file is missing or invalid.
    """
    from ..config import apply_env_file, load_config, parse_bool_word
    from .app import create_app

    env = os.environ if environ is None else environ
    env_file = env.get("LM_GATEWAY_ENV")
    if env_file is None:
        if Path(".env").is_file():
            apply_env_file(Path(".env"))
    elif env_file:
        apply_env_file(Path(env_file))
    path = env.get("LM_GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH
    config = load_config(None if path == EMBEDDED_SENTINEL else path)
    debug_word = env.get("LM_GATEWAY_DEBUG")
    if debug_word is not None and parse_bool_word(debug_word) is not None:
        import attrs

        config = attrs.evolve(config, debug=bool(parse_bool_word(debug_word)))
    app = create_app(config)
    tune_garbage_collector()  # this process exists to serve the gateway
    return app


class LazyApp:
    """An ASGI callable that builds the real app on first use (see the module docstring)."""

    def __init__(self) -> None:
        self._app: Any = None
        self._lock: Any = None

    async def _get(self) -> Any:
        import trio

        from ..errors import ConfigError

        if self._app is not None:
            return self._app
        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            if self._app is None:
                try:
                    self._app = await trio.to_thread.run_sync(build_app_from_environment)
                except ConfigError as exc:
                    _die(f"config error: {exc}", 1)
        return self._app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not _running_on_trio():
            if scope["type"] == "lifespan":
                _die(TRIO_REQUIRED, 3)
            if scope["type"] == "http":
                await _plain_error(send, TRIO_REQUIRED)
            return
        app = await self._get()
        await app(scope, receive, send)


async def _plain_error(send: Any, message: str) -> None:
    import orjson

    body = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "server_error",
                "param": None,
                "code": "wrong_worker",
            }
        }
    )
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
