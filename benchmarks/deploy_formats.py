"""Deployment formats of one model side by side: size on disk, peak RAM, decode speed, agreement.

    .venv/bin/python benchmarks/deploy_formats.py [--model builtin:smollm2-135m-instruct]
        [--types f16,q8_0,q4_0] [--tokens 64] [--out-dir /tmp/deploy-bench] [--json FILE]

HF fp32 runs in this process (transformers greedy, KV cache, batch 1); each GGUF type is
exported by tunelab and run in real llama.cpp (node-llama-cpp, 1 thread), which reports
its own peak RSS. Quality is the top-1 agreement with HF fp32 over the six probe prompts
(teacher-forced on fp32's greedy answers) and how many greedy answers are identical.
Decode speed is greedy tokens over wall time, prompt processing included.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import BUILTIN, ensure_src_on_path, peak_rss_mb

ensure_src_on_path()


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUILTIN)
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out-dir", default="/tmp/tunelab-deploy-bench")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    import torch

    from tunelab import hardware
    from tunelab.export import llamacpp
    from tunelab.export.check import agreement_from_tokens, fingerprint, stop_ids
    from tunelab.export.gguf_export import export_gguf
    from tunelab.export.verify import Source, merged
    from tunelab.models import load_model
    from tunelab.models.loading import resolve_spec

    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    started = time.perf_counter()
    ref = fingerprint(model, tokenizer, args.tokens)
    seconds = time.perf_counter() - started
    generated = sum(len(a) for a in ref.answers)
    rows = [{"format": "HF fp32 (transformers)", "bytes": _folder_bytes(Path(resolve_spec(args.model).path)),
             "peak_rss_mb": round(peak_rss_mb()), "decode_tok_s": round(generated / seconds, 1),
             "top1": 1.0, "identical": f"{len(ref.answers)}/{len(ref.answers)}"}]
    stops = stop_ids(model, tokenizer)
    texts = [tokenizer.decode(p) for p in ref.prompts]
    source = Source(merged(model, args.model), tokenizer, None, [])  # one load serves every export
    out_dir = Path(args.out_dir)
    for ftype in args.types.split(","):
        path = out_dir / f"model.{ftype}.gguf"
        export_gguf(args.model, path, ftype, overwrite=True, check=False, source=source, log=lambda _: None)
        result = llamacpp.run_probes(path, ref.prompts, ref.answers, stops, texts, args.tokens)
        agree = agreement_from_tokens(ref, result["forced_top1"], result["greedy"], ftype, stops=stops,
                                      eog=result["eog"])
        tokens = sum(len(g) for g in result["greedy"])
        rows.append({"format": f"GGUF {ftype} (llama.cpp)", "bytes": path.stat().st_size,
                     "peak_rss_mb": round(result["max_rss_bytes"] / 2**20),
                     "decode_tok_s": round(tokens / max(result["greedy_seconds"], 1e-9), 1),
                     "top1": round(agree.top1, 4), "identical": f"{agree.identical_answers}/{agree.prompts}"})
    probe = hardware.probe()
    print(f"CPU: {probe.cpu_model} ({probe.kind}), {probe.cores_available} cores, "
          f"{probe.other_busy_cores:.1f} busy with other work at the end; 1 thread each; llama.cpp flash attention "
          f"{'on' if llamacpp.FLASH_ATTENTION is True else 'off'}")
    print("| format | size on disk (MB) | peak RAM (MB) | decode tok/s | top-1 agreement | identical answers |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['bytes'] / 1e6:.0f} | {r['peak_rss_mb']} | {r['decode_tok_s']} | "
              f"{100 * r['top1']:.1f}% | {r['identical']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": probe.to_dict(), "rows": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
