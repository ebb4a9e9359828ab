"""Training modes compared on the demo task (docs/training.md, "Comparing the modes").

(a) seed 003's modes at the same wall-clock training budget: SFT from the base model for
    ``--total`` minutes, against continued pre-training on ``icd10cm-text`` for ``--cpt``
    minutes then SFT (stacked on the pt adapter) for the rest. Exact match on the
    ``icd10cm-norm`` split the demo uses (150 codes, one held-out synonym per code) and
    domain perplexity on held-out ICD-10-CM categories, for the base model and each run.
(b) that SFT run against SFT + DPO on its own mistakes (greedy answers to training
    prompts): exact match, and reward accuracy on pairs made from the SFT model's wrong
    answers to held-out prompts.

Honest by construction: the only choice, the DPO learning rate (``--dpo-lrs``), is made on
the validation split (exact match, then validation reward accuracy); every reported figure
is also given on the test split, which decides nothing. Budgets are wall-clock
(``train.max_time``: each run re-plans its whole cosine schedule to fit), so the steps each
run got are reported beside the figures. Every stage appends to ``WORK/results.json``, so an
interrupted run keeps what it measured. Run from the repository root:

    nice -n 5 .venv/bin/python benchmarks/stages_compare.py --work /tmp/stages
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

BASE = {"model": "builtin:smollm2-135m-instruct"}  # --model replaces it (a tiny model for a smoke run)
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{(time.monotonic() - STARTED) / 60:5.1f} min] {text}", flush=True)


def train_run(out: Path, overrides: list[str]) -> tuple[Path, dict]:
    """One run of the quickstart recipe (LoRA r16, all linear layers) with ``overrides``."""
    from tunelab.config import load_config
    from tunelab.train import train

    run = train(load_config("recipes/quickstart.yaml", [f"model.name={BASE['model']}", f"output_dir={out}",
                                                        "overwrite=true", *overrides]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [r for r in rows if "loss" in r]
    final = next((r for r in reversed(rows) if "train_runtime" in r), {})
    stats = {"steps": max(r["step"] for r in rows), "train_seconds": round(final.get("train_runtime", 0.0), 1),
             "first_loss": losses[0]["loss"] if losses else None, "last_loss": losses[-1]["loss"] if losses else None,
             "tokens_per_second": losses[-1].get("tokens_per_second") if losses else None}
    evals = [r for r in rows if "eval_reward_accuracy" in r]
    if evals:
        stats.update(eval_reward_accuracy=evals[-1]["eval_reward_accuracy"],
                     eval_reward_margin=evals[-1]["eval_reward_margin"])
    say(f"{out.name}: {stats}")
    return run, stats


def answers(spec: str, convs: list, max_new_tokens: int) -> list[str]:
    """Greedy answers of ``spec`` to the prompts of ``convs`` (batched, left-padded)."""
    from tunelab.generation import from_preset, generate
    from tunelab.models import load_model

    model, tokenizer = load_model(spec)
    prompts = [conv.to_openai()[:-1] for conv in convs]
    out = [r.text for r in generate(model, tokenizer, prompts, from_preset("greedy", max_new_tokens=max_new_tokens),
                                    16, False)]
    del model
    gc.collect()
    return out


def exact_match(predictions: list[str], convs: list) -> float:
    from tunelab.eval.metrics_text import exact_match as em

    return round(em(predictions, [conv.messages[-1].text for conv in convs])["em"], 4)


def perplexity(spec: str, docs: list, cutoff_len: int) -> float:
    from tunelab.models import load_model
    from tunelab.train.pretrain import text_perplexity

    model, tokenizer = load_model(spec)
    value = text_perplexity(model, tokenizer, docs, cutoff_len=cutoff_len)[0]
    del model
    gc.collect()
    return round(value, 3)


def reward_accuracy(policy: str, reference: str, pairs_dir: Path, name: str, beta: float) -> dict:
    """DPO's implicit reward β (log π - log π_ref), chosen against rejected, on held-out pairs."""
    import torch

    from tunelab.data.pairs import load_pairs
    from tunelab.models import load_model
    from tunelab.train.preference import PairCollator, encode_pairs, sequence_logps

    pairs = load_pairs(f"{name}_train", pairs_dir)
    sums = {}
    for key, spec in (("policy", policy), ("reference", reference)):
        model, tokenizer = load_model(spec)
        examples, _ = encode_pairs(tokenizer, pairs, 256, "truncate")
        collate, parts = PairCollator(tokenizer.pad_token_id), []
        with torch.no_grad():
            for start in range(0, len(examples), 8):
                chunk = examples[start:start + 8]
                parts.append(sequence_logps(model, collate(chunk))[0].view(2, len(chunk)))
        sums[key] = torch.cat(parts, dim=1)
        del model
        gc.collect()
    margin = beta * ((sums["policy"][0] - sums["reference"][0]) - (sums["policy"][1] - sums["reference"][1]))
    return {"pairs": len(pairs), "reward_accuracy": round(float((margin > 0).float().mean()), 4),
            "reward_margin": round(float(margin.mean()), 4)}


def build_data(w: Path, corpus_docs: int) -> Path:
    from tunelab.workshop.builtin import build_builtin

    norm = w / "icd"
    # the demo's split: 150 codes, one held-out synonym each, a quarter of them for validation
    build_builtin("icd10cm-norm", norm, max_codes=150, min_synonyms=3, seed=42, holdout_per_code=1,
                  validation_fraction=0.25, unseen_codes=0)
    build_builtin("icd10cm-text", w / "text", exclude=f"{norm / 'validation.jsonl'},{norm / 'test.jsonl'}",
                  max_docs=corpus_docs, validation_fraction=0.05, test_fraction=0.05)
    return norm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/stages"))
    parser.add_argument("--total", type=float, default=5.0, help="minutes of training per mode in (a)")
    parser.add_argument("--cpt", type=float, default=1.5, help="of which continued pre-training, in (a)")
    parser.add_argument("--dpo", type=float, default=1.5, help="minutes of each DPO run in (b)")
    parser.add_argument("--dpo-lrs", default="1e-4,5e-4", help="DPO learning rates tried; chosen on validation")
    parser.add_argument("--cutoff", type=int, default=128, help="pt piece length (tokens) and perplexity cutoff")
    parser.add_argument("--corpus-docs", type=int, default=200, help="ICD-10-CM category documents in the corpus")
    parser.add_argument("--ppl-docs", type=int, default=8, help="held-out test documents scored for perplexity")
    parser.add_argument("--pair-prompts", type=int, default=240, help="training prompts the SFT model answers for DPO")
    parser.add_argument("--model", default=BASE["model"], help="the base model (default: the embedded one)")
    parser.add_argument("--only-b", action="store_true", help="redo (b) only, from WORK/sft and WORK/results.json")
    args = parser.parse_args()
    BASE["model"] = args.model
    from tunelab.data.registry import load_dataset
    from tunelab.data.text import load_documents
    from tunelab.models import load_tokenizer

    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    results: dict = {"options": {k: str(v) for k, v in vars(args).items()}}
    if args.only_b:
        results = json.loads((w / "results.json").read_text(encoding="utf-8"))

    def save() -> None:
        results["minutes"] = round((time.monotonic() - STARTED) / 60, 1)
        (w / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")

    norm = build_data(w, args.corpus_docs)
    split = {s: load_dataset(str(norm / f"{s}.jsonl")) for s in ("validation", "test")}
    tokenizer = load_tokenizer(args.model)
    longest = max(len(tokenizer(c.messages[-1].text)["input_ids"]) for convs in split.values() for c in convs)
    max_new = longest + 8  # a longer answer cannot match a reference exactly
    # perplexity on held-out categories of moderate size (a few giant injury categories would dominate)
    docs = [d for d in load_documents("icd10cm-text_test", w / "text") if len(d.text) <= 6000][:args.ppl_docs]
    results["data"] = {"validation": len(split["validation"]), "test": len(split["test"]), "max_new_tokens": max_new,
                       "ppl_docs": len(docs), "ppl_chars": sum(len(d.text) for d in docs)}
    say(f"data: {results['data']}")
    got: dict[str, dict[str, list[str]]] = {}

    def measure(name: str, spec: str, stats: dict | None = None, em_too: bool = True) -> None:
        row = dict(stats or {})
        if em_too:
            got[name] = {s: answers(spec, convs, max_new) for s, convs in split.items()}
            row.update({f"em_{s}": exact_match(got[name][s], split[s]) for s in split})
        row["ppl_test"] = perplexity(spec, docs, args.cutoff)
        results[name] = row
        save()
        say(f"{name}: {row}")

    sft_common = [f"data.train=[{norm / 'train.jsonl'}]", "data.val_size=0", "train.epochs=10"]
    sft = w / "sft"
    if args.only_b:
        got["sft"] = {s: answers(str(sft), convs, max_new) for s, convs in split.items()}
    else:
        sft = mode_comparison(args, w, norm, sft_common, measure)

    return preference_comparison(args, w, norm, split, got, sft, max_new, results, save)


def mode_comparison(args, w: Path, norm: Path, sft_common: list[str], measure) -> Path:
    """(a): base, SFT, pt, pt then SFT; returns the SFT run that (b) starts from."""
    measure("base", args.model)
    sft, stats = train_run(w / "sft", [*sft_common, f"train.max_time={args.total * 60:.0f}"])
    measure("sft", str(sft), stats)
    cpt, stats = train_run(w / "cpt", [
        "train.stage=pt", f"data.dataset_dir={w / 'text'}", "data.train=[icd10cm-text_train]", "data.val_size=0",
        f"data.cutoff_len={args.cutoff}", "train.batch_size=4", "train.lr=1e-3", "train.epochs=1",
        f"train.max_time={args.cpt * 60:.0f}"])
    measure("cpt", str(cpt), stats, em_too=False)
    cpt_sft, stats = train_run(w / "cpt_sft", [*sft_common, f"model.name={cpt}",
                                               f"train.max_time={(args.total - args.cpt) * 60:.0f}"])
    measure("cpt_sft", str(cpt_sft), stats)
    return sft


def preference_comparison(args, w: Path, norm: Path, split: dict, got: dict, sft: Path, max_new: int,
                          results: dict, save) -> int:
    """(b): DPO on the SFT run's own mistakes, the learning rate chosen on validation."""
    from tunelab.workshop.mistakes import mistake_pairs, pairs_from_answers

    pairs_dir = w / "pairs"
    if pairs_dir.exists():
        import shutil

        shutil.rmtree(pairs_dir)
    made = mistake_pairs(str(sft), [str(norm / "train.jsonl")], pairs_dir, max_samples=args.pair_prompts,
                         max_new_tokens=max_new, batch_size=16, progress=False)
    held = {s: pairs_from_answers(split[s], [[a] for a in got["sft"][s]], pairs_dir, name=s,
                                  label=f"{sft}'s wrong answers to icd10cm-norm {s}") for s in split}
    results["pairs"] = {"train_prompts": made.prompts, "train_pairs": made.pairs, "train_right": made.correct,
                        **{f"{s}_pairs": held[s].pairs for s in split}}
    save()
    say(f"pairs: {results['pairs']}")
    tried = {}
    for lr in [x.strip() for x in args.dpo_lrs.split(",") if x.strip()]:
        run, stats = train_run(w / f"dpo_lr{lr}", [
            f"model.name={sft}", "train.stage=dpo", f"data.dataset_dir={pairs_dir}", "data.train=[mistakes_train]",
            "data.eval=[validation_train]", "data.val_size=0", f"train.lr={lr}", "train.batch_size=4",
            "train.epochs=1", "train.eval_steps=100000", "train.warmup_ratio=0.1",
            f"train.max_time={args.dpo * 60:.0f}"])
        stats["em_validation"] = exact_match(answers(str(run), split["validation"], max_new), split["validation"])
        tried[lr] = {"run": str(run), **stats}
        results["dpo_tried"] = tried
        save()
        say(f"dpo lr {lr}: {stats}")
    best = max(tried, key=lambda lr: (tried[lr]["em_validation"], tried[lr].get("eval_reward_accuracy") or 0.0))
    chosen = tried[best]
    test_answers = answers(chosen["run"], split["test"], max_new)
    results["dpo"] = {"lr": best, "em_validation": chosen["em_validation"],
                      "em_test": exact_match(test_answers, split["test"]),
                      "test_pairs": reward_accuracy(chosen["run"], str(sft), pairs_dir, "test", 0.1),
                      "validation_reward_accuracy": chosen.get("eval_reward_accuracy"),
                      "steps": chosen["steps"], "train_seconds": chosen["train_seconds"]}
    save()
    say(f"dpo (lr {best}, chosen on validation): {results['dpo']}")
    print(json.dumps(results, indent=2, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
