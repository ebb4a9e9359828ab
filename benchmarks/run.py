"""Run every benchmark and print, as the last line, one JSON object with the headline figures.

    python benchmarks/run.py                  # the figures in README.md (~15 min AVX-512, ~40 min AVX2)
    python benchmarks/run.py --emulate-avx2   # the same as torch runs on an AVX2-only CPU
    python benchmarks/run.py --quick          # few steps, fewer prompts
    python benchmarks/run.py --smoke          # tiny random model: plumbing only (about a minute)
    python benchmarks/run.py --probe-only     # the machine block only
    python benchmarks/run.py --save benchmarks/results.json

Order: the machine (``tunelab.hardware.probe()``: CPU, flags, torch capability, the
CPU kind, measured matmul rates and peaks), training throughput (tunelab vs the
plain seed-003 recipe as written and its best honest variant here, LoRA and full
fine-tuning, each contender in its own process, alternating), MFU of tunelab's LoRA
runs against the peak of the dtype they trained in, batched vs one-at-a-time
generation, then training speed with a competing busy process (threads under load).

``--emulate-avx2`` sets ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` and
re-executes this script (torch reads them when it is imported), so this process and
every child run as on an AVX2-only CPU; every output names the kind
"AVX2 (emulated on <real kind>)".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_generation  # noqa: E402
import mfu  # noqa: E402
import threads_under_load  # noqa: E402
import train_throughput  # noqa: E402
from common import EMULATED_ON_ENV, EMULATION_ENV, cpu_kind, emit, ensure_src_on_path, machine_info  # noqa: E402

TARGETS = {"train_speedup_vs_plain_best": 2.5, "peak_rss_ratio_vs_plain_best": 1.0,
           "train_speedup_vs_plain_as_written": 10.0, "mfu": 0.40, "eval_speedup_vs_sequential": 5.0,
           "load_auto_kept": threads_under_load.TARGET_KEPT}
PROFILES = {
    "full": {"steps": 11, "rounds": {"lora": 2, "full": 1}, "prompts": 128, "methods": ["lora", "full"],
             "load_steps": 6, "peak_seconds": mfu.PEAK_SECONDS},
    "quick": {"steps": 6, "rounds": {"lora": 1, "full": 1}, "prompts": 104, "methods": ["lora", "full"],
              "load_steps": 4, "peak_seconds": mfu.PEAK_SECONDS},
    "smoke": {"steps": 3, "rounds": {"lora": 1, "full": 1}, "prompts": 6, "methods": ["lora", "full"],
              "load_steps": 2, "peak_seconds": 0.3},
}


def log(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------ the machine


def reexec_emulated(argv: list[str]) -> None:
    """Re-execute this script with the AVX2 emulation variables set (never returns)."""
    for key in EMULATION_ENV:
        os.environ.pop(key, None)  # the real kind is probed without them
    ensure_src_on_path()
    from tunelab import hardware

    real = hardware.probe().kind
    log(f"--emulate-avx2: re-running with {' '.join(f'{k}={v}' for k, v in EMULATION_ENV.items())} "
        f"(real CPU kind: {real})")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv],
              dict(os.environ, **EMULATION_ENV, **{EMULATED_ON_ENV: real}))


def machine_block(probe, decision) -> dict[str, Any]:
    """What the probe found, as printed first and saved."""
    return {
        "cpu_kind": cpu_kind(probe), "emulated": bool(os.environ.get(EMULATED_ON_ENV)),
        "real_cpu_kind": os.environ.get(EMULATED_ON_ENV) or probe.kind, "probe_kind": probe.kind,
        "cpu_model": probe.cpu_model, "flags": [k for k, v in probe.flags.items() if v],
        "capability": probe.capability, "cores_available": probe.cores_available,
        "logical_cpus": probe.logical_cpus, "other_busy_cores": probe.other_busy_cores,
        "loadavg": probe.loadavg, "probe_gflops": probe.gflops, "probe_threads": probe.gflops_threads,
        "probe_cached": probe.cached, "bf16_ratio": probe.bf16_ratio, "bf16_fast": probe.bf16_fast,
        "training_precision": decision.value, "training_precision_reason": decision.reason,
    }


def print_machine(m: dict[str, Any]) -> None:
    rates = ", ".join(f"{k} {v:.1f}" for k, v in m["probe_gflops"].items())
    log("== machine (tunelab.hardware.probe)")
    log(f"kind:              {m['cpu_kind']}")
    log(f"cpu:               {m['cpu_model']}")
    log(f"flags:             {' '.join(m['flags']) or 'none of the listed'}")
    log(f"torch capability:  {m['capability']}")
    log(f"cores:             {m['cores_available']} available of {m['logical_cpus']}; other processes busy on "
        f"{m['other_busy_cores']:.1f}; load average {m['loadavg']:.2f}")
    log(f"probe GFLOP/s:     {rates} ({m['probe_threads']} thread(s), "
        f"{'cached' if m['probe_cached'] else 'measured now'}; bf16/fp32 = {m['bf16_ratio']:.2f})")
    log(f"training precision tunelab decides here: {m['training_precision']} ({m['training_precision_reason']})")
    if m["emulated"] and m["capability"] != "AVX2":
        log(f"warning: emulation did not take: torch reports {m['capability']}")
    if m["other_busy_cores"] >= 0.3 or m["loadavg"] >= 1.0:
        log("warning: the machine is not quiet; timings are noisy (see README: run with nothing else running)")


# ------------------------------------------------------------------ parts


def smoke_training(spec: str, data_file: Path, cfg: dict, workdir: Path, precision: str) -> dict[str, Any]:
    """All smoke children at once: the tiny model's figures mean nothing, only the plumbing."""
    plans = {m: train_throughput.plan(m, precision, slow_bf16=False, smoke=True) for m in cfg["methods"]}
    jobs = {f"{c.name}_{m}": (c, [*c.child_args(), "--method", m, "--spec", spec, "--data", str(data_file),
                                  "--steps", str(cfg["steps"]), "--out", str(workdir / "runs" / f"{c.name}_{m}")])
            for m in cfg["methods"] for c in plans[m]}
    with ThreadPoolExecutor(len(jobs)) as pool:
        # one thread each: several children share the cores, and spinning OpenMP threads would stall
        futures = {k: pool.submit(train_throughput.run_child, "train_throughput.py", a, threads=1,
                                  env=train_throughput.tunelab_env() if c.who == "tunelab" else None)
                   for k, (c, a) in jobs.items()}
        runs = {k: [{**f.result(), "round": 0, "contender": jobs[k][0].name}] for k, f in futures.items()}
    return {"plan": {m: [c.describe() for c in plans[m]] for m in cfg["methods"]}, "runs": runs,
            "summary": {m: train_throughput.summarise(runs, m, plans[m], precision) for m in cfg["methods"]}}


def utilisation(train: dict, peaks: dict, cfg: dict) -> dict[str, Any]:
    """MFU of tunelab's LoRA runs; the peaks are re-measured if tunelab used another thread count."""
    runs = train["runs"]["tunelab_lora"]
    used = runs[0]["threads"]
    if used and used != peaks["threads"]:
        log(f"tunelab trained with {used} thread(s), the peaks were measured with {peaks['threads']}: "
            f"measuring again with {used}")
        peaks = mfu.measure_peaks(cfg["peak_seconds"], threads=used)
        mfu.print_peaks(peaks, log=log)
    return mfu.report(runs, "lora", peaks, log=log)


def threads_load(spec: str, data_file: Path, cfg: dict, workdir: Path, skip: bool,
                 kind: str) -> dict[str, Any] | None:
    if skip:
        return None
    log(f"== threads under load on {kind} (tunelab LoRA, {cfg['load_steps']} steps × 8 examples: idle, "
        "with one busy process, with one busy process and threads forced to all cores)")
    load = threads_under_load.measure(spec, data_file, cfg["load_steps"], workdir, log=log)
    threads_under_load.print_summary(load, log=log)
    return load


# ------------------------------------------------------------------ headline


def headline(machine: dict, train: dict, util: dict, gen: dict, load: dict | None, mode: str,
             seconds: float) -> dict[str, Any]:
    lora, full = train["summary"]["lora"], train["summary"].get("full")
    figures: dict[str, Any] = {
        "cpu_kind": machine["cpu_kind"], "emulated": machine["emulated"], "bf16_fast": machine["bf16_fast"],
        "train_speedup_vs_plain_best": lora["speedup_vs_best_plain"],
        "train_speedup_vs_plain_as_written": lora["speedup_vs_as_written"],
        "train_tokens_per_s": lora["tunelab_tokens_per_s"],
        "train_supervised_tokens_per_s": lora["tunelab_supervised_tokens_per_s"],
        "train_precision": lora["tunelab_precision"],
        "plain_best_variant": lora["best_plain_label"],
        "plain_best_train_tokens_per_s": lora["best_plain_tokens_per_s"],
        "plain_as_written_train_tokens_per_s": lora["as_written_tokens_per_s"],
        "plain_as_written_timed_steps": lora["as_written_timed_steps"],
        "peak_rss_ratio_vs_plain_best": lora["peak_rss_ratio_vs_best_plain"],
        "train_peak_rss_mb": lora["tunelab_peak_rss_mb"],
        "plain_best_peak_rss_mb": lora["best_plain_peak_rss_mb"],
        "mfu": util["mfu"], "mfu_dtype": util["mfu_dtype"], "mfu_dense_head": util["mfu_dense_head"],
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
            "full_train_speedup_vs_plain_best": full["speedup_vs_best_plain"],
            "full_train_speedup_vs_plain_as_written": full["speedup_vs_as_written"],
            "full_train_tokens_per_s": full["tunelab_tokens_per_s"],
            "full_plain_best_variant": full["best_plain_label"],
            "full_plain_best_train_tokens_per_s": full["best_plain_tokens_per_s"],
            "full_peak_rss_ratio_vs_plain_best": full["peak_rss_ratio_vs_best_plain"],
        })
    if load is not None and not load.get("skipped"):
        figures.update({f"load_{k}": load[k] for k in (
            "idle_tokens_per_s", "auto_tokens_per_s", "forced_tokens_per_s", "idle_threads", "auto_threads",
            "forced_threads", "auto_kept", "forced_kept")})
    written = figures["train_speedup_vs_plain_as_written"]
    figures["targets_met"] = {
        "train_speedup_vs_plain_best": figures["train_speedup_vs_plain_best"] >= TARGETS["train_speedup_vs_plain_best"],
        "peak_rss_ratio_vs_plain_best": figures["peak_rss_ratio_vs_plain_best"] <= TARGETS["peak_rss_ratio_vs_plain_best"],
        # only where bf16 is not fast: elsewhere the recipe as written is one of the honest variants
        "train_speedup_vs_plain_as_written": (None if machine["bf16_fast"] or written is None
                                              else written >= TARGETS["train_speedup_vs_plain_as_written"]),
        "mfu": figures["mfu"] >= TARGETS["mfu"],
        "eval_speedup_vs_sequential": figures["eval_speedup_vs_sequential"] >= TARGETS["eval_speedup_vs_sequential"],
        "load_auto_kept": (figures["load_auto_kept"] >= TARGETS["load_auto_kept"]
                           if "load_auto_kept" in figures else None),
    }
    figures.update(mode=mode, seconds=round(seconds, 1))
    return figures


def print_targets(f: dict[str, Any]) -> None:
    def verdict(key: str) -> str:
        met = f["targets_met"][key]
        return "n/a" if met is None else "met" if met else "NOT met"

    written = f["train_speedup_vs_plain_as_written"]
    rows = [
        ("LoRA real tokens/s vs best plain variant", f"{f['train_speedup_vs_plain_best']:.2f}x "
         f"({f['train_tokens_per_s']:.1f} vs {f['plain_best_train_tokens_per_s']:.1f}, {f['plain_best_variant']})",
         ">= 2.5x", "train_speedup_vs_plain_best"),
        ("LoRA peak RSS vs best plain variant", f"{f['peak_rss_ratio_vs_plain_best']:.2f}x "
         f"({f['train_peak_rss_mb']:.0f} vs {f['plain_best_peak_rss_mb']:.0f} MiB)", "<= 1.0x",
         "peak_rss_ratio_vs_plain_best"),
        ("LoRA real tokens/s vs plain as written", "not run" if written is None else
         f"{written:.2f}x ({f['plain_as_written_train_tokens_per_s']:.1f} tok/s over "
         f"{f['plain_as_written_timed_steps']} timed step(s))",
         ">= 10x where bf16 is not fast", "train_speedup_vs_plain_as_written"),
        (f"MFU against the {f['mfu_dtype']} peak", f"{100 * f['mfu']:.1f}%", ">= 40%", "mfu"),
        ("batched vs one-at-a-time generation", f"{f['eval_speedup_vs_sequential']:.2f}x", ">= 5x",
         "eval_speedup_vs_sequential"),
        ("speed kept with one busy process (auto threads)",
         f"{100 * f['load_auto_kept']:.0f}%" if "load_auto_kept" in f else "not run", ">= 40%", "load_auto_kept"),
    ]
    log(f"== targets on {f['cpu_kind']} ({f['mode']})")
    for name, value, target, key in rows:
        log(f"  {name:50s} {value:60s} {target:30s} {verdict(key)}")


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="few steps and prompts")
    group.add_argument("--smoke", action="store_true", help="tiny random model, plumbing only")
    group.add_argument("--probe-only", action="store_true", help="print the machine block and stop")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="run as on an AVX2-only CPU (sets ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 "
                             "for this process and every child)")
    parser.add_argument("--skip-load", action="store_true", help="skip the threads-under-load part")
    parser.add_argument("--workdir", help="scratch folder, reused between runs (default: a temporary one)")
    parser.add_argument("--save", help="also write every figure (raw runs included) to this JSON file")
    parser.add_argument("--threads", type=int,
                        help="intra-op threads for every part but the load test (default: torch's choice in "
                             "this process, tunelab's and torch's own in the children); 1 keeps figures "
                             "stable when other jobs share the cores")
    parser.add_argument("--tunelab", action="append", default=[], metavar="KEY=VALUE",
                        help="extra tunelab training override (e.g. data.packing=true)")
    args = parser.parse_args(argv)
    if args.emulate_avx2 and not os.environ.get(EMULATED_ON_ENV):
        reexec_emulated(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = PROFILES[mode]
    started = time.perf_counter()
    ensure_src_on_path()
    from tunelab import hardware

    if args.threads:  # the matmul peaks and generation run in this process; children get it through run_child
        hardware.set_threads(args.threads)  # (sets $TUNELAB_THREADS too, so model loading keeps it)
    probe = hardware.probe()
    decision = hardware.training_precision("auto", "auto", probe)
    machine = machine_block(probe, decision)
    print_machine(machine)
    if args.probe_only:
        emit(machine)
        return machine
    peaks = mfu.measure_peaks(cfg["peak_seconds"])
    mfu.print_peaks(peaks, log=log)
    machine["peaks"] = {k: peaks[k] for k in ("fp32", "bf16", "threads")}
    slow_bf16 = probe.bf16_ratio < hardware.SLOW_RATIO
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        spec, data_file = train_throughput.prepare(workdir, args.smoke, cfg["steps"])
        log(f"== training throughput on {machine['cpu_kind']} ({mode}: {cfg['steps']} steps × 8 examples, "
            f"rounds {cfg['rounds']}; plain variants in {decision.value}, the precision tunelab decides here)")
        if args.smoke:
            train = smoke_training(spec, data_file, cfg, workdir, decision.value)
        else:
            train = train_throughput.measure(spec, data_file, cfg["methods"], cfg["steps"], cfg["rounds"],
                                             workdir, args.tunelab, decision.value, slow_bf16, log=log,
                                             threads=args.threads)
        train_throughput.print_table(train["summary"], machine["cpu_kind"], log=log)
        log(f"== model FLOPs utilisation (tunelab LoRA) on {machine['cpu_kind']}")
        util = utilisation(train, peaks, cfg)
        log(f"== evaluation generation on {machine['cpu_kind']} ({cfg['prompts']} prompts, greedy, 24 new tokens)")
        prompts = eval_generation.load_prompts(workdir / "data", cfg["prompts"])
        gen = eval_generation.measure(spec, prompts, 24, eval_generation_batch(), log=log)
        eval_generation.print_summary(gen, log=log)
        load = threads_load(spec, data_file, cfg, workdir, args.skip_load, machine["cpu_kind"])
    figures = headline(machine, train, util, gen, load, mode, time.perf_counter() - started)
    print_targets(figures)
    if args.save:
        from tunelab.io import write_json

        write_json(args.save, {"headline": figures, "machine": machine, "versions": machine_info(),
                               "probe": probe.to_dict(), "peaks": peaks, "train": train, "mfu": util,
                               "generation": gen, "threads_under_load": load,
                               "tunelab_overrides": args.tunelab, "threads": args.threads})
    emit(figures)
    return figures


def eval_generation_batch() -> int:
    """The batch size ``tunelab eval`` uses by default."""
    from tunelab.config import EvalConfig

    return EvalConfig().batch_size


if __name__ == "__main__":
    main()
