"""Evaluation generation: tunelab's batched ``generate`` vs a one-prompt-at-a-time loop.

    python benchmarks/eval_generation.py [--prompts 128] [--batch-size 16] [--max-new-tokens 24]

Both sides answer the same ICD-10-CM term-normalisation prompts (the held-out test
split, as ``tunelab eval`` would) with greedy decoding and the same token budget. The
sequential side is what an evaluation script usually does: ``apply_chat_template``
then ``model.generate`` per prompt. Tokens/s counts generated tokens (up to and
including the end-of-sequence token, as tunelab's ``completion_tokens`` does). The
batched side runs before and after the loop and its mean time is used, so slow
drifts in background load hit both sides alike. Outputs should be identical; the
number that match is reported (bf16/fp32 rounding under padding can flip a token).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BUILTIN, build_data, emit, ensure_src_on_path, make_tiny_model, read_jsonl  # noqa: E402


def load_prompts(data_dir: Path, count: int) -> list[list[dict[str, str]]]:
    rows = read_jsonl(data_dir / "test.jsonl", limit=count)
    if len(rows) < count:
        rows += read_jsonl(data_dir / "train.jsonl", limit=count - len(rows))
    return [[{"role": "user", "content": r["instruction"]}] for r in rows]


def sequential(model, tokenizer, prompts: list, max_new_tokens: int) -> tuple[list[str], int]:
    """One ``model.generate`` call per prompt; returns (answers, generated tokens)."""
    import torch

    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    answers, tokens = [], 0
    for messages in prompts:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        tokens += end
        answers.append(tokenizer.decode(new[:end], skip_special_tokens=True))
    return answers, tokens


def batched(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int) -> tuple[list[str], int]:
    from tunelab.generation import from_preset, generate

    settings = from_preset("greedy", max_new_tokens=max_new_tokens)
    results = generate(model, tokenizer, prompts, settings, batch_size=batch_size, progress=False)
    return [r.text for r in results], sum(r.completion_tokens for r in results)


def measure(spec: str, prompts: list, max_new_tokens: int, batch_size: int, log=print) -> dict[str, Any]:
    ensure_src_on_path()
    from tunelab.models import load_model

    model, tokenizer = load_model(spec)
    batched(model, tokenizer, prompts[:2], 4, batch_size)  # warm-up, both code paths
    sequential(model, tokenizer, prompts[:1], 4)
    times = []
    t0 = time.perf_counter()
    ours, our_tokens = batched(model, tokenizer, prompts, max_new_tokens, batch_size)
    times.append(time.perf_counter() - t0)
    log(f"  batched (batch {batch_size}): {our_tokens} tokens in {times[-1]:.1f} s")
    t0 = time.perf_counter()
    theirs, their_tokens = sequential(model, tokenizer, prompts, max_new_tokens)
    seq_seconds = time.perf_counter() - t0
    log(f"  one at a time: {their_tokens} tokens in {seq_seconds:.1f} s")
    t0 = time.perf_counter()
    again, _ = batched(model, tokenizer, prompts, max_new_tokens, batch_size)
    times.append(time.perf_counter() - t0)
    log(f"  batched again: {times[-1]:.1f} s")
    batched_seconds = sum(times) / len(times)
    same = sum(a.strip() == b.strip() for a, b in zip(ours, theirs))
    return {
        "prompts": len(prompts), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "batched_tokens": our_tokens, "sequential_tokens": their_tokens,
        "batched_seconds": batched_seconds, "sequential_seconds": seq_seconds,
        "batched_tokens_per_s": our_tokens / batched_seconds,
        "sequential_tokens_per_s": their_tokens / seq_seconds,
        "speedup": (our_tokens / batched_seconds) / (their_tokens / seq_seconds),
        "outputs_matching": same, "batched_runs_matching": sum(a == b for a, b in zip(ours, again)),
        "example": {"prompt": prompts[0][0]["content"].splitlines()[-2], "batched": ours[0], "sequential": theirs[0]},
    }


def print_summary(r: dict[str, Any], log=print) -> None:
    log(f"generation: batched {r['batched_tokens_per_s']:.1f} tok/s vs one at a time "
        f"{r['sequential_tokens_per_s']:.1f} tok/s = {r['speedup']:.2f}x; "
        f"{r['outputs_matching']}/{r['prompts']} outputs identical")


def main(argv: list[str] | None = None) -> None:
    from tunelab.config import EvalConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=EvalConfig().batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--smoke", action="store_true", help="tiny random model (plumbing only)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tunelab-gen-") as tmp:
        data_dir = build_data(Path(tmp))
        spec = str(make_tiny_model(Path(tmp) / "tiny-model", data_dir)) if args.smoke else BUILTIN
        result = measure(spec, load_prompts(data_dir, args.prompts), args.max_new_tokens, args.batch_size)
    print_summary(result)
    emit(result)


if __name__ == "__main__":
    ensure_src_on_path()
    main()
