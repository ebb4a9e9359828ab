"""Shared pieces of the benchmarks: data, a tiny smoke model, child processes, token counting.

Every training contender runs in its own fresh Python process (``run_child``) so that
its peak RSS is its own and no contender inherits another's warm allocator or caches.
The child prints one JSON object as its last stdout line; the parent reads only that.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILTIN = "builtin:smollm2-135m-instruct"
IGNORE = -100


def ensure_src_on_path() -> None:
    """Let ``python benchmarks/x.py`` import tunelab from the checkout without an install."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    divisor = 1024 * 1024 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / divisor


def own_peak_rss_mb() -> float:
    """This process's own peak RSS in MiB: ``VmHWM``, which starts afresh at exec.

    ``ru_maxrss`` does not: Linux carries the parent's RSS at fork into the child's maximum
    across exec, so a child started by a process holding a model reports at least that.
    Falls back to ``peak_rss_mb`` where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, bf16 support, library versions, threads."""
    import torch
    import transformers

    cpu, flags = platform.processor() or "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags, "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        **{k: os.environ[k] for k in EMULATION_ENV if k in os.environ},
    }


# ------------------------------------------------------------------ the CPU kind

EMULATION_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
"""Set before torch is imported, these make torch dispatch as on an AVX2-only CPU."""
EMULATED_ON_ENV = "TUNELAB_BENCH_EMULATED_ON"
"""Set by ``run.py --emulate-avx2`` to the real CPU kind before it re-executes itself."""


def cpu_kind(probe) -> str:
    """The CPU kind every benchmark output names: the probe's, or what it emulates and on what."""
    real = os.environ.get(EMULATED_ON_ENV)
    if real:
        return f"AVX2 (emulated on {real})"
    forced = [f"{k}={os.environ[k]}" for k in EMULATION_ENV if os.environ.get(k)]
    return probe.kind + (f" ({', '.join(forced)} set)" if forced else "")


# ------------------------------------------------------------------ data


def build_data(workdir: Path) -> Path:
    """The ICD-10-CM term-normalisation set (alpaca JSONL), built once into ``workdir/data``.

    Every contender trains on ``train.jsonl`` of this folder and evaluation prompts
    come from ``test.jsonl``, so all contenders see the same rows.
    """
    ensure_src_on_path()
    from tunelab.workshop.builtin.icd10cm import build_icd10cm_norm

    out = workdir / "data"
    if not (out / "train.jsonl").is_file():
        build_icd10cm_norm(out, seed=42)
    return out


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


# ------------------------------------------------------------------ smoke model

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_model(folder: Path, data_dir: Path) -> Path:
    """A tiny random Llama plus a byte-level BPE trained on the benchmark's own prompts.

    Saved as an ordinary Hugging Face folder, so every contender loads it exactly as it
    loads the real model. Used by ``--smoke`` only: its figures mean nothing.
    """
    if (folder / "config.json").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = read_jsonl(data_dir / "train.jsonl", limit=400)
    corpus = [r["instruction"] + "\n" + r["output"] for r in rows]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=800, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>",
                                        eos_token="<|im_end|>", pad_token="<pad>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def model_path(spec: str) -> str:
    """A folder ``from_pretrained`` reads for ``spec`` (builtin specs convert once, then cache)."""
    ensure_src_on_path()
    from tunelab.models import resolve_spec

    return resolve_spec(spec).path


# ------------------------------------------------------------------ child processes


def run_child(script: str, args: list[str], timeout: float = 3600, threads: int | None = None,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python benchmarks/SCRIPT ARGS`` in a fresh process; return its last-line JSON.

    The child inherits this process's environment (``--emulate-avx2``'s variables
    included) plus ``env``. ``threads`` pins its intra-op threads for torch
    (``OMP_NUM_THREADS``) and for tunelab (``$TUNELAB_THREADS``); without it torch
    uses all cores and tunelab chooses from the free ones.
    """
    cmd = [sys.executable, str(HERE / script), *args]
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                           os.environ.get("PYTHONPATH")])),
                    TOKENIZERS_PARALLELISM="false", **(env or {}))
    if threads:
        full_env.update(OMP_NUM_THREADS=str(threads), TUNELAB_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
        raise RuntimeError(f"child {' '.join(cmd[1:])} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def emit(result: dict[str, Any]) -> None:
    """Print the result as the last stdout line (what ``run_child`` parses)."""
    print(json.dumps(result, ensure_ascii=False), flush=True)


# ------------------------------------------------------------------ timing training steps


def _batch_counts(batch: dict) -> tuple[int, int, int]:
    """(real tokens, supervised targets, attention pairs) of one collated micro-batch.

    Real tokens are the non-padding tokens that go through the model; supervised
    targets are the next-token predictions that carry loss; attention pairs
    (sum over sequences of n·(n+1)/2) feed the attention FLOP count.
    """
    labels = batch["labels"]
    supervised = int((labels[:, 1:] != IGNORE).sum())
    if "attention_mask" in batch:
        lengths = batch["attention_mask"].sum(dim=1).tolist()
    elif "position_ids" in batch:  # packed rows: a new example starts wherever position is 0
        # (a trailing padding segment counts too: a slight over-count of attention work)
        lengths = []
        for row in batch["position_ids"]:
            starts = (row == 0).nonzero().flatten().tolist() + [row.numel()]
            lengths += [b - a for a, b in zip(starts, starts[1:])]
    else:
        lengths = [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]
    real = int(batch["num_real_tokens"]) if "num_real_tokens" in batch else int(sum(lengths))
    pairs = int(sum(n * (n + 1) // 2 for n in lengths))
    return real, supervised, pairs


def step_timer_callback():
    """A TrainerCallback that times optimizer steps and counts tokens per micro-batch.

    It wraps the training dataloader's ``collate_fn`` when training begins, so it works
    for any Trainer without touching the contender's code. Dataloaders prefetch a batch,
    so counts are kept per micro-batch in order and assigned to steps by position.
    """
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.batches: list[tuple[int, int, int, int]] = []
            self.step_ends: list[float] = []
            self.train_begin = None
            self.rss_at_start = 0.0
            self.model = None
            self.precision = "fp32"
            self.threads: list[int] = []  # intra-op threads when training began and ended

        def on_train_begin(self, args, state, control, train_dataloader=None, model=None, **kwargs):
            self.train_begin = time.perf_counter()
            self.rss_at_start = current_rss_mb()  # model loaded, data prepared, nothing trained yet
            self.model = model  # kept for the parameter counts of the FLOP formulas
            self.precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
            self.threads.append(torch.get_num_threads())
            loader = train_dataloader
            inner = getattr(loader, "base_dataloader", loader)
            for target in {id(loader): loader, id(inner): inner}.values():
                original = target.collate_fn
                if getattr(original, "_bench_wrapped", False):
                    continue

                def counted(rows, _original=original):
                    batch = _original(rows)
                    self.batches.append((*_batch_counts(batch), batch["input_ids"].numel()))
                    return batch

                counted._bench_wrapped = True
                target.collate_fn = counted

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            self.threads.append(torch.get_num_threads())

        def summary(self, grad_accum: int, warmup: int = 1) -> dict[str, Any]:
            """Throughput over steps ``warmup+1 .. N`` (the first steps warm caches up)."""
            steps = len(self.step_ends)
            if steps <= warmup:
                raise RuntimeError(f"only {steps} steps ran; need more than {warmup} warmup step(s)")
            timed = self.batches[warmup * grad_accum: steps * grad_accum]
            seconds = self.step_ends[-1] - self.step_ends[warmup - 1]
            real, supervised, pairs, slots = (sum(b[i] for b in timed) for i in range(4))
            return {
                "timed_steps": steps - warmup, "seconds": seconds, "real_tokens": real,
                "supervised_tokens": supervised, "attention_pairs": pairs, "token_slots": slots,
                "tokens_per_s": real / seconds, "supervised_tokens_per_s": supervised / seconds,
                "s_per_step": seconds / (steps - warmup), "padding_fraction": 1 - real / max(slots, 1),
                "warmup_seconds": self.step_ends[warmup - 1] - self.train_begin,
                "rss_at_train_start_mb": self.rss_at_start,
                "precision": self.precision, "threads": self.threads[0] if self.threads else None,
                "threads_at_end": self.threads[-1] if self.threads else None,
            }

    return StepTimer()
