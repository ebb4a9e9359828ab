"""``tunelab data build|mix|clean|distill|mistakes``: thin wrappers over the workshop functions.

``tunelab.data.cli`` calls ``register_data_commands`` to add these sub-verbs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import TunelabError


def register_data_commands(data_sub: argparse._SubParsersAction) -> None:
    """Add ``build``, ``mix``, ``clean``, ``distill`` and ``mistakes`` under ``tunelab data``."""
    p = data_sub.add_parser("build", help="build a dataset: a built-in NAME or a RECIPE.yaml")
    p.add_argument("target", nargs="?", help="built-in dataset name (see --list) or a recipe YAML file")
    p.add_argument("--out", help="output folder (required for built-ins; recipes default to their `out`)")
    p.add_argument("--list", action="store_true", help="list the built-in datasets")
    p.add_argument("--seed", type=int, help="random seed for sampling and splits")
    p.add_argument("--max-codes", type=int, help="icd10cm-norm: number of codes to train on")
    p.add_argument("--min-synonyms", type=int, help="icd10cm-norm: only codes with at least N inclusion terms")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another builder option, e.g. --set validation_fraction=0 --set answer=both")
    p.set_defaults(func=_build)

    p = data_sub.add_parser("mix", help="mix datasets by ratio (general:domain = 1:1) or by count")
    p.add_argument("sources", nargs="+", metavar="DATASET[:WEIGHT]", help="e.g. general.jsonl:1 domain.jsonl:1")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--by", choices=("ratio", "count"), default="ratio", help="weights are ratios or row counts")
    p.add_argument("--total", type=int, help="rows in the mix (default: as many as the ratio allows)")
    p.add_argument("--test", type=_amount, default=0, help="hold out a count or ratio of each source as test")
    p.add_argument("--repeat", action="store_true", help="reuse rows of a source that is too small")
    p.add_argument("--name", default="mix", help="dataset name (files NAME_train.jsonl ...)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dataset-dir", help="folder with a dataset_info.json for named datasets")
    p.set_defaults(func=_mix)

    p = data_sub.add_parser("clean", help="clean up text, drop duplicates and long rows, remove train/test leaks")
    p.add_argument("train", nargs="+", metavar="TRAIN", help="training datasets (files or names)")
    p.add_argument("--test", nargs="+", default=[], metavar="TEST", help="test datasets to check for leaks")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--near", type=float, default=0.8, help="near-duplicate similarity threshold (Jaccard)")
    p.add_argument("--exact-only", action="store_true", help="skip near-duplicate detection")
    p.add_argument("--min-tokens", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--tokenizer", help="model spec whose tokenizer counts tokens (default: words + CJK characters)")
    p.add_argument("--leak", choices=("drop-train", "drop-test", "report"), default="drop-train",
                   help="what to do with train/test leaks")
    p.add_argument("--name", default="clean")
    p.add_argument("--dataset-dir", help="folder with a dataset_info.json for named datasets")
    p.set_defaults(func=_clean)

    p = data_sub.add_parser("distill", help="collect styled answers from an OpenAI-compatible endpoint (resumable)")
    p.add_argument("config", help="distillation YAML (base_url, model, instruction, questions, output, ...)")
    p.add_argument("--limit", type=int, help="send at most N new requests this run")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--output", help="override the output JSONL")
    p.set_defaults(func=_distill)

    p = data_sub.add_parser("mistakes", help="preference pairs from a model's wrong answers (for train.stage=dpo)")
    p.add_argument("model", help="model spec or run folder that answers (e.g. the SFT run)")
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="prompts with reference answers (files or names)")
    p.add_argument("--out", required=True, help="output folder (NAME_train.jsonl + dataset_info.json, ranking: true)")
    p.add_argument("--name", default="mistakes")
    p.add_argument("--samples", type=int, default=1, help="answers per prompt: 1 = greedy, more = sampled")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --samples > 1")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, help="use at most N prompts per dataset (seeded shuffle)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dataset-dir", help="folder with a dataset_info.json for named datasets")
    p.add_argument("--judge-base-url", help="keep only wrong answers an LLM judge at this OpenAI-compatible "
                                            "endpoint rates below the reference (open-ended tasks)")
    p.add_argument("--judge-model", help="judge model name (with --judge-base-url)")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge API key")
    p.set_defaults(func=_mistakes)


def _amount(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def _options(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise TunelabError(f"--set {pair!r}: expected KEY=VALUE")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for i, column in enumerate(columns):
        numeric = all(isinstance(row[i], (int, float)) or str(row[i]).endswith("%") for row in rows)
        table.add_column(column, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*map(str, row))
    console = Console()
    console.print(title, highlight=False, soft_wrap=True)  # a title above, so long paths do not wrap
    console.print(table)


def _build(args: argparse.Namespace) -> int:
    from tunelab.workshop.builtin import BUILDERS, build_builtin

    if args.list or not args.target:
        _table("built-in datasets", ["name", "what"], [[n, d] for n, (_, d) in BUILDERS.items()])
        return 0
    if args.target in BUILDERS:
        if not args.out:
            raise TunelabError(f"data build {args.target}: --out DIR is required")
        options = _options(args.set)
        for key in ("seed", "max_codes", "min_synonyms"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
        sizes = build_builtin(args.target, args.out, **options)
        _table(f"{args.target} -> {args.out}", ["split", "rows"], [[s, n] for s, n in sizes.items()])
        return 0
    if Path(args.target).suffix.lower() not in (".yaml", ".yml"):
        raise TunelabError(f"{args.target}: not a built-in dataset ({', '.join(BUILDERS)}) nor a .yaml recipe")
    return _build_recipe(args)


def _build_recipe(args: argparse.Namespace) -> int:
    from tunelab.workshop.build import build_recipe
    from tunelab.workshop.recipe import load_recipe

    recipe = load_recipe(args.target)
    if args.seed is not None:
        recipe.seed = args.seed
    if args.set or args.max_codes is not None or args.min_synonyms is not None:
        raise TunelabError("--set/--max-codes/--min-synonyms apply to built-in datasets; edit the recipe instead")
    report = build_recipe(recipe, args.out)
    rows = [["read", report.read]] + [[f"dropped: {why}", n] for why, n in report.dropped.items()]
    rows += [[f"written: {split}", n] for split, n in report.sizes.items()]
    _table(f"{report.name} -> {report.out_dir}", ["", "rows"], rows)
    if report.lengths:
        print("characters per record (prompt + answer): " + ", ".join(f"{k} {v}" for k, v in report.lengths.items()))
    return 0


def _mix(args: argparse.Namespace) -> int:
    from tunelab.workshop.mix import mix, parse_source

    sources = [parse_source(s) for s in args.sources]
    report = mix(sources, args.out, total=args.total, by=args.by, name=args.name, seed=args.seed,
                 repeat=args.repeat, dataset_dir=args.dataset_dir, test=args.test)
    total = sum(report.taken.values()) or 1
    rows = [[src, report.available[src], n, f"{100 * n / total:.1f}%"] for src, n in report.taken.items()]
    _table(f"{args.name} -> {args.out}", ["source", "available", "taken", "share"], rows)
    print("written: " + ", ".join(f"{s} {n}" for s, n in report.sizes.items()))
    return 0


def _clean(args: argparse.Namespace) -> int:
    from tunelab.workshop.clean import clean

    report = clean(args.train, args.out, test=args.test, name=args.name, dataset_dir=args.dataset_dir,
                   near=None if args.exact_only else args.near, min_tokens=args.min_tokens,
                   max_tokens=args.max_tokens, tokenizer=args.tokenizer, leak_action=args.leak)
    rows = []
    for split, n_in in report.rows_in.items():
        rows.append([split, "read", n_in, "-"])
        if report.tidied.get(split):
            rows.append([split, "text cleaned up (kept)", report.tidied[split], "-"])
        for why, n in report.dropped.get(split, {}).items():
            rows.append([split, f"dropped: {why}", n, report.examples.get(f"{split}: {why}", "")])
        rows.append([split, "kept", report.rows_out[split], "-"])
    _table(f"{args.name} -> {args.out}", ["split", "step", "rows", "first example"], rows)
    if report.leaks:
        print(f"{len(report.leaks)} test rows leak from training ({args.leak}); first: "
              f"{report.leaks[0][0]} ~ {report.leaks[0][1]} ({report.leaks[0][2]}, {report.leaks[0][3]:.2f})")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from tunelab.workshop.distill import distill, load_distill_config

    config = load_distill_config(args.config, limit=args.limit, concurrency=args.concurrency, output=args.output)
    report = distill(config, progress=True)
    _table(f"distill -> {report.output}", ["", "questions"], [
        ["total", report.total], ["already done (resumed)", report.done_before], ["from cache", report.cached],
        ["requested now", report.requested], ["retries", report.retries], ["left by --limit", report.skipped_by_limit],
        ["failed", len(report.failed)]])
    for problem in report.failed[:5]:
        print(f"failed: {problem}")
    return 1 if report.failed else 0


def _mistakes(args: argparse.Namespace) -> int:
    from tunelab.workshop.mistakes import mistake_pairs

    judge = None
    if bool(args.judge_base_url) != bool(args.judge_model):
        raise TunelabError("data mistakes: --judge-base-url and --judge-model go together")
    if args.judge_base_url:
        import os

        from tunelab.eval.judge import JudgeClient

        judge = JudgeClient(base_url=args.judge_base_url, model=args.judge_model,
                            api_key=os.environ.get(args.judge_api_key_env, "EMPTY"),
                            cache_path=str(Path(args.out) / f"{args.name}.judge.cache"))  # not a data suffix
    report = mistake_pairs(args.model, args.datasets, args.out, dataset_dir=args.dataset_dir,
                           max_samples=args.max_samples, samples=args.samples, temperature=args.temperature,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                           name=args.name, judge=judge)
    rows = [["prompts", report.prompts], ["answers", report.answers], ["right (no pair)", report.correct],
            ["empty (no pair)", report.empty]]
    if judge is not None:
        rows.append(["not rated below the reference by the judge (no pair)", report.judge_dropped])
    _table(f"{args.name} -> {args.out}", ["", "count"], [*rows, ["pairs written", report.pairs]])
    return 0
