"""Regenerate recipes/data/quickstart-icd10cm-norm.jsonl (the quickstart recipe's data).

48 real ICD-10-CM inclusion terms (synonyms clinicians write) mapped to their code's
standard description, from the ``simple-icd-10-cm`` package, with the same prompt as
``tunelab data build icd10cm-norm``. 16 codes, 3 synonyms each, chosen with a fixed
seed. Run from the repository root:

    PYTHONPATH=src python recipes/data/make_quickstart_data.py
"""

from __future__ import annotations

import random
from pathlib import Path

import simple_icd_10_cm as cm

from tunelab.io import write_jsonl
from tunelab.workshop.builtin.icd10cm import NORM_PROMPT, synonyms_by_code

OUT = Path(__file__).with_name("quickstart-icd10cm-norm.jsonl")


def main() -> None:
    table = synonyms_by_code()
    codes = sorted(code for code, terms in table.items() if len(terms) >= 3)
    rows = []
    for code in random.Random(3).sample(codes, 16):
        for term in table[code][:3]:
            rows.append({"instruction": NORM_PROMPT.format(word=term), "input": "",
                         "output": cm.get_description(code), "code": code})
    random.Random(3).shuffle(rows)
    write_jsonl(OUT, rows)
    print(f"{len(rows)} rows -> {OUT}")


if __name__ == "__main__":
    main()
