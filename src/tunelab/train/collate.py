"""Batching: dynamic padding, sequence packing, and how much of each batch is real.

Examples are dicts with ``input_ids`` and ``labels`` (``-100`` where no loss). Two
ways to batch them:

* padded rows — each example is one row; the collator pads to the longest row of
  the batch (not to ``cutoff_len``) and length-grouped sampling keeps rows of a
  batch similar in length;
* packed rows — :func:`pack_examples` puts several examples in one row with
  ``position_ids`` restarting at 0 for each. The collator then sends no 2-D
  ``attention_mask``, and transformers builds a block-diagonal causal mask from the
  position resets (``masking_utils.find_packed_sequence_indices``), so a token
  never attends to another example. The first label of each packed example is
  ``-100`` so no example is asked to predict the next one's first token — exactly
  as in an unpacked row, where position 0 is never a target.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import torch

IGNORE = -100


def pack_examples(examples: Sequence[dict[str, Any]], max_len: int) -> list[dict[str, Any]]:
    """Pack examples into rows of at most ``max_len`` tokens (best fit, longest first).

    Each row keeps ``input_ids``, ``labels`` and ``position_ids`` (0.. per example)
    plus ``length``. An example longer than ``max_len`` gets a row of its own.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[dict[str, list[int]]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: bisect finds the best fit
    for i in order:
        ids = list(examples[i]["input_ids"])
        labels = list(examples[i]["labels"])
        labels[0] = IGNORE
        slot = bisect.bisect_left(free, (len(ids), -1))
        if slot < len(free):
            space, r = free.pop(slot)
        else:
            space, r = max_len, len(rows)
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
        row = rows[r]
        row["input_ids"] += ids
        row["labels"] += labels
        row["position_ids"] += list(range(len(ids)))
        if space - len(ids) > 0:
            bisect.insort(free, (space - len(ids), r))
    for row in rows:
        row["length"] = len(row["input_ids"])
    return rows


class SFTCollator:
    """Pads a list of examples (or packed rows) into one batch of tensors.

    The batch carries ``num_real_tokens`` (tokens that are not padding) so the trainer
    can report efficiency: real tokens / tokens computed.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        packed = "position_ids" in rows[0]
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        extra = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(row["labels"], dtype=torch.long)
            if packed:
                extra[i, :n] = torch.tensor(row["position_ids"], dtype=torch.long)
                # padding forms its own segment (positions restart) so it joins no example
                extra[i, n:] = torch.arange(width - n)
            else:
                extra[i, :n] = 1
        real = sum(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": ids, "labels": labels, "num_real_tokens": torch.tensor(real)}
        batch["position_ids" if packed else "attention_mask"] = extra
        return batch
