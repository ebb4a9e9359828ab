"""Encode the prompt tokens that every row of a micro-batch shares once, not once per row.

Chat templates put the same tokens at the start of every example: SmolLM2 and Qwen2.5
add a default system prompt (19 and 20+ tokens), and a recipe's own system prompt is
usually fixed too. On the demo data that is about a quarter of every row. Training
encodes those tokens for one row with the cache on, copies their keys and values to
every row, and runs the rest of the batch on top. The causal mask makes this the same
computation (the prefix attends only to itself), so the loss and the gradients are
those of the plain forward pass up to float rounding; the prefix's forward and backward
are done once instead of ``rows`` times.

It applies to a single-process, unpacked, right-padded batch of a decoder with plain
full-attention caches, without gradient checkpointing (recomputation would write the
cache twice), without prompt-learning methods (they inject a cache of their own) and
without NEFTune (its noise depends on the length of each embedding call; the trainer checks).
Elsewhere, and when the shared tokens are too few to pay for the extra pass, the plain
forward pass runs.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.greedy import cache_keyword, forward_parameters, new_cache

# The prefix pass costs a little fixed time (a forward pass over a handful of tokens);
# below this many saved token positions ((rows - 1) x prefix) it does not pay.
MIN_SHARED_TOKENS = 32


def prefix_sharing_applies(model: nn.Module) -> bool:
    """Whether this (possibly peft-wrapped) model can run the shared-prefix forward pass."""
    from transformers.cache_utils import DynamicLayer

    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    checkpointing = getattr(base, "is_activation_checkpointing", None)  # transformers >= 5.x
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    if checkpointing:
        return False
    if getattr(base.config, "is_encoder_decoder", False):
        return False
    params = forward_parameters(model)
    if not {"attention_mask", "position_ids"} <= params or cache_keyword(params) is None:
        return False
    try:
        layers = new_cache(model).layers
    except (TypeError, ValueError, AttributeError):
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def shared_prefix_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         keep: torch.Tensor) -> int:
    """Leading positions that are the same real token in every row and need no logits.

    ``keep`` marks positions whose next token is supervised; those need the head, so a
    shared prefix stops before the first of them. Every row keeps at least one position
    of its own. Returns 0 when sharing would save fewer than ``MIN_SHARED_TOKENS``.
    """
    rows, width = input_ids.shape
    if rows < 2 or width < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask != 0).all(0) & ~keep.any(0)
    length = min(int(same.long().cumprod(0).sum()), width - 1)
    return length if length * (rows - 1) >= MIN_SHARED_TOKENS else 0


def forward_with_shared_prefix(model: nn.Module, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor, prefix: int):
    """The model's output for the batch, its first ``prefix`` positions encoded once.

    The output covers positions ``prefix..end`` only (the prefix needs no logits).
    """
    rows, width = input_ids.shape
    keyword = cache_keyword(forward_parameters(model))
    one = new_cache(model)
    positions = torch.arange(width, device=input_ids.device)
    # Through the model's own forward (autocast wrappers included); the head hook of
    # supervised_logits_only computes no logits for this one-row pass.
    model(input_ids=input_ids[:1, :prefix], position_ids=positions[None, :prefix], use_cache=True,
          **{keyword: one})
    cache = new_cache(model)
    for layer, shared in zip(cache.layers, one.layers):
        layer.update(shared.keys.expand(rows, -1, -1, -1), shared.values.expand(rows, -1, -1, -1))
    return model(input_ids=input_ids[:, prefix:], attention_mask=attention_mask,
                 position_ids=positions[None, prefix:].expand(rows, -1), use_cache=False,
                 **{keyword: cache})
