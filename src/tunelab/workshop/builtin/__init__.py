"""Built-in datasets made offline from real data shipped in PyPI packages.

``BUILDERS`` maps a name to ``(function, one-line description)``; each function takes
``out_dir`` plus keyword options and returns the split sizes it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tunelab.errors import TunelabError
from tunelab.workshop.builtin.icd10cm import build_icd10cm_chapter, build_icd10cm_norm
from tunelab.workshop.builtin.zh_disease import build_zh_disease

BUILDERS: dict[str, tuple[Callable[..., dict[str, int]], str]] = {
    "icd10cm-norm": (build_icd10cm_norm, "English clinical term -> standard ICD-10-CM description (simple-icd-10-cm)"),
    "icd10cm-chapter": (build_icd10cm_chapter, "ICD-10-CM description -> chapter or block (simple-icd-10-cm)"),
    "zh-disease": (build_zh_disease, "Chinese symptoms -> JSON diagnosis, plus drug/department facts (faker-healthcare-provider)"),
}


def build_builtin(name: str, out_dir: str | Path, **options: Any) -> dict[str, int]:
    """Build the built-in dataset ``name`` into ``out_dir``; return split sizes."""
    if name not in BUILDERS:
        raise TunelabError(f"unknown built-in dataset {name!r} (known: {', '.join(BUILDERS)})")
    function = BUILDERS[name][0]
    try:
        return function(out_dir, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TunelabError(f"{name}: {exc}") from None
        raise


__all__ = ["BUILDERS", "build_builtin", "build_icd10cm_norm", "build_icd10cm_chapter", "build_zh_disease"]
