"""Write a loaded causal LM (LoRA already merged) as one GGUF file, tensor by tensor.

No compiler and no llama.cpp checkout: the ``gguf`` package writes the file and
quantizes in numpy (its Q8_0/Q4_0 match ggml's C quantizer byte for byte). The plan
(names, shapes, types) is written first; then each tensor is converted, quantized,
appended and dropped, so the model is never held twice in memory.

Types: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q5_0``, ``q4_0``, ``q4_1``. Norms and biases
stay F32 (as llama.cpp's converter does); with the 4/5-bit types the token embedding
and output head are Q8_0, since a small model's tied embedding is a fifth of its
weights and the most sensitive to rounding; rows whose length is no multiple of 32
fall back to F16. K-quants have no Python quantizer and are not offered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q4_0", "q4_1")


@dataclass(frozen=True)
class Arch:
    gguf_name: str
    """``general.architecture`` as llama.cpp spells it."""
    permute_qk: bool
    """llama.cpp's llama graph expects q/k rows in interleaved rotary order."""
    rms_norm: bool


ARCHS = {
    "llama": Arch("llama", True, True),
    "mistral": Arch("llama", True, True),
    "qwen2": Arch("qwen2", False, True),
    "stablelm": Arch("stablelm", False, False),
}


@dataclass
class PlannedTensor:
    hf_name: str
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    permute_heads: int | None = None


def _ggml_types():
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    return {
        "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
        "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
        "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
    }


def arch_of(config, source: str) -> Arch:
    arch = ARCHS.get(getattr(config, "model_type", None))
    if arch is None:
        raise TunelabError(f"{source}: GGUF export supports {', '.join(sorted(ARCHS))} models, "
                           f"not {getattr(config, 'model_type', '?')!r}; export --merge a HF folder instead")
    if config.model_type == "stablelm" and getattr(config, "qk_layernorm", False):
        raise TunelabError(f"{source}: StableLM with qk_layernorm is not supported by the GGUF export")
    return arch


def _rope(config, source: str) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise TunelabError(f"{source}: rope scaling {kind!r} is not supported by the GGUF export (default, linear)")
    return float(theta), params if kind == "linear" else {}


def write_hparams(writer, config, arch: Arch, n_vocab: int, source: str) -> None:
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_vocab_size(n_vocab)
    theta, linear = _rope(config, source)
    writer.add_rope_freq_base(theta)
    if linear:
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(linear["factor"]))
    if arch.rms_norm:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_rope_dimension_count(int(getattr(config, "partial_rotary_factor", 1.0) * head_dim))
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _tensor_type(name: str, shape: tuple[int, ...], ftype: str):
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    main = _ggml_types()[ftype][0]
    if len(shape) == 1 or main == Q.F32:
        return Q.F32
    if ftype in ("q4_0", "q4_1", "q5_0") and name in ("token_embd.weight", "output.weight"):
        main = Q.Q8_0
    if shape[-1] % GGML_QUANT_SIZES[main][0] != 0:
        return Q.F16
    return main


def plan_tensors(model, arch: Arch, ftype: str, source: str) -> list[PlannedTensor]:
    """Name, shape and type of every tensor, without converting any."""
    import gguf

    config = model.config
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_name)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    plan = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunelabError(f"{source}: tensor {hf_name} has no place in a {arch.gguf_name} GGUF file")
        shape = tuple(tensor.shape)
        heads = None
        if arch.permute_qk and ".self_attn.q_proj." in hf_name:
            heads = n_head
        elif arch.permute_qk and ".self_attn.k_proj." in hf_name:
            heads = n_kv
        plan.append(PlannedTensor(hf_name, name, shape, _tensor_type(name, shape, ftype), heads))
    return plan


def _permute(weights, n_head: int):
    """HF's half-split rotary rows -> llama.cpp's interleaved pairs (inverse of transformers' GGUF loader)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quant_shape_to_byte_shape

    if qtype == Q.F32:
        return 4 * int(np.prod(shape))
    if qtype == Q.F16:
        return 2 * int(np.prod(shape))
    return int(np.prod(quant_shape_to_byte_shape(shape, qtype)))


def _convert(tensor, planned: PlannedTensor):
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quantize

    data = tensor.detach().to("cpu").float().numpy()
    if planned.permute_heads:
        data = _permute(data, planned.permute_heads)
    if planned.qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if planned.qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return quantize(np.ascontiguousarray(data), planned.qtype)


def write_gguf(model, tokenizer, path: str | Path, ftype: str = "f16", name: str | None = None,
               source: str = "model") -> dict:
    """Write ``model`` (a plain, merged ``PreTrainedModel``) and ``tokenizer`` to ``path``.

    Returns a summary: tensor count, bytes, the GGUF architecture and pre-tokenizer.
    The caller picks the final location; this writes exactly ``path``.
    """
    import gguf
    import numpy as np

    from tunelab.export.gguf_vocab import build_vocab, write_vocab

    if ftype not in TYPES:
        raise TunelabError(f"--gguf: {ftype!r} is not one of {', '.join(TYPES)}")
    config = model.config
    arch = arch_of(config, source)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    vocab = build_vocab(tokenizer, n_vocab, source)
    plan = plan_tensors(model, arch, ftype, source)
    writer = gguf.GGUFWriter(None, arch.gguf_name)
    writer.add_name(name or Path(str(path)).stem)
    writer.add_file_type(_ggml_types()[ftype][1])
    if ftype not in ("f32", "f16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(writer, config, arch, n_vocab, source)
    write_vocab(writer, vocab)
    for t in plan:
        # a float dtype with raw_dtype: the writer keeps the logical shape and records the type
        writer.add_tensor_info(t.name, t.shape, np.float32, _nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
    params = dict(model.state_dict())
    try:
        writer.write_header_to_file(path=Path(path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(_convert(params[t.hf_name], t))
    finally:
        writer.close()
    return {"type": ftype, "architecture": arch.gguf_name, "pre_tokenizer": vocab.pre, "tensors": len(plan),
            "bytes": os.path.getsize(path)}

