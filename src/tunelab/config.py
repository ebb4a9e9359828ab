"""Run configuration: one small dataclass per concern, one YAML file per run.

A recipe is a YAML mapping whose top-level keys are the sections below
(``model``, ``data``, ``method``, ``train``, ``eval``, ``export``, ``serve``) plus
``output_dir`` and ``overwrite``. Command-line overrides use dotted keys:
``train.max_steps=20 method.r=16``. Values are parsed as YAML scalars, so
``true``, ``3``, ``1e-3`` and ``[q_proj,v_proj]`` mean what they look like.

Hugging Face / peft names of fields (``train.learning_rate``, ``method.lora_rank``) are
accepted with a note of the tunelab name (``tunelab.aliases``); unknown keys are errors
that name the key and the closest valid name or alias. A LLaMA-Factory training YAML is
detected by its keys and translated (``tunelab.lf_compat``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from tunelab.errors import TunelabError
from tunelab.vision.settings import VisionConfig

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"


def _choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise TunelabError(f"{section}.{name}: {value!r} is not one of {', '.join(map(str, choices))}")


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(value: str | float, name: str = "train.max_time") -> float:
    """``10m``, ``1h30m``, ``90s``, ``1.5h`` or a number of seconds -> seconds (> 0)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        match = _DURATION.fullmatch(text)
        if text.replace(".", "", 1).isdigit():
            seconds = float(text)
        elif match and text and any(match.groups()):
            hours, minutes, secs = (float(g or 0) for g in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
        else:
            raise TunelabError(f"{name}: {value!r} is not a duration (use e.g. 10m, 1h30m, 90s "
                               "or a number of seconds)")
    if not seconds > 0 or seconds == float("inf"):
        raise TunelabError(f"{name}: {value!r} must be a positive, finite duration")
    return seconds


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL
    """Model spec: HF folder, ``.gguf`` file, tunelab run folder, or ``builtin:NAME``."""
    precision: str = "auto"
    """Weights dtype: ``auto`` (fp32 on a CPU, bf16/fp16 on a GPU), fp32, bf16, fp16. An explicit
    bf16/fp16 is kept on a CPU where it measured much slower than fp32, with a warning."""
    attn_implementation: str = "auto"
    """``auto`` (sdpa on a GPU, eager on a CPU, where sdpa with a padding mask was measured
    ~30% slower), ``sdpa``, ``eager``, or ``flash_attention_2`` (needs flash-attn and a GPU)."""
    device_map: str | None = None
    """Passed to ``from_pretrained``: ``auto`` spreads a big model over GPUs/CPU."""
    trust_remote_code: bool = False
    """Run model code shipped inside a model folder. Off unless you trust the source."""
    template: str | None = None
    """Hand-written prompt format for models without a chat template (e.g. ``human-assistant``)."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision tower, features, projector and stage (``tunelab.vision.settings``); empty tower: text-only."""

    def __post_init__(self) -> None:
        _choice("model", "precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _choice("model", "attn_implementation", self.attn_implementation,
                ("auto", "sdpa", "eager", "flash_attention_2"))


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training datasets: file paths, or names registered in ``dataset_dir``/dataset_info.json."""
    eval: list[str] = field(default_factory=list)
    """Evaluation datasets (eval loss during training; test sets for ``tunelab eval``)."""
    dataset_dir: str | None = None
    """Folder holding a LLaMA-Factory style ``dataset_info.json``; names resolve against it."""
    val_size: float = 0.0
    """Hold out this fraction (< 1) or count (>= 1) of the training rows for eval loss."""
    max_samples: int | None = None
    """Use at most this many rows per dataset (after a seeded shuffle)."""
    cutoff_len: int = 1024
    """Maximum tokens per example; longer ones follow ``truncation``."""
    truncation: str = "truncate"
    """``truncate``: cut the conversation at cutoff_len (keeping at least one supervised token);
    ``drop``: skip examples longer than cutoff_len. Counts are reported either way."""
    mask_history: bool = False
    """Learn only from the last assistant turn (default: every assistant turn)."""
    train_on_prompt: bool = False
    """Also learn from system and user tokens."""
    packing: bool = False
    """Pack several examples into one row (attention stays inside each example)."""
    group_by_length: bool = True
    """Batch examples of similar length together to cut padding."""

    def __post_init__(self) -> None:
        for key in ("train", "eval"):
            value = getattr(self, key)
            if isinstance(value, str):
                setattr(self, key, [value])
        _choice("data", "truncation", self.truncation, ("truncate", "drop"))
        if self.cutoff_len < 8:
            raise TunelabError(f"data.cutoff_len: {self.cutoff_len} is too small (minimum 8)")


@dataclass
class MethodConfig:
    name: str = "lora"
    """Training method: full, freeze, lora, qlora, lora8bit, prefix, prompt; dora, rslora, pissa,
    olora, loraplus, ia3, adalora (``tunelab.train.peft_methods``); bottleneck (Houlsby adapters)."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA alpha (scaling = alpha / r)."""
    dropout: float = 0.0
    """LoRA dropout. 0 by default: on a CPU, drawing the dropout masks took a quarter of
    each step (benchmarks/README.md), and short fine-tunes rarely need it."""
    target_modules: Any = "all-linear"
    """LoRA targets: ``all-linear`` or a list of module names (e.g. [q_proj, v_proj])."""
    last_layers: int | None = None
    """LoRA family: adapters in the last N decoder layers only (None: every layer). The
    backward pass then stops at the lowest adapted layer, so a step costs less."""
    freeze_trainable_layers: int = 2
    """``freeze``: number of last decoder layers that train."""
    freeze_train_head: bool = False
    """``freeze``: also train the output head (and tied embeddings)."""
    num_virtual_tokens: int = 16
    """``prefix``/``prompt``: number of virtual tokens."""
    compute_dtype: str = "auto"
    """``qlora``: dtype of the dequantised matmuls: ``auto`` (GPU: bf16 where it has it, else fp16; CPU: bf16
    only where ``tunelab env`` measured it faster, else fp32), bf16, fp16, fp32."""
    use_dora: bool = False
    """LoRA family: weight-decomposed LoRA (DoRA; what ``name: dora`` sets)."""
    use_rslora: bool = False
    """LoRA family: rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (``name: rslora``)."""
    init_lora_weights: str = "default"
    """LoRA family: ``default`` (B = 0), ``gaussian``, ``pissa``, ``pissa_niter_N`` (fast SVD), ``olora``
    (``name: pissa``/``olora``). PiSSA/OLoRA adapters are saved converted to plain LoRA on the original base."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: learning rate of the B matrices = train.lr × this ratio (``name: loraplus`` uses 16)."""
    adalora_init_r: int = 12
    """``adalora``: starting rank of every adapter; ranks are then pruned to an average of ``r``."""
    adapter_size: int = 64
    """``bottleneck``: inner size of the Houlsby adapter after each feed-forward block."""
    adapter_activation: str = "relu"
    """``bottleneck``: the adapter's non-linearity (any name in transformers' ACT2FN)."""

    def __post_init__(self) -> None:
        _choice("method", "name", self.name,
                ("full", "freeze", "lora", "qlora", "lora8bit", "prefix", "prompt",
                 "dora", "rslora", "pissa", "olora", "loraplus", "ia3", "adalora", "bottleneck"))
        if self.target_modules == "all":  # LLaMA-Factory's spelling
            self.target_modules = "all-linear"
        if not (self.init_lora_weights in ("default", "gaussian", "pissa", "olora")
                or re.fullmatch(r"pissa_niter_\d+", str(self.init_lora_weights))):
            raise TunelabError(f"method.init_lora_weights: {self.init_lora_weights!r} is not one of "
                               "default, gaussian, pissa, pissa_niter_N, olora")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise TunelabError(f"method.loraplus_lr_ratio: {self.loraplus_lr_ratio} must be > 0")


@dataclass
class TrainConfig:
    stage: str = "sft"
    """What the run learns (``tunelab.train.stages``): ``sft`` (answers of conversations), ``pt``
    (continued pre-training on raw text, packed, loss on every token), ``dpo`` (preference pairs;
    the objective is ``pref_loss``), ``kto`` (unpaired answers tagged desirable/undesirable)."""
    pref_loss: str = "sigmoid"
    """``dpo`` stage objective: ``sigmoid`` (DPO), ``orpo`` or ``simpo`` (both reference-free)."""
    pref_beta: float = 0.1
    """DPO/SimPO/KTO: beta (strength of the preference); ORPO: weight of the odds-ratio term."""
    simpo_gamma: float = 0.5
    """SimPO: target reward margin."""
    pref_ftx: float = 0.0
    """DPO/SimPO/KTO: add this × the chosen (KTO: desirable) answer's mean token loss (an SFT
    term); ORPO always has it."""
    kto_chosen_weight: float = 1.0
    """KTO: weight of the desirable examples' loss (raise it when they are the rarer kind)."""
    kto_rejected_weight: float = 1.0
    """KTO: weight of the undesirable examples' loss."""
    pref_reference: str = "auto"
    """DPO/KTO reference: ``adapter`` (the policy with its fresh adapter disabled: no second copy),
    ``precompute`` (the starting model's log-probs computed once before training), ``auto``
    (adapter where that equals the starting model, else precompute)."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (> 0 overrides epochs)."""
    batch_size: int = 8
    """Examples per device per forward pass."""
    grad_accum: int = 1
    """Forward passes per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate."""
    scheduler: str = "cosine"
    """Learning-rate schedule: cosine, linear, constant, constant_with_warmup."""
    warmup_ratio: float = 0.03
    """Fraction of steps spent warming up."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool | str = "auto"
    """bf16 autocast: ``auto`` uses it where it measured faster than fp32 on this machine
    (``tunelab env`` shows the rates; on AVX2-only CPUs it is ~100x slower); ``true`` asks for it
    but falls back to fp32, with a warning, where it measured much slower; ``force`` keeps it
    anyway; ``false`` trains in fp32."""
    bf16_frozen_weights: bool = True
    """With bf16, store frozen linear weights in bf16 (same matmuls, less memory, no per-step casts)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    share_prefix: bool = True
    """Encode the leading prompt tokens all rows of a micro-batch share (e.g. the template's
    default system prompt) once instead of once per row: same loss and gradients, fewer
    FLOPs. Used where it applies (one process, no packing, no gradient checkpointing)."""
    seed: int = 42
    logging_steps: int = 1
    eval_steps: int | None = None
    """Evaluate every N steps (default: once per epoch when there is eval data)."""
    save_strategy: str = "no"
    """Checkpoints: ``no``, ``steps``, ``epoch``. The final model is always saved."""
    save_steps: int = 100
    save_total_limit: int | None = 2
    """Keep only the newest K checkpoints."""
    early_stopping_patience: int | None = None
    """Stop when eval loss has not improved for this many evaluations."""
    resume: str | None = None
    """``auto`` resumes from the newest checkpoint in output_dir, or give a checkpoint path."""
    max_time: str | float | None = None
    """Wall-clock budget for the whole run (``10m``, ``1h30m``, ``90s`` or seconds): the step
    count is re-planned from measured step, eval and save times so that warm-up, decay, evals
    and the final save all fit. It only ever shortens the run that epochs/max_steps give."""
    neftune_alpha: float | None = None
    """NEFTune: add uniform noise scaled by alpha / sqrt(seq_len × hidden) to the input
    embeddings while training (transformers' ``neftune_noise_alpha``; 5 is the paper's value)."""
    report_to: str | list[str] = "none"
    """Experiment trackers (transformers' integrations), files inside the run folder:
    ``tensorboard`` (``tb/``), ``wandb`` (offline, ``wandb/``), ``mlflow`` (``mlruns/``), ``none``."""

    def __post_init__(self) -> None:
        if self.save_strategy is False:  # YAML 1.1 reads a bare `no` as false
            self.save_strategy = "no"
        if self.resume is True:  # resume_from_checkpoint: true
            self.resume = "auto"
        trackers = self.report_to if isinstance(self.report_to, list) else str(self.report_to or "none").split(",")
        self.report_to = [t.strip() for t in trackers if t.strip() and t.strip() != "none"] or "none"
        for tracker in self.report_to if isinstance(self.report_to, list) else []:
            _choice("train", "report_to", tracker, ("tensorboard", "wandb", "mlflow", "none"))
        _choice("train", "scheduler", self.scheduler,
                ("cosine", "linear", "constant", "constant_with_warmup"))
        _choice("train", "save_strategy", self.save_strategy, ("no", "steps", "epoch"))
        _choice("train", "bf16", self.bf16, (True, False, "auto", "force"))
        _choice("train", "stage", self.stage, ("sft", "pt", "dpo", "kto"))
        for name in ("kto_chosen_weight", "kto_rejected_weight"):
            if getattr(self, name) <= 0:
                raise TunelabError(f"train.{name}: {getattr(self, name)} must be > 0")
        _choice("train", "pref_loss", self.pref_loss, ("sigmoid", "orpo", "simpo"))
        _choice("train", "pref_reference", self.pref_reference, ("auto", "adapter", "precompute"))
        if self.max_time is not None:
            parse_duration(self.max_time)


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=list)
    """Models to compare (specs or run folders); the first is the baseline."""
    datasets: list[str] = field(default_factory=list)
    """Test sets (paths or registry names)."""
    metrics: list[str] = field(default_factory=lambda: ["em", "bleu", "rouge"])
    """Metric names (see ``tunelab.eval.metrics``)."""
    batch_size: int = 16
    max_new_tokens: int = 64
    preset: str = "greedy"
    """Generation preset: greedy, sampling, beam."""
    generation: dict[str, Any] = field(default_factory=dict)
    """Generation settings over the preset, by ``tunelab.generation.GenerationSettings`` name, e.g.
    R2GenGPT's ``{num_beams: 3, min_new_tokens: 80, repetition_penalty: 1.2, no_repeat_ngram_size: 2}``."""
    max_samples: int | None = None
    quantize: str | None = None
    """Evaluate each model as a GGUF of this type in llama.cpp (``f16``, ``q8_0``, ``q5_0``, ``q4_0``,
    ``q4_1``; ``tunelab.models.gguf_runtime``), exported once and cached; None: transformers."""
    output_dir: str | None = None
    """Where report.md/html/json go (default: <output_dir>/eval)."""
    judge_base_url: str | None = None
    """Also judge every answer with this OpenAI-compatible endpoint (LLM-as-judge)."""
    judge_model: str | None = None
    """Model name the judge endpoint serves."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the judge's API key (never the key itself in a file)."""


@dataclass
class ExportConfig:
    merge: bool = True
    """Merge LoRA weights into the base model."""
    out: str | None = None
    """Destination folder."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Bind address; loopback unless you mean to expose the server."""
    port: int = 8000
    api_key: str | None = None
    """Require ``Authorization: Bearer KEY`` (also read from TUNELAB_API_KEY)."""
    adapters: list[str] = field(default_factory=list)
    """Extra LoRA run folders served beside the base model, chosen by the request's model."""
    max_queue: int = 64
    """Requests waiting beyond this get 503."""
    max_batch: int = 8
    """Requests generated together in one batch."""


@dataclass
class RunConfig:
    output_dir: str = "runs/latest"
    """Run folder; refused if it already holds a run unless overwrite is true."""
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def section_fields() -> dict[str, list[str]]:
    """Each section's field names (``{"train": ["epochs", ...], ...}``), for aliases and hints."""
    hints = get_type_hints(RunConfig)
    return {f.name: [g.name for g in fields(hints[f.name])] for f in fields(RunConfig)
            if dataclasses.is_dataclass(hints[f.name])}


def build(cls: type, values: dict[str, Any] | None, prefix: str = "") -> Any:
    """Turn a nested mapping into dataclass ``cls``, rejecting unknown keys.

    Other projects' names for a field (``learning_rate`` for ``train.lr``) are accepted
    with a note; see :mod:`tunelab.aliases`.
    """
    from tunelab import aliases

    values = values or {}
    if not isinstance(values, dict):
        raise TunelabError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    sections = section_fields()
    section = prefix.rstrip(".")
    values = aliases.resolve(section, values, names, sections if cls is RunConfig else None)
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise aliases.unknown_key(section, str(key), names, sections)
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            value = build(kind, value, f"{prefix}{key}.")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TunelabError(f"config section '{prefix.rstrip('.')}': {exc}") from exc


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-3`` -> (["train", "lr"], 0.001)."""
    if "=" not in text:
        raise TunelabError(f"override '{text}' must look like key=value (e.g. train.max_steps=10)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)
    return key.strip().split("."), value


def _looks_like_float(text: str) -> bool:
    # YAML 1.1 reads "1e-3" as a string; users mean a number.
    try:
        float(text)
    except ValueError:
        return False
    return any(c in text.lower() for c in "e.")


def _fix_floats(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _fix_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fix_floats(v) for v in obj]
    if isinstance(obj, str) and _looks_like_float(obj) and not obj.strip().startswith("."):
        return float(obj)
    return obj


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    from tunelab import aliases

    for text in overrides:
        keys, value = parse_override(text)
        keys = aliases.canonical(keys, section_fields())  # an override replaces the field it names
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise TunelabError(f"override '{text}': '{key}' is not a section")
        node[keys[-1]] = value
    return values


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: recipe file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise TunelabError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(values, dict):
        raise TunelabError(f"{path}: a recipe must be a YAML mapping")
    return _fix_floats(values)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe (or start from defaults) and apply ``key=value`` overrides.

    A LLaMA-Factory training YAML (flat LLaMA-Factory keys, no tunelab section) is
    translated first (:func:`tunelab.lf_compat.load`).
    """
    values = read_yaml(path) if path else {}
    if path:
        from tunelab import lf_compat

        if lf_compat.is_lf_config(values):
            return lf_compat.load(path, overrides=overrides)[0]
    values = apply_overrides(values, list(overrides or []))
    try:
        return build(RunConfig, values)
    except TunelabError as exc:
        raise TunelabError(f"{path}: {exc}" if path else str(exc)) from None


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    from tunelab.io import atomic_write_text

    return atomic_write_text(path, cfg.to_yaml())
