"""One memory probe: load, prepare the method, run a few optimizer steps, print the peak RSS.

Run as ``python -m tunelab.export.estimate_probe JOB_JSON`` by :func:`tunelab.export.estimate.measure_peak`,
in its own process so that its peak RSS is this configuration's and nothing else's: ``VmHWM``, the
high-water mark of this process's own memory. ``ru_maxrss`` is not that on Linux: a child started
by ``subprocess`` inherits its parent's peak through ``exec`` (the benchmark's probes all reported
the parent's 0.57 GB as their "after load" peak). The model
is put in train mode before the steps: from ``from_pretrained`` it is in eval mode, where gradient
checkpointing silently does nothing. Each step frees its autograd graph before the optimizer step, as
transformers' ``Trainer.training_step`` does (it returns the loss detached): a probe that kept the last
loss alive through the next forward measured 0.8 GB more at SmolLM2 LoRA 2 × 256, because the old
graph's small objects split the heap's free space and the second forward grew the heap instead of
reusing it.
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


def _forward_backward(model, ids):
    """One step's forward and backward; the graph is freed on return, as in ``Trainer.training_step``."""
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach()


def _heap_bytes() -> dict:
    """glibc's heap (arena) and mmapped bytes now: what the peak RSS was made of (empty off glibc)."""
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = Info
    info = mallinfo2()
    return {"heap": info.arena, "heap_in_use": info.uordblks, "mmapped": info.hblkhd}


def peak_rss() -> int:
    """This process's peak resident bytes (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(job: dict) -> dict:
    import torch

    from tunelab.config import MethodConfig, ModelConfig
    from tunelab.models import load_model
    from tunelab.train.methods import get_method

    runtime = peak_rss()  # Python, torch, transformers
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
    loaded = peak_rss()
    optimizer = _optimizer(job.get("optimizer", "adamw"), [p for p in model.parameters() if p.requires_grad])
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (job["batch"], job["seq"]), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    for _ in range(job.get("steps", 2)):  # the second step runs with the optimizer state in place
        _forward_backward(model, ids)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = peak_rss()
    return {**job, "peak_bytes": peak, "after_load_bytes": loaded, "runtime_bytes": runtime,
            "threads": torch.get_num_threads(), "malloc_after": _heap_bytes(),
            "seconds_per_step": (time.perf_counter() - started) / job.get("steps", 2)}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
