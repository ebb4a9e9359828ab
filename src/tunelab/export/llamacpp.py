"""Real llama.cpp, without compiling: the npm package node-llama-cpp ships prebuilt binaries.

``install()`` puts ``node-llama-cpp@VERSION`` under ``$TUNELAB_CACHE/llamacpp`` (or
``$TUNELAB_LLAMACPP_DIR``) with npm — ``make setup`` does it where node and npm exist.
``run_probes`` feeds the export check's probe tokens to llama.cpp and reads back its
greedy answers, its top-1 token at each position of the source's answers, and how its
own tokenizer encodes the probe texts. One thread: on 2 cores, two threads made decoding
collapse while anything else ran.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

from tunelab.errors import TunelabError

VERSION = "3.21.1"
PACKAGE = "node-llama-cpp"
FLASH_ATTENTION = False
"""The check runs llama.cpp without flash attention. node-llama-cpp's default (``"auto"``) turns it
on for a CPU, and then a decode step (one query row) goes through another attention kernel than
the teacher-forced pass (many rows), with its own rounding: on SmolLM2 f16 the greedy decode flipped
a near tie the weights get right (fp32 margin 0.0015 between the top two tokens, probe 2, token 20),
giving 5/6 identical answers at 100% top-1 agreement; an F32 KV cache did not help, flash attention
off gave 6/6 (with F16 or F32 cache). The check is about the file, so it uses the path that agrees
with itself."""


def install_dir() -> Path:
    from tunelab.models.builtin import cache_dir

    return Path(os.environ.get("TUNELAB_LLAMACPP_DIR") or cache_dir() / "llamacpp")


def unavailable_reason() -> str | None:
    """None when llama.cpp can run here, else why not (one line)."""
    if not shutil.which("node"):
        return "node is not installed"
    if not (install_dir() / "node_modules" / PACKAGE / "package.json").is_file():
        return f"{PACKAGE} is not installed (make setup-llamacpp, or tunelab.export.llamacpp.install())"
    return None


def install(timeout: float = 600) -> Path:
    """``npm install node-llama-cpp@VERSION`` into :func:`install_dir` (prebuilt binaries, no compiler)."""
    npm = shutil.which("npm")
    if not npm or not shutil.which("node"):
        raise TunelabError("llama.cpp check: node and npm are needed (e.g. apt-get install nodejs npm)")
    folder = install_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "package.json").is_file():
        (folder / "package.json").write_text('{"private": true, "type": "module"}\n', encoding="utf-8")
    # the prebuilt binaries come inside the package; never fall back to downloading and compiling
    env = dict(os.environ, NODE_LLAMA_CPP_SKIP_DOWNLOAD="true")
    done = subprocess.run([npm, "install", "--no-audit", "--no-fund", f"{PACKAGE}@{VERSION}"], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise TunelabError(f"npm install {PACKAGE}@{VERSION} failed: {last}")
    return folder


def script(name: str = "llamacpp_runner.mjs") -> Path:
    """One of tunelab's node scripts, copied beside node_modules so its ``import`` finds the package."""
    folder = install_dir()
    target = folder / f"tunelab_{name}"
    text = resources.files("tunelab.export").joinpath(name).read_text(encoding="utf-8")
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        target.write_text(text, encoding="utf-8")
    return target


def run_probes(gguf_path: str | Path, prompts: list[list[int]], answers: list[list[int]], stops: list[int],
               texts: list[str] | None = None, max_new_tokens: int = 32, threads: int = 1,
               timeout: float = 600, flash_attention: bool | str = FLASH_ATTENTION,
               score: list[list[int]] | None = None, generate_texts: list[str] | None = None,
               generate_tokens: int = 32) -> dict:
    """llama.cpp's greedy answers, teacher-forced top-1 tokens and tokenization of ``texts``.

    ``flash_attention``: ``False`` (the check's default, see :data:`FLASH_ATTENTION`), ``True`` or
    ``"auto"`` (node-llama-cpp's default, which turns it on for a CPU).
    For benchmarks, after the probes (so ``rss_after_probes_bytes`` is the footprint of serving them):
    ``score`` token windows come back as ``result["score"][i]["logprobs"]`` (log P of each token after
    the ones before it, positions 1..n-1) and ``["top1"]``; ``generate_texts`` (chat prompts already
    rendered) are tokenized by llama.cpp and answered greedily, up to ``generate_tokens`` each
    (``generated``, ``generate_prompts``, ``generate_seconds``).
    """
    reason = unavailable_reason()
    if reason:
        raise TunelabError(f"llama.cpp check: {reason}")
    job = {"model": str(Path(gguf_path).resolve()), "threads": threads, "prompts": prompts, "answers": answers,
           "max_new_tokens": max_new_tokens, "stops": stops, "texts": texts or [],
           "flash_attention": flash_attention, "score": score or [], "generate_texts": generate_texts or [],
           "generate_tokens": generate_tokens}
    started = time.perf_counter()
    try:
        done = subprocess.run(["node", str(script())], input=json.dumps(job), capture_output=True, text=True,
                              timeout=timeout, cwd=install_dir())
    except subprocess.TimeoutExpired:
        raise TunelabError(f"llama.cpp check: no answer within {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise TunelabError(f"llama.cpp check failed: {lines[-1] if lines else f'exit code {done.returncode}'}")
    result = json.loads(done.stdout)
    result["wall_seconds"] = time.perf_counter() - started
    return result
