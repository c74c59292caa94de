"""The ``lm-gateway`` command.

::

    lm-gateway [serve] [--config PATH] [--env PATH] [--debug | --no-debug]
                       [--host HOST] [--port PORT] [--workers N]
    lm-gateway check   [--config PATH] [--env PATH]

``serve`` (the default) runs the gateway on Hypercorn's trio worker; ``check`` validates a config,
loads every extension it names and prints the resolved routing table, without serving.

Exit codes: 0 success; 1 the server failed at run time (e.g. the port is taken); 2 bad command
line, config or ``.env`` file (one line on stderr naming the key at fault).

Without ``--config``, ``./config.toml`` is used if it exists, otherwise the embedded default
(the echo model, any key accepted, bound to 127.0.0.1), so the command works on a fresh machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs

from . import __version__
from .config import Config, apply_env_file, load_config, parse_bool_word
from .config.model import (
    EchoConnection,
    GoogleConnection,
    HTTPConnection,
    StrategyConnection,
    TransformersConnection,
)
from .errors import ConfigError

log = logging.getLogger("lm_gateway")

DEFAULT_CONFIG = "config.toml"
DEFAULT_ENV = ".env"
#: Set in the child process the autoreloader starts, so the child serves instead of watching.
RELOADER_CHILD_ENV = "LM_GATEWAY_RELOADER_CHILD"
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A problem with the command line or its inputs; reported as one line, exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {value}")
    return value


def _add_common(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        default=default,
        help=f"config file (.toml, .yaml, .json or .py); default ./{DEFAULT_CONFIG}, or the "
        "embedded echo config if that file does not exist",
    )
    parser.add_argument(
        "--env",
        "--env-file",
        dest="env",
        metavar="PATH",
        default=default,
        help=f"a .env file to load (default ./{DEFAULT_ENV} if present; --env '' disables); "
        "variables already set in the environment win",
    )
    parser.add_argument(
        "--debug",
        action=argparse.BooleanOptionalAction,
        default=default,
        help="debug logging and upstream error details in responses (default: $LM_GATEWAY_DEBUG "
        "or the config's 'debug')",
    )


def _add_serve(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--host", default=default, help="address to listen on (overrides the config)"
    )
    parser.add_argument(
        "--port", type=_port, default=default, help="port to listen on (overrides the config)"
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=default if default is not None else 1,
        metavar="N",
        help="number of worker processes (default 1)",
    )
    parser.add_argument(
        "--server",
        choices=("lm-gateway", "hypercorn"),
        default=default if default is not None else "lm-gateway",
        help="the HTTP server: lm-gateway's own lean HTTP/1.1 server (default; one worker, "
        "plain HTTP) or Hypercorn (always used with --workers above 1 or ssl_certfile)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser. Options may come before or after the subcommand."""
    parser = argparse.ArgumentParser(
        prog="lm-gateway", description="An OpenAI-compatible LLM gateway."
    )
    _add_common(parser, None)
    _add_serve(parser, None)
    parser.add_argument("--version", action="version", version=f"lm-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{serve,check}")
    # SUPPRESS: a subcommand's defaults must not overwrite options given before it.
    serve = sub.add_parser("serve", help="run the gateway (default)")
    _add_common(serve, argparse.SUPPRESS)
    _add_serve(serve, argparse.SUPPRESS)
    check = sub.add_parser(
        "check", help="validate a config and print the resolved routing table, without serving"
    )
    _add_common(check, argparse.SUPPRESS)
    return parser


def _apply_env(option: str | None) -> Path | None:
    """Load the .env file the options name; returns its path (None when none was loaded)."""
    if option is None:
        path = Path(DEFAULT_ENV)
        if not path.is_file():
            return None
    elif option == "":
        return None
    else:
        path = Path(option)
    apply_env_file(path)
    return path


def _load(option: str | None) -> tuple[Config, Path | None]:
    """The config the options name, and its file (None for the embedded default)."""
    if option is None:
        path = Path(DEFAULT_CONFIG)
        if not path.is_file():
            return load_config(None), None
    else:
        path = Path(option)
    return load_config(path), path


def _debug(flag: bool | None, config: Config) -> bool:
    if flag is not None:
        return flag
    env = os.environ.get("LM_GATEWAY_DEBUG")
    if env is not None:
        word = parse_bool_word(env)
        if word is None:
            raise CommandError(f"LM_GATEWAY_DEBUG={env!r} is not a yes/no value")
        return word
    return config.debug


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # The access log (a line per request) is written a batch at a time.
    from .observability import BatchedStreamHandler

    access = logging.getLogger("lm_gateway.access")
    handler = BatchedStreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    access.handlers[:] = [handler]
    access.propagate = False
    # httpx logs every request at INFO; that is the access log's job.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    # Hypercorn writes its own log lines to stderr (errorlog "-"); without this they would also
    # reach the root handler and appear twice.
    logging.getLogger("hypercorn.error").propagate = False


def describe(config: Config, warnings: Sequence[str]) -> str:
    """The human-readable summary ``lm-gateway check`` prints."""
    lines = [f"config: {config.source} (valid)"]
    scheme = "https" if config.ssl_certfile else "http"
    lines.append(
        f"listen: {scheme}://{config.host}:{config.port}  api_prefix: {config.api_prefix or '/'}"
        f"{'' if config.enabled else '  (DISABLED: every endpoint answers 503)'}"
    )
    lines.append("connections:")
    width = max((len(n) for n in config.connections), default=0)
    for name, conn in config.connections.items():
        if isinstance(conn, GoogleConnection):
            where = f"vertex {conn.project}/{conn.location}" if conn.vertexai else "gemini api"
            what = f"{conn.api_type:<10} {conn.api_base} ({where}, {conn.api_version})"
        elif isinstance(conn, HTTPConnection):
            what = f"{conn.api_type:<10} {conn.api_base}"
        elif isinstance(conn, EchoConnection):
            what = "echo"
        elif isinstance(conn, StrategyConnection):
            targets = ", ".join(
                f"{t.connection}.{t.model}" if t.model else t.connection for t in conn.targets
            )
            what = f"strategy   {conn.order}: {targets}"
        elif isinstance(conn, TransformersConnection):
            what = f"local      {conn.model} ({conn.device}, {conn.max_concurrency} at once)"
        else:
            target = conn.ref.import_path or repr(conn.ref.obj)
            what = f"custom     {target}"
        lines.append(f"  {name:<{width}}  {what}")
    lines.append("routing (first match wins):")
    if not config.routing:
        lines.append("  (no rules)")
    pwidth = max((len(r.pattern) for r in config.routing), default=0)
    for rule in config.routing:
        model = rule.model if rule.model is not None else "(the name the client sent)"
        lines.append(
            f"  {rule.index + 1:>3}. {rule.pattern:<{pwidth}}  -> {rule.connection} / {model}"
        )
    lines.append("groups:")
    if config.api_key_check is not None:
        check = config.api_key_check.import_path or repr(config.api_key_check.obj)
        lines.append(f"  (keys checked by {check})")
    for name, group in config.groups.items():
        conns = (
            "*"
            if group.allowed_connections is None
            else ", ".join(sorted(group.allowed_connections))
        )
        models = "*" if group.allowed_models is None else ", ".join(group.allowed_models)
        lines.append(
            f"  {name}: {len(group.api_key_digests)} key(s); connections: {conns}; models: {models}"
        )
    if warnings:
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in warnings)
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    from .service import Gateway

    _apply_env(args.env)
    config, _ = _load(args.config)
    gateway = Gateway(config)  # resolves extensions: imports fail here, not at serve time
    print(describe(config, gateway.warnings()))
    return 0


def _hypercorn_config(config: Config, host: str, port: int, workers: int) -> Any:
    import hypercorn

    hc = hypercorn.Config()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if config.metrics and config.metrics_port is not None:
        mport = config.metrics_port
        hc.bind.append(f"[{host}]:{mport}" if ":" in host else f"{host}:{mport}")
    hc.workers = workers
    hc.worker_class = "trio"
    hc.accesslog = None  # the gateway logs each request itself, with more detail
    hc.errorlog = "-"
    if config.ssl_certfile:
        hc.certfile = config.ssl_certfile
        hc.keyfile = config.ssl_keyfile
    return hc


def _serve(args: argparse.Namespace) -> int:
    env_path = _apply_env(args.env)
    config, config_path = _load(args.config)
    debug = _debug(args.debug, config)
    config = attrs.evolve(config, debug=debug)
    setup_logging(debug)
    host = args.host or config.host
    port = config.port if args.port is None else args.port

    if config.dev_autoreload and not os.environ.get(RELOADER_CHILD_ENV):
        watched = [p for p in (config_path, env_path) if p is not None]
        return _run_with_reloader(watched)

    if config_path is None:
        log.info(
            "no %s here and no --config given: serving the embedded default config (the echo "
            "model; any API key is accepted)",
            DEFAULT_CONFIG,
        )
    from .server import create_app
    from .server.lazy import tune_garbage_collector

    app = create_app(config)  # validates extensions before anything listens
    tune_garbage_collector()
    hc = _hypercorn_config(config, host, port, args.workers)
    if args.workers > 1:
        return _serve_workers(hc, config_path, debug)
    if args.server == "lm-gateway" and not config.ssl_certfile:
        binds = [(host, port)]
        if config.metrics and config.metrics_port is not None:
            binds.append((host, config.metrics_port))
        return _serve_edge(app, binds)
    return _serve_single(app, hc)


async def _signalled() -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            return


def _serve_edge(app: Any, binds: list[tuple[str, int]]) -> int:
    """One process on lm-gateway's own HTTP/1.1 server (:mod:`lm_gateway.server.edge`)."""
    import trio

    from .server.edge import serve

    where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in binds)
    try:
        trio.run(partial(serve, app, binds, shutdown_trigger=_signalled))
    except OSError as exc:
        raise RuntimeFailure(f"cannot serve on {where}: {exc}") from exc
    return 0


def _serve_single(app: Any, hc: Any) -> int:
    import hypercorn.trio
    import trio

    async def main() -> None:
        await hypercorn.trio.serve(app, hc, shutdown_trigger=_signalled)

    try:
        trio.run(main)
    except OSError as exc:
        raise RuntimeFailure(f"cannot serve on {', '.join(hc.bind)}: {exc}") from exc
    except BaseExceptionGroup as group:
        # Hypercorn binds inside its nursery, so a taken port arrives wrapped in a group.
        failed = group.subgroup(OSError)
        if failed is None:
            raise
        first = _first_leaf(failed)
        raise RuntimeFailure(f"cannot serve on {', '.join(hc.bind)}: {first}") from group
    return 0


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _serve_workers(hc: Any, config_path: Path | None, debug: bool) -> int:
    """N worker processes (Hypercorn's spawn model); each builds the app from the environment."""
    from hypercorn.run import run

    from .server.lazy import EMBEDDED_SENTINEL

    os.environ["LM_GATEWAY_CONFIG"] = (
        str(config_path.resolve()) if config_path else EMBEDDED_SENTINEL
    )
    os.environ["LM_GATEWAY_DEBUG"] = "1" if debug else "0"
    os.environ["LM_GATEWAY_ENV"] = ""  # already applied to this environment, which workers inherit
    hc.application_path = "lm_gateway:app"
    # Metrics from all workers: prometheus-client's multiprocess mode, in a fresh directory
    # (left-over files from an earlier run would be added in). The workers are spawned, so they
    # import prometheus-client after this is set.
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="lm-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    try:
        return run(hc)
    except OSError as exc:
        raise RuntimeFailure(f"cannot serve on {', '.join(hc.bind)}: {exc}") from exc
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def _watched_files(extra: Sequence[Path]) -> list[Path]:
    package = Path(__file__).resolve().parent
    return [*package.rglob("*.py"), *(p.resolve() for p in extra)]


def _snapshot(files: Sequence[Path]) -> dict[Path, float]:
    out = {}
    for path in files:
        try:
            out[path] = path.stat().st_mtime
        except OSError:
            out[path] = -1.0
    return out


def _run_with_reloader(extra: Sequence[Path], poll_seconds: float = 0.5) -> int:
    """Run the server in a child process and restart it when code, config or .env change.

    A child that fails (say, the edited config is invalid) is restarted on the next change; the
    reloader itself stops on SIGINT/SIGTERM and takes the child with it.
    """
    stop = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    argv = [sys.executable, "-m", "lm_gateway", *sys.argv[1:]]
    env = {**os.environ, RELOADER_CHILD_ENV: "1"}
    files = _watched_files(extra)
    log.info("dev_autoreload: watching %d files for changes", len(files))
    while not stop:
        before = _snapshot(files)
        child = subprocess.Popen(argv, env=env)
        changed: list[Path] = []
        while not stop and not changed:
            time.sleep(poll_seconds)
            now = _snapshot(files)
            changed = [p for p, m in now.items() if before.get(p) != m]
            if child.poll() is not None and not changed:
                continue  # wait for an edit to fix whatever made it exit
        if changed:
            log.info("change detected in %s: restarting", ", ".join(str(p) for p in changed[:3]))
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return 0


class RuntimeFailure(Exception):
    """The server could not run (exit code 1)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lm-gateway``; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        if args.command == "check":
            return _check(args)
        return _serve(args)
    except (ConfigError, CommandError) as exc:
        sys.stderr.write(f"lm-gateway: config error: {exc}\n")
        return EXIT_USAGE
    except RuntimeFailure as exc:
        sys.stderr.write(f"lm-gateway: {exc}\n")
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 0


def run() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())
