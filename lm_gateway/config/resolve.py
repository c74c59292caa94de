"""Turning :class:`ExtensionRef` values into live objects (importing user code).

Runs at startup. A dotted path names a module attribute (``my_pkg.checks.validate``); a class
named by a plain string is instantiated without arguments and a ``class = ...`` table calls its
target with the table's other keys, as lm-proxy did; a key whose value is itself a ``class``
table (an :class:`ExtensionRef` in ``params``) is built first and passed as the object.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ..errors import ConfigError
from .model import ExtensionRef


def import_object(path: str, config_path: str) -> Any:
    """Import ``package.module.attribute``.

    Raises:
        ConfigError: the module or attribute does not exist, or importing it failed.
    """
    module_name, dot, attr = path.rpartition(".")
    if not dot or not module_name or not attr:
        raise ConfigError(f"{path!r} is not a dotted path (module.attribute)", config_path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import {module_name!r} for {path!r}: {exc}", config_path
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"importing {module_name!r} raised {type(exc).__name__}: {exc}", config_path
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}", config_path) from exc


def resolve_extension(ref: ExtensionRef) -> Any:
    """The object a reference stands for: imported, and instantiated where the config says so.

    Raises:
        ConfigError: import or construction failed (naming ``ref.config_path``).
    """
    target: Any = (
        ref.obj if ref.obj is not None else import_object(str(ref.import_path), ref.config_path)
    )
    if ref.instantiate or (inspect.isclass(target) and ref.obj is None):
        params = {
            key: resolve_extension(value) if isinstance(value, ExtensionRef) else value
            for key, value in ref.params.items()
        }
        try:
            return target(**params)
        except TypeError as exc:
            raise ConfigError(f"cannot create {_name(target)}: {exc}", ref.config_path) from exc
        except Exception as exc:
            raise ConfigError(
                f"creating {_name(target)} raised {type(exc).__name__}: {exc}", ref.config_path
            ) from exc
    if inspect.isclass(target):
        try:
            return target()
        except Exception as exc:
            raise ConfigError(
                f"creating {_name(target)} raised {type(exc).__name__}: {exc}", ref.config_path
            ) from exc
    return target


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__
