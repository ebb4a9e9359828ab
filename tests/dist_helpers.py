"""Workers for the multi-process tests, importing torch alone (spawned processes re-import this)."""

from __future__ import annotations

import json


def gather_worker(rank, world, init_file, out_dir):
    """Join a gloo group, gather per-process metric lists, write what this rank got."""
    import torch.distributed as dist

    from tunelab.train.gather import gather_metrics

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        got = gather_metrics({"reward_accuracy": [float(rank)] * (rank + 1), "logp_chosen": [-1.0 - rank]})
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/{rank}.json", "w", encoding="utf-8") as f:
        json.dump(got, f)
