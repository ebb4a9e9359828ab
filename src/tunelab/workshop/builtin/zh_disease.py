"""Chinese disease records from ``faker-healthcare-provider``'s zh_CN data (offline).

The package maps 158 Chinese disease names to an ICD-10 code, symptoms, Chinese drug
names and a specialty. From each disease we make:

- several symptom presentations (different subsets and orders of its symptoms) ->
  a JSON answer with 诊断/ICD编码/科室/用药; one presentation per disease is held out
  for ``test`` and one for ``validation``, so evaluation asks about known diseases
  described in an unseen way;
- three fact questions (ICD code, department, medication), always in training.

A symptom set shared by two diseases has two right answers, so such presentations
are dropped (they would teach noise and make exact-match scoring unfair).
"""

from __future__ import annotations

import importlib
import itertools
import json
import random
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.workshop.output import write_dataset

MODULE = "faker_healthcare.zh_CN.disease_correlations"
SOURCE = "faker-healthcare-provider (PyPI), module faker_healthcare.zh_CN.disease_correlations"
LICENSE = "MIT (test data; not for real diagnosis)"

DIAGNOSIS_PROMPT = (
    "你是一名医生。请根据患者的症状给出初步诊断,以JSON格式输出,包含诊断、ICD编码、科室、用药四个字段。\n"
    "症状:{symptoms}\n"
    "答:"
)
FACT_PROMPTS = {
    "icd": ("疾病“{name}”的ICD-10编码是什么?", "{icd10}"),
    "department": ("患有“{name}”应该去哪个科室就诊?", "{medical_specialty}"),
    "drugs": ("“{name}”的常用药物有哪些?", "{drugs}"),
}


def load_diseases() -> dict[str, dict[str, Any]]:
    """The zh_CN disease table, found by module name (the distribution is named differently)."""
    try:
        module = importlib.import_module(MODULE)
    except ImportError as exc:
        raise TunelabError(f"zh-disease needs 'faker-healthcare-provider': pip install faker-healthcare-provider ({exc})") from exc
    return dict(module.DISEASE_CORRELATIONS)


def _answer(name: str, data: dict[str, Any], drugs: int) -> str:
    report = {"诊断": name, "ICD编码": data["icd10"], "科室": data["medical_specialty"],
              "用药": list(data["medications"][:drugs])}
    return json.dumps(report, ensure_ascii=False)


def _presentations(symptoms: list[str], variants: int, rng: random.Random) -> list[tuple[str, ...]]:
    """Distinct symptom subsets (at least 2, or all when fewer), each in a random order."""
    size_min = min(2, len(symptoms))
    subsets = [c for k in range(len(symptoms), size_min - 1, -1) for c in itertools.combinations(symptoms, k)]
    rng.shuffle(subsets)
    chosen = []
    for subset in subsets[:variants]:
        order = list(subset)
        rng.shuffle(order)
        chosen.append(tuple(order))
    return chosen


def build_zh_disease(out_dir: str | Path, variants: int = 5, drugs: int = 3, seed: int = 42) -> dict[str, int]:
    """Build ``zh-disease`` into ``out_dir``; return the split sizes.

    variants: symptom presentations per disease (>= 3: one each for test and
    validation, the rest for training). drugs: medications listed in each answer.
    """
    if variants < 3:
        raise TunelabError(f"zh-disease: variants: need at least 3 (one test, one validation, one train), got {variants}")
    diseases = load_diseases()
    rng = random.Random(seed)
    presentations = {name: _presentations(list(d["symptoms"]), variants, rng) for name, d in diseases.items()}
    owners: dict[frozenset, set[str]] = {}
    for name, shown in presentations.items():
        for p in shown:
            owners.setdefault(frozenset(p), set()).add(name)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    dropped = 0
    for name in sorted(diseases):
        data = diseases[name]
        meta = {"disease": name, "code": data["icd10"], "department": data["medical_specialty"]}
        unique = [p for p in presentations[name] if len(owners[frozenset(p)]) == 1]
        dropped += len(presentations[name]) - len(unique)
        rows = [{"instruction": DIAGNOSIS_PROMPT.format(symptoms="、".join(p)), "input": "",
                 "output": _answer(name, data, drugs), "task": "diagnosis", **meta} for p in unique]
        if len(rows) >= 3:
            splits["test"].append(rows.pop())
            splits["validation"].append(rows.pop())
        splits["train"] += rows
        values = {"name": name, "drugs": "、".join(data["medications"][:drugs]), **data}
        for task, (question, answer) in FACT_PROMPTS.items():
            splits["train"].append({"instruction": question.format(**values), "input": "",
                                    "output": answer.format(**values), "task": task, **meta})
    for rows in splits.values():
        rng.shuffle(rows)
    info = {
        "description": f"Chinese diagnosis and drug facts for {len(diseases)} diseases "
                       f"({dropped} ambiguous symptom presentations dropped).",
        "source": SOURCE, "license": LICENSE, "prompt": DIAGNOSIS_PROMPT,
        "options": {"variants": variants, "drugs": drugs, "seed": seed}, "diseases": len(diseases),
    }
    return write_dataset(out_dir, "zh-disease", splits, info)
