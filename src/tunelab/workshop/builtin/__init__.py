"""Built-in datasets made offline from real data shipped in PyPI packages.

``BUILDERS`` maps a name to ``(function, one-line description)``; each function takes
``out_dir`` plus keyword options and returns the split sizes it wrote.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Callable

from tunelab.errors import TunelabError
from tunelab.workshop.builtin.icd10cm import build_icd10cm_chapter, build_icd10cm_norm
from tunelab.workshop.builtin.icd10cm_text import build_icd10cm_text
from tunelab.workshop.builtin.zh_disease import build_zh_disease
from tunelab.workshop.builtin.zh_disease_text import build_zh_disease_text

BUILDERS: dict[str, tuple[Callable[..., dict[str, int]], str]] = {
    "icd10cm-norm": (build_icd10cm_norm, "English clinical term -> standard ICD-10-CM description (simple-icd-10-cm)"),
    "icd10cm-chapter": (build_icd10cm_chapter, "ICD-10-CM description -> chapter or block (simple-icd-10-cm)"),
    "icd10cm-text": (build_icd10cm_text, "ICD-10-CM as running text for continued pre-training (train.stage=pt), "
                                         "held-out documents for domain perplexity (simple-icd-10-cm)"),
    "zh-disease": (build_zh_disease, "Chinese symptoms -> JSON diagnosis, plus drug/department facts (faker-healthcare-provider)"),
    "zh-disease-text": (build_zh_disease_text, "Chinese disease/symptom/drug running text for continued pre-training "
                                               "(train.stage=pt), held-out diseases (faker-healthcare-provider)"),
}


def build_builtin(name: str, out_dir: str | Path, **options: Any) -> dict[str, int]:
    """Build the built-in dataset ``name`` into ``out_dir``; return split sizes."""
    if name not in BUILDERS:
        raise TunelabError(f"unknown built-in dataset {name!r} (known: {', '.join(BUILDERS)})")
    function = BUILDERS[name][0]
    _check_options(name, function, options)
    return function(out_dir, **options)


def _check_options(name: str, function: Callable, options: dict[str, Any]) -> None:
    """Unknown options and wrong types are one-line errors (values come from the CLI)."""
    hints = typing.get_type_hints(function)
    known = [p for p in inspect.signature(function).parameters if p != "out_dir"]
    for key, value in options.items():
        if key not in known:
            raise TunelabError(f"{name}: unknown option {key!r} (known: {', '.join(known)})")
        allowed = typing.get_args(hints[key]) or (hints[key],)
        allowed = tuple(type(None) if a is None else a for a in allowed)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
            raise TunelabError(f"{name}: {key}: expected {names}, got {value!r}")


__all__ = ["BUILDERS", "build_builtin", "build_icd10cm_norm", "build_icd10cm_chapter", "build_icd10cm_text",
           "build_zh_disease", "build_zh_disease_text"]
