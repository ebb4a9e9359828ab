"""``tunelab train RECIPE.yaml [key=value ...]`` — a thin wrapper over :func:`tunelab.train.train`."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser(
        "train", help="fine-tune a model from a YAML recipe",
        description="Fine-tune a model from a YAML recipe; key=value pairs override recipe fields "
                    "(e.g. train.max_steps=20 method.r=16 output_dir=runs/try).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  tunelab train recipes/quickstart.yaml output_dir=runs/qs train.max_steps=30\n"
               "  accelerate launch -m tunelab train recipes/qwen2.5-0.5b-med-lora.yaml\n",
    )
    parser.add_argument("recipe", help="YAML recipe file (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.train import train

    cfg = load_config(args.recipe, args.overrides)
    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run saved to {out}")
    return 0
