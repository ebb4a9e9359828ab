"""Which models one server answers for: a base model plus any number of LoRA adapters.

All adapters sit on the one base model in memory (peft multi-adapter); a request's
``model`` field picks one by its served id, and the engine switches with
``set_adapter`` (or ``disable_adapter`` for the base) between batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError


@dataclass
class ServedModels:
    """The model in memory and the ids it is served under (id -> peft adapter name or None)."""

    model: object
    tokenizer: object
    ids: dict[str, str | None] = field(default_factory=dict)
    created: dict[str, int] = field(default_factory=dict)

    def adapter_for(self, model_id: str) -> str | None:
        """The adapter serving ``model_id``; ``KeyError`` when the id is not served."""
        return self.ids[model_id]


def parse_adapter(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (served under the folder's name)."""
    name, _, path = text.partition("=") if "=" in text else ("", "", text)
    path_ = Path(path).expanduser()
    name = name.strip() or path_.resolve().name
    if not (path_ / "adapter_config.json").is_file():
        raise TunelabError(f"{path_}: not a LoRA adapter or run folder (no adapter_config.json)")
    return name, path_


def base_id(spec: str) -> str:
    """The served id of the base model under ``spec`` (itself unless it is an adapter run)."""
    path = Path(spec).expanduser()
    if (path / "adapter_config.json").is_file():
        if (path / "config.yaml").is_file():
            from tunelab.config import load_config

            return load_config(path / "config.yaml").model.name
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        return str(config.get("base_model_name_or_path") or "base")
    return spec


def attach_adapters(model, tokenizer, base_name: str, adapters: list[str], main: str | None = None) -> ServedModels:
    """Serve ``model`` as ``base_name`` plus each adapter (``NAME=PATH`` or ``PATH``).

    ``main`` is the served id of an adapter already active in ``model`` (a run folder
    loaded with ``load_model``), which peft calls ``default``.
    """
    import time

    from tunelab.serve.engine import _is_peft

    served = ServedModels(model, tokenizer, {base_name: None})
    if main is not None:
        served.ids[main] = "default"
    for index, text in enumerate(adapters, start=1):
        name, path = parse_adapter(text)
        if name in served.ids:
            raise TunelabError(f"{text}: model id '{name}' is served twice (use NAME=PATH to rename)")
        # peft keeps adapters in module dicts whose keys cannot hold '.', so ids map to safe names.
        internal = f"adapter_{index}"
        try:
            if _is_peft(served.model):
                served.model.load_adapter(str(path), adapter_name=internal)
            else:
                from peft import PeftModel

                served.model = PeftModel.from_pretrained(served.model, str(path), adapter_name=internal)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TunelabError(f"{path}: cannot load adapter: {first}") from exc
        served.ids[name] = internal
    served.model.eval()
    now = int(time.time())
    served.created = {model_id: now for model_id in served.ids}
    return served


def load_for_serving(spec: str, adapters: list[str] | None = None, quantize: str | None = None,
                     threads: int | None = None) -> ServedModels:
    """Load ``spec`` (model, run folder or builtin) and attach the extra adapters.

    ``quantize``: serve ``spec`` (any adapter merged) as a GGUF of that type in llama.cpp."""
    import sys
    import time

    from tunelab.models import load_model, resolve_spec
    from tunelab.vision.compose import is_vision_run

    if quantize:
        from tunelab.models.gguf_runtime import load_quantized

        if adapters:
            raise TunelabError("--adapter: with --quantize the model is one merged GGUF file; serve each run "
                               "on its own port")
        model, tokenizer = load_quantized(spec, quantize, threads,
                                          log=lambda line: print(line, file=sys.stderr, flush=True))
        path = Path(spec).expanduser()
        name = path.resolve().name if path.is_dir() else spec
        return ServedModels(model, tokenizer, {name: None}, {name: int(time.time())})

    if is_vision_run(spec):  # tower + projector + LLM: requests may carry images (data: URLs)
        from tunelab.vision.compose import load_vlm

        if adapters:
            raise TunelabError(f"--adapter: {spec} is a vision-language run; extra adapters are not served with it")
        model, tokenizer = load_vlm(spec)
        return attach_adapters(model, tokenizer, Path(spec).expanduser().resolve().name, [])
    model, tokenizer = load_model(spec)
    main = None
    if resolve_spec(spec).adapter is not None:
        main = Path(spec).expanduser().resolve().name
    return attach_adapters(model, tokenizer, base_id(spec), list(adapters or []), main)
