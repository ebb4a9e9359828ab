"""One memory probe: load, prepare the method, run a few optimizer steps, print the peak RSS.

Run as ``python -m tunelab.export.estimate_probe JOB_JSON`` by :func:`tunelab.export.estimate.measure_peak`,
in its own process so that ``ru_maxrss`` is this configuration's peak and nothing else's. The model
is put in train mode before the steps: from ``from_pretrained`` it is in eval mode, where gradient
checkpointing silently does nothing.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _optimizer(name: str, params):
    import torch

    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


def run(job: dict) -> dict:
    import torch

    from tunelab.config import MethodConfig, ModelConfig
    from tunelab.models import load_model
    from tunelab.train.methods import get_method

    runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Python, torch, transformers
    cfg = MethodConfig(name=job["method"], r=job.get("r", 8), freeze_trainable_layers=job.get("freeze_layers", 2))
    method = get_method(cfg.name)
    if method.preflight:
        method.preflight(cfg)
    extra = method.load_kwargs(cfg) if method.load_kwargs else {}
    model, _ = load_model(ModelConfig(name=job["spec"]), for_training=True, **extra)
    model = method.prepare(model, cfg)
    if job.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    optimizer = _optimizer(job.get("optimizer", "adamw"), [p for p in model.parameters() if p.requires_grad])
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (job["batch"], job["seq"]), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    for _ in range(job.get("steps", 2)):  # the second step runs with the optimizer state in place
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**job, "peak_bytes": peak, "after_load_bytes": loaded, "runtime_bytes": runtime,
            "threads": torch.get_num_threads(),
            "seconds_per_step": (time.perf_counter() - started) / job.get("steps", 2)}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
