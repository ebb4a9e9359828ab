"""A greedy decoding loop over the model's KV cache, for batches whose rows end at different steps.

transformers' ``generate`` keeps every row of a batch in every step until the longest
answer ends, re-encodes the prompt part all rows share (the system prompt and the
instruction of an evaluation set) once per row, and runs its logits processors and
stopping criteria each step. This loop gives the same greedy tokens with less work:

- the longest token prefix all prompts share is encoded once and its cache copied to
  every row (layout ``[shared prefix][padding][own suffix][answer]``, positions as if
  unpadded);
- a finished row leaves the batch at once (its cache rows are dropped), so later steps
  compute only the rows still running;
- logits come from the last position only; the only processor is min_new_tokens;
- with eager attention, grouped-query heads read their shared key/value head in place
  (``grouped_eager_attention``) instead of copying it once per query head every step.

``fast_greedy_applies`` says when the loop gives what ``generate`` would (otherwise
callers use ``generate``). Rows end through the caller's ``push(row, token) -> finished``.
"""

from __future__ import annotations

import inspect
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

# Encoding the shared prefix is one extra forward pass: about one decode step (~50 ms
# for SmolLM2-135M on 2 CPU cores), while prefill costs ~1.5-3 ms per token. Below this
# many saved tokens ((prompts - 1) x prefix length) the extra pass is not worth it.
MIN_SHARED_TOKENS = 16

# Generation-config fields that add logits processors to greedy decoding in transformers,
# or turn it into another decoding method; when a checkpoint sets any of them, the loop
# would differ, so generate() is used instead.
_PROCESSOR_FIELDS = (
    "min_length", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
    "forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty",
    "forced_decoder_ids", "guidance_scale", "watermarking_config", "encoder_no_repeat_ngram_size",
    "penalty_alpha", "dola_layers", "custom_generate",
)


def forward_parameters(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def cache_keyword(params: set[str]) -> str | None:
    # transformers 5.24 renamed the forward argument past_key_values to cache.
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=_text_config(model))


def fast_greedy_applies(model, repetition_penalty: float = 1.0) -> bool:
    """Whether ``greedy_decode`` gives exactly what transformers' greedy ``generate`` gives."""
    from transformers.cache_utils import DynamicLayer

    if repetition_penalty != 1 or getattr(model.config, "is_encoder_decoder", False):
        return False
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False  # prefix/prompt tuning injects its own cache
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return False
    generation_config = getattr(model, "generation_config", None)
    if any(getattr(generation_config, name, None) not in (None, 0, [], {}) for name in _PROCESSOR_FIELDS):
        return False
    params = forward_parameters(model)
    if not {"attention_mask", "position_ids"} <= params or cache_keyword(params) is None:
        return False
    # Rows are padded, copied and dropped along the cache's time and batch axes: only plain
    # full-attention layers allow that (a sliding window would see the padding as distance).
    return all(type(layer) is DynamicLayer for layer in new_cache(model).layers)


def shared_prefix_length(prompt_ids: Sequence[Sequence[int]]) -> int:
    """Tokens to encode once for all prompts (0 when sharing would not pay).

    Every prompt keeps at least one token of its own, whose logits start its answer.
    """
    if len(prompt_ids) < 2:
        return 0
    first, shortest = prompt_ids[0], min(len(ids) for ids in prompt_ids)
    length = 0
    while length < shortest - 1 and all(ids[length] == first[length] for ids in prompt_ids):
        length += 1
    return length if length * (len(prompt_ids) - 1) >= MIN_SHARED_TOKENS else 0


def greedy_decode(
    model,
    prompt_ids: Sequence[Sequence[int]],
    push: Callable[[int, int], bool],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_ids: set[int],
    min_new_tokens: int = 0,
    max_rows: int | None = None,
) -> None:
    """Greedy tokens for every prompt, handed to ``push(row, token)`` until it says the row is done.

    Prompts run ``max_rows`` at a time (default: all at once), in the given order; the
    next batch starts when every row of the previous one has finished, and the prefix
    all prompts share is encoded once for all batches. A row also ends after
    ``max_new_tokens``; end-of-sequence ids are masked until a row has
    ``min_new_tokens`` tokens (as transformers' MinNewTokensLengthLogitsProcessor).
    """
    with _grouped_attention(model):
        _decode(model, prompt_ids, push, max_new_tokens, pad_id, eos_ids, min_new_tokens, max_rows)


def _decode(model, prompt_ids, push, max_new_tokens, pad_id, eos_ids, min_new_tokens, max_rows) -> None:
    import torch

    batch = _Batch(model, prompt_ids, pad_id)
    waiting = deque(range(len(prompt_ids)))
    max_rows = max_rows or len(prompt_ids)
    banned = torch.tensor(sorted(eos_ids), dtype=torch.long, device=batch.device)
    counts: dict[int, int] = {}
    while waiting or batch.rows:
        if not batch.rows:
            # Filling freed places mid-batch (continuous batching) measured no faster here:
            # each admission is one more prefill pass, and fuller steps cost more per step.
            batch.start([waiting.popleft() for _ in range(min(max_rows, len(waiting)))])
        logits = batch.logits
        early = [i for i, row in enumerate(batch.rows) if counts.get(row, 0) < min_new_tokens]
        if early and len(banned):
            logits = logits.clone()
            logits[torch.tensor(early, device=batch.device)[:, None], banned] = float("-inf")
        tokens = logits.argmax(-1)
        keep = []
        for i, (row, token) in enumerate(zip(batch.rows, tokens.tolist())):
            counts[row] = counts.get(row, 0) + 1
            if not push(row, token) and counts[row] < max_new_tokens:
                keep.append(i)
        batch.keep(keep)
        if batch.rows:
            batch.step(tokens[keep] if len(keep) < len(tokens) else tokens)


class _Batch:
    """The running rows: their KV cache, attention mask, next positions and last logits."""

    def __init__(self, model, prompt_ids, pad_id: int):
        import torch

        self.model, self.prompt_ids, self.pad_id = model, prompt_ids, pad_id
        self.device = getattr(model, "device", torch.device("cpu"))
        params = forward_parameters(model)
        self.kwargs = {"use_cache": True, **({"logits_to_keep": 1} if "logits_to_keep" in params else {})}
        self.cache_key = cache_keyword(params)
        self.rows: list[int] = []
        self.cache, self.mask, self.positions, self.logits = None, None, None, None
        self.shared = shared_prefix_length(prompt_ids)
        self.prefix = None
        if self.shared:
            self.prefix = new_cache(model)
            ids = torch.tensor([list(prompt_ids[0][:self.shared])], device=self.device)
            self._forward(self.prefix, input_ids=ids, position_ids=torch.arange(self.shared, device=self.device)[None])

    def _forward(self, cache, **inputs):
        return self.model(**inputs, **{self.cache_key: cache}, **self.kwargs).logits[:, -1]

    def start(self, rows: list[int]) -> None:
        """Prefill ``rows`` (the shared prefix copied, their own suffixes encoded) as the new batch."""
        import torch

        cache = new_cache(self.model)
        if self.prefix is not None:
            for layer, prefix in zip(cache.layers, self.prefix.layers):
                layer.update(prefix.keys.expand(len(rows), -1, -1, -1), prefix.values.expand(len(rows), -1, -1, -1))
        suffixes = [list(self.prompt_ids[row][self.shared:]) for row in rows]
        width = max(len(s) for s in suffixes)
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in suffixes], device=self.device)
        mask = torch.tensor([[1] * self.shared + [0] * (width - len(s)) + [1] * len(s) for s in suffixes],
                            device=self.device)
        # Positions count real tokens only (as generate's cumsum of the attention mask).
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.logits = self._forward(cache, input_ids=ids, attention_mask=mask,
                                    position_ids=positions[:, self.shared:])
        self.cache, self.mask, self.positions, self.rows = cache, mask, positions[:, -1:], list(rows)

    def keep(self, index: list[int]) -> None:
        """Keep only these rows (positions in ``self.rows``)."""
        import torch

        if len(index) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in index]
        if not index:
            self.cache = self.mask = self.positions = self.logits = None
            return
        selected = torch.tensor(index, device=self.device)
        self.cache.batch_select_indices(selected)
        self.mask, self.positions = self.mask[selected], self.positions[selected]

    def step(self, tokens) -> None:
        """One decode step: feed each running row its last token."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=-1)
        self.positions = self.positions + 1
        self.logits = self._forward(self.cache, input_ids=tokens[:, None], attention_mask=self.mask,
                                    position_ids=self.positions)


# ---------------------------------------------------------------- attention

GROUPED_EAGER = "tunelab_grouped_eager"
# Model types whose eager attention is exactly transformers' Llama one (no soft-capping,
# sinks or sliding windows), so the grouped version computes the same thing.
_PLAIN_EAGER_MODELS = ("llama", "qwen2", "qwen3")


def grouped_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention without ``repeat_kv``: each key/value head serves its group in place.

    Eager attention copies every key/value head once per query head sharing it, over the
    whole cache, every step (for SmolLM2, 3 heads become 9): on a CPU that copy was a
    third of a 16-row decode step with one thread. Viewing the queries as
    ``(batch, kv_heads, group x length, dim)`` multiplies the same numbers without it.
    """
    import torch

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    # repeat_kv maps query head h to key/value head h // groups, as this grouping does.
    grouped = query.reshape(batch, kv_heads, groups * length, dim)
    weights = torch.matmul(grouped, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = (weights.view(batch, kv_heads, groups, length, -1) + attention_mask[:, :, None]).view(
            batch, kv_heads, groups * length, -1)
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).view(batch, heads, length, dim)
    return output.transpose(1, 2).contiguous(), None


@contextmanager
def _grouped_attention(model) -> Iterator[None]:
    """Use ``grouped_eager_attention`` while decoding, where the model runs plain eager GQA attention."""
    config = _text_config(model)
    heads, kv_heads = getattr(config, "num_attention_heads", 0), getattr(config, "num_key_value_heads", None)
    if (getattr(config, "_attn_implementation", None) != "eager" or config.model_type not in _PLAIN_EAGER_MODELS
            or not kv_heads or heads == kv_heads):
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED_EAGER, grouped_eager_attention)
    AttentionMaskInterface.register(GROUPED_EAGER, eager_mask)  # the same additive mask as eager
    config._attn_implementation = GROUPED_EAGER
    try:
        yield
    finally:
        config._attn_implementation = "eager"
