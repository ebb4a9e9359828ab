"""``tunelab data check|stats|preview`` (the workshop adds build/distill/mix when present)."""

from __future__ import annotations

import argparse
import importlib
import sys

from tunelab.io import dumps


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` verb and its sub-verbs."""
    parser = subparsers.add_parser("data", help="check, measure and preview datasets")
    data_sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = data_sub.add_parser("check", help="validate datasets and list every problem as file:line: field: problem")
    _dataset_args(p)
    p.set_defaults(func=_check)

    p = data_sub.add_parser("stats", help="counts, formats and token lengths under a model's chat template")
    _dataset_args(p)
    _model_args(p)
    p.add_argument("--cutoff-len", type=int, default=1024, help="report how many exceed this many tokens")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=_stats)

    p = data_sub.add_parser("preview", help="render conversations with the supervised tokens marked [[ ]]")
    p.add_argument("dataset", help="a data file or a name in DATASET_DIR/dataset_info.json")
    p.add_argument("--dataset-dir", help="folder with a LLaMA-Factory style dataset_info.json")
    _model_args(p)
    p.add_argument("-n", type=int, default=2, help="how many conversations to show")
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--mask-history", action="store_true", help="learn only from the last answer")
    p.add_argument("--train-on-prompt", action="store_true", help="also learn from system and user turns")
    p.set_defaults(func=_preview)

    _register_workshop(data_sub)


def _register_workshop(data_sub: argparse._SubParsersAction) -> None:
    try:
        workshop_cli = importlib.import_module("tunelab.workshop.cli")
    except ModuleNotFoundError as exc:
        # Only the workshop CLI being absent is expected; a missing dependency inside it is a bug.
        if exc.name in ("tunelab.workshop", "tunelab.workshop.cli"):
            return
        raise
    workshop_cli.register_data_commands(data_sub)


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("datasets", nargs="+", metavar="DATASET",
                   help="data files (json, jsonl, csv, tsv, xlsx, parquet) or names in DATASET_DIR")
    p.add_argument("--dataset-dir", help="folder with a LLaMA-Factory style dataset_info.json")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="model whose tokenizer and chat template to use (folder, .gguf, run folder, builtin:...)")
    p.add_argument("--template", help="hand-written template for models without one (e.g. human-assistant)")


def _tokenizer(args: argparse.Namespace):
    from tunelab.models import load_tokenizer

    return load_tokenizer(args.model, template=args.template)


def _check(args: argparse.Namespace) -> int:
    from tunelab.data.commands import check

    report = check(args.datasets, args.dataset_dir)
    for problem in report.problems:
        print(problem)
    if report.ok:
        print(report.summary())
        return 0
    print(f"error: {report.summary()}", file=sys.stderr)
    return 1


def _stats(args: argparse.Namespace) -> int:
    from tunelab.data.commands import format_stats, stats

    result = stats(args.datasets, _tokenizer(args), args.dataset_dir, args.cutoff_len)
    print(dumps(result) if args.json else format_stats(result))
    return 0


def _preview(args: argparse.Namespace) -> int:
    from tunelab.data.commands import preview

    blocks = preview(args.dataset, _tokenizer(args), args.dataset_dir, args.n, args.cutoff_len,
                     args.mask_history, args.train_on_prompt)
    print("\n\n".join(blocks))
    return 0
