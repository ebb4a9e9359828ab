"""The GGUF export in real llama.cpp (node-llama-cpp's prebuilt binaries).

Marked ``llamacpp``: skipped, with the reason, where node or node-llama-cpp is missing;
``make setup`` installs node-llama-cpp wherever npm exists, so CI runs these.
"""

from __future__ import annotations

import pytest

from tunelab.export import llamacpp

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(llamacpp.unavailable_reason() is not None,
                       reason=f"llama.cpp check unavailable: {llamacpp.unavailable_reason()}"),
]


def test_tiny_llama_answers_the_same_in_llama_cpp(tiny_llama, tiny_tokenizer, tmp_path):
    from tunelab.export.check import agreement_from_tokens, fingerprint, stop_ids
    from tunelab.export.gguf import write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama, tiny_tokenizer, path, "f32")
    ref = fingerprint(tiny_llama, tiny_tokenizer, max_new_tokens=16)
    texts = [tiny_tokenizer.decode(p) for p in ref.prompts]
    result = llamacpp.run_probes(path, ref.prompts, ref.answers, stop_ids(tiny_llama, tiny_tokenizer), texts, 16)
    assert [list(t) for t in result["tokens"]] == ref.prompts  # llama.cpp tokenizes like the HF tokenizer
    agreement = agreement_from_tokens(ref, result["forced_top1"], result["greedy"], "llama.cpp",
                                      stops=stop_ids(tiny_llama, tiny_tokenizer), eog=result["eog"])
    assert agreement.top1 >= 0.97, agreement.line()
    assert agreement.identical_answers >= 5, agreement.line()



def test_llama_cpp_scores_and_generates_like_transformers(tiny_llama, tiny_tokenizer, tmp_path):
    """The benchmark's extras: per-token log-probabilities of a window equal transformers' (f32 file),
    and greedy answers to rendered chat texts, tokenized by llama.cpp, equal transformers' greedy ones."""
    import torch

    from tunelab.export.check import fingerprint, stop_ids
    from tunelab.export.gguf import write_gguf
    from tunelab.generation import render_prompt

    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama, tiny_tokenizer, path, "f32")
    stops = stop_ids(tiny_llama, tiny_tokenizer)
    window = tiny_tokenizer("The patient has a fever and a cough since Monday.", add_special_tokens=False)["input_ids"]
    chats = [[{"role": "user", "content": "Normalise: acute appendicitis"}], [{"role": "user", "content": "Hi"}]]
    texts = [tiny_tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    result = llamacpp.run_probes(path, [], [], stops, score=[window], generate_texts=texts, generate_tokens=12)
    with torch.inference_mode():
        logits = tiny_llama(input_ids=torch.tensor([window])).logits[0, :-1]
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:])[:, None])[:, 0]
    got = torch.tensor(result["score"][0]["logprobs"])
    assert got.shape == want.shape and float((got - want).abs().max()) < 1e-3
    assert result["score"][0]["top1"] == logits.argmax(-1).tolist()
    prompts = [render_prompt(tiny_tokenizer, c) for c in chats]
    assert [list(p) for p in result["generate_prompts"]] == prompts
    reference = fingerprint(tiny_llama, tiny_tokenizer, max_new_tokens=12, prompts=prompts)
    for mine, theirs in zip(result["generated"], reference.answers):
        assert list(mine) == [t for t in theirs if t not in stops]  # llama.cpp does not yield the end token
    assert 0 < result["rss_after_probes_bytes"] <= result["max_rss_bytes"]

@pytest.fixture(scope="module")
def builtin_source():
    """SmolLM2-135M loaded once and fingerprinted once (6 probes x 64 greedy tokens) for every type."""
    from tunelab.export.verify import prepare_source

    return prepare_source("builtin:smollm2-135m-instruct", probe_tokens=64)


def _llamacpp_check(report: dict) -> dict:
    return next(c for c in report["checks"] if c["backend"].endswith("llama.cpp"))


@pytest.mark.slow
def test_builtin_model_f16_greedy_equals_fp32_in_llama_cpp(builtin_source, tmp_path):
    """The issue's target on SmolLM2-135M: f16 greedy = transformers fp32 on 6 prompts x 64 tokens."""
    from tunelab.export.gguf_export import export_gguf

    report = export_gguf("builtin:smollm2-135m-instruct", tmp_path / "m-f16.gguf", "f16", llamacpp="require",
                         probe_tokens=64, source=builtin_source, log=print)
    real = _llamacpp_check(report)
    assert real["tokenizer_mismatch"] == 0 and real["top1"] >= 0.99, real
    assert real["identical_answers"] == real["prompts"] == 6, real
    assert "flash attention off" in " ".join(report["notes"])
    loader = next(c for c in report["checks"] if "transformers" in c["backend"])
    assert loader["identical_answers"] == 6, loader


@pytest.mark.slow
def test_builtin_model_q8_0_top1_agreement_in_llama_cpp(builtin_source, tmp_path):
    """q8_0 top-1 agreement >= 92% (the issue's target) over the first 32 tokens of the same answers."""
    import dataclasses

    from tunelab.export.gguf_export import export_gguf

    source = dataclasses.replace(builtin_source, reference=builtin_source.reference.truncated(32))
    report = export_gguf("builtin:smollm2-135m-instruct", tmp_path / "m-q8_0.gguf", "q8_0", llamacpp="require",
                         probe_tokens=32, source=source, log=print)
    real = _llamacpp_check(report)
    assert real["tokenizer_mismatch"] == 0 and real["top1"] >= 0.92, real
    assert real["tokens"] == sum(min(len(a), 32) for a in builtin_source.reference.answers)
