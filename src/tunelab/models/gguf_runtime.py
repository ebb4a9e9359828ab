"""Chat, serve and evaluate a model quantized to GGUF, running in real llama.cpp.

``tunelab chat|serve|eval MODEL --quantize q8_0`` exports ``MODEL`` (model, run folder or
builtin; a LoRA adapter is merged) to GGUF once, verifies the file like ``tunelab export``
does, caches it under ``$TUNELAB_CACHE/gguf`` and answers through node-llama-cpp's prebuilt
llama.cpp. On a CPU this is the fast path (docs/deploy.md measured q8_0 at 3.2x the
tokens/s of transformers fp32 with the demo's exact match kept); no PyTorch-side
quantization measured faster on a CPU, so none is offered.

``LlamaCppModel`` stands where a transformers model stands for ``tunelab.generation``:
it carries the source's ``config`` (context length) and ``generation_config`` (end
tokens), and ``decode`` feeds each generated token to the caller's row bookkeeping, so
stop strings, streaming, cancellation and finish reasons behave as with transformers.
Rows run one after another on one llama.cpp sequence whose KV cache keeps the prompt
prefix a row shares with the one before (a chat's conversation so far, an evaluation's
instruction). Not as parallel sequences: node-llama-cpp 3.21.1 let parallel rows take
tokens from each other's prompts now and then (``llamacpp_server.mjs``). Threads: the cores
other processes leave free, as for torch (two threads on two cores collapsed decode speed
while anything else ran).
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import threading
from pathlib import Path
from typing import Callable, Sequence

from tunelab.errors import TunelabError

QUANTIZE_TYPES = ("f16", "q8_0", "q5_0", "q4_0", "q4_1")
"""What ``--quantize`` accepts: GGUF types with a numpy quantizer and an export tolerance."""
MAX_CONTEXT = 4096
"""llama.cpp's KV cache is allocated for the whole context up front; a model declaring more
positions is served with this many (prompts beyond it get the usual context error)."""
UNSUPPORTED = {"num_beams": 1, "no_repeat_ngram_size": 0, "min_new_tokens": 0}
"""Generation settings llama.cpp's sampler here cannot honour, with the value that means off."""


class LlamaCppModel:
    """A GGUF file answered by a node-llama-cpp process (one JSON object per line both ways)."""

    device = "cpu"

    def __init__(self, gguf_path: str | Path, config, generation_config=None, threads: int = 1,
                 context_size: int | None = None, quality: str = ""):
        from tunelab.export import llamacpp

        reason = llamacpp.unavailable_reason()
        if reason:
            raise TunelabError(f"--quantize runs the model in llama.cpp, and {reason}")
        self.gguf_path = Path(gguf_path)
        limit = getattr(config, "max_position_embeddings", None) or MAX_CONTEXT
        self.context_size = int(context_size or min(limit, MAX_CONTEXT))
        self.config = copy.copy(config)
        self.config.max_position_embeddings = self.context_size
        self.generation_config = generation_config
        self.threads = threads
        self.quality = quality
        self._lock = threading.Lock()
        self._next_id = 0
        self._process = subprocess.Popen(
            ["node", str(llamacpp.script("llamacpp_server.mjs")), str(self.gguf_path.resolve()), str(threads),
             str(self.context_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
            cwd=llamacpp.install_dir())
        ready = self._read()
        if not ready.get("ready"):
            self.close()
            raise TunelabError(f"{self.gguf_path}: llama.cpp cannot load it: {ready.get('error', 'no answer')}")
        self.eog = set(ready.get("eog", []))

    def eval(self) -> "LlamaCppModel":  # the generation core calls model.eval() on any model
        return self

    def _read(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            error = [x for x in self._process.stderr.read().splitlines() if x.strip()]
            raise TunelabError(f"llama.cpp stopped: {error[-1] if error else 'no output'}")
        return json.loads(line)

    def _send(self, message: dict) -> None:
        self._process.stdin.write(json.dumps(message) + "\n")
        self._process.stdin.flush()

    def decode(self, prompt_ids: Sequence[Sequence[int]], push: Callable[[int, int], bool], limits: Sequence[int],
               settings, max_rows: int | None = None) -> list[str]:
        """Generate every row, ``max_rows`` at a time (default all), ``push(row, token)`` per token
        (True: the row is done).

        Returns each row's end as llama.cpp saw it: ``eog`` (an end-of-generation token),
        ``length`` or ``cancelled`` (the caller's ``push`` finished the row first)."""
        for name, off in UNSUPPORTED.items():
            if getattr(settings, name) != off:
                raise TunelabError(f"generation.{name}: not available with --quantize (llama.cpp); "
                                   f"leave it at {off} or drop --quantize")
        ends: list[str] = [""] * len(prompt_ids)
        step = max_rows or len(prompt_ids)
        with self._lock:
            for start in range(0, len(prompt_ids), step):
                self._run_rows(range(start, min(start + step, len(prompt_ids))), prompt_ids, push, limits,
                               settings, ends)
        return ends

    def _run_rows(self, members, prompt_ids, push, limits, settings, ends: list[str]) -> None:
        rows = {}
        for row in members:
            self._next_id += 1
            rows[self._next_id] = row
        self._send({"rows": [{"id": job, "prompt": list(prompt_ids[row]), "max_tokens": int(limits[row])}
                             for job, row in rows.items()],
                    "temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p,
                    "repeat_penalty": settings.repetition_penalty, "seed": settings.seed})
        cancelled: set[int] = set()
        while True:
            message = self._read()
            if "error" in message:
                raise TunelabError(f"llama.cpp: {message['error']}")
            if message.get("batch_done"):
                return
            job = message.get("id")
            if job not in rows:
                continue
            if "done" in message:
                ends[rows[job]] = message["done"]
            elif push(rows[job], int(message["token"])) and job not in cancelled:
                self._send({"cancel": job})
                cancelled.add(job)

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._process.stdin.close()
                self._process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the pipes may be gone already
            pass


def is_llamacpp(model) -> bool:
    return isinstance(model, LlamaCppModel)


def _files_key(folder: Path | None) -> list:
    if folder is None:
        return []
    folder = Path(folder)
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                  if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".gguf", ".model", ".yaml"))


def cache_path(spec: str, quantize: str) -> Path:
    """Where the GGUF export of ``spec`` at ``quantize`` is cached: one file per source state."""
    from tunelab.models.builtin import cache_dir
    from tunelab.models.loading import resolve_spec

    resolved = resolve_spec(spec)
    if resolved.kind == "hub":
        raise TunelabError(f"--quantize: {spec} is a hub id; tunelab works offline, pass a local folder")
    folder = Path(resolved.path)
    key = json.dumps([resolved.kind, str(folder.resolve()), _files_key(folder),
                      str(resolved.adapter.resolve()) if resolved.adapter else None, _files_key(resolved.adapter),
                      _files_key(resolved.bottleneck), quantize], sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    name = (resolved.adapter or folder).name.replace(" ", "_") or "model"
    return cache_dir() / "gguf" / f"{name}-{digest}.{quantize}.gguf"


def quality_line(report: dict) -> str:
    """One line from an export check report: what the GGUF agreed with its source."""
    checks = report.get("checks", [])
    best = next((c for c in checks if "llama.cpp" in c.get("backend", "")), checks[-1] if checks else None)
    if not best:
        return "not checked"
    return (f"{best['backend']}: top-1 agreement {100 * best['top1']:.1f}% with the source, "
            f"{best['identical_answers']}/{best['prompts']} greedy answers identical")


def load_quantized(spec: str, quantize: str, threads: int | None = None, log: Callable[[str], None] = print):
    """``(LlamaCppModel, tokenizer)`` for ``spec`` quantized to ``quantize`` (exported once, then cached).

    ``threads``: llama.cpp's threads; default ``$TUNELAB_THREADS``, else the cores other processes
    leave free (``tunelab.hardware.choose_threads``): on a quiet 2-core AVX2 machine 2 threads
    decoded q8_0 18% faster than 1, while with a busy neighbour 2 threads collapsed."""
    from transformers import AutoConfig, GenerationConfig

    from tunelab.export.gguf_export import export_gguf
    from tunelab.hardware import choose_threads
    from tunelab.models.loading import load_tokenizer, resolve_spec
    from tunelab.vision.compose import is_vision_run

    if quantize not in QUANTIZE_TYPES:
        raise TunelabError(f"--quantize: {quantize!r} is not one of {', '.join(QUANTIZE_TYPES)}")
    if is_vision_run(spec):
        raise TunelabError(f"--quantize: {spec} is a vision-language run; llama.cpp serves its text models only")
    resolved = resolve_spec(spec)
    if resolved.kind == "gguf":
        raise TunelabError(f"--quantize: {spec} is a GGUF file already; quantize the model or run folder it came "
                           "from")
    from tunelab.export import llamacpp

    reason = llamacpp.unavailable_reason()
    if reason:
        raise TunelabError(f"--quantize runs the model in llama.cpp, and {reason}")
    path = cache_path(spec, quantize)
    if path.is_file():
        log(f"using the cached {quantize} export {path}")
    else:
        log(f"exporting {spec} to GGUF {quantize} (once; cached as {path})")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            export_gguf(spec, path, quantize, llamacpp="require", log=log)
        except TunelabError as exc:
            if "export check failed" not in str(exc):
                raise
            text = str(exc).replace(" (--force keeps the result anyway)", "")
            raise TunelabError(f"--quantize {quantize}: {text}; choose a larger type (q8_0 or f16), or export it "
                               f"anyway with tunelab export --gguf {quantize} --force") from None
    report_path = Path(f"{path}.check.json")
    quality = quality_line(json.loads(report_path.read_text(encoding="utf-8"))) if report_path.is_file() else "not checked"
    config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=False)
    try:
        generation_config = GenerationConfig.from_pretrained(resolved.path)
    except OSError:
        generation_config = None
    tokenizer = load_tokenizer(spec)
    choice = choose_threads(threads)
    model = LlamaCppModel(path, config, generation_config, threads=choice.threads, quality=quality)
    log(f"{quality}; llama.cpp runs it on {model.threads} thread(s) ({choice.reason}), "
        f"context {model.context_size} tokens")
    return model, tokenizer
