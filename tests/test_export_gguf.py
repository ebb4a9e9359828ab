"""GGUF export: tiny random Llama and Qwen2 models round-trip through transformers' GGUF loader
(logits, config, tokenizer, chat template), quantized types land where they should, and the
export check refuses what it must."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tunelab.errors import TunelabError

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["Hello, how are you?", "The patient has a fever 38.5", "孕妇感冒发烧38度应该怎么办呢?",
         "<|im_start|>user\nhi<|im_end|>\n", "  two  spaces\nand a newline"]
QWEN2_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def _qwen2_tokenizer():
    """A Qwen2-style tokenizer (NFC, the Qwen2 split regex, byte-level without its own regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from conftest import _CORPUS, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS * 10, trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = QWEN2_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _qwen2_tokenizer()
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tokenizer) + 12, hidden_size=64, num_hidden_layers=2,  # padded rows
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return Qwen2ForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_stablelm(tiny_tokenizer):
    from transformers import StableLmConfig, StableLmForCausalLM

    torch.manual_seed(2)
    config = StableLmConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                            max_position_embeddings=256, tie_word_embeddings=False,
                            eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    return StableLmForCausalLM(config).eval(), tiny_tokenizer


def _load_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _reader_field(path, key):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return reader, reader.fields[key].contents() if key in reader.fields else None


@pytest.mark.parametrize("arch", ["llama", "qwen2", "stablelm"])
def test_f32_round_trip_matches_logits_tokenizer_and_template(arch, request, tmp_path):
    from tunelab.export.gguf import write_gguf

    if arch == "llama":
        model, tokenizer = request.getfixturevalue("tiny_llama"), request.getfixturevalue("tiny_tokenizer")
    else:
        model, tokenizer = request.getfixturevalue(f"tiny_{arch}")
    path = tmp_path / f"{arch}.gguf"
    summary = write_gguf(model, tokenizer, path, "f32")
    assert summary["architecture"] == arch and summary["pre_tokenizer"] == ("qwen2" if arch == "qwen2" else "gpt-2")
    back, back_tok = _load_back(path)
    assert type(back).__name__ == type(model).__name__
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size"):
        assert getattr(back.config, name) == getattr(model.config, name), name
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "发烧 fever 1"}], add_generation_prompt=True,
                                        tokenize=False)
    ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    for text in TEXTS:  # the tokenizer transformers rebuilds from the file encodes the same
        assert back_tok(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)[
            "input_ids"], text
    _, template = _reader_field(path, "tokenizer.chat_template")
    assert template == tokenizer.chat_template  # byte-equal


def test_quantized_types_and_their_error(tiny_qwen2, tmp_path):
    from gguf import GGMLQuantizationType as Q

    from tunelab.export.gguf import write_gguf

    model, tokenizer = tiny_qwen2
    ids = tokenizer("The patient has a fever and a cough.")["input_ids"]
    want = _logits(model, ids)
    errors = {}
    for ftype in ("f16", "bf16", "q8_0", "q4_0"):
        path = tmp_path / f"{ftype}.gguf"
        write_gguf(model, tokenizer, path, ftype)
        reader, _ = _reader_field(path, "general.file_type")
        types = {t.name: Q(t.tensor_type) for t in reader.tensors}
        assert types["output_norm.weight"] == Q.F32 and types["blk.0.attn_q.bias"] == Q.F32
        main = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[ftype]
        assert types["blk.0.ffn_down.weight"] == main
        assert types["output.weight"] == (Q.Q8_0 if ftype == "q4_0" else main)  # head kept at 8 bits
        back, _ = _load_back(path)
        errors[ftype] = float((_logits(back, ids) - want).abs().max())
    assert errors["f16"] < 1e-2 and errors["f16"] < errors["q8_0"] < errors["q4_0"], errors
    assert (tmp_path / "q4_0.gguf").stat().st_size < (tmp_path / "q8_0.gguf").stat().st_size \
        < (tmp_path / "f16.gguf").stat().st_size


def test_llama_q_and_k_rows_are_permuted_for_llama_cpp(tiny_llama, tiny_tokenizer, tmp_path):
    """llama.cpp's llama graph wants interleaved rotary rows; the file must not hold HF's order."""
    from gguf import GGUFReader

    from tunelab.export.gguf import write_gguf

    path = tmp_path / "m.gguf"
    write_gguf(tiny_llama, tiny_tokenizer, path, "f32")
    stored = {t.name: np.array(t.data) for t in GGUFReader(str(path)).tensors}
    hf = tiny_llama.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert stored["blk.0.attn_q.weight"].shape == hf.shape
    assert not np.array_equal(stored["blk.0.attn_q.weight"], hf)
    assert np.array_equal(np.sort(stored["blk.0.attn_q.weight"], axis=None), np.sort(hf, axis=None))
    v = tiny_llama.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    assert np.array_equal(stored["blk.0.attn_v.weight"], v)


def test_unknown_pre_tokenizer_and_architecture_are_refused(tiny_llama, make_tiny_tokenizer, tmp_path):
    from tokenizers import pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel

    from tunelab.export.gguf import write_gguf

    tokenizer = make_tiny_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(TunelabError, match="pre_tokenizer Whitespace has no llama.cpp equivalent"):
        write_gguf(tiny_llama, tokenizer, tmp_path / "a.gguf", "f16")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(TunelabError, match="GGUF export supports .* not 'gpt2'"):
        write_gguf(gpt2, make_tiny_tokenizer(), tmp_path / "b.gguf", "f16")


def _adapter_folder(tiny_dir, tiny_llama, tmp_path, trained: bool):
    """A LoRA adapter folder over ``tiny_dir``: B = 0 as peft initialises it, or random (a 'tuned' one)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=True))
    if trained:
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.2)
    folder = tmp_path / ("tuned" if trained else "untrained")
    peft_model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_dir)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_export_checks_then_moves_into_place(tiny_dir, tiny_llama, tmp_path):
    from tunelab.export.gguf_export import export_gguf

    adapter = _adapter_folder(tiny_dir, tiny_llama, tmp_path, trained=True)
    out = tmp_path / "out" / "tuned.gguf"
    lines = []
    report = export_gguf(str(adapter), out, "f32", llamacpp="off", probe_tokens=8, log=lines.append)
    assert out.is_file() and report["ok"]
    assert [c["backend"] for c in report["checks"]] == ["merged in memory", "GGUF f32 in transformers' GGUF loader"]
    assert all(c["top1"] >= 0.98 for c in report["checks"])
    assert json.loads((tmp_path / "out" / "tuned.gguf.check.json").read_text())["ok"] is True
    assert any("top-1 agreement" in line for line in lines)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging file left
    with pytest.raises(TunelabError, match="already exists; pass --overwrite"):
        export_gguf(str(adapter), out, "f32", llamacpp="off")


def test_an_adapter_that_changes_nothing_is_refused(tiny_dir, tiny_llama, tmp_path):
    from tunelab.export.gguf_export import export_gguf
    from tunelab.train.export import merge_export

    adapter = _adapter_folder(tiny_dir, tiny_llama, tmp_path, trained=False)
    with pytest.raises(TunelabError, match="adapter changes nothing"):
        export_gguf(str(adapter), tmp_path / "a.gguf", "f16", llamacpp="off", probe_tokens=4)
    with pytest.raises(TunelabError, match="adapter changes nothing"):
        merge_export(adapter, tmp_path / "merged", probe_tokens=4)
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "merged").exists()
    lines = []
    report = export_gguf(str(adapter), tmp_path / "a.gguf", "f16", llamacpp="off", probe_tokens=4,
                         allow_identical=True, log=lines.append)
    assert any(n.startswith("WARNING") for n in report["notes"]) and any("WARNING" in line for line in lines)


def test_a_failed_check_leaves_the_old_file_untouched(tiny_dir, tmp_path, monkeypatch):
    from tunelab.export import check
    from tunelab.export.gguf_export import export_gguf

    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    monkeypatch.setitem(check.TOLERANCE, "q4_0", 1.01)  # no export can reach it
    with pytest.raises(TunelabError, match="export check failed, nothing written: .*FAILED"):
        export_gguf(str(tiny_dir), out, "q4_0", overwrite=True, llamacpp="off", probe_tokens=4)
    assert out.read_bytes() == b"mine" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    report = export_gguf(str(tiny_dir), out, "q4_0", overwrite=True, llamacpp="off", probe_tokens=4, force=True)
    assert report["forced"] and out.stat().st_size > 1000


def test_cli_gguf_export_and_one_line_errors(tiny_dir, tmp_path, capsys):
    from tunelab.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_dir), "--gguf", "q8_0", "--out", str(out), "--llamacpp", "off",
                 "--probe-tokens", "4"]) == 0
    assert out.is_file() and "GGUF written" in capsys.readouterr().out
    assert main(["export", str(tiny_dir), "--gguf", "q8_0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --gguf needs --out FILE.gguf"
    assert main(["export", str(tiny_dir), "--gguf", "f16", "--out", str(tmp_path / "m.bin")]) == 1
    assert "--out must name a .gguf file" in capsys.readouterr().err


def test_one_source_serves_several_types_and_a_shorter_reference(tiny_dir, tiny_llama, tiny_tokenizer, tmp_path):
    """A prepared source is reused unchanged, each report has only its own checks, and a
    truncated fingerprint equals the shorter greedy fingerprint (what the slow tests rely on)."""
    import dataclasses

    from tunelab.export.check import fingerprint
    from tunelab.export.gguf_export import export_gguf
    from tunelab.export.verify import prepare_source

    adapter = _adapter_folder(tiny_dir, tiny_llama, tmp_path, trained=True)
    source = prepare_source(str(adapter), probe_tokens=12)
    before = (list(source.checks), list(source.notes))
    reports = [export_gguf(str(adapter), tmp_path / f"m-{t}.gguf", t, llamacpp="off", probe_tokens=12,
                           source=source, log=lambda _: None) for t in ("f32", "q8_0")]
    assert (source.checks, source.notes) == before and source.model is not None
    assert [[c["backend"] for c in r["checks"]] for r in reports] == [
        ["merged in memory", f"GGUF {t} in transformers' GGUF loader"] for t in ("f32", "q8_0")]
    short = fingerprint(tiny_llama, tiny_tokenizer, 5)
    assert fingerprint(tiny_llama, tiny_tokenizer, 12).truncated(5).answers == short.answers
    shorter = dataclasses.replace(source, reference=source.reference.truncated(5))
    report = export_gguf(str(adapter), tmp_path / "m-f16.gguf", "f16", llamacpp="off", source=shorter,
                         log=lambda _: None)
    assert report["checks"][-1]["tokens"] == sum(len(a) for a in shorter.reference.answers)
