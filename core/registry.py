"""Name -> entry tables for the project's extension points.

Backends (:data:`maven_edge.runtime.backends.BACKENDS`), ONNX Runtime execution providers
(:data:`maven_edge.runtime.backends.providers.PROVIDERS`), visual modes
(:data:`maven_edge.core.config.VISUAL_MODES`) and quantization recipes
(:data:`maven_edge.calibration.quantize.QUANT_RECIPES`) are each one :class:`Registry`: adding
one is a new entry (and, for a backend or a recipe, the module that implements it); the CLI's
choices and help text come from the tables, so nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from maven_edge.core.errors import InputError

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered table of named entries; unknown names raise an InputError listing the known ones."""

    def __init__(self, kind: str):
        self.kind = kind  # what an entry is, in words: "backend", "execution provider", ...
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise InputError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
