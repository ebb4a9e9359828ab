"""Evaluation generation: tunelab's batched ``generate`` vs a one-prompt-at-a-time loop.

    python benchmarks/eval_generation.py [--prompts 104] [--batch-size 16] [--max-new-tokens 24]
                                         [--rounds 5] [--threads N] [--no-transformers-batched] [--smoke]

All sides answer the same ICD-10-CM term-normalisation prompts (the held-out test
split, as ``tunelab eval`` would) with greedy decoding and the same token budget:

- *tunelab*: ``tunelab.generation.generate`` (its greedy loop, ``tunelab.greedy``);
- *transformers batched*: the same batches through one ``model.generate`` call each
  (``fast_greedy=False``: tunelab before its greedy loop);
- *sequential*: what an evaluation script usually does, ``apply_chat_template`` then
  ``model.generate`` per prompt.

Timing alternates so that background load hits all sides alike: in each of ``--rounds``
rounds both batched sides answer all prompts (one ``generate`` call, as ``tunelab eval``
makes) and the sequential side answers every rounds-th prompt; the order of the sides
reverses from one round to the next. Each side's tokens/s is its tokens over its time,
summed over rounds; the speedup is the median over rounds of the same round's ratio,
so a burst of load on another process that hits one round does not decide it (on 2
shared cores one such burst slowed a 2-thread round 30x). Tokens count up to and including the end-of-sequence token (as
tunelab's ``completion_tokens``). Outputs should be identical: the number of tunelab's
answers equal to the sequential ones is reported.

Threads: what ``tunelab.hardware`` chooses when the model loads (the cores other processes
leave free) unless ``--threads N`` is given; ``N`` is then set for this process only. Every
side runs with the same count.
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def batched(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int,
            fast_greedy: bool = True) -> tuple[list[str], int]:
    from tunelab.generation import from_preset, generate

    settings = from_preset("greedy", max_new_tokens=max_new_tokens)
    results = generate(model, tokenizer, prompts, settings, batch_size=batch_size, progress=False,
                       fast_greedy=fast_greedy)
    return [r.text for r in results], sum(r.completion_tokens for r in results)


def cpu_kind() -> str:
    """The CPU's vector extensions and what torch dispatches to (differs under emulation)."""
    import torch

    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "")
    except OSError:
        pass
    words = set(flags.split())
    kind = ("AVX-512 with avx512_bf16" if "avx512_bf16" in words else "AVX-512" if "avx512f" in words
            else "AVX2" if "avx2" in words else "unknown")
    forced = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)]
    dispatch = torch.backends.cpu.get_cpu_capability()
    return f"{kind} CPU, torch dispatch {dispatch}" + (f" ({' '.join(forced)})" if forced else "")


def measure(spec: str, prompts: list, max_new_tokens: int, batch_size: int, log=print,
            transformers_batched: bool = True, rounds: int = 5) -> dict[str, Any]:
    ensure_src_on_path()
    import torch
    from tunelab.models import load_model

    model, tokenizer = load_model(spec)
    sides = {"tunelab": lambda group: batched(model, tokenizer, group, max_new_tokens, batch_size)}
    if transformers_batched:
        sides["transformers_batched"] = lambda group: batched(model, tokenizer, group, max_new_tokens,
                                                              batch_size, fast_greedy=False)
    sides["sequential"] = lambda group: sequential(model, tokenizer, group, max_new_tokens)
    for side in sides.values():  # warm-up
        side(prompts[:2])
    seconds, tokens = dict.fromkeys(sides, 0.0), dict.fromkeys(sides, 0)
    answers: dict[str, list[str]] = {name: [""] * len(prompts) for name in sides}
    runs_matching, round_rates = [], []
    load_before = os.getloadavg()[0]
    for number in range(rounds):
        names = list(sides) if number % 2 == 0 else list(sides)[::-1]
        round_rates.append({})
        for name in names:
            # The batched sides answer every prompt each round; one-at-a-time answers every
            # rounds-th prompt, so its time is spread over the same window.
            indices = range(len(prompts)) if name != "sequential" else range(number, len(prompts), rounds)
            started = time.perf_counter()
            texts, count = sides[name]([prompts[i] for i in indices])
            elapsed = time.perf_counter() - started
            seconds[name], tokens[name] = seconds[name] + elapsed, tokens[name] + count
            round_rates[-1][name] = count / elapsed
            if name == "tunelab" and number:
                runs_matching.append(sum(a == b for a, b in zip(texts, answers[name])))
            for index, text in zip(indices, texts):
                if name == "sequential" or not number:
                    answers[name][index] = text
        log(f"  round {number + 1}/{rounds}: " + ", ".join(f"{n} {round_rates[-1][n]:.1f} tok/s" for n in sides))
    rate = {name: tokens[name] / seconds[name] for name in sides}
    speedup = {name: statistics.median(r[name] / r["sequential"] for r in round_rates) for name in sides}
    same = {name: sum(a.strip() == b.strip() for a, b in zip(answers[name], answers["sequential"]))
            for name in sides}
    result = {
        "prompts": len(prompts), "batch_size": batch_size, "max_new_tokens": max_new_tokens, "rounds": rounds,
        "cpu_kind": cpu_kind(), "torch_threads": torch.get_num_threads(), "dtype": str(model.dtype),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "batched_tokens": tokens["tunelab"], "sequential_tokens": tokens["sequential"],
        "batched_seconds": seconds["tunelab"], "sequential_seconds": seconds["sequential"],
        "batched_tokens_per_s": rate["tunelab"], "sequential_tokens_per_s": rate["sequential"],
        "speedup": speedup["tunelab"], "speedup_of_totals": rate["tunelab"] / rate["sequential"],
        "speedup_per_round": [r["tunelab"] / r["sequential"] for r in round_rates],
        "outputs_matching": same["tunelab"], "batched_runs_matching": runs_matching,
        "example": {"prompt": prompts[0][0]["content"].splitlines()[-2], "batched": answers["tunelab"][0],
                    "sequential": answers["sequential"][0]},
    }
    if transformers_batched:
        result.update({
            "transformers_batched_seconds": seconds["transformers_batched"],
            "transformers_batched_tokens_per_s": rate["transformers_batched"],
            "transformers_batched_speedup": speedup["transformers_batched"],
            "transformers_batched_speedup_per_round": [r["transformers_batched"] / r["sequential"]
                                                       for r in round_rates],
            "transformers_batched_outputs_matching": same["transformers_batched"],
        })
    return result


def print_summary(r: dict[str, Any], log=print) -> None:
    log(f"generation ({r['cpu_kind']}, {r['torch_threads']} threads): batched {r['batched_tokens_per_s']:.1f} "
        f"tok/s vs one at a time {r['sequential_tokens_per_s']:.1f} tok/s; speedup {r['speedup']:.2f}x "
        f"(median of {r['rounds']} rounds; {r['speedup_of_totals']:.2f}x from the totals); "
        f"{r['outputs_matching']}/{r['prompts']} outputs identical")
    if "transformers_batched_tokens_per_s" in r:
        log(f"  same batches through model.generate (before tunelab's greedy loop): "
            f"{r['transformers_batched_tokens_per_s']:.1f} tok/s = {r['transformers_batched_speedup']:.2f}x; "
            f"{r['transformers_batched_outputs_matching']}/{r['prompts']} identical")


def main(argv: list[str] | None = None) -> None:
    from tunelab.config import EvalConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=EvalConfig().batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for this process (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (see the module docstring)")
    parser.add_argument("--no-transformers-batched", action="store_true",
                        help="skip the model.generate batched side (tunelab before its greedy loop)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model (plumbing only)")
    args = parser.parse_args(argv)
    if args.threads:
        from tunelab.hardware import set_threads

        set_threads(args.threads)  # this process only; load_model would otherwise choose from free cores
    with tempfile.TemporaryDirectory(prefix="tunelab-gen-") as tmp:
        data_dir = build_data(Path(tmp))
        spec = str(make_tiny_model(Path(tmp) / "tiny-model", data_dir)) if args.smoke else BUILTIN
        result = measure(spec, load_prompts(data_dir, args.prompts), args.max_new_tokens, args.batch_size,
                         transformers_batched=not args.no_transformers_batched, rounds=args.rounds)
    print_summary(result)
    emit(result)


if __name__ == "__main__":
    ensure_src_on_path()
    main()
