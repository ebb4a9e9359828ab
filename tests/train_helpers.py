"""Helpers shared by the training tests (imported as ``from train_helpers import ...``).

- ``StopAt``: stop a run at a step without saving;
- ``pair_rows``/``feedback_rows`` and ``write_jsonl``: the preference data of the dpo and kto
  tests (upper-case answers preferred to lower-case ones with a '!');
- ``run_stage``/``records``: a short run of a stage on the tiny model, and its metrics.jsonl;
- ``perturbed``, ``unpadded_rows``, ``hand_logp``: a reference model that differs from the
  policy, and answer log-probabilities computed token by token from the full logits.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from tunelab.config import load_config
from tunelab.train import train
from tunelab.train.collate import IGNORE

WORDS = ["fever", "cough", "rest", "water", "patient", "发烧", "感冒", "headache"]


class StopAt(TrainerCallback):
    """Stop at step ``step`` without saving: like a kill two steps after the last checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def pair_rows() -> list[dict]:
    """16 alpaca ranking rows: prefer the upper-case answer to the lower-case one."""
    return [{"instruction": f"Normalize: {w} {i}", "input": "", "chosen": f"{w.upper()} {i}", "rejected": f"{w} {i}!"}
            for i, w in enumerate(WORDS * 2)]


def feedback_rows() -> list[dict]:
    """16 unpaired openai rows, alternately desirable (upper case) and undesirable (``label``)."""
    rows = []
    for i, w in enumerate(WORDS * 2):
        good = i % 2 == 0
        rows.append({"messages": [{"role": "user", "content": f"Normalize: {w} {i}"},
                                  {"role": "assistant", "content": f"{w.upper()} {i}" if good else f"{w} {i}!"}],
                     "label": good})
    return rows


def run_stage(stage: str, model, data, out, *overrides, callbacks=None) -> Path:
    """Train ``stage`` on one data file: fp32, batch 4, lr 1e-2, plus ``overrides``."""
    cfg = load_config(None, [f"model.name={model}", f"data.train=[{data}]", f"output_dir={out}",
                             f"train.stage={stage}", "train.bf16=false", "train.batch_size=4", "train.lr=1e-2",
                             "data.group_by_length=false", *overrides])
    return train(cfg, callbacks=callbacks)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def perturbed(model, scale: float = 0.05):
    """A copy of ``model`` with every weight moved by Gaussian noise: a reference unlike the policy."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def unpadded_rows(batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, labels) of every row of a collated batch without its right padding."""
    return [(batch["input_ids"][i][:n], batch["labels"][i][:n])
            for i, n in enumerate(batch["attention_mask"].sum(1).tolist())]


def hand_logp(model, ids, labels):
    """Sum over answer tokens of log softmax(logits)[next token], from the full logits."""
    logits = model(input_ids=ids[None]).logits[0]
    total = 0.0
    for t in range(1, len(ids)):
        if labels[t] != IGNORE:
            total = total + torch.log_softmax(logits[t - 1].float(), -1)[labels[t]]
    return total
