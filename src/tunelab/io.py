"""Atomic file writes and UTF-8 JSON helpers used by every layer."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the user's usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def dumps(obj: Any, indent: int | None = 2) -> str:
    """JSON with Chinese (and every other script) kept readable."""
    return json.dumps(obj, ensure_ascii=False, indent=indent)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, dumps(obj) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    return atomic_write_text(path, "".join(dumps(row, indent=None) + "\n" for row in rows))


def append_jsonl(path: str | os.PathLike, row: Any) -> None:
    """Append one record and flush, so an interrupted job keeps what it finished."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(dumps(row, indent=None) + "\n")
        handle.flush()
