"""Training modes compared on the demo task (docs/training.md, "Stages: measured").

(a) seed 003's modes at the same wall-clock budget: SFT from the base model for
    ``--total`` minutes, against continued pre-training on ``icd10cm-text`` for ``--cpt``
    minutes then SFT (stacked on the pt adapter) for the rest; exact match on the
    validation split of ``icd10cm-norm`` (150 codes) and domain perplexity on held-out
    ICD-10-CM categories, for the base model and each run.
(b) SFT against SFT + DPO on the SFT model's own mistakes (greedy answers to the
    training prompts); exact match on validation and reward accuracy on pairs from the
    validation prompts.

Everything is chosen on the validation split; the test split is not touched. Run from
the repository root: ``.venv/bin/python benchmarks/stages_compare.py --work /tmp/stages``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

BUILTIN = "builtin:smollm2-135m-instruct"


def train_run(out: Path, overrides: list[str]) -> Path:
    from tunelab.config import load_config
    from tunelab.train import train

    return train(load_config("recipes/quickstart.yaml", [f"output_dir={out}", "overwrite=true", *overrides]))


def exact_match(model_spec: str, data: Path, limit: int) -> float:
    from tunelab.eval.metrics_text import exact_match as em
    from tunelab.eval.run import load_test_set
    from tunelab.generation import from_preset, generate
    from tunelab.models import load_model

    test = load_test_set(str(data), None, limit, "validation")
    model, tokenizer = load_model(model_spec)
    answers = generate(model, tokenizer, test.prompts, from_preset("greedy", max_new_tokens=48), 16, False)
    return em([a.text for a in answers], test.references)["em"]


def perplexity(model_spec: str, docs) -> float:
    from tunelab.models import load_model
    from tunelab.train.pretrain import text_perplexity

    model, tokenizer = load_model(model_spec)
    return text_perplexity(model, tokenizer, docs, cutoff_len=256)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/stages"))
    parser.add_argument("--total", type=float, default=6.0, help="minutes of training per mode in (a)")
    parser.add_argument("--cpt", type=float, default=2.0, help="minutes of continued pre-training in (a)")
    parser.add_argument("--dpo", type=float, default=2.0, help="minutes of DPO in (b)")
    parser.add_argument("--eval-rows", type=int, default=60)
    parser.add_argument("--ppl-docs", type=int, default=20)
    args = parser.parse_args()
    from tunelab.data.text import load_documents
    from tunelab.workshop.builtin import build_builtin
    from tunelab.workshop.mistakes import mistake_pairs

    w = args.work
    started = time.monotonic()
    norm = w / "icd"
    build_builtin("icd10cm-norm", norm, max_codes=150, min_synonyms=3, seed=42)
    build_builtin("icd10cm-text", w / "text", exclude=f"{norm / 'validation.jsonl'},{norm / 'test.jsonl'}",
                  max_docs=400, validation_fraction=0.05, test_fraction=0.05)
    docs = load_documents("icd10cm-text_validation", w / "text")[: args.ppl_docs]
    val = norm / "validation.jsonl"
    sft_common = [f"data.train=[{norm / 'train.jsonl'}]", "data.val_size=0", "train.epochs=10",
                  "train.eval_steps=100000"]
    results: dict = {"options": vars(args) | {"work": str(w)}}
    sft = train_run(w / "sft", [*sft_common, f"train.max_time={args.total}m"])
    cpt = train_run(w / "cpt", ["train.stage=pt", f"data.dataset_dir={w / 'text'}", "data.train=[icd10cm-text_train]",
                                "data.val_size=0", "train.batch_size=4", "train.lr=1e-3", "train.epochs=1",
                                "train.eval_steps=100000", f"train.max_time={args.cpt}m"])
    cpt_sft = train_run(w / "cpt_sft", [*sft_common, f"model.name={cpt}",
                                        f"train.max_time={args.total - args.cpt}m"])
    for name, spec in (("base", BUILTIN), ("sft", str(sft)), ("cpt", str(cpt)), ("cpt_sft", str(cpt_sft))):
        results[name] = {"exact_match": exact_match(spec, val, args.eval_rows), "perplexity": perplexity(spec, docs)}
        print(name, results[name], flush=True)
    pairs = mistake_pairs(str(sft), [str(norm / "train.jsonl")], w / "pairs", max_new_tokens=48, progress=False)
    held = mistake_pairs(str(sft), [str(val)], w / "pairs", name="heldout", max_new_tokens=48, progress=False)
    results["pairs"] = {"train": pairs.pairs, "train_right": pairs.correct, "heldout": held.pairs}
    dpo = train_run(w / "dpo", [f"model.name={sft}", "train.stage=dpo", f"data.dataset_dir={w / 'pairs'}",
                                "data.train=[mistakes_train]", "data.eval=[heldout_train]", "data.val_size=0",
                                "train.lr=5e-5", "train.batch_size=4", "train.epochs=1", "train.eval_steps=100000",
                                f"train.max_time={args.dpo}m"])
    rows = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [r for r in rows if "eval_reward_accuracy" in r]
    results["dpo"] = {"exact_match": exact_match(str(dpo), val, args.eval_rows),
                      "eval_reward_accuracy": evals[-1]["eval_reward_accuracy"] if evals else None,
                      "eval_reward_margin": evals[-1]["eval_reward_margin"] if evals else None,
                      "steps": max(r["step"] for r in rows)}
    results["minutes"] = round((time.monotonic() - started) / 60, 1)
    print(json.dumps(results, indent=2, ensure_ascii=False), flush=True)
    (w / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
