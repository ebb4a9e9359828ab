"""Whether gradient checkpointing, once asked for, really runs.

transformers recomputes a decoder layer in the backward only while that layer is in
training mode with gradients on; otherwise it runs the layer as is and keeps every
activation, without a word. A model straight from ``from_pretrained`` is in eval mode, so
``gradient_checkpointing_enable()`` on it followed by a hand-written loop saves nothing
(peak RSS halved only after ``model.train()``). transformers' ``Trainer`` calls
``model.train()`` before every step, but a model whose ``train()`` keeps some parts in
eval mode (a frozen part of a composite model) still checkpoints nothing there.

- :func:`require_support`: one line, before training, for a model that cannot checkpoint;
- :func:`ineffective_reason`: why checkpointing would do nothing in the next training
  forward (``None``: it will run);
- :class:`CheckpointingCheck`: asks that after the first optimizer step, in the model
  state the trainer really trains in, and warns once.
"""

from __future__ import annotations

from typing import Callable

from torch import nn
from transformers import TrainerCallback

from tunelab.errors import TunelabError


def require_support(model: nn.Module) -> None:
    """Refuse, in one line, a model transformers cannot checkpoint (instead of its traceback)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None)
    if enable is None or getattr(model, "supports_gradient_checkpointing", True) is False:
        raise TunelabError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient "
                           "checkpointing; set train.gradient_checkpointing=false")


def checkpointed_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose forward checkpoints while they are in training mode (decoder layers in
    transformers >= 4.48; the whole decoder in older remote code)."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: the decoder module checks the flag itself
        return flagged
    return [m for m in flagged if isinstance(m, GradientCheckpointingLayer)] or flagged


def ineffective_reason(model: nn.Module) -> str | None:
    """Why gradient checkpointing would not work in this model's next training forward, or None."""
    modules = checkpointed_modules(model)
    if not modules:
        return "no layer of the model has checkpointing enabled"
    idle = [m for m in modules if not m.training]
    if idle:
        return (f"{len(idle)} of {len(modules)} checkpointed layers are in eval mode, where transformers keeps "
                "their activations instead (call model.train() before the steps)")
    return None


class CheckpointingCheck(TrainerCallback):
    """After the first optimizer step, warn once if checkpointing did nothing in that step."""

    def __init__(self, say: Callable[[str], None] = print):
        self.say = say
        self.reason: str | None = None
        self.checked = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.checked or model is None:
            return
        self.checked = True
        self.reason = ineffective_reason(model)
        if self.reason:
            self.say(f"warning: train.gradient_checkpointing is on but saves no memory: {self.reason}")
