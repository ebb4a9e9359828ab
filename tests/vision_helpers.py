"""Shared by the vision tests: a tiny CLIP tower and a tiny BatchNorm ResNet saved as folders,
a colour-question dataset with images, and helpers that build a composite or a conversation.

Test modules import the fixtures by name (``from vision_helpers import tower_dirs, ...``).
"""

from __future__ import annotations

import json

import pytest

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def png(path, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), COLOURS[colour]).save(path)
    return path


@pytest.fixture(scope="module")
def tower_dirs(tmp_path_factory):
    """A tiny CLIP vision tower (ViT: CLS + 4x4 patches) and a tiny ResNet (BatchNorm buffers)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, ResNetConfig, ResNetModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    clip = tmp_path_factory.mktemp("clip_tower")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(clip)
    processor.save_pretrained(clip)
    resnet = tmp_path_factory.mktemp("resnet_tower")
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                             layer_type="basic")).save_pretrained(resnet)
    processor.save_pretrained(resnet)
    return {"clip": str(clip), "resnet": str(resnet)}


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """A colour question per image, in the sharegpt/openai shape with an images list."""
    root = tmp_path_factory.mktemp("shapes")
    rows = []
    for colour in COLOURS:
        png(root / "img" / f"{colour}.png", colour)
        rows.append({"messages": [{"role": "user", "content": "<image>What colour is it?"},
                                  {"role": "assistant", "content": colour}],
                     "images": [f"img/{colour}.png"]})
    path = root / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows * 2) + "\n", encoding="utf-8")
    return path


def vcfg(tower, **kw):
    from tunelab.vision.settings import VisionConfig

    return VisionConfig(tower=tower, **kw)


def vlm(tiny_dir, tower, **kw):
    """A fresh composite (tiny Llama + ``tower``) in eval mode, and its tokenizer."""
    from tunelab.config import ModelConfig
    from tunelab.vision.compose import new_vlm

    model, tokenizer = new_vlm(ModelConfig(name=str(tiny_dir), vision=vcfg(tower, **kw)), for_training=False)
    return model.eval(), tokenizer


def layout(model):
    from tunelab.vision.data import ImageLayout

    return ImageLayout(model.vision_cfg.image_token, model.image_token_id, model.tokens_per_image,
                       model.vision_cfg.multi_image == "mean")


def conv(image, question="What colour is it?", answer="red"):
    from tunelab.data import Conversation, ImagePart, Message, TextPart

    return Conversation([Message("user", [ImagePart(str(image)), TextPart(question)]),
                         Message("assistant", answer)], source="test.jsonl:1")


def train_run(tmp_path, name, model_name, tower, data, callbacks=None, **overrides):
    """``train_vlm`` for 3 tiny steps (overrides as ``key=value`` config settings), in fp32 on every
    CPU kind: where bf16 is fast, ``auto`` would store the frozen linears in bf16 and the trained
    model would no longer match its fp32 reload to the last bit."""
    from tunelab.config import load_config
    from tunelab.vision.train import train_vlm

    args = [f"model.name={model_name}", f"data.train=[{data}]", f"output_dir={tmp_path / name}",
            "train.max_steps=3", "train.batch_size=4", "train.lr=1e-2", "train.warmup_ratio=0",
            "data.group_by_length=false", "model.precision=fp32", "train.bf16=false"]
    if tower:
        args.append(f"model.vision.tower={tower}")
    args += [f"{k}={v}" for k, v in overrides.items()]
    return train_vlm(load_config(None, args), callbacks)


def state(module):
    """Copies of a module's weights and buffers (BatchNorm statistics included)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
