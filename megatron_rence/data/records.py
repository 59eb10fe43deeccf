"""Reading record files (jsonl, json, parquet) with locations for error messages, and answer-field helpers."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterator, Optional

from megatron_rence.rewards.extract import last_boxed

OnMalformed = Callable[[str, str], None]  # (location "file:line", message); raises or counts
OnOversized = Callable[[str, int], None]  # (location, bytes of the line); counts
_SKIP_CHUNK = 1 << 20


class MalformedRecord(ValueError):
    """A record that lacks a field or has a field of the wrong type; the caller adds the location."""


def raise_malformed(location: str, message: str) -> None:
    raise ValueError(f"{location}: {message}")


def read_records(path: str | Path, on_malformed: OnMalformed = raise_malformed, max_record_bytes: Optional[int] = None,
                 on_oversized: Optional[OnOversized] = None) -> Iterator[tuple[str, dict]]:
    """Yield `(location, record)` for each record; location is "file:line" (1-based) for jsonl and
    "file:row N" / "file:item N" (1-based) for parquet / json lists. Bad JSON, invalid UTF-8 or a non-object
    record goes to `on_malformed` and is skipped if it returns. A record larger than `max_record_bytes` is
    skipped and reported to `on_oversized` (else to `on_malformed`) before anything reads its fields: a jsonl
    line by its length, without being held in memory; a json item or parquet row by its size as one jsonl
    line (the file is read whole, but nothing tokenizes the record)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(path)
        items = ((f"{path}:row {i}", row) for i, row in enumerate(rows, start=1))
    elif suffix == ".json":
        items = _json_items(path)
    elif suffix == ".jsonl":
        items = _jsonl_items(path, on_malformed, max_record_bytes, on_oversized)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    measure = max_record_bytes is not None and suffix != ".jsonl"  # jsonl lines are measured while read
    for location, record in items:
        if not isinstance(record, dict):
            on_malformed(location, f"expected a JSON object, got {type(record).__name__}")
            continue
        if measure and (size := record_bytes(record)) > max_record_bytes:
            if on_oversized is None:
                on_malformed(location, f"record of {size} bytes exceeds the limit of {max_record_bytes}")
            else:
                on_oversized(location, size)
            continue
        yield location, record


def record_bytes(record: dict) -> int:
    """The bytes of `record` written as one jsonl line, newline excluded (UTF-8; a lone surrogate counts 3),
    the measure a jsonl line is held to."""
    text = json.dumps(record, ensure_ascii=False, default=str)
    return len(text.encode("utf-8", "surrogatepass"))


def _lines(f, max_line_bytes: Optional[int]) -> Iterator[tuple[bytes, int]]:
    """(line, its size in bytes) of a binary file; a line over `max_line_bytes` is (b"", size), read in chunks."""
    while raw := (f.readline(max_line_bytes + 1) if max_line_bytes else f.readline()):
        if max_line_bytes and len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            size = len(raw)
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(_SKIP_CHUNK)
                size += len(raw)
            yield b"", size
        else:
            yield raw, len(raw)


def _jsonl_items(path: Path, on_malformed: OnMalformed, max_line_bytes: Optional[int] = None,
                 on_oversized: Optional[OnOversized] = None) -> Iterator[tuple[str, object]]:
    with path.open("rb") as f:
        for number, (raw, size) in enumerate(_lines(f, max_line_bytes), start=1):
            location = f"{path}:{number}"
            if not raw and size:
                if on_oversized is None:
                    on_malformed(location, f"line of {size} bytes exceeds the limit of {max_line_bytes}")
                else:
                    on_oversized(location, size)
                continue
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                on_malformed(location, f"invalid UTF-8 at byte {exc.start} of the line ({exc.reason})")
                continue
            if not line:
                continue
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as exc:
                on_malformed(location, f"invalid JSON: {exc.msg} (column {exc.colno})")


def _json_items(path: Path) -> Iterator[tuple[str, object]]:
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: invalid UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if isinstance(data, dict):  # {"data": [...]} or {"id": record, ...}
        data = data.get("data", data.get("examples", list(data.values())))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return ((f"{path}:item {i}", record) for i, record in enumerate(data, start=1))


def _parquet_rows(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install 'megatron-rence[parquet]')") from None
    return pq.read_table(path).to_pylist()


def answer_text(value: object, key: str) -> str:
    """A reference answer as a string: strings stripped, integers and integral floats without ".0".
    MalformedRecord for anything else, a NaN / infinite number (JSON's NaN / Infinity) or an empty string."""
    if isinstance(value, bool) or value is None:
        raise MalformedRecord(f"field {key!r} must be a string or a number, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MalformedRecord(f"field {key!r} must be a finite number, got {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise MalformedRecord(f"field {key!r} must be a string or a number, got {type(value).__name__}")
    check_unicode(value, key)
    if not value.strip():
        raise MalformedRecord(f"field {key!r} is empty")
    return value.strip()


def text_field(record: dict, key: str) -> str:
    """A required string field (valid Unicode: see `check_unicode`)."""
    if key not in record:
        raise MalformedRecord(f"missing field {key!r} (fields: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise MalformedRecord(f"field {key!r} must be a string, got {type(value).__name__}")
    return check_unicode(value, key)


def check_unicode(value: str, key: str) -> str:
    """`value` if it can be encoded as UTF-8; MalformedRecord otherwise. JSON's "\\ud800" escapes decode to
    lone surrogates, which no tokenizer accepts (a bare TypeError far from the file)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedRecord(f"field {key!r} is not valid Unicode: a lone surrogate "
                              f"{value[exc.start]!r} at character {exc.start}") from None
    return value


def gsm8k_final_answer(text: str) -> str | None:
    """GSM8K solutions end with "#### 1,234": the part after the last "####", commas removed."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def boxed_answer(solution: str, key: str) -> str:
    """The last \\boxed{} in a worked solution (MATH, Minerva)."""
    boxed = last_boxed(solution)
    if boxed is None:
        raise MalformedRecord(f"no \\boxed{{}} answer in field {key!r}")
    return boxed
