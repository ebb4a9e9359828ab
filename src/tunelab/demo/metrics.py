"""Metrics the demo adds to the registry: ICD-10-CM chapter accuracy and keyword recall.

``icd_chapter``: the prediction is looked up as an ICD-10-CM description (normalised
text, exact); it counts as right when that code's chapter equals the reference's
chapter. A prediction that is not a real description is wrong. This credits an
answer that names the wrong code in the right chapter — the coarse level a small
model reaches first.

``keyword``: the reference holds ``|``-separated keywords; a prediction is right when
it contains one (case-insensitive). Used for the general questions, whose references
are the facts a correct answer must mention.
"""

from __future__ import annotations

import functools
import re

from tunelab.demo.general import keyword_hit
from tunelab.eval.metrics import METRICS


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().casefold()


@functools.lru_cache(maxsize=1)
def description_chapters() -> dict[str, str]:
    """Normalised description of every ICD-10-CM code -> its chapter number."""
    import simple_icd_10_cm as cm

    table = {}
    for code in cm.get_all_codes(with_dots=True):
        if cm.is_chapter(code) or cm.is_block(code):
            continue
        chapter = next((a for a in cm.get_ancestors(code) if cm.is_chapter(a)), "")
        table.setdefault(_norm(cm.get_description(code)), chapter)
    return table


def chapter_accuracy(predictions: list[str], references: list, options=None) -> dict[str, float]:
    table = description_chapters()
    right = 0
    for pred, ref in zip(predictions, references):
        ref = ref[0] if isinstance(ref, list) else ref
        gold = table.get(_norm(ref))
        right += gold is not None and table.get(_norm(pred)) == gold
    return {"icd_chapter_acc": right / len(predictions)}


def keyword_recall(predictions: list[str], references: list, options=None) -> dict[str, float]:
    hits = sum(keyword_hit(p, r[0] if isinstance(r, list) else r) for p, r in zip(predictions, references))
    return {"keyword_acc": hits / len(predictions)}


def register() -> None:
    METRICS.setdefault("icd_chapter", chapter_accuracy)
    METRICS.setdefault("keyword", keyword_recall)
