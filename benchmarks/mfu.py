"""Model FLOPs utilisation of tunelab LoRA training against this machine's measured matmul peak.

    python benchmarks/mfu.py [--steps 11] [--method lora]

The peak is measured here, in the same script: the best of several square GEMMs
(2048², ``torch.get_num_threads()`` threads) in bf16 and in fp32.

FLOPs counted (only real tokens; one multiply-add = 2 FLOPs). With T real tokens,
S supervised targets, N_body the matmul weights of the decoder blocks, N_head the
output head, N_lora the LoRA weights, A = Σ n(n+1)/2 causal query-key pairs over the
examples, L layers and d_attn = heads × head_dim:

    attention forward   F_att = 4 · d_attn · L · A                (QKᵀ and AV)
    forward             2·N_body·T + 2·N_head·S + 2·N_lora·T + F_att
    LoRA backward       activation gradients through every weight (2·N_body·T + 2·N_head·S
                        + 2·N_lora·T + 2·F_att) plus weight gradients of LoRA only
                        (2·N_lora·T); frozen weights need no weight gradient
    => LoRA step        4·(N_body·T + N_head·S) + 6·N_lora·T + 3·F_att
    => full step        6·(N_body·T + N_head·S) + 3·F_att

The head counts at supervised positions only: logits elsewhere are not needed for the
loss, so computing them is waste, not useful work (``mfu_*``). The usual convention
that charges the head at every token is reported too (``mfu_*_dense_head``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_info, run_child  # noqa: E402


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 7, budget_s: float = 20.0) -> float:
    """Best achieved FLOP/s of an ``n × n`` by ``n × n`` matmul in ``dtype_name`` (bf16 or fp32)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: kernel selection, page faults
    best, started = float("inf"), time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - started > budget_s:
            break
    return 2 * n ** 3 / best


def step_flops(run: dict[str, Any], method: str, dense_head: bool = False) -> float:
    """Useful FLOPs of the timed steps of one training run (formula in the module docstring)."""
    tokens, supervised = run["real_tokens"], run["supervised_tokens"]
    head_tokens = tokens if dense_head else supervised
    attention = 4 * run["heads"] * run["head_dim"] * run["layers"] * run["attention_pairs"]
    linear = run["params_body_matmul"] * tokens + run["params_head"] * head_tokens
    if method == "full":
        return 6 * linear + 3 * attention
    return 4 * linear + 6 * run["params_lora"] * tokens + 3 * attention


def utilisation(runs: list[dict], method: str, peaks: dict[str, float]) -> dict[str, Any]:
    """Median achieved model FLOP/s over ``runs`` and its share of each measured peak."""
    achieved = statistics.median(step_flops(r, method) / r["seconds"] for r in runs)
    dense = statistics.median(step_flops(r, method, dense_head=True) / r["seconds"] for r in runs)
    return {
        "model_gflops_per_s": achieved / 1e9,
        "mfu_bf16": achieved / peaks["bf16"], "mfu_fp32": achieved / peaks["fp32"],
        "mfu_bf16_dense_head": dense / peaks["bf16"], "mfu_fp32_dense_head": dense / peaks["fp32"],
        "flops_per_real_token": statistics.median(step_flops(r, method) / r["real_tokens"] for r in runs),
    }


def measure_peaks(quick: bool = False) -> dict[str, float]:
    repeats = 3 if quick else 7
    return {name: matmul_peak(name, repeats=repeats) for name in ("bf16", "fp32")}


def report(runs: list[dict], method: str, peaks: dict[str, float], log=print) -> dict[str, Any]:
    figures = utilisation(runs, method, peaks)
    log(f"matmul peak (2048² GEMM, {machine_info()['torch_threads']} threads): "
        f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s")
    log(f"tunelab {method}: {figures['model_gflops_per_s']:.1f} model GFLOP/s = "
        f"{100 * figures['mfu_bf16']:.1f}% of bf16 peak, {100 * figures['mfu_fp32']:.1f}% of fp32 peak "
        f"(head charged at every token: {100 * figures['mfu_bf16_dense_head']:.1f}% of bf16)")
    return {**figures, "peak_bf16_gflops": peaks["bf16"] / 1e9, "peak_fp32_gflops": peaks["fp32"] / 1e9}


def main(argv: list[str] | None = None) -> None:
    import tempfile

    from train_throughput import prepare

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=11, help="optimizer steps (the first is warm-up)")
    parser.add_argument("--method", default="lora", choices=("lora", "full"))
    parser.add_argument("--smoke", action="store_true", help="tiny random model (plumbing only)")
    args = parser.parse_args(argv)
    peaks = measure_peaks(quick=args.smoke)
    with tempfile.TemporaryDirectory(prefix="tunelab-mfu-") as tmp:
        spec, data_file = prepare(Path(tmp), args.smoke, args.steps)
        run = run_child("train_throughput.py", ["--child", "tunelab", "--method", args.method, "--spec", spec,
                                                "--data", str(data_file), "--steps", str(args.steps),
                                                "--out", str(Path(tmp) / "run")])
    emit(report([run], args.method, peaks))


if __name__ == "__main__":
    main()
