"""``tunelab env``: the machine, the libraries, and what tunelab decided to run here and why."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from typing import Any

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors",
             "gguf", "bitsandbytes", "deepspeed", "flash-attn")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("tunelab", *LIBRARIES):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def environment(refresh: bool = False, threads: Any = None) -> dict[str, Any]:
    """Everything ``tunelab env`` prints, as one dict (``--json`` writes it as is)."""
    from tunelab import hardware
    from tunelab.models.loading import pick_attention

    choice = hardware.apply_threads(threads, force=True)
    probe = hardware.probe(refresh=refresh)
    train = hardware.training_precision("auto", "auto", probe)
    infer = hardware.inference_dtype("auto", probe)
    asked = hardware.training_precision("auto", True, probe)
    return {
        "versions": versions(), "platform": platform.platform(), "probe": probe.to_dict(),
        "decisions": {
            "train_precision": {"value": train.value, "reason": train.reason},
            "train_bf16_true": {"value": asked.value, "reason": asked.warning or asked.reason},
            "inference_dtype": {"value": infer.value, "reason": infer.reason},
            "threads": {"value": choice.threads, "reason": choice.reason},
            "attention": pick_attention("auto"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        },
    }


WAIT_POLICY_WHY = {
    "default": "OpenMP's: waiting threads spin briefly, then sleep (1.5x faster than PASSIVE "
               "with 2 threads on an idle 2-core CPU; under load fewer threads run, none wait)",
    "PASSIVE": "waiting threads sleep at once (set outside tunelab)",
}


def print_environment(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    p, d = info["probe"], info["decisions"]
    console = Console()
    libs = Table(title="libraries", show_header=False)
    for name, version in info["versions"].items():
        libs.add_row(name, version or "[dim]not installed[/]")
    console.print(libs)
    machine = Table(title="machine", show_header=False)
    flags = " ".join(name for name, present in p["flags"].items() if present) or "none of the listed"
    rates = ", ".join(f"{k} {v:.1f}" for k, v in p["gflops"].items())
    for key, value in [
        ("platform", info["platform"]), ("cpu", p["cpu_model"]), ("flags", flags),
        ("torch cpu capability", p["capability"]), ("kind", p["kind"]),
        ("cores", f"{p['cores_available']} available to this process of {p['logical_cpus']}"),
        ("load", f"other processes busy on {p['other_busy_cores']:.1f} core(s); load average {p['loadavg']:.2f}"),
        ("gpu", p["gpu"] or "none"),
        ("matmul GFLOP/s", f"{rates} ({p['gflops_threads']} thread(s), "
                           f"{'cached' if p['cached'] else 'measured now'}; bf16/fp32 = {p['bf16_ratio']:.2f})"),
    ]:
        machine.add_row(key, value)
    console.print(machine)
    decided = Table(title="decisions", show_header=True)
    decided.add_column("what")
    decided.add_column("choice")
    decided.add_column("why")
    decided.add_row("training precision (auto)", d["train_precision"]["value"], d["train_precision"]["reason"])
    decided.add_row("training with train.bf16=true", d["train_bf16_true"]["value"], d["train_bf16_true"]["reason"])
    decided.add_row("inference weights (auto)", d["inference_dtype"]["value"], d["inference_dtype"]["reason"])
    decided.add_row("threads", str(d["threads"]["value"]), d["threads"]["reason"])
    decided.add_row("attention (auto)", d["attention"], "sdpa on a GPU, eager on a CPU (measured faster)")
    decided.add_row("OMP_WAIT_POLICY", d["omp_wait_policy"], WAIT_POLICY_WHY.get(d["omp_wait_policy"], "set by you"))
    console.print(decided)


def _run(args) -> int:
    info = environment(refresh=args.refresh, threads=args.threads)
    if args.json:
        from tunelab.io import dumps

        sys.stdout.write(dumps(info) + "\n")
    else:
        print_environment(info)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("env", help="print the machine, libraries and tunelab's hardware decisions",
                            description=__doc__)
    parser.add_argument("--refresh", action="store_true", help="measure the matmul rates again (not the cache)")
    parser.add_argument("--threads", help="decide as if --threads were given")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    parser.set_defaults(func=_run)
