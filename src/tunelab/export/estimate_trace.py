"""One training step traced on torch's ``meta`` device: the tensors it really keeps, exactly.

The textbook activation formula and hand counts of "what a decoder layer saves" both miss
what a real step holds at its peak: the tensors autograd saves (which depend on the
architecture, the method — a frozen linear saves no input — and the attention
implementation), the log-probabilities and their gradients over the vocabulary, the
gradients of trainable weights appearing while activations are freed, and the temporaries
of each backward op. So the step is run for real, on meta tensors: same model class, same
method (``tunelab.train.methods``), same loss, forward and backward, but no memory and no
arithmetic, and every tensor storage is counted from its creation to its release.

``trace_step(config, ...)`` returns bytes: the most step tensors alive at once (weights and
optimizer state excluded) and what they were, what the forward leaves for the backward, the
trainable gradients, and each decoder layer's heap temporaries beyond what it keeps (``left_behind``:
in a layer that records a graph the heap does not get those back for the next layer, which is what
a checkpointed step's peak is made of). Quantized methods are traced as LoRA in the compute dtype (their
activations are the same; bitsandbytes cannot build on meta).
"""

from __future__ import annotations

import contextlib
import copy
import io
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


LARGE = 32 * 2**20
"""glibc serves allocations of 32 MiB or more (its largest mmap threshold) with their own mapping,
returned to the system when freed; smaller ones come from the heap, which keeps what was freed."""


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage an op creates until the storage is freed, by kind —
    vocabulary-wide (logits, log-probs and their gradients), else the phase that created it —
    and what of each was alive at the peak."""

    def __init__(self, persistent: set[int], vocab: int, seq: int = 0):
        super().__init__()
        self.known = set(persistent)  # weights and buffers: counted elsewhere
        self.vocab = vocab
        self.seq = seq
        self.square = 0  # heap bytes alive in (..., seq, seq) tensors: attention scores, probabilities, mask
        self.phase = "forward"
        self.live = {"forward": 0, "backward": 0, "logits": 0}
        self.large = 0  # storages of LARGE bytes or more, whatever their kind
        self.peak = 0
        self.at_peak = dict(self.live)
        self.large_at_peak = 0
        self.layer_top = None  # most heap bytes alive so far in the decoder layer running now (forward)
        self.left_behind = 0

    def heap_live(self) -> int:
        return sum(self.live.values()) - self.large

    def _unreused(self) -> int:
        # Attention's (..., seq, seq) tensors are asked for and freed in the same sizes and order in
        # every layer, so the next layer gets their holes back exactly: measured, a checkpointed
        # forward grew glibc's heap by 13.5 MB a layer at SmolLM2 1 × 512 and 28.4 MB at 8 × 128,
        # in proportion to the tokens, not to the scores (9.4 vs 4.7 MB). Only the rest is left.
        return self.heap_live() - self.square

    def enter_layer(self, *_) -> None:
        if self.phase == "forward":
            self.layer_top = self._unreused()

    def leave_layer(self, module, args, output) -> None:
        # Only a layer that records a graph (its output needs a gradient) leaves its temporaries
        # behind: autograd's small node objects, alive until the backward, are allocated between
        # them and split the freed space. A frozen layer under no graph gets its heap reused.
        records = any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(output))
        if self.phase == "forward" and self.layer_top is not None and records:
            self.left_behind += max(self.layer_top - self._unreused(), 0)
        self.layer_top = None

    def _free(self, key: int, size: int, phase: str, square: bool) -> None:
        self.live[phase] -= size
        self.large -= size if size >= LARGE else 0
        self.square -= size if square else 0
        self.known.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.known:
                    self.known.add(key)
                    kind = "logits" if t.dim() and t.shape[-1] == self.vocab else self.phase
                    self.live[kind] += storage.nbytes()
                    self.large += storage.nbytes() if storage.nbytes() >= LARGE else 0
                    square = storage.nbytes() < LARGE and t.dim() >= 2 and t.shape[-2:] == (self.seq, self.seq)
                    self.square += storage.nbytes() if square else 0
                    weakref.finalize(storage, self._free, key, storage.nbytes(), kind, square)
                    total = sum(self.live.values())
                    if self.layer_top is not None:
                        self.layer_top = max(self.layer_top, self._unreused())
                    if total > self.peak:
                        self.peak, self.at_peak, self.large_at_peak = total, dict(self.live), self.large
        return out


def _prepared(config, method: str, r: int, freeze_layers: int, dtype, gradient_checkpointing: bool):
    from transformers import AutoModelForCausalLM

    from tunelab.config import MethodConfig
    from tunelab.train.methods import get_method

    traced_as = "lora" if method == "qlora" else method
    config = copy.deepcopy(config)  # from_config sets the attention implementation on it
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):  # prepare() prints trainable counts
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
        cfg = MethodConfig(name=traced_as, r=r, freeze_trainable_layers=freeze_layers)
        model = get_method(traced_as).prepare(model, cfg)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # as the trainer does: checkpointing does nothing in eval mode
    return model


_TRACES: dict[tuple, dict] = {}


def trace_step(config, method: str = "lora", batch: int = 1, seq: int = 512, r: int = 8, freeze_layers: int = 2,
               dtype=torch.float32, gradient_checkpointing: bool = False) -> dict:
    """Bytes of one step's tensors, weights and optimizer state excluded:

    - ``peak``: most alive at once, and of those (``at_peak``) the vocabulary-wide ones
      (``logits``), the rest created by the ``forward`` (activations still held) and by the
      ``backward`` (gradients, temporaries);
    - ``saved``: alive at the end of the forward (what the backward needs);
    - ``grads`` / ``largest_grad``: trainable gradients at the end, all and the largest one;
    - ``left_behind``: over the forward's decoder layers that record a graph, the most heap (under
      ``LARGE``) bytes each had alive minus what it had alive when it returned: its freed
      temporaries, attention's (..., seq, seq) ones excepted (the next layer reuses those).

    Raises whatever the model raises on meta tensors (the caller falls back to a hand count).
    """
    key = (config.to_json_string(), method, batch, seq, r, freeze_layers, str(dtype), gradient_checkpointing)
    if key not in _TRACES:  # a few seconds for a 30-layer model: the studio asks again and again
        _TRACES[key] = _trace(config, method, batch, seq, r, freeze_layers, dtype, gradient_checkpointing)
    return copy.deepcopy(_TRACES[key])


def _trace(config, method, batch, seq, r, freeze_layers, dtype, gradient_checkpointing) -> dict:
    model = _prepared(config, method, r, freeze_layers, dtype, gradient_checkpointing)
    params = list(model.parameters())
    persistent = {p.untyped_storage()._cdata for p in params}
    persistent |= {b.untyped_storage()._cdata for b in model.buffers()}
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    mask = torch.ones(batch, seq, dtype=torch.long, device="meta")  # as the collator passes (and no packing check)
    counter = _LiveBytes(persistent, vocab, seq)
    from tunelab.train.methods import decoder_layers

    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(counter.enter_layer)
        layer.register_forward_hook(counter.leave_layer)
    with counter:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        saved = sum(counter.live.values())
        counter.phase = "backward"
        loss.backward()
        del loss
    grads = [p.grad.untyped_storage().nbytes() for p in params if p.grad is not None]
    return {"peak": counter.peak, "at_peak": counter.at_peak, "large_at_peak": counter.large_at_peak,
            "saved": saved, "grads": sum(grads), "left_behind": counter.left_behind,
            "largest_grad": max(grads, default=0)}
