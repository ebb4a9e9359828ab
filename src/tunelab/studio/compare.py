"""Compare: ``tunelab eval run`` as a job, and its report as the page shows it.

A comparison lives in ``WORKSPACE/compare/NAME``: the studio's request in
``studio/compare.json``, the job record and log beside it, and everything ``tunelab eval``
writes (``report.json``/``.md``/``.html``, per-model ``predictions.jsonl``). The page shows
the before/after table (``tunelab.eval.report.table``), the report's side-by-side
examples, and the best and worst rows of the last model, each row scored alone with the
same ROUGE-L and exact match as the report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.io import write_json
from tunelab.studio.jobs import JobManager
from tunelab.studio.workspace import STUDIO_DIR, Workspace

COMPARE_DIR = "compare"
SAMPLES = 3
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def compare_folder(ws: Workspace, name: str) -> Path:
    if not _NAME.match(name or ""):
        raise TunelabError("name: use letters, digits, '.', '_' or '-' (at most 64, no '/')")
    return ws.path(f"{COMPARE_DIR}/{name}", "name")


def launch(ws: Workspace, jobs: JobManager, body: dict[str, Any]) -> dict[str, Any]:
    """Check the request and start ``tunelab eval run`` in ``compare/NAME``."""
    from tunelab.eval.metrics import parse_metrics

    folder = compare_folder(ws, str(body.get("name") or ""))
    if folder.exists():
        raise TunelabError(f"name: {ws.rel(folder)} already exists; pick another name")
    models = [str(m) for m in body.get("models") or [] if str(m).strip()]
    if not models:
        raise TunelabError("models: pick at least one model or run (the first is the baseline)")
    for spec in models:
        ws.model_spec(spec, "models")
    datasets = [str(d) for d in body.get("datasets") or [] if str(d).strip()]
    if not datasets:
        raise TunelabError("datasets: pick at least one test set")
    for spec in datasets:
        ws.dataset_files(spec, None, "datasets")
    metrics = parse_metrics(body.get("metrics") or "em,bleu,rouge")
    overrides = []
    for key, low in (("max_new_tokens", 1), ("max_samples", 1)):
        value = body.get(key)
        if value in (None, ""):
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise TunelabError(f"{key}: {value!r} is not a whole number") from None
        if number < low:
            raise TunelabError(f"{key}: must be at least {low}")
        overrides.append(f"eval.{key}={number}")
    request = {"name": folder.name, "models": models, "datasets": datasets, "metrics": metrics,
               "overrides": overrides}
    write_json(folder / STUDIO_DIR / "compare.json", request)
    args = ["eval", "run", *overrides, "--models", *models, "--datasets", *datasets,
            "--metrics", ",".join(metrics), "--out", ws.rel(folder), "--quiet"]
    jobs.launch("eval", folder, args, ws.root, "eval.log")
    return view(ws, jobs, folder)


def list_compares(ws: Workspace, jobs: JobManager) -> list[dict[str, Any]]:
    root = ws.root / COMPARE_DIR
    folders = sorted((p for p in root.iterdir() if (p / STUDIO_DIR / "compare.json").is_file()),
                     key=lambda p: -p.stat().st_mtime) if root.is_dir() else []
    return [view(ws, jobs, folder, summary=True) for folder in folders]


def view(ws: Workspace, jobs: JobManager, folder: Path, summary: bool = False) -> dict[str, Any]:
    """Status of the comparison and, once done, its tables, examples and best/worst rows."""
    from tunelab.studio.runs import error_line, log_lines

    record = jobs.check(folder)
    request = json.loads((folder / STUDIO_DIR / "compare.json").read_text(encoding="utf-8"))
    report_path = folder / "report.json"
    lines = log_lines(record.log if record else None)
    if record is not None and record.ended_at is None:
        status = "running"
    elif report_path.is_file():
        status = "finished"
    else:
        status = "failed"
    out: dict[str, Any] = {"name": folder.name, "folder": ws.rel(folder), "status": status, **request,
                           "error": error_line(lines) if status == "failed" else None,
                           "started_at": record.started_at if record else None}
    if summary or status != "finished":
        out["log_tail"] = lines[-15:] if not summary else None
        return out
    from tunelab.eval.report import table

    report = json.loads(report_path.read_text(encoding="utf-8"))
    out["tables"] = {}
    for test in report["test_sets"]:
        header, rows = table(report, test)
        out["tables"][test] = {"header": header, "rows": rows, "rows_in_test": report["test_sets"][test]["rows"]}
    out["models_in_report"] = report["models"]
    out["examples"] = report.get("examples", {})
    out["samples"] = {test: best_and_worst(folder, list(report["models"]), test) for test in report["test_sets"]}
    out["report_html"] = ws.rel(folder / "report.html") if (folder / "report.html").is_file() else None
    return out


def _row_score(prediction: str, reference: str) -> dict[str, float]:
    from tunelab.eval.metrics import score

    result = score([prediction], [reference], ["em", "rouge"])
    return {"em": result["em"], "rougeL": result["rougeL"]}


def best_and_worst(folder: Path, models: list[str], test: str, count: int = SAMPLES) -> dict[str, list]:
    """The last model's ``count`` best and worst rows by ROUGE-L, with every model's answer."""
    rows_by_model = {}
    for model in models:
        path = folder / model / test / "predictions.jsonl"
        rows_by_model[model] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    last = models[-1]
    scored = []
    for i, row in enumerate(rows_by_model[last]):
        answers = {m: {"prediction": rows_by_model[m][i]["prediction"],
                       **_row_score(rows_by_model[m][i]["prediction"], row["reference"])} for m in models}
        prompt = row["prompt"][-1]["content"] if row.get("prompt") else ""
        scored.append({"row": i, "prompt": prompt, "reference": row["reference"], "answers": answers,
                       "score": answers[last]["rougeL"]})
    order = sorted(scored, key=lambda s: (-s["score"], s["row"]))
    worst = sorted(scored, key=lambda s: (s["score"], s["row"]))[:count]
    return {"model": last, "best": order[:count], "worst": worst}
