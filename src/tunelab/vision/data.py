"""Image-bearing conversations -> token ids, labels and image lists; batches with pixels.

Placeholders are expanded before tokenising: each image span becomes ``tokens_per_image``
copies of the image token in the text, so the chat template renders the real sequence and
the answer spans come from rendering exactly as on the text path (``tunelab.data.render``).
Image positions are never supervised, even with ``train_on_prompt``.

Truncation never cuts inside an image span (the classic "image features and image tokens do
not match"): an example whose ``cutoff_len`` cut would split or lose an image is dropped and
counted (``dropped_image_span``); a cut after every image truncates as on the text path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from tunelab.data.conversation import Conversation
from tunelab.data.images import image_spans, open_image, resolve_image
from tunelab.data.render import IGNORE_INDEX, EncodeStats, encode
from tunelab.errors import TunelabError


@dataclass
class VisionEncodeStats(EncodeStats):
    dropped_image_span: int = 0
    """Longer than cutoff_len where the cut would fall inside (or before) an image span."""

    @property
    def dropped(self) -> int:
        return self.dropped_too_long + self.dropped_no_target + self.dropped_image_span

    def summary(self) -> str:
        return (f"{self.kept} kept ({self.truncated} truncated), {self.dropped} dropped "
                f"({self.dropped_too_long} too long, {self.dropped_image_span} would cut an image span, "
                f"{self.dropped_no_target} with no answer token left)")


@dataclass
class ImageLayout:
    """What the model side fixes: the placeholder token, its id, tokens per image, span grouping."""

    image_token: str
    image_token_id: int
    tokens_per_image: int
    mean: bool = False


def encode_vision(tokenizer: Any, conv: Conversation, layout: ImageLayout, cutoff_len: int = 1024,
                  truncation: str = "truncate", mask_history: bool = False, train_on_prompt: bool = False,
                  dataset_dir: str | Path | None = None) -> tuple[dict | None, str]:
    """``(example or None, outcome)``; outcome: kept, truncated, too_long, no_target, image_span.

    The example has ``input_ids``, ``labels``, ``attention_mask`` and ``images`` (one list of
    resolved paths per span, in order).
    """
    grouped, spans = image_spans(conv, layout.mean, layout.image_token)
    paths = [[resolve_image(ref, conv, dataset_dir) for ref in span] for span in spans]
    expanded = layout.image_token * layout.tokens_per_image
    example = encode(tokenizer, grouped, 10**9, "truncate", mask_history, train_on_prompt, image_token=expanded)
    if example is None:
        return None, "no_target"
    ids, labels = example["input_ids"], example["labels"]
    slots = [i for i, t in enumerate(ids) if t == layout.image_token_id]
    if len(slots) != len(spans) * layout.tokens_per_image:
        raise TunelabError(f"{conv.source}: {len(slots)} image tokens after rendering, expected "
                           f"{len(spans)} image(s) x {layout.tokens_per_image}; does the text contain "
                           f"{layout.image_token!r} or does the chat template alter it?")
    for i in slots:
        labels[i] = IGNORE_INDEX
    outcome = "kept"
    if len(ids) > cutoff_len:
        if truncation == "drop":
            return None, "too_long"
        if slots and slots[-1] >= cutoff_len:
            return None, "image_span"
        ids, labels, outcome = ids[:cutoff_len], labels[:cutoff_len], "truncated"
    if all(label == IGNORE_INDEX for label in labels):
        return None, "no_target"
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids), "images": paths}, outcome


def encode_all_vision(tokenizer: Any, conversations: Iterable[Conversation], layout: ImageLayout,
                      cutoff_len: int = 1024, truncation: str = "truncate", mask_history: bool = False,
                      train_on_prompt: bool = False, dataset_dir: str | Path | None = None
                      ) -> tuple[list[dict], VisionEncodeStats]:
    stats = VisionEncodeStats()
    examples = []
    counters = {"too_long": "dropped_too_long", "no_target": "dropped_no_target", "image_span": "dropped_image_span"}
    for conv in conversations:
        example, outcome = encode_vision(tokenizer, conv, layout, cutoff_len, truncation, mask_history,
                                         train_on_prompt, dataset_dir)
        if example is None:
            setattr(stats, counters[outcome], getattr(stats, counters[outcome]) + 1)
            continue
        stats.kept += 1
        stats.truncated += outcome == "truncated"
        examples.append(example)
    return examples, stats


def pixel_batch(spans_per_row: list[list[list[str]]], preprocess) -> tuple[Any, Any]:
    """``(pixel_values, image_groups)`` for a batch: every image in order, and its span number.

    An image is a path, a ``data:`` URL or an already opened PIL image."""
    import torch

    images, groups = [], []
    span = 0
    for row in spans_per_row:
        for paths in row:
            for path in paths:
                images.append(open_image(path) if isinstance(path, str) else path.convert("RGB"))
                groups.append(span)
            span += 1
    if not images:
        return None, None
    return preprocess(images), torch.tensor(groups, dtype=torch.long)


class VisionCollator:
    """The text collator's padding plus ``pixel_values`` and ``image_groups``."""

    def __init__(self, pad_token_id: int, preprocess):
        from tunelab.train.collate import SFTCollator

        self.text = SFTCollator(pad_token_id)
        self.preprocess = preprocess

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if "position_ids" in rows[0]:
            raise TunelabError("data.packing: packing is not supported for vision runs")
        batch = self.text(rows)
        pixels, groups = pixel_batch([r.get("images") or [] for r in rows], self.preprocess)
        if pixels is not None:
            batch["pixel_values"], batch["image_groups"] = pixels, groups
        return batch
