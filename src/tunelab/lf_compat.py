"""LLaMA-Factory training configs, translated into tunelab recipes.

``tunelab train lf_config.yaml`` (a YAML without tunelab's sections, with LLaMA-Factory
keys such as ``model_name_or_path`` or ``finetuning_type``) and
``tunelab train --lf-args --stage sft --model_name_or_path ... --dataset a,b ...`` read
LLaMA-Factory's flat keys and turn them into the tunelab recipe they mean:

- a key with a tunelab equivalent becomes that field (``learning_rate`` -> ``train.lr``,
  ``finetuning_type: lora`` + ``quantization_bit: 4`` -> ``method.name: qlora``);
- LLaMA-Factory's and transformers' defaults that differ from tunelab's are written out
  (``lora_alpha`` = 2 × ``lora_rank``, lr 5e-5, 3 epochs, linear schedule, no warm-up,
  cutoff 2048, ``dataset_dir: data``, fp32 unless ``bf16``), so a run means the same thing;
- a key that only tunes LLaMA-Factory's own machinery (``overwrite_cache``,
  ``preprocessing_num_workers``, ``use_cpu``, ``report_to: none``, ...) is accepted with a
  one-line note;
- a key whose meaning tunelab cannot honour is refused with one line naming it.

``template`` is checked against the model's own chat template (which tunelab always uses):
a note says whether the formats agree; a model without a chat template gets tunelab's
hand-written equivalent (``alpaca``, ``chatml``) or a refusal.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import yaml

from tunelab.aliases import note
from tunelab.errors import TunelabError

# Keys whose presence says "this is a LLaMA-Factory config" (with no tunelab section).
MARKERS = {"model_name_or_path", "stage", "finetuning_type", "do_train", "dataset", "template",
           "cutoff_len", "lora_rank", "lora_target", "per_device_train_batch_size"}

# key -> tunelab field, same meaning and values.
DIRECT = {
    "model_name_or_path": "model.name", "trust_remote_code": "model.trust_remote_code",
    "cutoff_len": "data.cutoff_len", "max_samples": "data.max_samples",
    "val_size": "data.val_size", "train_on_prompt": "data.train_on_prompt",
    "mask_history": "data.mask_history",
    "lora_rank": "method.r", "lora_alpha": "method.alpha", "lora_dropout": "method.dropout",
    "use_dora": "method.use_dora", "use_rslora": "method.use_rslora",
    "loraplus_lr_ratio": "method.loraplus_lr_ratio",
    "output_dir": "output_dir", "overwrite_output_dir": "overwrite",
    "per_device_train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "max_steps": "train.max_steps",
    "lr_scheduler_type": "train.scheduler", "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm", "seed": "train.seed",
    "logging_steps": "train.logging_steps", "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit", "eval_steps": "train.eval_steps",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "early_stopping_steps": "train.early_stopping_patience", "neftune_noise_alpha": "train.neftune_alpha",
    # the dpo stage (train.stage: dpo); pref_loss values tunelab lacks are refused by train.pref_loss
    "pref_beta": "train.pref_beta", "pref_loss": "train.pref_loss", "pref_ftx": "train.pref_ftx",
    "simpo_gamma": "train.simpo_gamma",
    "kto_chosen_weight": "train.kto_chosen_weight", "kto_rejected_weight": "train.kto_rejected_weight",
}

# Keys that tune LLaMA-Factory's or transformers' own machinery: accepted, with a note.
MACHINERY = {
    "overwrite_cache": "LLaMA-Factory's cache of preprocessed data; tunelab encodes the data in memory each run",
    "preprocessing_num_workers": "tunelab encodes in one process (fast for SFT-sized data)",
    "preprocessing_batch_size": "tunelab encodes in one process",
    "dataloader_num_workers": "tunelab loads batches in the training process",
    "dataloader_pin_memory": "transformers decides", "ddp_timeout": "the launcher's default applies",
    "use_cpu": "tunelab uses the GPU when there is one and the CPU otherwise",
    "no_cuda": "tunelab uses the GPU when there is one and the CPU otherwise",
    "plot_loss": "tunelab always writes loss.png in the run folder",
    "pissa_convert": "tunelab always saves PiSSA/OLoRA adapters converted to plain LoRA",
    "logging_dir": "trackers write inside the run folder",
    "disable_tqdm": "tunelab shows its own progress bar", "log_level": "use tunelab -v for library logs",
    "logging_first_step": "tunelab always logs the first step",
    "low_cpu_mem_usage": "transformers decides", "use_fast_tokenizer": "tunelab uses the fast tokenizer",
    "print_param_status": "tunelab prints the trainable-parameter line",
    "include_num_input_tokens_seen": "tunelab logs real tokens per second",
    "include_tokens_per_second": "tunelab logs real tokens per second",
    "include_effective_tokens_per_second": "tunelab logs real tokens per second",
    "disable_gradient_checkpointing": "tunelab trains without gradient checkpointing unless "
                                      "train.gradient_checkpointing is true",
    "per_device_eval_batch_size": "eval loss uses train.batch_size",
    "ignore_pad_token_for_loss": "padding never carries loss in tunelab",
    "enable_liger_kernel": "a speed kernel tunelab does not use",
    "use_unsloth": "a speed kernel tunelab does not use", "cache_dir": "tunelab works offline",
    "media_dir": "text-only training reads no media", "run_name": "the run is named by output_dir",
    "ddp_find_unused_parameters": "tunelab sets it", "metric_for_best_model": "tunelab watches eval loss",
    "use_reentrant_gc": "transformers decides",
}

# Boolean keys tunelab can only honour when false.
ONLY_FALSE = {
    "use_galore": "GaLore", "use_apollo": "APOLLO", "use_badam": "BAdam", "use_llama_pro": "LLaMA Pro",
    "use_adam_mini": "Adam-mini", "use_muon": "Muon", "pure_bf16": "pure bf16 training",
    "streaming": "dataset streaming", "push_to_hub": "pushing to a hub (tunelab works offline)",
    "load_best_model_at_end": "keeping the best checkpoint (tunelab keeps the last)",
    "create_new_adapter": "stacking a new adapter", "use_dft_loss": "the DFT loss",
    "do_eval": "evaluation inside train (use tunelab eval RUN)",
    "do_predict": "prediction inside train (use tunelab eval RUN)", "upcast_layernorm": "upcasting layer norms",
    "upcast_lmhead_output": "upcasting the head's output", "shift_attn": "shift short attention",
    "train_from_scratch": "training from random weights", "resize_vocab": "resizing the vocabulary",
    "torch_compile": "torch.compile", "use_swanlab": "SwanLab (use train.report_to)",
    "compute_accuracy": "token accuracy at evaluation",
    "dpo_label_smoothing": "label smoothing in DPO (cDPO)",
}

# LLaMA-Factory template -> a marker its rendering contains, and tunelab's hand-written
# equivalent for models that have no chat template of their own.
TEMPLATES: dict[str, tuple[str | None, str | None]] = {
    "qwen": ("<|im_start|>", "chatml"), "qwen2_vl": ("<|im_start|>", None), "qwen3": ("<|im_start|>", None),
    "chatml": ("<|im_start|>", "chatml"), "yi": ("<|im_start|>", "chatml"), "intern2": ("<|im_start|>", None),
    "smollm": ("<|im_start|>", None), "smollm2": ("<|im_start|>", None),
    "alpaca": ("### Instruction:", "alpaca"), "llama3": ("<|start_header_id|>", None),
    "llama2": ("[INST]", None), "mistral": ("[INST]", None), "gemma": ("<start_of_turn>", None),
    "gemma3": ("<start_of_turn>", None), "glm4": ("<|user|>", None), "phi": ("<|user|>", None),
    "deepseek3": ("<｜User｜>", None), "vicuna": ("USER:", None), "default": ("Human: ", None),
    "empty": (None, None),
}


class Translation:
    """The tunelab recipe being built, and where each LLaMA-Factory key came from."""

    def __init__(self, source: str, lines: dict[str, int] | None = None):
        self.source, self.lines = source, lines or {}
        self.values: dict[str, Any] = {}
        self.template: str | None = None

    def where(self, key: str) -> str:
        if self.source == "--lf-args":
            return f"--lf-args: --{key}"
        line = self.lines.get(key)
        return f"{self.source}:{line}: {key}" if line else f"{self.source}: {key}"

    def set(self, dotted: str, value: Any) -> None:
        *sections, name = dotted.split(".")
        node = self.values
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.values
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def refuse(self, key: str, why: str) -> TunelabError:
        return TunelabError(f"{self.where(key)}: {why}")


def _split(value: Any) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)


def _stage_field() -> str | None:
    from tunelab.config import section_fields

    return next((f"{sec}.stage" for sec, names in section_fields().items() if "stage" in names), None)


def _stage(t: Translation, key: str, value: Any, lf: dict) -> None:
    target = _stage_field()
    if value in ("rm", "ppo"):
        raise t.refuse(key, f"{value!r}: tunelab has no reward-model or PPO stage")
    if target:
        t.set(target, value)  # the stage field validates the name
    elif value != "sft":
        raise t.refuse(key, f"{value!r}: this tunelab trains only the sft stage")


def _finetuning_type(t: Translation, key: str, value: Any, lf: dict) -> None:
    bits = lf.get("quantization_bit")
    if value not in ("lora", "freeze", "full"):
        raise t.refuse(key, f"{value!r} has no tunelab method (lora, freeze, full; see method.name)")
    if bits not in (None, 4, 8):
        raise t.refuse("quantization_bit", f"{bits!r}: tunelab quantizes to 4 or 8 bits (bitsandbytes)")
    if bits and value != "lora":
        raise t.refuse("quantization_bit", f"quantized training needs finetuning_type: lora, not {value}")
    if lf.get("quantization_method", "bnb") != "bnb" and bits:
        raise t.refuse("quantization_method", f"{lf['quantization_method']!r}: tunelab quantizes with bitsandbytes")
    if lf.get("quantization_type", "nf4") != "nf4" and bits == 4:
        raise t.refuse("quantization_type", f"{lf['quantization_type']!r}: tunelab's 4-bit training uses nf4")
    name = {4: "qlora", 8: "lora8bit"}.get(bits, value)
    if value == "lora" and lf.get("pissa_init"):
        t.set("method.init_lora_weights", "pissa" if lf.get("pissa_iter", 16) == -1
              else f"pissa_niter_{lf.get('pissa_iter', 16)}")
    t.set("method.name", name)
    if value == "lora" and "lora_alpha" not in lf:
        t.set("method.alpha", 2 * int(lf.get("lora_rank", 8)))  # LLaMA-Factory's default


def _lora_target(t: Translation, key: str, value: Any, lf: dict) -> None:
    targets = _split(value)
    t.set("method.target_modules", "all-linear" if targets == ["all"] else targets)


def _freeze_layers(t: Translation, key: str, value: Any, lf: dict) -> None:
    if int(value) <= 0:
        raise t.refuse(key, f"{value}: tunelab trains the last N layers (N > 0), not the first ones")
    t.set("method.freeze_trainable_layers", int(value))


def _freeze_modules(t: Translation, key: str, value: Any, lf: dict) -> None:
    if _split(value) != ["all"]:
        raise t.refuse(key, f"{value!r}: tunelab's freeze trains whole layers (only 'all')")


def _freeze_extra(t: Translation, key: str, value: Any, lf: dict) -> None:
    extra = _split(value or [])
    if extra and not set(extra) <= {"embed_tokens", "lm_head"}:
        raise t.refuse(key, f"{value!r}: tunelab can add only the head (method.freeze_train_head)")
    if extra:
        t.set("method.freeze_train_head", True)


def _dataset(t: Translation, key: str, value: Any, lf: dict) -> None:
    names = _split(value)
    t.set("data.train", names)
    if "dataset_dir" not in lf and any(not Path(n).suffix for n in names):
        t.set("data.dataset_dir", "data")  # LLaMA-Factory's default folder


def _template(t: Translation, key: str, value: Any, lf: dict) -> None:
    if value not in TEMPLATES:
        note(f"{t.where(key)}: {value!r} is not a template tunelab knows; it uses the model's own chat template")
    t.template = str(value)


def _precision(t: Translation, key: str, value: Any, lf: dict) -> None:
    if key == "bf16" and value:
        t.set("train.bf16", True)
    elif key == "fp16" and value:
        note(f"{t.where(key)}: fp16 mixed precision is not offered; tunelab uses bf16 autocast where it "
             "measured faster (train.bf16: auto), else fp32")
        t.set("train.bf16", "auto")


def _save_strategy(t: Translation, key: str, value: Any, lf: dict) -> None:
    t.set("train.save_strategy", "no" if value is False else value)


def _eval_strategy(t: Translation, key: str, value: Any, lf: dict) -> None:
    if value in ("no", False):
        note(f"{t.where(key)}: tunelab computes eval loss whenever there is eval data (val_size, eval_dataset)")
    elif value == "epoch":
        t.set("train.eval_steps", None)
    elif value != "steps":
        raise t.refuse(key, f"{value!r} is not one of no, steps, epoch")


def _warmup_steps(t: Translation, key: str, value: Any, lf: dict) -> None:
    if not value:
        return
    steps = lf.get("max_steps", -1)
    if not steps or steps <= 0:
        raise t.refuse(key, "tunelab plans warm-up as a fraction: give warmup_ratio (or max_steps too)")
    t.set("train.warmup_ratio", int(value) / int(steps))


def _resume(t: Translation, key: str, value: Any, lf: dict) -> None:
    if value:
        t.set("train.resume", "auto" if value is True else str(value))


def _report_to(t: Translation, key: str, value: Any, lf: dict) -> None:
    trackers = [v for v in _split(value if value is not None else "none") if v != "none"]
    if trackers == ["all"]:
        raise t.refuse(key, "'all': name the trackers (tensorboard, wandb, mlflow)")
    if not trackers:
        note(f"{t.where(key)}: no tracker (tunelab's default)")
    t.set("train.report_to", trackers or "none")


def _attention(t: Translation, key: str, value: Any, lf: dict) -> None:
    choice = {"auto": "auto", "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}.get(value)
    if choice is None:
        raise t.refuse(key, f"{value!r} is not one of auto, disabled, sdpa, fa2")
    t.set("model.attn_implementation", choice)


def _do_train(t: Translation, key: str, value: Any, lf: dict) -> None:
    if not value:
        raise t.refuse(key, "false: tunelab train trains (evaluate with tunelab eval, export with tunelab export)")


def _optim(t: Translation, key: str, value: Any, lf: dict) -> None:
    if value not in ("adamw_torch", "adamw_hf", "adamw_torch_fused"):
        raise t.refuse(key, f"{value!r}: tunelab trains with AdamW (adamw_torch)")


def _double_quant(t: Translation, key: str, value: Any, lf: dict) -> None:
    if not value:
        raise t.refuse(key, "false: tunelab's 4-bit training always uses double quantization")


def _packing(t: Translation, key: str, value: Any, lf: dict) -> None:
    if value or lf.get("neat_packing"):
        note(f"{t.where(key)}: tunelab's packing keeps attention inside each example "
             "(what LLaMA-Factory calls neat_packing)")
        t.set("data.packing", True)


def _mix(t: Translation, key: str, value: Any, lf: dict) -> None:
    if value != "concat":
        raise t.refuse(key, f"{value!r}: tunelab concatenates datasets (mix them by ratio with tunelab data mix)")


RULES: dict[str, Callable[[Translation, str, Any, dict], None]] = {
    "stage": _stage, "finetuning_type": _finetuning_type, "lora_target": _lora_target,
    "freeze_trainable_layers": _freeze_layers, "freeze_trainable_modules": _freeze_modules,
    "freeze_extra_modules": _freeze_extra, "dataset": _dataset, "template": _template,
    "bf16": _precision, "fp16": _precision, "save_strategy": _save_strategy,
    "eval_strategy": _eval_strategy, "evaluation_strategy": _eval_strategy, "warmup_steps": _warmup_steps,
    "resume_from_checkpoint": _resume, "report_to": _report_to, "flash_attn": _attention,
    "do_train": _do_train, "optim": _optim, "double_quantization": _double_quant,
    "packing": _packing, "neat_packing": _packing, "mix_strategy": _mix,
    "dataset_dir": lambda t, k, v, lf: t.set("data.dataset_dir", str(v)),
    "eval_dataset": lambda t, k, v, lf: t.set("data.eval", _split(v)),
    # read by _finetuning_type
    "quantization_bit": lambda *a: None, "quantization_method": lambda *a: None,
    "quantization_type": lambda *a: None, "pissa_init": lambda *a: None, "pissa_iter": lambda *a: None,
}

# transformers' / LLaMA-Factory's defaults where tunelab's differ: written out unless given.
DEFAULTS = {"learning_rate": ("train.lr", 5e-5), "num_train_epochs": ("train.epochs", 3.0),
            "lr_scheduler_type": ("train.scheduler", "linear"), "warmup_ratio": ("train.warmup_ratio", 0.0),
            "cutoff_len": ("data.cutoff_len", 2048), "bf16": ("train.bf16", False),
            "save_strategy": ("train.save_strategy", "steps"), "save_steps": ("train.save_steps", 500),
            "group_by_length": ("data.group_by_length", False)}


def is_lf_config(values: dict) -> bool:
    """A flat mapping with LLaMA-Factory keys and none of tunelab's sections."""
    from tunelab.config import section_fields

    return not (set(values) & set(section_fields())) and bool(set(values) & MARKERS)


def translate(lf: dict[str, Any], source: str = "LLaMA-Factory config",
              lines: dict[str, int] | None = None) -> Translation:
    """The tunelab recipe (nested dict in ``.values``) that LLaMA-Factory keys ``lf`` mean."""
    t = Translation(source, lines)
    lf = dict(lf)
    if "finetuning_type" not in lf:
        lf["finetuning_type"] = "lora"  # LLaMA-Factory's default method
    for key, (dotted, value) in DEFAULTS.items():
        if key not in lf and not (key == "bf16" and lf.get("fp16")):
            t.set(dotted, value)
    for key, value in lf.items():
        if key in RULES:
            RULES[key](t, key, value, lf)
        elif key in DIRECT:
            t.set(DIRECT[key], value)
        elif key in MACHINERY:
            note(f"{t.where(key)}: accepted, not used ({MACHINERY[key] or 'tunelab decides'})")
        elif key in ONLY_FALSE:
            if value:
                shown = "true" if value is True else repr(value)
                raise t.refuse(key, f"{shown}: tunelab does not offer {ONLY_FALSE[key]}")
        elif key == "group_by_length":
            t.set("data.group_by_length", bool(value))
        else:
            raise t.refuse(key, "no tunelab equivalent (see docs/training.md, 'Coming from LLaMA-Factory')")
    return t


def key_lines(path: Path) -> dict[str, int]:
    """Line numbers of the top-level keys of a YAML mapping (for error messages)."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``--key value``, ``--key=value`` and bare ``--flag`` (true), as LLaMA-Factory's CLI reads them."""
    from tunelab.config import _fix_floats

    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise TunelabError(f"--lf-args: expected --key, got {token!r}")
        key, eq, raw = token[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            raw = True if nxt is None or nxt.startswith("--") else nxt
            i += 0 if raw is True else 1
        try:
            value = yaml.safe_load(raw) if isinstance(raw, str) and raw else raw
        except yaml.YAMLError:
            value = raw
        values[key.replace("-", "_")] = _fix_floats(value)
        i += 1
    return values


def check_template(t: Translation, cfg) -> str | None:
    """Compare LLaMA-Factory's ``template`` with the model's own chat template (notes or a refusal).

    Returns tunelab's hand-written template to use when the model has no chat template.
    """
    if t.template not in TEMPLATES or cfg.model.template:
        return None  # none given, one tunelab does not know (noted), or model.template set
    marker, hand_written = TEMPLATES[t.template]
    try:
        from tunelab.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    except TunelabError:
        note(f"{t.where('template')}: {t.template!r} not checked (the model's tokenizer did not load)")
        return None
    if not getattr(tokenizer, "chat_template", None):
        if hand_written is None:
            raise t.refuse("template", f"{t.template!r}: the model has no chat template and tunelab has no "
                           "hand-written equivalent (model.template: alpaca, chatml, human-assistant or a .jinja file)")
        note(f"{t.where('template')}: the model has no chat template; using tunelab's {hand_written!r}")
        return hand_written
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    if marker is not None and marker in rendered:
        note(f"{t.where('template')}: {t.template!r} -> the model's own chat template (the same format)")
    else:
        note(f"{t.where('template')}: {t.template!r} differs from the model's own chat template, which tunelab "
             "uses (set model.template to force another format)")
    return None


def load(path: str | Path | None = None, argv: list[str] | None = None,
         overrides: list[str] | None = None, check: bool = True):
    """A RunConfig from a LLaMA-Factory YAML ``path`` or CLI ``argv``; also returns the recipe dict."""
    from tunelab.config import RunConfig, apply_overrides, build, read_yaml

    if path is not None:
        lf, source, lines = read_yaml(path), str(path), key_lines(Path(path))
    else:
        lf, source, lines = parse_args(list(argv or [])), "--lf-args", {}
    t = translate(lf, source, lines)
    values = apply_overrides(copy.deepcopy(t.values), list(overrides or []))
    try:
        cfg = build(RunConfig, copy.deepcopy(values))
    except TunelabError as exc:
        raise TunelabError(f"{source}: {exc}") from None
    hand_written = check_template(t, cfg) if check else None
    if hand_written:
        cfg.model.template = hand_written
        values.setdefault("model", {})["template"] = hand_written
    return cfg, _ordered(values)


def _ordered(values: dict[str, Any]) -> dict[str, Any]:
    """The recipe in the order of tunelab's config (model, data, method, train, ...), fields likewise."""
    import dataclasses

    from tunelab.config import RunConfig, section_fields

    order = [f.name for f in dataclasses.fields(RunConfig)]
    fields = section_fields()
    rank = {k: i for i, k in enumerate(order)}
    out = {}
    for key in sorted(values, key=lambda k: rank.get(k, len(order))):
        value = values[key]
        if isinstance(value, dict) and key in fields:
            inner = {f: i for i, f in enumerate(fields[key])}
            value = {k: value[k] for k in sorted(value, key=lambda k: inner.get(k, len(inner)))}
        out[key] = value
    return out
