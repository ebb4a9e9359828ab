"""Run a data-build recipe: raw rows -> instruction records -> filtered, sampled splits.

Every record remembers where it came from (``file:row``), so any problem is reported
as one line naming the file, the row and the column.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tunelab.data.readers import iter_rows
from tunelab.errors import TunelabError
from tunelab.workshop.output import write_dataset
from tunelab.workshop.recipe import RECORD_FIELDS, Recipe, Source, load_recipe, template_fields
from tunelab.workshop.split import split_rows

Hook = Callable[[dict], Any]


@dataclass
class BuildReport:
    """What a build kept and dropped (and why), and where it wrote."""

    name: str
    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)
    out_dir: Path | None = None

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


def build_recipe(recipe: Recipe | str | Path, out_dir: str | Path | None = None) -> BuildReport:
    """Build the dataset a recipe describes; write JSONL splits + dataset_info.json."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    report = BuildReport(recipe.name)
    make = _hook(recipe) if recipe.hook else _templater(recipe)
    fixed: dict[str, list[dict]] = {}
    free: list[dict] = []
    for source in recipe.sources:
        records = _filtered(recipe, source, make, report)
        if source.sample is not None:
            records = _sample(records, source.sample, recipe, report)
        (fixed.setdefault(source.split, []) if source.split else free).extend(records)
    if recipe.sample is not None:
        free = _sample(free, recipe.sample, recipe, report)
    elif recipe.shuffle:
        random.Random(recipe.seed).shuffle(free)
    group = _grouper(recipe) if recipe.group_by else None
    splits = split_rows(free, recipe.split, seed=recipe.seed, group_key=group, shuffle=recipe.shuffle) if free else {}
    for name, rows in fixed.items():
        splits.setdefault(name, []).extend(rows)
    for rows in splits.values():
        for row in rows:
            row.pop("_where", None)
            row.pop("_row", None)
    report.lengths = _length_stats(splits)
    out = Path(out_dir) if out_dir else (recipe.out or recipe.base_dir / recipe.name)
    info = {"source": ", ".join(str(s.path) for s in recipe.sources), "recipe": str(recipe.path or ""),
            "dropped": report.dropped, "lengths": report.lengths}
    report.sizes = write_dataset(out, recipe.name, splits, info, file_prefix=f"{recipe.name}_")
    report.out_dir = out
    return report


def iter_source(source: Source) -> Iterator[tuple[str, dict]]:
    """``(location, row)`` for each raw row; ``json_path`` selects records inside a JSON file."""
    if source.json_path is None:
        for number, row in iter_rows(source.path, sheet=source.sheet):
            yield f"{source.path}:{number}", row
        return
    if source.path.suffix.lower() != ".json":
        raise TunelabError(f"{source.path}: json_path only applies to .json files")
    if not source.path.is_file():
        raise TunelabError(f"{source.path}: no such file")
    try:
        document = json.loads(source.path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{source.path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise TunelabError(f"{source.path}: not UTF-8 text (byte {exc.start})") from exc
    for key, row in _walk(document, [p for p in source.json_path.split(".") if p], "$", source.path):
        if not isinstance(row, dict):
            raise TunelabError(f"{source.path}[{key}]: expected a JSON object, got {type(row).__name__}")
        yield f"{source.path}[{key}]", row


def _walk(node: Any, parts: list[str], label: str, path: Path) -> Iterator[tuple[str, Any]]:
    if not parts:
        yield label, node
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
        if items is None:
            raise TunelabError(f"{path}: json_path: '{label}' is a {type(node).__name__}, '*' needs a list or object")
        for key, child in items:
            yield from _walk(child, rest, f"{label}.{key}" if label != "$" else str(key), path)
    elif isinstance(node, dict) and head in node:
        yield from _walk(node[head], rest, f"{label}.{head}", path)
    else:
        raise TunelabError(f"{path}: json_path: no key '{head}' under '{label}'")


def _templater(recipe: Recipe) -> Hook:
    """A function row -> record that fills the recipe's templates."""
    wanted = {key: template_fields(text, key) for key, text in recipe.template.items()}

    def make(row: dict) -> dict:
        values = {}
        for key, names in wanted.items():
            for name in names:
                if name not in row:
                    raise KeyError(name)
                values[name] = _text(row[name])
        record = {key: recipe.template[key].format_map(values) for key in recipe.template}
        record.setdefault("input", "")
        return record

    return make


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _hook(recipe: Recipe) -> Hook:
    """Import ``module:function`` (the module may be a .py file next to the recipe)."""
    spec = str(recipe.hook)
    module_name, _, func_name = spec.partition(":")
    where = f"{recipe.path or 'recipe'}: hook"
    if not func_name:
        raise TunelabError(f"{where}: expected 'module:function', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name) if Path(module_name).is_absolute() else recipe.base_dir / module_name
            loader = importlib.util.spec_from_file_location(file.stem, file)
            if loader is None or not file.is_file():
                raise TunelabError(f"{where}: no such file {file}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TunelabError(f"{where}: cannot import {module_name!r}: {exc}") from exc
    function = getattr(module, func_name, None)
    if not callable(function):
        raise TunelabError(f"{where}: {module_name!r} has no function {func_name!r}")
    return function


def _records(make: Hook, location: str, row: dict, keep: list[str]) -> list[dict]:
    """Apply the template/hook to one row; turn its failures into one-line errors."""
    try:
        result = make(row)
    except KeyError as exc:
        columns = ", ".join(map(str, row)) or "none"
        raise TunelabError(f"{location}: column {exc.args[0]!r}: missing (columns: {columns})") from None
    except TunelabError as exc:
        raise TunelabError(f"{location}: {exc}") from None
    except Exception as exc:  # a bug or a surprise in a user's hook: say where; -v shows the traceback
        raise TunelabError(f"{location}: cannot convert row: {type(exc).__name__}: {exc}") from exc
    if result is None:
        return []
    records = result if isinstance(result, list) else [result]
    out = []
    for record in records:
        if not isinstance(record, dict) or not {"instruction", "output"} <= set(record):
            raise TunelabError(f"{location}: hook must return a dict with instruction and output, got {record!r:.80}")
        missing = [k for k in keep if k not in row]
        if missing:
            raise TunelabError(f"{location}: column {missing[0]!r}: missing (keep_columns)")
        out.append({**record, **{k: row[k] for k in keep}, "_where": location, "_row": row})
    return out


def _filtered(recipe: Recipe, source: Source, make: Hook, report: BuildReport) -> list[dict]:
    f = recipe.filters
    checks = _compile_filters(recipe)
    kept = []
    for location, row in iter_source(source):
        report.read += 1
        for record in _records(make, location, row, recipe.keep_columns):
            reason = _rejected(record, f.drop_empty, checks)
            if reason:
                report.drop(reason)
            else:
                kept.append(record)
    return kept


def _compile_filters(recipe: Recipe) -> list[tuple[str, str, Callable[[str], bool]]]:
    f, label = recipe.filters, f"{recipe.path or 'recipe'}: filters"
    checks: list[tuple[str, str, Callable[[str], bool]]] = []
    for key, n in f.min_length.items():
        checks.append((key, f"{key} shorter than {n}", lambda s, n=n: len(s) >= n))
    for key, n in f.max_length.items():
        checks.append((key, f"{key} longer than {n}", lambda s, n=n: len(s) <= n))
    for kind, table, keep_if in (("regex", f.regex, True), ("exclude_regex", f.exclude_regex, False)):
        for key, pattern in table.items():
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise TunelabError(f"{label}.{kind}.{key}: bad regular expression: {exc}") from None
            reason = f"{key} {'does not match' if keep_if else 'matches'} /{pattern}/"
            checks.append((key, reason, lambda s, rx=rx, k=keep_if: bool(rx.search(s)) == k))
    return checks


def _rejected(record: dict, drop_empty: bool | list[str], checks: list) -> str | None:
    """The first reason to drop ``record``, or None to keep it."""
    empty_keys = ["instruction", "output"] if drop_empty is True else list(drop_empty or [])
    for key in empty_keys:
        # A column of the raw row first: "drop rows whose source field is empty".
        value = record["_row"][key] if key in record["_row"] else record.get(key)
        if not _text(value).strip():
            return f"empty {key}"
    for key, reason, ok in checks:
        value = record[key] if key in record else record["_row"].get(key)
        if value is None:
            raise TunelabError(f"{record['_where']}: column {key!r}: missing (used by filters)")
        if not ok(_text(value)):
            return reason
    return None


def _sample(records: list[dict], n: int, recipe: Recipe, report: BuildReport) -> list[dict]:
    records = list(records)
    if recipe.shuffle:  # else: the first N in file order
        random.Random(recipe.seed).shuffle(records)
    report.drop(f"beyond sample of {n}", max(0, len(records) - n))
    return records[:n]


def _grouper(recipe: Recipe) -> Callable[[dict], str]:
    text = recipe.group_by or ""
    fields = template_fields(text, f"{recipe.path or 'recipe'}: group_by")
    template = text if fields else "{" + text + "}"

    def key(record: dict) -> str:
        # Raw columns first: group_by names columns of the source (a recipe's record
        # fields are only a fallback, e.g. for a hook's output).
        row = {**{k: v for k, v in record.items() if k in RECORD_FIELDS}, **record["_row"]}
        try:
            return template.format_map({k: _text(v) for k, v in row.items()})
        except KeyError as exc:
            raise TunelabError(f"{record['_where']}: column {exc.args[0]!r}: missing (used by group_by)") from None

    return key


def _length_stats(splits: dict[str, list[dict]]) -> dict[str, int]:
    """Character lengths of prompt+answer (token lengths: ``tunelab data stats``)."""
    lengths = sorted(len(r.get("instruction", "")) + len(r.get("input", "")) + len(r.get("output", ""))
                     for rows in splits.values() for r in rows)
    if not lengths:
        return {}
    return {"min_chars": lengths[0], "p50_chars": lengths[len(lengths) // 2], "max_chars": lengths[-1]}
