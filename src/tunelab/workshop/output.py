"""Write a built dataset: one JSONL per split, a dataset_info.json registry, a README.

The registry follows the LLaMA-Factory ``dataset_info.json`` shape (``file_name``,
``formatting``, ``columns``) so ``tunelab data``/``tunelab train`` and LLaMA-Factory
can both load the folder as it is. Provenance (source, licence, options, sizes) goes
to ``build_info.json`` (one entry per dataset name) and ``README.md``, because
other tools reject unknown keys in the registry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.io import atomic_write_text, write_json, write_jsonl

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}


def write_dataset(
    out_dir: str | Path,
    name: str,
    splits: dict[str, list[dict]],
    info: dict[str, Any] | None = None,
    formatting: str = "alpaca",
    file_prefix: str = "",
    columns: dict[str, str] | None = None,
    ranking: bool = False,
) -> dict[str, int]:
    """Write ``splits`` as ``OUT/<prefix><split>.jsonl`` and register them; return split sizes.

    Each split is registered as ``<name>_<split>`` in ``OUT/dataset_info.json`` (entries
    already there for other names are kept, so several builds can share a folder).
    Empty splits are not written. ``file_prefix`` (e.g. ``"norm_"``) lets several
    datasets share a folder, as the seed's ``sft_dataset/norm_train.jsonl`` do. ``columns``
    maps the registry's logical fields (``{"prompt": "text"}`` for raw text) instead of the
    alpaca columns found in the rows; ``ranking`` marks preference pairs (``chosen``/``rejected``).
    """
    out = Path(out_dir)
    sizes = {split: len(rows) for split, rows in splits.items() if rows}
    if not sizes:
        raise TunelabError(f"{name}: nothing to write (every split is empty)")
    registry = _read_registry(out / "dataset_info.json")
    _forget_old_splits(out, registry, name, file_prefix, set(sizes))
    owners = {entry.get("file_name"): key for key, entry in registry.items()
              if isinstance(entry, dict) and not key.startswith(f"{name}_")}
    for split in sizes:
        other = owners.get(f"{file_prefix}{split}.jsonl")
        if other:
            raise TunelabError(f"{out}: {file_prefix}{split}.jsonl already holds dataset '{other}'; "
                               "build into another folder")
    for split, rows in splits.items():
        if not rows:
            continue
        file_name = f"{file_prefix}{split}.jsonl"
        write_jsonl(out / file_name, rows)
        entry: dict[str, Any] = {"file_name": file_name, "formatting": formatting}
        if ranking:
            entry["ranking"] = True
        if columns is not None:
            entry["columns"] = dict(columns)
        elif formatting == "alpaca":
            present = set().union(*(row.keys() for row in rows))
            entry["columns"] = {k: v for k, v in ALPACA_COLUMNS.items() if v in present}
        registry[f"{name}_{split}"] = entry
    write_json(out / "dataset_info.json", registry)
    builds = _read_registry(out / "build_info.json")
    builds[name] = {"sizes": sizes, **(info or {})}
    write_json(out / "build_info.json", builds)
    atomic_write_text(out / "README.md", "\n".join(_readme(n, meta) for n, meta in builds.items()))
    return sizes


def _forget_old_splits(out: Path, registry: dict, name: str, prefix: str, current: set[str]) -> None:
    """Drop splits an earlier build of ``name`` wrote but this one does not (e.g. after
    ``validation_fraction=0``), so a stale file is never mistaken for fresh data."""
    for key in [k for k in registry if k.startswith(f"{name}_")]:
        split = key[len(name) + 1:]
        entry = registry[key]
        if split in current or not isinstance(entry, dict) or entry.get("file_name") != f"{prefix}{split}.jsonl":
            continue
        (out / entry["file_name"]).unlink(missing_ok=True)
        del registry[key]


def _read_registry(path: Path) -> dict[str, Any]:
    """Entries already in ``path`` (a registry or build_info file), or {} when it is new."""
    from tunelab.data.registry import read_json_object

    return read_json_object(path) if path.is_file() else {}


def _readme(name: str, meta: dict[str, Any]) -> str:
    lines = [f"# {name}", ""]
    if meta.get("description"):
        lines += [meta["description"], ""]
    for key in ("source", "license"):
        if meta.get(key):
            lines.append(f"- {key}: {meta[key]}")
    lines.append("- built by: tunelab data build")
    lines += ["", "| split | rows |", "|---|---|"]
    lines += [f"| {split} | {n} |" for split, n in meta["sizes"].items()]
    if meta.get("options"):
        lines += ["", "Options:", "", "```json", json.dumps(meta["options"], ensure_ascii=False, indent=2), "```"]
    return "\n".join(lines) + "\n"
