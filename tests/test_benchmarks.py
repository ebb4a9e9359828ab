"""The benchmark scripts: their counting rules, and an end-to-end smoke run on a tiny model.

No performance is asserted here (figures depend on the machine); the smoke run checks
that ``benchmarks/run.py`` runs every part and prints the promised JSON last line, and
``--probe-only --emulate-avx2`` that the emulation reaches torch and is named.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import _batch_counts  # noqa: E402
from deploy_formats import score_windows, targets  # noqa: E402
from deploy_formats import summarise as deploy_summarise  # noqa: E402
from mfu import step_flops, utilisation  # noqa: E402
from plain_recipe import preprocess_example  # noqa: E402
from train_throughput import plan, summarise  # noqa: E402


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


def test_deploy_perplexity_is_exp_of_the_token_weighted_nll(tiny_llama, tiny_tokenizer):
    """score_windows' log-probabilities, summed as summarise does, give transformers' own loss: the
    perplexity is exp of the mean NLL over every scored token of every window (uneven windows weigh
    by their tokens, not as a mean of window perplexities)."""
    text = "The patient has a fever and a cough since Monday. Normalise: acute appendicitis NOS. " * 3
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[:24], ids[24:31]]
    scored = score_windows(tiny_llama, windows)
    with torch.inference_mode():
        losses = [float(tiny_llama(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss) for w in windows]
    nll = sum(loss * (len(w) - 1) for loss, w in zip(losses, windows)) / sum(len(w) - 1 for w in windows)
    fp32 = {"rss_mb": 1.0, "decode_tok_s": 1.0, "prompts": [[1]], "answers": [[1]], "score": scored}
    row = deploy_summarise("HF fp32", fp32, fp32, 0, [], [])
    assert row["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert row["text_top1"] == 1.0 and [len(w["logprobs"]) for w in scored] == [23, 6]


def test_deploy_targets_are_the_issues_thresholds_against_fp32():
    fp32 = {"format": "HF fp32", "perplexity": 10.0, "top1": 1.0, "em": 0.50}
    q8 = {"format": "GGUF q8_0 (llama.cpp)", "perplexity": 10.15, "top1": 0.92, "em": 0.48}  # on each limit
    f16 = {"format": "GGUF f16 (llama.cpp)", "identical": "5/6"}
    assert [t["met"] for t in targets([fp32, f16, q8])] == [False, True, True, True]
    worse = {**q8, "perplexity": 10.16, "top1": 0.919, "em": 0.47}  # +1.6%, 91.9%, -3 points
    assert [t["met"] for t in targets([fp32, worse])] == [False, False, False]


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


def test_plan_where_bf16_is_slow_gives_fp32_variants_and_a_short_as_written_run():
    lora = {c.name: c for c in plan("lora", "fp32", slow_bf16=True)}
    assert list(lora) == ["tunelab", "plain", "plain_fp32_1x8", "plain_fp32_8x1"]
    assert (lora["plain"].precision, lora["plain"].batch, lora["plain"].steps, lora["plain"].rounds) == ("bf16", 1, 2, 1)
    assert lora["plain_fp32_8x1"].child_args() == ["--child", "plain", "--precision", "fp32", "--batch", "8"]
    assert [c.name for c in plan("full", "fp32", slow_bf16=True)] == ["tunelab", "plain_fp32_1x8", "plain_fp32_8x1"]
    # the tiny smoke model keeps every contender at full length
    assert plan("lora", "fp32", slow_bf16=True, smoke=True)[1].steps is None


def test_plan_where_bf16_is_fast_runs_the_recipe_as_written_once():
    names = [c.name for c in plan("lora", "bf16", slow_bf16=False)]
    assert names == ["tunelab", "plain", "plain_bf16_8x1"]  # as written = the bf16 1x8 variant
    assert all(c.steps is None for c in plan("lora", "bf16", slow_bf16=False))


def _run(tokens_per_s, round_, rss=1000.0, precision="fp32", steps=10):
    return {"tokens_per_s": tokens_per_s, "supervised_tokens_per_s": tokens_per_s / 10, "s_per_step": 1.0,
            "peak_rss_mb": rss, "round": round_, "precision": precision, "timed_steps": steps, "threads": 2}


def test_summary_takes_the_faster_variant_of_each_round_and_pairs_rounds():
    contenders = plan("lora", "fp32", slow_bf16=True)
    runs = {"tunelab_lora": [_run(300, 0, rss=900), _run(200, 1, rss=950)],
            "plain_lora": [_run(3, 0, precision="bf16", steps=1)],
            "plain_fp32_1x8_lora": [_run(100, 0, rss=800), _run(110, 1, rss=800)],
            "plain_fp32_8x1_lora": [_run(120, 0, rss=1000), _run(80, 1, rss=1000)]}
    s = summarise(runs, "lora", contenders, "fp32")
    assert s["speedup_vs_best_plain_per_round"] == [300 / 120, 200 / 110]  # best of the same round
    assert s["best_plain"] == "plain_fp32_1x8"  # the higher median: 105 against 100
    assert s["speedup_vs_as_written"] == 300 / 3  # only round 0 has the slow contender
    assert s["as_written_timed_steps"] == 1
    assert s["peak_rss_ratio_vs_best_plain"] == 950 / 800  # tunelab's peak against the best variant's
    assert s["contenders"]["plain_fp32_1x8"]["tunelab_speedup"] == (300 / 100 + 200 / 110) / 2


def test_mfu_headline_is_against_the_peak_of_the_dtype_trained_in():
    run = {"real_tokens": 1000, "supervised_tokens": 100, "attention_pairs": 0, "heads": 1, "head_dim": 1,
           "layers": 1, "params_body_matmul": 10 ** 6, "params_head": 0, "params_lora": 0, "seconds": 1.0,
           "precision": "fp32"}
    peaks = {"fp32": 100.0, "bf16": 1.0}
    figures = utilisation([run], "lora", peaks)
    assert figures["mfu_dtype"] == "fp32"
    assert figures["mfu"] == figures["mfu_fp32"] == 4.0 / 100.0  # 4e9 model FLOP/s against 100 GFLOP/s
    assert figures["mfu_bf16"] == 4.0
    assert utilisation([{**run, "precision": "bf16"}], "lora", peaks)["mfu"] == 4.0


def _bench(tmp_path, *args, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TUNELAB_CACHE=str(tmp_path / "cache"))
    for key in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "TUNELAB_BENCH_EMULATED_ON", "TUNELAB_THREADS"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.serial  # times the probe
def test_emulate_avx2_reaches_torch_and_names_the_kind(tmp_path):
    out, machine = _bench(tmp_path, "--probe-only", "--emulate-avx2")
    assert machine["capability"] == "AVX2"  # set before torch was imported: the re-executed process
    assert machine["cpu_kind"] == f"AVX2 (emulated on {machine['real_cpu_kind']})"
    assert machine["emulated"] and not machine["bf16_fast"]
    assert machine["training_precision"] == "fp32"
    assert f"kind:              {machine['cpu_kind']}" in out


@pytest.mark.serial  # measures threads under a competing load
def test_run_smoke_prints_the_headline_json(tmp_path):
    out, figures = _bench(tmp_path, "--smoke", "--workdir", str(tmp_path / "work"),
                          "--save", str(tmp_path / "results.json"))
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert saved["headline"] == figures
    kind = saved["machine"]["cpu_kind"]
    assert figures["cpu_kind"] == kind == saved["probe"]["kind"]  # not emulated: the probe's own kind
    assert out.index(f"kind:              {kind}") < out.index("== training throughput")  # the probe comes first
    assert f"== targets on {kind} (smoke)" in out
    for key in ("train_speedup_vs_plain_best", "train_speedup_vs_plain_as_written", "train_tokens_per_s",
                "plain_best_train_tokens_per_s", "peak_rss_ratio_vs_plain_best", "mfu", "mfu_bf16", "mfu_fp32",
                "peak_bf16_gflops", "peak_fp32_gflops", "eval_speedup_vs_sequential",
                "full_train_speedup_vs_plain_best", "full_peak_rss_ratio_vs_plain_best"):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    decided = saved["machine"]["training_precision"]
    assert figures["train_precision"] == figures["mfu_dtype"] == decided  # tunelab trains as hardware decides
    assert figures["mfu"] == figures[f"mfu_{decided}"]
    assert figures["plain_best_variant"].startswith(f"plain {decided} ") or decided == "bf16"
    assert figures["mode"] == "smoke"
    matched, total = map(int, figures["eval_outputs_matching"].split("/"))
    assert total == 6 and 0 <= matched <= total
    assert set(figures["targets_met"]) == {"train_speedup_vs_plain_best", "peak_rss_ratio_vs_plain_best",
                                           "train_speedup_vs_plain_as_written", "mfu",
                                           "eval_speedup_vs_sequential", "load_auto_kept"}
    runs = saved["train"]["runs"]
    for method in ("lora", "full"):
        assert {f"tunelab_{method}", f"plain_{method}", f"plain_{decided}_8x1_{method}"} <= set(runs)
        assert runs[f"plain_{method}"][0]["precision"] == "bf16"  # as written: bf16=True
        assert runs[f"plain_{decided}_8x1_{method}"][0]["precision"] == decided
    if len(os.sched_getaffinity(0)) >= 2:
        load = saved["threads_under_load"]["runs"]
        assert load["forced"]["threads"] == len(os.sched_getaffinity(0))  # TUNELAB_THREADS=<cores> reached it
        assert figures["load_auto_kept"] > 0 and figures["load_forced_kept"] > 0
