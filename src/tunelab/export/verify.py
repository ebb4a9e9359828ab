"""What every export does before and after writing: probe the source, refuse a no-op
adapter, merge, and compare the merged model with the source.

``prepare_source(run)`` -> ``Source`` (the merged plain model, its tokenizer, the
source's fingerprint and the checks so far); the GGUF and HF-folder exports then add
the check of what they wrote and call :func:`finish`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.export.check import IDENTICAL_LOGITS, TOLERANCE, Agreement, Fingerprint


@dataclass
class Source:
    model: object
    tokenizer: object
    reference: Fingerprint | None
    stops: list[int]
    checks: list[Agreement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def refuse_unmergeable(model, run: str) -> None:
    """Bottleneck and prefix/prompt adapters are not weights to merge: stop before any probing."""
    from peft import PeftModel

    from tunelab.models.bottleneck import has_adapters

    if has_adapters(model):
        raise TunelabError(f"{run}: bottleneck adapters are non-linear and cannot be merged into the weights; "
                           "load the run folder directly instead")
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        raise TunelabError(f"{run}: prefix/prompt-tuning adapters cannot be merged into the weights; "
                           "load the run folder directly instead")


def merged(model, run: str):
    """The plain model with any LoRA-family adapter merged in."""
    from peft import PeftModel

    refuse_unmergeable(model, run)
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def prepare_source(run: str, dtype=None, check: bool = True, probe_tokens: int = 32,
                   allow_identical: bool = False) -> Source:
    """Load ``run``, fingerprint it (adapter applied), refuse an adapter that changes nothing, merge."""
    from peft import PeftModel

    from tunelab.config import ModelConfig
    from tunelab.export.check import compare, fingerprint, logit_distance, stop_ids
    from tunelab.models import load_model

    model, tokenizer = load_model(ModelConfig(name=str(run)), dtype=dtype)
    refuse_unmergeable(model, run)
    if not check:
        return Source(merged(model, run), tokenizer, None, [])
    reference = fingerprint(model, tokenizer, probe_tokens)
    stops = stop_ids(model, tokenizer)
    notes = []
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            base = fingerprint(model, tokenizer, prompts=reference.prompts, logits_only=True)
        distance = logit_distance(reference, base)
        if distance < IDENTICAL_LOGITS:
            message = (f"{run}: the adapter changes nothing (probe logits within {distance:.1e} of the base "
                       "model): the export would ship the base weights")
            if not allow_identical:
                raise TunelabError(message + "; pass --allow-identical to export it anyway")
            notes.append("WARNING: " + message)
        else:
            notes.append(f"adapter moves the probe logits by up to {distance:.3g} from the base model")
    plain = merged(model, run)
    checks = []
    if plain is not model:
        half = dtype is not None and str(dtype) != "torch.float32"  # merging rounds in half precision
        checks.append(compare(reference, plain, "merged in memory", TOLERANCE["bf16" if half else "merge"], stops))
    return Source(plain, tokenizer, reference, stops, checks, notes)


def finish(source: Source, report_path: Path, summary: dict, force: bool) -> dict:
    """Write the check report; raise when a check failed and ``force`` is off."""
    from tunelab.io import write_json

    failed = [c for c in source.checks if not c.ok]
    report = {**summary, "checks": [c.to_dict() for c in source.checks], "notes": source.notes,
              "ok": not failed, "forced": bool(failed and force)}
    if failed and not force:
        raise TunelabError("export check failed, nothing written: " + "; ".join(c.line() for c in failed)
                           + " (--force keeps the result anyway)")
    write_json(report_path, report)
    return report
