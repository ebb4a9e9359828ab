"""Vision-language composition on tiny random towers and the tiny Llama (tests/conftest.py);
the data side (labels, truncation, image datasets, the shapes dataset) is in test_vision_data.py.

What is asserted: features replace the placeholders; frozen parts (weights and buffers,
BatchNorm statistics included) stay bit-identical through training; save -> load -> generate
round-trips with equal logits; evaluation scores per group and shuffles images; chat attaches
images.
"""

from __future__ import annotations

import io
import json

import pytest
from vision_helpers import conv as _conv
from vision_helpers import layout as _layout
from vision_helpers import png as _png
from vision_helpers import shapes_data, tower_dirs  # noqa: F401  (fixtures)
from vision_helpers import state as _state
from vision_helpers import train_run as _train
from vision_helpers import vlm as _vlm

pytestmark = pytest.mark.usefixtures("one_thread")

# --- the composite -------------------------------------------------------------------------

def test_features_replace_placeholders_and_counts_must_match(tiny_dir, tower_dirs, tmp_path):
    import torch

    from tunelab.errors import TunelabError
    from tunelab.vision.data import VisionCollator, encode_vision

    model, tokenizer = _vlm(tiny_dir, tower_dirs["clip"])
    example, _ = encode_vision(tokenizer, _conv(_png(tmp_path / "red.png", "red")), _layout(model))
    batch = VisionCollator(tokenizer.pad_token_id, model.tower.preprocess)([example])
    embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_groups"])
    mask = batch["input_ids"][0] == model.image_token_id
    expected = model.projector(model.tower(batch["pixel_values"]))[0]
    torch.testing.assert_close(embeds[0][mask], expected)
    text_ids = batch["input_ids"][0][~mask]
    torch.testing.assert_close(embeds[0][~mask], model.get_input_embeddings()(text_ids))
    one_short = batch["input_ids"].clone()
    one_short[0, mask.nonzero()[0]] = 0
    with pytest.raises(TunelabError, match="image features and image tokens do not match"):
        model.embed(one_short, batch["pixel_values"], batch["image_groups"])


def test_mean_averages_side_by_side_images_into_one_span(tiny_dir, tower_dirs, tmp_path):
    import torch

    from tunelab.data import Conversation, ImagePart, Message, TextPart
    from tunelab.vision.data import VisionCollator, encode_vision

    model, tokenizer = _vlm(tiny_dir, tower_dirs["clip"], multi_image="mean")
    a, b = _png(tmp_path / "a.png", "red"), _png(tmp_path / "b.png", "blue")
    conv = Conversation([Message("user", [ImagePart(str(a)), ImagePart(str(b)), TextPart("Findings?")]),
                         Message("assistant", "two views")], "t:1")
    example, _ = encode_vision(tokenizer, conv, _layout(model))
    assert example["input_ids"].count(model.image_token_id) == 16 and example["images"] == [[str(a), str(b)]]
    batch = VisionCollator(tokenizer.pad_token_id, model.tower.preprocess)([example])
    spans = model.image_embeddings(batch["pixel_values"], batch["image_groups"])
    expected = model.projector(model.tower(batch["pixel_values"]).mean(0, keepdim=True))
    torch.testing.assert_close(spans, expected)


def test_frozen_tower_features_are_cached(tiny_dir, tower_dirs, tmp_path):
    import torch

    from PIL import Image

    model, tokenizer = _vlm(tiny_dir, tower_dirs["clip"])
    pixels = model.tower.preprocess([Image.open(_png(tmp_path / "r.png", "red"))])
    calls = []
    model.tower.register_forward_hook(lambda *a: calls.append(1))
    first = model.tower_features(pixels)
    second = model.tower_features(pixels)
    assert len(calls) == 1 and model.cache.hits == 1 and torch.equal(first, second)


# --- training stages, run folders ------------------------------------------------------------

def _grab():
    """A callback that keeps the trained model (the in-memory one, not a reload)."""
    from transformers import TrainerCallback

    class Grab(TrainerCallback):
        model = None

        def on_train_end(self, args, state, control, model=None, **kwargs):
            Grab.model = model

    return Grab()


def test_align_then_instruct_freeze_what_they_should(tiny_dir, tower_dirs, shapes_data, tmp_path):
    """Checked on the in-memory trained model, BatchNorm buffers of the frozen ResNet included."""
    import torch
    from safetensors.torch import load_file

    from tunelab.vision.compose import load_vlm

    fresh, _ = _vlm(tiny_dir, tower_dirs["resnet"], projector="linear")
    tower0, llm0, proj0 = _state(fresh.tower), _state(fresh.llm), _state(fresh.projector)
    grab = _grab()
    align = _train(tmp_path, "align", tiny_dir, tower_dirs["resnet"], shapes_data, [grab],
                   **{"model.vision.stage": "align", "model.vision.projector": "linear"})
    trained = grab.model
    assert any("running_mean" in k for k in tower0)
    assert all(torch.equal(v, tower0[k]) for k, v in _state(trained.tower).items())  # weights + BN buffers
    assert all(torch.equal(v, llm0[k]) for k, v in _state(trained.llm).items())
    info = json.loads((align / "vision.json").read_text())
    assert info["adapter"] is False and info["tower_weights"] is None and info["llm"] == str(tiny_dir)
    proj1 = load_file(str(align / "vision" / "projector.safetensors"))
    assert all(torch.equal(proj1[k], v) for k, v in _state(trained.projector).items())
    assert any(not torch.equal(proj1[k], proj0[k]) for k in proj0)

    grab = _grab()
    instruct = _train(tmp_path, "instruct", align, None, shapes_data, [grab], **{"model.vision.stage": "instruct"})
    trained = grab.model
    assert all(torch.equal(v, tower0[k]) for k, v in _state(trained.tower).items())
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in _state(trained.llm).items() if "lora_" not in k}
    assert base.keys() == llm0.keys() and all(torch.equal(v, llm0[k]) for k, v in base.items())
    assert not all(torch.equal(v, proj1[k]) for k, v in _state(trained.projector).items())
    info = json.loads((instruct / "vision.json").read_text())
    assert info["adapter"] is True and info["started_from"] == str(align) and info["llm"] == str(tiny_dir)
    assert info["vision"]["projector"] == "linear"  # the shape settings come from stage 1
    lora = load_file(str(instruct / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())
    reloaded, _ = load_vlm(instruct)
    assert all(torch.equal(v, _state(trained.projector)[k]) for k, v in _state(reloaded.projector).items())


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_trainable_line_prints_once_for_the_whole_composite(tiny_dir, tower_dirs, capsys, stage):
    """The LoRA method's own line (the LLM alone) is not printed beside the composite's."""
    from tunelab.config import load_config
    from tunelab.train.methods import trainable_line
    from tunelab.vision.train import apply_stage

    model, _ = _vlm(tiny_dir, tower_dirs["clip"], stage=stage)
    cfg = load_config(None, [f"model.name={tiny_dir}", f"model.vision.tower={tower_dirs['clip']}",
                             f"model.vision.stage={stage}", "method.name=lora"])
    capsys.readouterr()
    apply_stage(model, cfg)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trainable params:")]
    projector = sum(p.numel() for p in model.projector.parameters())
    assert printed == [trainable_line(model)]
    trainable = int(printed[0].split()[2].replace(",", ""))
    assert trainable > projector if stage == "instruct" else trainable == projector  # LoRA + projector


def test_stage_two_refuses_a_different_projector(tiny_dir, tower_dirs, shapes_data, tmp_path):
    from tunelab.errors import TunelabError

    align = _train(tmp_path, "a", tiny_dir, tower_dirs["clip"], shapes_data,
                   **{"model.vision.stage": "align", "model.vision.projector": "linear", "train.max_steps": 1})
    with pytest.raises(TunelabError, match="model.vision.pool: 2 differs from 1"):
        _train(tmp_path, "b", align, None, shapes_data, **{"model.vision.pool": 2})


def test_save_load_generate_round_trip(tiny_dir, tower_dirs, shapes_data, tmp_path):
    import torch

    from tunelab.generation import GenerationSettings
    from tunelab.vision.chat import answer
    from tunelab.vision.compose import load_vlm
    from tunelab.vision.data import VisionCollator, encode_vision

    run = _train(tmp_path, "run", tiny_dir, tower_dirs["clip"], shapes_data,
                 **{"model.vision.projector_norm": "true", "model.vision.projector_lr": 5e-2})
    first, tokenizer = load_vlm(run)
    second, _ = load_vlm(run)
    image = shapes_data.parent / "img" / "red.png"
    example, _ = encode_vision(tokenizer, _conv(image), _layout(first))
    batch = VisionCollator(tokenizer.pad_token_id, first.tower.preprocess)([example])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_groups")}
    with torch.no_grad():
        assert torch.equal(first(**inputs).logits, second(**inputs).logits)
    settings = GenerationSettings(max_new_tokens=6)
    assert answer(first, tokenizer, _conv(image), settings) == answer(second, tokenizer, _conv(image), settings)
    # generate from embeddings continues exactly as a forward pass over the same prompt would
    prompt = _conv(image)
    text = answer(first, tokenizer, prompt, GenerationSettings(max_new_tokens=1))
    logits = first(**inputs).logits[0]
    start = (batch["labels"][0] != -100).nonzero()[0].item() - 1
    assert tokenizer.decode([int(logits[start].argmax())], skip_special_tokens=True).strip() == text


def test_projector_position_embedding_trains_saves_and_carries_into_stage_two(tiny_dir, tower_dirs, shapes_data,
                                                                              tmp_path):
    """``projector_pos``: one learned vector per image token, zero at the start, kept by stage 2."""
    import torch

    from tunelab.vision.compose import load_vlm

    align = _train(tmp_path, "pos", tiny_dir, tower_dirs["clip"], shapes_data,
                   **{"model.vision.stage": "align", "model.vision.projector_pos": "true", "train.max_steps": 2})
    model, _ = load_vlm(align)
    assert json.loads((align / "vision.json").read_text())["vision"]["projector_pos"] is True
    pos = model.projector.pos
    assert pos.shape == (model.tokens_per_image, model.llm.get_input_embeddings().embedding_dim)
    assert pos.abs().sum() > 0  # it trained (it starts at zero)
    instruct = _train(tmp_path, "pos2", align, None, shapes_data, **{"train.max_steps": 1})
    second, _ = load_vlm(instruct)
    assert second.projector.pos is not None and not torch.equal(second.projector.pos, pos)


def test_stage_two_with_a_frozen_projector_keeps_it_bit_identical(tiny_dir, tower_dirs, shapes_data, tmp_path):
    """``feature_norm`` learns per-channel statistics in align and is rebuilt on load; with
    ``train_projector: false`` in instruct the projector (position embedding and those statistics
    included: a frozen BatchNorm stays in eval mode) is bit-identical in memory and in the saved run
    while the LoRA trains."""
    import torch

    from tunelab.vision.compose import load_vlm

    align = _train(tmp_path, "fp", tiny_dir, tower_dirs["clip"], shapes_data,
                   **{"model.vision.stage": "align", "model.vision.projector_pos": "true",
                      "model.vision.feature_norm": "true", "train.max_steps": 2})
    assert json.loads((align / "vision.json").read_text())["vision"]["feature_norm"] is True
    norm = load_vlm(align)[0].projector.feature_norm
    assert norm is not None and int(norm.num_batches_tracked) == 2 and norm.running_mean.abs().sum() > 0
    projector0 = _state(load_vlm(align)[0].projector)
    grab = _grab()
    instruct = _train(tmp_path, "fp2", align, None, shapes_data, [grab],
                      **{"model.vision.train_projector": "false", "train.max_steps": 2})
    assert all(torch.equal(v, projector0[k]) for k, v in _state(grab.model.projector).items())
    assert all(torch.equal(v, projector0[k]) for k, v in _state(load_vlm(instruct)[0].projector).items())
    lora = [p for n, p in grab.model.llm.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for p in lora)


def test_feature_norm_trains_on_a_batch_with_one_image_token():
    """A batch holding one image token (feature cls/pooled, batch 1) has no spread for BatchNorm:
    the projector uses the running statistics and leaves them untouched; two tokens update them."""
    import torch

    from tunelab.vision.model import Projector

    projector = Projector("linear", 6, 4, feature_norm=True).train()
    norm = projector.feature_norm
    before = norm.running_mean.clone()
    out = projector(torch.randn(1, 1, 6))
    assert out.shape == (1, 1, 4) and torch.isfinite(out).all()
    out.sum().backward()
    assert projector.net[0].weight.grad is not None
    assert torch.equal(norm.running_mean, before) and int(norm.num_batches_tracked) == 0
    projector(torch.randn(2, 1, 6) + 3.0)
    assert int(norm.num_batches_tracked) == 1 and not torch.equal(norm.running_mean, before)


def test_pixel_shuffle_run_saves_loads_and_generates_the_same(tiny_dir, tower_dirs, shapes_data, tmp_path):
    """vision.json carries pixel_shuffle, so the loaded run rebuilds the wider projector."""
    import torch

    from tunelab.generation import GenerationSettings
    from tunelab.vision.chat import answer
    from tunelab.vision.compose import load_vlm

    grab = _grab()
    run = _train(tmp_path, "ps", tiny_dir, tower_dirs["clip"], shapes_data, [grab],
                 **{"model.vision.pixel_shuffle": 2, "train.max_steps": 2})
    info = json.loads((run / "vision.json").read_text())
    assert info["vision"]["pixel_shuffle"] == 2 and info["tokens_per_image"] == 4 and info["tower_dim"] == 128
    trained, (loaded, tokenizer) = grab.model.eval(), load_vlm(run)
    assert loaded.projector.net[0].in_features == 128 and loaded.tokens_per_image == 4
    ids, spans = loaded.encode_prompt(tokenizer, _conv(shapes_data.parent / "img" / "red.png"))
    with torch.no_grad():
        ours, theirs = (m(torch.tensor([ids]), **m.image_inputs([spans])).logits for m in (trained, loaded))
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    settings, prompt = GenerationSettings(max_new_tokens=6), _conv(shapes_data.parent / "img" / "red.png")
    assert answer(trained, tokenizer, prompt, settings) == answer(loaded, tokenizer, prompt, settings)


def test_text_loaders_refuse_a_vision_run(tiny_dir, tower_dirs, shapes_data, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.models import resolve_spec

    run = _train(tmp_path, "r", tiny_dir, tower_dirs["clip"], shapes_data, **{"train.max_steps": 1})
    with pytest.raises(TunelabError, match="a vision-language run"):
        resolve_spec(str(run))


def test_train_dispatches_and_chat_attaches_images(tiny_dir, tower_dirs, shapes_data, tmp_path):
    from tunelab.config import load_config
    from tunelab.generation import GenerationSettings
    from tunelab.train import train
    from tunelab.vision.chat import chat_loop
    from tunelab.vision.compose import load_vlm

    run = train(load_config(None, [f"model.name={tiny_dir}", f"model.vision.tower={tower_dirs['clip']}",
                                   f"data.train=[{shapes_data}]", f"output_dir={tmp_path / 'run'}",
                                   "train.max_steps=1", "train.batch_size=2"]))
    assert (run / "vision.json").is_file() and (run / "README.md").is_file()
    model, tokenizer = load_vlm(run)
    image = shapes_data.parent / "img" / "blue.png"
    out = io.StringIO()
    history = chat_loop(model, tokenizer, GenerationSettings(max_new_tokens=4), None, None,
                        io.StringIO(f"/image {image}\nWhat colour?\n/image {tmp_path}/none.png\nAnd now?\nexit\n"),
                        out)
    assert history[0].images == [str(image)] and len(history) == 2
    assert "not found" in out.getvalue()


def test_vision_runs_refuse_packing(tiny_dir, tower_dirs, shapes_data, tmp_path):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="data.packing: not supported for vision runs"):
        _train(tmp_path, "p", tiny_dir, tower_dirs["clip"], shapes_data, **{"data.packing": "true"})


def test_evaluate_scores_per_group_and_shuffles_images(tiny_dir, tower_dirs, shapes_data, tmp_path):
    from tunelab.data import load_dataset
    from tunelab.generation import GenerationSettings
    from tunelab.vision.evaluate import evaluate_vlm, shuffled_images

    convs = load_dataset(str(shapes_data))[:4]
    moved = shuffled_images(convs, seed=3)
    assert all(a.messages[0].images != b.messages[0].images for a, b in zip(convs, moved))
    assert sorted(m.messages[0].images[0] for m in moved) == sorted(c.messages[0].images[0] for c in convs)
    assert [m.messages[0].text for m in moved] == [c.messages[0].text for c in convs]
    model, tokenizer = _vlm(tiny_dir, tower_dirs["clip"])
    result = evaluate_vlm(model, tokenizer, convs, "em", GenerationSettings(max_new_tokens=3),
                          groups=["a", "a", "b", "b"])
    assert result["overall"]["n"] == 4 and set(result["groups"]) == {"a", "b"}
    assert result["groups"]["a"]["n"] == 2 and len(result["predictions"]) == 4


def test_chat_image_flag_needs_a_vision_run(tiny_dir, capsys):
    from tunelab.cli import main

    assert main(["chat", str(tiny_dir), "--image", "x.png"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --image:") and "not a vision-language run" in err


def test_a_trained_composite_answers_from_the_image(tiny_dir, tower_dirs, shapes_data, tmp_path):
    """The colour of a plain image is only in its pixels: after a short instruct run, the right answer
    is far likelier with the row's own image than with another colour's image. The whole tiny LLM
    trains (method full): LoRA on a 2-layer random model learns too slowly for a test."""
    import torch

    from tunelab.data import load_dataset
    from tunelab.data.images import resolve_images
    from tunelab.vision.compose import load_vlm
    from tunelab.vision.evaluate import shuffled_images

    run = _train(tmp_path, "read", str(tiny_dir), tower_dirs["clip"], shapes_data,
                 **{"train.max_steps": 150, "train.lr": 1e-3, "method.name": "full"})
    model, tokenizer = load_vlm(run)
    convs = [resolve_images(c, str(shapes_data.parent)) for c in load_dataset(str(shapes_data))[:4]]

    def answer_loss(rows):
        losses = []
        with torch.inference_mode():
            for conv, reference in zip(rows, convs):
                ids, spans = model.encode_prompt(tokenizer, conv)
                answer = tokenizer(reference.messages[-1].text, add_special_tokens=False)["input_ids"]
                logits = model(input_ids=torch.tensor([ids + answer]), **model.image_inputs([spans])).logits
                losses.append(torch.nn.functional.cross_entropy(logits[0, len(ids) - 1:-1], torch.tensor(answer)))
        return float(torch.stack(losses).mean())

    own, other = answer_loss(convs), answer_loss(shuffled_images(convs, seed=1))
    assert own < 0.5 * other, (own, other)
