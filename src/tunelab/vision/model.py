"""The composite: tower -> projector -> causal LM, with image features spliced into the embeddings.

Every image becomes ``tower.tokens`` copies of the image placeholder token in the text (done
before tokenising, ``tunelab.vision.data``). ``forward`` embeds the ids as the LLM would, then
overwrites the placeholder positions, in row-major order, with the projected image features;
the placeholder id itself never reaches the LLM's embedding table, so adding it to the
tokenizer needs no new embedding row. A count that does not match is an error here, never a
silent skip.

Frozen parts stay in eval mode whatever ``train()`` is called with: a frozen CNN in train mode
would update its BatchNorm statistics on every batch. A frozen tower's features are cached per
image (keyed by the preprocessed pixels), so later epochs skip it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.vision.settings import VisionConfig
from tunelab.vision.towers import Tower


class Projector(nn.Module):
    """``linear`` or ``mlp2x_gelu`` (Linear, GELU, Linear), optionally followed by LayerNorm;
    ``tokens`` > 0 adds a learned embedding per token position (zero-initialised); ``feature_norm``
    puts a BatchNorm over the tower features' channels in front."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, norm: bool = False, tokens: int = 0,
                 feature_norm: bool = False):
        super().__init__()
        self.feature_norm = nn.BatchNorm1d(in_dim) if feature_norm else None
        if kind == "linear":
            layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        elif kind == "mlp2x_gelu":
            layers = [nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)]
        else:
            raise TunelabError(f"model.vision.projector: unknown projector {kind!r}")
        if norm:
            layers.append(nn.LayerNorm(out_dim))
        self.net = nn.Sequential(*layers)
        self.pos = nn.Parameter(torch.zeros(tokens, out_dim)) if tokens > 0 else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.feature_norm is not None:  # per channel, over every image token of the batch
            flat = features.reshape(-1, features.shape[-1])
            if self.training and flat.shape[0] < 2:
                # one image token in the batch (feature cls/pooled at batch 1) has no spread to
                # normalise by: use the running statistics and leave them as they are
                norm = self.feature_norm
                flat = nn.functional.batch_norm(flat, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                                training=False, eps=norm.eps)
            else:
                flat = self.feature_norm(flat)
            features = flat.reshape(features.shape)
        out = self.net(features)
        if self.pos is not None:
            if out.shape[-2] != self.pos.shape[0]:
                raise TunelabError(f"model.vision.projector_pos: {out.shape[-2]} image tokens, but the position "
                                   f"embedding has {self.pos.shape[0]}")
            out = out + self.pos.to(out.dtype)
        return out


class FeatureCache:
    """Tower outputs per image, keyed by a hash of its preprocessed pixels (least recently used out)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor) -> bytes:
        return hashlib.blake2b(pixels.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self.store.get(key)
        if value is not None:
            self.store.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        self.store[key] = value.detach()
        if len(self.store) > self.capacity:
            self.store.popitem(last=False)


class VisionLanguageModel(nn.Module):
    """``forward(input_ids, attention_mask, pixel_values, image_groups, ...)`` -> the LLM's output.

    ``pixel_values``: every image of the batch, in order of appearance; ``image_groups``: the
    span each image belongs to (``0, 1, 2...`` when every image has its own span; equal
    numbers for images averaged into one span, ``multi_image: mean``).
    """

    def __init__(self, tower: Tower, projector: Projector, llm: nn.Module, image_token_id: int,
                 cfg: VisionConfig):
        super().__init__()
        self.tower, self.projector, self.llm = tower, projector, llm
        self.image_token_id = int(image_token_id)
        self.vision_cfg = cfg
        self.cache = FeatureCache(cfg.cache_features) if cfg.cache_features > 0 else None

    @property
    def config(self):
        return self.llm.config

    @property
    def tokens_per_image(self) -> int:
        return self.tower.tokens

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.llm.get_output_embeddings()

    def train(self, mode: bool = True) -> "VisionLanguageModel":
        super().train(mode)
        for part in (self.tower, self.projector, self.llm):
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()  # frozen: BatchNorm statistics and dropout stay as loaded
        return self

    def _tower_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.tower.parameters())

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, tokens, tower_dim)``; a frozen tower runs without gradients, through the cache."""
        if not self._tower_frozen():
            return self.tower(pixel_values)
        if self.cache is None or torch.is_inference_mode_enabled():
            # Inference-mode tensors cannot enter a later training step's graph: generation
            # (tunelab.generation runs in inference mode) neither reads nor fills the cache.
            with torch.no_grad():
                return self.tower(pixel_values)
        keys = [self.cache.key(px) for px in pixel_values]
        found = [self.cache.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            with torch.no_grad():
                fresh = self.tower(pixel_values[missing])
            for j, i in enumerate(missing):
                found[i] = fresh[j]
                self.cache.put(keys[i], fresh[j])
        return torch.stack(found)

    def image_embeddings(self, pixel_values: torch.Tensor, image_groups: torch.Tensor | None) -> torch.Tensor:
        """``(spans, tokens, hidden)``: tower features, averaged per group, projected."""
        features = self.tower_features(pixel_values.to(self.device))
        if image_groups is not None and image_groups.numel():
            groups = image_groups.to(features.device).long()
            spans = int(groups.max()) + 1
            if spans < features.shape[0]:  # several images share a span: their mean
                summed = features.new_zeros((spans, *features.shape[1:])).index_add_(0, groups, features)
                counts = torch.bincount(groups, minlength=spans).clamp(min=1).to(features.dtype)
                features = summed / counts[:, None, None]
        return self.projector(features.to(next(self.projector.parameters()).dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_groups: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings with image features at the placeholder positions."""
        mask = input_ids == self.image_token_id
        embeds = self.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        slots = int(mask.sum())
        if pixel_values is None or pixel_values.numel() == 0:
            if slots:
                raise TunelabError(f"{slots} image placeholder token(s) but no image was given")
            return embeds
        images = self.image_embeddings(pixel_values, image_groups)
        if slots != images.shape[0] * images.shape[1]:
            raise TunelabError(
                f"image features and image tokens do not match: {images.shape[0]} image span(s) x "
                f"{images.shape[1]} tokens but {slots} placeholder tokens in the batch")
        return embeds.masked_scatter(mask.unsqueeze(-1), images.to(embeds.dtype).reshape(-1, images.shape[-1]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_groups: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        embeds = self.embed(input_ids, pixel_values, image_groups)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    # The generation core (``tunelab.generation``) asks a model with these two methods for its prompt
    # ids and image inputs, so eval, chat and serve take an image-bearing conversation like a text one.

    def encode_prompt(self, tokenizer, prompt, dataset_dir=None) -> tuple[list[int], list[list]]:
        """``(prompt ids, image spans)`` of a conversation, OpenAI-style messages or raw text.

        Placeholders are expanded as in training (``tunelab.vision.data``); a trailing assistant
        message is left out. Image references are paths (resolved against ``dataset_dir`` too),
        ``data:`` URLs or PIL images.
        """
        from tunelab.data.conversation import Conversation
        from tunelab.data.images import image_spans, resolve_image
        from tunelab.data.render import prompt_ids

        token = self.vision_cfg.image_token
        if isinstance(prompt, str):
            if token in prompt:
                raise TunelabError(f"a raw text prompt holds {token} but no image; send chat messages with image parts")
            return list(tokenizer(prompt)["input_ids"]), []
        conv = prompt if isinstance(prompt, Conversation) else Conversation.from_openai(
            [m.to_openai() if hasattr(m, "to_openai") else m for m in prompt], "prompt")
        grouped, spans = image_spans(conv, self.vision_cfg.multi_image == "mean", token)
        spans = [[ref if not isinstance(ref, str) else resolve_image(ref, conv, dataset_dir) for ref in span]
                 for span in spans]
        ids = prompt_ids(tokenizer, grouped, image_token=token * self.tokens_per_image)
        if ids.count(self.image_token_id) != len(spans) * self.tokens_per_image:
            raise TunelabError(f"{conv.source}: {ids.count(self.image_token_id)} image tokens after rendering, "
                               f"expected {len(spans)} image(s) x {self.tokens_per_image}")
        return ids, spans

    def image_inputs(self, spans_per_row: list[list[list]]) -> dict:
        """``generate`` keyword arguments for a batch: ``pixel_values`` and ``image_groups`` (or none)."""
        from tunelab.vision.data import pixel_batch

        pixels, groups = pixel_batch(spans_per_row, self.tower.preprocess)
        return {} if pixels is None else {"pixel_values": pixels, "image_groups": groups}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_groups: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """New tokens only (``generate`` from embeddings returns no prompt ids)."""
        embeds = self.embed(input_ids.to(self.device), pixel_values, image_groups)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask.to(self.device), **kwargs)
