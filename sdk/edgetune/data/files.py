"""Loading the user's own training text given with ``--data``.

Two formats, chosen by extension because that is what people already have: ``.txt`` (one record
per non-empty line) and ``.jsonl`` (one ``{"text": ...}`` object per line, the common export
format of dataset tools). Every failure is a ``DataError`` that names the file, the line and what
to change, because a device owner reading a log should not need the source to fix their data.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from edgetune.wire import check_name

log = logging.getLogger(__name__)

__all__ = ["DATA_SUFFIXES", "DataError", "discover_device_files", "load_texts"]

DATA_SUFFIXES = (".txt", ".jsonl")
_FORMATS = '.txt (one record per line) or .jsonl (one {"text": "..."} object per line)'


class DataError(ValueError):
    """Training data that cannot be used as given; the message says where and what to do."""


def load_texts(path: Path) -> list[str]:
    """The records in ``path``, in file order, surrounding whitespace stripped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path given with --data")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; pass a {_FORMATS} file")
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                        f"use {_FORMATS}")
    records = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        records.append(_jsonl_text(path, lineno, line) if suffix == ".jsonl" else line.strip())
    if not records:
        raise DataError(f"{path}: no records (the file is empty or only blank lines); "
                        "add at least one record")
    log.debug("loaded %d records from %s", len(records), path)
    return records


def _lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, decoded line) pairs; decoding per line lets errors name the line."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # tolerate a UTF-8 BOM
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            out.append((lineno, raw.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line); "
                            "re-save the file as UTF-8") from None
    return out


def _jsonl_text(path: Path, lineno: int, line: str) -> str:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must "
                        'be one object like {"text": "..."}') from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; "
                        'write each record as {"text": "..."}')
    if "text" not in obj:
        keys = ", ".join(sorted(obj)) or "none"
        raise DataError(f'{where}: missing the "text" field (keys found: {keys}); '
                        'put the record in a "text" string field')
    text = obj["text"]
    if not isinstance(text, str):
        raise DataError(f'{where}: "text" must be a string, got {type(text).__name__}; '
                        'store the record as a JSON string')
    if not text.strip():
        raise DataError(f'{where}: "text" is empty; remove the line or fill in the record')
    return text.strip()


def _natural_key(stem: str) -> list[int | str]:
    """Sort ``device-2`` before ``device-10``, as people number devices."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", stem)]


def discover_device_files(folder: Path) -> dict[str, Path]:
    """One data file per device in ``folder``: ``{device_id: path}``, device id = file stem.

    Hidden files and other extensions are ignored (editors and OSes leave files around).
    Stems must be valid device names because they become MQTT topic levels.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass a folder holding one {_FORMATS} "
                        "file per device")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in DATA_SUFFIXES:
            continue
        if not path.is_file():
            continue
        if path.stem in found:
            raise DataError(f"{folder}: two files for device {path.stem!r} "
                            f"({found[path.stem].name} and {path.name}); keep only one")
        try:
            check_name(path.stem, "device id")
        except ValueError as e:
            raise DataError(f"{path}: {e}; rename the file (its stem is the device id)") from None
        found[path.stem] = path
    if not found:
        raise DataError(f"{folder}: no .txt or .jsonl files; add one file per device, named "
                        "after the device (e.g. device-1.txt)")
    return {stem: found[stem] for stem in sorted(found, key=_natural_key)}
