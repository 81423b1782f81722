"""One shape for every way kapify is taught a model: a :class:`Registry` maps what a rule matches (a layer class,
a function, a method name) to what it does, with a reason. Each kind (conv types, leaf modules, channel handlers,
layer rules, block handlers, node rules) is one registry; :func:`scoped` undoes what was registered inside it,
for all of them at once (a test registers and leaves nothing behind). ``kapify.extend`` is the public door.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Generic, Hashable, Iterator, List, Optional, Tuple, TypeVar

__all__ = ["Entry", "Registry", "REGISTRIES", "registered", "scoped"]

V = TypeVar("V")


@dataclass(frozen=True)
class Entry(Generic[V]):
    """What a registered key does, and why it is there (shown by ``kapify.extend.registered``)."""

    value: V
    reason: str = ""


class Registry(Generic[V]):
    """``key -> Entry``; a class key also matches its subclasses through :meth:`for_class` (the most specific)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[Hashable, Entry[V]] = {}
        REGISTRIES[kind] = self

    def add(self, key: Hashable, value: V, reason: str = "") -> None:
        self._entries[key] = Entry(value, reason)

    def get(self, key: Hashable) -> Optional[V]:
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def for_class(self, cls: type) -> Optional[V]:
        """The value of ``cls``'s most specific registered class (itself or a base), or None."""
        return next((self._entries[c].value for c in getattr(cls, "__mro__", ()) if c in self._entries), None)

    def keys(self) -> Tuple[Hashable, ...]:
        return tuple(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def entries(self) -> List[Tuple[Hashable, Entry[V]]]:
        return list(self._entries.items())

    def _save(self) -> Dict[Hashable, Entry[V]]:
        return dict(self._entries)

    def _restore(self, saved: Dict[Hashable, Entry[V]]) -> None:
        self._entries.clear()
        self._entries.update(saved)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


#: every registry by its kind, in the order they were made
REGISTRIES: Dict[str, Registry[Any]] = {}


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Registrations made inside the block are undone when it ends (the registries are as they were before).

    Example:
        >>> from torch import nn
        >>> conv_types = REGISTRIES["conv type"]
        >>> class MyConv(nn.Module): ...
        >>> with scoped():
        ...     conv_types.add(MyConv, MyConv, "a test's conv")
        ...     MyConv in conv_types
        True
        >>> MyConv in conv_types
        False
    """
    saved = {kind: registry._save() for kind, registry in REGISTRIES.items()}
    try:
        yield
    finally:
        for kind, registry in REGISTRIES.items():
            registry._restore(saved.get(kind, {}))


def registered(kind: Optional[str] = None) -> List[Tuple[str, Hashable, str]]:
    """(kind, key, reason) of every registered rule, or of one kind's."""
    kinds = [kind] if kind is not None else list(REGISTRIES)
    return [(k, key, entry.reason) for k in kinds for key, entry in REGISTRIES[k].entries()]
