"""``--quantize`` through tunelab's own generation path: transformers fp32 against GGUF in llama.cpp.

    .venv/bin/python benchmarks/quantized_generation.py [--model SPEC|RUN] [--demo-run RUN]
        [--types q8_0,q4_0] [--threads 1,2] [--rows 48] [--tokens 32] [--json FILE]

What ``tunelab chat/serve/eval --quantize TYPE`` runs: ``tunelab.generation.generate`` over the same
prompts, greedy, up to ``--tokens`` new tokens, with

- **HF fp32**: transformers (``tunelab.models.load_model``, tunelab's batched greedy loop), batch 1
  (a chat turn) and batch 16 (an evaluation, the demo's batch size);
- each **GGUF type** in llama.cpp (``tunelab.models.gguf_runtime``: exported and checked once, cached),
  one row at a time, at each ``--threads`` count.

Prompts: the demo's held-out test split (``--demo-run RUN``: ``RUN/data``, ``icd10cm-norm_test``) with
tunelab's ``em`` metric, else a fixed list of medical questions. Printed per row: decode tokens/s
(completion tokens over wall time, prompt processing included), the ratio to HF fp32 at batch 1 and at
batch 16, how many answers equal HF fp32's, and the exact match where there are references. Time it
with nothing else running: on 2 cores a busy neighbour changes these figures several-fold.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from common import BUILTIN, cpu_kind, ensure_src_on_path, machine_info

QUESTIONS = ["What are the symptoms of appendicitis?", "How is type 2 diabetes treated?",
             "What does a high CRP mean?", "Normalise this diagnosis: acute bronchitis",
             "What is the ICD-10 code for essential hypertension?", "发烧三天，咳嗽，应该怎么办？",
             "Explain what an MRI scan does.", "What causes iron deficiency anaemia?"]


def prompts_and_refs(demo_run: str | None, rows: int) -> tuple[list, list | None, str]:
    if demo_run:
        from tunelab.eval.run import load_test_set

        test = load_test_set("icd10cm-norm_test", str(Path(demo_run) / "data"), rows, "test")
        return test.prompts, test.references, f"demo test split ({len(test.prompts)} rows)"
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    return (chats * (rows // len(chats) + 1))[:rows], None, f"{rows} medical questions"


def timed(model, tokenizer, prompts, batch_size: int, tokens: int) -> tuple[list, float]:
    from tunelab.generation import GenerationSettings, generate

    started = time.perf_counter()
    results = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=tokens),
                       batch_size=batch_size, progress=False)
    return results, time.perf_counter() - started


def row(label: str, results, seconds: float, reference, refs) -> dict:
    from tunelab.eval.metrics import score

    tokens = sum(r.completion_tokens for r in results)
    out = {"format": label, "seconds": round(seconds, 2), "tokens": tokens, "tok_s": round(tokens / seconds, 1),
           "same_as_fp32": None if reference is None else
           sum(a.text == b.text for a, b in zip(results, reference))}
    if refs is not None:
        out["em"] = round(score([r.text for r in results], refs, ["em"])["em"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model spec or run folder (default: --demo-run, else the builtin model)")
    parser.add_argument("--demo-run", help="a text demo run folder: its test split, with exact match")
    parser.add_argument("--types", default="q8_0,q4_0")
    parser.add_argument("--threads", default="1,2", help="llama.cpp thread counts to time")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    ensure_src_on_path()
    from tunelab.hardware import probe
    from tunelab.models import load_model
    from tunelab.models.gguf_runtime import load_quantized

    spec = args.model or args.demo_run or BUILTIN
    info = {**machine_info(), "kind": cpu_kind(probe())}
    print(f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, kind {info['kind']}")
    prompts, refs, what = prompts_and_refs(args.demo_run, args.rows)
    print(f"model: {spec}; prompts: {what}; greedy, up to {args.tokens} new tokens")
    model, tokenizer = load_model(spec)
    rows = []
    reference = None
    for batch in (1, 16):
        results, seconds = timed(model, tokenizer, prompts, batch, args.tokens)
        reference = reference or results
        rows.append(row(f"HF fp32, batch {batch}", results, seconds, reference, refs))
        print(rows[-1], flush=True)
    del model
    gc.collect()
    for quant in args.types.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            model, tokenizer = load_quantized(spec, quant, threads, log=lambda line: print(line, file=sys.stderr))
            results, seconds = timed(model, tokenizer, prompts, 16, args.tokens)
            rows.append({**row(f"GGUF {quant} in llama.cpp, {threads} thread(s)", results, seconds, reference, refs),
                         "check": model.quality})
            model.close()
            print(rows[-1], flush=True)
    base1, base16 = rows[0]["tok_s"], rows[1]["tok_s"]
    print(f"\n| format | tok/s | vs HF batch 1 | vs HF batch 16 | answers = fp32 |{' EM |' if refs else ''}")
    print(f"|---|---|---|---|---|{'---|' if refs else ''}")
    for r in rows:
        em = f" {r['em']:.3f} |" if refs else ""
        print(f"| {r['format']} | {r['tok_s']} | {r['tok_s'] / base1:.2f}x | {r['tok_s'] / base16:.2f}x | "
              f"{r['same_as_fp32']}/{len(prompts)} |{em}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "model": spec, "prompts": what, "rows": rows},
                                              ensure_ascii=False, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
