"""``--quantize``: chat, serve and eval answered by a GGUF file in real llama.cpp.

Marked ``llamacpp`` like the export tests: skipped, with the reason, where node or
node-llama-cpp is missing (``make setup`` installs it wherever npm exists, so CI runs these).
"""

from __future__ import annotations

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.export import llamacpp

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(llamacpp.unavailable_reason() is not None,
                       reason=f"llama.cpp unavailable: {llamacpp.unavailable_reason()}"),
]

CHATS = [[{"role": "user", "content": "Normalise: acute appendicitis"}],
         [{"role": "user", "content": "Hi"}],
         [{"role": "user", "content": "发烧三天，咳嗽"}]]


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch):
    """A fresh cache folder for exports; node-llama-cpp stays where setup put it."""
    monkeypatch.setenv("TUNELAB_LLAMACPP_DIR", str(llamacpp.install_dir()))
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def f32_model(tiny_llama, tiny_tokenizer, tmp_path_factory):
    """The tiny Llama as an f32 GGUF in llama.cpp: its greedy tokens must equal transformers'."""
    from tunelab.export.gguf import write_gguf
    from tunelab.models.gguf_runtime import LlamaCppModel

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(tiny_llama, tiny_tokenizer, path, "f32")
    model = LlamaCppModel(path, tiny_llama.config, tiny_llama.generation_config)
    yield model
    model.close()


def test_greedy_answers_equal_transformers(f32_model, tiny_llama, tiny_tokenizer):
    from tunelab.generation import GenerationSettings, generate

    settings = GenerationSettings(max_new_tokens=12)
    want = generate(tiny_llama, tiny_tokenizer, CHATS, settings, progress=False)
    got = generate(f32_model, tiny_tokenizer, CHATS, settings, progress=False)  # parallel sequences
    assert [r.text for r in got] == [r.text for r in want]
    one_by_one = generate(f32_model, tiny_tokenizer, CHATS, settings, batch_size=1, progress=False)
    assert [r.text for r in one_by_one] == [r.text for r in want]
    four = CHATS + [[{"role": "user", "content": "Code: chest pain on exertion"}]]
    want_four = generate(tiny_llama, tiny_tokenizer, four, settings, progress=False)
    for _ in range(3):  # later batches reuse the batch context's sequences, which must start empty each time
        pairs = generate(f32_model, tiny_tokenizer, four, settings, batch_size=2, progress=False)
        assert [r.text for r in pairs] == [r.text for r in want_four]
    assert [(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in got] == \
        [(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in want]


def test_a_later_turn_reuses_the_cache_and_answers_as_from_scratch(f32_model, tiny_llama, tiny_tokenizer):
    """Chat turns share their prefix: llama.cpp keeps it in its KV cache, the answer is unchanged."""
    from tunelab.generation import GenerationSettings, generate

    settings = GenerationSettings(max_new_tokens=8)
    first = CHATS[0]
    (answer,) = generate(f32_model, tiny_tokenizer, [first], settings, progress=False)
    second = first + [{"role": "assistant", "content": answer.text}, {"role": "user", "content": "And the code?"}]
    want = generate(tiny_llama, tiny_tokenizer, [second], settings, progress=False)
    got = generate(f32_model, tiny_tokenizer, [second], settings, progress=False)
    assert got[0].text == want[0].text


def test_streaming_stop_strings_and_cancel(f32_model, tiny_llama, tiny_tokenizer):
    from tunelab.generation import GenerationSettings, generate, stream

    settings = GenerationSettings(max_new_tokens=12)
    (full,) = generate(tiny_llama, tiny_tokenizer, [CHATS[1]], settings, progress=False)
    pieces = list(stream(f32_model, tiny_tokenizer, CHATS[1], settings))
    assert "".join(pieces) == full.text
    stop = full.text[3:6]
    assert stop.strip(), full.text
    (cut,) = generate(f32_model, tiny_tokenizer, [CHATS[1]], settings.replace(stop=(stop,)), progress=False)
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    answer = stream(f32_model, tiny_tokenizer, CHATS[1], settings)
    for _ in answer:
        answer.cancel()
    answer.join(10)
    assert answer.result is not None and answer.result.finish_reason == "cancelled"
    # the process is still in step after a cancelled answer
    (again,) = generate(f32_model, tiny_tokenizer, [CHATS[1]], settings, progress=False)
    assert again.text == full.text


def test_sampling_is_seeded_and_unsupported_settings_are_refused(f32_model, tiny_tokenizer):
    from tunelab.generation import GenerationSettings, generate

    sampled = GenerationSettings(max_new_tokens=10, temperature=1.0, top_k=50, seed=3)
    a = generate(f32_model, tiny_tokenizer, CHATS[:2], sampled, progress=False)
    b = generate(f32_model, tiny_tokenizer, CHATS[:2], sampled, progress=False)
    assert [r.text for r in a] == [r.text for r in b]
    for change in ({"num_beams": 2}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 3}):
        with pytest.raises(TunelabError, match="not available with --quantize"):
            generate(f32_model, tiny_tokenizer, CHATS[:1], GenerationSettings(max_new_tokens=4, **change),
                     progress=False)


def test_load_quantized_exports_once_then_uses_the_cache(tiny_dir, tiny_tokenizer, gguf_cache):
    from tunelab.generation import GenerationSettings, generate
    from tunelab.models.gguf_runtime import load_quantized

    lines: list[str] = []
    model, tokenizer = load_quantized(str(tiny_dir), "f16", log=lines.append)
    try:
        assert any(line.startswith("exporting") for line in lines)
        assert "llama.cpp: top-1 agreement" in model.quality and model.gguf_path.is_file()
        assert model.gguf_path.parent == gguf_cache / "gguf"
        assert json.loads(model.gguf_path.with_name(model.gguf_path.name + ".check.json").read_text())["ok"]
        (answer,) = generate(model, tokenizer, CHATS[:1], GenerationSettings(max_new_tokens=6), progress=False)
        assert answer.completion_tokens >= 1
    finally:
        model.close()
    lines.clear()
    again, _ = load_quantized(str(tiny_dir), "f16", log=lines.append)
    again.close()
    assert lines[0].startswith("using the cached f16 export") and again.gguf_path == model.gguf_path


def test_quantize_refuses_what_it_cannot_run(tiny_dir, tmp_path, gguf_cache):
    from tunelab.models.gguf_runtime import load_quantized

    with pytest.raises(TunelabError, match="is not one of"):
        load_quantized(str(tiny_dir), "q2_k")
    with pytest.raises(TunelabError, match="hub id"):
        load_quantized("someone/some-model", "q8_0")
    file = tmp_path / "x.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(TunelabError, match="GGUF file already"):
        load_quantized(str(file), "q8_0")


def test_serve_and_eval_run_the_quantized_model(tiny_dir, tmp_path, gguf_cache):
    from fastapi.testclient import TestClient

    from tunelab.config import load_config
    from tunelab.eval.run import evaluate
    from tunelab.generation import GenerationSettings, generate
    from tunelab.serve.app import create_app
    from tunelab.serve.models import load_for_serving

    served = load_for_serving(str(tiny_dir), quantize="f16")
    try:
        assert list(served.ids) == [tiny_dir.name]
        (want,) = generate(served.model, served.tokenizer, CHATS[:1], GenerationSettings(max_new_tokens=6),
                           progress=False)
        with TestClient(create_app(served, GenerationSettings(max_new_tokens=6))) as client:
            reply = client.post("/v1/chat/completions", json={"model": tiny_dir.name, "messages": CHATS[0]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == want.text
    finally:
        served.model.close()
    with pytest.raises(TunelabError, match="--adapter"):
        load_for_serving(str(tiny_dir), adapters=[str(tiny_dir)], quantize="f16")

    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"messages": c + [{"role": "assistant", "content": "x"}]},
                                       ensure_ascii=False) + "\n" for c in CHATS), encoding="utf-8")
    cfg = load_config(None, [f'eval.models=["{tiny_dir}"]', f'eval.datasets=["{test}"]', "eval.quantize=f16",
                             "eval.max_new_tokens=6", f'eval.output_dir="{tmp_path / "eval"}"',
                             "eval.metrics=[em,perplexity]"])
    report = evaluate(cfg, progress=False)
    (name,) = report["models"]
    assert report["settings"]["quantize"] == "f16"
    assert report["settings"]["llamacpp"][name]["gguf"].endswith(".f16.gguf")
    (results,) = report["results"].values()
    assert results[name]["perplexity"].startswith("unavailable")
    bad = load_config(None, [f'eval.models=["{tiny_dir}"]', f'eval.datasets=["{test}"]', "eval.quantize=q3"])
    with pytest.raises(TunelabError, match="eval.quantize"):
        evaluate(bad, progress=False)


def test_cli_chat_with_quantize_answers_from_llama_cpp(tiny_dir, gguf_cache, monkeypatch, capsys):
    import io

    from tunelab.cli import main
    from tunelab.generation import GenerationSettings, generate
    from tunelab.models.gguf_runtime import load_quantized

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", str(tiny_dir), "--quantize", "f16", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert "top-1 agreement" in err and "thread(s)" in err
    model, tokenizer = load_quantized(str(tiny_dir), "f16", log=lambda line: None)
    try:
        (want,) = generate(model, tokenizer, [[{"role": "user", "content": "Hi"}]],
                           GenerationSettings(max_new_tokens=6), progress=False)
    finally:
        model.close()
    assert want.text.strip() and want.text.strip() in out
