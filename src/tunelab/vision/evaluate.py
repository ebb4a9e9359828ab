"""Scoring a vision-language model on an image test set, per question type.

``evaluate_vlm`` answers every conversation (its last assistant message is the reference)
and scores the answers with the shared metric registry (``tunelab.eval.metrics.score``),
overall and per group (e.g. the shapes dataset's question ``type``). ``shuffle_images``
gives every row another scene's images (seeded): the baseline that tells whether the model
reads the image at all.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Sequence

from tunelab.data.conversation import Conversation, ImagePart, Message


def shuffled_images(conversations: Sequence[Conversation], seed: int = 0) -> list[Conversation]:
    """Copies whose images come from another scene (rows keep their text).

    Rows are grouped by their images (several questions about one picture are one group);
    the groups, in a seeded order, each take the next group's images, so no row keeps its own
    picture whenever there are two or more."""
    refs = [tuple(p.ref for m in c.messages for p in m.content if isinstance(p, ImagePart)) for c in conversations]
    groups = [key for key in dict.fromkeys(refs) if key]
    random.Random(seed).shuffle(groups)
    following = {key: groups[(i + 1) % len(groups)] for i, key in enumerate(groups)}
    out = []
    for conv, own in zip(conversations, refs):
        pool = list(following.get(own, own))
        messages = []
        for m in conv.messages:
            parts = [ImagePart(pool.pop(0)) if isinstance(p, ImagePart) and pool else p for p in m.content]
            messages.append(Message(m.role, parts, m.learn))
        out.append(Conversation(messages, conv.source, dict(conv.meta)))
    return out


def evaluate_vlm(model, tokenizer, conversations: Sequence[Conversation], metrics: str | list[str] = "em",
                 settings=None, groups: Sequence[str] | None = None, shuffle_images: bool = False,
                 dataset_dir: str | None = None, seed: int = 0, batch_size: int = 8,
                 group_metrics: dict[str, Any] | None = None, options=None, progress: bool = False
                 ) -> dict[str, Any]:
    """``{"overall": scores, "groups": {group: scores}, "predictions": [...]}``.

    Answers come from the shared generation core in batches (``tunelab.generation.generate``),
    as for a text model. ``group_metrics`` gives a group its own metrics (e.g. BLEU/CIDEr for
    reports where the others take exact match)."""
    from tunelab.data.images import resolve_images
    from tunelab.eval.metrics import score
    from tunelab.generation import GenerationSettings, generate

    settings = settings or GenerationSettings(max_new_tokens=64)
    rows = [resolve_images(c, dataset_dir) for c in conversations]
    rows = shuffled_images(rows, seed) if shuffle_images else rows
    results = generate(model, tokenizer, rows, settings, batch_size=batch_size, progress=progress)
    predictions = [r.text.strip() for r in results]
    references = [conv.messages[-1].text for conv in conversations]
    result: dict[str, Any] = {"overall": score(predictions, references, metrics, options), "groups": {},
                              "predictions": predictions}
    if groups is not None:
        members: dict[str, list[int]] = defaultdict(list)
        for i, group in enumerate(groups):
            members[str(group)].append(i)
        for group, idx in sorted(members.items()):
            result["groups"][group] = score([predictions[i] for i in idx], [references[i] for i in idx],
                                            (group_metrics or {}).get(group, metrics), options)
    return result
