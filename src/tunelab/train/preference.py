"""The ``dpo`` stage: preference tuning on (prompt, chosen, rejected) pairs.

Written on tunelab's own engine rather than TRL's ``DPOTrainer``: TRL brings its own
tokenisation, collator and reference-model handling, which would mean a second data
pipeline beside the SFT rendering the answers must share; the objectives themselves
are a few lines each. What is shared with SFT: the chat-template rendering and
answer-only labels (``tunelab.data.render.encode`` with only the last answer
supervised), the head that computes logits only at answer positions, the run folder,
metrics, resume and the time budget.

Objectives (``train.pref_loss``), with log-probabilities of the answer tokens only:

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log σ(β[(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))])``
  with sums over answer tokens; reward = β (log π - log π_ref);
- ``simpo`` (Meng et al. 2024): ``-log σ(β (avg log π(c) - avg log π(r)) - γ)``, token averages,
  no reference;
- ``orpo`` (Hong et al. 2024): ``-avg log π(c) + β · -log σ(log odds(c) - log odds(r))``, with
  ``odds(y) = p / (1 - p)`` of the token-averaged probability, no reference.

The DPO reference is the starting model, without a second copy of it: with a fresh
LoRA-family adapter it is the same network with the adapter disabled; otherwise (full,
freeze, continuing a run's adapter, PiSSA) its log-probabilities are computed once
before training (``train.pref_reference``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.train.collate import IGNORE, SFTCollator
from tunelab.train.gather import gather_metrics
from tunelab.train.trainer import SFTTrainer, supervised_logits_only

REFERENCE_FREE = ("orpo", "simpo")


@dataclass
class PairStats:
    kept: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0

    def summary(self) -> str:
        return (f"{self.kept} pairs kept, {self.dropped_too_long + self.dropped_no_target} dropped "
                f"({self.dropped_too_long} too long, {self.dropped_no_target} with an answer cut away)")


def encode_pairs(tokenizer: Any, pairs: list, cutoff_len: int, truncation: str) -> tuple[list[dict], PairStats]:
    """Each pair as two SFT encodings in which only the last answer is supervised."""
    from tunelab.data.render import _encode_one

    stats, examples = PairStats(), []
    for pair in pairs:
        sides = [_encode_one(tokenizer, conv, cutoff_len, truncation, True, False, "<image>")
                 for conv in (pair.chosen, pair.rejected)]
        if any(encoded is None for encoded, _ in sides):
            if any(outcome == "too_long" for _, outcome in sides):
                stats.dropped_too_long += 1
            else:
                stats.dropped_no_target += 1
            continue
        (chosen, _), (rejected, _) = sides
        stats.kept += 1
        examples.append({"chosen_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
                         "rejected_ids": rejected["input_ids"], "rejected_labels": rejected["labels"],
                         "length": max(len(chosen["input_ids"]), len(rejected["input_ids"]))})
    return examples, stats


def build_examples(cfg: RunConfig, tokenizer: Any) -> tuple[list[dict], list[dict], str]:
    from tunelab.data.pairs import load_pairs
    from tunelab.train.run import _split

    d = cfg.data
    if not d.train:
        raise TunelabError("data.train: no preference data given (rows with chosen and rejected answers)")
    pairs = load_pairs(d.train, d.dataset_dir, d.max_samples, cfg.train.seed)
    train_ex, stats = encode_pairs(tokenizer, pairs, d.cutoff_len, d.truncation)
    if not train_ex:
        raise TunelabError(f"data.train: no usable pairs ({stats.summary()})")
    train_ex, eval_ex = _split(train_ex, d.val_size, cfg.train.seed)
    if d.eval:
        eval_ex = eval_ex + encode_pairs(tokenizer, load_pairs(d.eval, d.dataset_dir, d.max_samples,
                                                               cfg.train.seed), d.cutoff_len, d.truncation)[0]
    return train_ex, eval_ex, stats.summary()


def to_dataset(examples: list[dict], cfg: RunConfig, train: bool):
    from datasets import Dataset

    return Dataset.from_list(examples)


class PairCollator:
    """A batch of B pairs as 2B padded rows: the chosen answers first, then the rejected ones."""

    def __init__(self, pad_token_id: int):
        self.rows = SFTCollator(pad_token_id)

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": p[f"{side}_ids"], "labels": p[f"{side}_labels"]}
                for side in ("chosen", "rejected") for p in pairs]
        batch = self.rows(rows)
        if "ref_chosen" in pairs[0]:
            batch["ref_logps"] = torch.tensor([p["ref_chosen"] for p in pairs] + [p["ref_rejected"] for p in pairs],
                                              dtype=torch.float32)
        return batch


def sequence_logps(model, batch: dict[str, torch.Tensor], unwrapped=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token log-probabilities, answer-token count) for every row of ``batch``."""
    labels = batch["labels"]
    targets_mask = labels[:, 1:] != IGNORE
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets_mask
    targets = labels[:, 1:][targets_mask]
    with supervised_logits_only(unwrapped if unwrapped is not None else model, keep) as gathered:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1]) if gathered else logits[:, -labels.shape[1]:][keep]
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), keep.sum(dim=1)


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-7)))


def preference_loss(kind: str, logps: torch.Tensor, counts: torch.Tensor, ref_logps: torch.Tensor | None = None,
                    beta: float = 0.1, gamma: float = 0.5, ftx: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean loss over the pairs and per-pair metrics; rows are [chosen..., rejected...]."""
    n = logps.shape[0] // 2
    chosen, rejected = logps[:n], logps[n:]
    avg_c, avg_r = chosen / counts[:n].clamp(min=1), rejected / counts[n:].clamp(min=1)
    if kind == "sigmoid":
        if ref_logps is None:
            raise ValueError("DPO needs reference log-probabilities")
        reward_c, reward_r = beta * (chosen - ref_logps[:n]), beta * (rejected - ref_logps[n:])
        losses = -F.logsigmoid(reward_c - reward_r) - ftx * avg_c
    elif kind == "simpo":
        reward_c, reward_r = beta * avg_c, beta * avg_r
        losses = -F.logsigmoid(reward_c - reward_r - gamma) - ftx * avg_c
    elif kind == "orpo":
        log_odds = (avg_c - avg_r) - (_log1m_exp(avg_c) - _log1m_exp(avg_r))
        losses = -avg_c - beta * F.logsigmoid(log_odds)
        reward_c, reward_r = beta * avg_c, beta * avg_r
    else:
        raise ValueError(f"unknown preference loss {kind!r}")
    metrics = {"reward_chosen": reward_c.detach(), "reward_rejected": reward_r.detach(),
               "reward_margin": (reward_c - reward_r).detach(),
               "reward_accuracy": (reward_c > reward_r).float().detach(),
               "logp_chosen": chosen.detach(), "logp_rejected": rejected.detach()}
    return losses.mean(), metrics


class PreferenceTrainer(SFTTrainer):
    """The SFT trainer with a preference objective; metrics join every train/eval log."""

    # compute_loss returns a mean over the micro-batch's pairs: Trainer divides by accumulation.
    loss_is_scaled_for_ga = False
    # dataset columns for precomputed reference log-probs of a batch's first and second half of rows
    ref_columns = ("ref_chosen", "ref_rejected")

    def __init__(self, *args, pref_loss: str = "sigmoid", beta: float = 0.1, gamma: float = 0.5,
                 ftx: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # no token count: the loss is a mean over pairs
        self.pref_loss, self.beta, self.gamma, self.ftx = pref_loss, beta, gamma, ftx
        self.reference: str | None = None  # "adapter" or "precompute", set by the stage
        self._stored: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def reference_logps(self, unwrapped, inputs) -> torch.Tensor | None:
        if self.pref_loss in REFERENCE_FREE:
            return None
        if "ref_logps" in inputs:
            return inputs["ref_logps"].to(self.args.device)
        if self.reference != "adapter":
            raise RuntimeError("DPO without reference log-probabilities (the stage did not set them up)")
        with torch.no_grad(), unwrapped.disable_adapter():
            return sequence_logps(unwrapped, inputs, unwrapped)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.count_tokens(model, inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        ref = self.reference_logps(unwrapped, inputs)
        logps, counts = sequence_logps(model, inputs, unwrapped)
        loss, metrics = preference_loss(self.pref_loss, logps, counts, ref, self.beta, self.gamma, self.ftx)
        stored = self._stored["train" if model.training else "eval"]
        for key, values in metrics.items():
            stored[key].extend(values.float().cpu().tolist())
        return (loss, {}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Trainer calls log on every process at the same points, so the gather cannot hang.
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        stored = gather_metrics(self._stored[split])
        for key, values in stored.items():
            if values:
                logs[f"{prefix}{key}"] = round(sum(values) / len(values), 6)
        if stored.get("reward_chosen") and stored.get("reward_rejected") and not stored.get("reward_margin"):
            # kto: unpaired rewards, so the margin is the difference of the two means
            logs[f"{prefix}reward_margin"] = round(logs[f"{prefix}reward_chosen"] - logs[f"{prefix}reward_rejected"], 6)
        self._stored[split] = defaultdict(list)
        super().log(logs, start_time)



def make_trainer(cfg: RunConfig, model, tokenizer, args, train_ds, eval_ds):
    t = cfg.train
    return PreferenceTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             data_collator=PairCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                             pref_loss=t.pref_loss, beta=t.pref_beta, gamma=t.simpo_gamma, ftx=t.pref_ftx)


def check(cfg: RunConfig) -> None:
    """Before any load: methods this stage cannot train, and a reference that cannot be."""
    stage = cfg.train.stage
    if cfg.method.name in ("prefix", "prompt"):
        raise TunelabError(f"method.name: {cfg.method.name} cannot train the {stage} stage in tunelab "
                           "(use lora, a LoRA variant, freeze or full)")
    if cfg.data.packing:
        raise TunelabError(f"data.packing: the {stage} stage keeps each answer in its own row; set data.packing=false")


def _fresh_identity_adapter(cfg: RunConfig, model, from_adapter: bool) -> bool:
    """True when disabling the adapter gives back the starting model exactly."""
    from peft import PeftModel

    from tunelab.train.peft_methods import settings

    return (isinstance(model, PeftModel) and not from_adapter
            and not model.active_peft_config.is_prompt_learning
            and settings(cfg.method).init_lora_weights in ("default", "gaussian"))  # PiSSA/OLoRA move the base


def reference_mode(cfg: RunConfig, model, from_adapter: bool) -> str | None:
    """``adapter``, ``precompute`` or None (reference-free objectives)."""
    if cfg.train.stage == "dpo" and cfg.train.pref_loss in REFERENCE_FREE:
        return None
    identity = _fresh_identity_adapter(cfg, model, from_adapter)
    wanted = cfg.train.pref_reference
    if wanted == "adapter" and not identity:
        raise TunelabError("train.pref_reference: adapter needs a fresh LoRA-family adapter (not full/freeze, "
                           "not a run's adapter continued, not PiSSA/OLoRA); use precompute or auto")
    return ("adapter" if identity else "precompute") if wanted == "auto" else wanted


def precompute_reference(trainer: PreferenceTrainer, dataset, batch_size: int):
    """``dataset`` with ``trainer.ref_columns`` (``ref_chosen``/``ref_rejected`` for pairs): the
    current (starting) model's log-probs of the first and second half of each collated batch."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    collate = trainer.data_collator
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    device = trainer.args.device
    try:
        with torch.no_grad(), trainer.compute_loss_context_manager():
            for start in range(0, len(dataset), batch_size):
                rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                batch = {k: v.to(device) for k, v in collate(rows).items()}
                logps = sequence_logps(model, batch, model)[0].cpu().tolist()
                chosen += logps[:len(rows)]
                rejected += logps[len(rows):]
    finally:
        model.train(was_training)
    first, second = trainer.ref_columns
    return dataset.add_column(first, chosen).add_column(second, rejected)


def setup(trainer: PreferenceTrainer, cfg: RunConfig, from_adapter: bool, say=print) -> dict[str, float]:
    """Decide the reference and, where needed, compute its log-probabilities once; returns the
    seconds that took, for ``train.max_time`` (timed on its clock)."""
    from tunelab.train import budget

    mode = reference_mode(cfg, trainer.accelerator.unwrap_model(trainer.model), from_adapter)
    trainer.reference = mode
    if mode == "precompute":
        started = budget.clock()
        trainer.train_dataset = precompute_reference(trainer, trainer.train_dataset, cfg.train.batch_size)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = precompute_reference(trainer, trainer.eval_dataset, cfg.train.batch_size)
        seconds = budget.clock() - started
        say(f"{cfg.train.stage} reference: the starting model's log-probs, computed once ({seconds:.1f} s)")
        return {f"{cfg.train.stage} reference log-probs": seconds}
    if mode == "adapter":
        say(f"{cfg.train.stage} reference: the policy with its adapter disabled (no second copy)")
    else:
        say(f"{cfg.train.pref_loss}: reference-free objective")
    return {}
