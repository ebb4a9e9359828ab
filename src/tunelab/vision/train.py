"""Vision-language training stages on the one engine (``tunelab.train``: SFTTrainer, its loss,
TrainingArguments, callbacks, run folders).

``model.vision.stage``:

- ``align`` — only the projector trains; the LLM and the tower are frozen (``method`` is not
  applied). This is LLaVA's stage 1 and R2GenGPT's shallow alignment.
- ``instruct`` — the projector and ``method`` on the LLM (LoRA by default) train; the tower
  too with ``train_tower``. LoRA goes on the LLM only, never on the tower.

Stage 2 starts from stage 1 by naming its run folder as ``model.name``. Each part has its own
learning rate (``projector_lr``, ``tower_lr``; the LLM takes ``train.lr``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import time
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.train.methods import get_method, report_trainable, trainable_line

SUPPORTED_METHODS = ("lora", "dora", "rslora", "ia3", "freeze", "full")
"""Methods tested on a vision run's LLM (prefix/prompt tokens, quantized loading, LoRA+ and
PiSSA conversion need hooks this trainer does not wire up yet)."""


def _refuse_unsupported(cfg: RunConfig) -> None:
    if cfg.data.packing:
        raise TunelabError("data.packing: not supported for vision runs (image spans would cross rows)")
    if cfg.train.stage != "sft":
        raise TunelabError(f"train.stage: {cfg.train.stage} is not supported for vision runs; use sft "
                           "with model.vision.stage align or instruct")
    if cfg.train.save_strategy != "no" or cfg.train.resume:
        raise TunelabError("train.save_strategy/train.resume: mid-run checkpoints are not supported for "
                           "vision runs yet; the final run folder is always saved")
    m = cfg.method
    if cfg.model.vision.stage == "instruct" and (m.name not in SUPPORTED_METHODS or m.loraplus_lr_ratio
                                                  or m.init_lora_weights not in ("default", "gaussian")):
        raise TunelabError(f"method.name: {m.name} (with these settings) is not supported for the LLM of a "
                           f"vision run; use one of {', '.join(SUPPORTED_METHODS)} with the default initialisation")


def apply_stage(model, cfg: RunConfig) -> list:
    """Freeze/unfreeze the parts for ``model.vision.stage``; returns the method's callbacks."""
    vcfg, callbacks = model.vision_cfg, []
    if vcfg.stage == "align":
        for param in model.llm.parameters():
            param.requires_grad_(False)
    else:
        method = get_method(cfg.method.name)
        # The method prints its trainable line for the LLM alone; the composite's line below is
        # the one that counts the projector and tower too, so the run shows only that one.
        with contextlib.redirect_stdout(io.StringIO()):
            model.llm = method.prepare(model.llm, cfg.method)  # the LLM only: LoRA never lands on the tower
        callbacks = list(method.callbacks(model.llm, cfg.method)) if method.callbacks else []
    for param in model.tower.parameters():
        param.requires_grad_(vcfg.train_tower)
    for param in model.projector.parameters():
        param.requires_grad_(vcfg.train_projector)
    if not any(p.requires_grad for p in model.parameters()):
        raise TunelabError("model.vision: nothing trains (projector, tower and LLM are all frozen)")
    report_trainable(model)
    return callbacks


def param_groups(model, cfg: RunConfig) -> list[dict]:
    """One AdamW group per trainable part, each with its learning rate."""
    vcfg, lr = model.vision_cfg, cfg.train.lr
    groups = []
    for part, part_lr in ((model.projector, vcfg.projector_lr), (model.tower, vcfg.tower_lr), (model.llm, None)):
        params = [p for p in part.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": part_lr or lr})
    return groups


def _layout(model):
    from tunelab.vision.data import ImageLayout

    return ImageLayout(model.vision_cfg.image_token, model.image_token_id, model.tokens_per_image,
                       model.vision_cfg.multi_image == "mean")


def build_examples(cfg: RunConfig, tokenizer, model) -> tuple[list[dict], list[dict], str]:
    """The engine's reading and splitting, with placeholders expanded and no image span cut."""
    from tunelab.train.run import build_examples as engine_build
    from tunelab.vision.data import encode_all_vision

    def encode(tok, convs, d):
        return encode_all_vision(tok, convs, _layout(model), d.cutoff_len, d.truncation, d.mask_history,
                                 d.train_on_prompt, d.dataset_dir)

    return engine_build(cfg, tokenizer, encode)


def check_data(cfg: RunConfig) -> None:
    """Every training/eval row reads and every image it names exists (opening them is ``data check``'s job)."""
    from tunelab.data.images import resolve_images
    from tunelab.data.registry import load_datasets

    d = cfg.data
    if not d.train:
        raise TunelabError("data.train: no training data given (a file path or a dataset name)")
    for specs in (d.train, d.eval):
        if specs:
            for conv in load_datasets(specs, d.dataset_dir, d.max_samples, cfg.train.seed):
                resolve_images(conv, d.dataset_dir)


def to_dataset(examples: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"], "length": len(e["input_ids"]),
                               "images": e["images"]} for e in examples])


def vision_stage(cfg: RunConfig, model):
    """``model``'s ``sft`` stage: the image collator and one optimizer group per part.

    The loss is SFTTrainer's (supervised tokens only); the engine's ``build_trainer`` adds its
    logging, progress, interrupt and thread callbacks as for a text run."""
    from tunelab.train.stages import Stage
    from tunelab.train.trainer import SFTTrainer
    from tunelab.vision.data import VisionCollator

    def make_trainer(cfg, model, tokenizer, args, train_ds, eval_ds):
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             data_collator=VisionCollator(tokenizer.pad_token_id, model.tower.preprocess),
                             processing_class=tokenizer, share_prefix=False)
        trainer.optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr,
                                              weight_decay=cfg.train.weight_decay)
        return trainer

    return Stage("sft", lambda cfg, tokenizer: build_examples(cfg, tokenizer, model),
                 lambda examples, cfg, train: to_dataset(examples), make_trainer)


def train_vlm(cfg: RunConfig, callbacks: list | None = None) -> Path:
    """Train one stage of a vision-language model; returns the run folder (``tunelab.vision.compose``)."""
    from transformers import set_seed

    from tunelab.train import run as engine
    from tunelab.train.budget import from_config
    from tunelab.vision.compose import start_vlm

    started = time.monotonic()
    _refuse_unsupported(cfg)
    budget = from_config(cfg.train)
    check_data(cfg)  # before the run folder and the model load: a bad row or a missing image fails in seconds
    out, _ = engine.prepare_folder(cfg)
    precision, threads = engine.decide_hardware(cfg)
    set_seed(cfg.train.seed)
    started_from = cfg.model.name if (Path(cfg.model.name).expanduser() / "vision.json").is_file() else None
    model, tokenizer = start_vlm(cfg.model, cfg.train.seed)
    tokenizer.padding_side = "right"
    stage = vision_stage(cfg, model)
    train_ex, eval_ex, summary_line = stage.build_examples(cfg, tokenizer)
    engine.say(f"data: {len(train_ex)} train / {len(eval_ex)} eval examples ({summary_line}); "
               f"{model.tokens_per_image} tokens per image")
    method_callbacks = apply_stage(model, cfg)
    train_ds = stage.to_dataset(train_ex, cfg, True)
    eval_ds = stage.to_dataset(eval_ex, cfg, False) if eval_ex else None
    per_step = cfg.train.batch_size * cfg.train.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
    args = engine.training_arguments(cfg, out, max(1, math.ceil(len(train_ds) / per_step)), eval_ds is not None,
                                     bf16=precision.value == "bf16")
    if budget is not None:
        budget.eval_rows = len(eval_ex)
    extra = [c for c in (budget, *method_callbacks, *(callbacks or [])) if c is not None]
    trainer, metrics, interrupt = engine.build_trainer(cfg, stage, model, tokenizer, args, train_ds, eval_ds,
                                                       out, None, extra)
    trainer.train()
    if interrupt.interrupted:
        raise KeyboardInterrupt
    if eval_ds is not None and not any("eval_loss" in r for r in metrics.records[-1:]):
        trainer.evaluate()
    summary = engine.run_summary(trainer, metrics, started, {
        "trainable": trainable_line(model), "train_examples": len(train_ex), "eval_examples": len(eval_ex),
        "encode": summary_line, "precision": "bf16 autocast" if precision.value == "bf16" else "fp32",
        "threads": f"{threads.threads} ({threads.reason})"})
    if budget is not None:
        summary["time_budget"] = budget.describe()
        engine.say(summary["time_budget"])
    if model.cache is not None:
        summary["feature_cache"] = {"hits": model.cache.hits, "misses": model.cache.misses}
    save_run(model, tokenizer, cfg, out, trainer, summary, metrics.records, started_from)
    return out


def save_run(model, tokenizer, cfg: RunConfig, out: Path, trainer, summary: dict, records: list,
             started_from: str | None) -> None:
    """The vision files (``compose.save_vlm``) plus the engine's config, state, plot and README."""
    from tunelab.config import save_config
    from tunelab.train.runfolder import plot_losses, write_readme
    from tunelab.vision.compose import save_vlm

    if not trainer.is_world_process_zero():
        return
    save_vlm(model, tokenizer, out, started_from)
    # config.yaml names the base LLM and the settings the projector was built with.
    saved = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=model.base_llm,
                                                               vision=model.vision_cfg))
    save_config(saved, out / "config.yaml")
    trainer.state.save_to_json(str(out / "trainer_state.json"))
    plot_losses(records, out / "loss.png", f"{model.vision_cfg.stage} on {model.base_llm}")
    write_readme(out, saved, summary, records)
