"""QLoRA (4-bit NF4 base) and 8-bit LoRA through bitsandbytes, on a GPU or a CPU.

bitsandbytes ≥ 0.50 has CPU kernels for NF4, int8 and the QLoRA backward. Whether this
machine can run them is decided by running them: ``support_reason(name)`` quantizes and
multiplies a small matrix the way training will, before any model is loaded, and returns
the one line to show when that fails. The compute dtype of the dequantised matmuls comes
from ``tunelab.hardware``: bf16 on a GPU that has it (fp16 otherwise), and on a CPU bf16
only where it measured faster than fp32 — on an AVX2 CPU a bf16-compute QLoRA step was
15x slower than an fp32 one.
"""

from __future__ import annotations

from typing import Any

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError

MIN_VERSION = "0.50"


def _bnb_version(bnb) -> tuple[int, ...]:
    parts = []
    for piece in str(getattr(bnb, "__version__", "0")).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def support_reason(name: str) -> str | None:
    """None if ``name`` (qlora | lora8bit) runs here, else a one-line reason with the way out."""
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError:
        return f"method.name: {name} needs bitsandbytes: pip install 'tunelab[quant]'"
    except Exception as exc:  # a broken install raises all sorts at import
        return f"method.name: {name}: bitsandbytes failed to import ({str(exc).splitlines()[0][:120]})"
    if torch.cuda.is_available():
        return None
    if _bnb_version(bnb) < tuple(int(p) for p in MIN_VERSION.split(".")):
        return (f"method.name: {name} on a CPU needs bitsandbytes >= {MIN_VERSION} (installed "
                f"{bnb.__version__}): pip install -U 'tunelab[quant]', or use method.name=lora")
    try:
        _smoke(bnb, name)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        return (f"method.name: {name}: bitsandbytes {bnb.__version__} has no working CPU kernels here ({first}); "
                "use method.name=lora (same adapters, unquantized base)")
    return None


def _smoke(bnb, name: str) -> None:
    """Quantize a small weight and run a forward and backward through it, as training will."""
    import torch

    x = torch.randn(4, 64, requires_grad=True)
    if name == "qlora":
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    layer(x).sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise RuntimeError("no finite gradient through the quantized layer")


def preflight(cfg: MethodConfig) -> None:
    reason = support_reason(cfg.name)
    if reason:
        raise TunelabError(reason)


def compute_dtype(cfg: MethodConfig):
    """The dtype QLoRA dequantises to: ``method.compute_dtype``, or decided by ``tunelab.hardware``."""
    import torch

    from tunelab import hardware

    name = cfg.compute_dtype
    if name == "auto":
        if torch.cuda.is_available():
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "bf16" if hardware.probe().bf16_fast else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(name)
    if dtype is None:
        raise TunelabError(f"method.compute_dtype: {cfg.compute_dtype!r} is not one of auto, bf16, fp16, fp32")
    return dtype


def load_kwargs(cfg: MethodConfig) -> dict[str, Any]:
    """``from_pretrained`` arguments: seed 003's QLoRA (NF4, double quantization) or 8-bit weights."""
    from transformers import BitsAndBytesConfig

    if cfg.name == "lora8bit":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(cfg))}
