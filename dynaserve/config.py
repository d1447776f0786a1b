"""Config plumbing: frozen dataclasses -> command-line flags and TOML files, validated in one place.

Every config class is a frozen dataclass whose fields carry a trailing ``# help`` comment; ``add_args``
turns the fields into ``--flag`` options (with that help text) and ``build`` makes the instance from
parsed flags layered over an optional TOML section. Environment variables are read only in
:mod:`dynaserve.env`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_HELP_RE = re.compile(r"^\s*(\w+)\s*:[^#]*#\s*(.+)$")


def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text, taken from the trailing comments in the class source."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in src.splitlines():
            m = _HELP_RE.match(line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def _scalar_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--prefix-field`` option per dataclass field (default None = keep the config value)."""
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    helps = field_help(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        tp = _scalar_type(hints[f.name])
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{helps.get(f.name, '')} (default: {default!r})"
        dest = (prefix + f.name).replace("-", "_")
        if tp is bool:
            group.add_argument(flag, dest=dest, default=None, action=argparse.BooleanOptionalAction, help=text)
        elif tp in (int, float, str):
            group.add_argument(flag, dest=dest, default=None, type=tp, help=text)
        elif typing.get_origin(tp) is tuple or typing.get_origin(tp) is list:
            group.add_argument(flag, dest=dest, default=None, nargs="*", help=text)


def load_toml(path: str | Path | None) -> dict[str, Any]:
    """Read a TOML config file (empty dict for None); errors name the file."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from None


def build(cls: type[T], section: dict[str, Any] | None = None, ns: argparse.Namespace | None = None,
          prefix: str = "") -> T:
    """Make ``cls`` from a TOML section overlaid by command-line flags; unknown keys are errors."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, val in (section or {}).items():
        k = key.replace("-", "_")
        if k not in names:
            raise ValueError(f"unknown setting {key!r} for {cls.__name__}; known: {sorted(names)}")
        values[k] = val
    if ns is not None:
        for name in names:
            v = getattr(ns, (prefix + name).replace("-", "_"), None)
            if v is not None:
                values[name] = v
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    for name, v in list(values.items()):
        tp = _scalar_type(hints[name])
        if typing.get_origin(tp) is tuple and isinstance(v, list):
            values[name] = tuple(v)
        elif tp is float and isinstance(v, int) and not isinstance(v, bool):
            values[name] = float(v)
        elif tp in (int, float, str, bool) and (not isinstance(v, tp) or (isinstance(v, bool) and tp is not bool)):
            raise ValueError(f"{cls.__name__}.{name} must be {tp.__name__}, got {v!r}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"bad {cls.__name__}: {exc}") from None
