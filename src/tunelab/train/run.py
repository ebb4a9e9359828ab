"""``train(cfg) -> Path``: one SFT run from a RunConfig to a self-describing run folder."""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Any

from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.train.collate import pack_examples
from tunelab.train.methods import get_method, store_frozen_linears, trainable_line
from tunelab.train.runfolder import checkpoint_step, find_checkpoint, prepare_output_dir, save_run


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _split(examples: list, val_size: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random ``val_size`` (fraction < 1, or a count) for eval loss."""
    if not val_size:
        return examples, []
    n = int(val_size) if val_size >= 1 else math.ceil(len(examples) * val_size)
    if not 0 < n < len(examples):
        raise TunelabError(f"data.val_size: {val_size} leaves no training or no eval examples "
                           f"out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def build_examples(cfg: RunConfig, tokenizer, encode_all=None) -> tuple[list[dict], list[dict], str]:
    """Read, encode and split the data: (train examples, eval examples, encode summary).

    ``encode_all(tokenizer, conversations, data_cfg) -> (examples, stats)`` replaces the text
    encoding (the vision side expands image placeholders, ``tunelab.vision.train``).
    """
    from tunelab.data.registry import load_datasets
    from tunelab.data.render import encode_all as encode_text

    if not cfg.data.train:
        raise TunelabError("data.train: no training data given (a file path or a dataset name)")
    d = cfg.data
    encode_all = encode_all or (lambda tok, convs, d: encode_text(
        tok, convs, d.cutoff_len, d.truncation, d.mask_history, d.train_on_prompt))

    def encode(specs):
        return encode_all(tokenizer, load_datasets(specs, d.dataset_dir, d.max_samples, cfg.train.seed), d)

    train_ex, stats = encode(d.train)
    if not train_ex:
        raise TunelabError(f"data.train: no usable examples ({stats.summary()})")
    train_ex, eval_ex = _split(train_ex, d.val_size, cfg.train.seed)
    if d.eval:
        eval_ex = eval_ex + encode(d.eval)[0]
    return train_ex, eval_ex, stats.summary()


def to_dataset(examples: list[dict], packing: bool, max_len: int):
    """A datasets.Dataset of rows (packed or not) with a ``length`` column for grouping."""
    from datasets import Dataset

    if packing:
        rows = pack_examples(examples, max_len)
    else:
        rows = [{"input_ids": e["input_ids"], "labels": e["labels"], "length": len(e["input_ids"])}
                for e in examples]
    return Dataset.from_list(rows)


def training_arguments(cfg: RunConfig, out: Path, steps_per_epoch: int, has_eval: bool,
                       bf16: bool | None = None):
    """Map TrainConfig onto transformers' TrainingArguments (``bf16``: the hardware decision)."""
    import torch
    from transformers import TrainingArguments

    from tunelab.train import trackers

    t = cfg.train
    total = t.max_steps if t.max_steps > 0 else math.ceil(steps_per_epoch * t.epochs)
    eval_kwargs: dict[str, Any] = {"eval_strategy": "no"}
    if has_eval:
        every = t.eval_steps or (steps_per_epoch if total >= steps_per_epoch else max(1, total // 5))
        eval_kwargs = {"eval_strategy": "steps", "eval_steps": every,
                       "per_device_eval_batch_size": t.batch_size}
        if t.early_stopping_patience:
            eval_kwargs.update(metric_for_best_model="eval_loss", greater_is_better=False)
    save = {"save_strategy": t.save_strategy, "save_steps": t.save_steps,
            "save_total_limit": t.save_total_limit}
    if t.early_stopping_patience and t.save_strategy == "steps":
        eval_kwargs["eval_steps"] = t.save_steps  # keep evaluations and checkpoints aligned
    return TrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        bf16=bool(t.bf16) if bf16 is None else bf16,
        use_cpu=not torch.cuda.is_available(), activation_checkpointing=t.gradient_checkpointing,
        seed=t.seed, data_seed=t.seed, logging_steps=t.logging_steps, logging_first_step=True,
        report_to=trackers.configure(t.report_to, out) or "none", neftune_noise_alpha=t.neftune_alpha,
        remove_unused_columns=False, prediction_loss_only=True,
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        disable_tqdm=True, dataloader_num_workers=0, ddp_find_unused_parameters=False,
        **save, **eval_kwargs,
    )


def _summary(trainer, metrics, started: float, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        **extra,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "seconds": time.monotonic() - started,
        "tokens_per_second": metrics.tokens_per_second(),
        "efficiency": trainer.efficiency,
        "processes": trainer.accelerator.num_processes,
    }


def _prepare_folder(cfg: RunConfig) -> tuple[Path, str | None]:
    """The run folder and the checkpoint to resume from (the main process checks and writes)."""
    if not _is_main():
        out = Path(cfg.output_dir).expanduser()
        return out, find_checkpoint(out, cfg.train.resume)
    return prepare_output_dir(cfg)  # config.yaml is written with the model, at the end


def _build_trainer(cfg, stage, model, tokenizer, args, train_ds, eval_ds, out, checkpoint, callbacks):
    from transformers import EarlyStoppingCallback, PrinterCallback

    from tunelab.train.callbacks import MetricsLogger, ProgressBar, SaveOnInterrupt
    from tunelab.train.threads import ThreadGovernor

    trainer = stage.make_trainer(cfg, model, tokenizer, args, train_ds, eval_ds)  # collator and loss
    trainer.remove_callback(PrinterCallback)  # our progress bar shows the logs instead
    metrics = MetricsLogger(out / "metrics.jsonl", trainer, checkpoint_step(checkpoint) if checkpoint else None)
    interrupt = SaveOnInterrupt()
    for cb in [metrics, ProgressBar(metrics), interrupt, ThreadGovernor(say=_say), *(callbacks or [])]:
        trainer.add_callback(cb)
    if cfg.train.early_stopping_patience and eval_ds is not None:
        trainer.add_callback(EarlyStoppingCallback(cfg.train.early_stopping_patience))
    if cfg.train.gradient_checkpointing:  # one line for a model that cannot; a warning if it does nothing
        from tunelab.train.checkpointing import CheckpointingCheck, require_support

        require_support(trainer.model)
        trainer.add_callback(CheckpointingCheck(say=_say))
    return trainer, metrics, interrupt


def decide_hardware(cfg: RunConfig):
    """Threads and training precision for this run, decided from the measured machine."""
    from tunelab import hardware

    threads = hardware.apply_threads()
    precision = hardware.training_precision(cfg.model.precision, cfg.train.bf16)
    if precision.warning:
        hardware.warn(precision.warning)
    _say(f"hardware: {'bf16 autocast' if precision.value == 'bf16' else 'fp32'} ({precision.reason}); "
         f"{threads.threads} thread(s) ({threads.reason})")
    return precision, threads


def _say(text: str) -> None:
    if _is_main():
        print(text, flush=True)


# Public names for trainers built on this engine that load their model another way
# (``tunelab.vision.train``): the run folder, the trainer with the engine's callbacks, the
# summary, and printing from the main process only.
prepare_folder, build_trainer, run_summary, say = _prepare_folder, _build_trainer, _summary, _say


def train(cfg: RunConfig, callbacks: list | None = None) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with ``cfg.method``; return the run folder.

    ``callbacks`` are extra transformers ``TrainerCallback`` objects (tests use one to
    stop mid-run). Ctrl-C saves a checkpoint and raises ``KeyboardInterrupt``.
    """
    from tunelab.vision.settings import wants_vision

    if wants_vision(cfg.model):  # a tower -> projector -> LLM composite: tunelab.vision.train
        from tunelab.vision.train import train_vlm

        return train_vlm(cfg, callbacks)
    from transformers import set_seed

    from tunelab.models import load_model, load_tokenizer
    from tunelab.train.budget import from_config
    from tunelab.train.stages import get_stage

    started = time.monotonic()
    budget = from_config(cfg.train)  # loading the data and the model counts against train.max_time
    method = get_method(cfg.method.name)
    stage = get_stage(cfg.train.stage)
    if method.preflight:
        method.preflight(cfg.method)  # before any slow load: fail fast on this machine
    if stage.check:
        stage.check(cfg)
    # Data before weights: a bad data file fails in seconds, not after a slow model load;
    # and before the run folder, so bad data never costs the run that overwrite=true would replace.
    train_ex, eval_ex, encode_summary = stage.build_examples(cfg, load_tokenizer(cfg.model, padding_side="right"))
    out, checkpoint = _prepare_folder(cfg)
    train_ds = stage.to_dataset(train_ex, cfg, True)
    eval_ds = stage.to_dataset(eval_ex, cfg, False) if eval_ex else None
    label = "data" if cfg.train.stage == "sft" else f"{cfg.train.stage} data"
    _say(f"{label}: {len(train_ex)} train / {len(eval_ex)} eval examples ({encode_summary})"
         + (f"; packed into {len(train_ds)} rows" if "position_ids" in train_ds.column_names else ""))
    per_step = cfg.train.batch_size * cfg.train.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
    # TrainingArguments before the model: under DeepSpeed ZeRO-3 it makes loading sharded.
    precision, threads = decide_hardware(cfg)
    args = training_arguments(cfg, out, max(1, math.ceil(len(train_ds) / per_step)), eval_ds is not None,
                              bf16=precision.value == "bf16")
    set_seed(cfg.train.seed)  # adapter initialisation is random: same seed, same start
    extra = method.load_kwargs(cfg.method) if method.load_kwargs else {}
    model, tokenizer = load_model(cfg.model, for_training=True, **extra)
    from_adapter = hasattr(model, "peft_config")  # a run folder's adapter, loaded trainable
    model = method.prepare(model, cfg.method)
    if precision.value == "bf16" and cfg.train.bf16_frozen_weights:
        import torch

        store_frozen_linears(model, torch.bfloat16)
    if cfg.train.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings would cut the graph otherwise
    if budget is not None:
        budget.eval_rows = len(eval_ex)
        callbacks = [budget, *(callbacks or [])]
    if method.callbacks:
        callbacks = [*method.callbacks(model, cfg.method), *(callbacks or [])]
    trainer, metrics, interrupt = _build_trainer(
        cfg, stage, model, tokenizer, args, train_ds, eval_ds, out, checkpoint, callbacks)
    if stage.setup:
        spent = stage.setup(trainer, cfg, from_adapter, _say)  # e.g. the DPO reference
        if budget is not None:
            budget.record(spent or {})
    if method.optimizer:
        trainer.optimizer = method.optimizer(model, cfg.method, args)  # None: Trainer's own AdamW
    if checkpoint:
        _say(f"resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    if interrupt.interrupted:
        _say(f"stopped at step {trainer.state.global_step}; checkpoint saved in {out / 'checkpoints'}; "
             "continue with train.resume=auto")
        raise KeyboardInterrupt
    if eval_ds is not None and not any("eval_loss" in r and r["step"] == trainer.state.global_step
                                       for r in metrics.records):
        trainer.evaluate()  # the run always ends with an eval loss when there is eval data
    if trainer.efficiency is not None:
        _say(f"efficiency: {trainer.efficiency:.1%} of computed tokens were real "
             f"({'packed' if 'position_ids' in train_ds.column_names else 'padded'} rows)")
    summary = _summary(trainer, metrics, started, {
        "trainable": trainable_line(trainer.model), "train_examples": len(train_ex),
        "eval_examples": len(eval_ex), "encode": encode_summary,
        "precision": f"{'bf16 autocast' if precision.value == 'bf16' else 'fp32'} ({precision.reason})",
        "threads": f"{threads.threads} ({threads.reason})"})
    if budget is not None:
        summary["time_budget"] = budget.describe()
        _say(summary["time_budget"])
    save_run(trainer, tokenizer, cfg, out, summary, metrics.records)
    if method.finalize and trainer.is_world_process_zero():
        method.finalize(trainer.accelerator.unwrap_model(trainer.model), cfg.method, out)
    return out
