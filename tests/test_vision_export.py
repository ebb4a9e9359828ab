"""A composite that is a Llava model exports as one: plain transformers loads the folder with its
processor and computes the same logits and greedy tokens; other composites are refused in one line."""

from __future__ import annotations

import pytest
from vision_helpers import png, shapes_data, tower_dirs, train_run  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_llava_export_loads_in_plain_transformers(tiny_dir, tower_dirs, shapes_data, tmp_path):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tunelab.cli import main
    from tunelab.data import Conversation, ImagePart, Message, TextPart
    from tunelab.data.render import render_text
    from tunelab.generation import GenerationSettings, generate_ids
    from tunelab.vision.compose import load_vlm

    run = train_run(tmp_path, "run", tiny_dir, tower_dirs["clip"], shapes_data, **{"train.max_steps": 2})
    out = tmp_path / "llava"
    assert main(["export", str(run), "--merge", str(out)]) == 0
    llava = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    model, tokenizer = load_vlm(run)
    image = Image.open(png(tmp_path / "blue.png", "blue")).convert("RGB")
    conv = Conversation([Message("user", [ImagePart(image), TextPart("What colour is it?")])], "t")
    ids, spans = model.encode_prompt(tokenizer, conv)
    inputs = processor(images=[image], text=[render_text(tokenizer, conv, add_generation_prompt=True)],
                       return_tensors="pt", add_special_tokens=False)
    assert inputs["input_ids"][0].tolist() == ids  # the processor expands <image> as the composite does
    with torch.no_grad():
        ours = model(torch.tensor([ids]), **model.image_inputs([spans])).logits
        theirs = llava(**inputs).logits[..., : ours.shape[-1]]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    expected = generate_ids(model, tokenizer, [ids], GenerationSettings(max_new_tokens=6), images=[spans])[0]
    tokens = llava.generate(**inputs, max_new_tokens=6, do_sample=False)[0, len(ids):]
    assert tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd") == expected.text


def test_export_refuses_a_composite_llava_cannot_express(tiny_dir, tower_dirs, shapes_data, tmp_path, capsys):
    from tunelab.cli import main

    run = train_run(tmp_path, "lin", tiny_dir, tower_dirs["clip"], shapes_data,
                    **{"train.max_steps": 1, "model.vision.stage": "align", "model.vision.projector": "linear",
                       "model.vision.pool": 2})
    capsys.readouterr()  # the training's own output
    assert main(["export", str(run), "--merge", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: this composite is not a Llava model: model.vision.projector: linear")
    assert "model.vision.pool: 2" in err and not (tmp_path / "out").exists()
    assert main(["export", str(run), "--gguf", "q8_0", "--out", str(tmp_path / "x.gguf")]) == 1
    assert "exports with --merge OUT" in capsys.readouterr().err


def test_llava_blockers_name_every_setting_llava_cannot_express():
    from tunelab.vision.export import llava_blockers
    from tunelab.vision.settings import VisionConfig

    assert llava_blockers(VisionConfig(tower="some/clip")) == []
    problems = llava_blockers(VisionConfig(tower="some/clip", layer=[-2, -1], projector_pos=True))
    assert problems == ["model.vision.projector_pos: true (Llava's projector has no position embedding)",
                        "model.vision.layer: [-2, -1] (this export writes one feature layer)"]
