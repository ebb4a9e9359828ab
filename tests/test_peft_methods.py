"""DoRA, rsLoRA, PiSSA, OLoRA, LoRA+, (IA)³, AdaLoRA, NEFTune: train, save, reload, merge on a tiny model."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from tunelab.config import MethodConfig, ModelConfig, load_config
from tunelab.train import train
from tunelab.train.export import merge_export
from tunelab.train.methods import METHODS, get_method

SEED_LINE = re.compile(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}")
NEW = ["dora", "rslora", "pissa", "olora", "loraplus", "ia3", "adalora"]  # through peft

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "norm.jsonl"
    words = ["fever", "cough", "rest", "发烧", "感冒"]
    rows = [{"instruction": f"Normalize: {rng.choice(words)} {i % 5}", "input": "", "output": f"OK {i % 5}"}
            for i in range(24)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


class Keep(TrainerCallback):
    """Keep the trained model and the optimizer the trainer used."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimizer = optimizer

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def run(tiny_dir, data_file, out, *overrides):
    keep = Keep()
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train=[{data_file}]", f"output_dir={out}",
                             "train.bf16=false", "train.batch_size=4", "train.lr=2e-2", "train.max_steps=6",
                             "data.group_by_length=false", *overrides])
    return train(cfg, callbacks=[keep]), keep


IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_every_new_method_is_registered_and_accepted_by_the_config():
    for name in NEW:
        assert get_method(name).prepare is not None
        MethodConfig(name=name)


@pytest.mark.parametrize("name", NEW)
def test_method_trains_saves_reloads_and_merges(tiny_dir, tiny_llama, data_file, tmp_path, name, capsys):
    from tunelab.models import load_model

    out, keep = run(tiny_dir, data_file, tmp_path / name, f"method.name={name}", "method.r=4", "method.alpha=8",
                    "method.adalora_init_r=6")
    assert SEED_LINE.search(capsys.readouterr().out)
    trained = logits(keep.model)
    assert not torch.allclose(trained, logits(tiny_llama), atol=1e-3)  # it learned something
    adapter = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    reloaded, _ = load_model(ModelConfig(name=str(out)))
    assert torch.allclose(logits(reloaded), trained, atol=1e-4), name
    merged = merge_export(out, tmp_path / f"{name}-merged")
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert torch.allclose(logits(plain), trained, atol=1e-4), name
    if name in ("pissa", "olora"):  # saved as a plain LoRA of twice the rank on the original base
        assert (adapter["r"], adapter["init_lora_weights"]) == (8, True)
    if name == "dora":
        assert adapter["use_dora"] is True
    if name == "rslora":
        assert adapter["use_rslora"] is True
    if name == "ia3":
        assert adapter["peft_type"] == "IA3"
    if name == "adalora":  # ranks were pruned and recorded, so the reload has the pruned shapes
        assert adapter["peft_type"] == "ADALORA" and adapter["rank_pattern"]
        assert keep.model.peft_config["default"].total_step == 6


def test_pissa_starts_from_the_weights_principal_directions(tiny_llama):
    import copy

    model = get_method("pissa").prepare(copy.deepcopy(tiny_llama), MethodConfig(name="pissa", r=4, alpha=4))
    # at initialisation the residual base + adapter is the original model
    assert torch.allclose(logits(model), logits(tiny_llama), atol=1e-4)
    lora_b = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert lora_b.abs().sum() > 0  # not LoRA's zero start


def test_loraplus_trains_b_with_a_larger_rate(tiny_dir, data_file, tmp_path):
    _, keep = run(tiny_dir, data_file, tmp_path / "lp", "method.name=lora", "method.loraplus_lr_ratio=8")
    names = {id(p): n for n, p in keep.model.named_parameters()}
    rates = {}
    for group in keep.optimizer.param_groups:
        for p in group["params"]:
            rates[names[id(p)]] = group["initial_lr"]
    b_rates = [r for n, r in rates.items() if "lora_B" in n]
    a_rates = [r for n, r in rates.items() if "lora_A" in n]
    assert b_rates and b_rates == pytest.approx([2e-2 * 8] * len(b_rates))
    assert a_rates and a_rates == pytest.approx([2e-2] * len(a_rates))


def test_lora_without_ratio_keeps_trainers_optimizer(tiny_dir, data_file, tmp_path):
    _, keep = run(tiny_dir, data_file, tmp_path / "plain", "method.name=lora")
    assert [g["initial_lr"] for g in keep.optimizer.param_groups] == pytest.approx([2e-2, 2e-2])


def test_variant_options_combine_on_lora(tiny_llama):
    import copy

    model = get_method("lora").prepare(copy.deepcopy(tiny_llama),
                                       MethodConfig(name="lora", r=4, use_dora=True, use_rslora=True))
    peft_cfg = model.peft_config["default"]
    assert peft_cfg.use_dora and peft_cfg.use_rslora
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_neftune_adds_noise_to_embeddings_only_while_training(tiny_dir, data_file, tmp_path):
    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                emb = model.get_input_embeddings()
                was = model.training
                model.train()
                self.noisy = [emb(IDS).detach().clone() for _ in range(2)]
                model.eval()
                self.clean = emb(IDS).detach().clone()
                model.train(was)

    probe = Probe()
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train=[{data_file}]", f"output_dir={tmp_path / 'n'}",
                             "train.bf16=false", "train.max_steps=2", "train.neftune_alpha=5"])
    train(cfg, callbacks=[probe])
    assert not torch.equal(probe.noisy[0], probe.noisy[1])  # fresh noise each forward
    assert not torch.equal(probe.noisy[0], probe.clean)
    seq, dim = IDS.shape[1], probe.clean.shape[-1]
    bound = 5 / (seq * dim) ** 0.5  # NEFTune: uniform noise in ±alpha/sqrt(L·d)
    assert (probe.noisy[0] - probe.clean).abs().max() <= bound + 1e-6


def test_adalora_refuses_a_start_rank_below_the_target(tiny_llama):
    import copy

    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="method.adalora_init_r: 2 is below the target rank"):
        get_method("adalora").prepare(copy.deepcopy(tiny_llama), MethodConfig(name="adalora", r=4, adalora_init_r=2))


def test_bad_variant_options_are_one_line_errors():
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="method.init_lora_weights: 'svd' is not one of"):
        load_config(None, ["method.init_lora_weights=svd"])
    with pytest.raises(TunelabError, match="method.loraplus_lr_ratio: -1 must be > 0"):
        load_config(None, ["method.loraplus_lr_ratio=-1"])
    assert set(NEW) <= set(METHODS)


def test_bottleneck_adapters_start_as_identity_and_train_only_themselves(tiny_llama, capsys):
    import copy

    model = get_method("bottleneck").prepare(copy.deepcopy(tiny_llama),
                                             MethodConfig(name="bottleneck", adapter_size=8))
    assert SEED_LINE.search(capsys.readouterr().out)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.mlp.bottleneck.{part}.{kind}"
                         for i in range(2) for part in ("down", "up") for kind in ("weight", "bias")}
    assert torch.equal(logits(model), logits(tiny_llama))  # up = 0: unchanged at step 0


def test_bottleneck_trains_saves_alone_reloads_and_refuses_merge(tiny_dir, tiny_llama, data_file, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.models import load_model

    out, keep = run(tiny_dir, data_file, tmp_path / "bn", "method.name=bottleneck", "method.adapter_size=8",
                    "method.adapter_activation=gelu")
    trained = logits(keep.model)
    assert not torch.allclose(trained, logits(tiny_llama), atol=1e-3)
    assert (out / "bottleneck_adapter.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "bottleneck_config.json").read_text()) == {"size": 8, "activation": "gelu",
                                                                         "hidden_size": 64}
    reloaded, _ = load_model(ModelConfig(name=str(out)))
    assert torch.allclose(logits(reloaded), trained, atol=1e-5)
    with pytest.raises(TunelabError, match="bottleneck adapters are non-linear and cannot be merged"):
        merge_export(out, tmp_path / "bn-merged")
    # a bottleneck run folder is a starting point: its adapters keep training
    again, keep2 = run(tiny_dir, data_file, tmp_path / "bn2", f"model.name={out}", "method.name=bottleneck",
                       "method.adapter_size=8")
    assert {n for n, p in keep2.model.named_parameters() if p.requires_grad} == \
        {n for n, _ in keep2.model.named_parameters() if ".bottleneck." in n}
    assert json.loads((again / "bottleneck_config.json").read_text())["activation"] == "gelu"
