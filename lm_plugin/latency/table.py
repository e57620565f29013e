"""Latency tables: measure a set of modules once, cache the results, and look them up by key.

Measuring happens under the cache's exclusive lock (:meth:`~lm_plugin.store.RecordStore.exclusive`): two processes
timing at once on one machine slow each other down, so a second process building a table from the same cache waits,
then reads what the first one measured and times only what is still missing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn
from tqdm import tqdm

from ..errors import ArgumentTypeError, ConfigurationError, UnknownNameError
from ..store import canonical_json, to_jsonable
from .cache import LatencyCache
from .errors import UnstableMeasurementWarning
from .inputs import InputsLike, effective_shapes
from .measurement import Measurement
from .profiler import Profiler

#: How many offending keys a summary warning names before abbreviating.
_KEYS_SHOWN = 5


@runtime_checkable
class TimingSpec(Protocol):
    """What to time for one table entry.

    Attributes:
        inputs: input shape(s) or example tensor(s) of the module, batch dimension first (the profiler's batch
            size replaces it).
    """

    inputs: InputsLike

    def build(self) -> nn.Module:
        """A fresh module to time (weights do not matter, shapes and structure do)."""
        ...

    def cache_key(self) -> Any:
        """JSON-able description of everything about the module, besides its input shapes, that changes its
        latency; entries whose specs describe the same module are measured once. None means: describe the
        module by its table key."""
        ...


@dataclass(frozen=True)
class ModuleSpec:
    """A :class:`TimingSpec` from a factory function.

    Args:
        factory: returns the module to time.
        inputs: input shape(s) or example tensor(s), batch dimension first.
        description: JSON-able description of the module used as its cache key (see
            :meth:`TimingSpec.cache_key`); None uses the table key.
    """

    factory: Callable[[], nn.Module]
    inputs: InputsLike
    description: Any = None

    def build(self) -> nn.Module:
        return self.factory()

    def cache_key(self) -> Any:
        return self.description


Entries = Mapping[Hashable, TimingSpec] | Iterable[tuple[Any, TimingSpec]]


def _lookup_id(key: Any) -> Hashable:
    """How a table key is indexed: its canonical JSON if it has one (so dict keys work), else itself."""
    try:
        return canonical_json(key)
    except TypeError:
        try:
            hash(key)
        except TypeError:
            raise ArgumentTypeError(
                f"table key {key!r} is neither JSON-able nor hashable; use a dict, tuple, string or dataclass"
            ) from None
        return key


def _short(keys: list[Any]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_KEYS_SHOWN])
    return shown + (f" and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else "")


class LatencyTable:
    """Measured latencies, looked up by the key each entry was given (never by position).

    Build one with :meth:`build`. Keys may be any JSON-able value (dicts included, compared in canonical form)
    or any hashable object.

    Attributes:
        signature: :meth:`Profiler.signature` of the profiler that measured the entries.
        measured: how many modules were timed while building (the rest came from the cache).
        reused: how many distinct modules came from the cache.
        unstable: keys whose measurement stayed noisier than the profiler's ``max_spread``.
    """

    def __init__(
        self,
        signature: Mapping[str, Any],
        entries: Iterable[tuple[Any, Measurement]],
        *,
        measured: int = 0,
        reused: int = 0,
    ) -> None:
        self.signature = dict(signature)
        self._entries: dict[Hashable, tuple[Any, Measurement]] = {}
        for key, measurement in entries:
            self._entries[_lookup_id(key)] = (key, measurement)
        self.measured = measured
        self.reused = reused
        self.unstable = [key for key, m in self._entries.values() if not m.stable]

    @classmethod
    def build(
        cls,
        entries: Entries,
        profiler: Profiler,
        *,
        cache: str | os.PathLike[str] | LatencyCache | None = None,
        progress: bool = True,
        description: str = "latency table",
        remeasure_unstable: bool = False,
    ) -> LatencyTable:
        """Measure every entry that the cache does not already hold, and return the full table.

        Entries are measured in order with a progress bar (done / total, ETA). Each measurement is committed to
        the cache as soon as it is taken, so an interrupted build (exception, Ctrl-C, a killed process) resumes
        where it stopped when called again with the same cache. Measuring holds the cache's exclusive lock: a
        second process building from the same cache file waits for it, then measures only what is still missing.

        Example:
            ```python
            specs = {("conv", k): ModuleSpec(lambda k=k: nn.Conv2d(16, 16, k), (1, 16, 32, 32),
                                             description={"k": k}) for k in (1, 3, 5)}
            table = LatencyTable.build(specs, get_profiler("cpu", batch_size=64), cache="lat.sqlite")
            table.ms(("conv", 3))
            ```

        Args:
            entries: ``{key: spec}`` or ``[(key, spec), ...]`` (the pair form allows unhashable keys such as
                dicts). Specs follow :class:`TimingSpec`.
            profiler: the profiler that times the modules.
            cache: cache file path (a SQLite file, created if missing), an open :class:`LatencyCache` for this
                profiler, or None to measure everything in memory.
            progress: show a tqdm progress bar.
            description: label of the progress bar.
            remeasure_unstable: time again the cached entries that were unstable when measured.

        Raises:
            ValueError: if a key is given twice or the cache belongs to another profiler.
        """
        signature = to_jsonable(profiler.signature())
        if isinstance(cache, LatencyCache):
            if cache.signature != signature:
                raise ConfigurationError(
                    "the LatencyCache was opened for another profiler signature; open it with "
                    "profiler.signature() or pass a path"
                )
            store = cache
        else:
            store = LatencyCache(cache, signature)

        pairs = list(entries.items() if isinstance(entries, Mapping) else entries)
        # One cache key per entry; entries that describe the same module at the same shapes share it and
        # are timed once.
        cache_keys: list[dict[str, Any]] = []
        distinct: dict[str, tuple[dict[str, Any], TimingSpec]] = {}
        seen: set[Hashable] = set()
        for key, spec in pairs:
            lookup = _lookup_id(key)
            if lookup in seen:
                raise ConfigurationError(f"table key {key!r} is given twice")
            seen.add(lookup)
            described = spec.cache_key()
            cache_key = {
                "module": to_jsonable(key if described is None else described),
                "inputs": to_jsonable(effective_shapes(spec.inputs, profiler.batch_size)),
            }
            cache_keys.append(cache_key)
            distinct.setdefault(canonical_json(cache_key), (cache_key, spec))

        def missing() -> list[tuple[dict[str, Any], TimingSpec]]:
            return [(k, spec) for k, spec in distinct.values() if needs_measuring(k)]

        def needs_measuring(cache_key: dict[str, Any]) -> bool:
            found = store.get(cache_key)
            return found is None or (remeasure_unstable and not found.stable)

        def say_waiting(holder: str) -> None:
            if progress:
                tqdm.write(f"{description}: waiting for {holder}, which is measuring into {store.path}")

        try:
            total, todo, measured = len(distinct), missing(), 0
            unstable_now: set[str] = set()
            if todo:  # a complete table is read without waiting for anybody
                with store.exclusive("measure", on_wait=say_waiting):
                    todo = missing()  # what another process measured while this one waited is not timed again
                    with tqdm(
                        total=total, initial=total - len(todo), desc=description, unit="entry", disable=not progress
                    ) as bar:
                        for cache_key, spec in todo:
                            measurement = profiler.measure(spec.build(), spec.inputs, warn_unstable=False)
                            store.put(cache_key, measurement)
                            if not measurement.stable:
                                unstable_now.add(canonical_json(cache_key))
                            measured += 1
                            bar.update(1)

            found = {k: store[cache_key] for k, (cache_key, _) in distinct.items()}  # one object per module
        finally:
            if store is not cache:  # opened here
                store.close()
        table = cls(
            signature,
            [(key, found[canonical_json(cache_key)]) for (key, _), cache_key in zip(pairs, cache_keys)],
            measured=measured,
            reused=total - measured,
        )
        # Warned once, when measured: a cached table's noisy entries are listed in ``table.unstable`` instead of
        # being announced again on every run that reads them.
        noisy = [key for (key, _), ck in zip(pairs, cache_keys) if canonical_json(ck) in unstable_now]
        if noisy:
            warnings.warn(
                f"{len(noisy)} of {len(table)} latency entries measured now stayed noisier than max_spread "
                f"{profiler.max_spread} (e.g. {_short(noisy)}); they are indicative only. Rebuild on a "
                "quieter machine with remeasure_unstable=True, or raise the profiler's repeats.",
                UnstableMeasurementWarning,
                stacklevel=2,
            )
        return table

    # ------------------------------------------------------------------------------------------ lookup
    def __getitem__(self, key: Any) -> Measurement:
        entry = self._entries.get(_lookup_id(key))
        if entry is None:
            raise UnknownNameError(f"no latency entry for key {key!r}; the table has {len(self)} entries")
        return entry[1]

    def get(self, key: Any, default: Measurement | None = None) -> Measurement | None:
        """The measurement for ``key``, or ``default``."""
        entry = self._entries.get(_lookup_id(key))
        return entry[1] if entry is not None else default

    def ms(self, key: Any) -> float:
        """Median latency of ``key`` in milliseconds.

        Raises:
            KeyError: if the table has no such key.
        """
        return self[key].median_ms

    def __contains__(self, key: object) -> bool:
        return _lookup_id(key) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Any]:
        """The keys, as they were given."""
        return (key for key, _ in self._entries.values())

    def keys(self) -> list[Any]:
        """The keys, as they were given."""
        return list(self)

    def items(self) -> list[tuple[Any, Measurement]]:
        """``(key, measurement)`` pairs."""
        return list(self._entries.values())

    def __repr__(self) -> str:
        return (
            f"LatencyTable({len(self)} entries, backend={self.signature.get('backend')!r}, "
            f"measured={self.measured}, reused={self.reused})"
        )
