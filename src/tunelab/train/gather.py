"""Per-example metrics of every process, joined before they are logged (no heavy imports:
the multi-process test starts its workers with torch alone)."""

from __future__ import annotations

from collections import defaultdict


def gather_metrics(stored: dict[str, list[float]]) -> dict[str, list[float]]:
    """Every process's per-example metric values, joined (the local ones in a single process).

    In a distributed evaluation the sampler may repeat a few examples to even out the shards;
    those count twice here, as they do in Trainer's own eval loss.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(stored)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(stored))
    joined: dict[str, list[float]] = defaultdict(list)
    for part in parts:
        for key, values in part.items():
            joined[key].extend(values)
    return dict(joined)
