"""Training methods registry: what each method makes trainable, and clear refusals."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from tunelab.config import MethodConfig, load_config
from tunelab.errors import TunelabError
from tunelab.train.collate import IGNORE, SFTCollator
from tunelab.train.methods import METHODS, decoder_layers, get_method
from tunelab.train.trainer import sft_loss

SEED_LINE = re.compile(r"^trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}$", re.M)


pytestmark = pytest.mark.usefixtures("one_thread")


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_every_config_method_is_registered():
    from tunelab.config import MethodConfig

    names = {"full", "freeze", "lora", "qlora", "lora8bit", "prefix", "prompt"}
    assert names <= set(METHODS)
    for name in names:
        assert get_method(name).prepare is not None
    MethodConfig(name="lora")  # the config accepts what the registry offers


def test_lora_prints_the_seed_line_and_freezes_the_base(tiny_llama, capsys):
    model = get_method("lora").prepare(copy.deepcopy(tiny_llama), MethodConfig(name="lora", r=4))
    assert SEED_LINE.search(capsys.readouterr().out)
    names = trainable_names(model)
    assert names and all("lora_" in n for n in names)
    # all-linear: every projection of every layer, but not the output head
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"}


def test_lora_target_list_and_unknown_target(tiny_llama):
    model = get_method("lora").prepare(copy.deepcopy(tiny_llama),
                                       MethodConfig(name="lora", target_modules="q_proj, v_proj"))
    assert {n.split(".")[-4] for n in trainable_names(model)} == {"q_proj", "v_proj"}
    with pytest.raises(TunelabError, match="method"):
        get_method("lora").prepare(copy.deepcopy(tiny_llama), MethodConfig(name="lora", target_modules=["nope"]))


def test_lora_on_the_last_layers_only_stops_the_backward_below_them(tiny_llama):
    model = get_method("lora").prepare(copy.deepcopy(tiny_llama), MethodConfig(name="lora", r=4, last_layers=1))
    names = trainable_names(model)
    assert names and all(".layers.1." in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"}
    seen = []
    lowest = decoder_layers(model)[0]
    hook = lowest.register_forward_hook(
        lambda module, args, out: seen.append((out[0] if isinstance(out, tuple) else out).requires_grad))
    ids = torch.randint(3, 100, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    hook.remove()
    assert seen == [False]  # no autograd graph below the adapted layer: the backward stops there
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(TunelabError, match="method.last_layers: 3 is not between 1 and the model's 2 layers"):
        get_method("lora").prepare(copy.deepcopy(tiny_llama), MethodConfig(name="lora", last_layers=3))


def test_freeze_trains_only_the_last_layers(tiny_llama, capsys):
    assert len(decoder_layers(tiny_llama)) == 2
    model = get_method("freeze").prepare(copy.deepcopy(tiny_llama), MethodConfig(name="freeze", freeze_trainable_layers=1))
    assert SEED_LINE.search(capsys.readouterr().out)
    assert trainable_names(model) == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    with_head = get_method("freeze").prepare(copy.deepcopy(tiny_llama),
                                             MethodConfig(name="freeze", freeze_trainable_layers=1, freeze_train_head=True))
    assert "lm_head.weight" in trainable_names(with_head) or "model.embed_tokens.weight" in trainable_names(with_head)
    with pytest.raises(TunelabError, match="freeze_trainable_layers"):
        get_method("freeze").prepare(copy.deepcopy(tiny_llama), MethodConfig(name="freeze", freeze_trainable_layers=5))


@pytest.mark.parametrize("name", ["qlora", "lora8bit"])
def test_quantized_methods_stop_before_loading_without_bitsandbytes(tmp_path, name, monkeypatch):
    import sys

    from tunelab.train import train

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    cfg = load_config(None, [f"method.name={name}", f"model.name={tmp_path / 'no-such-model'}",
                             f"output_dir={tmp_path / 'run'}", "data.train=[missing.jsonl]"])
    with pytest.raises(TunelabError, match=f"^method.name: {name} needs bitsandbytes: pip install 'tunelab\\[quant\\]'$"):
        train(cfg)  # the missing model would be a different error: the check ran first
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_prompt_learning_loss_matches_peft(tiny_llama, name):
    """Virtual tokens shift the sequence; our head-gathered loss must still line up with peft's."""
    model = get_method(name).prepare(copy.deepcopy(tiny_llama), MethodConfig(name=name, num_virtual_tokens=4))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (2, 10), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE
    batch = SFTCollator(3)([{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in zip(ids, labels)])
    model.eval()
    with torch.no_grad():
        ours = sft_loss(model, batch)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
