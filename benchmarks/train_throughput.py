"""Training throughput: tunelab vs seed 003's plain transformers recipe, same data, same steps.

    python benchmarks/train_throughput.py [--steps 21] [--rounds 2] [--methods lora,full]

Each (contender, method) runs in its own fresh process, contenders alternating within
each round so that background load hits both alike. In every child the clock starts
at the end of the first optimizer step (model loading, data preparation and the
warm-up step are excluded) and stops at the end of the last one.

- real tokens: non-padding tokens that go through the model (prompt + answer);
- supervised tokens: next-token targets that carry loss (the answer);
- peak RSS: the child's ``ru_maxrss`` (whole process: model load included).

Every contender gets the same ``steps × 8`` training rows, 8 examples per optimizer
step: tunelab with its defaults (batch 8, length-grouped, logits only where a label
is), the plain recipe as the seed has it (batch 1 × accumulation 8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BUILTIN, build_data, emit, ensure_src_on_path, make_tiny_model, model_path,  # noqa: E402
                    peak_rss_mb, read_jsonl, run_child, step_timer_callback)

CONTENDERS = ("tunelab", "plain")
EXAMPLES_PER_STEP = 8


# ------------------------------------------------------------------ children


def _model_facts(model) -> dict[str, Any]:
    """Parameter counts the FLOP formulas need (see mfu.py)."""
    from torch import nn

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    embed = base.get_input_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    total = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    tied = head is not None and embed is not None and head.weight is embed.weight
    # Matmul weights of the body: everything but embeddings, the head, norms and LoRA.
    body = sum(m.weight.numel() for n, m in base.named_modules()
               if isinstance(m, nn.Linear) and m is not head and "lora_" not in n)
    config = base.config
    return {"params_total": total, "tied_head": tied, "params_body_matmul": body,
            "params_head": head_params, "params_lora": lora,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads}


def child_tunelab(spec: str, data_file: str, method: str, steps: int, out: str, extra: list[str]) -> dict:
    ensure_src_on_path()
    from tunelab.config import load_config
    from tunelab.train import train

    timer = step_timer_callback()
    cfg = load_config(None, [f"model.name={spec}", f"data.train=[{data_file}]", f"method.name={method}",
                             f"train.max_steps={steps}", f"train.batch_size={EXAMPLES_PER_STEP}",
                             "train.grad_accum=1", "train.lr=1e-4",
                             f"output_dir={out}", "overwrite=true", *extra])
    train(cfg, callbacks=[timer])
    return {**timer.summary(cfg.train.grad_accum), **_model_facts(timer.model),
            "peak_rss_mb": peak_rss_mb()}


def child_plain(spec: str, data_file: str, method: str, steps: int, out: str) -> dict:
    from plain_recipe import build_trainer

    timer = step_timer_callback()
    trainer = build_trainer(model_path(spec), data_file, method, steps, out, callbacks=[timer])
    trainer.train()
    return {**timer.summary(trainer.args.gradient_accumulation_steps), **_model_facts(trainer.model),
            "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------ parent


def subset(data_dir: Path, rows: int, workdir: Path) -> Path:
    """The first ``rows`` training rows (already shuffled by the builder), shared by all."""
    path = workdir / f"train_{rows}.jsonl"
    if not path.is_file():
        picked = read_jsonl(data_dir / "train.jsonl", limit=rows)
        if len(picked) < rows:
            raise SystemExit(f"the training set has only {len(picked)} rows; fewer steps, please")
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked), encoding="utf-8")
    return path


def measure(spec: str, data_file: Path, methods: list[str], steps: int, rounds: int,
            workdir: Path, extra: list[str], log=print, threads: int | None = None) -> dict[str, Any]:
    """Run every (contender, method) ``rounds`` times, alternating; return raw and summary figures."""
    runs: dict[str, list[dict]] = {}
    for r in range(rounds):
        for method in methods:
            order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
            for contender in order:
                key = f"{contender}_{method}"
                args = ["--child", contender, "--method", method, "--spec", spec, "--data", str(data_file),
                        "--steps", str(steps), "--out", str(workdir / "runs" / key)]
                args += [a for x in extra for a in ("--tunelab", x)] if contender == "tunelab" else []
                result = run_child("train_throughput.py", args, threads=threads)
                runs.setdefault(key, []).append(result)
                log(f"  round {r + 1}/{rounds} {key:14s} {result['tokens_per_s']:7.1f} real tok/s  "
                    f"{result['s_per_step']:6.2f} s/step  peak RSS {result['peak_rss_mb']:6.0f} MiB  "
                    f"padding {100 * result['padding_fraction']:4.1f}%")
    return {"runs": runs, "summary": {m: summarise(runs, m) for m in methods}}


def summarise(runs: dict[str, list[dict]], method: str) -> dict[str, Any]:
    """Median tokens/s per contender; speedup = median of per-round ratios (adjacent runs)."""
    ours, plain = runs[f"tunelab_{method}"], runs[f"plain_{method}"]
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, plain)]
    return {
        "tunelab_tokens_per_s": statistics.median(r["tokens_per_s"] for r in ours),
        "plain_tokens_per_s": statistics.median(r["tokens_per_s"] for r in plain),
        "tunelab_supervised_tokens_per_s": statistics.median(r["supervised_tokens_per_s"] for r in ours),
        "plain_supervised_tokens_per_s": statistics.median(r["supervised_tokens_per_s"] for r in plain),
        "speedup": statistics.median(ratios),
        "speedup_per_round": ratios,
        "tunelab_peak_rss_mb": max(r["peak_rss_mb"] for r in ours),
        "plain_peak_rss_mb": max(r["peak_rss_mb"] for r in plain),
        "peak_rss_ratio": max(r["peak_rss_mb"] for r in ours) / max(r["peak_rss_mb"] for r in plain),
        "tunelab_s_per_step": statistics.median(r["s_per_step"] for r in ours),
        "plain_s_per_step": statistics.median(r["s_per_step"] for r in plain),
    }


def print_table(summary: dict[str, dict], log=print) -> None:
    log(f"{'method':6s} {'contender':9s} {'real tok/s':>10s} {'sup tok/s':>9s} {'s/step':>7s} {'peak RSS MiB':>12s}")
    for method, s in summary.items():
        for who in CONTENDERS:
            log(f"{method:6s} {who:9s} {s[f'{who}_tokens_per_s']:10.1f} {s[f'{who}_supervised_tokens_per_s']:9.1f} "
                f"{s[f'{who}_s_per_step']:7.2f} {s[f'{who}_peak_rss_mb']:12.0f}")
        log(f"{method:6s} speedup (real tokens/s) {s['speedup']:.2f}x   peak RSS ratio {s['peak_rss_ratio']:.2f}")


def prepare(workdir: Path, smoke: bool, steps: int) -> tuple[str, Path]:
    """(model spec, training file) shared by every contender."""
    data_dir = build_data(workdir)
    spec = str(make_tiny_model(workdir / "tiny-model", data_dir)) if smoke else BUILTIN
    if not smoke:
        model_path(spec)  # convert the builtin model once, before any timing child starts
    return spec, subset(data_dir, steps * EXAMPLES_PER_STEP, workdir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=21, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating repeats of every contender")
    parser.add_argument("--methods", default="lora,full", help="comma list of lora, full")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model: checks the plumbing only")
    parser.add_argument("--threads", type=int, help="intra-op threads per child (default: torch's choice)")
    parser.add_argument("--tunelab", action="append", default=[], metavar="KEY=VALUE",
                        help="extra tunelab config override (e.g. data.packing=true)")
    # child mode (internal)
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child == "tunelab":
            emit(child_tunelab(args.spec, args.data, args.method, args.steps, args.out, args.tunelab))
        else:
            emit(child_plain(args.spec, args.data, args.method, args.steps, args.out))
        return
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        spec, data_file = prepare(workdir, args.smoke, args.steps)
        result = measure(spec, data_file, args.methods.split(","), args.steps, args.rounds, workdir,
                         args.tunelab, threads=args.threads)
    print_table(result["summary"])
    emit(result["summary"])


if __name__ == "__main__":
    main()
