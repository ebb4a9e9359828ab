"""``zh-disease-text``: a Chinese domain corpus for continued pre-training.

One document per disease of ``faker-healthcare-provider``'s zh_CN table, written as running
Chinese text: the disease and its ICD-10 code, the department that treats it, its symptoms
and its usual drugs; where the code is also in ICD-10-CM (``simple-icd-10-cm``, when
installed) its English standard name and chapter are added, which ties the Chinese names to
the English terminology of ``icd10cm-text``. ``validation`` and ``test`` hold out whole
diseases, so domain perplexity is measured on diseases the model never read about.

The same facts are what ``zh-disease`` teaches by question and answer (its fact questions
are all in training), so pre-training on this corpus leaks none of that set's held-out
symptom presentations beyond what its training split already says.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.workshop.builtin.zh_disease import LICENSE, SOURCE, load_diseases
from tunelab.workshop.output import write_dataset


def _list(items: list[str]) -> str:
    items = [i for i in items if i]
    return "、".join(items[:-1]) + f"和{items[-1]}" if len(items) > 1 else "".join(items)


def _icd10cm(code: str) -> tuple[str, str] | None:
    """(English description, chapter title) of ``code`` in ICD-10-CM, when it is there."""
    try:
        from tunelab.workshop.builtin.icd10cm import _icd, code_meta

        cm = _icd()
    except TunelabError:
        return None  # simple-icd-10-cm is optional here
    if not cm.is_valid_item(code):
        return None
    return cm.get_description(code), code_meta(cm, code)["chapter_title"]


def disease_document(name: str, data: dict[str, Any]) -> str:
    """One disease as a short Chinese paragraph."""
    code = data["icd10"]
    lines = [f"{name}(ICD-10 编码 {code})由{data['medical_specialty']}诊治。",
             f"{name}的常见症状有{_list(list(data['symptoms']))}。",
             f"治疗{name}的常用药物包括{_list(list(data['medications']))}。"]
    english = _icd10cm(code)
    if english:
        lines.append(f"在 ICD-10-CM 中,{code} 的标准名称是“{english[0]}”,属于“{english[1]}”一章。")
    return "\n".join(lines)


def build_zh_disease_text(out_dir: str | Path, validation_fraction: float = 0.1, test_fraction: float = 0.1,
                          seed: int = 42) -> dict[str, int]:
    """Build ``zh-disease-text`` into ``out_dir`` (rows ``{"text", "disease", "code"}``); return split sizes.

    validation_fraction/test_fraction: share of the diseases held out (whole documents).
    """
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise TunelabError("zh-disease-text: validation_fraction and test_fraction must be in [0, 1) and sum below 1")
    diseases = load_diseases()
    names = sorted(diseases)
    random.Random(seed).shuffle(names)
    rows = [{"text": disease_document(n, diseases[n]), "disease": n, "code": diseases[n]["icd10"]} for n in names]
    n_val, n_test = round(validation_fraction * len(rows)), round(test_fraction * len(rows))
    splits = {"validation": rows[:n_val], "test": rows[n_val:n_val + n_test], "train": rows[n_val + n_test:]}
    linked = sum("ICD-10-CM" in r["text"] for r in rows)
    info = {"description": f"Chinese running text for continued pre-training: {len(rows)} disease documents "
                           f"({linked} with the ICD-10-CM English name).",
            "source": SOURCE, "license": LICENSE,
            "options": {"validation_fraction": validation_fraction, "test_fraction": test_fraction, "seed": seed},
            "characters": {s: sum(len(r["text"]) for r in part) for s, part in splits.items()}}
    return write_dataset(out_dir, "zh-disease-text", splits, info, columns={"prompt": "text"})
