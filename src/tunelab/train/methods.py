"""Training methods: functions that turn a loaded model into the model that trains.

Each method is registered by name with ``@register(name)`` on a function
``prepare(model, cfg: MethodConfig) -> model``. A method may also declare
``preflight(cfg)`` — run before the model is loaded, so a method that cannot work
on this machine (QLoRA where bitsandbytes has no kernels) fails in one line before a slow load — and
``load_kwargs(cfg)`` — extra ``from_pretrained`` arguments (quantization config).
Methods that need more of the trainer declare ``optimizer(model, cfg, args)`` (an
optimizer instead of Trainer's AdamW, or None: LoRA+), ``callbacks(model, cfg)`` (trainer
callbacks: AdaLoRA's rank schedule) and ``finalize(model, cfg, out)`` (after the run folder
is written: PiSSA's conversion to plain LoRA). More PEFT methods live in
``tunelab.train.peft_methods``. The trainer only calls :func:`get_method`; it never looks
at the method's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError
from tunelab.train import quant


@dataclass
class Method:
    """A registered training method."""

    name: str
    prepare: Callable[[nn.Module, MethodConfig], nn.Module]
    preflight: Callable[[MethodConfig], None] | None = None
    load_kwargs: Callable[[MethodConfig], dict[str, Any]] | None = None
    optimizer: Callable[[nn.Module, MethodConfig, Any], Any] | None = None
    callbacks: Callable[[nn.Module, MethodConfig], list] | None = None
    finalize: Callable[[nn.Module, MethodConfig, Any], None] | None = None


METHODS: dict[str, Method] = {}


def register(name: str, *, preflight=None, load_kwargs=None, optimizer=None, callbacks=None, finalize=None):
    """Decorator: ``@register("lora")`` on ``prepare(model, cfg) -> model``."""

    def wrap(fn):
        METHODS[name] = Method(name, fn, preflight, load_kwargs, optimizer, callbacks, finalize)
        return fn

    return wrap


def get_method(name: str) -> Method:
    """The method registered under ``name`` (a one-line error names the valid ones)."""
    if name not in METHODS:
        raise TunelabError(f"method.name: unknown method {name!r} (valid: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; peft's own count when the model is a peft model."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def trainable_line(model: nn.Module) -> str:
    """The seed's line ``trainable params: N || all params: M || trainable%: P``."""
    trainable, total = count_parameters(model)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def report_trainable(model: nn.Module) -> str:
    """Print the trainable-parameter line (main process only) and return it."""
    line = trainable_line(model)
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, flush=True)
    return line


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks, found generically.

    Prefer the ModuleList whose items are the classes the model declares as
    ``_no_split_modules`` (what transformers itself treats as "a layer"); fall back
    to the longest ModuleList.
    """
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if block_names and type(module[0]).__name__ in block_names:
            return module
        if best is None or len(module) > len(best):
            best = module
    if best is None:
        raise TunelabError(f"method.name: freeze: cannot find the decoder layers of {type(model).__name__}")
    return best


def _plain(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """A model loaded from a run folder comes with its adapter: merge a LoRA in first."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    if model.active_peft_config.is_prompt_learning:
        raise TunelabError(f"method.name: {cfg.name} cannot start from a prefix/prompt-tuning run; "
                           "start from its base model instead")
    return model.merge_and_unload()


@register("full")
def prepare_full(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Every parameter trains."""
    model = _plain(model, cfg)
    for param in model.parameters():
        param.requires_grad_(True)
    report_trainable(model)
    return model


@register("freeze")
def prepare_freeze(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Only the last ``freeze_trainable_layers`` blocks (and optionally the head) train."""
    model = _plain(model, cfg)
    layers = decoder_layers(model)
    n = cfg.freeze_trainable_layers
    if not 0 < n <= len(layers):
        raise TunelabError(
            f"method.freeze_trainable_layers: {n} is not between 1 and the model's {len(layers)} layers")
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in list(layers)[-n:]:
        for param in layer.parameters():
            param.requires_grad_(True)
    if cfg.freeze_train_head:
        head = model.get_output_embeddings()
        if head is None:
            raise TunelabError("method.freeze_train_head: this model has no output head")
        for param in head.parameters():  # tied weights: the embeddings train too
            param.requires_grad_(True)
    report_trainable(model)
    return model


def _target_modules(cfg: MethodConfig) -> Any:
    targets = cfg.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return targets


def _lora_config(cfg: MethodConfig, model: nn.Module | None = None):
    from peft import LoraConfig

    init = True if cfg.init_lora_weights == "default" else cfg.init_lora_weights
    layers = _last_layers(cfg, model)
    targets = _target_modules(cfg)
    if layers is not None and targets == "all-linear":  # peft takes layer indices with names only
        targets = _linear_names(model)
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=targets, task_type="CAUSAL_LM", layers_to_transform=layers,
                      use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, init_lora_weights=init)


def _linear_names(model: nn.Module) -> list[str]:
    """What ``all-linear`` means, as module names: every linear layer but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and module is not head})


def _last_layers(cfg: MethodConfig, model: nn.Module | None) -> list[int] | None:
    """Indices of the last ``method.last_layers`` decoder layers (peft's ``layers_to_transform``)."""
    if cfg.last_layers is None:
        return None
    total = len(decoder_layers(model)) if model is not None else 0
    if not total:
        raise TunelabError("method.last_layers: no list of decoder layers found in this model")
    if not 0 < cfg.last_layers <= total:
        raise TunelabError(f"method.last_layers: {cfg.last_layers} is not between 1 and the model's {total} layers")
    return list(range(total - cfg.last_layers, total))


def _wrap_peft(model: nn.Module, peft_cfg) -> nn.Module:
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):  # started from a run folder
        if model.active_peft_config.peft_type == peft_cfg.peft_type:
            report_trainable(model)  # keep training that run's adapter (loaded trainable)
            return model
        raise TunelabError(f"method.name: cannot add a {peft_cfg.peft_type.value} adapter to a run that has a "
                           f"{model.active_peft_config.peft_type.value} adapter; export --merge it first")
    try:
        peft_model = get_peft_model(model, peft_cfg)
    except ValueError as exc:  # e.g. target modules not found in the model
        raise TunelabError(f"method: {str(exc).splitlines()[0]}") from exc
    report_trainable(peft_model)
    return peft_model


@register("lora")
def prepare_lora(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """LoRA adapters on ``target_modules`` (all linear layers but the head by default)."""
    return _wrap_peft(model, _lora_config(cfg, model))


def _prepare_kbit_lora(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _wrap_peft(model, _lora_config(cfg, model))


# bitsandbytes on a GPU or a CPU (its CPU kernels); checked by running them (tunelab.train.quant).
register("qlora", preflight=quant.preflight, load_kwargs=quant.load_kwargs)(_prepare_kbit_lora)
register("lora8bit", preflight=quant.preflight, load_kwargs=quant.load_kwargs)(_prepare_kbit_lora)


@register("prefix")
def prepare_prefix(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Prefix tuning: learned key/value prefixes in every layer."""
    from peft import PrefixTuningConfig

    return _wrap_peft(model, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                num_virtual_tokens=cfg.num_virtual_tokens))


@register("prompt")
def prepare_prompt(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Prompt tuning: learned virtual token embeddings before the input."""
    from peft import PromptTuningConfig

    return _wrap_peft(model, PromptTuningConfig(task_type="CAUSAL_LM",
                                                num_virtual_tokens=cfg.num_virtual_tokens))


def store_frozen_linears(model: nn.Module, dtype) -> int:
    """Keep frozen ``nn.Linear`` weights in ``dtype`` (bf16 under bf16 autocast).

    Autocast casts every fp32 weight to bf16 on each forward and keeps the copy for the
    backward; storing frozen weights in bf16 gives the same matmuls without the casts
    and saves their fp32 memory. Trainable weights, norms and embeddings stay fp32;
    the output head is skipped because it may be tied to the input embedding. Returns
    the number of weights converted.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    converted = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module is head or module.weight.requires_grad:
            continue
        if module.bias is not None and module.bias.requires_grad:
            continue
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
        converted += 1
    return converted


# DoRA, rsLoRA, PiSSA/OLoRA, LoRA+, (IA)³, AdaLoRA: registered on import, after the above.
from tunelab.train import peft_methods  # noqa: E402,F401
