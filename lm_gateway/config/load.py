"""Reading config files (TOML, YAML, JSON, Python) and ``.env`` files.

This is the only part of the config package that touches the file system. It runs at startup,
before the server accepts requests (and in a worker thread when the lazily built
``lm_gateway:app`` loads its config), so it may block.

Formats have the same semantics: each produces plain tables that :func:`build_config` validates.
A Python config is executed (it is trusted code, like any config that names classes) and must
define ``config`` as a dict; its values may be live objects (a connection callable, a key check).
"""

from __future__ import annotations

import functools
import json
import os
import runpy
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .model import Config
from .schema import build_config

#: The config used when no file is given: the echo model, any key accepted. It needs no provider
#: keys and no network, so ``lm-gateway`` runs on a fresh machine. Bound to loopback only.
EMBEDDED_DEFAULT: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8000,
    "connections": {"echo": {"api_type": "echo"}},
    "routing": {"*": "echo.*"},
    "api_key_check": "AllowAll",
    "groups": {"default": {}},
}
EMBEDDED_DEFAULT_NAME = "<embedded default>"

SUPPORTED_SUFFIXES = (".toml", ".yaml", ".yml", ".json", ".py")


def read_config_data(path: Path) -> Mapping[str, Any]:
    """Parse a config file into plain tables, choosing the format by extension.

    Raises:
        ConfigError: missing/unreadable file, unknown extension, or a syntax error (with its
            line and column where the parser reports them).
    """
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ConfigError(
            f"cannot tell the format of {str(path)!r}: use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}")
    if suffix == ".py":
        return _read_python(path)
    try:
        # utf-8-sig: editors on Windows add a BOM that parsers would reject.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc}") from exc
    if suffix == ".toml":
        return _parse_toml(text, path)
    if suffix in (".yaml", ".yml"):
        return _parse_yaml(text, path)
    return _parse_json(text, path)


def _parse_toml(text: str, path: Path) -> Mapping[str, Any]:
    import tomlkit
    import tomlkit.exceptions

    try:
        doc = tomlkit.parse(text)
    except tomlkit.exceptions.TOMLKitError as exc:
        # ParseError carries the line and column; KeyAlreadyPresent (a key given twice in a
        # table) does not, but names the key.
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from exc
    return doc.unwrap()


def _parse_yaml(text: str, path: Path) -> Mapping[str, Any]:
    import yaml

    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from exc
    return _top_table(data, path)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    pass


@functools.cache
def _unique_key_loader() -> Any:
    """A yaml SafeLoader that rejects a key given twice in one mapping."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} appears twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _parse_json(text: str, path: Path) -> Mapping[str, Any]:
    # Duplicate keys are an error, not "last one wins": a routing rule given twice would
    # otherwise silently change which rule matches.
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: the key {exc.args[0]!r} appears twice in one object") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    return _top_table(data, path)


def _read_python(path: Path) -> Mapping[str, Any]:
    try:
        namespace = runpy.run_path(str(path), run_name="lm_gateway_config")
    except Exception as exc:
        raise ConfigError(f"{path}: the Python config raised {type(exc).__name__}: {exc}") from exc
    if "config" not in namespace:
        raise ConfigError(f"{path}: a Python config must define 'config' (a dict)")
    return _top_table(namespace["config"], path)


def _top_table(data: Any, path: Path) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a table, got {type(data).__name__}")
    return data


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file into a dict (no environment changes).

    Raises:
        ConfigError: the file cannot be read.
    """
    from dotenv import dotenv_values

    if not path.is_file():
        raise ConfigError(f".env file not found: {str(path)!r}")
    try:
        values = dotenv_values(path, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc}") from exc
    return {k: v for k, v in values.items() if v is not None}


def apply_env_file(path: Path, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Load a ``.env`` file into the environment; variables already set win over the file.

    (lm-proxy let the file override the real environment, so a stale ``.env`` baked into an image
    silently beat the deployment's settings.)

    Returns:
        The names that were set from the file.
    """
    env = os.environ if environ is None else environ
    applied = []
    for name, value in read_env_file(path).items():
        if name not in env:
            env[name] = value
            applied.append(name)
    return applied


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read and validate a config file; ``None`` gives the embedded default.

    Raises:
        ConfigError: anything wrong with the file or its contents.
    """
    env = os.environ if environ is None else environ
    if path is None:
        return build_config(EMBEDDED_DEFAULT, environ=env, source=EMBEDDED_DEFAULT_NAME)
    p = Path(path)
    return build_config(read_config_data(p), environ=env, source=str(p))
