"""``tunelab estimate`` against measured training peaks (peak RSS of real steps, each in its own process).

    .venv/bin/python benchmarks/estimate_memory.py [--only NAME,...] [--save benchmarks/estimate_peaks.json]
        [--calibrate]

Each point runs two optimizer steps of the real model (``tunelab.export.estimate_probe``: load,
prepare the method, train mode, AdamW, the graph freed before the optimizer step as the trainer
does) in a fresh process and reads its peak RSS (``VmHWM``); the estimate is made from the config
alone. ``fit`` points are the ones ``HEAP_FACTOR`` in ``tunelab/export/estimate.py`` was read on
(glibc's heap over its live bytes, not the peak); ``validate`` points were never used to choose
anything. ``qwen2-mini`` is a small randomly initialised Qwen2-style model (biases on q/k/v,
no tied head) saved with SmolLM2's tokenizer: another architecture than the one fitted on.
``--calibrate`` also runs ``tunelab estimate --calibrate``'s three probes for each (model, method,
checkpointing) among the points and predicts those points from them. With ``--only``, ``--save``
replaces those points in an existing file and keeps the others (runs stay under ten minutes each).
Keep the points small: this machine is shared.
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
    ("lora-2x128", BUILTIN, "lora", 2, 128, False, "validate"),  # the slow test's live point
    ("lora-gc-8x128", BUILTIN, "lora", 8, 128, True, "validate"),
    ("lora-gc-1x512", BUILTIN, "lora", 1, 512, True, "validate"),
    ("full-gc-2x128", BUILTIN, "full", 2, 128, True, "validate"),
    ("mini-lora-gc-4x256", MINI, "lora", 4, 256, True, "validate"),
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
    calibrations = calibrate_groups(rows, mini) if args.calibrate else {}
    probe = hardware.probe()
    print(f"CPU: {probe.cpu_model} ({probe.kind}), {probe.cores_available} cores, "
          f"{probe.other_busy_cores:.1f} busy with other work at the start")
    if args.save:
        save(Path(args.save), rows, calibrations, probe, replace_only=wanted is not None)
    return 0


def _group(row: dict) -> str:
    return f"{row['model']}|{row['method']}|{'gc' if row['gradient_checkpointing'] else 'no-gc'}"


def calibrate_groups(rows: list[dict], mini: str | None) -> dict:
    """``tunelab estimate --calibrate``'s probes for each (model, method, checkpointing) among the rows."""
    from tunelab.export import estimate as est

    calibrations = {}
    for row in rows:
        key = _group(row)
        if key not in calibrations:
            spec = mini if row["model"] == MINI else row["model"]
            calibrations[key] = {"config": row["config"], **est.calibrate(spec, row["method"],
                                                                          row["gradient_checkpointing"])}
        row["calibrated_error"] = calibrated_error(row, calibrations[key])
        print(f"calibrated {row['name']}: {100 * row['calibrated_error']:+.0f}%", flush=True)
    return calibrations


def calibrated_error(row: dict, calibration: dict) -> float:
    from tunelab.export import estimate as est

    got = est.estimate(_shape(row["config"]), row["method"], "fp32", row["batch"], row["seq"],
                       row["gradient_checkpointing"], calibration=calibration).total
    return round(got / row["measured"]["peak_bytes"] - 1, 4)


def _shape(config: dict):
    from transformers import AutoConfig

    from tunelab.export import estimate as est

    config = dict(config)
    return est.model_shape(AutoConfig.for_model(config.pop("model_type"), **config))


def save(path: Path, rows: list[dict], calibrations: dict, probe, replace_only: bool) -> None:
    """Write the points; with ``--only``, replace just those (and their groups' calibrations) in ``path``."""
    import json

    from tunelab.export import estimate as est
    from tunelab.io import write_json

    data = {"points": [], "calibrations": {}}
    if replace_only and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
    names = {row["name"] for row in rows}
    kept = [row for row in data.get("points", []) if row["name"] not in names]
    order = [p[0] for p in POINTS]
    points = sorted(kept + rows, key=lambda row: order.index(row["name"]) if row["name"] in order else len(order))
    data.update(cpu=probe.cpu_model, kind=probe.kind, other_busy_cores=probe.other_busy_cores,
                heap_factor=est.HEAP_FACTOR, runtime_bytes=est.RUNTIME_BYTES, points=points,
                calibrations={**data.get("calibrations", {}), **calibrations})
    data.pop("calibration", None)
    write_json(path, data)


def rescore(path: Path) -> int:
    """The saved measurements against the estimate as it is now (after a change to the formula): the
    formula alone, and refitted to the saved probes of each point's group where there are some."""
    import json

    from tunelab.export import estimate as est
    from tunelab.io import write_json

    data = json.loads(path.read_text(encoding="utf-8"))
    for calibration in data.get("calibrations", {}).values():
        est.refit(calibration, _shape(calibration["config"]))
    for row in data["points"]:
        predicted = est.estimate(_shape(row["config"]), row["method"], "fp32", row["batch"], row["seq"],
                                 row["gradient_checkpointing"])
        row["estimate"], row["error"] = predicted.to_dict(), round(predicted.total / row["measured"]["peak_bytes"] - 1, 4)
        calibration = data.get("calibrations", {}).get(_group(row))
        if calibration:
            row["calibrated_error"] = calibrated_error(row, calibration)
        print(f"{row['name']:18s} {row['role']:9s} measured {row['measured']['peak_bytes'] / 1e9:6.2f} GB  "
              f"estimated {predicted.total / 1e9:6.2f} GB  {100 * row['error']:+.0f}%"
              + (f"  calibrated {100 * row['calibrated_error']:+.0f}%" if calibration else ""))
    data.update(heap_factor=est.HEAP_FACTOR, runtime_bytes=est.RUNTIME_BYTES)
    write_json(path, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
