"""Scoring a vision-language model on an image test set, per question type.

``evaluate_vlm`` answers every conversation (its last assistant message is the reference)
and scores the answers with the shared metric registry (``tunelab.eval.metrics.score``),
overall and per group (e.g. the shapes dataset's question ``type``). ``shuffle_images``
gives every row another row's images (a seeded derangement): the baseline that tells whether
the model reads the image at all.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Sequence

from tunelab.data.conversation import Conversation, ImagePart, Message


def shuffled_images(conversations: Sequence[Conversation], seed: int = 0) -> list[Conversation]:
    """Copies whose images come from another row (rows keep their text)."""
    refs = [[p.ref for m in c.messages for p in m.content if isinstance(p, ImagePart)] for c in conversations]
    order = list(range(len(conversations)))
    rng = random.Random(seed)
    while len(order) > 1 and any(i == j for i, j in enumerate(order)):
        rng.shuffle(order)
    out = []
    for conv, source in zip(conversations, order):
        pool = list(refs[source])
        messages = []
        for m in conv.messages:
            parts = [ImagePart(pool.pop(0)) if isinstance(p, ImagePart) and pool else p for p in m.content]
            messages.append(Message(m.role, parts, m.learn))
        out.append(Conversation(messages, conv.source, dict(conv.meta)))
    return out


def evaluate_vlm(model, tokenizer, conversations: Sequence[Conversation], metrics: str | list[str] = "em",
                 settings=None, groups: Sequence[str] | None = None, shuffle_images: bool = False,
                 dataset_dir: str | None = None, seed: int = 0) -> dict[str, Any]:
    """``{"overall": scores, "groups": {group: scores}, "predictions": [...]}``."""
    from tunelab.eval.metrics import score
    from tunelab.generation import GenerationSettings
    from tunelab.vision.chat import answer

    settings = settings or GenerationSettings(max_new_tokens=64)
    rows = shuffled_images(conversations, seed) if shuffle_images else list(conversations)
    predictions = [answer(model, tokenizer, conv, settings, dataset_dir) for conv in rows]
    references = [conv.messages[-1].text for conv in conversations]
    result: dict[str, Any] = {"overall": score(predictions, references, metrics), "groups": {},
                              "predictions": predictions}
    if groups is not None:
        members: dict[str, list[int]] = defaultdict(list)
        for i, group in enumerate(groups):
            members[str(group)].append(i)
        for group, idx in sorted(members.items()):
            result["groups"][group] = score([predictions[i] for i in idx], [references[i] for i in idx], metrics)
    return result
