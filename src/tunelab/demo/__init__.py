"""``tunelab demo``: the end-to-end job on the embedded model, offline."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="end-to-end: build data, evaluate, LoRA-tune, evaluate again")
    parser.add_argument("kind", nargs="?", choices=["vlm"],
                        help="vlm: the vision-language demo (shapes scenes, EfficientNet-Lite0 + the builtin "
                             "model, two stages, three baselines)")
    parser.add_argument("--out", help="run folder (default: runs/demo, or runs/demo-vlm)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller version for tests (less data, fewer steps); vlm: a 6 minute budget, "
                             "the text demo: no budget")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo run in --out")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-time", default="plan", metavar="DURATION",
                        help="wall-clock budget for the whole demo (default 15m; with --quick 6m for vlm, "
                             "none for the text demo; none = train every planned step however long it takes)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tunelab.config import parse_duration
    from tunelab.demo.pipeline import run_demo

    budget = args.max_time
    if budget not in ("plan", "none"):
        budget = parse_duration(budget, "--max-time")
    if args.kind == "vlm":
        from tunelab.demo.vlm import run_vlm_demo

        run_vlm_demo(args.out or "runs/demo-vlm", quick=args.quick, overwrite=args.overwrite, seed=args.seed,
                     max_seconds=None if budget == "none" else budget)
        return 0
    run_demo(args.out or "runs/demo", quick=args.quick, overwrite=args.overwrite, seed=args.seed,
             max_seconds=None if budget == "none" else budget)
    return 0
