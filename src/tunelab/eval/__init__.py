"""Evaluation: metrics, LLM-as-judge and before/after reports.

``score(predictions, references, metrics)`` computes metrics; ``evaluate(cfg)`` runs
models on test sets and writes report.md/html/json; ``judge_pointwise`` and
``judge_pairwise`` ask an OpenAI-compatible judge. Heavy modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "score": "tunelab.eval.metrics", "score_files": "tunelab.eval.metrics",
    "MetricOptions": "tunelab.eval.metrics", "METRICS": "tunelab.eval.metrics",
    "evaluate": "tunelab.eval.run", "write_reports": "tunelab.eval.report",
    "JudgeClient": "tunelab.eval.judge", "judge_pointwise": "tunelab.eval.judge",
    "judge_pairwise": "tunelab.eval.judge", "judge_files": "tunelab.eval.judge",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tunelab.eval' has no attribute {name!r}")
