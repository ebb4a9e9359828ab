"""Gradient checkpointing that silently does nothing is detected, and tunelab's own training path
really recomputes (a tiny random Llama)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import TrainerCallback

from tunelab.errors import TunelabError
from tunelab.train import checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")


def _count_forward(module, counter: list) -> None:
    """Count ``module``'s forward runs (a forward hook would miss the recompute, which torch runs without hooks)."""
    original = module.forward

    def forward(*args, **kwargs):
        counter.append(1)
        return original(*args, **kwargs)

    module.forward = forward


class CountMLP(TrainerCallback):
    """Counts runs of layer 0's MLP in training: 1 per micro-batch without a recompute, 2 with."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.runs = []
        layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
        _count_forward(layer.mlp, self.runs)


def _mlp_calls(model, ids) -> int:
    runs = []
    mlp = model.model.layers[0].mlp
    _count_forward(mlp, runs)
    model(input_ids=ids, labels=ids).loss.backward()
    del mlp.forward  # back to the class's forward
    return len(runs)


def test_eval_mode_is_named_and_really_skips_the_recompute(tiny_llama):
    model = copy.deepcopy(tiny_llama)  # eval mode, as from_pretrained returns a model
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert checkpointing.ineffective_reason(model) == "no layer of the model has checkpointing enabled"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert "2 of 2 checkpointed layers are in eval mode" in checkpointing.ineffective_reason(model)
    assert _mlp_calls(model, ids) == 1  # what the reason says: no recompute in the backward
    model.train()
    assert checkpointing.ineffective_reason(model) is None
    assert _mlp_calls(model, ids) == 2  # the layer ran again in the backward


def test_callback_warns_once_and_unsupported_models_get_one_line(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    said = []
    check = checkpointing.CheckpointingCheck(say=said.append)
    check.on_step_end(None, None, None, model=model)
    check.on_step_end(None, None, None, model=model)
    assert len(said) == 1 and said[0].startswith("warning: train.gradient_checkpointing is on but saves no memory")
    with pytest.raises(TunelabError, match=r"^train.gradient_checkpointing: Sequential does not support"):
        checkpointing.require_support(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    checkpointing.require_support(model)


def test_training_with_checkpointing_recomputes_and_does_not_warn(tiny_dir, tmp_path, capsys):
    from tunelab.config import load_config
    from tunelab.train import train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n"
                            for w in ["fever", "cough", "rest", "water"] * 4), encoding="utf-8")
    counter = CountMLP()
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train=[{data}]", f"output_dir={tmp_path / 'run'}",
                             "train.bf16=false", "train.batch_size=4", "train.max_steps=2", "train.save_strategy=no",
                             "train.gradient_checkpointing=true", "data.group_by_length=false"])
    train(cfg, callbacks=[counter])
    assert len(counter.runs) == 2 * 2  # two steps, each a forward and a recompute
    assert "gradient_checkpointing is on but saves no memory" not in capsys.readouterr().out
