"""A name -> component registry, filled by a decorator (timm style).

Every extensible family of the platform (fusion tasks, metrics, baselines, network
operations, hypergradient methods, ...) is one ``Registry``. Tests parametrize over
``registry.names()`` so that a newly registered entry is tested automatically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from timfusion.platform.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named components of one kind, registered with ``@registry.register("name")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable[[T], T]:
        """Decorator registering a class or function under ``name`` (default: its ``__name__``)."""

        def decorate(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = obj
            self._meta[key] = dict(meta)
            return obj

        return decorate

    def get(self, name: str) -> T:
        """The component called ``name``; an unknown name is a UserError listing the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}"
            ) from None

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
