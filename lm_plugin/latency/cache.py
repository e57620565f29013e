"""On-disk latency cache: a checksummed JSON Lines file, appended one entry at a time.

File format (version 1), UTF-8, one JSON object per line, every object in canonical form (sorted keys, no
whitespace) and carrying ``"checksum"``: the first 16 hex digits of the SHA-256 of the object's canonical JSON
*without* the checksum field.

* Line 1, the header: ``{"checksum": …, "format": "lm_plugin.latency-cache", "signature": {…}, "version": 1}``
  where ``signature`` is the :meth:`Profiler.signature` of the profiler that measured every entry.
* Every further line, one entry: ``{"checksum": …, "key": <JSON value>, "measurement": {…}}`` with the
  fields of :class:`Measurement`. A later line with the same key replaces an earlier one.

Entries are appended and flushed to disk as soon as they are measured, so an interrupted build loses at most
the entry in progress and the next build resumes. On opening, a file whose header is unreadable, of another
format version, or for another signature is set aside (``<name>.bak``) and rebuilt from scratch; damaged entry
lines (truncated, bad checksum, garbage) are dropped and the file is rewritten without them. Either way a
:class:`LatencyCacheWarning` names the cause: stale or damaged data is never used silently.

The cache assumes one writer at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .canonical import canonical_json, checksum, to_jsonable
from .errors import LatencyCacheWarning
from .measurement import Measurement

FORMAT_NAME = "lm_plugin.latency-cache"
FORMAT_VERSION = 1
BACKUP_SUFFIX = ".bak"


class CorruptLine(ValueError):
    """One line of a cache file cannot be trusted."""


def encode_line(payload: Mapping[str, Any]) -> str:
    """One cache line (with its trailing newline) for ``payload``, checksum added."""
    body = to_jsonable(payload)
    return canonical_json({**body, "checksum": checksum(canonical_json(body))}) + "\n"


def decode_line(raw: bytes) -> dict[str, Any]:
    """The payload of one cache line, checksum verified and removed.

    Raises:
        CorruptLine: if the line is not UTF-8 JSON, not an object, or its checksum does not match.
    """
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptLine(f"not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("checksum"), str):
        raise CorruptLine("not a checksummed JSON object")
    stored = obj.pop("checksum")
    if checksum(canonical_json(obj)) != stored:
        raise CorruptLine("checksum mismatch")
    return obj


def signature_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Readable list of the fields that differ between two signatures."""
    changed = [
        f"{name}: {old.get(name, '<absent>')!r} -> {new.get(name, '<absent>')!r}"
        for name in sorted(set(old) | set(new))
        if old.get(name, "<absent>") != new.get(name, "<absent>")
    ]
    return "; ".join(changed)


def signed_cache_path(cache_dir: str | os.PathLike[str], stem: str, signature: Mapping[str, Any]) -> Path:
    """``<cache_dir>/<stem>-<hash of signature>.jsonl``: one file per signature, so caches of different settings
    (backends, batch sizes, estimators) sit side by side instead of overwriting each other."""
    digest = hashlib.sha1(canonical_json(to_jsonable(dict(signature))).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{stem}-{digest}.jsonl"


class RecordCache:
    """Values by key for one signature, optionally persisted to a checksummed JSON Lines file.

    Subclasses say what a value is (``_encode_value`` / ``_decode_value``), the file's format name and the
    entry field holding the value: :class:`LatencyCache` stores :class:`Measurement` s, the importance table
    stores numbers. File format and recovery rules (module docstring) are the same for all.

    Keys are any JSON-able values (dicts, lists, tuples, dataclasses, ...; see
    :func:`~lm_plugin.latency.canonical.to_jsonable`) and are compared in canonical form, so ``{"a": 1,
    "b": 2}`` and ``{"b": 2, "a": 1}`` are the same key and a tuple equals the list with the same items. A
    key must include everything *besides the profiler* that changes a measurement (layer geometry, input
    shape, activation ...).

    Args:
        path: the cache file, created with its parent directories if missing; None keeps the cache in memory.
        signature: :meth:`Profiler.signature` of the profiler whose measurements are stored.

    Attributes:
        path: the file, or None.
        signature: the signature, in JSON form.
        problems: what was wrong with the file when it was opened (empty if it was clean or new).
    """

    def __init__(self, path: str | os.PathLike[str] | None, signature: Mapping[str, Any]) -> None:
        self.path = Path(path) if path is not None else None
        self.signature: dict[str, Any] = to_jsonable(dict(signature))
        self.problems: list[str] = []
        self._entries: dict[str, tuple[Any, Any]] = {}
        if self.path is not None:
            self._open()

    FORMAT: str = "lm_plugin.record-cache"
    VALUE_FIELD: str = "value"
    WHAT: str = "cache"

    def _encode_value(self, value: Any) -> Any:
        return value

    def _decode_value(self, data: Any) -> Any:
        return data

    # ----------------------------------------------------------------------------------------- mapping
    def get(self, key: Any) -> Any:
        """The measurement stored for ``key``, or None."""
        entry = self._entries.get(canonical_json(key))
        return entry[1] if entry is not None else None

    def __getitem__(self, key: Any) -> Any:
        found = self.get(key)
        if found is None:
            raise KeyError(f"no latency cached for key {canonical_json(key)}")
        return found

    def __contains__(self, key: object) -> bool:
        return canonical_json(key) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Any]:
        """Keys in JSON form (tuples read back as lists)."""
        return (key for key, _ in self._entries.values())

    def items(self) -> Iterator[tuple[Any, Any]]:
        """``(key, measurement)`` pairs, keys in JSON form."""
        return iter(list(self._entries.values()))

    def put(self, key: Any, measurement: Any) -> None:
        """Store ``measurement`` under ``key``, appending it to the file and flushing it to disk at once."""
        canonical = canonical_json(key)
        jsonable = json.loads(canonical)
        if self.path is not None:
            line = encode_line({"key": jsonable, self.VALUE_FIELD: self._encode_value(measurement)})
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        self._entries[canonical] = (jsonable, measurement)

    def refresh(self) -> int:
        """Load the entries other processes appended to the file since it was read; return how many are new.

        Several processes may share one cache file (each appends whole lines with one write), e.g. workers that
        build one importance table together. A line still being written, a damaged line, or a file replaced by
        a different table are skipped here; opening the file again applies the usual recovery rules.
        """
        if self.path is None or not self.path.exists():
            return 0
        lines = self.path.read_bytes().split(b"\n")
        if self._check_header(lines[0]) is not None:
            return 0
        before = len(self._entries)
        for raw in lines[1:-1]:  # the last piece is empty or a line another process is still writing
            if raw.strip():
                try:
                    self._load_entry(raw)
                except CorruptLine:
                    continue
        return len(self._entries) - before

    # ------------------------------------------------------------------------------------------ file io
    def _header(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "version": FORMAT_VERSION, "signature": self.signature}

    def _open(self) -> None:
        assert self.path is not None
        if not self.path.exists():
            self._rewrite()
            return
        lines = self.path.read_bytes().split(b"\n")
        header_problem = self._check_header(lines[0])
        if header_problem is not None:
            backup = self.path.with_name(self.path.name + BACKUP_SUFFIX)
            os.replace(self.path, backup)
            self.problems.append(header_problem)
            self._warn(f"{header_problem}; the old file was moved to {backup} and the cache starts empty")
            self._rewrite()
            return
        for number, raw in enumerate(lines[1:], start=2):
            if not raw.strip():
                continue
            try:
                self._load_entry(raw)
            except CorruptLine as exc:
                self.problems.append(f"line {number}: {exc}")
        unterminated = lines[-1] != b""  # an interrupted write; appending would glue the next entry onto it
        if self.problems or unterminated:
            if self.problems:
                shown = "; ".join(self.problems[:5]) + (" ..." if len(self.problems) > 5 else "")
                self._warn(
                    f"dropped {len(self.problems)} damaged entr{'y' if len(self.problems) == 1 else 'ies'} "
                    f"({shown}); they will be re-measured"
                )
            self._rewrite()

    def _check_header(self, raw: bytes) -> str | None:
        """Why the header line cannot be used, or None."""
        try:
            header = decode_line(raw)
        except CorruptLine as exc:
            return f"the header line is unreadable ({exc})"
        if header.get("format") != self.FORMAT:
            return f"it is not a {self.WHAT} (format {header.get('format')!r})"
        if header.get("version") != FORMAT_VERSION:
            return f"it has format version {header.get('version')!r}, this lm_plugin reads {FORMAT_VERSION}"
        signature = header.get("signature")
        if not isinstance(signature, dict):
            return "its header has no profiler signature"
        if signature != self.signature:
            return f"it was measured with a different profiler ({signature_diff(signature, self.signature)})"
        return None

    def _load_entry(self, raw: bytes) -> None:
        payload = decode_line(raw)
        if set(payload) != {"key", self.VALUE_FIELD}:
            raise CorruptLine("not a cache entry")
        try:
            measurement = self._decode_value(payload[self.VALUE_FIELD])
        except (TypeError, ValueError, KeyError) as exc:
            raise CorruptLine(f"bad {self.VALUE_FIELD} ({exc})") from None
        self._entries[canonical_json(payload["key"])] = (payload["key"], measurement)

    def _rewrite(self) -> None:
        """Write header and current entries to a temporary file, then atomically replace the cache file."""
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(encode_line(self._header()))
            for key, measurement in self._entries.values():
                f.write(encode_line({"key": key, self.VALUE_FIELD: self._encode_value(measurement)}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _warn(self, message: str) -> None:
        warnings.warn(f"{self.WHAT} {self.path}: {message}", LatencyCacheWarning, stacklevel=3)


class LatencyCache(RecordCache):
    """Measurements by key for one profiler signature, optionally persisted to a file (see :class:`RecordCache`).

    Keys must include everything *besides the profiler* that changes a measurement (layer geometry, input
    shape, activation ...).
    """

    FORMAT = FORMAT_NAME
    VALUE_FIELD = "measurement"
    WHAT = "latency cache"

    def _encode_value(self, value: Measurement) -> dict[str, Any]:
        return value.to_dict()

    def _decode_value(self, data: Any) -> Measurement:
        if not isinstance(data, dict):
            raise TypeError("a measurement must be a JSON object")
        return Measurement.from_dict(data)
