"""What the Runs page shows about a run folder: status, curves, speed, ETA, log tail.

Everything is read from the folder itself (``metrics.jsonl``, checkpoints, the saved run,
the job record and its log), so the page is right whoever started the run and whether or
not the studio was running meanwhile.

Status:
- ``running`` / ``stopping``: the job record's process is alive and ours (Stop was asked);
- ``finished``: the run folder was saved (``config.yaml`` + ``README.md``, written last);
- ``stopped``: the job ended after Stop (or Ctrl-C); resumable when a checkpoint exists;
- ``failed``: the job ended otherwise; ``error`` is its ``error: ...`` line (or the last
  line of a traceback);
- ``incomplete``: a folder with a metrics log but no job record and no saved run (a CLI
  run that is not running any more, or still running outside the studio: ``active``).
A running job is ``stalled`` when no optimizer step has been logged for ``stall_after`` seconds.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from tunelab.studio.jobs import JobManager, JobRecord
from tunelab.studio.workspace import STUDIO_DIR, Workspace

MAX_POINTS = 1500
LOG_TAIL_BYTES = 96 * 1024
_BAR = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
NOTE_PREFIXES = ("data:", "pt data:", "dpo data:", "hardware:", "trainable params:", "time budget",
                 "efficiency:", "resuming from", "stopped at step", "run saved to", "warning:", "note:")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def log_lines(path: Path | str | None, max_bytes: int = LOG_TAIL_BYTES) -> list[str]:
    """The last job's part of a log, as lines; a progress bar's ``\\r`` updates keep only the last."""
    if not path:
        return []
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    if "\n=== " in text:
        text = text[text.rindex("\n=== ") + 1:]
    lines = []
    for raw in text.split("\n"):
        pieces = [p for p in raw.split("\r") if p.strip()]
        if pieces:
            lines.append(pieces[-1].rstrip())
    return lines


def _seconds(text: str) -> float | None:
    if "?" in text:
        return None
    total = 0.0
    for part in text.split(":"):
        total = total * 60 + float(part)
    return total


def bar_progress(lines: list[str]) -> dict[str, Any]:
    """Step, planned total and time left from the trainer's progress bar (it follows train.max_time)."""
    for line in reversed(lines):
        match = _BAR.search(line)
        if match and line.lstrip().startswith("train"):
            step, total, _elapsed, left = match.groups()
            return {"bar_step": int(step), "total_steps": int(total), "eta_s": _seconds(left)}
    return {}


def error_line(lines: list[str]) -> str | None:
    """The job's one-line error, or the last line of a traceback."""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    if any(line.startswith("Traceback") for line in lines):
        for line in reversed(lines):
            if line.strip() and not _BAR.search(line):
                return line.strip()
    return None


def checkpoints(folder: Path) -> list[str]:
    found = []
    for path in (folder / "checkpoints").glob("checkpoint-*"):
        if (path / "trainer_state.json").is_file() and path.name.split("-")[-1].isdigit():
            found.append(path.name)
    return sorted(found, key=lambda name: int(name.split("-")[-1]))


def is_finished(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and (folder / "README.md").is_file()


def _recipe_summary(folder: Path) -> dict[str, Any]:
    import yaml

    for path in (folder / "config.yaml", folder / STUDIO_DIR / "recipe.yaml"):
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(values, dict):
            model, method = values.get("model") or {}, values.get("method") or {}
            return {"model": model.get("name") if isinstance(model, dict) else None,
                    "method": method.get("name", "lora") if isinstance(method, dict) else None}
    return {"model": None, "method": None}


def status_of(folder: Path, record: JobRecord | None, lines: list[str], stall_after: float) -> dict[str, Any]:
    """``status``, ``error``, ``stalled`` and ``active`` for a folder (see the module doc)."""
    metrics_path = folder / "metrics.jsonl"
    last_step_at = metrics_path.stat().st_mtime if metrics_path.is_file() else None
    out: dict[str, Any] = {"error": None, "stalled": False, "active": False}
    if record is not None and record.ended_at is None:
        out["status"] = "stopping" if record.stop_requested_at else "running"
        since = max(last_step_at or 0, record.started_at)
        out["stalled"] = time.time() - since > stall_after
        out["active"] = True
    elif is_finished(folder):
        out["status"] = "finished"
    elif record is None:
        out["status"] = "incomplete"
        out["active"] = last_step_at is not None and time.time() - last_step_at < stall_after
    elif record.stop_requested_at or record.exit_code == 130 or any(
            line.startswith(("stopped at step", "interrupted")) for line in lines):
        out["status"] = "stopped"
    else:
        out["status"] = "failed"
        code = f"exit code {record.exit_code}" if record.exit_code is not None else "ended"
        out["error"] = error_line(lines) or f"the job {code} without an error line (see the log)"
    out["last_step_at"] = last_step_at
    return out


def _points(records: list[dict[str, Any]], key: str) -> list[list[float]]:
    points = [[r["step"], r[key]] for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    if len(points) > MAX_POINTS:
        stride = -(-len(points) // MAX_POINTS)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return points


def _last(records: list[dict[str, Any]], key: str) -> Any:
    for record in reversed(records):
        if key in record:
            return record[key]
    return None


def run_view(ws: Workspace, folder: Path, jobs: JobManager, stall_after: float, detail: bool = False) -> dict[str, Any]:
    """Everything the Runs page shows about one run (``detail``: curves, log tail, recipe too)."""
    record = jobs.check(folder)
    lines = log_lines(record.log if record else None)
    records = read_metrics(folder / "metrics.jsonl")
    state = status_of(folder, record, lines, stall_after)
    ckpts = checkpoints(folder)
    view: dict[str, Any] = {
        "run": ws.rel(folder), "name": folder.name, **state, **_recipe_summary(folder),
        "step": _last(records, "step") if any("loss" in r for r in records) else 0,
        "loss": _last(records, "loss"), "eval_loss": _last(records, "eval_loss"),
        "tokens_per_second": _last(records, "tokens_per_second"), "learning_rate": _last(records, "learning_rate"),
        "checkpoints": ckpts, "studio": (folder / STUDIO_DIR / "recipe.yaml").is_file(),
        "started_at": record.started_at if record else None, "ended_at": record.ended_at if record else None,
        "pid": record.pid if record and record.ended_at is None else None,
    }
    view["resumable"] = bool(ckpts) and view["studio"] and state["status"] in ("stopped", "failed")
    if state["status"] in ("running", "stopping"):
        view.update(bar_progress(lines))
    if detail:
        view["points"] = {"loss": _points(records, "loss"), "eval_loss": _points(records, "eval_loss")}
        view["log_tail"] = lines[-40:]
        view["notes"] = [line for line in lines if line.startswith(NOTE_PREFIXES)][-12:]
        view["command"] = _command(ws, record)
        recipe = folder / STUDIO_DIR / "recipe.yaml"
        view["recipe"] = recipe.read_text(encoding="utf-8") if recipe.is_file() else None
        view["files"] = [ws.rel(p) for p in (folder / "README.md", folder / "loss.png") if p.is_file()]
    return view


def _command(ws: Workspace, record: JobRecord | None) -> str | None:
    """The job's command as a user would type it in the workspace."""
    if record is None:
        return None
    args = record.command[record.command.index("tunelab") + 1:] if "tunelab" in record.command else record.command
    return "tunelab " + " ".join(args)


def list_runs(ws: Workspace, jobs: JobManager, stall_after: float) -> list[dict[str, Any]]:
    """Every run in the workspace, newest first."""
    views = [run_view(ws, folder, jobs, stall_after) for folder in ws.run_folders()]
    return sorted(views, key=lambda v: -(v["started_at"] or v.get("last_step_at") or 0))
