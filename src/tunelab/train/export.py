"""Export a run as a plain Hugging Face folder, with a LoRA adapter merged into the base.

The result needs neither tunelab nor peft: ``AutoModelForCausalLM.from_pretrained(OUT)``
and ``AutoTokenizer.from_pretrained(OUT)`` (chat template included) load it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tunelab.errors import TunelabError


def merge_export(run: str | Path, out: str | Path, overwrite: bool = False, dtype: str | None = None) -> Path:
    """Write ``run`` (a run folder or model spec) to ``out`` with any adapter merged in.

    ``dtype`` (fp32/bf16/fp16) casts the saved weights; by default they keep the
    precision the run loads in. The folder is written beside ``out`` and renamed into
    place, so a failed export leaves no half-written model.
    """
    from tunelab.config import ModelConfig
    from tunelab.models import load_model, pick_dtype

    out = Path(out).expanduser()
    occupied = (out.is_dir() and any(out.iterdir())) or out.is_file()
    if occupied and not overwrite:
        raise TunelabError(f"{out}: already exists; pass --overwrite to replace it")
    model, tokenizer = load_model(ModelConfig(name=str(run)), dtype=pick_dtype(dtype) if dtype else None)
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning:
            raise TunelabError(f"{run}: prefix/prompt-tuning adapters cannot be merged into the weights; "
                               "load the run folder directly instead")
        model = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(staging))
        tokenizer.padding_side = "left"  # generation is what a deployed model does
        tokenizer.save_pretrained(str(staging))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; a model folder is not
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
