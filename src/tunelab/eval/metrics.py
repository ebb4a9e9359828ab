"""Metric registry and ``score``: many metrics over one prediction/reference list.

Names (``--metrics``): ``em``, ``json_field``, ``f1`` (label accuracy and macro
precision/recall/F1), ``bleu`` (BLEU-1..4, sacrebleu 0-100 scale), ``rouge``
(ROUGE-1/2/L F), ``meteor``, ``cider`` (CIDEr-D), ``bertscore``, ``perplexity`` (needs
a model). Every other value is on a 0-1 scale except CIDEr-D (0-10, COCO's scale) and
perplexity. Definitions are in each function's docstring (metrics_text,
metrics_overlap, metrics_model) and in docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

from tunelab.errors import TunelabError
from tunelab.eval import metrics_overlap as overlap
from tunelab.eval import metrics_text as text


@dataclass
class MetricOptions:
    """Knobs some metrics take; the defaults suit most test sets."""

    normalise: str = "strip"
    """Normalisation for em/json_field/f1: comma list of strip,width,lower,punct,space."""
    lang: str | None = None
    """``en`` or ``zh`` tokenisation for BLEU/ROUGE/METEOR/CIDEr (default: detected)."""
    json_fields: list[str] | None = None
    """Fields json_field checks (default: each reference's own keys)."""
    bertscore_model: str | None = None
    """Local model folder or ``builtin:NAME`` for BERTScore (default: builtin SmolLM2)."""
    bertscore_layer: int | None = None
    """Hidden layer BERTScore compares (default: documented per encoder)."""
    model: Any = None
    """(model, tokenizer) for perplexity."""
    prompts: list[Any] | None = None
    """Prompts (chat message lists or strings) the references answer, for perplexity."""


def _em(p, r, o):
    return text.exact_match(p, r, o.normalise)


def _json(p, r, o):
    return text.json_field_accuracy(p, r, o.json_fields, o.normalise)


def _f1(p, r, o):
    return text.label_scores(p, r, o.normalise)


def _bertscore(p, r, o):
    from tunelab.eval.metrics_model import bertscore

    return bertscore(p, r, o.bertscore_model, o.bertscore_layer)


def _perplexity(p, r, o):
    if o.model is None:
        return {"perplexity": "unavailable: needs a model (--model)"}
    from tunelab.eval.metrics_model import perplexity
    from tunelab.models.gguf_runtime import is_llamacpp

    model, tokenizer = o.model
    if is_llamacpp(model):
        return {"perplexity": "unavailable: the model runs in llama.cpp (--quantize); score it without --quantize"}
    refs = [ref[0] if isinstance(ref, list) else ref for ref in r]
    return perplexity(model, tokenizer, refs, o.prompts)


METRICS: dict[str, Callable[[list[str], list[Any], MetricOptions], dict[str, Any]]] = {
    "em": _em,
    "json_field": _json,
    "f1": _f1,
    "bleu": lambda p, r, o: overlap.bleu(p, r, o.lang),
    "rouge": lambda p, r, o: overlap.rouge(p, r, o.lang),
    "meteor": lambda p, r, o: overlap.meteor(p, r, o.lang),
    "cider": lambda p, r, o: overlap.cider_d(p, r, o.lang),
    "bertscore": _bertscore,
    "perplexity": _perplexity,
}
ALIASES = {"accuracy": "em", "exact_match": "em", "ppl": "perplexity", "cider_d": "cider",
           "json": "json_field", "prf": "f1", "bert_score": "bertscore"}


def parse_metrics(names: str | list[str]) -> list[str]:
    """``"em,bleu"`` or ``["em", "bleu"]`` -> canonical names; unknown names are errors."""
    if isinstance(names, str):
        names = names.split(",")
    out = []
    for raw in names:
        name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if not name:
            continue
        if name not in METRICS:
            raise TunelabError(f"metrics: unknown metric '{raw.strip()}' (known: {', '.join(METRICS)})")
        if name not in out:
            out.append(name)
    if not out:
        raise TunelabError("metrics: no metric given")
    return out


def score(predictions: list[str], references: list[Any], metrics: str | list[str] = "em,bleu,rouge",
          options: MetricOptions | None = None, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Compute ``metrics`` over rows matched by position; one flat dict of results.

    ``n`` is the number of rows; ``lang`` the tokenisation used. When ``timings`` is
    given, seconds per metric are stored in it.
    """
    names = parse_metrics(metrics)
    if len(predictions) != len(references):
        raise TunelabError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise TunelabError("nothing to score: no rows")
    options = dataclasses.replace(options) if options else MetricOptions()
    if options.lang not in (None, "en", "zh"):
        raise TunelabError(f"lang: {options.lang!r} is not one of en, zh")
    if options.lang is None:
        options.lang = overlap.detect_lang(references)
    result: dict[str, Any] = {"n": len(predictions), "lang": options.lang}
    for name in names:
        start = time.perf_counter()
        result.update(METRICS[name](list(predictions), list(references), options))
        if timings is not None:
            timings[name] = round(time.perf_counter() - start, 3)
    return result


def read_column(path: str, column: str) -> list[Any]:
    """The ``column`` value of every row of a JSONL/JSON/CSV file, in file order."""
    from pathlib import Path

    from tunelab.data.readers import iter_rows
    from tunelab.errors import where

    if not Path(path).is_file():
        raise TunelabError(f"{path}: file not found")
    values = []
    for line, row in iter_rows(path):
        if column not in row:
            keys = ", ".join(map(str, row)) or "none"
            raise TunelabError(f"{where(path, line, column)}: field missing (row has: {keys})")
        value = row[column]
        values.append(value if isinstance(value, (list, dict)) else ("" if value is None else str(value)))
    return values


def score_files(pred_path: str, ref_path: str | None = None, metrics: str | list[str] = "em,bleu,rouge",
                pred_field: str = "prediction", ref_field: str = "reference",
                options: MetricOptions | None = None) -> dict[str, Any]:
    """Score predictions in one file against references in another (rows matched by order).

    ``ref_path`` defaults to ``pred_path`` (a predictions.jsonl holds both fields).
    """
    names = parse_metrics(metrics)  # fail on a bad name before reading anything
    predictions = read_column(pred_path, pred_field)
    references = read_column(ref_path or pred_path, ref_field)
    if len(predictions) != len(references):
        raise TunelabError(f"{pred_path} has {len(predictions)} rows but {ref_path or pred_path} "
                           f"has {len(references)}: rows are matched by order")
    import json

    # a prediction stored as a JSON object (e.g. a report) is compared as its JSON text
    predictions = [p if isinstance(p, str) else json.dumps(p, ensure_ascii=False) for p in predictions]
    return score(predictions, references, names, options)
