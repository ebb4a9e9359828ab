"""QLoRA and 8-bit LoRA on a CPU through bitsandbytes' CPU kernels (a tiny random Llama)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from tunelab.config import MethodConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def copy_task(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("qdata") / "task.jsonl"
    words = ["fever", "cough", "rest", "water", "发烧", "感冒"]
    rows = [{"instruction": f"Repeat: {w}", "output": w} for w in (rng.choice(words) for _ in range(32))]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_compute_dtype_follows_the_measured_cpu(monkeypatch):
    from tunelab import hardware
    from tunelab.train import quant

    if torch.cuda.is_available():
        pytest.skip("the CPU rule")
    monkeypatch.setattr(hardware, "probe", lambda refresh=False: SimpleNamespace(bf16_fast=False))
    assert quant.compute_dtype(MethodConfig(name="qlora")) == torch.float32
    monkeypatch.setattr(hardware, "probe", lambda refresh=False: SimpleNamespace(bf16_fast=True))
    assert quant.compute_dtype(MethodConfig(name="qlora")) == torch.bfloat16
    assert quant.compute_dtype(MethodConfig(name="qlora", compute_dtype="fp32")) == torch.float32


def test_broken_kernels_give_one_line(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from tunelab.train import quant

    if torch.cuda.is_available():
        pytest.skip("the CPU check")

    def broken(bnb, name):
        raise RuntimeError("no kernel for cpu\nsecond line")

    monkeypatch.setattr(quant, "_smoke", broken)
    reason = quant.support_reason("qlora")
    assert "no working CPU kernels here (no kernel for cpu)" in reason and "method.name=lora" in reason
    assert "\n" not in reason


@pytest.mark.parametrize("name", ["qlora", "lora8bit"])
def test_quantized_lora_trains_on_cpu(name, tiny_dir, copy_task, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from tunelab.models import load_model
    from tunelab.train import quant, train

    assert quant.support_reason(name) is None  # bitsandbytes >= 0.50 must run here
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train=[{copy_task}]", f"output_dir={tmp_path / name}",
                             f"method.name={name}", "train.bf16=false", "train.batch_size=8", "train.lr=2e-2",
                             "train.max_steps=8", "train.logging_steps=1", "data.group_by_length=false"])
    out = train(cfg)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) >= 6 and min(losses[-3:]) < losses[0], losses  # it learns through the quantized base
    assert (out / "adapter_model.safetensors").is_file()
    model, _ = load_model(str(out))  # the adapter loads over the unquantized base for inference
    assert any("lora_A" in n for n, _ in model.named_parameters())
    kind = bnb.nn.Linear4bit if name == "qlora" else bnb.nn.Linear8bitLt
    quantized, _ = load_model(str(tiny_dir), for_training=True, **quant.load_kwargs(MethodConfig(name=name)))
    assert any(isinstance(m, kind) for m in quantized.modules())
