"""``tunelab estimate`` against measured training peaks (peak RSS of real steps, each in its own process).

    .venv/bin/python benchmarks/estimate_memory.py [--only NAME,...] [--save benchmarks/estimate_peaks.json]
        [--calibrate]

Each point runs two optimizer steps of the real model (``tunelab.export.estimate_probe``: load,
prepare the method, train mode, AdamW) in a fresh process and reads its peak RSS; the
estimate is made from the config alone. ``fit`` points are the ones ``HEAP_FACTOR`` in
``tunelab/export/estimate.py`` was chosen on; ``validate`` points were never used to choose
anything. ``qwen2-mini`` is a small randomly initialised Qwen2-style model (biases on q/k/v,
no tied head) saved with SmolLM2's tokenizer: another architecture than the one fitted on.
``--calibrate`` also fits ``--calibrate``'s three probes on SmolLM2 LoRA and predicts the
LoRA points from them. Keep the points small: this machine is shared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import BUILTIN, ensure_src_on_path

ensure_src_on_path()

MINI = "qwen2-mini"
# name, model, method, batch, seq, gradient checkpointing, role
POINTS = [
    ("lora-4x128", BUILTIN, "lora", 4, 128, False, "fit"),
    ("lora-2x256", BUILTIN, "lora", 2, 256, False, "fit"),
    ("lora-1x64", BUILTIN, "lora", 1, 64, False, "validate"),
    ("lora-8x128", BUILTIN, "lora", 8, 128, False, "validate"),
    ("full-2x128", BUILTIN, "full", 2, 128, False, "validate"),
    ("freeze-4x128", BUILTIN, "freeze", 4, 128, False, "validate"),
    ("lora-gc-4x256", BUILTIN, "lora", 4, 256, True, "validate"),
    ("mini-lora-4x256", MINI, "lora", 4, 256, False, "validate"),
    ("mini-full-4x128", MINI, "full", 4, 128, False, "validate"),
]


def mini_model(folder: Path) -> str:
    """A small Qwen2-style model (random weights) with SmolLM2's tokenizer, saved once."""
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name=BUILTIN))
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated point names")
    parser.add_argument("--save", help="write the points (measured and estimated) to this JSON file")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--mini-dir", default="/tmp/tunelab-estimate-mini")
    parser.add_argument("--rescore", help="recompute the estimates of a saved file's points (no runs) and rewrite it")
    args = parser.parse_args()

    from tunelab import hardware
    from tunelab.export import estimate as est

    if args.rescore:
        return rescore(Path(args.rescore))

    wanted = set(args.only.split(",")) if args.only else None
    mini = mini_model(Path(args.mini_dir)) if any(p[1] == MINI for p in POINTS if not wanted or p[0] in wanted) \
        else None
    rows = []
    print("| point | role | measured GB | estimated GB | error | s/step |")
    print("|---|---|---|---|---|---|")
    for name, spec, method, batch, seq, gc, role in POINTS:
        if wanted and name not in wanted:
            continue
        spec = mini if spec == MINI else spec
        shape = est.model_shape(est.load_config(spec))
        predicted = est.estimate(shape, method, "fp32", batch, seq, gc)
        measured = est.measure_peak(spec, method, batch, seq, gc)
        error = predicted.total / measured["peak_bytes"] - 1
        rows.append({"name": name, "role": role, "model": "qwen2-mini" if spec == mini else spec,
                     "config": shape.config.to_dict(), "method": method,
                     "batch": batch, "seq": seq, "gradient_checkpointing": gc, "measured": measured,
                     "estimate": predicted.to_dict(), "error": round(error, 4)})
        print(f"| {name} | {role} | {measured['peak_bytes'] / 1e9:.2f} | {predicted.total / 1e9:.2f} | "
              f"{100 * error:+.0f}% | {measured['seconds_per_step']:.1f} |", flush=True)
    calibration = None
    if args.calibrate:
        calibration = est.calibrate(BUILTIN, "lora")
        shape = est.model_shape(est.load_config(BUILTIN))
        for row in rows:
            if row["model"] == BUILTIN and row["method"] == "lora" and not row["gradient_checkpointing"]:
                got = est.estimate(shape, "lora", "fp32", row["batch"], row["seq"], calibration=calibration).total
                row["calibrated_error"] = round(got / row["measured"]["peak_bytes"] - 1, 4)
                print(f"calibrated {row['name']}: {got / 1e9:.2f} GB ({100 * row['calibrated_error']:+.0f}%)")
    probe = hardware.probe()
    print(f"CPU: {probe.cpu_model} ({probe.kind}), {probe.cores_available} cores, "
          f"{probe.other_busy_cores:.1f} busy with other work at the start")
    if args.save:
        from tunelab.io import write_json

        write_json(args.save, {"cpu": probe.cpu_model, "kind": probe.kind,
                               "other_busy_cores": probe.other_busy_cores, "heap_factor": est.HEAP_FACTOR,
                               "runtime_bytes": est.RUNTIME_BYTES, "points": rows, "calibration": calibration})
    return 0


def rescore(path: Path) -> int:
    """The saved measurements against the estimate as it is now (after a change to the formula)."""
    import json

    from transformers import AutoConfig

    from tunelab.export import estimate as est
    from tunelab.io import write_json

    data = json.loads(path.read_text(encoding="utf-8"))
    for row in data["points"]:
        config = dict(row["config"])
        config = AutoConfig.for_model(config.pop("model_type"), **config)
        predicted = est.estimate(est.model_shape(config), row["method"], "fp32", row["batch"], row["seq"],
                                 row["gradient_checkpointing"])
        row["estimate"], row["error"] = predicted.to_dict(), round(predicted.total / row["measured"]["peak_bytes"] - 1, 4)
        print(f"{row['name']:18s} {row['role']:9s} measured {row['measured']['peak_bytes'] / 1e9:6.2f} GB  "
              f"estimated {predicted.total / 1e9:6.2f} GB  {100 * row['error']:+.0f}%")
    data.update(heap_factor=est.HEAP_FACTOR, runtime_bytes=est.RUNTIME_BYTES)
    write_json(path, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
