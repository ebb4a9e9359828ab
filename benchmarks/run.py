"""Run every benchmark and print, as the last line, one JSON object with the headline figures.

    python benchmarks/run.py                  # the figures in README.md (~25 min on 2 cores)
    python benchmarks/run.py --quick          # few steps, fewer prompts (~8 min)
    python benchmarks/run.py --smoke          # tiny random model: plumbing only (seconds)
    python benchmarks/run.py --save benchmarks/results.json

Order: training throughput (tunelab vs the plain seed-003 recipe, LoRA and full
fine-tuning, each contender in its own process, alternating), then the matmul peak
and MFU of tunelab's LoRA runs, then batched vs one-at-a-time generation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_generation  # noqa: E402
import mfu  # noqa: E402
import train_throughput  # noqa: E402
from common import emit, ensure_src_on_path, machine_info  # noqa: E402

TARGETS = {"train_speedup_vs_plain": 2.5, "peak_rss_ratio_vs_plain": 1.0, "mfu_bf16": 0.40,
           "eval_speedup_vs_sequential": 5.0}
PROFILES = {
    "full": {"steps": 21, "rounds": 2, "prompts": 128, "methods": ["lora", "full"]},
    "quick": {"steps": 6, "rounds": 1, "prompts": 104, "methods": ["lora", "full"]},
    "smoke": {"steps": 3, "rounds": 1, "prompts": 6, "methods": ["lora", "full"]},
}


def log(text: str) -> None:
    print(text, flush=True)


def smoke_training(spec: str, data_file: Path, cfg: dict, workdir: Path) -> dict[str, Any]:
    """All smoke children at once: the tiny model's figures mean nothing, only the plumbing."""
    jobs = {f"{who}_{m}": ["--child", who, "--method", m, "--spec", spec, "--data", str(data_file),
                           "--steps", str(cfg["steps"]), "--out", str(workdir / "runs" / f"{who}_{m}")]
            for m in cfg["methods"] for who in train_throughput.CONTENDERS}
    with ThreadPoolExecutor(len(jobs)) as pool:
        # one thread each: several children share the cores, and spinning OpenMP threads would stall
        futures = {k: pool.submit(train_throughput.run_child, "train_throughput.py", a, threads=1)
                   for k, a in jobs.items()}
        runs = {k: [f.result()] for k, f in futures.items()}
    return {"runs": runs, "summary": {m: train_throughput.summarise(runs, m) for m in cfg["methods"]}}


def headline(train: dict, util: dict, gen: dict, mode: str, seconds: float) -> dict[str, Any]:
    lora, full = train["summary"]["lora"], train["summary"].get("full")
    figures: dict[str, Any] = {
        "train_speedup_vs_plain": lora["speedup"],
        "train_tokens_per_s": lora["tunelab_tokens_per_s"],
        "train_supervised_tokens_per_s": lora["tunelab_supervised_tokens_per_s"],
        "plain_train_tokens_per_s": lora["plain_tokens_per_s"],
        "peak_rss_ratio_vs_plain": lora["peak_rss_ratio"],
        "train_peak_rss_mb": lora["tunelab_peak_rss_mb"],
        "plain_peak_rss_mb": lora["plain_peak_rss_mb"],
        "mfu_bf16": util["mfu_bf16"], "mfu_fp32": util["mfu_fp32"],
        "mfu_bf16_dense_head": util["mfu_bf16_dense_head"],
        "model_gflops_per_s": util["model_gflops_per_s"],
        "peak_bf16_gflops": util["peak_bf16_gflops"], "peak_fp32_gflops": util["peak_fp32_gflops"],
        "eval_speedup_vs_sequential": gen["speedup"],
        "eval_tokens_per_s": gen["batched_tokens_per_s"],
        "eval_sequential_tokens_per_s": gen["sequential_tokens_per_s"],
        "eval_outputs_matching": f"{gen['outputs_matching']}/{gen['prompts']}",
    }
    if full:
        figures.update({
            "full_train_speedup_vs_plain": full["speedup"], "full_train_tokens_per_s": full["tunelab_tokens_per_s"],
            "full_plain_train_tokens_per_s": full["plain_tokens_per_s"],
            "full_peak_rss_ratio_vs_plain": full["peak_rss_ratio"],
        })
    figures["targets_met"] = {
        "train_speedup_vs_plain": figures["train_speedup_vs_plain"] >= TARGETS["train_speedup_vs_plain"],
        "peak_rss_ratio_vs_plain": figures["peak_rss_ratio_vs_plain"] <= TARGETS["peak_rss_ratio_vs_plain"],
        "mfu_bf16": figures["mfu_bf16"] >= TARGETS["mfu_bf16"],
        "eval_speedup_vs_sequential": figures["eval_speedup_vs_sequential"] >= TARGETS["eval_speedup_vs_sequential"],
    }
    figures.update(mode=mode, seconds=round(seconds, 1))
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="few steps and prompts (minutes)")
    group.add_argument("--smoke", action="store_true", help="tiny random model, plumbing only (seconds)")
    parser.add_argument("--workdir", help="scratch folder, reused between runs (default: a temporary one)")
    parser.add_argument("--save", help="also write every figure (raw runs included) to this JSON file")
    parser.add_argument("--threads", type=int,
                        help="intra-op threads for every part (default: torch's choice = all cores); "
                             "1 keeps figures stable when other jobs share the cores")
    parser.add_argument("--tunelab", action="append", default=[], metavar="KEY=VALUE",
                        help="extra tunelab training override (e.g. data.packing=true)")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = PROFILES[mode]
    started = time.perf_counter()
    ensure_src_on_path()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the matmul peak and generation run in this process
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        spec, data_file = train_throughput.prepare(workdir, args.smoke, cfg["steps"])
        log(f"== training throughput ({mode}: {cfg['steps']} steps × 8 examples, {cfg['rounds']} round(s))")
        if args.smoke:
            train = smoke_training(spec, data_file, cfg, workdir)
        else:
            train = train_throughput.measure(spec, data_file, cfg["methods"], cfg["steps"], cfg["rounds"],
                                             workdir, args.tunelab, log=log, threads=args.threads)
        train_throughput.print_table(train["summary"], log=log)
        log("== model FLOPs utilisation (tunelab LoRA)")
        util = mfu.report(train["runs"]["tunelab_lora"], "lora", mfu.measure_peaks(quick=mode != "full"), log=log)
        log(f"== evaluation generation ({cfg['prompts']} prompts, greedy, 24 new tokens)")
        prompts = eval_generation.load_prompts(workdir / "data", cfg["prompts"])
        gen = eval_generation.measure(spec, prompts, 24, eval_generation_batch(), log=log)
        eval_generation.print_summary(gen, log=log)
    figures = headline(train, util, gen, mode, time.perf_counter() - started)
    if args.save:
        from tunelab.io import write_json

        write_json(args.save, {"headline": figures, "machine": machine_info(), "train": train,
                               "mfu": util, "generation": gen, "tunelab_overrides": args.tunelab,
                               "threads": args.threads})
    emit(figures)
    return figures


def eval_generation_batch() -> int:
    """The batch size ``tunelab eval`` uses by default."""
    from tunelab.config import EvalConfig

    return EvalConfig().batch_size


if __name__ == "__main__":
    main()
