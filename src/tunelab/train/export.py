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


def merge_export(run: str | Path, out: str | Path, overwrite: bool = False, dtype: str | None = None, *,
                 check: bool = True, probe_tokens: int = 32, force: bool = False, allow_identical: bool = False,
                 log=print) -> Path:
    """Write ``run`` (a run folder or model spec) to ``out`` with any adapter merged in.

    ``dtype`` (fp32/bf16/fp16) casts the saved weights; by default they keep the
    precision the run loads in. The folder is written beside ``out`` and renamed into
    place, so a failed export leaves no half-written model. With ``check`` (the default)
    the probe prompts run through the source (adapter applied), the merged model and the
    reloaded folder (``tunelab.export.check``); an adapter that changes nothing, or a
    result that answers differently, is refused (``force``/``allow_identical`` override);
    the report is ``OUT/export_check.json``.
    """
    from tunelab.export.verify import finish, prepare_source
    from tunelab.models import pick_dtype

    out = Path(out).expanduser()
    occupied = (out.is_dir() and any(out.iterdir())) or out.is_file()
    if occupied and not overwrite:
        raise TunelabError(f"{out}: already exists; pass --overwrite to replace it")
    source = prepare_source(str(run), dtype=pick_dtype(dtype) if dtype else None, check=check,
                            probe_tokens=probe_tokens, allow_identical=allow_identical)
    model, tokenizer = source.model, source.tokenizer
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(staging))
        tokenizer.padding_side = "left"  # generation is what a deployed model does
        tokenizer.save_pretrained(str(staging))
        if check:
            source.checks.append(_reloaded_check(staging, source, dtype))
            for line in [c.line() for c in source.checks] + source.notes:
                log(line)
            finish(source, staging / "export_check.json", {"source": str(run), "out": str(out)}, force)
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


def _reloaded_check(folder: Path, source, dtype: str | None):
    """The saved folder, loaded back with plain transformers, against the source's probes."""
    from transformers import AutoModelForCausalLM

    from tunelab.export.check import TOLERANCE, compare
    from tunelab.models import pick_dtype

    kwargs = {"dtype": pick_dtype(dtype)} if dtype else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    tolerance = TOLERANCE["merge"] if dtype in (None, "fp32") else TOLERANCE["bf16"]
    return compare(source.reference, model, "merged folder reloaded", tolerance, source.stops)
