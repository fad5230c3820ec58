"""A name -> implementation table filled by a decorator.

Boundary: no I/O and no knowledge of what is registered. Transplant methods, distillation
divergences and benchmark backends each keep one :class:`Registry`; adding an
implementation is one new module with ``@REGISTRY.register("name")``, and the CLI offers
``REGISTRY.names()``, so it never needs editing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A dict of implementations by name; ``kind`` names them in errors."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: file the decorated object under ``name`` (names are unique)."""
        def wrap(obj: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self[name] = obj
            return obj

        return wrap

    def names(self) -> list[str]:
        return sorted(self)
