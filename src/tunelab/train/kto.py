"""The ``kto`` stage: preference tuning on unpaired answers marked desirable or undesirable.

KTO (Ethayarajh et al. 2024) needs no pairs: each example is one prompt with one answer
and a tag (``tunelab.data.feedback``). With the log-ratio of an answer
``r = log π(y|x) - log π_ref(y|x)`` (sums over answer tokens) and a reference point
``z = max(0, mean over the micro-batch of log π(y'|x) - log π_ref(y'|x))``, where ``y'`` is
another example's answer to this prompt (an estimate of KL(π || π_ref), no gradient):

    desirable:    λ_D (1 - σ(β (r - z)))        undesirable:  λ_U (1 - σ(β (z - r)))

and the loss is the mean over the micro-batch's examples (β = ``train.pref_beta``, λ_D/λ_U =
``train.kto_chosen_weight``/``kto_rejected_weight``; ``pref_ftx`` adds that × the desirable
answers' mean token loss). The reward of an answer is β r.

The mismatched answer of every example is fixed when the data is encoded (the next example
in a seeded order whose prompt differs), so the reference log-probs of both rows can be
computed once before training, as for DPO. The reference and everything else (rendering,
answer-only log-probs, metrics, run folder) are the dpo stage's (``tunelab.train.preference``).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.train.collate import IGNORE, SFTCollator
from tunelab.train.preference import PreferenceTrainer, sequence_logps


def encode_feedback(tokenizer: Any, items: list, cutoff_len: int, truncation: str) -> tuple[list[dict], dict]:
    """Each example with only its last answer supervised; counts of what was kept and dropped."""
    from tunelab.data.render import _encode_one

    examples, counts = [], {"kept": 0, "too_long": 0, "no_target": 0}
    for item in items:
        encoded, outcome = _encode_one(tokenizer, item.conversation, cutoff_len, truncation, True, False, "<image>")
        if encoded is None:
            counts[outcome] += 1
            continue
        counts["kept"] += 1
        start = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE)
        examples.append({"input_ids": encoded["input_ids"], "labels": encoded["labels"], "answer_start": start,
                         "desirable": int(item.desirable)})
    return examples, counts


def attach_kl_rows(examples: list[dict], cutoff_len: int, seed: int) -> list[dict]:
    """Give every example a KL row: its own prompt followed by another example's answer.

    The partner is the next example in a seeded order whose prompt differs (looking at most 16
    ahead); with a single example it is that example itself.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)

    def prompt(i: int) -> list[int]:
        return examples[i]["input_ids"][:examples[i]["answer_start"]]

    out = []
    for k, i in enumerate(order):
        ahead = [order[(k + s) % len(order)] for s in range(1, min(len(order), 17))]
        j = next((j for j in ahead if prompt(j) != prompt(i)), ahead[0] if ahead else i)
        own, other = examples[i], examples[j]
        ids = (prompt(i) + other["input_ids"][other["answer_start"]:])[:cutoff_len]
        labels = ([IGNORE] * own["answer_start"] + other["labels"][other["answer_start"]:])[:cutoff_len]
        out.append({"input_ids": own["input_ids"], "labels": own["labels"], "kl_ids": ids, "kl_labels": labels,
                    "desirable": own["desirable"], "length": max(len(own["input_ids"]), len(ids))})
    return out


def build_examples(cfg: RunConfig, tokenizer: Any) -> tuple[list[dict], list[dict], str]:
    from tunelab.data.feedback import describe, load_feedback
    from tunelab.train.run import _split

    d = cfg.data
    if not d.train:
        raise TunelabError("data.train: no kto data given "
                           "(answers tagged kto_tag: true/false, or chosen/rejected pairs)")
    items = load_feedback(d.train, d.dataset_dir, d.max_samples, cfg.train.seed)
    train_ex, counts = encode_feedback(tokenizer, items, d.cutoff_len, d.truncation)
    if len(train_ex) < 2:
        raise TunelabError(f"data.train: the kto stage needs at least 2 usable examples, got {len(train_ex)} "
                           f"(one answer's KL estimate comes from another example)")
    train_ex, eval_ex = _split(train_ex, d.val_size, cfg.train.seed)
    if d.eval:
        eval_ex = eval_ex + encode_feedback(tokenizer, load_feedback(d.eval, d.dataset_dir, d.max_samples,
                                                                     cfg.train.seed), d.cutoff_len, d.truncation)[0]
    train_ex = attach_kl_rows(train_ex, d.cutoff_len, cfg.train.seed)
    eval_ex = attach_kl_rows(eval_ex, d.cutoff_len, cfg.train.seed) if eval_ex else []
    dropped = counts["too_long"] + counts["no_target"]
    summary = (f"{describe(items)}; {counts['kept']} kept, {dropped} dropped ({counts['too_long']} too long, "
               f"{counts['no_target']} with the answer cut away)")
    return train_ex, eval_ex, summary


def to_dataset(examples: list[dict], cfg: RunConfig, train: bool):
    from datasets import Dataset

    return Dataset.from_list(examples)


class FeedbackCollator:
    """B examples as 2B padded rows: the rated answers first, then the KL rows."""

    def __init__(self, pad_token_id: int):
        self.rows = SFTCollator(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = ([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
                + [{"input_ids": e["kl_ids"], "labels": e["kl_labels"]} for e in examples])
        batch = self.rows(rows)
        batch["desirable"] = torch.tensor([bool(e["desirable"]) for e in examples])
        if "ref_target" in examples[0]:
            batch["ref_logps"] = torch.tensor([e["ref_target"] for e in examples] + [e["ref_kl"] for e in examples],
                                              dtype=torch.float32)
        return batch


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor,
             desirable: torch.Tensor, beta: float = 0.1, chosen_weight: float = 1.0, rejected_weight: float = 1.0,
             counts: torch.Tensor | None = None, ftx: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean KTO loss over the examples, and per-example metrics (see the module docstring)."""
    ratio = logps - ref_logps
    kl = (kl_logps - kl_ref_logps).mean().clamp(min=0).detach()
    good = desirable.bool()
    losses = torch.where(good, chosen_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         rejected_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    if ftx:
        if counts is None:
            raise ValueError("pref_ftx needs the answer token counts")
        losses = losses + ftx * torch.where(good, -logps / counts.clamp(min=1), torch.zeros_like(logps))
    rewards = (beta * ratio).detach()
    right = torch.where(good, rewards > 0, rewards < 0).float()
    metrics = {"reward_chosen": rewards[good], "reward_rejected": rewards[~good], "reward_accuracy": right,
               "kl": kl.reshape(1), "logp_chosen": logps.detach()[good], "logp_rejected": logps.detach()[~good]}
    return losses.mean(), metrics


class KTOTrainer(PreferenceTrainer):
    """The preference trainer with KTO's loss; the reference is handled the same way."""

    ref_columns = ("ref_target", "ref_kl")

    def __init__(self, *args, chosen_weight: float = 1.0, rejected_weight: float = 1.0, **kwargs):
        super().__init__(*args, pref_loss="kto", **kwargs)
        self.chosen_weight, self.rejected_weight = chosen_weight, rejected_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.count_tokens(model, inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        n = inputs["desirable"].shape[0]
        ref = self.reference_logps(unwrapped, inputs)
        rows = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        logps, counts = sequence_logps(model, {k: v[:n] for k, v in rows.items()}, unwrapped)
        with torch.no_grad():  # the KL estimate is a reference point, not a target
            kl_logps, _ = sequence_logps(model, {k: v[n:] for k, v in rows.items()}, unwrapped)
        loss, metrics = kto_loss(logps, ref[:n], kl_logps, ref[n:], inputs["desirable"], self.beta,
                                 self.chosen_weight, self.rejected_weight, counts, self.ftx)
        stored = self._stored["train" if model.training else "eval"]
        for key, values in metrics.items():
            stored[key].extend(values.float().cpu().tolist())
        return (loss, {}) if return_outputs else loss


def make_trainer(cfg: RunConfig, model, tokenizer, args, train_ds, eval_ds):
    t = cfg.train
    return KTOTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=FeedbackCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                      beta=t.pref_beta, ftx=t.pref_ftx, chosen_weight=t.kto_chosen_weight,
                      rejected_weight=t.kto_rejected_weight)


def check(cfg: RunConfig) -> None:
    from tunelab.train.preference import check as pair_check

    pair_check(cfg)  # the same methods and no packing
    if cfg.train.pref_loss != "sigmoid":
        raise TunelabError(f"train.pref_loss: {cfg.train.pref_loss} is a dpo-stage objective; "
                           "the kto stage has its own loss (leave pref_loss unset)")
