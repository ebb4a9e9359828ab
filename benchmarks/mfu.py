"""Model FLOPs utilisation of tunelab LoRA training against this machine's measured matmul peak.

    python benchmarks/mfu.py [--steps 11] [--method lora]

The peak is measured here, in the same process, with the thread count the training
run used: for each dtype, ``PEAK_SHAPES`` (SmolLM2-shaped GEMMs of a batch of 8 rows
and a 2048² square) are timed in several passes over about ``PEAK_SECONDS`` seconds,
and the best rate of any single call is kept. A single noisy reading can only lower
a shape's best, never raise it, so it cannot inflate MFU. A shape whose one call
would take longer than its share of the budget (bf16 2048² where bf16 is slow) is
skipped and said so.

The headline ``mfu`` is against the peak of the dtype the run actually trained in
(fp32 when tunelab trained in fp32, bf16 under bf16 autocast); ``mfu_bf16`` and
``mfu_fp32`` are against each peak.

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
from common import emit, run_child  # noqa: E402


PEAK_SHAPES = ((800, 576, 576), (800, 576, 1536), (800, 1536, 576), (2048, 2048, 2048))
"""(m, k, n) GEMMs: SmolLM2's attention/MLP projections on 8 rows × ~100 tokens, and 2048²."""
PEAK_SECONDS = 3.0
PEAK_PASSES = 3


def measure_peaks(seconds: float = PEAK_SECONDS, threads: int | None = None, dtypes=("fp32", "bf16"),
                  passes: int = PEAK_PASSES) -> dict[str, Any]:
    """Best matmul GFLOP/s per dtype over ``PEAK_SHAPES``, about ``seconds`` per dtype, ``threads`` threads.

    Returns ``{"fp32": GFLOP/s, "bf16": GFLOP/s, "threads": n, "shapes": {dtype: {shape: best or None}}}``.
    """
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "seconds_per_dtype": seconds, "shapes": {}}
    try:
        for name in dtypes:
            result["shapes"][name] = best = _best_rates(name, seconds, passes)
            result[name] = max(v for v in best.values() if v)
    finally:
        torch.set_num_threads(before)
    return result


def _best_rates(name: str, seconds: float, passes: int) -> dict[str, float | None]:
    """Best GFLOP/s of one call per shape; shapes visited in ``passes`` rounds so no moment counts alone."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]
    gen = torch.Generator().manual_seed(0)
    share, too_slow = seconds / (passes * len(PEAK_SHAPES)), seconds / 4
    tensors: dict[str, tuple] = {}
    best: dict[str, float | None] = {}
    with torch.inference_mode():
        for _ in range(passes):
            for m, k, n in PEAK_SHAPES:
                key, flop = f"{m}x{k}x{n}", 2 * m * k * n
                known = max((v for v in best.values() if v), default=0.0)
                if known and flop / (known * 1e9) > too_slow:
                    best.setdefault(key, None)  # one call would take over a quarter of the budget
                    continue
                if key not in tensors:
                    a, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((m, k), (k, n)))
                    tensors[key] = (a, b, torch.empty(m, n, dtype=dtype))
                    torch.matmul(a, b, out=tensors[key][2])  # warm-up: kernel selection, page faults
                a, b, out = tensors[key]
                deadline = time.perf_counter() + share
                while True:  # at least one timed call, then until this shape's share is spent
                    t0 = time.perf_counter()
                    torch.matmul(a, b, out=out)
                    best[key] = max(best.get(key) or 0.0, flop / (time.perf_counter() - t0) / 1e9)
                    if time.perf_counter() > deadline:
                        break
    return best


def step_flops(run: dict[str, Any], method: str, dense_head: bool = False) -> float:
    """Useful FLOPs of the timed steps of one training run (formula in the module docstring)."""
    tokens, supervised = run["real_tokens"], run["supervised_tokens"]
    head_tokens = tokens if dense_head else supervised
    attention = 4 * run["heads"] * run["head_dim"] * run["layers"] * run["attention_pairs"]
    linear = run["params_body_matmul"] * tokens + run["params_head"] * head_tokens
    if method == "full":
        return 6 * linear + 3 * attention
    return 4 * linear + 6 * run["params_lora"] * tokens + 3 * attention


def utilisation(runs: list[dict], method: str, peaks: dict[str, Any]) -> dict[str, Any]:
    """Median achieved model FLOP/s over ``runs`` and its share of each measured peak (GFLOP/s).

    ``mfu`` is against the peak of the dtype the runs trained in (``precision`` of the run).
    """
    achieved = statistics.median(step_flops(r, method) / r["seconds"] for r in runs) / 1e9
    dense = statistics.median(step_flops(r, method, dense_head=True) / r["seconds"] for r in runs) / 1e9
    dtype = runs[0].get("precision", "bf16")
    return {
        "model_gflops_per_s": achieved, "mfu_dtype": dtype,
        "mfu": achieved / peaks[dtype], "mfu_dense_head": dense / peaks[dtype],
        "mfu_bf16": achieved / peaks["bf16"], "mfu_fp32": achieved / peaks["fp32"],
        "mfu_bf16_dense_head": dense / peaks["bf16"], "mfu_fp32_dense_head": dense / peaks["fp32"],
        "flops_per_real_token": statistics.median(step_flops(r, method) / r["real_tokens"] for r in runs),
    }


def print_peaks(peaks: dict[str, Any], log=print) -> None:
    skipped = [f"{d} {s}" for d in ("fp32", "bf16") for s, v in peaks["shapes"].get(d, {}).items() if v is None]
    log(f"matmul peak (best single call over {', '.join(peaks['shapes'].get('fp32', {}))}; "
        f"~{peaks['seconds_per_dtype']:.1f} s per dtype, {peaks['threads']} thread(s)): "
        f"fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s"
        + (f" (skipped, one call too slow: {', '.join(skipped)})" if skipped else ""))


def report(runs: list[dict], method: str, peaks: dict[str, Any], log=print) -> dict[str, Any]:
    figures = utilisation(runs, method, peaks)
    dtype = figures["mfu_dtype"]
    log(f"tunelab {method} trained in {dtype} with {runs[0].get('threads')} thread(s): "
        f"{figures['model_gflops_per_s']:.1f} model GFLOP/s = MFU {100 * figures['mfu']:.1f}% of the {dtype} peak "
        f"({peaks[dtype]:.1f} GFLOP/s); head charged at every token: {100 * figures['mfu_dense_head']:.1f}%")
    log(f"  against each peak: {100 * figures['mfu_fp32']:.1f}% of fp32, {100 * figures['mfu_bf16']:.1f}% of bf16")
    return {**figures, "peak_bf16_gflops": peaks["bf16"], "peak_fp32_gflops": peaks["fp32"],
            "peak_threads": peaks["threads"], "peak_shapes": peaks["shapes"]}


def main(argv: list[str] | None = None) -> None:
    import tempfile

    from train_throughput import prepare, tunelab_env

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=11, help="optimizer steps (the first is warm-up)")
    parser.add_argument("--method", default="lora", choices=("lora", "full"))
    parser.add_argument("--smoke", action="store_true", help="tiny random model (plumbing only)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tunelab-mfu-") as tmp:
        spec, data_file = prepare(Path(tmp), args.smoke, args.steps)
        run = run_child("train_throughput.py", ["--child", "tunelab", "--method", args.method, "--spec", spec,
                                                "--data", str(data_file), "--steps", str(args.steps),
                                                "--out", str(Path(tmp) / "run")], env=tunelab_env())
    peaks = measure_peaks(0.5 if args.smoke else PEAK_SECONDS, threads=run["threads"])
    print_peaks(peaks)
    emit(report([run], args.method, peaks))


if __name__ == "__main__":
    main()
