"""Data-build recipes: a YAML file that says how raw rows become instruction records.

```yaml
name: norm                       # dataset name (files: norm_train.jsonl, norm_test.jsonl)
sources:                         # or `source:` with one mapping
  - {path: train.xlsx, sheet: Sheet1, sample: 5000, split: train}
  - {path: val.xlsx, sample: 100, split: test}
template:                        # str.format fields name columns; write {{ }} for braces
  instruction: "原始词:{原始词}\\n该词的标准术语为:"
  output: "{标准词}"
hook: package.module:function    # instead of template: row -> record | list | None
# drop_empty: true checks the built instruction/output; a list names raw columns.
# min/max_length and regex apply to built fields (instruction, output...) first.
filters: {drop_empty: true, min_length: {output: 2}, max_length: {instruction: 4000},
          regex: {output: "^\\\\S"}, exclude_regex: {instruction: "http"}}
sample: 5100                     # keep N records after filtering (seeded shuffle first)
seed: 42
shuffle: true                    # false: keep file order; sample takes the first N,
                                 # held-out splits come from the end
split: {test: 100}               # counts or ratios; rows with a fixed source split keep it
group_by: "{topic}"              # records sharing this value never straddle the split
out: ../sft_dataset              # relative to the recipe; `--out` overrides
```
"""

from __future__ import annotations

import difflib
import string
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import TunelabError

RECORD_FIELDS = ("system", "instruction", "input", "output")


@dataclass
class Source:
    """One raw file. ``json_path`` walks into a JSON document (``*`` = every item/value)."""

    path: Path
    sheet: str | None = None
    json_path: str | None = None
    sample: int | None = None
    split: str | None = None


@dataclass
class Filters:
    """Which records to drop, each rule counted separately in the summary."""

    drop_empty: bool | list[str] = True
    min_length: dict[str, int] = field(default_factory=dict)
    max_length: dict[str, int] = field(default_factory=dict)
    regex: dict[str, str] = field(default_factory=dict)
    exclude_regex: dict[str, str] = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    sources: list[Source]
    template: dict[str, str] = field(default_factory=dict)
    hook: str | None = None
    filters: Filters = field(default_factory=Filters)
    sample: int | None = None
    seed: int = 42
    shuffle: bool = True
    split: dict[str, int | float] = field(default_factory=dict)
    group_by: str | None = None
    out: Path | None = None
    keep_columns: list[str] = field(default_factory=list)
    path: Path | None = None

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()


def _unknown(where: str, keys: set[str], allowed: list[str]) -> None:
    for key in sorted(keys - set(allowed)):
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(allowed)})"
        raise TunelabError(f"{where}: unknown key '{key}'{hint}")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TunelabError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def template_fields(text: str, where: str) -> list[str]:
    """Column names used by a ``str.format`` template (one-line error if malformed)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise TunelabError(f"{where}: bad template ({exc}); write {{{{ and }}}} for literal braces") from exc
    for name in names:
        if not name or name.isdigit():
            raise TunelabError(f"{where}: '{{{name}}}' names no column; write {{column}} (or {{{{ }}}} for braces)")
    return names


_TYPES = {"sample": int, "seed": int, "shuffle": bool, "group_by": str, "hook": str, "keep_columns": list,
          "split": dict, "sheet": str, "json_path": str, "drop_empty": (bool, list), "min_length": dict,
          "max_length": dict, "regex": dict, "exclude_regex": dict}


def _check_types(values: dict, where: str, types: dict | None = None) -> None:
    types = {**_TYPES, **(types or {})}
    for key, value in values.items():
        wanted = types.get(key)
        if wanted is None or value is None:
            continue
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in (wanted if isinstance(wanted, tuple) else (wanted,)))
            raise TunelabError(f"{where}: {key}: expected {names}, got {value!r}")


def _source(raw: Any, base: Path, where: str) -> Source:
    if isinstance(raw, str):
        raw = {"path": raw}
    raw = _mapping(raw, where)
    allowed = [f.name for f in fields(Source)]
    _unknown(where, set(raw), allowed)
    _check_types(raw, where, {"split": str})
    if "path" not in raw:
        raise TunelabError(f"{where}: path: missing")
    path = Path(str(raw["path"])).expanduser()
    return Source(**{**raw, "path": path if path.is_absolute() else base / path})


def parse_recipe(data: Any, path: Path | None = None) -> Recipe:
    """Validate a recipe mapping; ``path`` (the YAML file) anchors relative paths."""
    label = str(path) if path else "recipe"
    data = dict(_mapping(data, label))
    if not str(data.get("name") or "").strip():
        raise TunelabError(f"{label}: name: missing")
    allowed = [f.name for f in fields(Recipe) if f.name not in ("path", "sources")] + ["sources", "source"]
    _unknown(label, set(data), allowed)
    base = path.parent if path else Path.cwd()
    raw_sources = data.pop("sources", None) or data.pop("source", None)
    if raw_sources is None:
        raise TunelabError(f"{label}: sources: missing (give `source:` or `sources:`)")
    if not isinstance(raw_sources, list):
        raw_sources = [raw_sources]
    sources = [_source(s, base, f"{label}: sources[{i}]") for i, s in enumerate(raw_sources)]
    template = {k: str(v) for k, v in _mapping(data.pop("template", None), f"{label}: template").items()}
    _unknown(f"{label}: template", set(template), list(RECORD_FIELDS))
    for key, text in template.items():
        template_fields(text, f"{label}: template.{key}")
    if bool(template) == bool(data.get("hook")):
        raise TunelabError(f"{label}: give exactly one of `template` (with instruction/output) or `hook`")
    if template and not {"instruction", "output"} <= set(template):
        raise TunelabError(f"{label}: template: needs both 'instruction' and 'output'")
    raw_filters = _mapping(data.pop("filters", None), f"{label}: filters")
    _unknown(f"{label}: filters", set(raw_filters), [f.name for f in fields(Filters)])
    _check_types(raw_filters, f"{label}: filters")
    _check_types(data, label)
    if "train" in (data.get("split") or {}):
        raise TunelabError(f"{label}: split: list only held-out splits (e.g. test: 0.1); train gets the rest")
    out = data.pop("out", None)
    recipe = Recipe(sources=sources, template=template, filters=Filters(**raw_filters), path=path,
                    out=(base / str(out)).resolve() if out else None, **data)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise TunelabError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if "name" not in (data or {}) and isinstance(data, dict):
        data["name"] = path.stem
    return parse_recipe(data, path.resolve())
