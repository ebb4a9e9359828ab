"""``tunelab export VISION_RUN --merge OUT``: a composite written as a plain transformers Llava model.

transformers' ``LlavaForConditionalGeneration`` is tower -> two-layer GELU MLP -> causal LM with
the image features written over placeholder tokens, which is what a composite is when:

- the tower is a transformers vision model whose features are one layer's hidden states
  (CLIP, SigLIP, ViT...), not the packaged EfficientNet-Lite0, which has no transformers class;
- ``projector: mlp2x_gelu`` without ``projector_norm``, ``pool: 1``, ``pixel_shuffle: 1``,
  ``multi_image: concat``;
- ``feature: patch`` (a CLS token dropped: Llava's ``default``; no CLS: ``full``) or ``all`` (``full``).

Such a run exports as a folder that ``LlavaForConditionalGeneration.from_pretrained(OUT)`` and
``AutoProcessor.from_pretrained(OUT)`` load without tunelab (LoRA merged; the processor expands
``<image>`` to the same number of tokens). Any other composite is refused in one line naming
every setting in the way; its run folder stays loadable with tunelab.

The placeholder token never needed an embedding row in the composite; Llava looks every input id
up before it overwrites the image positions, so the export adds a zero row when the id is past
the vocabulary and tells ``generate`` never to produce it. The check feeds a probe image and
prompt through the processor and the reloaded export and compares the logits with the
composite's; a mismatch refuses the export.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tunelab.errors import TunelabError

CHECK_TOLERANCE = 1e-3
"""Largest |logit difference| allowed between the composite and its Llava export (fp32)."""


def llava_blockers(v) -> list[str]:
    """Settings (a ``VisionConfig``) that keep a composite from being a ``LlavaForConditionalGeneration``."""
    problems = []
    if str(v.tower).startswith("builtin:"):
        problems.append(f"model.vision.tower: {v.tower} is not a transformers vision model")
    if v.projector != "mlp2x_gelu":
        problems.append(f"model.vision.projector: {v.projector} (Llava's projector is mlp2x_gelu)")
    if v.projector_norm:
        problems.append("model.vision.projector_norm: true (Llava has no LayerNorm after the projector)")
    if getattr(v, "feature_norm", False):
        problems.append("model.vision.feature_norm: true (Llava's projector has no norm in front)")
    if getattr(v, "projector_pos", False):
        problems.append("model.vision.projector_pos: true (Llava's projector has no position embedding)")
    if isinstance(v.layer, (list, tuple)):
        problems.append(f"model.vision.layer: {list(v.layer)} (this export writes one feature layer)")
    if v.pool != 1:
        problems.append(f"model.vision.pool: {v.pool} (Llava does not pool image tokens)")
    if v.pixel_shuffle != 1:
        problems.append(f"model.vision.pixel_shuffle: {v.pixel_shuffle} (Llava does not merge image tokens)")
    if v.multi_image != "concat":
        problems.append(f"model.vision.multi_image: {v.multi_image} (Llava gives every image its own span)")
    if v.feature not in ("patch", "all"):
        problems.append(f"model.vision.feature: {v.feature} (Llava takes patch or all tokens of a layer)")
    return problems


def _refuse(problems: list[str]) -> None:
    if problems:
        raise TunelabError("this composite is not a Llava model: " + "; ".join(problems)
                           + " (the run folder itself loads with tunelab)")


def _strategy(model) -> tuple[str, bool]:
    """Llava's ``vision_feature_select_strategy`` for the tower, and whether it has a CLS token."""
    from tunelab.vision.towers import blank_image, has_cls

    with torch.no_grad():
        out = model.tower.encoder(pixel_values=model.tower.preprocess([blank_image()]), output_hidden_states=True)
    cls = has_cls(out.hidden_states[model.vision_cfg.layer].shape[1])
    return ("default" if cls and model.vision_cfg.feature == "patch" else "full"), cls


def _merged_llm(model, tokenizer):
    """The LLM with its adapter merged and an embedding row for the image token (zero, never generated)."""
    llm = model.llm
    if hasattr(llm, "merge_and_unload"):
        llm = llm.merge_and_unload()
    rows = llm.get_input_embeddings().num_embeddings
    added = model.image_token_id >= rows
    if added:
        llm.resize_token_embeddings(model.image_token_id + 1, mean_resizing=False)
        with torch.no_grad():
            llm.get_input_embeddings().weight[rows:] = 0
            head = llm.get_output_embeddings()
            if head is not None and head.weight.data_ptr() != llm.get_input_embeddings().weight.data_ptr():
                head.weight[rows:] = 0
    return llm, added


def build_llava(model, tokenizer):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` holding the composite's weights."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedModel

    _refuse(llava_blockers(model.vision_cfg))
    strategy, cls = _strategy(model)
    encoder = model.tower.encoder
    llm, added = _merged_llm(model, tokenizer)
    config = LlavaConfig(vision_config=encoder.config.to_dict(), text_config=llm.config.to_dict(),
                         image_token_index=model.image_token_id, image_seq_length=model.tokens_per_image,
                         projector_hidden_act="gelu", vision_feature_select_strategy=strategy,
                         vision_feature_layer=model.vision_cfg.layer, multimodal_projector_bias=True)
    llava = LlavaForConditionalGeneration(config).eval()
    tower = llava.model.vision_tower
    if not isinstance(encoder, PreTrainedModel) and hasattr(tower, "vision_model"):
        tower = tower.vision_model  # a dual encoder's vision half is the inner module
    tower.load_state_dict(encoder.state_dict())
    llava.model.multi_modal_projector.linear_1.load_state_dict(model.projector.net[0].state_dict())
    llava.model.multi_modal_projector.linear_2.load_state_dict(model.projector.net[2].state_dict())
    llava.model.language_model.load_state_dict(getattr(llm, llm.base_model_prefix).state_dict())
    llava.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    llava.generation_config = llm.generation_config
    if added:
        llava.generation_config.suppress_tokens = [model.image_token_id]
    size = model.tower.preprocess([_probe_image()]).shape[-2:]
    patch = encoder.config.patch_size
    processor = LlavaProcessor(image_processor=model.tower.processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy=strategy, chat_template=tokenizer.chat_template,
                               image_token=model.vision_cfg.image_token, num_additional_image_tokens=int(cls))
    expected = (size[0] // patch) * (size[1] // patch) + int(cls) - int(strategy == "default")
    if expected != model.tokens_per_image:
        raise TunelabError(f"the Llava processor would expand an image to {expected} tokens, the composite "
                           f"uses {model.tokens_per_image}")
    return llava, processor


def _probe_image():
    from PIL import Image

    gradient = Image.linear_gradient("L").resize((224, 224))
    return Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.ROTATE_90), gradient.point(lambda x: 255 - x)))


def check_export(model, tokenizer, folder: Path) -> float:
    """Max |logit difference| between the composite and the folder loaded by plain transformers."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tunelab.data import Conversation, ImagePart, Message, TextPart
    from tunelab.data.render import render_text

    image = _probe_image()
    conv = Conversation([Message("user", [ImagePart(image), TextPart("Describe the findings.")])], "probe")
    ids, spans = model.encode_prompt(tokenizer, conv)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), **model.image_inputs([spans])).logits[0]
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    text = render_text(tokenizer, conv, add_generation_prompt=True, image_token=model.vision_cfg.image_token)
    inputs = processor(images=[image], text=[text], return_tensors="pt", add_special_tokens=False)
    if inputs["input_ids"][0].tolist() != ids:
        raise TunelabError(f"{folder}: the exported processor tokenises the probe prompt differently "
                           f"({inputs['input_ids'].shape[1]} tokens against {len(ids)})")
    with torch.no_grad():
        theirs = reloaded(**inputs).logits[0, :, : ours.shape[-1]]
    return float((theirs - ours).abs().max())


def export_llava(run: str | Path, out: str | Path, overwrite: bool = False, check: bool = True) -> Path:
    """Write ``run`` (a vision run folder) to ``out`` as a transformers Llava model with its processor."""
    from tunelab.vision.compose import load_vlm, read_info
    from tunelab.vision.settings import VisionConfig

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TunelabError(f"{out} exists and is not empty; pass --overwrite")
    _refuse(llava_blockers(VisionConfig(**read_info(run)["vision"])))  # before any weights load
    model, tokenizer = load_vlm(run)
    llava, processor = build_llava(model, tokenizer)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    llava.save_pretrained(str(staging))
    processor.save_pretrained(str(staging))
    if check:
        model, tokenizer = load_vlm(run)  # a fresh copy: building the export merged the first one's adapter
        diff = check_export(model, tokenizer, staging)
        if diff > CHECK_TOLERANCE:
            shutil.rmtree(staging, ignore_errors=True)
            raise TunelabError(f"{run}: the Llava export's logits differ from the run's by {diff:.3g} "
                               f"(> {CHECK_TOLERANCE}); nothing was written")
        print(f"check: plain transformers Llava vs the run: max |logit difference| {diff:.2e}", flush=True)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out
