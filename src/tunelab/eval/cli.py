"""``tunelab eval score|run|judge`` (``tunelab eval RECIPE.yaml`` means ``eval run``).

- ``score``: metrics of a predictions file against references, one JSON object on stdout.
- ``run``: evaluate models on test sets from a recipe (or flags) and write the report.
- ``judge``: LLM-as-judge over predictions files (pointwise, or pairwise with --pred-b).
"""

from __future__ import annotations

import argparse
import os
import sys

from tunelab.io import dumps
from tunelab.models.gguf_runtime import QUANTIZE_TYPES as QUANTIZE_CHOICES

SUBCOMMANDS = ("score", "run", "judge")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` verb; its sub-verbs are parsed by ``build_parser``."""
    parser = subparsers.add_parser(
        "eval", help="metrics, before/after reports and LLM-as-judge", add_help=False,
        description="tunelab eval {score,run,judge} ... ; 'tunelab eval RECIPE.yaml' runs the recipe's evaluation")
    parser.add_argument("-h", "--help", action="store_true", dest="eval_help")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Dispatch ``tunelab eval ...`` (a bare recipe path means ``run``)."""
    rest = list(args.rest)
    if getattr(args, "eval_help", False):
        rest = ["--help"]
    if rest and rest[0] not in SUBCOMMANDS and rest[0] not in ("-h", "--help"):
        rest.insert(0, "run")
    parsed = build_parser().parse_args(rest or ["--help"])
    return int(parsed.handler(parsed) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunelab eval", description="score, run or judge; 'tunelab eval RECIPE.yaml' means 'tunelab eval run RECIPE.yaml'")
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("score", help="score predictions against references; prints one JSON object")
    p.add_argument("--pred", required=True, help="JSONL/JSON/CSV file with predictions")
    p.add_argument("--ref", help="file with references (default: the --pred file)")
    p.add_argument("--metrics", default="em,bleu,rouge",
                   help="comma list: em,json_field,f1,bleu,rouge,meteor,cider,bertscore,perplexity")
    p.add_argument("--pred-field", default="prediction")
    p.add_argument("--ref-field", default="reference")
    _metric_options(p)
    p.set_defaults(handler=_score)

    p = sub.add_parser("run", help="evaluate models on test sets and write report.md/html/json")
    p.add_argument("recipe", nargs="?", help="recipe YAML (its eval section; data.eval as test sets)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.max_samples=20")
    p.add_argument("--models", nargs="+", help="model specs; the first is the baseline")
    p.add_argument("--datasets", nargs="+", help="test sets (files or registered names)")
    p.add_argument("--metrics", help="comma list of metrics")
    p.add_argument("--out", help="report folder (default: <output_dir>/eval)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="evaluate each model as a GGUF of this type in llama.cpp (exported once, cached)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--judge-base-url", help="also judge the answers with this OpenAI-compatible endpoint")
    p.add_argument("--judge-model", help="judge model name (with --judge-base-url)")
    p.add_argument("--judge-api-key-env", help="env var with the judge API key (default: eval.judge_api_key_env, OPENAI_API_KEY)")
    p.set_defaults(handler=_run)

    p = sub.add_parser("judge", help="LLM-as-judge over predictions (pairwise when --pred-b is given)")
    p.add_argument("--pred", required=True, help="predictions file (fields prompt, prediction[, reference])")
    p.add_argument("--pred-b", help="second model's predictions: compare A vs B in both orders")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="judge model name at that endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--dimensions", help="pointwise dimensions (default: all five)")
    p.add_argument("--no-reference", action="store_true", help="do not show the reference answer to the judge")
    p.add_argument("--cache", help="JSONL cache of judge replies (default: <out>.cache.jsonl)")
    p.add_argument("--out", required=True, help="where the judgement JSON (with the prompt) goes")
    p.set_defaults(handler=_judge)
    return parser


def _metric_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--normalize", default="strip", help="em/json_field/f1 normalisation: strip,width,lower,punct,space")
    p.add_argument("--lang", choices=["en", "zh"], help="tokenisation (default: detected from the references)")
    p.add_argument("--json-fields", help="comma list of fields for json_field (default: each reference's keys)")
    p.add_argument("--bertscore-model", help="local model folder or builtin:NAME (default: builtin SmolLM2)")
    p.add_argument("--bertscore-layer", type=int)
    p.add_argument("--model", help="model spec for perplexity")
    p.add_argument("--prompt-field", default="prompt", help="field with the prompt, for perplexity")


def _score(args: argparse.Namespace) -> int:
    from tunelab.eval.metrics import MetricOptions, parse_metrics, read_column, score_files

    options = MetricOptions(normalise=args.normalize, lang=args.lang,
                            json_fields=args.json_fields.split(",") if args.json_fields else None,
                            bertscore_model=args.bertscore_model, bertscore_layer=args.bertscore_layer)
    if "perplexity" in parse_metrics(args.metrics) and args.model:
        from tunelab.models import load_model

        options.model = load_model(args.model)
        options.prompts = read_column(args.pred, args.prompt_field)
    result = score_files(args.pred, args.ref, args.metrics, args.pred_field, args.ref_field, options)
    print(dumps(result, indent=None))
    return 0


def _run(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.eval.run import evaluate

    overrides = list(args.overrides)
    if args.recipe and "=" in args.recipe and not os.path.exists(args.recipe):
        overrides.insert(0, args.recipe)  # `eval run eval.models=[...]` without a recipe
        args.recipe = None
    if args.models:
        overrides.append("eval.models=[" + ",".join(f'"{m}"' for m in args.models) + "]")
    if args.datasets:
        overrides.append("eval.datasets=[" + ",".join(f'"{d}"' for d in args.datasets) + "]")
    if args.metrics:
        overrides.append(f"eval.metrics=[{args.metrics}]")
    if args.quantize:
        overrides.append(f"eval.quantize={args.quantize}")
    if args.out:
        overrides.append(f'eval.output_dir="{args.out}"')
    if args.judge_base_url:
        overrides.append(f'eval.judge_base_url="{args.judge_base_url}"')
    if args.judge_model:
        overrides.append(f'eval.judge_model="{args.judge_model}"')
    if args.judge_api_key_env:
        overrides.append(f"eval.judge_api_key_env={args.judge_api_key_env}")
    cfg = load_config(args.recipe, overrides)
    report = evaluate(cfg, progress=not args.quiet)
    out = report["output_dir"]
    print(f"report: {out}/report.md, {out}/report.html, {out}/report.json", file=sys.stderr)
    from tunelab.eval.report import to_markdown

    print(to_markdown(report).split("\n## Settings")[0])
    return 0


def _judge(args: argparse.Namespace) -> int:
    from tunelab.eval.judge import JudgeClient, judge_files

    client = JudgeClient(base_url=args.base_url, model=args.model,
                         api_key=os.environ.get(args.api_key_env, "EMPTY"),
                         cache_path=args.cache or f"{args.out}.cache.jsonl")
    result = judge_files(client, args.pred, args.pred_b, args.out,
                         dimensions=args.dimensions.split(",") if args.dimensions else None,
                         with_reference=not args.no_reference)
    print(dumps(result["summary"], indent=None))
    return 0
