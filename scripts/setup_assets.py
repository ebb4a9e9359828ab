"""Prepare offline assets once, at `make setup` time. Never fails the setup.

Each step is a function; failures print one line and the step is retried next time
the asset is needed (the builtin model also converts itself on first load; METEOR
builds its WordNet folder on first use when the Debian files are there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# also runnable from a checkout that is not pip-installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

WORDNET_PACKAGES = ["wordnet-base", "wordnet-sense-index"]


def _apt_install(packages: list[str]) -> str | None:
    """Install Debian packages; return None on success or a one-line reason."""
    if not shutil.which("apt-get"):
        return "apt-get not available"
    command = ["apt-get", "install", "-y", "-q", *packages]
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            return "not root and no sudo"
        command = ["sudo", "-n", *command]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:  # a fresh machine may have no package lists yet
            update = [*command[:command.index("install")], "update", "-q"]
            subprocess.run(update, env=env, capture_output=True, text=True, timeout=600)
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{' '.join(command[:3])} failed: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return f"apt-get install failed: {last}"
    return None


def setup_wordnet() -> None:
    """WordNet 3.0 for METEOR: Debian packages -> $TUNELAB_CACHE/nltk_data/corpora/wordnet."""
    from tunelab.eval import wordnet

    if not (wordnet.SYSTEM_WORDNET / "index.sense").is_file():
        reason = _apt_install(WORDNET_PACKAGES)
        if reason:
            print(f"note: WordNet not installed ({reason}); METEOR will report itself unavailable. "
                  f"Install {' '.join(WORDNET_PACKAGES)} and re-run scripts/setup_assets.py.")
            return
    try:
        folder = wordnet.install_wordnet()
    except (OSError, ValueError) as exc:
        print(f"note: WordNet not set up ({exc}); METEOR will report itself unavailable.")
        return
    print(f"WordNet ready: {folder}")


def prepare_builtin_model() -> None:
    """Convert the packaged SmolLM2 GGUF to a safetensors folder in the cache (~20 s, once)."""
    from tunelab.models.builtin import builtin_folder

    print(f"builtin model ready: {builtin_folder('smollm2-135m-instruct')}")


def setup_llamacpp() -> None:
    """node-llama-cpp (prebuilt llama.cpp) for the GGUF export check, where node and npm exist."""
    from tunelab.errors import TunelabError
    from tunelab.export import llamacpp

    if llamacpp.unavailable_reason() is None:
        print(f"llama.cpp ready: {llamacpp.install_dir()}")
        return
    if not (shutil.which("npm") and shutil.which("node")):
        print("note: node/npm not found; GGUF exports are checked in transformers only (tests marked llamacpp skip)")
        return
    try:
        print(f"llama.cpp ready: {llamacpp.install()}")
    except TunelabError as exc:  # optional: the GGUF check then runs in transformers only
        print(f"note: {exc}; GGUF exports are checked in transformers only (tests marked llamacpp skip)")


STEPS = [setup_wordnet, prepare_builtin_model, setup_llamacpp]


def main() -> int:
    for step in STEPS:
        try:
            step()
        except Exception as exc:  # a missing asset must not block installing the rest
            print(f"note: {step.__name__} skipped: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
