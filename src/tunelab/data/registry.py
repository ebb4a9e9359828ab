"""Load datasets by file path or by name from a LLaMA-Factory style ``dataset_info.json``.

The registry file is read as LLaMA-Factory writes it, so an existing data folder works
unchanged::

    {"med_dialog": {"file_name": "dialog.json", "formatting": "alpaca",
                    "columns": {"prompt": "question", "response": "answer"}},
     "chat": {"file_name": "chat.jsonl", "formatting": "sharegpt",
              "columns": {"messages": "turns"},
              "tags": {"role_tag": "speaker", "content_tag": "text",
                       "user_tag": "patient", "assistant_tag": "doctor"}}}

Hub entries (``hf_hub_url``, ``ms_hub_url``, ...) are refused: tunelab works offline.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tunelab.data.conversation import Conversation
from tunelab.data.formats import FORMATS, read_conversations
from tunelab.data.readers import SUFFIXES, iter_rows
from tunelab.errors import TunelabError, where

INFO_FILE = "dataset_info.json"
_REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclass
class DatasetEntry:
    """One dataset: where its files are and how to read their rows."""

    name: str
    files: list[Path]
    formatting: str | None = None
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    num_samples: int | None = None
    sheet: str | None = None
    ranking: bool = False
    """Preference pairs (``chosen``/``rejected``), read by ``tunelab.data.pairs`` for the dpo stage."""


def read_registry(dataset_dir: str | Path) -> dict[str, dict]:
    """The raw entries of ``dataset_dir/dataset_info.json``."""
    path = Path(dataset_dir) / INFO_FILE
    if not path.is_file():
        raise TunelabError(f"{path}: no such file (the dataset folder needs a {INFO_FILE})")
    return read_json_object(path)


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object of named entries, with one-line errors."""
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(info, dict):
        raise TunelabError(f"{path}: expected an object mapping dataset names to entries")
    return info


def resolve(spec: str, dataset_dir: str | Path | None = None) -> DatasetEntry:
    """Find ``spec``: a file or folder path (also relative to ``dataset_dir``), else a registry name."""
    for candidate in _path_candidates(spec, dataset_dir):
        if candidate.exists():
            return DatasetEntry(spec, _files(candidate, spec))
    looks_like_path = "/" in spec or "\\" in spec or Path(spec).suffix.lower() in SUFFIXES
    info = read_registry(dataset_dir) if dataset_dir is not None and (
        not looks_like_path or (Path(dataset_dir) / INFO_FILE).is_file()) else {}
    if spec not in info:
        if looks_like_path:
            raise TunelabError(f"{spec}: no such file")
        if dataset_dir is None:
            raise TunelabError(f"{spec}: no such file (to use a registered name, pass --dataset-dir / data.dataset_dir)")
        names = ", ".join(sorted(info)) or "none"
        raise TunelabError(f"{spec}: no such file or dataset in {Path(dataset_dir) / INFO_FILE} (names: {names})")
    return _entry(spec, info[spec], Path(dataset_dir))


def _path_candidates(spec: str, dataset_dir: str | Path | None) -> list[Path]:
    candidates = [Path(spec).expanduser()]
    if dataset_dir is not None and not Path(spec).is_absolute():
        candidates.append(Path(dataset_dir) / spec)
    return candidates


def _files(path: Path, label: str) -> list[Path]:
    """A file, or every data file in a folder (sorted, so the order is stable)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and p.name != INFO_FILE)
    if not files:
        raise TunelabError(f"{label}: folder {path} holds no data files ({', '.join(SUFFIXES)})")
    return files


def _entry(name: str, raw: object, dataset_dir: Path) -> DatasetEntry:
    where = f"{dataset_dir / INFO_FILE}: {name}"
    if not isinstance(raw, dict):
        raise TunelabError(f"{where}: expected an object")
    remote = [key for key in _REMOTE_KEYS if key in raw]
    if remote and "file_name" not in raw:
        raise TunelabError(f"{where}.{remote[0]}: hub datasets cannot be downloaded offline; "
                           "download the files and set file_name")
    if "file_name" not in raw:
        raise TunelabError(f"{where}.file_name: missing")
    fmt = raw.get("formatting")
    if fmt is not None and fmt not in FORMATS:
        raise TunelabError(f"{where}.formatting: unknown format {fmt!r} (use one of {', '.join(FORMATS)})")
    for key in ("columns", "tags"):
        if not isinstance(raw.get(key, {}), dict):
            raise TunelabError(f"{where}.{key}: expected an object")
    path = dataset_dir / str(raw["file_name"])
    if not path.exists():
        raise TunelabError(f"{where}.file_name: {path} does not exist")
    return DatasetEntry(name, _files(path, name), fmt, dict(raw.get("columns", {})),
                        dict(raw.get("tags", {})), raw.get("num_samples"), raw.get("sheet"),
                        bool(raw.get("ranking")))


def load_dataset(
    spec: str, dataset_dir: str | Path | None = None, max_samples: int | None = None, seed: int = 42,
    on_error: Callable[[str], None] | None = None,
) -> list[Conversation]:
    """Read a dataset (file path or registered name) into Conversations.

    ``max_samples`` keeps that many rows after a shuffle seeded with ``seed``; without it
    rows keep file order. ``on_error`` collects every problem instead of raising the first.
    """
    entry = resolve(spec, dataset_dir)
    refuse_other_stages(entry, spec)
    conversations: list[Conversation] = []
    for path in entry.files:
        conversations.extend(read_conversations(path, entry.formatting, entry.columns or None,
                                                entry.tags or None, entry.sheet, on_error))
    for conv in conversations:
        conv.meta.setdefault("dataset", entry.name)
    return take_samples(conversations, spec, max_samples, entry.num_samples, seed)


def refuse_other_stages(entry: DatasetEntry, spec: str) -> None:
    """Preference pairs and KTO feedback are not SFT data: one line naming the stage to use.

    A file is judged by its first row: the kto reader needs a tag on every row that is not
    a pair, so a file it accepts shows what it is there; later rows are not read twice.
    """
    dpo = "a preference (ranking) dataset: train it with train.stage=dpo"
    kto = "a desirable/undesirable tag (KTO feedback): train it with train.stage=kto"
    if entry.ranking:
        raise TunelabError(f"{spec}: {dpo}")
    if entry.columns.get("kto_tag"):
        raise TunelabError(f"{spec}: columns.kto_tag: {kto}")
    chosen, rejected = entry.columns.get("chosen", "chosen"), entry.columns.get("rejected", "rejected")
    for path in entry.files:
        number, row = next(iter_rows(path, entry.sheet, on_error=lambda problem: None), (None, {}))
        if chosen in row and rejected in row:
            raise TunelabError(f"{where(path, number)}: {chosen}/{rejected}: {dpo}")
        column = _kto_tag(row)
        if column:
            raise TunelabError(f"{where(path, number, column)}: {kto} (or drop the column to train on every answer)")


def _kto_tag(row: dict) -> str | None:
    """The column the kto reader would take as this row's tag, or None."""
    from tunelab.data.feedback import _tag

    if "kto_tag" in row:
        return "kto_tag"
    try:
        return _tag(row, {}, "")[0]
    except TunelabError:  # no tag column, or a class label such as "positive": not KTO data
        return None


def take_samples(items: list, spec: str, max_samples: int | None, num_samples: int | None, seed: int) -> list:
    """``max_samples`` (else the entry's ``num_samples``) items after a shuffle seeded with
    ``seed``; all of them, in file order, when neither is set."""
    limit = max_samples if max_samples is not None else num_samples
    if limit is None:
        return items
    if limit < 1:
        raise TunelabError(f"{spec}: max_samples must be at least 1, got {limit}")
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:limit]


def load_datasets(
    specs: Iterable[str] | str, dataset_dir: str | Path | None = None, max_samples: int | None = None,
    seed: int = 42, on_error: Callable[[str], None] | None = None,
) -> list[Conversation]:
    """Several datasets concatenated in order (``max_samples`` applies to each one)."""
    if isinstance(specs, str):
        specs = [specs]
    conversations: list[Conversation] = []
    for spec in specs:
        conversations.extend(load_dataset(spec, dataset_dir, max_samples, seed, on_error))
    return conversations
