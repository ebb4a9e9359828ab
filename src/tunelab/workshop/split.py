"""Train/validation/test splits by ratio or count, with optional grouping.

Grouping keeps related records (the same patient, the same code, the same source
document) in one split, so a test score is not inflated by near-copies in training.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from tunelab.errors import TunelabError

Amount = int | float


def target_size(amount: Amount, total: int, name: str) -> int:
    """Rows wanted for a split: an int is a count, a float in [0, 1) a ratio of ``total``."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
        raise TunelabError(f"split: {name}: expected a count or a ratio, got {amount!r}")
    if isinstance(amount, float):
        if amount >= 1:
            raise TunelabError(f"split: {name}: a ratio must be below 1, got {amount}")
        return int(round(amount * total))
    return amount


def split_rows(
    rows: list[dict],
    held_out: dict[str, Amount],
    seed: int = 42,
    group_key: str | Callable[[dict], Any] | None = None,
    shuffle: bool = True,
) -> dict[str, list[dict]]:
    """Split ``rows`` into ``train`` plus the ``held_out`` splits (name -> count or ratio).

    Whole groups move together, so a held-out split may overshoot its target by less
    than one group. With ``shuffle`` the groups are shuffled with ``seed``; without
    it, file order is kept and the held-out splits come from the end (as the seed's
    "first 5,000 train, next 100 test").
    """
    total = len(rows)
    targets = {name: target_size(amount, total, name) for name, amount in held_out.items()}
    if sum(targets.values()) > total:
        raise TunelabError(f"split: held-out splits want {sum(targets.values())} rows but there are only {total}")
    groups: dict[Any, list[dict]] = {}
    for index, row in enumerate(rows):
        key = index if group_key is None else (group_key(row) if callable(group_key) else row.get(group_key))
        groups.setdefault(key, []).append(row)
    order = list(groups.values())
    if shuffle:
        random.Random(seed).shuffle(order)
    else:
        order.reverse()
    out: dict[str, list[dict]] = {"train": [], **{name: [] for name in targets}}
    for group in order:
        dest = next((name for name, n in targets.items() if len(out[name]) < n), "train")
        out[dest].extend(group if shuffle else reversed(group))
    if not shuffle:
        out = {name: rows[::-1] for name, rows in out.items()}
    return out
