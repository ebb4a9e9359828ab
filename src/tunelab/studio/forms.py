"""The New-run form and its YAML: one schema, ``tunelab.config.RunConfig``, for CLI, YAML and UI.

The YAML text is the source of truth. A form edit is applied to the parsed YAML mapping
(other keys, aliases included, stay as they were) and the mapping is dumped again; a YAML
edit is parsed and every form field is filled from the resulting ``RunConfig``. Both go
through ``tunelab.config.load_config`` on the text, exactly as ``tunelab train FILE``
reads a recipe, so what the page shows is what the run gets.

Field types, choices and help come from the config dataclasses themselves: types from
their annotations, choices from their own validation messages, help from the docstring
under each field in ``tunelab/config.py``. The form only adds widgets, grouping, a few
range checks ``tunelab train`` leaves to the trainer (which would fail later with a
traceback), and that every path stays inside the workspace.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import RunConfig, load_config, section_fields
from tunelab.errors import TunelabError

if typing.TYPE_CHECKING:
    from tunelab.studio.workspace import Workspace

LORA_FAMILY = ("lora", "qlora", "lora8bit", "dora", "rslora", "pissa", "olora", "loraplus", "adalora")
# (dotted key, group, only for these method names)
FORM_FIELDS: list[tuple[str, str, tuple[str, ...] | None]] = [
    ("output_dir", "run", None),
    ("model.name", "model", None), ("model.template", "model", None), ("model.precision", "model", None),
    ("data.train", "data", None), ("data.eval", "data", None), ("data.dataset_dir", "data", None),
    ("data.val_size", "data", None), ("data.max_samples", "data", None), ("data.cutoff_len", "data", None),
    ("data.truncation", "data", None), ("data.mask_history", "data", None), ("data.train_on_prompt", "data", None),
    ("data.packing", "data", None),
    ("method.name", "method", None), ("method.r", "method", LORA_FAMILY), ("method.alpha", "method", LORA_FAMILY),
    ("method.dropout", "method", LORA_FAMILY), ("method.target_modules", "method", LORA_FAMILY),
    ("method.freeze_trainable_layers", "method", ("freeze",)), ("method.freeze_train_head", "method", ("freeze",)),
    ("method.num_virtual_tokens", "method", ("prefix", "prompt")),
    ("train.stage", "train", None), ("train.epochs", "train", None), ("train.max_steps", "train", None),
    ("train.batch_size", "train", None), ("train.grad_accum", "train", None), ("train.lr", "train", None),
    ("train.scheduler", "train", None), ("train.warmup_ratio", "train", None), ("train.bf16", "train", None),
    ("train.gradient_checkpointing", "train", None), ("train.max_time", "train", None),
    ("train.logging_steps", "train", None), ("train.eval_steps", "train", None),
    ("train.save_strategy", "train", None), ("train.save_steps", "train", None), ("train.seed", "train", None),
]
# Checks the trainer would otherwise make late (or never): (predicate, what the value must be).
RANGES: dict[str, tuple[Any, str]] = {
    "train.batch_size": (lambda v: v >= 1, "must be at least 1"),
    "train.grad_accum": (lambda v: v >= 1, "must be at least 1"),
    "train.lr": (lambda v: v > 0, "must be > 0"),
    "train.epochs": (lambda v: v > 0, "must be > 0"),
    "train.max_steps": (lambda v: v == -1 or v >= 1, "must be -1 (use epochs) or at least 1"),
    "train.warmup_ratio": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "train.logging_steps": (lambda v: v >= 1, "must be at least 1"),
    "train.eval_steps": (lambda v: v is None or v >= 1, "must be at least 1 (or empty)"),
    "train.save_steps": (lambda v: v >= 1, "must be at least 1"),
    "method.r": (lambda v: v >= 1, "must be at least 1"),
    "method.dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "data.val_size": (lambda v: v >= 0, "must be >= 0 (a fraction < 1 or a count)"),
    "data.max_samples": (lambda v: v is None or v >= 1, "must be at least 1 (or empty)"),
}
_FIELD_AT_START = re.compile(r"^(?:[^:]*\.ya?ml(?::\d+)?: )?([a-z_]+(?:\.[a-z_0-9]+)*):")


class FieldError(TunelabError):
    """A bad value, with the form field (dotted key) it belongs to, or ``yaml`` for the text."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field or field_of(message)


def field_of(message: str) -> str:
    """The dotted config key a tunelab error message starts with, else ``yaml``."""
    match = _FIELD_AT_START.match(message)
    if match:
        return match.group(1)
    known = re.search(r"unknown config key '([^']+)'", message)
    return known.group(1) if known else "yaml"


# ---------------------------------------------------------------- the schema


def _section_class(section: str) -> type:
    return typing.get_type_hints(RunConfig)[section]


def _hint(key: str) -> Any:
    if "." not in key:
        return typing.get_type_hints(RunConfig)[key]
    section, name = key.split(".", 1)
    return typing.get_type_hints(_section_class(section))[name]


def _default(key: str) -> Any:
    cfg = RunConfig()
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


@functools.lru_cache(maxsize=None)
def field_docs() -> dict[str, str]:
    """``{"train.lr": "Peak learning rate.", ...}`` from the docstrings under each field."""
    import tunelab.config as config_module

    classes = {typing.get_type_hints(RunConfig)[s].__name__: s for s in section_fields()}
    classes[RunConfig.__name__] = ""
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(config_module))
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.name not in classes:
            continue
        prefix = classes[node.name] + "." if classes[node.name] else ""
        for here, after in zip(node.body, node.body[1:]):
            if isinstance(here, ast.AnnAssign) and isinstance(here.target, ast.Name) \
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str):
                docs[prefix + here.target.id] = " ".join(after.value.value.replace("``", "").split())
    return docs


@functools.lru_cache(maxsize=None)
def choices(key: str) -> tuple[Any, ...] | None:
    """The values a field accepts, read from its own validation message (no second list to drift)."""
    if "." not in key:
        return None
    section, name = key.split(".", 1)
    try:
        _section_class(section)(**{name: "\x00not-a-choice"})
    except TunelabError as exc:
        match = re.search(r"is not one of (.+)$", str(exc))
        if match and str(exc).startswith(f"{key}:"):
            return tuple({"True": True, "False": False}.get(c, c) for c in match.group(1).split(", "))
    except (TypeError, ValueError):
        return None
    return None


def _kind(key: str) -> str:
    """Widget kind: choice, bool, int, float, list, text (optional ones accept an empty value)."""
    if choices(key):
        return "choice"
    hint = _hint(key)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if _is_optional(hint) and len(args) == 1 else hint
    if base is bool:
        return "bool"
    if base is int:
        return "int"
    if base is float:
        return "float"
    if typing.get_origin(base) is list or key == "method.target_modules":
        return "list"
    return "text"


def _is_optional(hint: Any) -> bool:
    return (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in typing.get_args(hint)


def schema() -> list[dict[str, Any]]:
    """What the page needs to draw the form: key, group, kind, choices, default, help, methods."""
    docs = field_docs()
    out = []
    for key, group, methods in FORM_FIELDS:
        hint = _hint(key)
        out.append({"key": key, "group": group, "kind": _kind(key), "choices": list(choices(key) or []) or None,
                    "default": _jsonable(_default(key)), "optional": _is_optional(hint) or hint is typing.Any,
                    "help": docs.get(key, ""), "methods": list(methods) if methods else None})
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


# ---------------------------------------------------------------- form value -> typed value


def coerce(key: str, raw: Any) -> Any:
    """A form value (text from an input, a bool from a checkbox) as the field's type."""
    if key not in {k for k, _, _ in FORM_FIELDS}:
        raise FieldError(f"{key}: not a field of the form", key)
    kind = _kind(key)
    text = raw.strip() if isinstance(raw, str) else raw
    if text in ("", None) and kind != "bool":
        if _is_optional(_hint(key)) or kind == "list":
            return [] if kind == "list" and key.startswith("data.") else None
        raise FieldError(f"{key}: a value is needed", key)
    try:
        if kind == "bool":
            return _bool(text)
        if kind == "int":
            if isinstance(text, bool) or not re.fullmatch(r"[+-]?\d+", str(text)):
                raise ValueError
            return int(text)
        if kind == "float":
            if isinstance(text, bool):
                raise ValueError
            return float(text)
        if kind == "choice":
            allowed = choices(key) or ()
            value = {"true": True, "false": False}.get(str(text).lower(), text) if True in allowed else text
            if value not in allowed:
                raise FieldError(f"{key}: {text!r} is not one of {', '.join(map(str, allowed))}", key)
            return value
        if kind == "list":
            items = text if isinstance(text, list) else re.split(r"[,\n]", str(text))
            items = [str(i).strip() for i in items if str(i).strip()]
            if key == "method.target_modules" and items == ["all-linear"]:
                return "all-linear"
            return items
    except ValueError:
        what = {"int": "a whole number", "float": "a number", "bool": "true or false"}[kind]
        raise FieldError(f"{key}: {raw!r} is not {what}", key) from None
    return str(text)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError


def check_values(cfg: RunConfig) -> None:
    """Types of every section field (a YAML can say ``lr: abc``) and the form's range checks."""
    for name in ("output_dir", "overwrite"):
        _check_type(name, getattr(cfg, name), typing.get_type_hints(RunConfig)[name])
    for section in section_fields():
        holder = getattr(cfg, section)
        for f in dataclasses.fields(holder):
            if dataclasses.is_dataclass(getattr(holder, f.name)):
                continue
            _check_type(f"{section}.{f.name}", getattr(holder, f.name),
                        typing.get_type_hints(type(holder))[f.name])
    for key, (ok, problem) in RANGES.items():
        value = _default_or(cfg, key)
        if not ok(value):
            raise FieldError(f"{key}: {value!r} {problem}", key)


def _default_or(cfg: RunConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_type(key: str, value: Any, hint: Any) -> None:
    allowed = [a for a in (typing.get_args(hint) or (hint,))] if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else [hint]
    for option in allowed:
        if option is typing.Any or _fits(value, option):
            return
    names = " or ".join(_type_name(a) for a in allowed)
    raise FieldError(f"{key}: {value!r} is not {names}", key)


def _fits(value: Any, option: Any) -> bool:
    if option is type(None):
        return value is None
    if option is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(option)
    if origin is list:
        (item,) = typing.get_args(option) or (typing.Any,)
        return isinstance(value, list) and all(item is typing.Any or _fits(v, item) for v in value)
    if origin is not None:  # dict[str, Any] and friends: the container's type is what a YAML can get wrong
        return isinstance(origin, type) and isinstance(value, origin)
    return isinstance(option, type) and isinstance(value, option)


def _type_name(option: Any) -> str:
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text",
            type(None): "empty"}.get(option, "a list" if typing.get_origin(option) is list else str(option))


# ---------------------------------------------------------------- YAML <-> config


def parse_mapping(text: str) -> dict[str, Any]:
    """The recipe text as a mapping; bad YAML is a ``yaml`` field error with its line."""
    try:
        values = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise FieldError(f"recipe{line}: invalid YAML: {getattr(exc, 'problem', exc)}", "yaml") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise FieldError("recipe: a recipe must be a YAML mapping", "yaml")
    return values


@contextlib.contextmanager
def _as_file(text: str):
    """The text in a temporary recipe file; errors mentioning it say ``recipe`` instead."""
    fd, tmp = tempfile.mkstemp(prefix="tunelab-studio-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        try:
            yield tmp
        except TunelabError as exc:
            if isinstance(exc, FieldError):
                raise
            message = str(exc).replace(tmp, "recipe").removeprefix("recipe: ")
            raise FieldError(message, field_of(str(exc))) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_text(text: str) -> RunConfig:
    """``load_config`` on the text, as ``tunelab train FILE`` reads the file; errors name fields."""
    with _as_file(text) as path:
        return load_config(path)


def dump(mapping: dict[str, Any]) -> str:
    return yaml.safe_dump(mapping, sort_keys=False, allow_unicode=True)


def set_value(mapping: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in the recipe mapping, replacing an alias spelling of the same field."""
    from tunelab.aliases import ALIASES

    *sections, name = key.split(".")
    node = mapping
    for section in sections:
        child = node.get(section)
        if not isinstance(child, dict):
            child = node[section] = {}
        node = child
    section = sections[0] if sections else ""
    for alias, field in ALIASES.get(section, {}).items():
        if field == name:
            node.pop(alias, None)
    if value is None or value == []:
        node.pop(name, None)  # empty: the default applies
    else:
        node[name] = value


def values_of(cfg: RunConfig) -> dict[str, Any]:
    """Every form field's value in ``cfg``."""
    return {key: _jsonable(_default_or(cfg, key)) for key, _, _ in FORM_FIELDS}


def compose(text: str, changes: dict[str, Any]) -> tuple[str, RunConfig]:
    """Apply form ``changes`` (dotted key -> raw value) to the recipe text; validate the result.

    Without changes the text is kept exactly as written (comments too). A LLaMA-Factory YAML
    is replaced by the tunelab recipe it means.
    """
    mapping = parse_mapping(text)
    from tunelab import lf_compat

    if lf_compat.is_lf_config(mapping):
        with _as_file(text) as path:
            mapping = lf_compat.load(path)[1]
        text = dump(mapping)
    if changes:
        for key, raw in changes.items():
            set_value(mapping, key, coerce(key, raw))
        text = dump(mapping)
    cfg = load_text(text)
    check_values(cfg)
    return text, cfg


def check_paths(cfg: RunConfig, ws: "Workspace") -> None:
    """Every path the recipe names resolves inside the workspace (``OutsideWorkspace`` otherwise)."""
    out = ws.path(cfg.output_dir, "output_dir")
    if out == ws.root:
        raise FieldError("output_dir: the workspace itself cannot be a run folder", "output_dir")
    ws.model_spec(cfg.model.name, "model.name")
    template = cfg.model.template
    if template and template.endswith(".jinja"):
        ws.path(template, "model.template", must_exist=True)
    if cfg.model.vision.tower and not str(cfg.model.vision.tower).startswith("builtin:"):
        ws.path(cfg.model.vision.tower, "model.vision.tower", must_exist=True)
    if cfg.data.dataset_dir:
        ws.path(cfg.data.dataset_dir, "data.dataset_dir", must_exist=True)
    for key in ("train", "eval"):
        for spec in getattr(cfg.data, key):
            _dataset(ws, spec, cfg, f"data.{key}")
    for spec in cfg.eval.datasets:
        _dataset(ws, spec, cfg, "eval.datasets")
    for spec in cfg.eval.models:
        ws.model_spec(spec, "eval.models")
    if cfg.train.resume and cfg.train.resume != "auto":
        ws.path(cfg.train.resume, "train.resume", must_exist=True)
    for key, value in (("eval.output_dir", cfg.eval.output_dir), ("export.out", cfg.export.out)):
        if value:
            ws.path(value, key)


def _dataset(ws: "Workspace", spec: str, cfg: RunConfig, field: str) -> None:
    from tunelab.studio.workspace import OutsideWorkspace

    try:
        ws.dataset_files(spec, cfg.data.dataset_dir, field)
    except OutsideWorkspace:
        raise
    except TunelabError as exc:
        if cfg.train.stage == "pt" and ws.path(spec, field).exists():
            return  # raw-text folders and .txt files are read by the pt stage's own reader
        message = str(exc)
        raise FieldError(message if message.startswith(field) else f"{field}: {message}", field) from None
