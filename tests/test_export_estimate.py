"""``tunelab estimate``: counts from the config alone, the meta-device trace against a real step,
and the estimate against peaks measured on real runs (``benchmarks/estimate_peaks.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.export import estimate as est

pytestmark = pytest.mark.usefixtures("one_thread")
PEAKS = Path(__file__).resolve().parents[1] / "benchmarks" / "estimate_peaks.json"


def test_builtin_counts_match_the_real_model(smollm2_tokenizer_path):
    """134,515,008 parameters (tied) and 2,442,240 LoRA r8 parameters, as loading the weights says."""
    shape = est.model_shape(est.load_config("builtin:smollm2-135m-instruct"))
    assert shape.params == 134_515_008 and shape.tied and shape.layers == 30
    assert est.trainable(shape, "lora", 8, 2) == 2_442_240


def _step(e: est.Estimate) -> float:
    return e.activations + e.logits + e.gradients


def test_parts_move_the_way_they_should(tiny_dir):
    shape = est.model_shape(est.load_config(str(tiny_dir)))
    lora = est.estimate(shape, "lora", "fp32", 4, 128)
    full = est.estimate(shape, "full", "fp32", 4, 128)
    assert any("traced" in note for note in lora.notes)
    assert full.trainable_params == shape.params > lora.trainable_params > 0
    assert full.optimizer == 8 * shape.params and full.total > lora.total
    assert est.estimate(shape, "qlora", "fp32", 4, 128).weights < lora.weights
    assert est.estimate(shape, "full", "fp32", 4, 128, optimizer="adamw8bit").optimizer < full.optimizer
    assert est.estimate(shape, "full", "fp32", 4, 128, optimizer="sgd").optimizer == 0
    checkpointed = est.estimate(shape, "lora", "fp32", 4, 128, gradient_checkpointing=True)
    assert checkpointed.activations < 0.5 * lora.activations and _step(checkpointed) < _step(lora)
    longer = est.estimate(shape, "lora", "fp32", 4, 256)
    assert longer.activations > 2 * lora.activations  # the attention scores grow with seq²
    assert est.estimate(shape, "lora", "bf16", 4, 128).weights < 0.6 * lora.weights
    with pytest.raises(TunelabError, match="--precision int4: quantized weights train only through adapters"):
        est.estimate(shape, "full", "int4", 1, 8)


def test_meta_trace_keeps_what_a_real_step_keeps(tiny_llama):
    """The meta trace's "kept for the backward" equals the storages autograd saves in a real CPU step."""
    import copy

    from tunelab.config import MethodConfig
    from tunelab.export.estimate_trace import trace_step
    from tunelab.train.methods import get_method

    for method in ("lora", "full", "freeze"):
        model = copy.deepcopy(tiny_llama)
        model.set_attn_implementation("eager")  # what the trace runs (and tunelab picks on a CPU)
        model = get_method(method).prepare(model, MethodConfig(name=method, freeze_trainable_layers=1))
        model.train()
        weights = {p.untyped_storage()._cdata for p in model.parameters()}
        weights |= {b.untyped_storage()._cdata for b in model.buffers()}
        saved = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage._cdata not in weights:
                saved[storage._cdata] = storage.nbytes()
            return t

        ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss
        traced = trace_step(tiny_llama.config, method, 2, 24, freeze_layers=1)
        # what the backward needs, plus the few small tensors alive at the end of a forward (the loss)
        assert traced["saved"] == pytest.approx(sum(saved.values()), rel=0.02), method
        loss.backward()
        grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
        assert traced["grads"] == grads, method
        assert traced["peak"] >= traced["saved"]


def test_without_a_config_it_counts_by_hand(tiny_dir):
    import dataclasses

    shape = dataclasses.replace(est.model_shape(est.load_config(str(tiny_dir))), config=None)
    result = est.estimate(shape, "lora", "fp32", 2, 64)
    assert "activations counted by hand" in result.notes and result.activations > 0 and result.logits > 0


def test_cli_json_is_one_object_in_bytes(tiny_dir, capsys):
    from tunelab.cli import main

    assert main(["estimate", "--model", str(tiny_dir), "--method", "lora", "--batch", "2", "--seq", "64",
                 "--json"]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out
    data = json.loads(out)
    parts = ("weights", "gradients", "optimizer", "activations", "logits", "overhead")
    assert all(isinstance(data[k], int) for k in parts) and data["total"] == pytest.approx(sum(data[k] for k in parts), abs=8)
    assert main(["estimate", "--model", str(tiny_dir / "nope")]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_calibration_fit_recovers_known_terms():
    """``peak = fixed + scale · step`` is recovered; a slope under the model's (the small probes would
    extrapolate it into an under-estimate) or through probes of the same step is not taken, and only
    ``fixed`` is fitted."""
    steps = (2e8, 5e8, 6e8)
    fit = est.fit([{"step_bytes": s, "peak_bytes": 1e9 + 1.2 * s} for s in steps])
    assert fit["fixed"] == pytest.approx(1e9, rel=1e-6) and fit["scale"] == pytest.approx(1.2, rel=1e-6)
    fit = est.fit([{"step_bytes": s, "peak_bytes": 1e9 + 0.8 * s} for s in steps])
    assert fit["scale"] == 1.0 and fit["fixed"] == pytest.approx(1e9 - 0.2 * sum(steps) / 3, rel=1e-6)
    flat = [{"step_bytes": 5e8 + s / 100, "peak_bytes": 1e9 + 5e8 + s} for s in steps]  # same step: no slope
    assert est.fit(flat)["scale"] == 1.0


def test_checkpointed_layers_leave_their_temporaries_behind(tiny_llama):
    """A layer that records a graph leaves its freed temporaries in the heap (``left_behind``): with
    checkpointing that is a layer's whole working set per layer, without it next to nothing (the
    layer keeps its tensors); in the estimate it counts once, not times ``HEAP_FACTOR``."""
    from tunelab.export.estimate_trace import trace_step

    config = tiny_llama.config
    plain = trace_step(config, "lora", 2, 64)
    checkpointed = trace_step(config, "lora", 2, 64, gradient_checkpointing=True)
    # more than the checkpointed step keeps for its backward (layer inputs), and than a plain step leaves
    assert checkpointed["left_behind"] > max(checkpointed["saved"], 2 * plain["left_behind"])
    parts, _ = est.step_resident(est.model_shape(config), "lora", "fp32", 2, 64, True, 8, 2)
    assert checkpointed["large_at_peak"] == 0  # a tiny model's tensors all come from the heap
    # the backward's recompute of every layer leaves a share more
    resident = est.HEAP_FACTOR * checkpointed["peak"] + checkpointed["left_behind"] * (1 + est.RECOMPUTE_LEFT)
    assert sum(parts.values()) == pytest.approx(resident)


def test_probe_peak_is_its_own_not_its_parents():
    """A probe started from a big process must not report that process's peak as its own (on Linux
    ``ru_maxrss`` is inherited through exec; ``VmHWM`` is not)."""
    import subprocess
    import sys

    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc")
    ballast = bytearray(300 * 2**20)  # this process now holds 300 MiB more than any small child
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    code = "from tunelab.export.estimate_probe import peak_rss; print(peak_rss())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 200 * 2**20 < len(ballast)


def _recorded():
    return json.loads(PEAKS.read_text(encoding="utf-8"))


def _points():
    for point in _recorded()["points"]:
        yield pytest.param(point, id=f"{point['role']}-{point['name']}")


def _shape(config: dict):
    from transformers import AutoConfig

    config = dict(config)
    return est.model_shape(AutoConfig.for_model(config.pop("model_type"), **config))


@pytest.mark.parametrize("point", _points())
def test_estimate_within_target_of_recorded_peaks(point):
    """The issue's target on peaks measured on real runs (benchmarks/estimate_memory.py): within 25%,
    never more than 5% under. ``fit`` points are where ``HEAP_FACTOR`` was read off glibc's heap;
    ``validate`` points chose nothing."""
    predicted = est.estimate(_shape(point["config"]), point["method"], "fp32", point["batch"], point["seq"],
                             point["gradient_checkpointing"]).total
    error = predicted / point["measured"]["peak_bytes"] - 1
    assert -0.05 <= error <= 0.25, f"{point['name']}: {100 * error:+.1f}%"


@pytest.mark.parametrize("point", _points())
def test_calibrated_estimate_within_target_of_recorded_peaks(point):
    """``--calibrate``'s target: within 10%, never more than 5% under, refitted here to the probe steps
    recorded for the point's model, method and checkpointing (so a change to the model is judged)."""
    calibrations = _recorded()["calibrations"]
    key = f"{point['model']}|{point['method']}|{'gc' if point['gradient_checkpointing'] else 'no-gc'}"
    calibration = {**calibrations[key], "points": [dict(p) for p in calibrations[key]["points"]]}
    est.refit(calibration, _shape(calibration["config"]))
    predicted = est.estimate(_shape(point["config"]), point["method"], "fp32", point["batch"], point["seq"],
                             point["gradient_checkpointing"], calibration=calibration).total
    error = predicted / point["measured"]["peak_bytes"] - 1
    assert -0.05 <= error <= 0.10, f"{point['name']}: {100 * error:+.1f}% calibrated"


@pytest.mark.slow
def test_estimate_within_target_of_a_peak_measured_now(smollm2_tokenizer_path):
    """One real run now, so the recorded peaks still describe this machine: the issue's target."""
    spec = "builtin:smollm2-135m-instruct"
    shape = est.model_shape(est.load_config(spec))
    predicted = est.estimate(shape, "lora", "fp32", 2, 128).total
    measured = est.measure_peak(spec, "lora", 2, 128)["peak_bytes"]
    error = predicted / measured - 1
    assert -0.05 <= error <= 0.25, f"lora 2x128: predicted {predicted / 2**30:.2f} GiB, " \
                                   f"measured {measured / 2**30:.2f} GiB ({100 * error:+.0f}%)"
