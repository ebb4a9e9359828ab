"""Deployment formats side by side: size on disk, peak RAM, decode speed, agreement, perplexity, demo EM.

    .venv/bin/python benchmarks/deploy_formats.py --demo-run RUN --json FILE     # builtin model, then RUN
    .venv/bin/python benchmarks/deploy_formats.py [--model SPEC|RUN ...] [--demo-run RUN] [--em-base]
        [--types f16,q8_0,q4_0] [--tokens 64] [--ppl-tokens 1024] [--em-rows N] [--bf16 auto|yes|no]
        [--out-dir DIR] [--json FILE]

``--model`` (repeatable; default the builtin model, then ``--demo-run``) is a model spec or a run
folder. A run folder's HF rows use its merged export (``tunelab export RUN --out``); its GGUF files are
written from base + LoRA by the GGUF export (``tunelab export RUN --gguf``). Every format then runs in a
process of its own, one thread, one after the other, while this script waits:

- **HF fp32** (transformers), **HF bf16** only where ``tunelab.hardware`` measures bf16 matmuls fast,
  **torchao int8** weight-only (quantized as the fp32 weights load), each in a fresh Python
  process; each **GGUF** type in real llama.cpp (node-llama-cpp, flash attention off as in the check).
- size on disk: the weight files, or the .gguf file.
- peak RAM: the process's peak RSS once the model is loaded and has answered the probes (the serving
  footprint); the perplexity pass's full-vocabulary logits and the EM pass come after and are not in it.
- decode tok/s: greedy tokens over wall time, six export-check probes of up to ``--tokens`` each,
  batch 1, prompt processing included.
- top-1 agreement: fed HF fp32's greedy probe answers (teacher forcing), how often the format's most
  likely token is fp32's (the export check's figure); identical: greedy answers equal to fp32's.
- perplexity: exp(mean NLL) of the same ``--ppl-tokens`` token ids for every format, in windows of
  ``--window`` (no BOS), of a fixed held-out text: Python's own language reference as the interpreter
  ships it (``pydoc_data.topics``, topics in sorted order), which no tunelab run trains on; the ids'
  digest is printed. llama.cpp's log-probabilities come from its full next-token distribution at every
  position; text top-1 is how often the format's argmax there is fp32's.
- demo EM (``--demo-run RUN``; for run folders, and base models too with ``--em-base``): tunelab's
  ``em`` metric on the demo's held-out test split (``RUN/data``, ``icd10cm-norm_test``; ``--em-rows N``
  takes the first N), greedy, up to 32 new tokens as the demo evaluates. HF rows use tunelab's
  ``generate`` (batches of 16, as the demo); GGUF rows use llama.cpp's greedy decoding (batch 1) of the
  prompt rendered with the chat template the GGUF carries, tokenized by llama.cpp. Beside it: how many
  answers equal fp32's, and a note of how many probes and EM prompts llama.cpp tokenizes differently.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from common import BUILTIN, cpu_kind, emit, ensure_src_on_path, own_peak_rss_mb, run_child

ensure_src_on_path()

TEST_SET = "icd10cm-norm_test"
EM_BATCH = 16  # the demo evaluates in batches of 16 (tunelab.demo.pipeline.run_config)
TARGETS = {"top1": 0.92, "ppl_pct": 1.5, "em_points": 2.0}
"""Issue 12: q8_0 top-1 agreement >= 92%, perplexity within +1.5% of fp32, demo EM within 2 points."""


# ------------------------------------------------------------------ inputs every format shares


def held_out_windows(tokenizer, total: int, window: int) -> tuple[list[list[int]], dict]:
    """``total`` token ids of the fixed held-out text, cut into windows, and where they came from."""
    import platform

    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    ids = tokenizer(text[: total * 16], add_special_tokens=False)["input_ids"][:total]  # ~4 chars a token
    if len(ids) < total:
        raise SystemExit(f"--ppl-tokens {total}: the held-out text gives only {len(ids)} tokens")
    windows = [w for w in (ids[i:i + window] for i in range(0, total, window)) if len(w) > 1]
    meta = {"source": f"pydoc_data.topics of Python {platform.python_version()}, topics in sorted order",
            "tokens": total, "window": window, "scored": sum(len(w) - 1 for w in windows),
            "ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}
    return windows, meta


def demo_rows(run: str, rows: int | None) -> tuple[list, list[str], int]:
    """(prompts, references, rows in the split) of the demo's held-out test split, first ``rows``."""
    from tunelab.eval.run import load_test_set

    test = load_test_set(TEST_SET, str(Path(run) / "data"), None, "test")
    return test.prompts[:rows], test.references[:rows], len(test.prompts)


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt") for p in folder.glob(pattern))


# ------------------------------------------------------------------ children: one HF format each


def child_hf(job: dict) -> dict:
    """Load one HF folder, answer the probes (timed), then score the text and the demo prompts."""
    import torch

    from tunelab.config import ModelConfig
    from tunelab.export.check import fingerprint
    from tunelab.models import load_model

    torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
    model, tokenizer = load_model(ModelConfig(name=job["folder"]), dtype=dtype,
                                  quantization_config=torchao_config() if job.get("torchao_out") else None)
    ref = job.get("reference")
    started = time.perf_counter()
    probes = fingerprint(model, tokenizer, job["tokens"], prompts=ref["prompts"] if ref else None)
    seconds = time.perf_counter() - started
    out = {"prompts": probes.prompts, "answers": probes.answers, "rss_mb": own_peak_rss_mb(),
           "decode_tok_s": sum(len(a) for a in probes.answers) / seconds}
    if job.get("torchao_out"):  # what the quantized weights take on disk (torchao's tensors pickle)
        torch.save(model.state_dict(), job["torchao_out"])
        out["bytes"] = Path(job["torchao_out"]).stat().st_size
    if ref:
        out["forced_top1"] = forced_top1(model, ref["prompts"], ref["answers"])
    out["score"] = score_windows(model, job["windows"])
    if job.get("em_prompts"):
        from tunelab.generation import from_preset, generate

        settings = from_preset("greedy", max_new_tokens=job["em_tokens"])
        started = time.perf_counter()
        results = generate(model, tokenizer, job["em_prompts"], settings, batch_size=EM_BATCH, progress=False)
        out.update(em_predictions=[r.text for r in results], em_seconds=time.perf_counter() - started)
    return out


def forced_top1(model, prompts: list[list[int]], answers: list[list[int]]) -> list[list[int]]:
    """The model's argmax at every position of the reference answers (teacher forcing)."""
    import torch

    from tunelab.export.check import forced_logits

    with torch.inference_mode():
        return [forced_logits(model, prompt, answer).argmax(-1).tolist() if answer else []
                for prompt, answer in zip(prompts, answers)]


def score_windows(model, windows: list[list[int]]) -> list[dict]:
    """Per window: log P of each token after the ones before it, and the argmax there (as llama.cpp's)."""
    import torch

    out = []
    with torch.inference_mode():
        for window in windows:
            logits = model(input_ids=torch.tensor([window])).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:])[:, None])[:, 0]
            out.append({"logprobs": logprobs.tolist(), "top1": logits.argmax(-1).tolist()})
    return out


def torchao_config():
    """int8 weight-only for every linear layer, applied by transformers as the fp32 weights load."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


CHILDREN = {"hf": child_hf}


def run_format(kind: str, job: dict, work: Path) -> dict:
    """One child process (1 thread); its JSON answer, or ``{"error": last line}``."""
    path = work / f"job-{kind}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    try:
        return run_child("deploy_formats.py", ["--child", kind, str(path)], timeout=3600, threads=1)
    except RuntimeError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return {"error": lines[-1] if lines else str(exc)}


# ------------------------------------------------------------------ llama.cpp


def gguf_prompt_texts(path: Path, tokenizer, prompts: list) -> list[str]:
    """The demo prompts rendered with the chat template stored in the GGUF file itself."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is None:
        raise SystemExit(f"{path}: the GGUF carries no chat template to render the demo prompts with")
    template = field.contents()
    return [tokenizer.apply_chat_template(p, chat_template=template, tokenize=False, add_generation_prompt=True)
            for p in prompts]


def run_gguf(path: Path, ref: dict, stops: list[int], tokenizer, windows, em_prompts, args) -> dict:
    """One GGUF file in llama.cpp, its answers in the HF children's shape."""
    from tunelab.export import llamacpp

    texts = [tokenizer.decode(p) for p in ref["prompts"]]
    em_texts = gguf_prompt_texts(path, tokenizer, em_prompts) if em_prompts else []
    result = llamacpp.run_probes(path, ref["prompts"], ref["answers"], stops, texts, args.tokens,
                                 score=windows, generate_texts=em_texts, generate_tokens=args.em_tokens,
                                 timeout=3600)
    hf_prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in em_prompts]
    out = {"answers": result["greedy"], "forced_top1": result["forced_top1"], "eog": result["eog"],
           "rss_mb": result["rss_after_probes_bytes"] / 2**20, "score": result["score"],
           "decode_tok_s": sum(len(g) for g in result["greedy"]) / max(result["greedy_seconds"], 1e-9),
           "tokenizer_mismatch": sum(list(a) != b for a, b in zip(result["tokens"], ref["prompts"])),
           "flash_attention": result.get("context", {}).get("flash_attention")}
    if em_prompts:
        out["em_predictions"] = [tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
                                 for ids in result["generated"]]
        out["em_seconds"] = result["generate_seconds"]
        out["em_prompt_mismatch"] = sum(  # the GGUF's template and llama.cpp's tokenizer vs the HF side
            list(ids) != tokenizer(t, add_special_tokens=False)["input_ids"]
            for ids, t in zip(result["generate_prompts"], hf_prompts))
    return out


# ------------------------------------------------------------------ one model, every format


def resolve(spec: str):
    from tunelab.models.loading import resolve_spec

    return resolve_spec(spec)


def tuned(spec: str) -> bool:
    """A run folder whose adapter is merged for the HF rows (the base model otherwise)."""
    resolved = resolve(spec)
    return resolved.adapter is not None or resolved.bottleneck is not None


def prepare(spec: str, work: Path, types: list[str]) -> tuple[Path, dict[str, Path], list[int], object]:
    """The HF folder to load (a run's merged export), every GGUF file, the stop ids and the tokenizer."""
    from tunelab.export.check import stop_ids
    from tunelab.export.gguf_export import export_gguf
    from tunelab.export.verify import prepare_source
    from tunelab.train.export import merge_export

    folder = Path(resolve(spec).path)
    if tuned(spec):
        folder = merge_export(spec, work / "merged", overwrite=True, check=False, log=lambda _: None)
    source = prepare_source(spec, check=False)  # one load and merge serves every GGUF type
    stops, tokenizer = stop_ids(source.model, source.tokenizer), source.tokenizer
    paths = {}
    for ftype in types:
        paths[ftype] = work / f"model.{ftype}.gguf"
        export_gguf(spec, paths[ftype], ftype, overwrite=True, check=False, source=source, log=lambda _: None)
    return folder, paths, stops, tokenizer


def bench_model(spec: str, args, work: Path, bf16: tuple[bool, str]) -> dict:
    """Every format of one model: raw answers per format, then the rows and targets."""
    log = lambda text: print(f"  [{spec}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    folder, ggufs, stops, tokenizer = prepare(spec, work, args.types.split(","))
    log(f"exports written ({time.perf_counter() - started:.0f} s)")
    windows, text_meta = held_out_windows(tokenizer, args.ppl_tokens, args.window)
    notes: list[str] = []
    em_prompts, em_refs, em_total = em_inputs(spec, args, notes)
    job = {"tokens": args.tokens, "windows": windows, "em_prompts": em_prompts, "em_tokens": args.em_tokens}
    raw, sizes = hf_rows(job, folder, work, bf16, notes)
    ref = raw["HF fp32 (transformers)"]
    log(f"HF rows done ({time.perf_counter() - started:.0f} s)")
    for ftype, path in ggufs.items():
        name = f"GGUF {ftype} (llama.cpp)"
        raw[name] = run_gguf(path, job["reference"], stops, tokenizer, windows, em_prompts, args)
        sizes[name] = path.stat().st_size
        log(f"{name} done ({time.perf_counter() - started:.0f} s)")
    rows = [summarise(name, r, ref, sizes[name], stops, em_refs) for name, r in raw.items()]
    notes.append(tokenizer_note(rows, len(ref["prompts"]), len(em_prompts)))
    return {"model": spec, "rows": rows, "notes": notes, "text": text_meta, "targets": targets(rows),
            "em_rows": len(em_prompts), "em_total": em_total, "seconds": round(time.perf_counter() - started)}


def em_inputs(spec: str, args, notes: list[str]) -> tuple[list, list[str], int]:
    """The demo test rows this model is scored on (none for a base model unless --em-base)."""
    if not args.demo_run:
        return [], [], 0
    if not (tuned(spec) or args.em_base):  # a base model rambles to the token limit: minutes per format
        notes.append("demo EM not scored for this base model (--em-base scores it; the demo's own report has it)")
        return [], [], 0
    prompts, refs, total = demo_rows(args.demo_run, args.em_rows)
    if len(prompts) < total:
        notes.append(f"demo EM on the first {len(prompts)} of {total} test rows (--em-rows)")
    return prompts, refs, total


def hf_rows(job: dict, folder: Path, work: Path, bf16: tuple[bool, str], notes: list[str]) -> tuple[dict, dict]:
    """HF fp32 first (every other format is compared with its answers), then bf16 and torchao."""
    raw, sizes = {}, {}
    name = "HF fp32 (transformers)"
    raw[name] = run_format("hf", {**job, "folder": str(folder), "dtype": "fp32"}, work)
    sizes[name] = weight_bytes(folder)
    if "error" in raw[name]:
        raise SystemExit(f"{folder}: HF fp32 failed: {raw[name]['error']}")
    job["reference"] = {"prompts": raw[name]["prompts"], "answers": raw[name]["answers"]}
    if bf16[0]:
        name = "HF bf16 (transformers)"
        raw[name] = run_format("hf", {**job, "folder": str(folder), "dtype": "bf16"}, work)
        sizes[name] = weight_bytes(folder) // 2  # every weight in 2 bytes instead of 4
        notes.append("HF bf16 size: the fp32 weight files' bytes halved (no bf16 copy is saved)")
        if "error" in raw[name]:
            notes.append(f"HF bf16 failed: {raw.pop(name)['error']}")
    else:
        notes.append(f"HF bf16 not run: {bf16[1]}")
    torchao_row(job, folder, work, raw, sizes, notes)
    return raw, sizes


def torchao_row(job: dict, folder: Path, work: Path, raw: dict, sizes: dict, notes: list) -> None:
    """torchao int8, quantized as the fp32 folder loads: transformers 5.24's ``save_pretrained`` fails on
    torchao's int8 tensors ("invalid python storage") and a ``torch.save``d state dict reloads only onto a
    meta-device model whose rotary buffers must be rebuilt by hand, so no saved copy is reloaded; the size
    is that ``torch.save`` of the quantized state dict."""
    from importlib.metadata import version

    name = "torchao int8 weight-only (transformers)"
    if importlib.util.find_spec("torchao") is None:
        notes.append("torchao int8 not run: torchao is not installed (.venv/bin/pip install torchao --no-deps)")
        return
    result = run_format("hf", {**job, "folder": str(folder), "dtype": "fp32",
                               "torchao_out": str(work / "torchao-int8.pt")}, work)
    if "error" in result:
        notes.append(f"torchao int8 not run: {result['error']}")
        return
    raw[name], sizes[name] = result, result["bytes"]
    notes.append(f"torchao {version('torchao')} int8 is quantized as the fp32 weights load "
                 "(its peak RAM includes that load); "
                 "size on disk: torch.save of the quantized state dict")


# ------------------------------------------------------------------ figures


def summarise(name: str, r: dict, ref: dict, size: int | None, stops: list[int], em_refs: list[str]) -> dict:
    from tunelab.eval.metrics import score
    from tunelab.export.check import Fingerprint, agreement_from_tokens

    row = {"format": name, "bytes": size, "peak_rss_mb": round(r["rss_mb"]),
           "decode_tok_s": round(r["decode_tok_s"], 1)}
    if r is ref:
        row.update(top1=1.0, identical=f"{len(ref['answers'])}/{len(ref['answers'])}")
    else:
        agree = agreement_from_tokens(Fingerprint(ref["prompts"], ref["answers"]), r["forced_top1"], r["answers"],
                                      name, stops=stops, eog=r.get("eog"))
        row.update(top1=round(agree.top1, 4), identical=f"{agree.identical_answers}/{agree.prompts}")
    logprobs = [x for w in r["score"] for x in w["logprobs"]]
    row["perplexity"] = round(math.exp(-sum(logprobs) / len(logprobs)), 4)
    same = [a == b for w, v in zip(r["score"], ref["score"]) for a, b in zip(w["top1"], v["top1"])]
    row["text_top1"] = round(sum(same) / len(same), 4)
    if em_refs:
        row["em"] = score(r["em_predictions"], em_refs, ["em"])["em"]
        row["em_same"] = sum(a == b for a, b in zip(r["em_predictions"], ref["em_predictions"]))
        row["em_seconds"] = round(r["em_seconds"], 1)
    for key in ("tokenizer_mismatch", "em_prompt_mismatch"):
        if key in r:
            row[key] = r[key]
    return row


def tokenizer_note(rows: list[dict], probes: int, em_prompts: int) -> str:
    """Whether llama.cpp's tokens equal transformers' (if not, the GGUF rows were fed other inputs)."""
    what = f"the {probes} probes"
    if em_prompts:
        what += f" and the {em_prompts} EM prompts (the GGUF's chat template)"
    off = [f"{r['format'].split()[1]} {r['tokenizer_mismatch']} probes, {r.get('em_prompt_mismatch', 0)} EM prompts"
           for r in rows if r.get("tokenizer_mismatch") or r.get("em_prompt_mismatch")]
    if not off:
        return f"llama.cpp tokenizes {what} as transformers does, in every GGUF row"
    return f"llama.cpp tokenizes {what} DIFFERENTLY from transformers: " + "; ".join(off)


def targets(rows: list[dict]) -> list[dict]:
    """The issue's GGUF targets against this model's fp32 row (met / NOT met)."""
    fp32 = rows[0]
    f16 = next((r for r in rows if r["format"].startswith("GGUF f16")), None)
    q8 = next((r for r in rows if r["format"].startswith("GGUF q8_0")), None)
    out = []
    if f16 is not None:
        same, total = f16["identical"].split("/")
        out.append({"target": "f16 greedy answers equal fp32's on every probe", "value": f16["identical"],
                    "met": same == total})
    if q8 is None:
        return out
    ppl_pct = round(100 * (q8["perplexity"] / fp32["perplexity"] - 1), 6)  # 1.5 exactly is met, not 1.50...01
    out += [{"target": "q8_0 top-1 agreement >= 92%", "value": f"{100 * q8['top1']:.1f}%",
             "met": q8["top1"] >= TARGETS["top1"]},
            {"target": "q8_0 perplexity within +1.5% of fp32", "value": f"{ppl_pct:+.2f}%",
             "met": ppl_pct <= TARGETS["ppl_pct"]}]
    if "em" in q8:
        points = round(100 * (q8["em"] - fp32["em"]), 6)
        out.append({"target": "q8_0 demo EM within 2 points of fp32", "value": f"{points:+.1f} points",
                    "met": abs(points) <= TARGETS["em_points"]})
    return out


def print_model(result: dict) -> None:
    fp32 = result["rows"][0]
    em = any("em" in r for r in result["rows"])
    text = result["text"]
    print(f"\n### {result['model']}\n")
    print(f"Perplexity text: {text['source']}, {text['tokens']} tokens in windows of {text['window']} "
          f"({text['scored']} scored), token ids sha256 {text['ids_sha256']}. {result['seconds']} s in all.\n")
    print("| format | size on disk (MB) | peak RAM (MB) | decode tok/s | top-1 agreement | identical answers "
          "| perplexity (vs fp32) | text top-1 |" + (" demo EM (vs fp32; answers as fp32's) |" if em else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if em else ""))
    for r in result["rows"]:
        ppl = f"{r['perplexity']:.3f} ({100 * (r['perplexity'] / fp32['perplexity'] - 1):+.2f}%)"
        cells = [r["format"], f"{r['bytes'] / 1e6:.0f}", str(r["peak_rss_mb"]), str(r["decode_tok_s"]),
                 f"{100 * r['top1']:.1f}%", r["identical"], ppl, f"{100 * r['text_top1']:.1f}%"]
        if em:
            cells.append(f"{100 * r['em']:.1f}% ({100 * (r['em'] - fp32['em']):+.1f}; "
                         f"{r['em_same']}/{result['em_rows']})")
        print("| " + " | ".join(cells) + " |")
    print()
    for t in result["targets"]:
        print(f"- {t['target']}: {t['value']} — {'met' if t['met'] else 'NOT met'}")
    for note in result["notes"]:
        print(f"- {note}")


def main() -> int:
    from tunelab.demo.pipeline import EVAL_NEW_TOKENS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append",
                        help=f"model spec or run folder, repeatable (default: {BUILTIN}, then --demo-run)")
    parser.add_argument("--demo-run", help="demo run folder: its test split gives the EM column of run folders")
    parser.add_argument("--em-base", action="store_true", help="also score demo EM for base models (slow)")
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per probe")
    parser.add_argument("--ppl-tokens", type=int, default=1024, help="held-out tokens scored for perplexity")
    parser.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    parser.add_argument("--em-rows", type=int, help="score EM on the first N test rows only (default: all)")
    parser.add_argument("--em-tokens", type=int, default=EVAL_NEW_TOKENS,
                        help=f"new tokens per EM answer (default: the demo's {EVAL_NEW_TOKENS})")
    parser.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                        help="HF bf16 row: auto = only where the hardware probe measures bf16 fast")
    parser.add_argument("--out-dir", default="/tmp/tunelab-deploy-bench")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit(CHILDREN[args.child[0]](json.loads(Path(args.child[1]).read_text(encoding="utf-8"))))
        return 0
    return run_all(args)


def run_all(args) -> int:
    import torch

    from tunelab import hardware
    from tunelab.export import llamacpp

    reason = llamacpp.unavailable_reason()
    if reason:
        raise SystemExit(f"llama.cpp is needed for the GGUF rows: {reason}")
    torch.set_num_threads(1)
    probe = hardware.probe()
    ratio = f"the hardware probe measures bf16 matmuls at {probe.bf16_ratio:.2f}x fp32 ({cpu_kind(probe)})"
    bf16 = {"yes": (True, ""), "no": (False, "--bf16 no"), "auto": (probe.bf16_fast, ratio)}[args.bf16]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for index, spec in enumerate(args.model or [BUILTIN] + ([args.demo_run] if args.demo_run else [])):
        work = Path(tempfile.mkdtemp(prefix=f"model{index}-", dir=out_dir))
        results.append(bench_model(spec, args, work, bf16))
    print(f"CPU: {probe.cpu_model} ({cpu_kind(probe)}), {probe.cores_available} cores, "
          f"{probe.other_busy_cores:.1f} busy with other work at the end; 1 thread per format; llama.cpp "
          f"(node-llama-cpp {llamacpp.VERSION}) flash attention off")
    for result in results:
        print_model(result)
    if args.json:
        payload = {"cpu": probe.to_dict(), "cpu_kind": cpu_kind(probe), "settings": vars(args),
                   "versions": versions(), "models": results}
        Path(args.json).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from tunelab.export import llamacpp

    out = {"node-llama-cpp": llamacpp.VERSION}
    for package in ("torch", "transformers", "torchao", "gguf"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
