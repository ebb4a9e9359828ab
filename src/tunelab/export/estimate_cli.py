"""``tunelab estimate --model M --method lora --batch 8 --seq 256 [--calibrate] [--json]``."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "estimate", help="training memory from the model config alone (optionally calibrated on this machine)",
        description="Weights, gradients, optimizer states, activations, logits and overhead of one training "
                    "step, from the model's config (no weights loaded). --calibrate runs three tiny probe "
                    "steps here and fits the estimate's fixed bytes and step scale to them.")
    parser.add_argument("--model", required=True, help="model spec: builtin:NAME, a local folder, a run, a .gguf")
    parser.add_argument("--method", default="lora", choices=["full", "freeze", "lora", "qlora"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "int8", "int4"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "sgd"])
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--calibrate", action="store_true", help="fit fixed bytes and step scale to probe steps here")
    parser.add_argument("--json", action="store_true", help="print one JSON object (bytes)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.export.estimate import calibrate, estimate, load_config, model_shape
    from tunelab.io import dumps

    shape = model_shape(load_config(args.model))
    calibration = None
    if args.calibrate:
        method = "qlora" if args.method == "qlora" else args.method
        calibration = calibrate(args.model, method, args.gradient_checkpointing, args.optimizer, args.r,
                                log=(lambda _: None) if args.json else print)
    result = estimate(shape, args.method, args.precision, args.batch, args.seq, args.gradient_checkpointing,
                      args.optimizer, args.r, calibration=calibration)
    if args.json:
        print(dumps({"model": args.model, **result.to_dict()}, indent=None))
        return 0
    _print_table(args.model, result)
    return 0


def _print_table(model: str, result) -> None:
    from rich.console import Console
    from rich.table import Table

    gib = 2**30
    i = result.inputs
    table = Table(title=f"{model}: {i['method']}, {i['precision']}, batch {i['batch']} x seq {i['seq']}, "
                        f"{i['optimizer']}{', gradient checkpointing' if i['gradient_checkpointing'] else ''}")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    labels = {"weights": "weights", "optimizer": "optimizer state",
              "activations": "activations kept for the backward, heap the forward left",
              "logits": "logits, log-probs and their gradients", "gradients": "gradients and backward temporaries",
              "overhead": "fixed overhead (Python, torch, libraries)"}
    for part, label in labels.items():
        table.add_row(label, f"{getattr(result, part) / gib:.3f}")
    table.add_row("[bold]total[/]", f"[bold]{result.total / gib:.3f}[/]")
    console = Console()
    console.print(table)
    console.print(f"params {result.params:,d}, trainable {result.trainable_params:,d}"
                  + ("; calibrated on this machine" if result.calibrated else "; from the config (--calibrate fits "
                                                                            "the estimate to this machine)"))
    for note in result.notes:
        console.print(f"note: {note}")
