"""Training memory from the model's config alone: weights, gradients, optimizer states,
activations, logits and the runtime's own overhead, in bytes.

No weights are read: the model is built on torch's ``meta`` device from its config, so
parameter counts and every linear layer's shape are exact for any architecture
transformers knows, offline, for a local folder, a run folder or a builtin spec.

Activations are what the textbook formula gets wrong (it under-estimated a measured LoRA
peak by 45%), so one training step is traced on meta tensors with the real method code
(``tunelab.export.estimate_trace``): the most the step holds at once, and what. Resident
memory exceeds live tensors by what glibc's heap keeps: about as much again as it holds
(``HEAP_FACTOR``), plus, in each decoder layer that records a graph, the temporaries it freed
(``left_behind``: with gradient checkpointing that is most of the step). A model that cannot run
on meta falls back to a hand count. ``calibrate`` fits the same model's two machine-dependent
numbers (fixed bytes, scale of the step's bytes) to a few probe steps run on this machine
(``tunelab.export.estimate_probe``, each in its own process so its peak RSS is its own).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.export.estimate_trace import LARGE

BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0 + 4 / 576, "int4": 0.5 + 0.5 / 64 + 4 / (64 * 256)}
"""Bytes per weight: int8 adds a fp32 scale per row (~576-wide rows); NF4 adds one 8-bit absmax per
64 weights and, with double quantization, one fp32 per 256 of those."""
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 8 / 2048, "sgd": 0.0}
"""Optimizer state per trainable parameter: AdamW's two fp32 moments, bitsandbytes' 8-bit ones
(with a scale per 2048-block), plain SGD none."""
RUNTIME_BYTES = 550 * 2**20
"""Python, torch, transformers, peft and tunelab imported and the model loaded, its weights not yet
touched (safetensors maps them; they count in ``weights`` once the forward reads them): 0.53-0.54 GB
of a probe process's own RSS (``VmHWM``) on this CPU (2026-12-03)."""
HEAP_FACTOR = 2.0
"""glibc's heap over the live bytes of the step's smaller tensors (under 32 MiB, the heap's) at the
peak: temporaries freed between kept tensors leave holes that later requests, split by autograd's
small objects, reuse only in part, so the heap holds about as much free as live. Read from glibc
itself, not from peak RSS: the heap's growth over the step (``mallinfo2``, ``malloc_after`` in
benchmarks/estimate_peaks.json, less the ``left_behind`` below) over the traced live heap bytes at
the peak came out 1.8-2.0 on the fit points (SmolLM2-135M LoRA 4 × 128, 2 × 256, two runs each);
the top of that is taken. Larger tensors (the logits over the vocabulary, the embedding's gradient)
have their own mapping, returned when freed, and count once (``LARGE_FACTOR``)."""
LARGE_FACTOR = 1.0
RECOMPUTE_LEFT = 1 / 3
"""With gradient checkpointing the backward runs every layer's forward again, recording a graph, and
that recompute leaves part of its temporaries behind as the forward did: measured (``mallinfo2``
at the end of the forward and of the first step, SmolLM2 LoRA), the backward grew the heap by 0.27-0.47
of what the forward had grown it (4 × 256, 8 × 128, 1 × 512), so a third of ``left_behind`` more."""
METHODS = ("full", "freeze", "lora", "qlora")
PRECISIONS = tuple(BYTES)


@dataclass
class ModelShape:
    """What the estimate needs to know about a model, read from its config."""

    params: int
    linear_params: int
    """Weights of the decoder's linear layers (what LoRA wraps and bitsandbytes quantizes)."""
    lora_params_per_rank: int
    """Sum of in + out features over those layers: LoRA r adds r times this."""
    layer_params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    config: object = field(default=None, repr=False, compare=False)
    """The config the shape was read from: :func:`estimate` traces a step of it on meta."""


@dataclass
class Estimate:
    """Bytes at the step's peak. ``activations``, ``logits`` and ``gradients`` are what the traced
    step holds at that moment (times ``HEAP_FACTOR`` / ``LARGE_FACTOR``): tensors the forward left for the backward,
    the vocabulary-wide logits / log-probs and their gradients, and what the backward made so far
    (weight gradients and temporaries; all gradients when the optimizer step is the peak).
    ``activations`` also holds the heap the forward's layers left behind (their freed temporaries)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    trainable_params: int
    params: int
    inputs: dict = field(default_factory=dict)
    calibrated: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def to_dict(self) -> dict:
        return {**{k: (int(v) if isinstance(v, float) else v) for k, v in asdict(self).items()},
                "total": int(self.total)}


def load_config(spec: str):
    """The model's ``PretrainedConfig`` without loading weights (builtin specs read the GGUF header)."""
    from transformers import AutoConfig

    from tunelab.models import builtin

    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        folder = builtin.cache_dir() / "models" / name
        if (folder / "config.json").is_file():
            return AutoConfig.from_pretrained(folder)
        path = builtin.gguf_path(name)
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    from tunelab.models.loading import resolve_spec

    resolved = resolve_spec(spec)
    try:
        if resolved.gguf_file:
            return AutoConfig.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
        return AutoConfig.from_pretrained(resolved.path)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"{spec}: cannot read the model config: {str(exc).splitlines()[0]}") from exc


def model_shape(config) -> ModelShape:
    """Exact parameter counts from a model built on the meta device (no memory, no weights)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    from tunelab.train.methods import decoder_layers

    layers = decoder_layers(model)
    heads = config.num_attention_heads
    return ModelShape(
        params=params, linear_params=sum(m.weight.numel() for m in linears),
        lora_params_per_rank=sum(m.in_features + m.out_features for m in linears),
        layer_params=sum(p.numel() for p in layers[0].parameters()), layers=len(layers),
        hidden=config.hidden_size, intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=model.get_input_embeddings().weight.shape[0], tied=tied, config=config)


def activation_floats(shape: ModelShape, seq: int) -> tuple[float, float]:
    """(per token, per token × sequence length) floats kept for the backward, all layers.

    Per layer and token in eager attention: the residual input, both norms' inputs and
    outputs, q/k/v before and after rotary, the attention output, the MLP's gate, up,
    activation and product (4 × intermediate); per token and key position, the attention
    scores and their softmax for every head.
    """
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    per_token = 9 * h + 3 * kv + 4 * shape.intermediate
    per_token_seq = 2 * shape.heads
    return per_token * shape.layers, per_token_seq * shape.layers


def trainable(shape: ModelShape, method: str, r: int, freeze_layers: int) -> int:
    if method == "full":
        return shape.params
    if method == "freeze":
        return shape.layer_params * min(freeze_layers, shape.layers)
    return r * shape.lora_params_per_rank


def estimate(shape: ModelShape, method: str = "lora", precision: str = "fp32", batch: int = 1, seq: int = 512,
             gradient_checkpointing: bool = False, optimizer: str = "adamw", r: int = 8, freeze_layers: int = 2,
             calibration: dict | None = None) -> Estimate:
    """Peak training memory in bytes (one optimizer step, batch × seq tokens)."""
    _check_choice("--method", method, METHODS)
    _check_choice("--precision", precision, PRECISIONS)
    _check_choice("--optimizer", optimizer, tuple(OPTIMIZER_BYTES))
    if batch < 1 or seq < 1:
        raise TunelabError("--batch and --seq must be at least 1")
    notes = []
    if method == "qlora" and precision not in ("int4", "int8"):
        precision = "int4"
        notes.append("qlora: linear weights counted in 4-bit NF4, the rest in fp32")
    if precision in ("int4", "int8") and method in ("full", "freeze"):
        raise TunelabError(f"--precision {precision}: quantized weights train only through adapters (lora, qlora)")
    rest = shape.params - shape.linear_params
    if precision in ("int4", "int8"):  # bitsandbytes quantizes the linears; norms, embeddings, head stay fp32
        weights = shape.linear_params * BYTES[precision] + rest * BYTES["fp32"]
    else:
        weights = shape.params * BYTES[precision]
    n_train = trainable(shape, method, r, freeze_layers)
    if method in ("lora", "qlora"):
        weights += n_train * BYTES["fp32"]
    opt = n_train * OPTIMIZER_BYTES[optimizer]
    inputs = dict(method=method, precision=precision, batch=batch, seq=seq, optimizer=optimizer,
                  gradient_checkpointing=gradient_checkpointing, r=r)
    parts, step_notes = step_resident(shape, method, precision, batch, seq, gradient_checkpointing, r, freeze_layers)
    notes += step_notes
    overhead = float(RUNTIME_BYTES)
    if calibration:
        fit = calibration["fit"]
        parts = {k: v * fit["scale"] for k, v in parts.items()}
        overhead = fit["fixed"] - (weights + opt)  # this machine's runtime, as the probes measured it
        notes.append(f"runtime and the step's scale fitted to {len(calibration['points'])} probe steps on this "
                     "machine")
    return Estimate(weights, parts["backward"], opt, parts["forward"], parts["logits"], overhead,
                    n_train, shape.params, inputs, calibration is not None, notes)


def step_resident(shape: ModelShape, method: str, precision: str, batch: int, seq: int,
                  gradient_checkpointing: bool, r: int, freeze_layers: int) -> tuple[dict, list[str]]:
    """Resident bytes of the step at its peak (forward / logits / backward), from its traced tensors."""
    step, how = step_tensors(shape, method, precision, batch, seq, gradient_checkpointing, r, freeze_layers)
    notes = [how]
    peak, large = sum(step["at_peak"].values()), step["large_at_peak"]
    # The optimizer step itself holds every gradient, plus a temporary or two of the largest parameter.
    update = trainable(shape, method, r, freeze_layers) * BYTES["fp32"]
    if update + 2 * step["largest_grad"] > peak:
        step["at_peak"] = {"forward": 0.0, "logits": 0.0, "backward": float(update + 2 * step["largest_grad"])}
        peak, large = update + 2 * step["largest_grad"], 3 * step["largest_grad"] * (step["largest_grad"] >= LARGE)
        notes.append("the peak is the optimizer step (all gradients), not the backward")
    resident = LARGE_FACTOR * large + HEAP_FACTOR * (peak - large)
    parts = {k: v * resident / max(peak, 1.0) for k, v in step["at_peak"].items()}
    # The heap the forward's layers left behind stays until the process ends: counted once, as it is.
    parts["forward"] += step["left_behind"] * (1 + RECOMPUTE_LEFT if gradient_checkpointing else 1)
    return parts, notes


def step_tensors(shape: ModelShape, method: str, precision: str, batch: int, seq: int,
                 gradient_checkpointing: bool, r: int, freeze_layers: int) -> tuple[dict, str]:
    """The step's tensors at its peak (``at_peak``: forward / logits / backward bytes) and the largest
    gradient, traced on meta (:mod:`tunelab.export.estimate_trace`), else counted by hand."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    if shape.config is not None:
        from tunelab.export.estimate_trace import trace_step

        try:
            traced = trace_step(shape.config, method, batch, seq, r, freeze_layers, dtype, gradient_checkpointing)
            return traced, "activations traced: one step of this model run on torch's meta device"
        except Exception as exc:  # noqa: BLE001 - any model code may fail on meta tensors; count by hand
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            how = f"could not trace a step on meta ({reason}); activations counted by hand"
    else:
        how = "activations counted by hand"
    tokens, size = batch * seq, dtype.itemsize
    per_token, per_token_seq = activation_floats(shape, seq)
    left_behind = 0.0
    if gradient_checkpointing:  # layer inputs kept; one layer's activations live again in its recompute
        # each layer's per-token temporaries, what it would keep without checkpointing, stay in the heap
        left_behind = tokens * per_token * size
        per_token = shape.hidden * shape.layers + per_token / shape.layers
        per_token_seq = per_token_seq / shape.layers
    logits = tokens * shape.vocab * (size + 4.0 * 3)  # logits, fp32 log-probs, their gradient and the logits'
    n_train = trainable(shape, method, r, freeze_layers)
    head = shape.vocab * shape.hidden * 4.0 if method == "full" else 0.0
    return {"at_peak": {"forward": tokens * (per_token + per_token_seq * seq) * size, "logits": logits,
                        "backward": head}, "large_at_peak": logits + head, "left_behind": left_behind,
            "largest_grad": max(head, 4.0 * n_train / max(shape.layers, 1))}, how


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TunelabError(f"{flag}: {value!r} is not one of {', '.join(choices)}")


# ---------------------------------------------------------------- calibration

PROBE_POINTS = ((1, 64), (4, 64), (1, 256))
"""(batch, seq) of the probe steps: different in tokens and in tokens × seq, each a few seconds on a small model."""


def measure_peak(spec: str, method: str, batch: int, seq: int, gradient_checkpointing: bool = False,
                 optimizer: str = "adamw", r: int = 8, steps: int = 2, timeout: float = 900,
                 freeze_layers: int = 2) -> dict:
    """Run ``steps`` training steps in a child process; return its peak RSS (bytes) and timings."""
    import subprocess
    import sys

    job = json.dumps(dict(spec=spec, method=method, batch=batch, seq=seq, optimizer=optimizer, r=r, steps=steps,
                          gradient_checkpointing=gradient_checkpointing, freeze_layers=freeze_layers))
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.export.estimate_probe", job], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise TunelabError(f"memory probe ({batch}x{seq}) did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        raise TunelabError(f"memory probe ({batch}x{seq}) failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def refit(calibration: dict, shape: ModelShape) -> dict:
    """``calibration`` with every probe's ``step_bytes`` recomputed by today's model of the step and
    the fit redone: recorded probes judged by the current estimate, not the one they were saved with."""
    for probe in calibration["points"]:
        parts, _ = step_resident(shape, probe["method"], "fp32", probe["batch"], probe["seq"],
                                 probe["gradient_checkpointing"], probe["r"], probe["freeze_layers"])
        probe["step_bytes"] = sum(parts.values())
    calibration["fit"] = fit(calibration["points"])
    return calibration


def fit(points: list[dict]) -> dict:
    """Least-squares ``peak = fixed + scale · step`` over the probes, ``step`` being the estimate's own
    resident bytes of each probe's step: ``fixed`` is this machine's runtime plus the model's state,
    ``scale`` how much more its allocator keeps than ``HEAP_FACTOR`` says. Both are the model's own
    terms, so the fit extrapolates along the traced shape of the step (attention's seq² included).

    Only ``fixed`` is fitted (``scale`` 1) when a slope cannot be trusted: when the probes' steps are
    within a quarter of each other (full fine-tuning of small batches, whose peak is the optimizer
    step, the same at every probe: a slope through them is noise, 7.6 on the small Qwen2), or when it
    comes out under 1 (the probes are small, and a slope under the model's extrapolates into an
    under-estimate at the sizes one asks about: 0.90 on SmolLM2 LoRA put 8 × 128 at -4%)."""
    import numpy as np

    step = np.array([float(p["step_bytes"]) for p in points])
    peak = np.array([float(p["peak_bytes"]) for p in points])
    fixed, scale = float(np.mean(peak - step)), 1.0
    if step.max() - step.min() > 0.25 * step.max():
        (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(step), step], axis=1), peak, rcond=None)
        if b > 1.0:
            fixed, scale = float(a), float(b)
    return {"fixed": fixed, "scale": scale}


def calibrate(spec: str, method: str, gradient_checkpointing: bool = False, optimizer: str = "adamw",
              r: int = 8, points=PROBE_POINTS, log=print, freeze_layers: int = 2) -> dict:
    """Measure the probe points on this machine and fit the estimate's fixed bytes and step scale."""
    shape = model_shape(load_config(spec))
    measured = []
    for batch, seq in points:
        result = measure_peak(spec, method, batch, seq, gradient_checkpointing, optimizer, r,
                              freeze_layers=freeze_layers)
        parts, _ = step_resident(shape, method, "fp32", batch, seq, gradient_checkpointing, r, freeze_layers)
        result["step_bytes"] = sum(parts.values())
        log(f"probe {batch}x{seq}: peak {result['peak_bytes'] / 2**30:.2f} GiB")
        measured.append(result)
    return {"points": measured, "fit": fit(measured)}


def save_calibration(path: str | Path, calibration: dict) -> None:
    from tunelab.io import write_json

    write_json(path, calibration)
