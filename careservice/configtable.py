"""Typed reads from one TOML table, naming the full key in every error and refusing keys nothing read."""

from __future__ import annotations

import difflib
from typing import Any

from careservice.settings import ConfigError


class Table:
    """Typed reads from one TOML table, naming the full key in every error. It remembers which keys
    were read, so that a key nothing reads (a typo such as `require_tsl`) is an error too."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self.data = data
        self.prefix = prefix
        self.read: set[str] = set()
        self.children: list[Table] = []

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.read.add(name)
        if name not in self.data:
            if default is None:
                raise ConfigError(self.key(name), "missing")
            return default
        value = self.data[name]
        if isinstance(value, bool) and kind is not bool:
            raise ConfigError(self.key(name), f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(self.key(name), f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def positive(self, name: str, default: int) -> int:
        value = self.get(name, int, default)
        if value <= 0:
            raise ConfigError(self.key(name), f"must be positive, got {value}")
        return value

    def within(self, name: str, default: int, low: int, high: int) -> int:
        value = self.get(name, int, default)
        if not low <= value <= high:
            raise ConfigError(self.key(name), f"must be from {low} to {high}, got {value}")
        return value

    def sub(self, name: str) -> Table:
        table = Table(self.get(name, dict, {}), self.key(name))
        self.children.append(table)
        return table

    def array(self, name: str, required: bool = False) -> list[Table]:
        """An array of tables (`[[name]]`), each read as its own table."""
        items = self.get(name, list, None if required else [])
        tables = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ConfigError(f"{self.key(name)}[{i}]", "expected a table")
            tables.append(Table(item, f"{self.key(name)}[{i}]"))
        self.children.extend(tables)
        return tables

    def refuse_unknown(self) -> None:
        """Raise for the first key or table that nothing read, suggesting the nearest known name."""
        for name, value in self.data.items():
            if name not in self.read:
                what = "table" if isinstance(value, dict) or (
                    isinstance(value, list) and value and all(isinstance(v, dict) for v in value)) else "key"
                close = difflib.get_close_matches(name, sorted(self.read), n=1, cutoff=0.6)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                raise ConfigError(self.key(name), f"unknown {what}{hint}")
        for child in self.children:
            child.refuse_unknown()


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {"str": "a string", "int": "an integer", "bool": "true or false", "list": "a list", "dict": "a table"}
    return " or ".join(names.get(k.__name__, k.__name__) for k in kinds)
