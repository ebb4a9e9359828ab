"""Raw text for continued pre-training: documents from ``.txt`` files, folders and tables.

A dataset spec is a file, a folder, or a name in ``dataset_info.json``:

- ``.txt`` — documents are separated by one or more blank lines (a paragraph, an entry,
  an article: whatever the file puts between empty lines);
- ``.jsonl``/``.json``/``.csv``/``.tsv``/``.xlsx``/``.parquet`` — one document per row,
  from the column ``text`` (or the registry's ``columns: {prompt: COLUMN}``, as
  LLaMA-Factory writes pre-training entries);
- a folder — every ``.txt`` and data file in it, sorted by path.

A row without the text column, or with non-text in it, is an error naming
``file:line: column``. Empty documents are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tunelab.data.readers import SUFFIXES, iter_rows
from tunelab.errors import TunelabError, where

TEXT_SUFFIXES = (".txt", ".md")
DEFAULT_COLUMN = "text"


@dataclass
class Document:
    """One document of raw text and where it starts (``file:line``)."""

    text: str
    source: str


def _text_files(folder: Path, label: str) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "dataset_info.json"
                   and p.suffix.lower() in TEXT_SUFFIXES + SUFFIXES)
    if not files:
        raise TunelabError(f"{label}: folder {folder} holds no text or data files "
                           f"({', '.join(TEXT_SUFFIXES + SUFFIXES)})")
    return files


def _resolve(spec: str, dataset_dir: str | Path | None) -> tuple[list[Path], str, int | None]:
    """(files, text column, num_samples) for a spec: a path, a folder or a registered name."""
    candidates = [Path(spec).expanduser()]
    if dataset_dir is not None and not Path(spec).is_absolute():
        candidates.append(Path(dataset_dir) / spec)
    for path in candidates:
        if path.is_dir():
            return _text_files(path, spec), DEFAULT_COLUMN, None
        if path.is_file():
            return [path], DEFAULT_COLUMN, None
    from tunelab.data.registry import resolve

    entry = resolve(spec, dataset_dir)  # a registered name (or a one-line "no such file")
    column = (entry.columns or {}).get("prompt", DEFAULT_COLUMN)
    files = entry.files
    if len(files) == 1 and files[0].is_dir():
        files = _text_files(files[0], spec)
    return files, column, entry.num_samples


def _paragraphs(path: Path) -> Iterator[Document]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise TunelabError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from exc
    start, block = None, []
    for number, line in enumerate([*lines, ""], start=1):
        if line.strip():
            if start is None:
                start = number
            block.append(line.rstrip())
        elif block:
            yield Document("\n".join(block), where(path, start))
            start, block = None, []


def _rows(path: Path, column: str) -> Iterator[Document]:
    for number, row in iter_rows(path):
        value = row.get(column)
        if value is None:
            keys = ", ".join(sorted(map(str, row))) or "none"
            raise TunelabError(f"{where(path, number, column)}: missing (a pt dataset needs a text column; "
                               f"this row has {keys}; map another with columns: {{prompt: NAME}})")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise TunelabError(f"{where(path, number, column)}: expected text, got {type(value).__name__}")
        yield Document(value, where(path, number))


def read_documents(path: str | Path, column: str = DEFAULT_COLUMN) -> list[Document]:
    """The non-empty documents of one file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: no such file")
    docs = _paragraphs(path) if path.suffix.lower() in TEXT_SUFFIXES else _rows(path, column)
    return [d for d in docs if d.text.strip()]


def load_documents(specs: Iterable[str] | str, dataset_dir: str | Path | None = None,
                   max_samples: int | None = None, seed: int = 42) -> list[Document]:
    """Documents of several datasets in order; ``max_samples`` keeps that many per dataset
    after a shuffle seeded with ``seed``."""
    if isinstance(specs, str):
        specs = [specs]
    from tunelab.data.registry import take_samples

    out: list[Document] = []
    for spec in specs:
        files, column, num_samples = _resolve(spec, dataset_dir)
        docs = [d for f in files for d in read_documents(f, column)]
        out.extend(take_samples(docs, spec, max_samples, num_samples, seed))
    return out
