import copy

import pytest
import torch

from tunelab.config import ModelConfig
from tunelab.errors import TunelabError
from tunelab.models import load_model, load_tokenizer, resolve_spec


@pytest.fixture()
def llama_dir(tmp_path, tiny_llama, tiny_tokenizer):
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_local_folder_loads_with_padding_per_use(llama_dir, tiny_llama):
    model, tokenizer = load_model(str(llama_dir))
    assert tokenizer.padding_side == "left"  # generation
    assert not model.training
    _, train_tok = load_model(str(llama_dir), for_training=True)
    assert train_tok.padding_side == "right"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tiny_llama(ids).logits, atol=1e-6)


def test_precision_choices(llama_dir):
    model, _ = load_model(ModelConfig(name=str(llama_dir), precision="bf16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_model(ModelConfig(name=str(llama_dir), precision="auto"))
    assert next(model.parameters()).dtype == torch.float32  # CPU: fp32 master weights


def test_bad_specs_say_what_is_wrong(tmp_path):
    with pytest.raises(TunelabError, match="GGUF file not found"):
        resolve_spec(str(tmp_path / "missing.gguf"))
    with pytest.raises(TunelabError, match="not a model folder"):
        resolve_spec(str(tmp_path))
    with pytest.raises(TunelabError, match="builtin:smollm2-135m-instruct"):
        resolve_spec("./nowhere")
    with pytest.raises(TunelabError, match="unknown builtin model 'nope'"):
        resolve_spec("builtin:nope")


def test_flash_attention_refused_clearly_without_it(llama_dir):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(TunelabError, match="flash_attention_2 needs the flash-attn package"):
        load_model(ModelConfig(name=str(llama_dir), attn_implementation="flash_attention_2"))


def test_trust_remote_code_is_off_by_default(llama_dir, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(llama_dir))
    assert seen["trust_remote_code"] is False


def test_stablelm_loads_and_trains_with_eos_as_pad(tmp_path, make_tiny_tokenizer):
    """Seed 000/001: StableLM (partial RoPE, LayerNorm) with no pad token and no chat template."""
    from transformers import StableLmConfig, StableLmForCausalLM

    tokenizer = make_tiny_tokenizer(chat_template=None, eos_token="<|endoftext|>")
    tokenizer.pad_token = None
    config = StableLmConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                            partial_rotary_factor=0.25, max_position_embeddings=256)
    torch.manual_seed(0)
    StableLmForCausalLM(config).save_pretrained(tmp_path / "stablelm")
    tokenizer.save_pretrained(tmp_path / "stablelm")

    model, tok = load_model(ModelConfig(name=str(tmp_path / "stablelm"), template="human-assistant"),
                            for_training=True)
    assert type(model).__name__ == "StableLmForCausalLM"
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert "Human:" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                               add_generation_prompt=True)
    model.train()
    optim = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([tok.encode("Human: What is a fever? \nAssistant: A high temperature.")])
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_builtin_model_answers_offline_and_reloads_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_model("builtin:smollm2-135m-instruct")
    assert model.tunelab_load_seconds < 2.0  # cached safetensors folder, not the GGUF
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_gguf_file_loads_and_is_saveable(tmp_path):
    from tunelab.models.builtin import gguf_path

    model, tokenizer = load_model(str(gguf_path("smollm2-135m-instruct")))
    model.save_pretrained(tmp_path / "saved")  # raises if the GGUF quantizer marker were left
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    assert tokenizer.chat_template
