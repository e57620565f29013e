"""One way to name things: a small registry used for latency backends, importance estimators, screening lifts,
datasets, workload models and pipeline stages.

```python
from lm_plugin.registry import Registry

LOSSES: Registry[Callable] = Registry("loss")

@LOSSES.register("l2")
def l2(a, b): ...

LOSSES["l2"]        # the object
LOSSES["l3"]        # UnknownNameError: no loss named 'l3' (did you mean l2?); registered: l2
```

A name is registered once: a second, different object under the same name is refused (registering an equal object
again is a no-op, so re-imported modules are harmless). Built-ins that live in another module are declared by that
module's import path and loaded on the first lookup, so the registry's own module imports nothing above it.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar, overload

from .errors import ConfigurationError, UnknownNameError

__all__ = ["Registry", "close_names"]

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Names to objects of one kind (read-only mapping; add with :meth:`register`).

    Args:
        kind: What is registered, for messages (``"latency backend"``).
        builtins: Modules that register the built-in entries when imported; imported on the first lookup.
        check: Called as ``check(name, obj)`` before an entry is added (raise to refuse it).
    """

    def __init__(self, kind: str, *, builtins: tuple[str, ...] = (),
                 check: Callable[[str, T], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._builtins = builtins
        self._loaded = not builtins
        self._check = check

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Add ``obj`` under ``name``; without ``obj``, a decorator that does.

        Raises:
            ConfigurationError: ``name`` is empty or already names a different object.
        """

        def add(value: T) -> T:
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"a {self.kind} needs a non-empty name, got {name!r}")
            if self._check is not None:
                self._check(name, value)
            taken = self._entries.get(name)
            if taken is not None and taken != value:
                raise ConfigurationError(f"a {self.kind} named {name!r} is already registered ({_label(taken)}); "
                                         "choose another name")
            self._entries[name] = value
            return value

        return add(obj) if obj is not None else add

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (say, one a test added).

        Raises:
            UnknownNameError: nothing has that name.
        """
        value = self[name]
        del self._entries[name]
        return value

    def names(self) -> list[str]:
        """The registered names, sorted (built-ins included)."""
        return sorted(self._all())

    def __getitem__(self, name: str) -> T:
        entries = self._all()
        if name not in entries:
            close = close_names(str(name), list(entries))
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UnknownNameError(f"no {self.kind} named {name!r}{hint}; registered: {', '.join(sorted(entries))}")
        return entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"

    def _all(self) -> dict[str, T]:
        if not self._loaded:
            self._loaded = True  # set first: the built-in modules register into this registry while importing
            for module in self._builtins:
                importlib.import_module(module)
        return self._entries


def close_names(name: str, names: list[str], n: int = 5) -> list[str]:
    """What ``name`` was probably meant to be: the closest of ``names`` by edit similarity (a typo), then the names
    that contain it."""
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    return close + [m for m in names if name in m and m not in close][: n - len(close)]


def _label(obj: object) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__qualname__
