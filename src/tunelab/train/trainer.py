"""The SFT trainer: transformers' ``Trainer`` with the supervised loss and atomic checkpoints.

The loss is the sum of token cross-entropies over supervised tokens divided by the
number of supervised tokens in the whole optimizer step (``num_items_in_batch``,
which Trainer counts over all accumulated micro-batches and, with more than one
process, over all processes). So per-device batch 8 × accumulation 1 and batch 2 ×
accumulation 4 give the same loss and the same gradient.

Logits are computed only where a label exists: a pre-forward hook on the output
head keeps just the hidden states whose next token is supervised. The head of a
small model is a large share of its compute (SmolLM2's tied 49k × 576 head is ~21%
of the parameters), and prompt tokens carry no loss.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from tunelab.train.collate import IGNORE
from tunelab.train.prefix import (forward_with_shared_prefix, prefix_sharing_applies,
                                    shared_prefix_tokens)


@contextlib.contextmanager
def supervised_logits_only(model: nn.Module, keep: torch.Tensor):
    """Make the output head see only the hidden states at positions where ``keep`` is true.

    ``keep`` is a (batch, seq) bool mask; the head then returns logits of shape
    (1, keep.sum(), vocab), in row-major order of ``keep``. Prompt-learning methods
    prepend virtual tokens, so only the last ``seq`` hidden states are considered.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield False
        return

    def hook(module, args, kwargs):
        hidden = args[0]
        if hidden.shape[0] != keep.shape[0]:  # the one-row shared-prefix pass: no logits needed
            return (hidden[:, :0], *args[1:]), kwargs
        hidden = hidden[:, hidden.shape[1] - keep.shape[1]:]
        return (hidden[keep].unsqueeze(0), *args[1:]), kwargs

    handle = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield True
    finally:
        handle.remove()


def sft_loss(model: nn.Module, inputs: dict[str, torch.Tensor], num_items: Any = None,
             unwrapped: nn.Module | None = None, share_prefix: bool = False) -> torch.Tensor:
    """Sum of next-token losses on supervised tokens / ``num_items`` (or their count here).

    ``share_prefix``: encode the leading tokens every row shares once (``tunelab.train.prefix``;
    the caller checks ``prefix_sharing_applies``).
    """
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_real_tokens")}
    targets_mask = labels[:, 1:] != IGNORE
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets_mask
    targets = labels[:, 1:][targets_mask]
    prefix = 0
    if share_prefix and set(model_inputs) == {"input_ids", "attention_mask"}:
        prefix = shared_prefix_tokens(model_inputs["input_ids"], model_inputs["attention_mask"], keep)
    with supervised_logits_only(unwrapped if unwrapped is not None else model, keep[:, prefix:]) as gathered:
        if prefix:
            logits = forward_with_shared_prefix(model, prefix=prefix, **model_inputs).logits
        else:
            logits = model(**model_inputs, use_cache=False).logits
    if gathered:
        logits = logits.reshape(-1, logits.shape[-1])
    else:  # a model without an accessible head: full logits, then select
        logits = logits[:, -(labels.shape[1] - prefix):][keep[:, prefix:]]
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    if num_items is None:
        num_items = targets.numel()
    num_items = torch.as_tensor(num_items, device=total.device)
    return total / num_items.clamp(min=1)


class SFTTrainer(Trainer):
    """``Trainer`` with the SFT loss, token counting and checkpoints written atomically."""

    # compute_loss already divides by the step's token count: no extra division by accumulation.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, share_prefix: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        # Trainer counts num_items_in_batch only for models that take loss kwargs; our loss
        # always wants it, whatever the (peft-wrapped) model's forward signature.
        self.model_accepts_loss_kwargs = True
        self.real_tokens_seen = 0  # training tokens that are not padding (all processes)
        self.token_slots_seen = 0  # training tokens computed, padding included
        self._staging_dir: str | None = None
        self.share_prefix = share_prefix  # False, or True to use it where it applies
        self._prefix_applies: bool | None = None

    @property
    def efficiency(self) -> float | None:
        """Real tokens / tokens computed in training so far (padding and packing waste)."""
        return self.real_tokens_seen / self.token_slots_seen if self.token_slots_seen else None

    def count_tokens(self, model, inputs) -> None:
        """Add a training batch's real and computed tokens (all processes) to the efficiency count."""
        real = inputs.get("num_real_tokens")
        if model.training and real is not None:
            self.real_tokens_seen += int(real) * self.accelerator.num_processes
            self.token_slots_seen += inputs["input_ids"].numel() * self.accelerator.num_processes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.count_tokens(model, inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        loss = sft_loss(model, inputs, num_items_in_batch, unwrapped,
                        share_prefix=model.training and self._shares_prefix(model, unwrapped))
        if (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.accelerator.num_processes > 1):
            # num_items_in_batch is summed over processes while DDP averages gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss

    def _shares_prefix(self, model, unwrapped) -> bool:
        """Shared-prefix encoding, where asked for and it applies (one process, no wrapper,
        no NEFTune: its noise is scaled by the length of each embedding call)."""
        if self._prefix_applies is None:
            self._prefix_applies = bool(self.share_prefix and model is unwrapped
                                        and self.accelerator.num_processes == 1
                                        and not getattr(self.args, "neftune_noise_alpha", None)
                                        and prefix_sharing_applies(unwrapped))
        return self._prefix_applies

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` into a staging folder, then rename it into place.

        A kill during saving leaves only the staging folder, which resume ignores.
        """
        root = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        self._staging_dir = str(root / ".staging")
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank wrote its RNG state
        if self.args.should_save:
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(root / ".staging" / name, final)
            shutil.rmtree(root / ".staging", ignore_errors=True)
            rotate_checkpoints(output_dir=str(root), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
