"""A vision training step with a frozen, cached tower against a text step of the same token count.

Both steps train the same thing on the same LLM (LoRA r8 on every projection of the builtin
SmolLM2-135M; the vision step also trains the mlp2x_gelu projector) with tunelab's SFT loss
(``tunelab.train.trainer.sft_loss``) and AdamW. The vision rows hold one EfficientNet-Lite0
image (49 tokens) each; the text rows put ordinary tokens where the image tokens were, so both
batches have exactly the same shape and the same supervised tokens. The tower's features are
cached after the first step (``model.vision.cache_features``), as in later epochs.

    .venv/bin/python benchmarks/vision_step.py [--steps 6] [--batch 8]

Prints the machine kind, seconds per step (median) for both and their ratio (target <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rows(tokenizer, model, image: str, batch: int):
    from tunelab.data import Conversation, ImagePart, Message, TextPart
    from tunelab.vision.data import ImageLayout, encode_vision

    layout = ImageLayout(model.vision_cfg.image_token, model.image_token_id, model.tokens_per_image)
    conv = Conversation([Message("user", [ImagePart(image), TextPart("What colour is the shape in the top left?")]),
                         Message("assistant", "red")], "bench:1")
    example, _ = encode_vision(tokenizer, conv, layout)
    return [dict(example) for _ in range(batch)]


def _time(step, steps: int) -> list[float]:
    step()  # warm-up (fills the feature cache for the vision step)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)

    from PIL import Image

    from tunelab import hardware
    from tunelab.config import MethodConfig, ModelConfig
    from tunelab.train.methods import prepare_lora
    from tunelab.train.trainer import sft_loss
    from tunelab.vision.compose import new_vlm
    from tunelab.vision.data import VisionCollator
    from tunelab.vision.settings import BUILTIN_TOWER, VisionConfig

    hardware.apply_threads()
    kind = hardware.probe().kind
    model, tokenizer = new_vlm(ModelConfig(vision=VisionConfig(tower=BUILTIN_TOWER)), for_training=True)
    model.llm = prepare_lora(model.llm, MethodConfig())
    for p in model.tower.parameters():
        p.requires_grad_(False)
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        image = str(Path(tmp) / "red.png")
        Image.new("RGB", (224, 224), (215, 40, 40)).save(image)
        rows = _rows(tokenizer, model, image, args.batch)
        vision_batch = VisionCollator(tokenizer.pad_token_id, model.tower.preprocess)(rows)
    text_batch = {k: v for k, v in vision_batch.items() if k not in ("pixel_values", "image_groups")}
    filler = tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    text_batch["input_ids"] = text_batch["input_ids"].masked_fill(text_batch["input_ids"] == model.image_token_id, filler)
    vision_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    text_opt = torch.optim.AdamW([p for p in model.llm.parameters() if p.requires_grad], lr=1e-4)

    def step(module, batch, optimizer):
        def run():
            loss = sft_loss(module, batch, unwrapped=module)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    vision = _time(step(model, vision_batch, vision_opt), args.steps)
    text = _time(step(model.llm, text_batch, text_opt), args.steps)
    result = {"cpu_kind": kind, "threads": torch.get_num_threads(), "batch": list(vision_batch["input_ids"].shape),
              "tokens_per_image": model.tokens_per_image, "vision_step_s": statistics.median(vision),
              "text_step_s": statistics.median(text), "cache_hits": model.cache.hits}
    result["ratio"] = result["vision_step_s"] / result["text_step_s"]
    print(f"{kind}, {result['threads']} thread(s), batch {result['batch']}: vision step "
          f"{result['vision_step_s']:.2f} s, text step {result['text_step_s']:.2f} s, ratio {result['ratio']:.2f} "
          f"(target <= 1.3)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
