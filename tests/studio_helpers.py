"""Helpers for the studio tests (``from studio_helpers import ...``): a workspace and a waiting loop."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
QUICKSTART_DATA = REPO / "recipes" / "data" / "quickstart-icd10cm-norm.jsonl"


def make_workspace(root: Path, tiny_dir: Path) -> Path:
    """A workspace as a user would have it: the quickstart recipe and its real ICD-10-CM rows
    (paths unchanged), a model folder (the tiny random Llama), and a small held-out test set."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipes" / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(QUICKSTART, root / "recipes" / "quickstart.yaml")
    shutil.copy(QUICKSTART_DATA, root / "recipes" / "data" / QUICKSTART_DATA.name)
    shutil.copytree(tiny_dir, root / "models" / "tiny")
    rows = [json.loads(line) for line in QUICKSTART_DATA.read_text(encoding="utf-8").splitlines()]
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "test.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:6]), encoding="utf-8")
    return root


def tiny_recipe(output_dir: str, max_steps: int, **train) -> str:
    """The quickstart on the tiny model: a recipe text as the studio's form would send it."""
    extra = "".join(f"  {k}: {v}\n" for k, v in train.items())
    return (f"model:\n  name: models/tiny\ndata:\n  train: [recipes/data/{QUICKSTART_DATA.name}]\n  val_size: 8\n"
            f"  cutoff_len: 256\nmethod:\n  name: lora\n  r: 8\ntrain:\n  max_steps: {max_steps}\n  batch_size: 8\n"
            f"  lr: 2.0e-3\n  bf16: false\n  logging_steps: 1\n  eval_steps: 10\n{extra}output_dir: {output_dir}\n")


def wait_for(check, timeout: float, what: str, every: float = 0.2):
    """Call ``check()`` until it returns something truthy; fail saying ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def logged_steps(run: Path) -> list[int]:
    """Optimizer steps with a train loss in the run's metrics.jsonl, in order."""
    steps = []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps
