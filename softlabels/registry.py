"""The one registry helper: named entries registered by decorator, listed and looked up by name.

Used by the models (:mod:`softlabels.models`), the distillation methods
(:mod:`softlabels.losses.registry`), the augmentations (:mod:`softlabels.augment`) and the
built-in datasets (:mod:`softlabels.datasets`). Core module: no imports beyond the errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from softlabels.errors import SpecError

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """``name -> entry`` for one ``kind`` of thing ("method", "model", ...). Names are unique."""

    def __init__(self, kind: str, entries: dict[str, T] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = dict(entries or {})

    def register(self, name: str, check: Callable[[T], None] | None = None) -> Callable[[T], T]:
        """Decorator: register the decorated entry as ``name`` (``check`` may refuse it)."""

        def decorate(entry: T) -> T:
            if name in self._entries:
                old = self._entries[name]
                raise ValueError(f"{self.kind} {name!r} is already registered ({getattr(old, '__qualname__', old)})")
            if check is not None:
                check(entry)
            self._entries[name] = entry
            return entry

        return decorate

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str, hint: str | None = None) -> T:
        """The entry of ``name``; a SpecError naming the choices (or ``hint``) otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise SpecError(hint or f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self):
        return self._entries.items()
