"""``tunelab export RUN --merge OUT`` — a thin wrapper over :func:`tunelab.train.export.merge_export`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``export`` sub-command."""
    parser = subparsers.add_parser(
        "export", help="write a run as a plain Hugging Face model folder (LoRA merged)",
        description="Merge a run's LoRA adapter into its base model and write a folder that "
                    "AutoModelForCausalLM.from_pretrained loads on its own (tokenizer and chat template included).",
    )
    parser.add_argument("run", help="run folder (or any model spec)")
    parser.add_argument("--merge", required=True, metavar="OUT", help="destination folder")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the saved weights")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.train.export import merge_export

    out = merge_export(args.run, args.merge, overwrite=args.overwrite, dtype=args.dtype)
    print(f"merged model written to {out}")
    return 0
