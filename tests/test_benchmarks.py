"""The benchmark scripts: their counting rules, and an end-to-end smoke run on a tiny model.

No performance is asserted here (figures depend on the machine); the smoke run checks
that ``benchmarks/run.py`` runs every part and prints the promised JSON last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import _batch_counts  # noqa: E402
from mfu import step_flops  # noqa: E402
from plain_recipe import preprocess_example  # noqa: E402


def test_batch_counts_padded_rows():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8], [-100, 6, -100, -100]]),
    }
    real, supervised, pairs = _batch_counts(batch)
    assert real == 6  # padding is not real
    assert supervised == 3  # targets at positions 1.. that carry a label
    assert pairs == 4 * 5 // 2 + 2 * 3 // 2


def test_batch_counts_packed_rows_use_the_collator_count():
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]]),
        "labels": torch.tensor([[-100, 2, 3, -100, 5, -100]]),
        "num_real_tokens": torch.tensor(5),
    }
    real, supervised, pairs = _batch_counts(batch)
    assert (real, supervised) == (5, 3)
    assert pairs == 6 + 3 + 1  # segments of 3, 2 and the padding's 1


def test_lora_flops_skip_frozen_weight_gradients_and_full_does_not():
    run = {"real_tokens": 100, "supervised_tokens": 10, "attention_pairs": 0, "heads": 1, "head_dim": 1,
           "layers": 1, "params_body_matmul": 1000, "params_head": 500, "params_lora": 10}
    linear = 1000 * 100 + 500 * 10  # head charged at supervised positions only
    assert step_flops(run, "full") == 6 * linear
    assert step_flops(run, "lora") == 4 * linear + 6 * 10 * 100
    assert step_flops(run, "lora", dense_head=True) == 4 * (1000 * 100 + 500 * 100) + 6 * 10 * 100


def test_plain_recipe_masks_exactly_the_prompt(tiny_tokenizer):
    example = {"instruction": "Term: Acute appendicitis NOS\nStandard term:", "output": "Unspecified acute appendicitis"}
    encoded = preprocess_example(tiny_tokenizer, example)
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": example["instruction"]}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)
    assert encoded["labels"][:len(prompt)] == [-100] * len(prompt)
    answer = [t for t in encoded["labels"] if t != -100]
    assert tiny_tokenizer.decode(answer).startswith(example["output"])


def test_run_smoke_prints_the_headline_json(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TUNELAB_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke",
                           "--workdir", str(tmp_path / "work"), "--save", str(tmp_path / "results.json")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("train_speedup_vs_plain", "train_tokens_per_s", "peak_rss_ratio_vs_plain", "mfu_bf16",
                "mfu_fp32", "eval_speedup_vs_sequential", "full_train_speedup_vs_plain",
                "full_peak_rss_ratio_vs_plain"):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures["mode"] == "smoke"
    matched, total = map(int, figures["eval_outputs_matching"].split("/"))
    assert total == 6 and 0 <= matched <= total
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert saved["headline"] == figures
    assert set(saved["train"]["runs"]) == {"tunelab_lora", "plain_lora", "tunelab_full", "plain_full"}
