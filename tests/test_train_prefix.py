"""Shared-prefix encoding in training: same loss and gradients as the plain forward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from tunelab.train.collate import IGNORE, SFTCollator
from tunelab.train.prefix import MIN_SHARED_TOKENS, prefix_sharing_applies, shared_prefix_tokens
from tunelab.train.trainer import sft_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(tiny_tokenizer, prefix_len=20, rows=4):
    """Rows sharing ``prefix_len`` tokens, then own prompts of different lengths and answers."""
    gen = torch.Generator().manual_seed(1)
    vocab = len(tiny_tokenizer) - 8
    shared = torch.randint(10, vocab, (prefix_len,), generator=gen).tolist()
    examples = []
    for i in range(rows):
        own = torch.randint(10, vocab, (3 + 2 * i,), generator=gen).tolist()
        answer = torch.randint(10, vocab, (4 + i,), generator=gen).tolist()
        ids = shared + own + answer
        examples.append({"input_ids": ids, "labels": [IGNORE] * (len(ids) - len(answer)) + answer})
    return SFTCollator(tiny_tokenizer.pad_token_id)(examples)


def loss_and_grads(model, inputs, share):
    model.zero_grad()
    loss = sft_loss(model, inputs, share_prefix=share)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(model, inputs):
    plain_loss, plain = loss_and_grads(model, inputs, share=False)
    shared_loss, shared = loss_and_grads(model, inputs, share=True)
    assert torch.allclose(plain_loss, shared_loss, rtol=1e-5, atol=1e-6)
    assert plain.keys() == shared.keys() and plain
    for name in plain:
        assert torch.allclose(plain[name], shared[name], rtol=1e-4, atol=1e-6), name


def test_prefix_length_stops_at_difference_padding_and_supervision(tiny_tokenizer):
    inputs = batch(tiny_tokenizer)
    keep = torch.zeros_like(inputs["labels"], dtype=torch.bool)
    keep[:, :-1] = inputs["labels"][:, 1:] != IGNORE
    assert shared_prefix_tokens(inputs["input_ids"], inputs["attention_mask"], keep) >= 20
    ids = inputs["input_ids"].clone()
    ids[2, 16] = ids[0, 16] + 1  # rows differ from position 16 on
    assert shared_prefix_tokens(ids, inputs["attention_mask"], keep) == 16
    ids[2, 7] = ids[0, 7] + 1  # 7 shared tokens x 3 rows saved: too few to pay
    assert 7 * 3 < MIN_SHARED_TOKENS and shared_prefix_tokens(ids, inputs["attention_mask"], keep) == 0
    keep[1, 12] = True  # a supervised next token at 12: the head needs position 12
    assert shared_prefix_tokens(inputs["input_ids"], inputs["attention_mask"], keep) == 12
    mask = inputs["attention_mask"].clone()
    mask[3, 5] = 0  # left padding (or a hole) in one row ends the prefix
    assert shared_prefix_tokens(inputs["input_ids"], mask, keep) == 0  # 5 x 3 < MIN_SHARED_TOKENS
    assert shared_prefix_tokens(inputs["input_ids"][:1], inputs["attention_mask"][:1], keep[:1]) == 0


def test_full_model_loss_and_gradients_match(tiny_llama, tiny_tokenizer):
    model = copy.deepcopy(tiny_llama).train()
    assert prefix_sharing_applies(model)
    assert_same(model, batch(tiny_tokenizer))


def test_lora_loss_and_gradients_match(tiny_llama, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
    model.train()
    for name, param in model.named_parameters():  # B starts at zero: give it values so A gets gradients
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    assert prefix_sharing_applies(model)
    assert_same(model, batch(tiny_tokenizer, prefix_len=24, rows=5))


def test_the_shared_path_really_runs_the_prefix_once(tiny_llama, tiny_tokenizer):
    model = copy.deepcopy(tiny_llama).train()
    inputs = batch(tiny_tokenizer)
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[:2])

    handle = model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        sft_loss(model, inputs, share_prefix=True)
    finally:
        handle.remove()
    rows, width = inputs["input_ids"].shape
    prefix = seen[0][1]
    assert seen == [torch.Size([1, prefix]), torch.Size([rows, width - prefix])] and prefix >= 20


def test_not_used_with_gradient_checkpointing_or_prompt_learning(tiny_llama):
    from peft import PrefixTuningConfig, get_peft_model

    model = copy.deepcopy(tiny_llama).train()
    model.gradient_checkpointing_enable()
    assert not prefix_sharing_applies(model)
    prompt = get_peft_model(copy.deepcopy(tiny_llama), PrefixTuningConfig(num_virtual_tokens=4,
                                                                         task_type="CAUSAL_LM"))
    assert not prefix_sharing_applies(prompt)


def test_training_with_and_without_sharing_logs_the_same_losses(tiny_dir, tmp_path):
    import json

    from tunelab.config import load_config
    from tunelab.train import train

    system = "You are a careful clinical coder. Normalise the term you are given. " * 2
    rows = [{"messages": [{"role": "system", "content": system},
                          {"role": "user", "content": f"Term: fever {i}"},
                          {"role": "assistant", "content": f"FEVER {i % 3}"}]} for i in range(16)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    losses = {}
    for share in ("true", "false"):
        out = tmp_path / f"run-{share}"
        train(load_config(None, [f"model.name={tiny_dir}", f"data.train=[{data}]", f"output_dir={out}",
                                 "train.bf16=false", "train.batch_size=4", "train.lr=5e-3", "train.max_steps=4",
                                 "method.dropout=0", f"train.share_prefix={share}"]))
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        losses[share] = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert len(losses["true"]) == 4
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
