"""Batching and the SFT loss: padding, packing without cross-contamination, head-gathered logits."""

from __future__ import annotations

import pytest
import torch

from tunelab.train.collate import IGNORE, SFTCollator, pack_examples
from tunelab.train.trainer import sft_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def examples(lengths, supervised_from=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        start = n // 2 if supervised_from is None else supervised_from
        out.append({"input_ids": ids, "labels": [IGNORE] * start + ids[start:]})
    return out


def test_collator_pads_dynamically_and_counts_efficiency():
    collate = SFTCollator(pad_token_id=3)
    batch = collate(examples([5, 3]))
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][1, 3:].tolist() == [3, 3]
    assert batch["labels"][1, 3:].tolist() == [IGNORE, IGNORE]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert int(batch["num_real_tokens"]) == 8  # of 10 slots: the run reports 80% efficiency


def test_pack_examples_resets_positions_and_masks_each_first_label():
    rows = pack_examples(examples([7, 12, 5, 9], supervised_from=0), max_len=20)
    assert sorted(len(r["input_ids"]) for r in rows) == [14, 19]  # first fit, longest first: 12+7, 9+5
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == IGNORE for i in starts)
        assert len(row["input_ids"]) == len(row["labels"]) == row["length"] <= 20
    assert sum(r["length"] for r in rows) == 33


def test_overlong_example_gets_its_own_row():
    rows = pack_examples(examples([30, 4]), max_len=20)
    assert sorted(r["length"] for r in rows) == [4, 30]


def test_packed_loss_equals_unpacked_loss(tiny_llama):
    # Every token supervised: a leak across examples, or a target crossing a boundary, would show.
    data = examples([7, 12, 5, 9, 6], supervised_from=0)
    collate = SFTCollator(pad_token_id=3)
    with torch.no_grad():
        unpacked = sft_loss(tiny_llama, collate(data))
        packed_batch = collate(pack_examples(data, max_len=24))
        assert "attention_mask" not in packed_batch and packed_batch["input_ids"].shape[0] == 2
        packed = sft_loss(tiny_llama, packed_batch)
        # Control: the same packed rows with positions that do not restart let examples see each other.
        leaky = dict(packed_batch, position_ids=torch.arange(packed_batch["input_ids"].shape[1])[None].expand(2, -1))
        contaminated = sft_loss(tiny_llama, leaky)
    assert packed.item() == pytest.approx(unpacked.item(), abs=1e-5)
    assert abs(contaminated.item() - unpacked.item()) > 1e-4


def test_gathered_head_loss_equals_full_logits_loss(tiny_llama):
    data = examples([9, 14, 6])
    batch = SFTCollator(pad_token_id=3)(data)
    with torch.no_grad():
        ours = sft_loss(tiny_llama, batch)
        reference = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(reference.item(), abs=1e-5)


def test_loss_normaliser_is_the_step_token_count(tiny_llama):
    batch = SFTCollator(pad_token_id=3)(examples([9, 14]))
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        mean = sft_loss(tiny_llama, batch)
        over_step = sft_loss(tiny_llama, batch, num_items=torch.tensor(4 * n))
    assert over_step.item() == pytest.approx(mean.item() / 4, rel=1e-5)
