"""Model specs and loading: builtin packaged models, GGUF files, HF folders, run folders."""

from tunelab.models.loading import ResolvedSpec, load_model, load_tokenizer, pick_dtype, resolve_spec

__all__ = ["ResolvedSpec", "load_model", "load_tokenizer", "pick_dtype", "resolve_spec"]
