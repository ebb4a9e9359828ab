"""Mix datasets by ratio or by count (seed 003: general:domain = 1:0, 1:1, 0:1).

``mix([("general.jsonl", 1), ("domain.jsonl", 1)], out_dir)`` takes as many rows as
the ratio allows without repeating any (the scarcest source sets the total), or
exactly ``total`` rows when given (``repeat=True`` lets a small source be reused
to reach it). ``by="count"`` reads the numbers as row counts instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.workshop.items import Item, export_splits, load_items
from tunelab.workshop.output import write_dataset


@dataclass
class MixReport:
    """Rows available and taken per source, and the split sizes written."""

    available: dict[str, int] = field(default_factory=dict)
    taken: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    out_dir: Path | None = None


def parse_source(text: str) -> tuple[str, float]:
    """``PATH:WEIGHT`` (weight defaults to 1); the last ``:`` splits, so ``C:\\x`` paths work."""
    path, sep, weight = text.rpartition(":")
    if not sep or not path:
        return text, 1.0
    try:
        return path, float(weight)
    except ValueError:
        return text, 1.0


def allocate(weights: list[float], available: list[int], total: int | None, by: str, repeat: bool) -> list[int]:
    """Rows to take from each source (largest-remainder rounding, so counts sum to the total)."""
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise TunelabError("mix: weights must be >= 0 and at least one > 0")
    if by == "count":
        counts = [int(w) for w in weights]
    elif by == "ratio":
        share = [Fraction(w).limit_denominator(10_000) / sum(Fraction(x).limit_denominator(10_000) for x in weights)
                 for w in weights]
        if total is None:  # the largest total no source runs out at
            total = min(int(n / s) for n, s in zip(available, share) if s > 0)
        exact = [s * total for s in share]
        counts = [int(x) for x in exact]
        order = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
        for i in order[: total - sum(counts)]:
            counts[i] += 1
    else:
        raise TunelabError(f"mix: by must be 'ratio' or 'count', got {by!r}")
    for count, have, index in zip(counts, available, range(len(counts))):
        if count > have and not repeat:
            raise TunelabError(f"mix: source {index + 1} has {have} rows but {count} are needed (use --repeat to reuse rows)")
    return counts


def _take(items: list[Item], n: int, rng: random.Random) -> list[Item]:
    pool = list(items)
    rng.shuffle(pool)
    taken = []
    while len(taken) < n and pool:
        taken.extend(pool[: n - len(taken)])
    return taken


def mix(
    sources: list[tuple[str | Path, float]],
    out_dir: str | Path,
    total: int | None = None,
    by: str = "ratio",
    name: str = "mix",
    seed: int = 42,
    repeat: bool = False,
    dataset_dir: str | Path | None = None,
    test: int | float = 0,
) -> MixReport:
    """Mix ``sources`` (dataset, weight) into ``out_dir/<name>_train.jsonl`` (and ``_test``).

    ``test``: a count or ratio held out from each source (so the test mix has the same
    proportions). The seed's forgetting experiment: train 1:0, 1:1 and 0:1 mixes and
    score each model on a general and a domain test set.
    """
    rng = random.Random(seed)
    loaded = [(str(spec), load_items(spec, dataset_dir)) for spec, _ in sources]
    report = MixReport(available={spec: len(items) for spec, items in loaded})
    counts = allocate([w for _, w in sources], [len(items) for _, items in loaded], total, by, repeat)
    train: list[Item] = []
    held: list[Item] = []
    for (spec, items), n in zip(loaded, counts):
        chosen = _take(items, n, rng)
        report.taken[spec] = len(chosen)
        n_test = int(round(test * len(chosen))) if isinstance(test, float) else int(test)
        held += chosen[:n_test]
        train += chosen[n_test:]
    rng.shuffle(train)
    rows, fmt = export_splits({"train": train, "test": held})
    info = {"description": f"mix of {len(sources)} datasets by {by}", "sources": report.available,
            "taken": report.taken, "seed": seed}
    report.sizes = write_dataset(out_dir, name, rows, info, formatting=fmt, file_prefix=f"{name}_")
    report.out_dir = Path(out_dir)
    return report
