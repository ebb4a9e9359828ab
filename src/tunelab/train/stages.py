"""Training stages (``train.stage``): what a run learns from, registered by name like methods.

A stage reads and encodes its data, turns the examples into a dataset, and builds the
trainer (collator and loss); the training loop in ``tunelab.train.run`` never looks at
the stage's name.

- ``sft``: conversations, loss on the answers (``tunelab.train.trainer``);
- ``pt``: raw text, packed with documents kept apart, loss on every token
  (``tunelab.train.pretrain``; SFT's loss and trainer);
- ``dpo``: preference pairs with ``train.pref_loss`` = sigmoid (DPO), orpo or simpo
  (``tunelab.train.preference``);
- ``kto``: unpaired answers tagged desirable or undesirable, KTO's loss
  (``tunelab.train.kto``; the dpo stage's reference handling).

Every stage writes the same run folder, so a ``pt`` run is a ``model.name`` for ``sft``,
and an ``sft`` run one for ``dpo``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tunelab.config import RunConfig
from tunelab.errors import TunelabError


@dataclass
class Stage:
    """A registered stage."""

    name: str
    build_examples: Callable[[RunConfig, Any], tuple[list, list, str]]
    """(cfg, tokenizer) -> (train examples, eval examples, a one-line encode summary)."""
    to_dataset: Callable[[list, RunConfig, bool], Any]
    """(examples, cfg, is_train) -> a datasets.Dataset."""
    make_trainer: Callable[..., Any]
    """(cfg, model, tokenizer, args, train_ds, eval_ds) -> a transformers Trainer."""
    check: Callable[[RunConfig], None] | None = None
    """Before any load: refuse settings the stage cannot train (one line)."""
    setup: Callable[..., dict[str, float]] | None = None
    """(trainer, cfg, from_adapter, say) after the trainer is built, before training; returns the
    seconds of any slow work it did, by name, timed on ``tunelab.train.budget.clock`` (the time
    budget counts them and says so)."""


def _sft_examples(cfg: RunConfig, tokenizer):
    from tunelab.train.run import build_examples

    return build_examples(cfg, tokenizer)


def _sft_dataset(examples: list, cfg: RunConfig, train: bool):
    from tunelab.train.run import to_dataset

    return to_dataset(examples, cfg.data.packing and train, cfg.data.cutoff_len)


def _sft_trainer(cfg: RunConfig, model, tokenizer, args, train_ds, eval_ds):
    from tunelab.train.collate import SFTCollator
    from tunelab.train.trainer import SFTTrainer

    return SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=SFTCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                      share_prefix=cfg.train.share_prefix)


def _pt_examples(cfg: RunConfig, tokenizer):
    from tunelab.train.pretrain import build_examples

    return build_examples(cfg, tokenizer)


def _pt_dataset(examples: list, cfg: RunConfig, train: bool):
    from tunelab.train.pretrain import to_dataset

    return to_dataset(examples, cfg, train)


def _pt_check(cfg: RunConfig) -> None:
    from tunelab.train.pretrain import check

    check(cfg)


def _lazy(module: str, name: str) -> Callable:
    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(f"tunelab.train.{module}"), name)(*args, **kwargs)

    return call


def _dpo(name: str) -> Callable:
    return _lazy("preference", name)


STAGES: dict[str, Stage] = {
    "sft": Stage("sft", _sft_examples, _sft_dataset, _sft_trainer),
    "pt": Stage("pt", _pt_examples, _pt_dataset, _sft_trainer, check=_pt_check),
    "dpo": Stage("dpo", _dpo("build_examples"), _dpo("to_dataset"), _dpo("make_trainer"),
                 check=_dpo("check"), setup=_dpo("setup")),
    "kto": Stage("kto", _lazy("kto", "build_examples"), _lazy("kto", "to_dataset"), _lazy("kto", "make_trainer"),
                 check=_lazy("kto", "check"), setup=_dpo("setup")),
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise TunelabError(f"train.stage: unknown stage {name!r} (valid: {', '.join(STAGES)})")
    return STAGES[name]
