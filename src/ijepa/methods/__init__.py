"""Pretraining methods behind one interface (`Method`), by the name the config uses.

Adding a method: one module here with a `Method` subclass, and an entry in `METHODS`.
"""
from __future__ import annotations

from ijepa.config import ConfigError
from ijepa.methods.base import Masker, Method
from ijepa.methods.ijepa import IJepa
from ijepa.methods.mae import Mae

__all__ = ["METHODS", "Method", "Masker", "get_method"]

METHODS: dict[str, type[Method]] = {"ijepa": IJepa, "mae": Mae}


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method: unknown method {name!r}; choose one of {sorted(METHODS)}") from None
