"""Helpers shared by the training tests (imported as ``from train_helpers import ...``)."""

from __future__ import annotations

from transformers import TrainerCallback


class StopAt(TrainerCallback):
    """Stop at step ``step`` without saving: like a kill two steps after the last checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
