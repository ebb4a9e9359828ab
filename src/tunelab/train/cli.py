"""``tunelab train RECIPE.yaml [key=value ...]`` — a thin wrapper over :func:`tunelab.train.train`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers) -> None:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser(
        "train", help="fine-tune a model from a YAML recipe",
        description="Fine-tune a model from a YAML recipe; key=value pairs override recipe fields "
                    "(e.g. train.max_steps=20 method.r=16 output_dir=runs/try).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  tunelab train recipes/quickstart.yaml output_dir=runs/qs train.max_steps=30\n"
               "  accelerate launch -m tunelab train recipes/qwen2.5-0.5b-med-lora.yaml\n"
               "  tunelab train llamafactory_lora_sft.yaml          # a LLaMA-Factory YAML, translated\n"
               "  tunelab train --lf-args --stage sft --model_name_or_path M --dataset a,b ...\n",
    )
    parser.add_argument("recipe", nargs="?", help="YAML recipe file (see recipes/) or a LLaMA-Factory YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--print-config", nargs="?", const="-", metavar="PATH",
                        help="print the resolved tunelab config (or write it to PATH, never over a file) "
                             "and stop without training")
    parser.add_argument("--lf-args", nargs=argparse.REMAINDER, metavar="--KEY VALUE",
                        help="LLaMA-Factory command-line arguments (llamafactory-cli train ...); must come last")
    parser.set_defaults(func=run)


def _load(args: argparse.Namespace):
    """(config, the recipe to show: translated LLaMA-Factory keys, or None for a tunelab recipe)."""
    from tunelab import lf_compat
    from tunelab.config import load_config, read_yaml
    from tunelab.errors import TunelabError

    if args.lf_args is not None:
        if args.recipe or args.overrides:
            raise TunelabError("--lf-args: give a recipe or --lf-args (last), not both")
        return lf_compat.load(argv=args.lf_args)
    if not args.recipe:
        raise TunelabError("train: give a recipe file (or --lf-args ...)")
    if lf_compat.is_lf_config(read_yaml(args.recipe)):
        return lf_compat.load(args.recipe, overrides=args.overrides)
    return load_config(args.recipe, args.overrides), None


def _print_config(cfg, recipe, dest: str) -> None:
    import yaml

    from tunelab.errors import TunelabError
    from tunelab.io import atomic_write_text

    text = cfg.to_yaml() if recipe is None else yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    if dest == "-":
        print(text, end="")
        return
    path = Path(dest)
    if path.exists():
        raise TunelabError(f"--print-config: {path} already exists; give a new file name")
    atomic_write_text(path, text)
    print(f"tunelab config written to {path}")


def run(args: argparse.Namespace) -> int:
    from tunelab.train import train

    cfg, recipe = _load(args)
    if args.print_config:
        _print_config(cfg, recipe, args.print_config)
        return 0
    if recipe is not None and int(os.environ.get("RANK", "0")) == 0:
        import yaml

        print("LLaMA-Factory arguments as a tunelab recipe (save it with --print-config FILE):")
        print(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), end="", flush=True)
    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run saved to {out}")
    return 0
