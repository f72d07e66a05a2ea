"""Reading task records from local files, folders or Hugging Face dataset ids.

Every record comes back with a *source string* that says where it came from, so that a bad
record can be reported precisely:

* ``path/to/file.jsonl:17``: line 17 of a JSONL file (1-based; blank lines are skipped but
  counted);
* ``path/to/file.csv:4``: the CSV row that ends on line 4 (the header is line 1);
* ``path/to/file.json[3]``: item 3 (0-based) of a JSON list;
* ``openai/gsm8k:main:test[3]``: row 3 of a Hugging Face dataset split.

Malformed input raises :class:`DataError` (a ``ValueError``) naming the file and line, and
:func:`require` raises it naming the file, line and the missing field. A file with no records
and text that is not UTF-8 are errors too (the latter naming the line).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..errors import UserError

Record = dict[str, Any]

#: File types read from local paths.
SUFFIXES = (".jsonl", ".json", ".csv")

#: File stems tried, in order, when ``source`` is a folder and ``split`` is given.
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "test": ("test", "valid", "validation"),
    "valid": ("valid", "validation", "dev"),
    "validation": ("validation", "valid", "dev"),
    "dev": ("dev", "valid", "validation"),
}


class DataError(UserError):
    """A data file is missing, malformed, or lacks a field. The message names the source."""


def require(record: Record, field: str, source: str) -> Any:
    """Return ``record[field]``; raise :class:`DataError` naming source and field if it is
    absent or null."""
    if record.get(field) is None:
        present = ", ".join(sorted(record)) or "none"
        raise DataError(f"{source}: missing required field {field!r} (fields present: {present})")
    return record[field]


def first_field(record: Record, fields: tuple[str, ...], source: str) -> Any:
    """Return the value of the first of ``fields`` present in ``record``; raise
    :class:`DataError` naming all of them if none is."""
    for name in fields:
        if record.get(name) is not None:
            return record[name]
    if len(fields) == 1:
        return require(record, fields[0], source)
    names = " or ".join(repr(f) for f in fields)
    present = ", ".join(sorted(record)) or "none"
    raise DataError(f"{source}: missing required field {names} (fields present: {present})")


def read_records(source: str | Path, split: str | None = None) -> list[tuple[Record, str]]:
    """Read records as ``(record, source_string)`` pairs.

    ``source`` is a ``.jsonl`` / ``.json`` / ``.csv`` file, a folder (the file for ``split`` is
    picked with :data:`SPLIT_ALIASES`, e.g. ``test`` falls back to ``valid.jsonl``), or, when
    no such local path exists, a Hugging Face dataset id ``name`` or ``name:config`` loaded
    with ``datasets.load_dataset`` (split defaults to ``train``).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = pick_file(path, split)
    if path.is_file():
        return read_file(path)
    if _looks_local(str(source)):
        raise DataError(f"{source}: no such file or folder")
    return read_hf_dataset(str(source), split or "train")


def pick_file(folder: Path, split: str | None) -> Path:
    """The data file for ``split`` in ``folder``; the only data file if there is just one."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if split is not None:
        for stem in SPLIT_ALIASES.get(split, (split,)):
            for suffix in SUFFIXES:
                if (folder / f"{stem}{suffix}").is_file():
                    return folder / f"{stem}{suffix}"
    if len(files) == 1:
        return files[0]
    found = ", ".join(p.name for p in files) or "no data files"
    raise DataError(f"{folder}: cannot pick a data file for split {split!r} (found: {found})")


def read_file(path: Path) -> list[tuple[Record, str]]:
    """Read one local data file, by suffix."""
    readers = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv}
    if path.suffix not in readers:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (supported: {', '.join(SUFFIXES)})")
    records = readers[path.suffix](path)
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped); text that is not UTF-8 is a
    :class:`DataError` naming the line and the offending byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start - start + 1}); "
                        f"save the file as UTF-8") from None


def read_jsonl(path: Path) -> list[tuple[Record, str]]:
    """One JSON object per line; blank lines are skipped."""
    records = []
    with io.StringIO(read_text(path), newline=None) as f:  # universal newlines, as open() in text mode
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None
            records.append((_as_record(record, where), where))
    return records


def read_json(path: Path) -> list[tuple[Record, str]]:
    """A JSON list of objects."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(_as_record(item, f"{path}[{i}]"), f"{path}[{i}]") for i, item in enumerate(data)]


def read_csv(path: Path) -> list[tuple[Record, str]]:
    """A CSV file with a header row; every row must have as many fields as the header."""
    records = []
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{where}: malformed CSV row ({len(row)} fields, header has {len(header)})")
            records.append((dict(zip(header, row)), where))
    return records


def read_hf_dataset(name: str, split: str) -> list[tuple[Record, str]]:
    """Load ``name`` or ``name:config`` with ``datasets.load_dataset`` (imported lazily)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{name}: not a local path, and the `datasets` package is unavailable ({e})") from None
    repo, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - the hub and loaders raise many types
        raise DataError(f"{name}: not a local path, and loading it as a Hugging Face dataset "
                        f"(split {split!r}) failed: {type(e).__name__}: {e}") from e
    return [(dict(row), f"{name}:{split}[{i}]") for i, row in enumerate(rows)]


def _as_record(value: Any, where: str) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _looks_local(source: str) -> bool:
    """A path that cannot be a Hugging Face id: it has a data-file suffix or starts like a path."""
    return source.endswith(SUFFIXES) or source.startswith(("/", "./", "../", "~")) or "\\" in source
