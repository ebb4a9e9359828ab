"""Other projects' names for tunelab's config fields, and "did you mean" suggestions.

People arrive with Hugging Face ``TrainingArguments``, peft and LLaMA-Factory habits:
``train.learning_rate``, ``method.lora_rank``, ``num_train_epochs``. Those names are
accepted where they mean exactly what the tunelab field means, with a note (once per
process) naming the tunelab field. A bare name at the top level (``learning_rate=1e-3``)
goes to the one section that has it. Keys that are neither names nor aliases are errors
whose suggestion is drawn from names *and* aliases, so ``learning_rat`` suggests
``train.lr``, and a key in the wrong section (``train.lora_rank``) points to the right one.

This module knows only strings; ``tunelab.config`` hands it the field names of each section.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any

from tunelab.errors import TunelabError

# section ("" = top level) -> {other name: tunelab field}. Only names whose meaning and
# values are the same as the tunelab field's; LLaMA-Factory keys that need translating
# live in tunelab.lf_compat.
ALIASES: dict[str, dict[str, str]] = {
    "": {"overwrite_output_dir": "overwrite"},
    "model": {"model_name_or_path": "name", "model_name": "name"},
    "data": {"dataset": "train", "train_dataset": "train", "eval_dataset": "eval",
             "max_seq_length": "cutoff_len", "max_seq_len": "cutoff_len", "max_length": "cutoff_len"},
    "method": {"finetuning_type": "name", "lora_rank": "r", "lora_r": "r", "rank": "r",
               "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_target": "target_modules",
               "lora_target_modules": "target_modules"},
    "train": {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
              "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
              "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler",
              "resume_from_checkpoint": "resume", "early_stopping_steps": "early_stopping_patience",
              "neftune_noise_alpha": "neftune_alpha"},
}

_NOTED: set[str] = set()


def note(text: str) -> None:
    """Print ``note: text`` on stderr once per process (main process only)."""
    if text in _NOTED or int(os.environ.get("RANK", "0")) != 0:
        return
    _NOTED.add(text)
    print(f"note: {text}", file=sys.stderr, flush=True)


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def resolve(section: str, values: dict[str, Any], names: list[str],
            sections: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """``values`` with aliases renamed to tunelab fields (a new dict; the input is not changed).

    At the top level (``section == ""``, ``sections`` = each section's field names) a bare
    field name or alias that exactly one section has moves into that section.
    """
    aliases = ALIASES.get(section, {})
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # tunelab field -> the key the user wrote

    def put(node: dict[str, Any], field: str, value: Any, written: str, full: str) -> None:
        if field in node:
            raise TunelabError(f"'{written}' and '{given.get(full, full)}' both set {full}; keep one")
        node[field] = value
        given[full] = written

    for key, value in values.items():
        key = str(key)
        if key in names:
            if isinstance(value, dict):  # a section: copied, flat keys may join it
                earlier = out.get(key) if isinstance(out.get(key), dict) else {}
                clash = set(earlier) & set(value)
                if clash:
                    full = _dotted(key, sorted(clash)[0])
                    raise TunelabError(f"'{given.get(full, full)}' and '{full}' both set {full}; keep one")
                out[key] = {**value, **earlier}
            else:
                put(out, key, value, _dotted(section, key), _dotted(section, key))
        elif key in aliases:
            field = aliases[key]
            note(f"'{_dotted(section, key)}' is tunelab's '{_dotted(section, field)}'")
            put(out, field, value, _dotted(section, key), _dotted(section, field))
        elif section == "" and sections and (home := _single_home(key, sections)):
            sec, field = home
            node = out.setdefault(sec, {})
            if not isinstance(node, dict):
                raise TunelabError(f"config section '{sec}' must be a mapping")
            note(f"'{key}' is tunelab's '{sec}.{field}'")
            put(node, field, value, key, f"{sec}.{field}")
        else:
            out[key] = value  # unknown: the caller reports it with a suggestion
    return out


def canonical(keys: list[str], sections: dict[str, list[str]]) -> list[str]:
    """An override's dotted key with aliases replaced (``["train", "learning_rate"]`` -> ``["train", "lr"]``),
    so that it overrides the recipe's own field instead of clashing with it."""
    if len(keys) == 2 and keys[0] in sections and keys[1] in ALIASES.get(keys[0], {}) \
            and keys[1] not in sections[keys[0]]:
        field = ALIASES[keys[0]][keys[1]]
        note(f"'{keys[0]}.{keys[1]}' is tunelab's '{keys[0]}.{field}'")
        return [keys[0], field]
    if len(keys) == 1 and keys[0] not in sections and keys[0] not in ALIASES[""]:
        home = _single_home(keys[0], sections)
        if home and keys[0] not in ("output_dir", "overwrite"):
            note(f"'{keys[0]}' is tunelab's '{home[0]}.{home[1]}'")
            return list(home)
    return keys


def _single_home(key: str, sections: dict[str, list[str]]) -> tuple[str, str] | None:
    """The one (section, field) a bare top-level key names, or None if none or several do."""
    homes = {(sec, key) for sec, names in sections.items() if key in names}
    homes |= {(sec, ALIASES[sec][key]) for sec in sections if key in ALIASES.get(sec, {})}
    return homes.pop() if len(homes) == 1 else None


def suggest(section: str, key: str, names: list[str], sections: dict[str, list[str]]) -> str | None:
    """The dotted tunelab key the user most likely meant by ``section.key``, or None."""
    own = {n: n for n in names} | dict(ALIASES.get(section, {}))
    close = difflib.get_close_matches(key, list(own), n=1, cutoff=0.6)
    if close:
        return _dotted(section, own[close[0]])
    every: dict[str, set[str]] = {}
    for sec, fields in sections.items():
        for name in fields:
            every.setdefault(name, set()).add(f"{sec}.{name}")
        for alias, field in ALIASES.get(sec, {}).items():
            every.setdefault(alias, set()).add(f"{sec}.{field}")
    for cutoff in (1.0, 0.75):  # the same name in another section first, then a near one
        for match in difflib.get_close_matches(key, list(every), n=3, cutoff=cutoff):
            if len(every[match]) == 1:
                return next(iter(every[match]))
    return None


def unknown_key(section: str, key: str, names: list[str], sections: dict[str, list[str]]) -> TunelabError:
    """The one-line error for a key that is neither a field nor an alias."""
    full = _dotted(section, key)
    hint = suggest(section, key, names, sections)
    tail = f" (did you mean '{hint}'?)" if hint else f" (valid: {', '.join(names)})"
    return TunelabError(f"unknown config key '{full}'{tail}")
