"""Reading text files (:func:`read_text`) and records from JSON / JSONL files, each record tagged with ``file:line``
for error messages."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

DATA_SUFFIXES = (".jsonl", ".json")


@dataclass
class Record:
    """One row of a dataset file and where it came from."""

    data: dict[str, Any]
    source: str  # "path:line", used in every error about this row


def read_text(path: Path) -> str:
    """The text of a UTF-8 file (training data, prompts, documents): every text input litft reads goes through
    here, so a byte-order mark is accepted (and dropped) alike for .jsonl, .json and .txt, and bytes that are not
    UTF-8 are a ValueError naming the file, the line and the byte offset."""
    data = Path(path).read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[offset]:02x} at column {column}, byte offset "
                         f"{offset}: {e.reason}); the file must be UTF-8 (convert it, e.g. with "
                         "`iconv -f latin1 -t utf-8`)") from None


def read_records(path: Path) -> list[Record]:
    """Read a ``.jsonl`` file (one object per line) or a ``.json`` file (a list of objects, or JSONL content).

    Raises FileNotFoundError for a missing file and ValueError (with file:line) for malformed JSON,
    a row that is not an object, or a file without records.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist" if not path.exists()
                                else f"dataset path {str(path)!r} is not a file")
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = _read_json_array(path, text)
    else:
        records = _read_jsonl(path, text)
    if not records:
        raise ValueError(f"{path}: the dataset is empty (expected JSON objects, one per line, or a JSON list of them)")
    return records


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _as_record(path: Path, line: int, value: Any) -> Record:
    if not isinstance(value, dict):
        raise ValueError(f"{path}:{line}: expected a JSON object with the row's fields, got {type(value).__name__}")
    return Record(value, f"{path}:{line}")


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: malformed JSON line ({e.msg} at column {e.colno})") from None
        records.append(_as_record(path, number, value))
    return records


def _read_json_array(path: Path, text: str) -> list[Record]:
    """Parse ``[obj, obj, ...]`` element by element so that every record knows its line."""
    decoder = json.JSONDecoder()
    records: list[Record] = []
    i = text.index("[") + 1
    n = len(text)
    counted = [0, 1]  # (offset, line at offset): lines are counted incrementally, not from the start every time

    def line_at(j: int) -> int:
        counted[1] += text.count("\n", counted[0], j)
        counted[0] = j
        return counted[1]

    def skip_ws(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    def fail(j: int, what: str) -> ValueError:
        col = j - (text.rfind("\n", 0, j) + 1) + 1
        return ValueError(f"{path}:{_line_of(text, j)}: malformed JSON ({what} at column {col})")

    i = skip_ws(i)
    if i < n and text[i] == "]":
        return records
    while True:
        i = skip_ws(i)
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        records.append(_as_record(path, line_at(i), value))
        i = skip_ws(end)
        if i >= n:
            raise fail(i, "unterminated list: expected ',' or ']'")
        if text[i] == ",":
            i += 1
            continue
        if text[i] == "]":
            if skip_ws(i + 1) < n:
                raise fail(skip_ws(i + 1), "extra data after the list")
            return records
        raise fail(i, "expected ',' or ']'")


def resolve_paths(train_path: Optional[Path], val_path: Optional[Path]) -> tuple[Path, Optional[Path]]:
    """Resolve the data paths: a directory means the ``train.jsonl``/``train.json`` (+ ``val``/``validation``) in it."""
    if train_path is None:
        raise ValueError("data.train_path is not set: give a .json/.jsonl file or a directory holding train.jsonl")
    train_path = Path(train_path)
    if not train_path.exists():
        raise FileNotFoundError(f"data.train_path {str(train_path)!r} does not exist")
    if train_path.is_dir():
        directory = train_path
        found = _find(directory, ("train",))
        if found is None:
            raise FileNotFoundError(
                f"data.train_path {str(directory)!r} is a directory without train.jsonl or train.json"
            )
        train_path = found
        if val_path is None:
            val_path = _find(directory, ("val", "validation", "valid"))
    if val_path is not None:
        val_path = Path(val_path)
        if not val_path.exists():
            raise FileNotFoundError(f"data.val_path {str(val_path)!r} does not exist")
        if val_path.is_dir():
            found = _find(val_path, ("val", "validation", "valid"))
            if found is None:
                raise FileNotFoundError(f"data.val_path {str(val_path)!r} is a directory without val.jsonl or val.json")
            val_path = found
    return train_path, val_path


def _find(directory: Path, stems: tuple[str, ...]) -> Optional[Path]:
    for stem in stems:
        for suffix in DATA_SUFFIXES:
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None
