"""Read rows from JSON, JSONL, CSV/TSV, Excel and Parquet files.

Every row comes with the number a user would look for in the file: the JSONL line,
the CSV/Excel row (the header is row 1, so the first record is row 2), or the
1-based position in a JSON array. Problems are ``TunelabError`` as ``file:line: ...``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

from tunelab.errors import TunelabError, where

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".xlsx", ".parquet")

ErrorSink = Callable[[str], None]


def iter_rows(
    path: str | Path, sheet: str | None = None, on_error: ErrorSink | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(number, row)`` for each record of a data file.

    ``on_error``: when given, a broken record (e.g. a JSONL line that is not JSON) is
    reported to it as ``file:line: invalid JSON: ...`` and skipped, so ``data check``
    can list every problem; otherwise the first one raises ``TunelabError``.
    """
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if sheet is not None and suffix != ".xlsx":
        raise TunelabError(f"{path}: sheet={sheet!r} only applies to .xlsx files")
    readers = {
        ".jsonl": _iter_jsonl,
        ".json": _iter_json,
        ".csv": _iter_csv,
        ".tsv": _iter_csv,
        ".parquet": _iter_parquet,
    }
    if suffix == ".xlsx":
        yield from _iter_xlsx(path, sheet)
    elif suffix in readers:
        yield from readers[suffix](path, on_error)
    else:
        raise TunelabError(f"{path}: unsupported file type '{suffix}' (use one of {', '.join(SUFFIXES)})")


def read_rows(path: str | Path, sheet: str | None = None) -> list[dict]:
    """All rows of a data file as dicts (see ``iter_rows``)."""
    return [row for _, row in iter_rows(path, sheet)]


def _raise(message: str) -> None:
    raise TunelabError(message)


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: files saved by Excel/Notepad often start with a BOM.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TunelabError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from exc


def _iter_jsonl(path: Path, on_error: ErrorSink | None) -> Iterator[tuple[int, dict]]:
    report = on_error or _raise
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            report(f"{where(path, number)}: invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(row, dict):
            report(f"{where(path, number)}: expected a JSON object, got {type(row).__name__}")
            continue
        yield number, row


def _iter_json(path: Path, on_error: ErrorSink | None) -> Iterator[tuple[int, dict]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several objects, one per line: really JSONL
            yield from _iter_jsonl(path, on_error)
            return
        raise TunelabError(f"{where(path, exc.lineno)}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
    rows = _json_records(path, data)
    report = on_error or _raise
    for index, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            report(f"{where(path, index)}: expected a JSON object, got {type(row).__name__}")
            continue
        yield index, row


def _json_records(path: Path, data: Any) -> list:
    """A JSON file holds a list of records, or an object with one list of records."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) == 1:
            return data[lists[0]]
        if not lists:
            return [data]  # a single record
        raise TunelabError(f"{path}: several lists ({', '.join(lists)}); keep the records in one list")
    raise TunelabError(f"{path}: expected a list of records, got {type(data).__name__}")


def _iter_csv(path: Path, on_error: ErrorSink | None) -> Iterator[tuple[int, dict]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    _check_header(path, reader.fieldnames)
    start = reader.line_num + 1
    for row in reader:
        # Report the line where the record starts (a quoted value may span lines).
        number, start = start, reader.line_num + 1
        if None in row:
            (on_error or _raise)(f"{where(path, number)}: {len(row[None])} more values than header columns")
            continue
        yield number, {key: value for key, value in row.items() if value is not None}


def _check_header(path: Path, names: Any) -> None:
    if not names:
        raise TunelabError(f"{path}: empty file (expected a header row)")
    blank = [i + 1 for i, name in enumerate(names) if not (name or "").strip()]
    if blank:
        raise TunelabError(f"{where(path, 1)}: header column {blank[0]} has no name")


def _iter_xlsx(path: Path, sheet: str | None) -> Iterator[tuple[int, dict]]:
    import openpyxl

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types for a bad file
        raise TunelabError(f"{path}: cannot open as Excel: {exc}") from exc
    try:
        if sheet is None:
            ws = book.worksheets[0]
        elif sheet in book.sheetnames:
            ws = book[sheet]
        else:
            raise TunelabError(f"{path}: no sheet {sheet!r} (sheets: {', '.join(book.sheetnames)})")
        rows = ws.iter_rows(values_only=True)
        header = next(rows, None)
        _check_header(path, [None if h is None else str(h) for h in header or ()])
        names = [str(h).strip() for h in header]
        for number, values in enumerate(rows, start=2):
            if all(v is None for v in values):
                continue
            yield number, {name: _cell(v) for name, v in zip(names, values) if v is not None}
    finally:
        book.close()


def _cell(value: Any) -> Any:
    # Excel stores every number as a float; 3.0 in a text column means "3".
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _iter_parquet(path: Path, on_error: ErrorSink | None) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid & co for a bad file
        raise TunelabError(f"{path}: cannot read as Parquet: {exc}") from exc
    for index, row in enumerate(table.to_pylist(), start=1):
        yield index, {k: v for k, v in row.items() if not _is_missing(v)}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
