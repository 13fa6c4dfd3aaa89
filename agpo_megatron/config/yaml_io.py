"""Typed dataclass configs from YAML plus dotted command-line overrides.

    cfg = load_config(TrainConfig, "examples/agpo_qwen7b.yaml", ["algo.gamma=0.05", "parallel.tp=4"])

Values in overrides are parsed as YAML scalars (`1e-6`, `true`, `null`, `[1, 2]`). Unknown keys and
type mismatches raise `ConfigError` naming the dotted field and the file (a renamed field: its new name,
from the section's `RENAMED` table), before any model or process group exists. `__post_init__` of
each dataclass then validates ranges.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
"""Decimal and scientific numbers (`1e-6`, `-2.5E3`, `.5`), which YAML 1.1 leaves as strings."""


class ConfigError(ValueError):
    """A config value is unknown, mistyped or out of range; the message names the field."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            # NOTE: YAML 1.1 (PyYAML) reads `1e-6` as a string (it wants `1.0e-6`); users write 1e-6.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a nested dict, checking every key and type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]  # T: a dataclass
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        renamed = getattr(cls, "RENAMED", {})  # {old field: new field}, a ClassVar of the section
        for old in (k for k in unknown if k in renamed):
            raise ConfigError(f"{prefix}{old} was renamed {prefix}{renamed[old]}")
        raise ConfigError(
            f"unknown config field(s) {[prefix + k for k in unknown]}; {where or cls.__name__} accepts {sorted(fields)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict (in place; also returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    prepare: Callable[[dict[str, Any]], None] | None = None,
) -> T:
    """YAML file (optional) + dotted overrides -> validated dataclass `cls`.

    `prepare(data)` may rewrite the raw dict after the overrides and before validation (e.g. turn
    `tiny:qwen2` into a generated model directory)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    apply_overrides(data, overrides or [])
    try:
        if prepare is not None:
            prepare(data)
        return from_dict(cls, data)
    except (ConfigError, ValueError) as e:
        raise ConfigError(_blame(str(e), path, overrides or [])) from None


def _blame(msg: str, path: str | Path | None, overrides: list[str]) -> str:
    """`msg` prefixed with what the bad value came from: the override that set the field it names
    (the last one, if several did), else the file."""
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        if key and (any(m in msg for m in (f"'{key}'", f"{key}=")) or msg.startswith((f"{key}:", f"{key} "))):
            return f"override {item!r}: {msg}"
    return f"{path or '<overrides>'}: {msg}"
