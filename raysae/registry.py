"""The one registry class behind raysae's extension points: penalties, SAE kinds, inference
architectures, training recipes and metrics.

A registry maps a name to one entry; registration order is the order of every list derived
from it (CLI choices, search defaults, report columns); a second entry under a taken name is
refused, so a plugin cannot silently replace a built-in (``remove`` first, on purpose).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Name -> entry, in registration order (see the module doc)."""

    def __init__(self, what: str, plural: str | None = None) -> None:
        self.what, self.plural = what, plural or f"{what}s"
        self._entries: dict[str, T] = {}

    def require_free(self, name: str) -> None:
        """Raise the ValueError ``add`` would for ``name`` (before building its entry)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} needs a non-empty name, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered "
                             f"({self._entries[name]!r}); give the new one another name, or "
                             f"remove the old one first")

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a taken name is a ValueError naming both."""
        self.require_free(name)
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> T | None:
        """Unregister ``name`` (a plugin replacing a built-in, a test); its entry or None."""
        return self._entries.pop(name, None)

    def get_entry(self, name: str) -> T:
        """The entry of ``name``; an unknown name is a ValueError listing the registered."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.what} {name!r}; registered {self.plural}: "
                             f"{sorted(self._entries)}") from None

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {list(self._entries)})"
