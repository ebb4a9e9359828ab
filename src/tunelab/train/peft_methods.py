"""More PEFT methods, through peft's own classes where peft has them, registered like ``lora``.

- ``dora``: weight-decomposed LoRA (``LoraConfig(use_dora=True)``); merges.
- ``rslora``: LoRA with scaling alpha / sqrt(r) (``use_rslora=True``); merges.
- ``pissa`` / ``olora``: LoRA whose A and B start from the principal singular vectors
  (PiSSA) or a QR decomposition (OLoRA) of the weight, which then holds only the residual.
  The final adapter is saved *converted* (peft's ``path_initial_model_for_weight_conversion``)
  into a plain rank-2r LoRA on the original base, so the run folder loads, serves and merges
  like any LoRA run.
- ``loraplus``: LoRA trained with a larger learning rate on B (``train.lr × method.loraplus_lr_ratio``,
  16 by default; peft's ``create_loraplus_optimizer``). Any LoRA-family method takes the ratio.
- ``ia3``: (IA)³ scaling vectors on keys, values and the feed-forward input (peft's per-model
  defaults for ``all-linear``); merges.
- ``adalora``: AdaLoRA, SVD-shaped adapters starting at ``adalora_init_r`` whose ranks are
  pruned to an average of ``r`` during training (peft's ``update_and_allocate`` after every
  optimizer step, scheduled over the run's real step count); merges. tunelab computes the
  loss itself, so AdaLoRA's orthogonality regulariser is not added.
- ``bottleneck``: seed 003's Houlsby/BNAdapter after every feed-forward block
  (``method.adapter_size``, ``adapter_activation``); no maintained library offers it for
  transformers 5, so it is ``tunelab.models.bottleneck``. Saved alone; cannot be merged.

The options of the variants combine on any LoRA-family method: ``method.use_dora``,
``use_rslora``, ``init_lora_weights``, ``loraplus_lr_ratio``.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError
from tunelab.train import methods
from tunelab.train.methods import METHODS, register

# method name -> the MethodConfig options it stands for (applied where the field is left at its default)
VARIANTS: dict[str, dict[str, Any]] = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "loraplus": {"loraplus_lr_ratio": 16.0},
}
LORA_FAMILY = ("lora", "qlora", "lora8bit", *VARIANTS)
FEED_FORWARD = {"down_proj", "fc2", "dense_4h_to_h", "w2"}  # (IA)³ scales these modules' input
_INITIAL: dict[int, str] = {}  # id(peft model) -> folder with its PiSSA/OLoRA starting adapter


def settings(cfg: MethodConfig) -> MethodConfig:
    """``cfg`` with the options that its method name stands for."""
    defaults = {f.name: f.default for f in dataclasses.fields(MethodConfig)}
    extra = {k: v for k, v in VARIANTS.get(cfg.name, {}).items() if getattr(cfg, k) == defaults[k]}
    return dataclasses.replace(cfg, **extra)


def _is_mutated_init(cfg: MethodConfig) -> bool:
    return str(cfg.init_lora_weights).startswith(("pissa", "olora"))


def prepare_variant(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """A LoRA-family adapter with the variant's options."""
    from peft import PeftModel

    cfg = settings(cfg)
    fresh = not isinstance(model, PeftModel)  # a run folder's adapter is already converted
    peft_model = methods._wrap_peft(model, methods._lora_config(cfg, model))
    if fresh and _is_mutated_init(cfg):
        # The SVD/QR start is done; marking it plain keeps a later load from decomposing again (peft's recipe).
        peft_model.peft_config[peft_model.active_adapter].init_lora_weights = True
        folder = tempfile.mkdtemp(prefix="tunelab-initial-adapter-")
        peft_model.save_pretrained(folder)  # the starting point the final adapter is converted against
        _INITIAL[id(peft_model)] = folder
    return peft_model


for _name in VARIANTS:
    register(_name)(prepare_variant)


def lora_optimizer(model: nn.Module, cfg: MethodConfig, args):
    """LoRA+ (B matrices at ``lr × loraplus_lr_ratio``) when a ratio is set, else None (Trainer's AdamW)."""
    cfg = settings(cfg)
    if cfg.loraplus_lr_ratio is None:
        return None
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=args.learning_rate, loraplus_lr_ratio=cfg.loraplus_lr_ratio,
        loraplus_weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def finalize_lora(model: nn.Module, cfg: MethodConfig, out: Path) -> None:
    """Save a PiSSA/OLoRA adapter as a plain LoRA on the original base (over the trainer's save)."""
    folder = _INITIAL.pop(id(model), None)
    if folder is None:
        return
    try:
        model.save_pretrained(str(out), path_initial_model_for_weight_conversion=folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


for _name in LORA_FAMILY:
    METHODS[_name] = dataclasses.replace(METHODS[_name], optimizer=lora_optimizer, finalize=finalize_lora)


def _ia3_config(cfg: MethodConfig):
    from peft import IA3Config

    targets = methods._target_modules(cfg)
    if targets == "all-linear":  # peft's per-architecture defaults (keys, values, feed-forward)
        return IA3Config(task_type="CAUSAL_LM")
    return IA3Config(task_type="CAUSAL_LM", target_modules=targets,
                     feedforward_modules=[t for t in targets if t in FEED_FORWARD])


@register("ia3")
def prepare_ia3(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """(IA)³: learned scaling vectors (peft ``IA3Config``)."""
    try:
        return methods._wrap_peft(model, _ia3_config(cfg))
    except (KeyError, ValueError) as exc:  # no default targets for this architecture
        raise TunelabError(f"method.target_modules: ia3 needs target modules for {type(model).__name__} "
                           f"(e.g. [k_proj, v_proj, down_proj]): {exc}") from exc


def _adalora_config(cfg: MethodConfig):
    from peft import AdaLoraConfig

    if cfg.adalora_init_r < cfg.r:
        raise TunelabError(f"method.adalora_init_r: {cfg.adalora_init_r} is below the target rank method.r={cfg.r}")
    # total_step is a placeholder: AdaLoraSchedule sets the run's real step count at the start.
    return AdaLoraConfig(task_type="CAUSAL_LM", init_r=cfg.adalora_init_r, target_r=cfg.r, lora_alpha=cfg.alpha,
                         lora_dropout=cfg.dropout, target_modules=methods._target_modules(cfg),
                         total_step=1000, tinit=0, tfinal=1, deltaT=1)


def adalora_callbacks(model: nn.Module, cfg: MethodConfig) -> list:
    from transformers import TrainerCallback

    class AdaLoraSchedule(TrainerCallback):
        """Plan AdaLoRA's budget over the run's steps and prune ranks after each optimizer step."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            total = max(2, state.max_steps)
            peft_cfg = model.peft_config[model.active_adapter]
            peft_cfg.tinit, peft_cfg.tfinal = total // 10, max(1, total // 5)
            model.base_model.rankallocator.set_total_step(total)
            peft_cfg.total_step = total

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    return [AdaLoraSchedule()]


def prepare_adalora(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """AdaLoRA (peft ``AdaLoraConfig``): adaptive ranks, average ``r``."""
    return methods._wrap_peft(model, _adalora_config(cfg))


register("adalora", callbacks=adalora_callbacks)(prepare_adalora)


def prepare_bottleneck(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Houlsby bottleneck adapters after every feed-forward block (``tunelab.models.bottleneck``)."""
    from peft import PeftModel

    from tunelab.models import bottleneck

    if isinstance(model, PeftModel):
        raise TunelabError("method.name: bottleneck cannot start from a peft adapter run; "
                           "export --merge it first")
    if not bottleneck.has_adapters(model):  # a bottleneck run folder comes with its adapters
        for param in model.parameters():
            param.requires_grad_(False)
        bottleneck.add_adapters(model, cfg.adapter_size, cfg.adapter_activation)
    for name, param in model.named_parameters():
        param.requires_grad_(".bottleneck." in name)
    methods.report_trainable(model)
    return model


def finalize_bottleneck(model: nn.Module, cfg: MethodConfig, out: Path) -> None:
    from tunelab.models import bottleneck

    bottleneck.save_adapters(model, out)


register("bottleneck", finalize=finalize_bottleneck)(prepare_bottleneck)
