"""Build, save and load vision-language models; a vision run folder describes itself.

A vision run folder holds, beside the usual ``config.yaml``, tokenizer (with the image
placeholder token), ``metrics.jsonl`` and README::

    vision.json                   base LLM spec, tokens per image, image token, what was saved
    vision/projector.safetensors  always
    vision/tower.safetensors      when the tower trained (else the tower spec is reloaded)
    adapter_config.json + adapter_model.safetensors   LoRA-family adapter of the LLM, or
    llm/                          the whole LLM and the tokenizer (methods full/freeze)

``vision.json`` names the *base* LLM, never the run a stage started from, so a stage-2 run
loads without its stage-1 folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from tunelab.config import ModelConfig
from tunelab.errors import TunelabError
from tunelab.io import write_json
from tunelab.vision.model import Projector, VisionLanguageModel
from tunelab.vision.settings import VisionConfig
from tunelab.vision.towers import load_tower

VISION_FILE = "vision.json"
STRUCTURE = ("tower", "layer", "feature", "multi_image", "projector", "projector_norm", "feature_norm",
             "projector_pos", "pool", "pixel_shuffle", "image_token")
"""Settings that fix the shapes of a trained projector: a later stage must keep them."""


def is_vision_run(path: str | Path) -> bool:
    return (Path(str(path)).expanduser() / VISION_FILE).is_file()


def read_info(run: str | Path) -> dict[str, Any]:
    path = Path(run).expanduser() / VISION_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TunelabError(f"{path}: cannot read: {exc}") from None


def add_image_token(tokenizer, token: str) -> int:
    """The id of ``token``, added to the tokenizer as a special token when it is not there."""
    from tokenizers import AddedToken

    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
        raise TunelabError(f"model.vision.image_token: {token!r} does not tokenize to one token")
    return int(token_id)


def _llm_config(model_cfg: ModelConfig, name: str) -> ModelConfig:
    return dataclasses.replace(model_cfg, name=name, vision=VisionConfig())


def new_vlm(model_cfg: ModelConfig, for_training: bool = True, seed: int = 42):
    """A fresh composite: ``model_cfg.name`` as the LLM, ``model_cfg.vision`` for the rest."""
    from tunelab.models import load_model

    vcfg = model_cfg.vision
    llm, tokenizer = load_model(_llm_config(model_cfg, model_cfg.name), for_training=for_training)
    tower = load_tower(vcfg, model_cfg.trust_remote_code)
    token_id = add_image_token(tokenizer, vcfg.image_token)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # same seed, same projector
        projector = Projector(vcfg.projector, tower.dim, llm.get_input_embeddings().embedding_dim,
                              vcfg.projector_norm, tower.tokens if vcfg.projector_pos else 0, vcfg.feature_norm)
    return VisionLanguageModel(tower, projector, llm, token_id, vcfg), tokenizer


def load_vlm(run: str | Path, for_training: bool = False, vision: VisionConfig | None = None):
    """``(model, tokenizer)`` from a vision run folder; ``vision`` overrides the training settings."""
    from safetensors.torch import load_file

    from tunelab.config import load_config
    from tunelab.models.loading import load_folder_tokenizer, load_model

    run = Path(run).expanduser()
    info = read_info(run)
    cfg = load_config(run / "config.yaml")
    vcfg = vision or VisionConfig(**info["vision"])
    llm_spec = str(run / info["llm_weights"]) if info.get("llm_weights") else info["llm"]
    llm, _ = load_model(_llm_config(cfg.model, llm_spec), for_training=for_training)
    if info.get("adapter"):
        from peft import PeftModel

        llm = PeftModel.from_pretrained(llm, str(run), is_trainable=for_training)
    side = "right" if for_training else "left"
    tokenizer = load_folder_tokenizer(run, cfg.model, side)
    tower = load_tower(vcfg, cfg.model.trust_remote_code)
    if info.get("tower_weights"):
        tower.encoder.load_state_dict(load_file(str(run / info["tower_weights"])))
    projector = Projector(vcfg.projector, tower.dim, llm.get_input_embeddings().embedding_dim, vcfg.projector_norm,
                          tower.tokens if vcfg.projector_pos else 0, vcfg.feature_norm)
    projector.load_state_dict(load_file(str(run / "vision" / "projector.safetensors")))
    token_id = tokenizer.convert_tokens_to_ids(vcfg.image_token)
    model = VisionLanguageModel(tower, projector, llm, token_id, vcfg)
    model.base_llm = llm_spec  # stage 1 trained the whole LLM: later stages build on its weights
    return (model if for_training else model.eval()), tokenizer


def start_vlm(model_cfg: ModelConfig, seed: int = 42):
    """The model a training run starts from: a vision run's composite (stage 2), or a fresh one.

    A later stage keeps the starting run's shape settings (``STRUCTURE``); any of them set to
    something else is an error, since the trained projector would not fit.
    """
    if not is_vision_run(model_cfg.name):
        if not model_cfg.vision.enabled:
            raise TunelabError("model.vision.tower: not set (name a tower, or start from a vision run folder)")
        model, tokenizer = new_vlm(model_cfg, True, seed)
        model.base_llm = model_cfg.name
        return model, tokenizer
    saved = VisionConfig(**read_info(model_cfg.name)["vision"])
    wanted, default = model_cfg.vision, VisionConfig()
    for key in STRUCTURE:
        value = getattr(wanted, key)
        if value != getattr(default, key) and value != getattr(saved, key):
            raise TunelabError(f"model.vision.{key}: {value!r} differs from {getattr(saved, key)!r} in "
                               f"{model_cfg.name}, the run this stage starts from")
    merged = dataclasses.replace(wanted, **{key: getattr(saved, key) for key in STRUCTURE})
    return load_vlm(model_cfg.name, for_training=True, vision=merged)


def save_vlm(model: VisionLanguageModel, tokenizer, out: Path, started_from: str | None = None) -> dict:
    """Write the projector, trained tower, LLM adapter/weights, tokenizer and ``vision.json``."""
    from peft import PeftModel
    from safetensors.torch import save_file

    out = Path(out)
    (out / "vision").mkdir(parents=True, exist_ok=True)
    save_file(_state(model.projector), str(out / "vision" / "projector.safetensors"))
    tower_trained = any(p.requires_grad for p in model.tower.parameters())
    if tower_trained:
        save_file(_state(model.tower.encoder), str(out / "vision" / "tower.safetensors"))
    if model.tower.processor is not None:
        model.tower.processor.save_pretrained(str(out / "vision"))
    llm, adapter, llm_weights = model.llm, isinstance(model.llm, PeftModel), None
    if adapter:
        llm.save_pretrained(str(out))
    elif any(p.requires_grad for p in llm.parameters()):
        llm.save_pretrained(str(out / "llm"))
        tokenizer.save_pretrained(str(out / "llm"))  # a model folder of its own: load_vlm loads it as one
        llm_weights = "llm"
    tokenizer.save_pretrained(str(out))
    info = {"format": 1, "llm": str(getattr(model, "base_llm", "")), "llm_weights": llm_weights,
            "adapter": adapter, "tower_weights": "vision/tower.safetensors" if tower_trained else None,
            "tokens_per_image": model.tokens_per_image, "tower_dim": model.tower.dim,
            "image_token": model.vision_cfg.image_token, "image_token_id": model.image_token_id,
            "vision": dataclasses.asdict(model.vision_cfg), "started_from": started_from}
    write_json(out / VISION_FILE, info)
    return info


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; every tensor gets its own contiguous copy.
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
