"""Typed configuration objects built from plain mappings (Kedro parameters, YAML, CLI).

Every config class is a frozen dataclass; `from_mapping` rejects unknown keys and wrong
types *before* any work starts, and names the offending field in the error.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _check_type(value, arm, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    return value


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | T | None, where: str = "") -> T:
    """Build dataclass `cls` from `mapping`, checking names and types; `where` prefixes errors.

    Nested dataclass fields are built recursively; a `validate()` method, when present,
    runs last so range and cross-field checks see typed values.
    """
    if isinstance(mapping, cls):
        return mapping
    name = where or cls.__name__
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {unknown}; expected some of {sorted(fields)}")
    kwargs = {}
    for key, field in fields.items():
        path = f"{name}.{key}" if name else key
        if key in mapping:
            kwargs[key] = _check_type(mapping[key], hints[key], path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: required field is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
    return obj


def require(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless cond holds (for use in validate())."""
    if not cond:
        raise ConfigError(message)


def as_dict(obj: Any) -> dict:
    """Plain dict of a (nested) config dataclass, tuples as lists: for logging and JSON."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(obj)


def deep_merge(base: Mapping[str, Any] | None, override: Mapping[str, Any] | None) -> dict:
    """Recursively merge `override` onto `base` (mappings merge, anything else replaces).

    Parameters are written as a common block plus per-dataset overrides; this is the one
    place that combines them.
    """
    out = dict(base or {})
    for key, value in (override or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
