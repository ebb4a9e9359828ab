"""The training engine: methods registry, SFT trainer, batching, run folders, export.

``train(cfg) -> Path`` runs one recipe; ``merge_export(run, out)`` writes a plain
Hugging Face folder with a LoRA merged in.
"""

from __future__ import annotations


def train(cfg, callbacks=None):
    """See :func:`tunelab.train.run.train` (imported lazily: transformers is slow to import)."""
    from tunelab.train.run import train as _train

    return _train(cfg, callbacks)


__all__ = ["train"]
