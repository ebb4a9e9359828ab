"""Conversion hooks for what a ``{column}`` template cannot express.

A hook takes one raw row (a dict) and returns an instruction record
(``instruction``/``input``/``output``, optionally ``system``), a list of them, or
``None`` to skip the row. A ``KeyError`` becomes "column 'x': missing" with the
file and row, so hooks can index rows directly.
"""

from __future__ import annotations

import json
from typing import Any

from tunelab.errors import TunelabError

REPORT_FIELDS = ("主诉", "现病史", "辅助检查", "既往史", "诊断", "建议")

REPORT_PROMPT = (
    "问诊对话历史:\n{dialog}\n根据上述对话,给出诊疗报告\n"
    "说明:诊疗报告分为主诉, 现病史, 辅助检查, 既往史, 诊断, 建议这六个章节,以标准的json格式输出。\n答:"
)


def imcs_report(row: dict[str, Any]) -> dict[str, str]:
    """Seed 003's report generation: an IMCS-V2 dialogue -> its 6-field JSON report.

    ``row["dialogue"]`` is a list of ``{speaker, sentence, ...}`` turns and
    ``row["report"]`` a list of reports (the first one is the target, as in the seed).
    """
    turns = row["dialogue"]
    if not isinstance(turns, list) or not turns:
        raise TunelabError("column 'dialogue': expected a non-empty list of turns")
    lines = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "speaker" not in turn or "sentence" not in turn:
            raise TunelabError(f"column 'dialogue': turn {index + 1}: needs 'speaker' and 'sentence'")
        lines.append(f"{turn['speaker']}:{turn['sentence']}")
    reports = row["report"]
    report = reports[0] if isinstance(reports, list) and reports else reports
    if not isinstance(report, dict):
        raise TunelabError("column 'report': expected a list of report objects")
    missing = [key for key in REPORT_FIELDS if key not in report]
    if missing:
        raise TunelabError(f"column 'report': field '{missing[0]}' missing (needs {', '.join(REPORT_FIELDS)})")
    target = {key: report[key] for key in REPORT_FIELDS}
    return {"instruction": REPORT_PROMPT.format(dialog="\n".join(lines)), "input": "",
            "output": json.dumps(target, ensure_ascii=False, indent=2)}
