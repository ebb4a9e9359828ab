"""Image-bearing conversations through the shared generation core, ``tunelab eval`` and ``tunelab serve``;
generation settings that reach ``generate`` (no-repeat n-grams, the tokenizer's real eos); the
vision recipes; vision runs refusing stages they cannot train. Tiny random models only.
"""

from __future__ import annotations

import base64
import json

import pytest
from vision_helpers import conv, png, shapes_data, tower_dirs, train_run, vlm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _greedy_by_forward(model, tokenizer, conversation, steps):
    """Greedy tokens by re-running the whole forward pass: what any decoding must reproduce."""
    import torch

    ids, spans = model.encode_prompt(tokenizer, conversation)
    inputs = model.image_inputs([spans])
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out]), **inputs).logits[0, -1]
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
    return out


def test_generation_core_answers_image_conversations_batched(tiny_dir, tower_dirs, tmp_path):
    """Rows of different lengths and images, left-padded in one batch, give each row's own greedy tokens."""
    from tunelab.generation import GenerationSettings, generate

    model, tokenizer = vlm(tiny_dir, tower_dirs["clip"])
    rows = [conv(png(tmp_path / "r.png", "red")),
            conv(png(tmp_path / "b.png", "blue"), question="Which colour fills this whole picture, please?"),
            conv(png(tmp_path / "g.png", "green"), question="Colour?")]
    settings = GenerationSettings(max_new_tokens=5)
    results = generate(model, tokenizer, rows, settings, batch_size=3, progress=False)
    for row, result in zip(rows, results):
        expected = _greedy_by_forward(model, tokenizer, row, 5)
        # a byte token left dangling at the end is held back, as while streaming
        assert result.text == tokenizer.decode(expected, skip_special_tokens=True).rstrip("\ufffd")
        assert result.prompt_tokens == len(model.encode_prompt(tokenizer, row)[0])


def _spy_generate(model):
    """Record what ``model.generate`` is called with and returns (the real call still runs)."""
    calls = []
    real = model.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    model.generate = spy
    return calls


def test_no_repeat_ngram_size_reaches_generate(tiny_dir, tiny_llama, tiny_tokenizer, tower_dirs, tmp_path):
    import copy

    from tunelab.errors import TunelabError
    from tunelab.generation import GenerationSettings, generate_ids

    llm = copy.deepcopy(tiny_llama)
    calls = _spy_generate(llm)
    prompt = tiny_tokenizer("Hello, how are you?")["input_ids"]
    generate_ids(llm, tiny_tokenizer, [prompt], GenerationSettings(max_new_tokens=24), fast_greedy=False)
    plain = calls[-1][1][0, len(prompt):].tolist()
    assert len(set(plain)) < len(plain)  # the random model repeats itself without the setting
    settings = GenerationSettings(max_new_tokens=24, no_repeat_ngram_size=1)
    generate_ids(llm, tiny_tokenizer, [prompt], settings)  # greedy: not tunelab's own loop, which lacks it
    kwargs, out = calls[-1]
    tokens = [t for t in out[0, len(prompt):].tolist() if t not in (tiny_tokenizer.eos_token_id,
                                                                  tiny_tokenizer.pad_token_id)]
    assert kwargs["no_repeat_ngram_size"] == 1 and len(tokens) > 3
    assert not set(tokens) & set(prompt) and len(set(tokens)) == len(tokens)
    model, tokenizer = vlm(tiny_dir, tower_dirs["clip"])  # from embeddings: the answer alone never repeats
    calls = _spy_generate(model)
    ids, spans = model.encode_prompt(tokenizer, conv(png(tmp_path / "r.png", "red")))
    generate_ids(model, tokenizer, [ids], settings, images=[spans])
    kwargs, out = calls[-1]
    answer = [t for t in out[0].tolist() if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
    assert kwargs["no_repeat_ngram_size"] == 1 and "pixel_values" in kwargs
    assert len(answer) > 3 and len(set(answer)) == len(answer)
    with pytest.raises(TunelabError, match="generation.no_repeat_ngram_size"):
        GenerationSettings(no_repeat_ngram_size=-1)


def test_answers_end_with_the_tokenizers_real_eos(make_tiny_tokenizer):
    """StableLM's eos is <|endoftext|>; R2GenGPT's end symbol '</s>' would be plain text there."""
    from tunelab.data import Conversation, Message
    from tunelab.data.render import IGNORE_INDEX, encode
    from tunelab.generation import eos_token_ids
    from tunelab.models.templates import apply_template

    tokenizer = apply_template(make_tiny_tokenizer(chat_template=None, eos_token="<|endoftext|>"), "human-assistant")
    example = encode(tokenizer, Conversation([Message("user", "Findings?"), Message("assistant", "Clear lungs.")]))
    supervised = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert supervised[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.decode(supervised).strip() == "Clear lungs.<|endoftext|>"
    assert len(tokenizer("</s>", add_special_tokens=False)["input_ids"]) > 1  # not a token at all here

    class Config:
        eos_token_id = 5  # a checkpoint's own setting is kept beside the tokenizer's eos

    model = type("M", (), {"generation_config": Config()})()
    assert eos_token_ids(model, tokenizer) == {5, tokenizer.convert_tokens_to_ids("<|endoftext|>")}


def test_eval_run_scores_a_vision_run_with_its_images(tiny_dir, tower_dirs, shapes_data, tmp_path):
    from tunelab.config import load_config
    from tunelab.data import load_dataset
    from tunelab.eval.run import evaluate
    from tunelab.generation import GenerationSettings
    from tunelab.vision.chat import answer
    from tunelab.vision.compose import load_vlm

    run = train_run(tmp_path, "run", tiny_dir, tower_dirs["clip"], shapes_data, **{"train.max_steps": 1})
    cfg = load_config(None, [f"eval.models=[{run}]", f"eval.datasets=[{shapes_data}]", "eval.max_new_tokens=4",
                             "eval.metrics=[em,bleu]", f"eval.output_dir={tmp_path / 'eval'}", "eval.max_samples=4"])
    report = evaluate(cfg, progress=False)
    [name] = report["models"]
    assert report["results"]["train"][name]["n"] == 4
    rows = [json.loads(line) for line in (tmp_path / "eval" / name / "train" / "predictions.jsonl").open()]
    assert rows[0]["prompt"][0]["content"][0]["type"] == "image_url"
    assert report["examples"]["train"][0]["prompt"] == "<image>What colour is it?"
    model, tokenizer = load_vlm(run)
    for row, conversation in zip(rows, load_dataset(str(shapes_data))[:4]):
        assert row["prediction"].strip() == answer(model, tokenizer, conversation, GenerationSettings(max_new_tokens=4))


def test_eval_generation_settings_from_the_recipe():
    from tunelab.config import load_config
    from tunelab.errors import TunelabError
    from tunelab.eval.run import _settings

    settings = _settings(load_config(None, ["eval.preset=beam", "eval.generation.num_beams=3",
                                            "eval.generation.no_repeat_ngram_size=2"]))
    assert (settings.num_beams, settings.repetition_penalty, settings.no_repeat_ngram_size) == (3, 1.2, 2)
    with pytest.raises(TunelabError, match="eval.generation: unknown setting 'beams'"):
        _settings(load_config(None, ["eval.generation.beams=3"]))


def _data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_serve_takes_data_url_images_and_refuses_the_rest(tiny_dir, tower_dirs, tmp_path):
    from fastapi.testclient import TestClient

    from tunelab.generation import GenerationSettings
    from tunelab.serve.app import create_app
    from tunelab.serve.models import ServedModels
    from tunelab.vision.chat import answer

    model, tokenizer = vlm(tiny_dir, tower_dirs["clip"])
    red, blue = png(tmp_path / "red.png", "red"), png(tmp_path / "blue.png", "blue")
    app = create_app(ServedModels(model, tokenizer, {"vlm": None}), GenerationSettings(max_new_tokens=4))

    def ask(url, text="What colour is it?"):
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
        return client.post("/v1/chat/completions", json={"model": "vlm", "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": parts}]})

    with TestClient(app) as client:
        for image in (red, blue):
            reply = ask(_data_url(image))
            assert reply.status_code == 200, reply.text
            expected = answer(model, tokenizer, conv(image), GenerationSettings(max_new_tokens=4))
            assert reply.json()["choices"][0]["message"]["content"].strip() == expected
        for url in (str(red), f"file://{red}", "https://example.com/a.png"):
            refused = ask(url)
            assert refused.status_code == 400 and "only data: URLs" in refused.json()["error"]["message"]
        broken = ask("data:image/png;base64,bm90IGFuIGltYWdl")
        assert broken.status_code == 400 and "cannot be read as an image" in broken.json()["error"]["message"]
        stray = ask(_data_url(red), text="and this <image>?")
        assert stray.status_code == 400 and "has no image" in stray.json()["error"]["message"]
        text_only = client.post("/v1/chat/completions", json={
            "model": "vlm", "max_tokens": 3, "messages": [{"role": "user", "content": "你好"}]})
        assert text_only.status_code == 200


def test_serve_completions_refuse_a_raw_image_placeholder_with_a_400(tiny_dir, tower_dirs):
    """Text completions carry no image: a placeholder is the client's mistake, not a failed batch (503)."""
    from fastapi.testclient import TestClient

    from tunelab.generation import GenerationSettings
    from tunelab.serve.app import create_app
    from tunelab.serve.models import ServedModels

    model, tokenizer = vlm(tiny_dir, tower_dirs["clip"])
    app = create_app(ServedModels(model, tokenizer, {"vlm": None}), GenerationSettings(max_new_tokens=3))
    as_ids = tokenizer("Describe <image>")["input_ids"]
    assert model.image_token_id in as_ids
    with TestClient(app) as client:
        for prompt in ("<image>Describe it.", ["fine", "<image> twice"], as_ids):
            reply = client.post("/v1/completions", json={"model": "vlm", "max_tokens": 3, "prompt": prompt})
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert error["param"] == "prompt"
            assert "/v1/chat/completions" in error["message"] and "image_url" in error["message"]
        plain = client.post("/v1/completions", json={"model": "vlm", "max_tokens": 3, "prompt": "Describe it."})
        assert plain.status_code == 200, plain.text


def test_vision_chat_streams_through_the_core(tiny_dir, tower_dirs, tmp_path):
    import io

    from tunelab.generation import FALLBACK_REPLY, GenerationSettings
    from tunelab.vision.chat import answer, chat_loop

    model, tokenizer = vlm(tiny_dir, tower_dirs["clip"])
    image = png(tmp_path / "red.png", "red")
    pieces = []
    settings = GenerationSettings(max_new_tokens=6)
    text = answer(model, tokenizer, conv(image), settings, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces).strip() == text
    out = io.StringIO()
    chat_loop(model, tokenizer, settings, None, [str(image)], io.StringIO("What colour is it?\nexit\n"), out)
    assert out.getvalue() == ("".join(pieces) if text else FALLBACK_REPLY) + "\n"


def test_vision_runs_refuse_other_training_stages(tiny_dir, tower_dirs, shapes_data, tmp_path):
    from tunelab.errors import TunelabError

    for stage in ("pt", "dpo"):
        with pytest.raises(TunelabError, match=f"train.stage: {stage} is not supported for vision runs"):
            train_run(tmp_path, stage, tiny_dir, tower_dirs["clip"], shapes_data, **{"train.stage": stage})
    assert not (tmp_path / "pt").exists()  # refused before any folder or model


def test_vision_recipes_keep_the_seed_settings():
    from pathlib import Path

    from tunelab.config import load_config
    from tunelab.eval.run import _settings

    recipes = Path(__file__).parents[1] / "recipes"
    r2gen = load_config(recipes / "r2gengpt-swin-stablelm-3b.yaml")
    v = r2gen.model.vision
    assert (v.multi_image, v.projector, v.projector_norm, r2gen.model.template) == (
        "mean", "linear", True, "human-assistant")
    assert (r2gen.method.r, r2gen.method.alpha, r2gen.method.dropout) == (16, 16, 0.1)
    settings = _settings(r2gen)
    assert (settings.num_beams, settings.min_new_tokens, settings.max_new_tokens, settings.repetition_penalty,
            settings.no_repeat_ngram_size) == (3, 80, 120, 1.2, 2)
    vqa = load_config(recipes / "vqa-siglip-qwen2-0.5b-style.yaml")
    assert (vqa.method.r, vqa.method.alpha, vqa.model.vision.projector) == (8, 16, "mlp2x_gelu")


def test_training_data_problems_fail_before_any_model_loads(tiny_dir, tower_dirs, tmp_path):
    from tunelab.errors import TunelabError

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "<image>Colour?"},
                                             {"role": "assistant", "content": "red"}],
                                "images": ["gone.png"]}) + "\n", encoding="utf-8")
    with pytest.raises(TunelabError, match="bad.jsonl:1: images: gone.png: not found"):
        train_run(tmp_path, "run", tiny_dir, tower_dirs["clip"], data)
    assert not (tmp_path / "run").exists()


def test_distill_sends_images_to_a_vision_endpoint(tiny_dir, tower_dirs, tmp_path):
    """``data distill`` against ``tunelab serve`` of a vision run: seed 002's styled answers, offline."""
    from test_serve import LiveServer

    from tunelab.data import Conversation, ImagePart, Message, TextPart, load_dataset
    from tunelab.generation import GenerationSettings
    from tunelab.serve.app import create_app
    from tunelab.serve.models import ServedModels
    from tunelab.vision.chat import answer
    from tunelab.workshop.distill import distill, make_config

    model, tokenizer = vlm(tiny_dir, tower_dirs["clip"])
    image = png(tmp_path / "q" / "img" / "red.png", "red")
    (tmp_path / "q" / "questions.jsonl").write_text(
        json.dumps({"question": "这是什么颜色?", "image": "img/red.png"}, ensure_ascii=False) + "\n"
        + json.dumps({"question": "Say hello."}) + "\n", encoding="utf-8")
    server = LiveServer(create_app(ServedModels(model, tokenizer, {"vlm": None}), GenerationSettings(max_new_tokens=6)))
    try:
        config = make_config({"base_url": server.url + "/v1", "model": "vlm", "questions": "q/questions.jsonl",
                              "output": "out/style.jsonl", "instruction": "用广东话回答。", "api_key_env": None,
                              "temperature": 0.0, "max_tokens": 6}, base_dir=tmp_path)
        report = distill(config)
    finally:
        server.close()
    system = Message("system", [TextPart("用广东话回答。")])
    expected = [answer(model, tokenizer, Conversation([system, Message("user", parts)], "q"),
                       GenerationSettings(max_new_tokens=6))
                for parts in ([ImagePart(str(image)), TextPart("这是什么颜色?")], [TextPart("Say hello.")])]
    rows = [json.loads(line) for line in (tmp_path / "out" / "style.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["output"] for r in rows] == [e for e in expected if e]
    assert len(report.failed) == sum(1 for e in expected if not e)
    if expected[0]:
        assert rows[0]["instruction"] == "<image>这是什么颜色?" and rows[0]["images"] == ["../q/img/red.png"]
        [conv, *_] = load_dataset(str(tmp_path / "out" / "style.jsonl"))
        assert conv.messages[0].images and conv.messages[0].text == "这是什么颜色?"


def test_shapes_two_view_variant_reads_as_one_averaged_span(tiny_dir, tower_dirs, tmp_path):
    from tunelab.data import load_dataset
    from tunelab.vision.data import ImageLayout, encode_vision
    from tunelab.vision.shapes import build_shapes

    paths = build_shapes(tmp_path / "two", n_train=2, n_test=1, seed=3, views=2)
    row = json.loads(paths["train"].read_text(encoding="utf-8").splitlines()[0])
    assert row["messages"][0]["content"].startswith("<image><image>") and len(row["images"]) == 2
    first, second = (tmp_path / "two" / name for name in row["images"])
    assert first.read_bytes() != second.read_bytes()  # the shapes are placed anew in the second view
    model, tokenizer = vlm(tiny_dir, tower_dirs["clip"], multi_image="mean")
    layout = ImageLayout(model.vision_cfg.image_token, model.image_token_id, model.tokens_per_image, True)
    example, _ = encode_vision(tokenizer, load_dataset(str(paths["train"]))[0], layout)
    assert example["images"] == [[str(first), str(second)]]
    assert example["input_ids"].count(model.image_token_id) == model.tokens_per_image
