"""String-level metrics: exact match, per-field JSON accuracy, label precision/recall/F1.

Every metric takes ``predictions: list[str]`` and ``references: list[str]`` (same length,
matched by position) and returns a flat ``{name: value}`` dict with values in [0, 1]
plus counts, so the results of several metrics merge into one JSON object.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from typing import Any

from tunelab.errors import TunelabError

NORMALISATIONS = ("strip", "width", "lower", "punct", "space")
"""Steps ``normalize`` knows, applied in this order whatever order they are given in."""

# seed 003's medical report: six fields, in its order
REPORT_FIELDS = ("主诉", "现病史", "辅助检查", "既往史", "诊断", "建议")

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def normalize(text: str, steps: str | tuple[str, ...] | list[str] = ("strip",)) -> str:
    """Normalise ``text`` with the given steps (names in ``NORMALISATIONS``).

    - ``width``: Unicode NFKC, so full-width ``ＡＢＣ１２３！`` becomes ``ABC123!``;
    - ``lower``: case-fold;
    - ``punct``: drop every Unicode punctuation character (category P*), which covers
      Chinese ``，。！？、；：“”（）《》`` as well as ASCII punctuation;
    - ``space``: collapse runs of whitespace to one space;
    - ``strip``: remove leading/trailing whitespace.
    """
    if isinstance(steps, str):
        steps = tuple(s.strip() for s in steps.split(",") if s.strip())
    unknown = set(steps) - set(NORMALISATIONS)
    if unknown:
        raise TunelabError(f"normalisation {sorted(unknown)[0]!r} is not one of {', '.join(NORMALISATIONS)}")
    if "width" in steps:
        text = unicodedata.normalize("NFKC", text)
    if "lower" in steps:
        text = text.casefold()
    if "punct" in steps:
        text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    if "space" in steps:
        text = re.sub(r"\s+", " ", text)
    if "strip" in steps:
        text = text.strip()
    return text


def _check(predictions: list[str], references: list[Any]) -> None:
    if len(predictions) != len(references):
        raise TunelabError(f"{len(predictions)} predictions but {len(references)} references")


def exact_match(predictions: list[str], references: list[Any], normalise: Any = ("strip",)) -> dict[str, Any]:
    """Fraction of rows whose normalised prediction equals a normalised reference.

    A reference may be a list of acceptable answers (any match counts). Empty input
    gives 0.0.
    """
    _check(predictions, references)
    hits = 0
    for pred, ref in zip(predictions, references):
        refs = ref if isinstance(ref, list) else [ref]
        pred_n = normalize(str(pred), normalise)
        hits += any(pred_n == normalize(str(r), normalise) for r in refs)
    return {"em": hits / len(predictions) if predictions else 0.0}


def parse_json_answer(text: str) -> dict | None:
    """The JSON object in a model answer, or None.

    Takes the content of the first ```json fence when there is one (seed 003), else the
    whole text, else the outermost ``{...}`` span; anything that is not a JSON object
    gives None.
    """
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate.strip())
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _field_text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def json_field_accuracy(predictions: list[str], references: list[Any],
                        fields: list[str] | tuple[str, ...] | None = None,
                        normalise: Any = ("strip",)) -> dict[str, Any]:
    """Per-field accuracy of JSON answers (seed 003's medical report check).

    Each reference is a JSON object (or its text); ``fields`` defaults to the reference's
    own keys. A field is right when the prediction's value, normalised, equals the
    reference's. A prediction that does not parse counts every field wrong and is
    counted in ``json_unparseable``. ``json_field_acc`` is over all (row, field) pairs;
    ``json_field.<name>`` per field; ``json_all_fields`` the fraction of fully right rows.
    """
    _check(predictions, references)
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    unparseable = all_right = 0
    for row, (pred, ref) in enumerate(zip(predictions, references)):
        gold = ref if isinstance(ref, dict) else parse_json_answer(str(ref))
        if gold is None:
            raise TunelabError(f"reference row {row + 1}: not a JSON object (json_field needs JSON references)")
        parsed = parse_json_answer(str(pred))
        unparseable += parsed is None
        parsed = parsed or {}
        keys = list(fields) if fields else list(gold)
        ok_row = True
        for key in keys:
            total[key] += 1
            ok = key in parsed and normalize(_field_text(parsed[key]), normalise) == \
                normalize(_field_text(gold.get(key, "")), normalise)
            right[key] += ok
            ok_row &= ok
        all_right += ok_row
    pairs = sum(total.values())
    out: dict[str, Any] = {
        "json_field_acc": sum(right.values()) / pairs if pairs else 0.0,
        "json_all_fields": all_right / len(predictions) if predictions else 0.0,
        "json_unparseable": unparseable,
    }
    for key in total:
        out[f"json_field.{key}"] = right[key] / total[key]
    return out


def label_scores(predictions: list[str], references: list[Any], normalise: Any = ("strip",)) -> dict[str, Any]:
    """Accuracy and macro precision/recall/F1 for single-label classification.

    Labels are normalised strings. Classes are the labels seen in the references; a
    predicted label outside them is simply wrong (it lowers recall of the true class
    and adds no class of its own). For class c: P = TP/(TP+FP), R = TP/(TP+FN),
    F1 = 2PR/(P+R), each 0 when its denominator is 0; the macro average is the mean
    over classes. ``micro_f1`` equals accuracy for single-label data.
    """
    _check(predictions, references)
    preds = [normalize(str(p), normalise) for p in predictions]
    golds = [normalize(str(r), normalise) for r in references]
    classes = sorted(set(golds))
    precisions, recalls, f1s = [], [], []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        precisions.append(p)
        recalls.append(r)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    n = len(classes) or 1
    accuracy = sum(p == g for p, g in zip(preds, golds)) / len(golds) if golds else 0.0
    return {"accuracy": accuracy, "precision": sum(precisions) / n, "recall": sum(recalls) / n,
            "f1": sum(f1s) / n, "label_classes": len(classes)}
