"""``tunelab export RUN --gguf TYPE --out FILE.gguf``: merge, write, verify, then move into place.

The file is written beside its destination under a hidden name and only renamed to
``FILE.gguf`` once the export check passed (or ``force``), so a failed or refused export
leaves whatever was there before untouched. The check report goes to ``FILE.gguf.check.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from pathlib import Path
from typing import Callable

from tunelab.errors import TunelabError


def export_gguf(run: str, out: str | Path, ftype: str = "f16", *, overwrite: bool = False, check: bool = True,
                llamacpp: str = "auto", probe_tokens: int = 32, force: bool = False,
                allow_identical: bool = False, log: Callable[[str], None] = print, source=None) -> dict:
    """Export ``run`` (run folder or model spec) as a GGUF file; return the check report.

    ``llamacpp``: ``auto`` runs the check in real llama.cpp where node-llama-cpp is
    installed, ``require`` fails without it, ``off`` skips it. The transformers GGUF
    loader check always runs unless ``check`` is False. ``source``: a
    :func:`~tunelab.export.verify.prepare_source` result for ``run`` to reuse (several
    types from one load and one fingerprint); it is left as it was given.
    """
    from tunelab.export import llamacpp as lcpp
    from tunelab.export.gguf import TYPES, write_gguf
    from tunelab.export.verify import finish, prepare_source

    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise TunelabError(f"{out}: --out must name a .gguf file")
    if ftype not in TYPES:
        raise TunelabError(f"--gguf: {ftype!r} is not one of {', '.join(TYPES)}")
    if out.exists() and not overwrite:
        raise TunelabError(f"{out}: already exists; pass --overwrite to replace it")
    if llamacpp not in ("auto", "require", "off"):
        raise TunelabError(f"--llamacpp: {llamacpp!r} is not one of auto, require, off")
    reason = lcpp.unavailable_reason() if check and llamacpp != "off" else None
    if reason and llamacpp == "require":
        raise TunelabError(f"--llamacpp require: {reason}")
    owned = source is None
    if owned:
        source = prepare_source(str(run), check=check, probe_tokens=probe_tokens, allow_identical=allow_identical)
    else:
        source = dataclasses.replace(source, checks=list(source.checks), notes=list(source.notes))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.stem}.{os.getpid()}.partial.gguf"
    try:
        started = time.perf_counter()
        summary = write_gguf(source.model, source.tokenizer, staging, ftype, name=out.stem, source=str(run))
        summary.update(source=str(run), out=str(out), write_seconds=round(time.perf_counter() - started, 2))
        log(f"wrote {summary['tensors']} tensors ({summary['bytes'] / 2**20:.1f} MiB, {ftype}) "
            f"in {summary['write_seconds']:.1f} s")
        if owned:
            source.model = None  # free the source before loading the result
            gc.collect()
        if check:
            source.checks.append(_check_transformers(staging, ftype, source))
            log(source.checks[-1].line())
            if reason:
                source.notes.append(f"llama.cpp check skipped: {reason}")
                log(source.notes[-1])
            elif llamacpp != "off":
                source.checks.append(_check_llamacpp(staging, ftype, source, probe_tokens))
                log(source.checks[-1].line())
        for note in source.notes:
            if note.startswith("WARNING"):
                log(note)
        report = finish(source, Path(f"{out}.check.json"), summary, force)
        os.replace(staging, out)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return report


def _check_transformers(path: Path, ftype: str, source):
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.export.check import TOLERANCE, compare

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"export check: transformers cannot load the written GGUF: {exc}") from exc
    try:
        return compare(source.reference, model, f"GGUF {ftype} in transformers' GGUF loader",
                       TOLERANCE[ftype], source.stops)
    finally:
        del model
        gc.collect()


def _check_llamacpp(path: Path, ftype: str, source, probe_tokens: int):
    from tunelab.export import llamacpp as lcpp
    from tunelab.export.check import TOLERANCE, agreement_from_tokens

    ref = source.reference
    texts = [source.tokenizer.decode(p) for p in ref.prompts]
    result = lcpp.run_probes(path, ref.prompts, ref.answers, source.stops, texts, max_new_tokens=probe_tokens)
    mismatch = sum(int(list(got) != list(want)) for got, want in zip(result["tokens"], ref.prompts))
    agreement = agreement_from_tokens(ref, result["forced_top1"], result["greedy"], f"GGUF {ftype} in llama.cpp",
                                      TOLERANCE[ftype], mismatch, source.stops, result.get("eog"))
    source.notes.append(f"llama.cpp (node-llama-cpp {lcpp.VERSION}, 1 thread, flash attention "
                        f"{'on' if result.get('context', {}).get('flash_attention') is True else 'off'}) "
                        f"answered the probes in {result['seconds']:.1f} s")
    return agreement
